//! Scenario 6: Noisy neighbours: what the rest of the cluster and one greedy tenant
//! cost the operator. (a) 5,000 node heartbeat Leases in `kube-node-lease` renewed every
//! 10 s against an idle window of the same length, while claims are granted; (b) 1,000
//! claims carrying 250 KB annotations against 1,000 plain ones; (c) grants in a quiet
//! namespace while another namespace creates and drains 10,000 claims; (d) the writes
//! of one handoff with a long queue; (e) 1,000 Pods without the lock label, each
//! changed every 10 s, against an idle window (the Pod watch is label-selected).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use leasekeeper::api::{LockClaim, Phase, Renewal};
use tokio::sync::watch;
use tokio::time::Instant;

use super::scale;
use crate::measure::{ms, operator_metric, proc_stats, spec, stats, Report, Seen, Stats};
use crate::Bench;

pub async fn run(b: &Bench, r: &mut Report) {
    r.add("## 6. Noisy neighbours");
    r.add(String::new());
    node_leases(b, r).await;
    annotations(b, r).await;
    fairness(b, r).await;
    long_queue(b, r).await;
    unlabelled_pods(b, r).await;
}

/// Current resident set of process `pid`, in kB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// The operator's counter `name` so far, summed over the series whose labels contain
/// `label` (all of them for "").
async fn counter(b: &Bench, name: &str, label: &str) -> f64 {
    let text = testkit::scrape(&b.metrics_addr, "/metrics").await;
    operator_metric(&text, name)
        .iter()
        .filter(|(k, _)| k.contains(label))
        .map(|(_, v)| v)
        .sum()
}

/// Watch events the operator received for `kind` so far.
async fn watch_events(b: &Bench, kind: &str) -> f64 {
    let label = format!("kind=\"{kind}\"");
    counter(b, "leasekeeper_watch_events_total", &label).await
}

/// (d) What one handoff costs on a Lease with a long queue: the operator's writes from
/// the holder's release until the queue is settled again.
async fn long_queue(b: &Bench, r: &mut Report) {
    let waiters = if b.args.smoke { 50 } else { 999 };
    let ns = "bench-long-queue";
    testkit::create_namespace(&b.client, ns, &[]).await;
    let (seen, _w) = Seen::start(&b.client, ns).await;
    let api: Api<LockClaim> = Api::namespaced(b.client.clone(), ns);
    for i in 0..=waiters {
        let claim = LockClaim::new(&format!("q{i:04}"), spec("long", Renewal::Holder, 3600));
        api.create(&PostParams::default(), &claim)
            .await
            .expect("claim");
    }
    seen.wait(ns, "q0000", Phase::Granted, Duration::from_secs(60))
        .await
        .expect("first granted");
    let last = format!("q{waiters:04}");
    seen.wait(ns, &last, Phase::Pending, Duration::from_secs(120))
        .await
        .expect("queued");
    // Past the position delay, so that no deferred update is still due, and past the
    // Events of the 1,000 claims' arrival (published at --event-qps).
    tokio::time::sleep(Duration::from_secs(3)).await;
    crate::measure::writes_settled(&b.metrics_addr).await;
    let before = counter(b, "leasekeeper_api_writes_total", "").await;
    let events_before = counter(b, "leasekeeper_api_writes_total", "kind=\"Event\"").await;
    api.delete("q0000", &DeleteParams::default())
        .await
        .expect("release");
    seen.wait(ns, "q0001", Phase::Granted, Duration::from_secs(60))
        .await
        .expect("handed on");
    crate::measure::writes_settled(&b.metrics_addr).await;
    let writes = counter(b, "leasekeeper_api_writes_total", "").await - before;
    let events = counter(b, "leasekeeper_api_writes_total", "kind=\"Event\"").await - events_before;
    let _ = api
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    r.add(format!(
        "### 6d. One handoff on a Lease with {waiters} waiting claims: {writes:.0} operator writes, {events:.0} of them Events (the Lease, the two claims whose grant changed, the exact positions of the first waiters, and their Events; counted from the release until the operator's writes stop, after the queue's own writes had stopped; issue 14 measured 1,012 before positions were bounded)"
    ));
    r.add(String::new());
}

/// One operation every `every`, each timed: when it started and how long it took.
struct Sampler {
    samples: Arc<Mutex<Vec<(Instant, Duration)>>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    /// Runs `op(i)` every `every` until [`Sampler::finish`]; `op` returns when the
    /// operation was done (None: it failed and is left out).
    fn start<F, Fut>(every: Duration, mut op: F) -> Sampler
    where
        F: FnMut(u64) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Option<Instant>> + Send,
    {
        let samples: Arc<Mutex<Vec<(Instant, Duration)>>> = Arc::default();
        let (stop, mut stopped) = watch::channel(false);
        let out = samples.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            for i in 0.. {
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => break,
                    _ = tick.tick() => {}
                }
                let t0 = Instant::now();
                if let Some(done) = op(i).await {
                    out.lock().expect("lock").push((t0, done - t0));
                }
            }
        });
        Sampler {
            samples,
            stop,
            task,
        }
    }

    fn taken(&self) -> Vec<(Instant, Duration)> {
        self.samples.lock().expect("lock").clone()
    }

    async fn finish(self) -> Vec<(Instant, Duration)> {
        let _ = self.stop.send(true);
        let samples = self.samples.clone();
        let _ = self.task.await;
        let taken = samples.lock().expect("lock").clone();
        taken
    }
}

/// Claims granted one after another on fresh Leases in `ns`, each deleted once granted:
/// grant latency, creation to the creator's watch seeing Granted.
async fn grant_probe(client: &Client, ns: &str, every: Duration) -> Sampler {
    testkit::create_namespace(client, ns, &[]).await;
    let (seen, _watch) = Seen::start(client, ns).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), ns);
    let ns = ns.to_string();
    Sampler::start(every, move |i| {
        let (api, seen, ns) = (api.clone(), seen.clone(), ns.clone());
        async move {
            let name = format!("p{i}");
            let claim = LockClaim::new(&name, spec(&name, Renewal::Holder, 3600));
            api.create(&PostParams::default(), &claim).await.ok()?;
            let granted = seen
                .wait(&ns, &name, Phase::Granted, Duration::from_secs(60))
                .await;
            let _ = api.delete(&name, &DeleteParams::default()).await;
            granted
        }
    })
}

/// One Lease created (and deleted) by the harness in `ns` each time: the latency of a
/// single write at that moment, the floor under a grant.
async fn floor_probe(client: &Client, ns: &str, every: Duration) -> Sampler {
    testkit::create_namespace(client, ns, &[]).await;
    let api: Api<Lease> = Api::namespaced(client.clone(), ns);
    Sampler::start(every, move |i| {
        let api = api.clone();
        async move {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(format!("f{i}")),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec::default()),
            };
            api.create(&PostParams::default(), &lease).await.ok()?;
            let done = Instant::now();
            let _ = api.delete(&format!("f{i}"), &DeleteParams::default()).await;
            Some(done)
        }
    })
}

/// (a) The cost of `kube-node-lease` at scale.
async fn node_leases(b: &Bench, r: &mut Report) {
    let (n, window) = if b.args.smoke {
        (50, Duration::from_secs(20))
    } else {
        (5000, Duration::from_secs(120))
    };
    let ns = "kube-node-lease";
    testkit::create_namespace(&b.client, ns, &[]).await;
    let leases: Api<Lease> = Api::namespaced(b.client.clone(), ns);
    create_node_leases(&leases, n).await;
    let (idle, churn) = idle_and_busy(
        b,
        "Lease",
        async || renew_all(&leases, n).await,
        window,
        "bench-nodes",
    )
    .await;
    let _ = leases
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    r.add(format!(
        "### 6a. {n} node heartbeat Leases in `{ns}` renewed every 10 s, {} s windows, a claim granted every second meanwhile",
        window.as_secs()
    ));
    r.add(String::new());
    window_table(r, "heartbeats", "Lease", &idle, &churn);
}

struct WindowCost {
    writes: usize,
    watch_events: f64,
    cpu_s: f64,
    rss_kb: u64,
    grants: Stats,
}

async fn create_node_leases(leases: &Api<Lease>, n: usize) {
    futures::stream::iter(0..n)
        .map(|i| {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(format!("node-{i}")),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(format!("node-{i}")),
                    lease_duration_seconds: Some(40),
                    renew_time: Some(MicroTime(jiff::Timestamp::now())),
                    ..LeaseSpec::default()
                }),
            };
            async move {
                let _ = leases.create(&PostParams::default(), &lease).await;
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
}

/// Operator cost over `window` while `churn` runs every 10 s (`async || 0`: an idle
/// window) and a
/// claim is granted every second in `probe_ns`; watch events of `kind` counted.
async fn window_cost(
    b: &Bench,
    kind: &str,
    mut churn: impl AsyncFnMut() -> usize,
    window: Duration,
    probe_ns: &str,
) -> WindowCost {
    let (_, cpu0) = proc_stats(b.op_pid);
    let events0 = watch_events(b, kind).await;
    let probe = grant_probe(&b.client, probe_ns, Duration::from_secs(1)).await;
    let deadline = Instant::now() + window;
    let mut writes = 0;
    while Instant::now() < deadline {
        let round = Instant::now();
        writes += churn().await;
        tokio::time::sleep_until((round + Duration::from_secs(10)).min(deadline)).await;
    }
    tokio::time::sleep_until(deadline).await;
    let samples = probe.finish().await;
    let (_, cpu1) = proc_stats(b.op_pid);
    WindowCost {
        writes,
        watch_events: watch_events(b, kind).await - events0,
        cpu_s: cpu1 - cpu0,
        rss_kb: rss_kb(b.op_pid),
        grants: stats(samples.into_iter().map(|s| s.1).collect()),
    }
}

/// An idle window, then one with `churn`: their costs (probes in `<probe>-idle` and
/// `<probe>-churn`).
async fn idle_and_busy(
    b: &Bench,
    kind: &str,
    churn: impl AsyncFnMut() -> usize,
    window: Duration,
    probe: &str,
) -> (WindowCost, WindowCost) {
    let idle = window_cost(b, kind, async || 0, window, &format!("{probe}-idle")).await;
    let busy = window_cost(b, kind, churn, window, &format!("{probe}-churn")).await;
    (idle, busy)
}

/// Writes the table of an idle window against a busy one.
fn window_table(r: &mut Report, what: &str, kind: &str, idle: &WindowCost, busy: &WindowCost) {
    r.add(format!("| window | {what} writes | operator {kind} watch events | operator CPU | operator RSS at end | grant p99 ms (N) |"));
    r.add("|---|---|---|---|---|---|");
    for (window, c) in [("idle", idle), (what, busy)] {
        r.add(format!(
            "| {window} | {} | {:.0} | {:.2} s | {:.1} MiB | {} ({}) |",
            c.writes,
            c.watch_events,
            c.cpu_s,
            mib(c.rss_kb),
            ms(c.grants.p99),
            c.grants.n
        ));
    }
    r.add(String::new());
}

/// One heartbeat of every node Lease; returns the writes that succeeded.
async fn renew_all(leases: &Api<Lease>, n: usize) -> usize {
    let now = MicroTime(jiff::Timestamp::now());
    patch_all(
        leases,
        "node-",
        n,
        serde_json::json!({"spec": {"renewTime": now}}),
    )
    .await
}

/// Merge-patches `<prefix>0..<prefix>n` with `patch`, 32 at once; returns the writes
/// that succeeded.
async fn patch_all<K>(api: &Api<K>, prefix: &str, n: usize, patch: serde_json::Value) -> usize
where
    K: Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
{
    futures::stream::iter(0..n)
        .map(|i| {
            let patch = &patch;
            async move {
                api.patch(
                    &format!("{prefix}{i}"),
                    &PatchParams::default(),
                    &Patch::Merge(patch),
                )
                .await
                .is_ok()
            }
        })
        .buffer_unordered(32)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await
}

/// (b) What a claim's size costs the operator's memory.
async fn annotations(b: &Bench, r: &mut Report) {
    let n = if b.args.smoke { 50 } else { 1000 };
    let ns = "bench-annotations";
    testkit::create_namespace(&b.client, ns, &[]).await;
    let (seen, _w) = Seen::start(&b.client, ns).await;
    let api: Api<LockClaim> = Api::namespaced(b.client.clone(), ns);
    let settle = Duration::from_secs(5);
    tokio::time::sleep(settle).await;
    let base = rss_kb(b.op_pid);
    create_granted(&api, &seen, ns, "plain", n, 0).await;
    tokio::time::sleep(settle).await;
    let plain = rss_kb(b.op_pid);
    create_granted(&api, &seen, ns, "big", n, 250_000).await;
    tokio::time::sleep(settle).await;
    let big = rss_kb(b.op_pid);
    let _ = api
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    let (plain_d, big_d) = (
        mib(plain.saturating_sub(base)),
        mib(big.saturating_sub(plain)),
    );
    r.add(format!(
        "### 6b. {n} plain claims, then {n} claims with a 250 KB annotation each (all granted)"
    ));
    r.add(String::new());
    r.add("| measure | operator RSS |");
    r.add("|---|---|");
    r.add(format!("| before | {:.1} MiB |", mib(base)));
    r.add(format!(
        "| after {n} plain claims | {:.1} MiB (+{plain_d:.1}) |",
        mib(plain)
    ));
    r.add(format!(
        "| after {n} annotated claims more | {:.1} MiB (+{big_d:.1}) |",
        mib(big)
    ));
    r.add(String::new());
    r.add(format!(
        "{n} annotated claims cost {:.1} MiB more than {n} plain ones.",
        big_d - plain_d
    ));
    r.add(String::new());
}

/// Creates `n` claims named `{prefix}{i}` on Leases of the same names, each with an
/// annotation of `bytes` bytes if not 0, and waits until all are granted.
async fn create_granted(
    api: &Api<LockClaim>,
    seen: &Seen,
    ns: &str,
    prefix: &str,
    n: usize,
    bytes: usize,
) {
    let blob = "x".repeat(bytes);
    futures::stream::iter(0..n)
        .map(|i| {
            let name = format!("{prefix}{i}");
            let mut claim = LockClaim::new(&name, spec(&name, Renewal::Holder, 3600));
            if bytes > 0 {
                claim.metadata.annotations =
                    Some([("bench.leasekeeper.io/blob".to_string(), blob.clone())].into());
            }
            async move {
                api.create(&PostParams::default(), &claim)
                    .await
                    .expect("claim create");
                seen.wait(ns, &name, Phase::Granted, Duration::from_secs(300))
                    .await
                    .expect("granted");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}

/// (c) A quiet namespace's grants while another namespace churns, beside the floor: one
/// Lease create by the harness at the same moments, so that what the API server's own
/// load adds shows apart from what the operator adds.
async fn fairness(b: &Bench, r: &mut Report) {
    let (leases, idle_n) = if b.args.smoke { (20, 10) } else { (1000, 200) };
    let every = Duration::from_millis(100);
    let idle = grant_probe(&b.client, "bench-quiet-idle", every).await;
    let idle_floor = floor_probe(&b.client, "bench-floor-idle", every).await;
    while idle.taken().len() < idle_n {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle = stats(idle.finish().await.into_iter().map(|s| s.1).collect());
    let idle_floor = stats(idle_floor.finish().await.into_iter().map(|s| s.1).collect());
    let probe = grant_probe(&b.client, "bench-quiet", every).await;
    let floor = floor_probe(&b.client, "bench-floor-busy", every).await;
    let plane = scale::PlaneCpu::start(b);
    let t0 = Instant::now();
    let busy = ["bench-busy".to_string()];
    let run = scale::scale(&b.client, &busy, leases, 10, "busy").await;
    let (settle, drain, total) = (run.settle, run.drain, run.total);
    let cores = plane.cores(settle + drain);
    let split = |v: Vec<(Instant, Duration)>| {
        let (a, b): (Vec<_>, Vec<_>) = v.into_iter().partition(|(at, _)| *at < t0 + settle);
        let s = |v: Vec<(Instant, Duration)>| stats(v.into_iter().map(|s| s.1).collect());
        (s(a), s(b))
    };
    let (creating, draining) = split(probe.finish().await);
    let (floor_creating, floor_draining) = split(floor.finish().await);
    r.add(format!(
        "### 6c. Grants in a quiet namespace (a claim every 100 ms) while namespace bench-busy takes {total} claims over {leases} Leases ({:.1} s to settle) and drains them ({:.1} s)",
        settle.as_secs_f64(),
        drain.as_secs_f64()
    ));
    r.add(String::new());
    r.header();
    r.row("quiet namespace grant, nothing else running", &idle);
    r.row("floor: one Lease create, nothing else running", &idle_floor);
    r.row("quiet namespace grant, while bench-busy settles", &creating);
    r.row(
        "floor: one Lease create, while bench-busy settles",
        &floor_creating,
    );
    r.row("quiet namespace grant, while bench-busy drains", &draining);
    r.row(
        "floor: one Lease create, while bench-busy drains",
        &floor_draining,
    );
    r.add(String::new());
    let ratio = |a: &Stats, b: &Stats| a.p99.as_secs_f64() / b.p99.as_secs_f64().max(1e-9);
    r.add(format!(
        "Quiet-namespace grant p99 against idle: {:.1}x while bench-busy settles, {:.1}x while it drains. The floor (one Lease create) rose {:.1}x and {:.1}x; grant p99 / floor p99: {:.1} idle, {:.1} settling, {:.1} draining. kube-apiserver used {:.2} cores and etcd {:.2} (of {}) meanwhile.",
        ratio(&creating, &idle),
        ratio(&draining, &idle),
        ratio(&floor_creating, &idle_floor),
        ratio(&floor_draining, &idle_floor),
        ratio(&idle, &idle_floor),
        ratio(&creating, &floor_creating),
        ratio(&draining, &floor_draining),
        cores.0,
        cores.1,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
    ));
    r.add(String::new());
}

/// (e) Pods without the lock label: the Pod watch is label-selected, so they should cost
/// the operator nothing. `n` Pods (Pending: the bench's plane has no node) created, then
/// an idle window against one where every Pod's annotation changes every 10 s.
async fn unlabelled_pods(b: &Bench, r: &mut Report) {
    use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
    let (n, window) = if b.args.smoke {
        (50, Duration::from_secs(20))
    } else {
        (1000, Duration::from_secs(120))
    };
    let ns = "bench-unlabelled-pods";
    testkit::create_namespace(&b.client, ns, &[]).await;
    let pods: Api<Pod> = Api::namespaced(b.client.clone(), ns);
    futures::stream::iter(0..n)
        .map(|i| {
            let pod = Pod {
                metadata: ObjectMeta {
                    name: Some(format!("p{i}")),
                    ..ObjectMeta::default()
                },
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "c".into(),
                        image: Some("busybox".into()),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
                status: None,
            };
            let pods = &pods;
            async move {
                let _ = pods.create(&PostParams::default(), &pod).await;
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let mut round = 0u64;
    let (idle, busy) = idle_and_busy(
        b,
        "Pod",
        async || {
            round += 1;
            let touch = serde_json::json!({"metadata": {"annotations": {"bench/round": round.to_string()}}});
            patch_all(&pods, "p", n, touch).await
        },
        window,
        "bench-pods",
    )
    .await;
    let _ = pods
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    r.add(format!(
        "### 6e. {n} Pods without the label `leasekeeper.io/lock`, every one's annotation changed every 10 s, {} s windows, a claim granted every second meanwhile",
        window.as_secs()
    ));
    r.add(String::new());
    window_table(r, "Pod changes", "Pod", &idle, &busy);
}
