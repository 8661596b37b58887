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
        .open(crate::run_file(&format!("chaos-{identity}.log")))
        .expect("log");
    let metrics = format!("127.0.0.1:{}", testkit::free_port());
    let mut cmd = tokio::process::Command::new(a.bin.join("leasekeeper"));
    // Each replica writes as a user of its own (impersonated by the plane's admin), so
    // that the API server's audit log names who made each write.
    let kubeconfig = replica_kubeconfig(&a.plane.join("kubeconfig"), identity);
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
        .env("KUBECONFIG", kubeconfig)
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

/// The user a replica writes as in the audit log.
pub fn replica_user(identity: &str) -> String {
    format!("lk-{identity}")
}

/// A kubeconfig of the plane's that impersonates the replica's own user (in the group
/// system:masters: the rights stay the admin's).
fn replica_kubeconfig(plane: &std::path::Path, identity: &str) -> PathBuf {
    let text = std::fs::read_to_string(plane).expect("plane kubeconfig");
    let mut v: serde_json::Value = serde_saphyr::from_str(&text).expect("kubeconfig YAML");
    if let Some(users) = v["users"].as_array_mut() {
        for u in users {
            u["user"]["as"] = replica_user(identity).into();
            u["user"]["as-groups"] = serde_json::json!(["system:masters"]);
        }
    }
    let path = crate::run_file(&format!("chaos-{identity}.kubeconfig"));
    std::fs::write(&path, v.to_string()).expect("write kubeconfig");
    path
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
    // Every lock's guarded objects are fenced by the API server; the holders' outcome
    // logs start empty.
    let locks: Vec<String> = (0..a.leases).map(|l| format!("lock-{l}")).collect();
    crate::guarded::install(&client, &ns, &locks).await;
    for l in 0..a.leases {
        for h in 0..a.holders {
            let _ = std::fs::remove_file(crate::guarded::log_path(&format!("h{l}-{h}")));
        }
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
    let commit = testkit::commit();
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
    audit_view(&w, &obs, &mut report);
    recorder.abort();
    supervisor.abort();
    for r in w.replicas.lock().await.iter_mut() {
        let _ = r.child.start_kill();
    }
    summarize(&w.args, seed, &commit, &report, &faults)
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

/// The second view: the API server's audit log of the run's namespace, replayed in
/// resourceVersion order and checked; both views must count the same grants.
fn audit_view(w: &World, obs: &[testkit::recorder::Obs], report: &mut Report) {
    let Some(text) = audit_text(&w.args.plane) else {
        return;
    };
    let writes = audit_checks(&text, &w.ns, w.args.capacity, report);
    guarded_outcomes(w.args.leases, w.args.holders, report);
    let watched = obs
        .iter()
        .filter(|o| {
            o.kind == testkit::recorder::Kind::Claim
                && o.phase == Some(leasekeeper::api::Phase::Granted)
        })
        .filter_map(|o| Some((o.name.clone(), o.token?)))
        .collect();
    let unknown = testkit::audit::unknown_outcome_grants(&text, &w.ns);
    testkit::audit::views_agree(&writes, &watched, &unknown, report);
}

/// Every audit log file in the plane's directory, concatenated; `None` (said) if none.
fn audit_text(dir: &std::path::Path) -> Option<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| {
        p.file_name().is_some_and(|n| {
            n.to_string_lossy().starts_with("audit") && n.to_string_lossy().ends_with(".log")
        })
    });
    if files.is_empty() {
        println!("lk-chaos: no audit log in {} (start the plane with LK_AUDIT=1): the audit view is skipped", dir.display());
        return None;
    }
    let mut text = String::new();
    for f in files {
        text.push_str(&std::fs::read_to_string(&f).unwrap_or_default());
        text.push('\n');
    }
    Some(text)
}

/// The audit checks of namespace `ns`; returns the replayed writes.
fn audit_checks(
    text: &str,
    ns: &str,
    capacity: u32,
    report: &mut Report,
) -> Vec<testkit::audit::Write> {
    let writes = testkit::audit::parse(text, ns);
    let operator = |user: &str| user.strip_prefix("lk-").map(String::from);
    let capacity = usize::try_from(capacity).unwrap_or(1);
    testkit::audit::check(&writes, operator, "leasekeeper-leader", capacity, report);
    writes
}

/// `lk-chaos audit`: the audit view of a finished run again, from the log its plane
/// kept (the watch view and (v) need the run itself).
#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    /// The run's control-plane directory (its audit log and holders' outcome logs).
    #[arg(long)]
    pub plane: PathBuf,
    /// The run's namespace (`chaos-<seed % 100000>-<pid>`).
    #[arg(long)]
    pub namespace: String,
    #[arg(long, default_value_t = 1)]
    pub capacity: u32,
    #[arg(long, default_value_t = 5)]
    pub leases: usize,
    #[arg(long, default_value_t = 4)]
    pub holders: usize,
}

pub fn audit_again(a: &AuditArgs) -> std::process::ExitCode {
    let Some(text) = audit_text(&a.plane) else {
        return std::process::ExitCode::FAILURE;
    };
    let mut report = Report::default();
    audit_checks(&text, &a.namespace, a.capacity, &mut report);
    guarded_outcomes(a.leases, a.holders, &mut report);
    // (v) compares with the run's watches: not judged here.
    let checks = testkit::audit::CHECKS
        .iter()
        .filter(|c| **c != testkit::audit::VIEWS_DISAGREE);
    for name in checks.chain([&WROTE_AFTER_LOSS]) {
        let n = report.violations.get(name).map_or(0, Vec::len);
        println!("| {name} | {n} |");
    }
    for (k, v) in &report.totals {
        println!("| {k} | {v} |");
    }
    for (name, v) in &report.violations {
        for e in v.iter().take(5) {
            println!("  {name}: {e}");
        }
    }
    if report.violations.values().all(Vec::is_empty) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// What the API server did with the holders' writes to guarded objects: counted, and
/// any write a holder made knowing it had lost its lock flagged (only the broken holder
/// does that; the API server must have refused each one whose token was stale).
fn guarded_outcomes(leases: usize, holders: usize, report: &mut Report) {
    let ids: Vec<String> = (0..leases)
        .flat_map(|l| (0..holders).map(move |h| format!("h{l}-{h}")))
        .collect();
    let ((admitted, refused), (after_admitted, after_refused)) = crate::guarded::outcomes(&ids);
    report.count("guarded writes admitted by the API server", admitted);
    report.count(
        "guarded writes refused by the API server (stale token)",
        refused,
    );
    if after_admitted + after_refused > 0 {
        report.flag(
            WROTE_AFTER_LOSS,
            format!("{} writes after the lock was lost: {after_refused} refused by the API server, {after_admitted} admitted (a token not yet overtaken)", after_admitted + after_refused),
        );
    }
}

/// The broken holder's signature: writes to a guarded object after it knew its lock was
/// lost (the API server refuses each whose token was overtaken).
pub const WROTE_AFTER_LOSS: &str = "(d') a holder wrote a guarded object after losing its lock";

/// Every write the replicas logged for this run's namespace.
async fn replica_writes(w: &World) -> Vec<checker::Write> {
    let mut out = Vec::new();
    for r in w.replicas.lock().await.iter() {
        let log = std::fs::read_to_string(crate::run_file(&format!("chaos-{}.log", r.identity)))
            .unwrap_or_default();
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
    commit: &str,
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
            "{} locks of capacity {}, {} holders each, {} operator replicas, {:?} of faults{control}; commit {commit} when the run started.",
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
