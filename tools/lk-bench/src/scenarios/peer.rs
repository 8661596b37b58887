//! The client-go leader-election peer on the handoff and failover scenarios: K=3
//! candidates per Lease; the leader is SIGKILLed or SIGTERMed (ReleaseOnCancel).

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use super::failover::sizes;
use crate::measure::{stats, Stats};
use crate::Bench;

/// (what, latency) rows; empty without `--peer`.
pub type PeerRows = Vec<(String, Stats)>;

/// client-go's election timings: label, lease duration, renew deadline, retry period.
struct Timings {
    label: &'static str,
    lease: u64,
    renew_deadline: f64,
    retry: f64,
}

const TIMINGS: [Timings; 2] = [
    Timings {
        label: "defaults 15s/10s/2s",
        lease: 15,
        renew_deadline: 10.0,
        retry: 2.0,
    },
    Timings {
        label: "aggressive 4s/3s/0.5s",
        lease: 4,
        renew_deadline: 3.0,
        retry: 0.5,
    },
];

pub async fn measure(b: &Bench) -> PeerRows {
    let Some(peer) = &b.args.peer else {
        return Vec::new();
    };
    testkit::create_namespace(&b.client, "bench-client-go", &[]).await;
    let (total, batch) = sizes(b);
    let mut rows = Vec::new();
    for t in &TIMINGS {
        for kill in [false, true] {
            let v = peer_run(b, peer, t, kill, total, batch).await;
            let what = if kill {
                "leader SIGKILLed -> new OnStartedLeading"
            } else {
                "leader SIGTERM (ReleaseOnCancel) -> new OnStartedLeading"
            };
            rows.push((format!("client-go {}: {what}", t.label), stats(v)));
        }
    }
    rows
}

type Leading = (String, String, Instant);

async fn peer_run(
    b: &Bench,
    peer: &Path,
    t: &Timings,
    kill: bool,
    total: usize,
    batch: usize,
) -> Vec<Duration> {
    let mut out = Vec::new();
    let tag = format!("{}-{}", if kill { "k" } else { "t" }, t.lease);
    for round in 0..total.div_ceil(batch) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Leading>();
        let mut procs: HashMap<(String, String), tokio::process::Child> = HashMap::new();
        let mut leases = Vec::new();
        for i in 0..batch.min(total - round * batch) {
            let lease = format!("cg-{tag}-{round}-{i}");
            for k in 0..3 {
                let id = format!("c{k}");
                let child = candidate(b, peer, t, &lease, &id, tx.clone());
                procs.insert((lease.clone(), id), child);
            }
            leases.push(lease);
        }
        let mut leader: HashMap<String, String> = HashMap::new();
        while leader.len() < leases.len() {
            match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                Ok(Some((lease, id, _))) => {
                    leader.entry(lease).or_insert(id);
                }
                _ => break,
            }
        }
        // Followers must have seen the leader's record before it dies.
        let settle = t.retry * 2.0 + 0.5 + (round as f64 * 0.137) % 1.0;
        tokio::time::sleep(Duration::from_secs_f64(settle)).await;
        let mut t0s = HashMap::new();
        for (lease, id) in &leader {
            if let Some(child) = procs.get_mut(&(lease.clone(), id.clone())) {
                t0s.insert(lease.clone(), Instant::now());
                stop(child, kill);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(t.lease * 3 + 10);
        while !t0s.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((lease, id, at))) if leader.get(&lease) != Some(&id) => {
                    if let Some(t0) = t0s.remove(&lease) {
                        out.push(at - t0);
                    }
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        for (_, mut c) in procs {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
    out
}

/// One candidate process; its "LEADING id" lines are sent to `tx` with their time.
fn candidate(
    b: &Bench,
    peer: &Path,
    t: &Timings,
    lease: &str,
    id: &str,
    tx: UnboundedSender<Leading>,
) -> tokio::process::Child {
    let kubeconfig = b.args.kubeconfig.to_string_lossy();
    let mut child = tokio::process::Command::new(peer)
        .args(["-kubeconfig", &kubeconfig, "-namespace", "bench-client-go"])
        .args(["-lease", lease, "-id", id])
        .args(["-lease-duration", &format!("{}s", t.lease)])
        .args(["-renew-deadline", &format!("{}s", t.renew_deadline)])
        .args(["-retry-period", &format!("{}s", t.retry)])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("client-go peer");
    if let Some(stdout) = child.stdout.take() {
        let lease = lease.to_string();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if let Some(rest) = l.strip_prefix("LEADING ") {
                    let id = rest.split(' ').next().unwrap_or_default().to_string();
                    let _ = tx.send((lease.clone(), id, Instant::now()));
                }
            }
        });
    }
    child
}

fn stop(child: &mut tokio::process::Child, kill: bool) {
    if kill {
        let _ = child.start_kill();
    } else if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}
