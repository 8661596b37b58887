//! The faults, and how each is injected into a running world.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::PostParams;
use kube::ResourceExt;
use leasekeeper::api::{LockClaim, Phase};
use nix::sys::signal::Signal;
use rand::Rng;

use crate::run::World;

/// A kind of fault. `--faults` names them in kebab case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// SIGKILL of the leader replica (the supervisor restarts it, as kubelet would).
    KillLeader,
    /// SIGKILL of a random replica.
    KillReplica,
    /// SIGSTOP of a holder past its TTL; it wakes believing it holds.
    PauseHolder,
    /// kube-apiserver killed and started again.
    RestartApiserver,
    /// etcd killed and started again.
    RestartEtcd,
    /// A third party deletes a live claim.
    DeleteClaim,
    /// A third party takes a Lease for an "intruder", or deletes it.
    EditLease,
    /// A holder killed and replaced by one with a skewed clock.
    SkewedHolder,
    /// SIGSTOP of the leader past its term.
    PauseLeader,
    /// The leader stops taking in Lease watch events for a while (chaos build only).
    StallLeaseWatch,
    /// SIGTERM of the leader, mid-plan: a graceful stop must end its term and drain
    /// before it releases leadership (checked by (g): no write after a successor leads).
    TermLeader,
}

/// The schedule draws uniformly from this table (pause-holder has two entries).
pub const SCHEDULE: [Fault; 12] = [
    Fault::KillLeader,
    Fault::KillReplica,
    Fault::PauseHolder,
    Fault::PauseHolder,
    Fault::RestartApiserver,
    Fault::RestartEtcd,
    Fault::DeleteClaim,
    Fault::EditLease,
    Fault::SkewedHolder,
    Fault::PauseLeader,
    Fault::StallLeaseWatch,
    Fault::TermLeader,
];

impl Fault {
    /// Injects the fault; returns what was done (a key of the run's fault totals).
    pub async fn inject(self, w: &mut World) -> &'static str {
        match self {
            Fault::KillLeader => kill_leader(w).await,
            Fault::KillReplica => {
                let mut reps = w.replicas.lock().await;
                let i = w.rng.random_range(0..reps.len());
                let _ = reps[i].child.start_kill();
                "kill random replica"
            }
            Fault::PauseHolder => pause_holder(w).await,
            Fault::RestartApiserver => match w.restart_plane("apiserver").await {
                true => "restart kube-apiserver",
                false => "restart kube-apiserver (failed)",
            },
            Fault::RestartEtcd => match w.restart_plane("etcd").await {
                true => "restart etcd",
                false => "restart etcd (failed)",
            },
            Fault::DeleteClaim => delete_claim(w).await,
            Fault::EditLease => edit_lease(w).await,
            Fault::SkewedHolder => skewed_holder(w).await,
            Fault::PauseLeader => pause_leader(w).await,
            Fault::TermLeader => {
                if let Some(pid) = w.leader_pid().await {
                    signal(pid, Signal::SIGTERM);
                }
                "SIGTERM the leader replica"
            }
            Fault::StallLeaseWatch => {
                // The leader's Lease watch lags (3 s, past the holders' 2 s TTL) while
                // its API calls still work: its Lease cache is stale. Only the
                // resourceVersion it decided from stops it from expiring holders that
                // renewed meanwhile (check (h)).
                if let Some(pid) = w.leader_pid().await {
                    signal(pid, Signal::SIGUSR1);
                }
                "stall the leader's Lease watch"
            }
        }
    }
}

fn signal(pid: u32, sig: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

async fn kill_leader(w: &mut World) -> &'static str {
    let leader = w.leader().await;
    let mut reps = w.replicas.lock().await;
    // SIGKILL only: the supervisor brings it back, as kubelet would.
    if let Some(r) = reps
        .iter_mut()
        .find(|r| Some(&r.identity) == leader.as_ref())
    {
        let _ = r.child.start_kill();
    }
    "kill leader replica"
}

/// Pause the leader past its term: it wakes up with writes decided before the pause,
/// while another replica leads. The term check and preconditions must stop them.
async fn pause_leader(w: &mut World) -> &'static str {
    if let Some(pid) = w.leader_pid().await {
        signal(pid, Signal::SIGSTOP);
        let pause = w.rng.random_range(3500..5000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        signal(pid, Signal::SIGCONT);
    }
    "pause leader replica past its term"
}

/// Pause a holder past its TTL (2 s), then let it wake believing it holds. In the
/// holder-side control, pause the holders that ignore lost() while they hold.
async fn pause_holder(w: &mut World) -> &'static str {
    let i = if w.ignore_lost {
        w.ignoring_holder_that_holds().await
    } else {
        w.rng.random_range(0..w.holders.len())
    };
    if !w.holders[i].paused {
        if let Some(pid) = w.holders[i].child.id() {
            signal(pid, Signal::SIGSTOP);
            w.holders[i].paused = true;
            let pause = Duration::from_millis(w.rng.random_range(2500..4000));
            tokio::time::sleep(pause).await;
            signal(pid, Signal::SIGCONT);
            w.holders[i].paused = false;
        }
    }
    "pause holder past TTL"
}

async fn delete_claim(w: &mut World) -> &'static str {
    let list = w
        .claims
        .list(&Default::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let live: Vec<&LockClaim> = list
        .iter()
        .filter(|c| !c.phase().is_some_and(Phase::is_terminal))
        .collect();
    if !live.is_empty() {
        let c = live[w.rng.random_range(0..live.len())];
        let _ = w.claims.delete(&c.name_any(), &Default::default()).await;
    }
    "third party deletes a claim"
}

async fn edit_lease(w: &mut World) -> &'static str {
    let l = format!("lock-{}", w.rng.random_range(0..w.args.leases));
    if !w.rng.random_bool(0.5) {
        let _ = w.leases.delete(&l, &Default::default()).await;
        return "third party deletes a Lease";
    }
    if let Ok(Some(mut lease)) = w.leases.get_opt(&l).await {
        if let Some(s) = lease.spec.as_mut() {
            s.holder_identity = Some("intruder".into());
            s.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        }
        let _ = w.leases.replace(&l, &PostParams::default(), &lease).await;
    }
    "third party takes a Lease"
}

/// Skewed clocks run all along (a third of the holders are 10 min behind, a third
/// ahead); this restarts one holder with a skewed clock for good measure.
async fn skewed_holder(w: &mut World) -> &'static str {
    let i = w.rng.random_range(0..w.holders.len());
    let _ = w.holders[i].child.start_kill();
    let _ = w.holders[i].child.wait().await;
    let lease = w.holders[i].lease.clone();
    let id = format!("{}-r{}", lease, w.rng.random_range(0..1_000_000));
    let seed = w.rng.random();
    let skew = if w.rng.random_bool(0.5) { -600 } else { 600 };
    w.holders[i] = w.spawn_holder(&lease, &id, seed, skew, false);
    "kill holder (skewed replacement)"
}
