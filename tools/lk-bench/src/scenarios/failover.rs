//! Scenario 3: Failover after holder death: `kubectl lock run` holders are SIGKILLed; the
//! waiters' grants are timed.

use std::process::Stdio;
use std::time::Duration;

use kube::api::PostParams;
use kube::Api;
use leasekeeper::api::{LockClaim, Phase, Renewal};
use tokio::time::Instant;

use super::peer::PeerRows;
use crate::measure::{spec, stats, Report, Seen, Stats};
use crate::Bench;

pub type Failovers = Vec<(String, Stats, Duration)>;

/// Failover samples per lease duration (4 s and 15 s).
pub fn sizes(b: &Bench) -> (usize, usize) {
    if b.args.smoke {
        (3, 3)
    } else {
        (100, 25)
    }
}

pub async fn measure(b: &Bench) -> Failovers {
    let (total, batch) = sizes(b);
    let mut out = Vec::new();
    for d in [4u64, 15] {
        let v = lk_failover(b, d, total, batch).await;
        out.push((
            format!("leasekeeper, Holder renewal, lease {d} s: holder SIGKILLed -> next Granted"),
            stats(v),
            Duration::from_secs(d),
        ));
    }
    out
}

async fn lk_failover(b: &Bench, d: u64, total: usize, batch: usize) -> Vec<Duration> {
    let ns = format!("bench-failover-{d}");
    testkit::create_namespace(&b.client, &ns, &[]).await;
    let (seen, _w) = Seen::start(&b.client, &ns).await;
    let claims: Api<LockClaim> = Api::namespaced(b.client.clone(), &ns);
    let mut out = Vec::new();
    for round in 0..total.div_ceil(batch) {
        let size = batch.min(total - round * batch);
        let holders = holders(b, &ns, d, round, size);
        for (lease, _) in &holders {
            seen.wait_lease(&ns, lease, Phase::Granted, Duration::from_secs(60))
                .await;
            let waiter =
                LockClaim::new(&format!("w-{lease}"), spec(lease, Renewal::Controller, 15));
            claims
                .create(&PostParams::default(), &waiter)
                .await
                .expect("waiter");
        }
        for (lease, _) in &holders {
            let w = format!("w-{lease}");
            seen.wait(&ns, &w, Phase::Pending, Duration::from_secs(30))
                .await;
        }
        // Let renewals fall at random points relative to the kill.
        tokio::time::sleep(Duration::from_millis(500 + (round as u64 * 137) % 1000)).await;
        let mut killed = Vec::new();
        for (lease, child) in holders {
            let t0 = Instant::now();
            kill_group(&child);
            killed.push((lease, t0, child));
        }
        for (lease, t0, mut child) in killed {
            let w = format!("w-{lease}");
            let limit = Duration::from_secs(d * 3 + 10);
            if let Some(t) = seen.wait(&ns, &w, Phase::Granted, limit).await {
                out.push(t - t0);
            }
            let _ = child.wait().await;
            // The waiter is a Controller-renewal claim: release it so it does not keep
            // costing renewals in later scenarios.
            let _ = claims.delete(&w, &Default::default()).await;
        }
    }
    out
}

/// The holder's machine dies: the plugin and its reaper are SIGKILLed together (their
/// own process group), so nothing is left to release the claim and it must expire. (A
/// SIGKILL of the plugin alone is survived by its reaper, which kills the command and
/// then releases at once: a handoff, not a failover.)
fn kill_group(child: &tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// `size` holders (`kubectl lock run ... -- sh -c 'read x'`), one Lease each, each in a
/// process group of its own.
fn holders(
    b: &Bench,
    ns: &str,
    d: u64,
    round: usize,
    size: usize,
) -> Vec<(String, tokio::process::Child)> {
    (0..size)
        .map(|i| {
            let lease = format!("f{round}-{i}");
            let ttl = format!("{d}s");
            let child = tokio::process::Command::new(b.args.bin.join("kubectl-lock"))
                .args(["-n", ns, "run", &lease, "--ttl", &ttl])
                .args(["--", "sh", "-c", "read x"])
                .env("KUBECONFIG", &b.args.kubeconfig)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .process_group(0)
                .spawn()
                .expect("kubectl-lock");
            (lease, child)
        })
        .collect()
}

pub fn report(r: &mut Report, f: &Failovers, peer: &PeerRows) {
    r.add("## 3. Failover after holder death");
    r.add(String::new());
    r.add("The holder's plugin and reaper are SIGKILLed together (its machine died) and stop renewing. leasekeeper expires it one lease duration after it last *observed* a renewal (renewals come every third of the duration), so the expected failover lies between 2/3 and 1 duration after the kill.");
    r.add(String::new());
    r.header();
    for (what, s, _) in f {
        r.row(what, s);
    }
    for (what, s) in peer.iter().filter(|(w, _)| w.contains("SIGKILL")) {
        r.row(what, s);
    }
    r.add(String::new());
    for (what, s, d) in f {
        let beyond = |x: Duration| x.as_millis() as i64 - d.as_millis() as i64;
        r.add(format!(
            "- {what}: delay beyond the lease duration at p99 {} ms, max {} ms.",
            beyond(s.p99),
            beyond(s.max)
        ));
    }
    r.add(String::new());
}
