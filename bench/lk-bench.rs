//! lk-bench: leasekeeper against client-go leader election, side by side on one real
//! kube-apiserver, so machine noise cancels out in the ratios. Prints a markdown report
//! and writes it to `--out`. Measures; asserts nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Config};
use leasekeeper::api::{LockClaim, LockClaimSpec, Phase, Renewal};
use tokio::io::AsyncBufReadExt;
use tokio::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "leasekeeper benchmarks against client-go leader election")]
struct Args {
    /// Kubeconfig of the control plane to measure on.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Directory holding the leasekeeper and kubectl-lock binaries to run.
    #[arg(long)]
    bin: PathBuf,
    /// The client-go leader-election peer binary (bench/peers/client-go-le).
    #[arg(long)]
    peer: Option<PathBuf>,
    /// Small N everywhere: exercises every scenario in about two minutes.
    #[arg(long)]
    smoke: bool,
    /// Where to write the markdown report.
    #[arg(long)]
    out: PathBuf,
    /// Run only these scenarios (1 grant, 2 handoff, 3 failover, 4 scale, 5 idle).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 3, 4, 5])]
    only: Vec<u8>,
}

struct Stats {
    n: usize,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let n = v.len();
    let q = |p: f64| {
        if n == 0 {
            Duration::ZERO
        } else {
            v[((n as f64 * p).ceil() as usize).clamp(1, n) - 1]
        }
    };
    Stats {
        n,
        p50: q(0.50),
        p90: q(0.90),
        p99: q(0.99),
        max: v.last().copied().unwrap_or_default(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// (namespace, claim) -> (Lease name, first time seen in each phase).
type SeenMap = HashMap<(String, String), (String, HashMap<Phase, Instant>)>;

/// First time each claim was seen in each phase, from one namespace-wide watch.
#[derive(Clone, Default)]
struct Seen {
    map: Arc<Mutex<SeenMap>>,
    notify: Arc<tokio::sync::Notify>,
}

impl Seen {
    async fn start(client: &Client, ns: &str) -> (Seen, tokio::task::JoinHandle<()>) {
        let seen = Seen::default();
        let api: Api<LockClaim> = Api::namespaced(client.clone(), ns);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c)) => {
                        let now = Instant::now();
                        if let Some(p) = c.phase() {
                            let key = (
                                c.metadata.namespace.clone().unwrap_or_default(),
                                c.metadata.name.clone().unwrap_or_default(),
                            );
                            let mut m = s.map.lock().expect("lock");
                            let e = m
                                .entry(key)
                                .or_insert_with(|| (c.spec.lease_name.clone(), HashMap::new()));
                            e.1.entry(p).or_insert(now);
                        }
                        s.notify.notify_waiters();
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some(t) = tx.take() {
                            let _ = t.send(());
                        }
                    }
                    _ => {}
                }
            }
        });
        let _ = rx.await;
        (seen, task)
    }

    async fn wait(&self, ns: &str, name: &str, phase: Phase, timeout: Duration) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.notify.notified();
            if let Some(t) = self
                .map
                .lock()
                .expect("lock")
                .get(&(ns.to_string(), name.to_string()))
                .and_then(|e| e.1.get(&phase).copied())
            {
                return Some(t);
            }
            if tokio::time::timeout_at(deadline, n).await.is_err() {
                return None;
            }
        }
    }

    /// The claim (any name) on `lease` first seen in `phase`.
    async fn wait_lease(
        &self,
        ns: &str,
        lease: &str,
        phase: Phase,
        timeout: Duration,
    ) -> Option<(String, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.notify.notified();
            let found = self
                .map
                .lock()
                .expect("lock")
                .iter()
                .find_map(|((cns, name), (l, ph))| {
                    (cns == ns && l == lease)
                        .then(|| ph.get(&phase).map(|t| (name.clone(), *t)))
                        .flatten()
                });
            if found.is_some() {
                return found;
            }
            if tokio::time::timeout_at(deadline, n).await.is_err() {
                return None;
            }
        }
    }
}

fn spec(lease: &str, renewal: Renewal, duration: i32) -> LockClaimSpec {
    LockClaimSpec {
        lease_name: lease.into(),
        holder_identity: None,
        lease_duration_seconds: duration,
        priority: 0,
        renewal,
        lock_delay_seconds: 0,
        release: false,
        max_hold_seconds: None,
        ttl_seconds_after_finished: None,
    }
}

async fn namespace(client: &Client, name: &str) {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    let _ = Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await;
}

/// Sums of `apiserver_request_total` by (verb, resource[/subresource]) for our resources.
async fn apiserver_requests(client: &Client) -> BTreeMap<String, f64> {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("request");
    let text = client.request_text(req).await.unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let label = |k: &str| {
            line.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
        };
        let resource = label("resource");
        if !["leases", "lockclaims", "events"].contains(&resource) {
            continue;
        }
        let sub = label("subresource");
        let key = format!(
            "{} {}{}",
            label("verb"),
            resource,
            if sub.is_empty() {
                String::new()
            } else {
                format!("/{sub}")
            }
        );
        let v: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry(key).or_insert(0.0) += v;
    }
    out
}

fn delta(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, per: usize) -> String {
    let mut parts = Vec::new();
    for (k, v) in b {
        let d = v - a.get(k).copied().unwrap_or(0.0);
        if d > 0.0 && !k.starts_with("WATCH") {
            parts.push(format!("{k}: {:.2}", d / per.max(1) as f64));
        }
    }
    parts.join(", ")
}

fn operator_metric(text: &str, prefix: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn proc_stats(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0);
    (hwm_kb, ticks / 100.0)
}

struct Report {
    lines: Vec<String>,
}

impl Report {
    fn add(&mut self, s: impl Into<String>) {
        let s = s.into();
        println!("{s}");
        self.lines.push(s);
    }
    fn row(&mut self, what: &str, s: &Stats) {
        self.add(format!(
            "| {what} | {} | {} | {} | {} | {} |",
            ms(s.p50),
            ms(s.p90),
            ms(s.p99),
            ms(s.max),
            s.n
        ));
    }
    fn header(&mut self) {
        self.add("| scenario | p50 ms | p90 ms | p99 ms | max ms | N |");
        self.add("|---|---|---|---|---|---|");
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let kc = Kubeconfig::read_from(&args.kubeconfig).expect("kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    let client = Client::try_from(cfg).expect("client");
    let n = if args.smoke { 10 } else { 200 };
    let mut r = Report { lines: Vec::new() };

    // The CRD, as the operator needs it.
    leasekeeper::controller::install_crd(client.clone(), "lk-bench", Duration::from_secs(60))
        .await
        .expect("CRD installed");

    // The operator under test, as its own process.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let metrics_addr = format!("127.0.0.1:{port}");
    let log = std::fs::File::create("target/bench-operator.log").expect("log");
    let mut op = tokio::process::Command::new(args.bin.join("leasekeeper"))
        .args([
            "run",
            "--metrics-addr",
            &metrics_addr,
            "--gc-grace",
            "1h",
            "--concurrency",
            "32",
        ])
        .env("KUBECONFIG", &args.kubeconfig)
        .env(
            "RUST_LOG",
            std::env::var("LK_BENCH_OPERATOR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("operator starts");
    let op_pid = op.id().unwrap_or_default();
    let mut ready = false;
    for _ in 0..300 {
        if leasekeeper::telemetry::scrape(&metrics_addr, "/readyz").await == "ready" {
            ready = true;
            break;
        }
        if let Ok(Some(status)) = op.try_wait() {
            panic!("the operator exited ({status}); see target/bench-operator.log");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ready,
        "the operator did not become ready; see target/bench-operator.log"
    );

    let version = client
        .apiserver_version()
        .await
        .map(|v| v.git_version)
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_string))
        .unwrap_or_default();
    let date = jiff::Timestamp::now()
        .strftime("%Y-%m-%d %H:%M UTC")
        .to_string();
    r.add(format!(
        "# leasekeeper benchmarks{}",
        if args.smoke {
            " (smoke: small N, numbers not meaningful)"
        } else {
            ""
        }
    ));
    r.add(String::new());
    r.add(format!("{date}; {cpu}; {} cores; kube-apiserver {version} + etcd v3.6.16 on loopback; leasekeeper {} (binaries from {}); client-go v0.35.4.", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), env!("CARGO_PKG_VERSION"), args.bin.display()));
    r.add(String::new());

    // Warm-up: the first requests to a freshly created CRD are slow in the API server
    // (about 2 s here); one claim granted and released keeps that out of the figures.
    namespace(&client, "bench-warmup").await;
    {
        let (seen, _w) = Seen::start(&client, "bench-warmup").await;
        let api: Api<LockClaim> = Api::namespaced(client.clone(), "bench-warmup");
        api.create(
            &PostParams::default(),
            &LockClaim::new("warmup", spec("warmup", Renewal::Holder, 3600)),
        )
        .await
        .expect("warm-up claim");
        seen.wait(
            "bench-warmup",
            "warmup",
            Phase::Granted,
            Duration::from_secs(30),
        )
        .await
        .expect("warm-up granted");
        let _ = api.delete("warmup", &Default::default()).await;
    }

    let on = |n: u8| args.only.contains(&n);
    if on(1) {
        // 1. Grant latency on a free Lease, and the floor: bare Lease create and update.
        let ns = "bench-grant";
        namespace(&client, ns).await;
        namespace(&client, "bench-floor").await;
        let (seen, _w) = Seen::start(&client, ns).await;
        let claims: Api<LockClaim> = Api::namespaced(client.clone(), ns);
        let before = apiserver_requests(&client).await;
        let mut grant = Vec::new();
        for i in 0..n {
            let name = format!("g{i}");
            let t0 = Instant::now();
            claims
                .create(
                    &PostParams::default(),
                    &LockClaim::new(&name, spec(&name, Renewal::Holder, 3600)),
                )
                .await
                .expect("create");
            if let Some(t) = seen
                .wait(ns, &name, Phase::Granted, Duration::from_secs(30))
                .await
            {
                grant.push(t - t0);
            }
        }
        let after = apiserver_requests(&client).await;
        let grant_cost = delta(&before, &after, n);
        let leases: Api<Lease> = Api::namespaced(client.clone(), "bench-floor");
        let (mut create, mut update) = (Vec::new(), Vec::new());
        for i in 0..n {
            let l = Lease {
                metadata: ObjectMeta {
                    name: Some(format!("f{i}")),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some("x".into()),
                    ..LeaseSpec::default()
                }),
            };
            let t0 = Instant::now();
            let mut created = leases
                .create(&PostParams::default(), &l)
                .await
                .expect("lease create");
            create.push(t0.elapsed());
            if let Some(s) = created.spec.as_mut() {
                s.holder_identity = Some("y".into());
            }
            let t0 = Instant::now();
            leases
                .replace(&format!("f{i}"), &PostParams::default(), &created)
                .await
                .expect("lease update");
            update.push(t0.elapsed());
        }
        let (g, c, u) = (stats(grant), stats(create), stats(update));
        r.add(
            "## 1. Grant latency on a free Lease (claim created -> creator's watch sees Granted)",
        );
        r.add(String::new());
        r.header();
        r.row("leasekeeper grant", &g);
        r.row("floor: one Lease create", &c);
        r.row("floor: one Lease update", &u);
        r.add(String::new());
        r.add(format!("Grant p50 = {:.1}x one Lease create, p99 = {:.1}x (a grant is at least: claim create, finalizer, Lease create, status write, watch delivery).", g.p50.as_secs_f64() / c.p50.as_secs_f64().max(1e-9), g.p99.as_secs_f64() / c.p99.as_secs_f64().max(1e-9)));
        r.add(String::new());
        r.add(format!("API requests per grant (apiserver_request_total deltas, includes the benchmark's own claim create): {grant_cost}"));
        r.add(String::new());
    }

    if on(2) || on(3) {
        // 2. Handoff after a clean release.
        let ns = "bench-handoff";
        namespace(&client, ns).await;
        let (seen, _w2) = Seen::start(&client, ns).await;
        let claims: Api<LockClaim> = Api::namespaced(client.clone(), ns);
        let mut results = Vec::new();
        let before = apiserver_requests(&client).await;
        for variant in ["delete", "release"] {
            let mut v = Vec::new();
            for i in 0..n {
                let (a, b, lease) = (
                    format!("{variant}-a{i}"),
                    format!("{variant}-b{i}"),
                    format!("{variant}-{i}"),
                );
                claims
                    .create(
                        &PostParams::default(),
                        &LockClaim::new(&a, spec(&lease, Renewal::Holder, 3600)),
                    )
                    .await
                    .expect("a");
                seen.wait(ns, &a, Phase::Granted, Duration::from_secs(30))
                    .await;
                claims
                    .create(
                        &PostParams::default(),
                        &LockClaim::new(&b, spec(&lease, Renewal::Holder, 3600)),
                    )
                    .await
                    .expect("b");
                seen.wait(ns, &b, Phase::Pending, Duration::from_secs(30))
                    .await;
                let t0 = Instant::now();
                if variant == "delete" {
                    claims
                        .delete(&a, &Default::default())
                        .await
                        .expect("delete");
                } else {
                    claims
                        .patch(
                            &a,
                            &PatchParams::default(),
                            &Patch::Merge(serde_json::json!({"spec": {"release": true}})),
                        )
                        .await
                        .expect("release");
                }
                if let Some(t) = seen
                    .wait(ns, &b, Phase::Granted, Duration::from_secs(30))
                    .await
                {
                    v.push(t - t0);
                }
            }
            results.push((variant, stats(v)));
        }
        let after = apiserver_requests(&client).await;
        let handoff_cost = delta(&before, &after, 2 * n);

        // 3. Failover after holder death, and the client-go peer on the same scenarios.
        let fail_n = if args.smoke { 3 } else { 100 };
        let batch = if args.smoke { 3 } else { 25 };
        let mut failover: Vec<(String, Stats, Duration)> = Vec::new();
        for d in [4u64, 15] {
            let v = lk_failover(&client, &args, d, fail_n, batch).await;
            failover.push((
                format!(
                    "leasekeeper, Holder renewal, lease {d} s: holder SIGKILLed -> next Granted"
                ),
                stats(v),
                Duration::from_secs(d),
            ));
        }
        let mut peer_rows: Vec<(String, Stats)> = Vec::new();
        if let Some(peer) = &args.peer {
            namespace(&client, "bench-client-go").await;
            for (label, d, rd, rp) in [
                ("defaults 15s/10s/2s", 15u64, 10.0, 2.0),
                ("aggressive 4s/3s/0.5s", 4, 3.0, 0.5),
            ] {
                for kill in [false, true] {
                    let v = peer_run(&args, peer, d, rd, rp, kill, fail_n, batch).await;
                    let what = if kill {
                        "leader SIGKILLed -> new OnStartedLeading"
                    } else {
                        "leader SIGTERM (ReleaseOnCancel) -> new OnStartedLeading"
                    };
                    peer_rows.push((format!("client-go {label}: {what}"), stats(v)));
                }
            }
        }
        r.add("## 2. Handoff after a clean release (holder releases -> next claimant's watch sees Granted)");
        r.add(String::new());
        r.header();
        for (variant, s) in &results {
            r.row(
                &format!(
                    "leasekeeper, holder {}",
                    if *variant == "delete" {
                        "claim deleted"
                    } else {
                        "`release: true`"
                    }
                ),
                s,
            );
        }
        for (what, s) in peer_rows.iter().filter(|(w, _)| w.contains("SIGTERM")) {
            r.row(what, s);
        }
        r.add(String::new());
        r.add(format!("API requests per handoff (includes the benchmark's own two creates and one delete/patch): {handoff_cost}"));
        r.add(String::new());
        r.add("## 3. Failover after holder death");
        r.add(String::new());
        r.add("The holder process is SIGKILLed and stops renewing. leasekeeper expires it one lease duration after it last *observed* a renewal (renewals come every third of the duration), so the expected failover lies between 2/3 and 1 duration after the kill.");
        r.add(String::new());
        r.header();
        for (what, s, _) in &failover {
            r.row(what, s);
        }
        for (what, s) in peer_rows.iter().filter(|(w, _)| w.contains("SIGKILL")) {
            r.row(what, s);
        }
        r.add(String::new());
        for (what, s, d) in &failover {
            r.add(format!(
                "- {what}: delay beyond the lease duration at p99 {} ms, max {} ms.",
                (s.p99.as_millis() as i64) - (d.as_millis() as i64),
                (s.max.as_millis() as i64) - (d.as_millis() as i64)
            ));
        }
        r.add(String::new());
    }

    if on(4) {
        // 4. Scale.
        let (nss, per_ns, per_lease) = if args.smoke { (2, 5, 10) } else { (20, 50, 10) };
        let (t_settle, t_drain, total) = scale(&client, nss, per_ns, per_lease).await;
        let (hwm_kb, cpu_s) = proc_stats(op_pid);
        r.add("## 4. Scale");
        r.add(String::new());
        r.add(format!("{total} claims over {} Leases in {nss} namespaces, created as fast as the API server takes them (64 in flight):", nss * per_ns));
        r.add(String::new());
        r.add("| measure | value |");
        r.add("|---|---|");
        r.add(format!(
            "| creation start -> every claim Granted or Pending at its true position | {:.1} s |",
            t_settle.as_secs_f64()
        ));
        r.add(format!(
            "| first release -> every queue drained ({total} grants and releases) | {:.1} s |",
            t_drain.as_secs_f64()
        ));
        r.add(format!(
            "| operator peak RSS (VmHWM, whole run so far) | {:.1} MiB |",
            hwm_kb as f64 / 1024.0
        ));
        r.add(format!(
            "| operator CPU (user+system, whole run so far) | {cpu_s:.1} s |"
        ));
        r.add(String::new());
    }

    if on(5) {
        // 5. Idle cost.
        let idle_n = if args.smoke { 20 } else { 1000 };
        let window = if args.smoke {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(60)
        };
        r.add("## 5. Idle cost: operator writes while Leases sit held");
        r.add(String::new());
        r.add("| renewal | Leases | operator writes per minute (by kind) |");
        r.add("|---|---|---|");
        for (renewal, d) in [(Renewal::Holder, 3600), (Renewal::Controller, 15)] {
            let per_min = idle(&client, &metrics_addr, renewal, d, idle_n, window).await;
            r.add(format!(
                "| {renewal:?} (lease {d} s) | {idle_n} | {per_min} |"
            ));
        }
        r.add(String::new());
    }
    let _ = op.kill().await;
    if let Some(dir) = args.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&args.out, r.lines.join("\n") + "\n").expect("write report");
    eprintln!("report written to {}", args.out.display());
}

/// leasekeeper failover: `kubectl lock run` holders are SIGKILLed; waiters' grants timed.
async fn lk_failover(
    client: &Client,
    args: &Args,
    d: u64,
    total: usize,
    batch: usize,
) -> Vec<Duration> {
    let ns = format!("bench-failover-{d}");
    namespace(client, &ns).await;
    let (seen, _w) = Seen::start(client, &ns).await;
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    let mut out = Vec::new();
    for b in 0..total.div_ceil(batch) {
        let mut holders = Vec::new();
        for i in 0..batch.min(total - b * batch) {
            let lease = format!("f{b}-{i}");
            let child = tokio::process::Command::new(args.bin.join("kubectl-lock"))
                .args([
                    "-n",
                    &ns,
                    "run",
                    &lease,
                    "--ttl",
                    &format!("{d}s"),
                    "--",
                    "sh",
                    "-c",
                    "read x",
                ])
                .env("KUBECONFIG", &args.kubeconfig)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("kubectl-lock");
            holders.push((lease, child));
        }
        for (lease, _) in &holders {
            seen.wait_lease(&ns, lease, Phase::Granted, Duration::from_secs(60))
                .await;
            claims
                .create(
                    &PostParams::default(),
                    &LockClaim::new(&format!("w-{lease}"), spec(lease, Renewal::Controller, 15)),
                )
                .await
                .expect("waiter");
        }
        for (lease, _) in &holders {
            seen.wait(
                &ns,
                &format!("w-{lease}"),
                Phase::Pending,
                Duration::from_secs(30),
            )
            .await;
        }
        // Let renewals fall at random points relative to the kill.
        tokio::time::sleep(Duration::from_millis(500 + (b as u64 * 137) % 1000)).await;
        let mut killed = Vec::new();
        for (lease, mut child) in holders {
            let t0 = Instant::now();
            let _ = child.start_kill();
            killed.push((lease, t0, child));
        }
        for (lease, t0, mut child) in killed {
            if let Some(t) = seen
                .wait(
                    &ns,
                    &format!("w-{lease}"),
                    Phase::Granted,
                    Duration::from_secs(d * 3 + 10),
                )
                .await
            {
                out.push(t - t0);
            }
            let _ = child.wait().await;
            // The waiter is a Controller-renewal claim: release it so it does not keep
            // costing renewals in later scenarios.
            let _ = claims
                .delete(&format!("w-{lease}"), &Default::default())
                .await;
        }
    }
    out
}

/// client-go: K=3 candidates per Lease; the leader is SIGKILLed or SIGTERMed.
#[allow(clippy::too_many_arguments)]
async fn peer_run(
    args: &Args,
    peer: &PathBuf,
    d: u64,
    rd: f64,
    rp: f64,
    kill: bool,
    total: usize,
    batch: usize,
) -> Vec<Duration> {
    let ns = "bench-client-go";
    let mut out = Vec::new();
    let tag = format!("{}-{d}", if kill { "k" } else { "t" });
    for b in 0..total.div_ceil(batch) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String, Instant)>();
        let mut procs: HashMap<(String, String), tokio::process::Child> = HashMap::new();
        let mut leases = Vec::new();
        for i in 0..batch.min(total - b * batch) {
            let lease = format!("cg-{tag}-{b}-{i}");
            for k in 0..3 {
                let id = format!("c{k}");
                let mut child = tokio::process::Command::new(peer)
                    .args([
                        "-kubeconfig",
                        &args.kubeconfig.to_string_lossy(),
                        "-namespace",
                        ns,
                        "-lease",
                        &lease,
                        "-id",
                        &id,
                    ])
                    .args([
                        "-lease-duration",
                        &format!("{d}s"),
                        "-renew-deadline",
                        &format!("{rd}s"),
                        "-retry-period",
                        &format!("{rp}s"),
                    ])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .expect("client-go peer");
                if let Some(stdout) = child.stdout.take() {
                    let (tx, lease) = (tx.clone(), lease.clone());
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
        tokio::time::sleep(Duration::from_secs_f64(
            rp * 2.0 + 0.5 + (b as f64 * 0.137) % 1.0,
        ))
        .await;
        let mut t0s = HashMap::new();
        for (lease, id) in &leader {
            if let Some(child) = procs.get_mut(&(lease.clone(), id.clone())) {
                t0s.insert(lease.clone(), Instant::now());
                if kill {
                    let _ = child.start_kill();
                } else if let Some(pid) = child.id() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(d * 3 + 10);
        while !t0s.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((lease, id, t))) => {
                    if leader.get(&lease) != Some(&id) {
                        if let Some(t0) = t0s.remove(&lease) {
                            out.push(t - t0);
                        }
                    }
                }
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

/// Scale: returns (creation start -> settled, release start -> drained, claims). The
/// harness watches its claims (label bench=scale) into a local cache instead of polling
/// lists, so that it does not load the API server it measures.
async fn scale(
    client: &Client,
    nss: usize,
    per_ns: usize,
    per_lease: usize,
) -> (Duration, Duration, usize) {
    use kube::runtime::reflector;
    let names: Vec<String> = (0..nss).map(|i| format!("bench-scale-{i:02}")).collect();
    for ns in &names {
        namespace(client, ns).await;
    }
    let (store, writer) = reflector::store::<LockClaim>();
    let cfg = watcher::Config::default().labels("bench=scale");
    let watch = reflector::reflector(writer, watcher(Api::<LockClaim>::all(client.clone()), cfg))
        .modify(|c| c.metadata.managed_fields = None)
        .default_backoff()
        .for_each(|_| futures::future::ready(()));
    let watch = tokio::spawn(watch);
    let _ = store.wait_until_ready().await;
    let mut jobs = Vec::new();
    for ns in &names {
        for l in 0..per_ns {
            for c in 0..per_lease {
                jobs.push((ns.clone(), format!("l{l}"), format!("l{l}-c{c}")));
            }
        }
    }
    let total = jobs.len();
    let t0 = Instant::now();
    futures::stream::iter(jobs)
        .map(|(ns, lease, name)| {
            let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
            let mut claim = LockClaim::new(&name, spec(&lease, Renewal::Controller, 3600));
            claim.metadata.labels = Some([("bench".to_string(), "scale".to_string())].into());
            async move { api.create(&PostParams::default(), &claim).await }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await
        .expect("creates");
    let settle = loop {
        let claims = store.state();
        if claims.len() == total && settled(&claims) {
            break t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let t1 = Instant::now();
    let mut asked: std::collections::HashSet<(String, String)> = Default::default();
    loop {
        let claims = store.state();
        if claims
            .iter()
            .filter(|c| c.phase() == Some(Phase::Released))
            .count()
            == total
        {
            break;
        }
        let granted: Vec<(String, String)> = claims
            .iter()
            .filter(|c| c.phase() == Some(Phase::Granted))
            .map(|c| {
                (
                    c.metadata.namespace.clone().unwrap_or_default(),
                    c.metadata.name.clone().unwrap_or_default(),
                )
            })
            .filter(|k| !asked.contains(k))
            .collect();
        asked.extend(granted.iter().cloned());
        futures::stream::iter(granted)
            .map(|(ns, name)| {
                let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
                async move {
                    let _ = api
                        .patch(
                            &name,
                            &PatchParams::default(),
                            &Patch::Merge(serde_json::json!({"spec": {"release": true}})),
                        )
                        .await;
                }
            })
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watch.abort();
    (settle, t1.elapsed(), total)
}

/// Every Lease has one Granted claim and its waiting claims hold their true positions.
fn settled(claims: &[Arc<LockClaim>]) -> bool {
    let mut by_lease: BTreeMap<(String, String), Vec<&LockClaim>> = BTreeMap::new();
    for c in claims {
        by_lease
            .entry((
                c.metadata.namespace.clone().unwrap_or_default(),
                c.spec.lease_name.clone(),
            ))
            .or_default()
            .push(c);
    }
    by_lease.values().all(|claims| {
        let granted = claims
            .iter()
            .filter(|c| c.phase() == Some(Phase::Granted))
            .count();
        let mut waiting: Vec<&&LockClaim> = claims
            .iter()
            .filter(|c| c.phase() != Some(Phase::Granted))
            .collect();
        waiting.sort_by_key(|c| {
            (
                c.metadata.creation_timestamp.clone().map(|t| t.0),
                c.metadata.name.clone(),
            )
        });
        granted == 1
            && waiting.iter().enumerate().all(|(i, c)| {
                c.phase() == Some(Phase::Pending)
                    && c.status.as_ref().and_then(|s| s.queue_position) == Some(i as i32 + 1)
            })
    })
}

/// Operator writes per minute while `n` Leases are held and nothing happens.
async fn idle(
    client: &Client,
    metrics_addr: &str,
    renewal: Renewal,
    d: i32,
    n: usize,
    window: Duration,
) -> String {
    let ns = format!("bench-idle-{}", format!("{renewal:?}").to_lowercase());
    namespace(client, &ns).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let _ = api
                    .create(
                        &PostParams::default(),
                        &LockClaim::new(&format!("i{i}"), spec(&format!("i{i}"), renewal, d)),
                    )
                    .await;
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    loop {
        let granted = api
            .list(&ListParams::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|c| c.phase() == Some(Phase::Granted))
                    .count()
            })
            .unwrap_or(0);
        if granted == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Let the grant burst finish before counting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a = operator_metric(
        &leasekeeper::telemetry::scrape(metrics_addr, "/metrics").await,
        "leasekeeper_api_writes_total",
    );
    tokio::time::sleep(window).await;
    let b = operator_metric(
        &leasekeeper::telemetry::scrape(metrics_addr, "/metrics").await,
        "leasekeeper_api_writes_total",
    );
    let mut parts = Vec::new();
    let mut sum = 0.0;
    for (k, v) in &b {
        let dlt = (v - a.get(k).copied().unwrap_or(0.0)) * 60.0 / window.as_secs_f64();
        if dlt > 0.0 {
            let kind = k
                .split("kind=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or(k);
            parts.push(format!("{kind} {dlt:.0}"));
            sum += dlt;
        }
    }
    // Release them so they do not keep costing for the rest of the run.
    for i in 0..n {
        let _ = api.delete(&format!("i{i}"), &Default::default()).await;
    }
    if parts.is_empty() {
        "0".into()
    } else {
        format!("{sum:.0} ({})", parts.join(", "))
    }
}
