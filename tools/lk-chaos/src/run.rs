//! The run: replicas under a supervisor, holders, faults on a seeded schedule, then the
//! checker and the summary.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use leasekeeper::api::LockClaim;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::check;
use crate::faults::{Fault, SCHEDULE};
use testkit::checker::{self, Report};
use testkit::recorder::{self, History};

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Control-plane directory (hack/control-plane.sh up DIR was run).
    #[arg(long)]
    pub plane: PathBuf,
    /// Directory with the leasekeeper binary (built with --features chaos-negative-controls).
    #[arg(long)]
    pub bin: PathBuf,
    /// Seed of the fault schedule (printed; the same seed replays the same schedule).
    #[arg(long)]
    pub seed: Option<u64>,
    /// How long faults are injected.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Leases.
    #[arg(long, default_value_t = 5)]
    pub leases: usize,
    /// Holder processes per Lease.
    #[arg(long, default_value_t = 4)]
    pub holders: usize,
    /// Capacity of each lock (a Lock object is created when above 1): the semaphore
    /// mode, checked for at most this many Granted per lock and one per slot Lease.
    #[arg(long, default_value_t = 1)]
    pub capacity: u32,
    /// Operator replicas.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Mean seconds between faults.
    #[arg(long, default_value_t = 1.0)]
    pub fault_every: f64,
    /// Inject only these fault kinds (comma-separated; default: all).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub faults: Vec<Fault>,
    /// Negative control: LEASEKEEPER_BREAK for the operators, or "holder-ignores-lost".
    #[arg(long = "break")]
    pub break_: Option<String>,
    /// Markdown summary output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub struct Replica {
    pub child: tokio::process::Child,
    pub identity: String,
    pub metrics: String,
}

pub struct HolderProc {
    pub child: tokio::process::Child,
    pub lease: String,
    pub paused: bool,
}

/// Everything a fault acts on.
pub struct World {
    pub args: RunArgs,
    pub ns: String,
    pub rng: StdRng,
    pub replicas: Arc<tokio::sync::Mutex<Vec<Replica>>>,
    pub holders: Vec<HolderProc>,
    pub leases: Api<Lease>,
    pub claims: Api<LockClaim>,
    /// The holder-side negative control: one holder per Lease ignores lost().
    pub ignore_lost: bool,
}

impl World {
    /// Who leads now.
    pub async fn leader(&self) -> Option<String> {
        testkit::current_leader(&self.leases, "leasekeeper-leader").await
    }

    /// The pid of the leader replica.
    pub async fn leader_pid(&self) -> Option<u32> {
        let leader = self.leader().await?;
        self.replicas
            .lock()
            .await
            .iter()
            .find(|r| testkit::is_replica(&leader, &r.identity))
            .and_then(|r| r.child.id())
    }

    /// Restarts the control plane's `apiserver` or `etcd`; false if it did not come back.
    pub async fn restart_plane(&self, what: &str) -> bool {
        tokio::process::Command::new("hack/control-plane.sh")
            .arg("restart")
            .arg(&self.args.plane)
            .arg(what)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
    }

    /// The index of an ignoring holder (h{l}-0) that holds its Lease now, else of a
    /// random Lease's ignoring holder.
    pub async fn ignoring_holder_that_holds(&mut self) -> usize {
        for l in 0..self.args.leases {
            let h = self
                .leases
                .get_opt(&format!("lock-{l}"))
                .await
                .ok()
                .flatten()
                .and_then(|x| x.spec?.holder_identity);
            if h.as_deref() == Some(format!("h{l}-0").as_str()) {
                return l * self.args.holders;
            }
        }
        self.rng.random_range(0..self.args.leases) * self.args.holders
    }

    /// Starts a holder process.
    pub fn spawn_holder(
        &self,
        lease: &str,
        identity: &str,
        seed: u64,
        skew: i64,
        ignore_lost: bool,
    ) -> HolderProc {
        let exe = std::env::current_exe().expect("exe");
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(["holder", "--namespace", &self.ns, "--lease", lease])
            .args(["--identity", identity, "--seed", &seed.to_string()])
            .args(["--ttl", "2", "--skew", &skew.to_string()])
            .arg("--kubeconfig")
            .arg(self.args.plane.join("kubeconfig"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if ignore_lost {
            cmd.arg("--ignore-lost");
        }
        HolderProc {
            child: cmd.spawn().expect("holder"),
            lease: lease.to_string(),
            paused: false,
        }
    }
}

fn spawn_replica(a: &RunArgs, identity: &str, ns: &str) -> Replica {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("target/chaos-{identity}.log"))
        .expect("log");
    let metrics = format!("127.0.0.1:{}", testkit::free_port());
    let mut cmd = tokio::process::Command::new(a.bin.join("leasekeeper"));
    cmd.args(["run", "--leader-elect", "--leader-namespace", ns])
        .args(["--watch-namespace", ns, "--identity", identity])
        .args(["--metrics-addr", &metrics, "--gc-grace", "3s"])
        .args([
            "--leader-lease-duration",
            "3s",
            "--leader-renew-deadline",
            "2s",
        ])
        .args(["--leader-retry-period", "300ms"])
        .env("KUBECONFIG", a.plane.join("kubeconfig"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    if let Some(b) = a.break_.as_deref().filter(|b| *b != "holder-ignores-lost") {
        cmd.env("LEASEKEEPER_BREAK", b);
    }
    Replica {
        child: cmd.spawn().expect("leasekeeper"),
        identity: identity.into(),
        metrics,
    }
}

/// Restarts any replica that exits, as kubelet would.
fn supervise(w: &World) -> tokio::task::JoinHandle<()> {
    let (replicas, a, ns) = (w.replicas.clone(), w.args.clone(), w.ns.clone());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            for r in replicas.lock().await.iter_mut() {
                if matches!(r.child.try_wait(), Ok(Some(_))) {
                    let id = r.identity.clone();
                    *r = spawn_replica(&a, &id, &ns);
                }
            }
        }
    })
}

async fn setup(a: RunArgs, seed: u64) -> (World, Client) {
    let client = testkit::client_for(&a.plane.join("kubeconfig")).await;
    // A namespace of its own per run: registers and Leases left by an earlier run on
    // the same control plane must not count in this one.
    let ns = format!("chaos-{}-{}", seed % 100_000, std::process::id());
    testkit::create_namespace(&client, &ns, &[]).await;
    testkit::install_crd(client.clone(), "lk-chaos", Duration::from_secs(60)).await;
    let replicas = (0..a.replicas)
        .map(|i| spawn_replica(&a, &format!("op-{i}"), &ns))
        .collect();
    if a.capacity > 1 {
        create_locks(&client, &ns, a.leases, a.capacity).await;
    }
    let mut w = World {
        ignore_lost: a.break_.as_deref() == Some("holder-ignores-lost"),
        rng: StdRng::seed_from_u64(seed),
        replicas: Arc::new(tokio::sync::Mutex::new(replicas)),
        holders: Vec::new(),
        leases: Api::namespaced(client.clone(), &ns),
        claims: Api::namespaced(client.clone(), &ns),
        args: a,
        ns,
    };
    for l in 0..w.args.leases {
        for h in 0..w.args.holders {
            let skew = [0, -600, 600][h % 3];
            let lease = format!("lock-{l}");
            // In the holder-side control one holder per Lease ignores lost().
            let seed = w.rng.random();
            let ignore = w.ignore_lost && h == 0;
            let p = w.spawn_holder(&lease, &format!("h{l}-{h}"), seed, skew, ignore);
            w.holders.push(p);
        }
    }
    (w, client)
}

/// One Lock of `capacity` per lock `lock-<l>`.
async fn create_locks(client: &Client, ns: &str, locks: usize, capacity: u32) {
    use leasekeeper::api::{Lock, LockSpec};
    let api: Api<Lock> = Api::namespaced(client.clone(), ns);
    let capacity = i32::try_from(capacity).unwrap_or(i32::MAX);
    for l in 0..locks {
        let lock = Lock::new(&format!("lock-{l}"), LockSpec { capacity });
        api.create(&Default::default(), &lock).await.expect("Lock");
    }
}

pub async fn run(a: RunArgs) -> std::process::ExitCode {
    let seed = a
        .seed
        .unwrap_or_else(|| jiff::Timestamp::now().as_nanosecond() as u64);
    println!("lk-chaos: seed {seed} (replay with --seed {seed})");
    let (mut w, client) = setup(a, seed).await;
    let history: History = Arc::default();
    let recorder = tokio::spawn(recorder::record(
        client.clone(),
        w.ns.clone(),
        history.clone(),
    ));
    let supervisor = supervise(&w);
    let faults = inject_faults(&mut w, &history).await;
    let non_leader_writes = non_leader_writes(&w).await;

    // Settle: stop the holders (SIGKILL: what they held expires), let the operator finish.
    for h in &mut w.holders {
        if let Some(pid) = h.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
        let _ = h.child.start_kill();
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut report = check::check(&client, &w.ns, &history, w.args.leases, w.args.capacity).await;
    report
        .violations
        .insert(checker::NON_LEADER_WROTE, non_leader_writes);
    let writes = replica_writes(&w).await;
    let obs = history.lock().expect("lock").clone();
    checker::writes_after_succession(&writes, &obs, "leasekeeper-leader", &mut report);
    recorder.abort();
    supervisor.abort();
    for r in w.replicas.lock().await.iter_mut() {
        let _ = r.child.start_kill();
    }
    summarize(&w.args, seed, &report, &faults)
}

/// Faults on the seeded schedule for the run's duration; returns how many of each.
async fn inject_faults(w: &mut World, history: &History) -> BTreeMap<&'static str, usize> {
    let mut faults: BTreeMap<&'static str, usize> = BTreeMap::new();
    let allowed: Vec<Fault> = SCHEDULE
        .iter()
        .copied()
        .filter(|f| w.args.faults.contains(f))
        .collect();
    let started = Instant::now();
    let mut next_progress = started + Duration::from_secs(60);
    while started.elapsed() < w.args.duration {
        if Instant::now() >= next_progress {
            next_progress += Duration::from_secs(60);
            let seen = history.lock().expect("lock").len();
            println!(
                "lk-chaos: {:.0} min, {} faults, {seen} states observed",
                started.elapsed().as_secs_f64() / 60.0,
                faults.values().sum::<usize>()
            );
        }
        let max = (2.0 * w.args.fault_every).max(0.3);
        let wait = Duration::from_secs_f64(w.rng.random_range(0.2..max));
        tokio::time::sleep(wait).await;
        let fault = if allowed.is_empty() {
            SCHEDULE[w.rng.random_range(0..SCHEDULE.len())]
        } else {
            allowed[w.rng.random_range(0..allowed.len())]
        };
        let done = fault.inject(w).await;
        *faults.entry(done).or_default() += 1;
    }
    faults
}

/// Every write the replicas logged for this run's namespace.
async fn replica_writes(w: &World) -> Vec<checker::Write> {
    let mut out = Vec::new();
    for r in w.replicas.lock().await.iter() {
        let log =
            std::fs::read_to_string(format!("target/chaos-{}.log", r.identity)).unwrap_or_default();
        out.extend(checker::parse_writes(&log, &w.ns));
    }
    out
}

/// (g): a replica that is not the leader must have written nothing.
async fn non_leader_writes(w: &World) -> Vec<String> {
    let mut out = Vec::new();
    for r in w.replicas.lock().await.iter() {
        let text = testkit::scrape(&r.metrics, "/metrics").await;
        let wrote = testkit::metric(&text, "leasekeeper_writes_while_not_leading_total ");
        if wrote > 0.0 {
            out.push(format!(
                "{} wrote {wrote} times while not leading",
                r.identity
            ));
        }
    }
    out
}

fn summarize(
    a: &RunArgs,
    seed: u64,
    report: &Report,
    faults: &BTreeMap<&'static str, usize>,
) -> std::process::ExitCode {
    let control = a
        .break_
        .as_deref()
        .map(|b| format!(", NEGATIVE CONTROL {b}"))
        .unwrap_or_default();
    let mut out = vec![
        format!("# lk-chaos summary (seed {seed})"),
        String::new(),
        format!(
            "{} locks of capacity {}, {} holders each, {} operator replicas, {:?} of faults{control}.",
            a.leases, a.capacity, a.holders, a.replicas, a.duration
        ),
        String::new(),
        "| check | violations |".into(),
        "|---|---|".into(),
    ];
    for (name, v) in &report.violations {
        out.push(format!("| {name} | {} |", v.len()));
    }
    out.extend([
        String::new(),
        "| total | count |".into(),
        "|---|---|".into(),
    ]);
    for (k, v) in &report.totals {
        out.push(format!("| {k} | {v} |"));
    }
    for (k, v) in faults {
        out.push(format!("| fault: {k} | {v} |"));
    }
    let text = out.join("\n");
    println!("{text}");
    for (name, v) in &report.violations {
        for e in v.iter().take(5) {
            println!("  {name}: {e}");
        }
    }
    if let Some(p) = &a.out {
        let _ = std::fs::write(p, text + "\n");
    }
    let total: usize = report.violations.values().map(Vec::len).sum();
    if total > 0 {
        println!("lk-chaos: {total} violation(s) (seed {seed})");
        std::process::ExitCode::FAILURE
    } else {
        println!("lk-chaos: no violations (seed {seed})");
        std::process::ExitCode::SUCCESS
    }
}
