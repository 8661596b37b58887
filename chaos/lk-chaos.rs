//! lk-chaos: a reproducible fault-injection run with a mutual-exclusion checker.
//!
//! `lk-chaos run` starts operator replicas (leader election) and holder processes on a
//! real control plane, injects faults on a seeded schedule, records every LockClaim and
//! Lease state it observes, and checks the history and the fenced registers:
//! (a) two Granted claims for one Lease at any observed moment; (b) a Lease naming
//! someone other than its Granted claim once settled; (c) a grant whose fencing token is
//! not above every earlier one for that Lease; (d) a register write accepted with a
//! stale token; (e) a claim lost; (f) totals; (g) a write by a replica that was not
//! leading; (h) a healthy holder expired. Exits non-zero on any violation.
//!
//! `lk-chaos holder` is one holder process: acquire, write the fenced register, hold,
//! release, repeat.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Config, ResourceExt};
use leasekeeper::api::{LockClaim, Phase};
use leasekeeper::client::{AcquireOptions, LockClient};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

#[derive(Parser, Debug)]
#[command(about = "leasekeeper chaos run")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The whole run.
    Run(RunArgs),
    /// One holder process.
    Holder(HolderArgs),
}

#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    /// Control-plane directory (hack/control-plane.sh up DIR was run).
    #[arg(long)]
    plane: PathBuf,
    /// Directory with the leasekeeper binary (built with --features chaos-negative-controls).
    #[arg(long)]
    bin: PathBuf,
    /// Seed of the fault schedule (printed; the same seed replays the same schedule).
    #[arg(long)]
    seed: Option<u64>,
    /// How long faults are injected.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Leases.
    #[arg(long, default_value_t = 5)]
    leases: usize,
    /// Holder processes per Lease.
    #[arg(long, default_value_t = 4)]
    holders: usize,
    /// Operator replicas.
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// Mean seconds between faults.
    #[arg(long, default_value_t = 1.0)]
    fault_every: f64,
    /// Inject only these fault kinds (comma-separated; default: all). Kinds:
    /// kill-leader, kill-replica, pause-holder, restart-apiserver, restart-etcd,
    /// delete-claim, edit-lease, skewed-holder, pause-leader, stall-lease-watch.
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(FAULT_KINDS))]
    faults: Vec<String>,
    /// Negative control: LEASEKEEPER_BREAK for the operators, or "holder-ignores-lost".
    #[arg(long = "break")]
    break_: Option<String>,
    /// Markdown summary output.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
struct HolderArgs {
    #[arg(long)]
    kubeconfig: PathBuf,
    #[arg(long)]
    namespace: String,
    #[arg(long)]
    lease: String,
    #[arg(long)]
    identity: String,
    #[arg(long)]
    seed: u64,
    /// Lease duration (seconds).
    #[arg(long, default_value_t = 2)]
    ttl: u64,
    /// Seconds the holder's renewTime is shifted by (clock skew).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    skew: i64,
    /// Negative control: keep writing after lost(), without the fence check.
    #[arg(long)]
    ignore_lost: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Holder(a) => {
            holder(a).await;
            std::process::ExitCode::SUCCESS
        }
        Cmd::Run(a) => run(a).await,
    }
}

async fn client_for(path: &PathBuf) -> Client {
    let kc = Kubeconfig::read_from(path).expect("kubeconfig");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(cfg).expect("client")
}

// ---------------------------------------------------------------------------------
// The fenced register: a ConfigMap per Lease with the highest token accepted and an
// append-only log. A write is a conditional update (resourceVersion) that is refused
// when its token is below the stored one.

/// The fault kinds, by their index in the schedule (pause-holder has two slots).
const FAULT_KINDS: [&str; 11] = [
    "kill-leader",
    "kill-replica",
    "pause-holder",
    "pause-holder",
    "restart-apiserver",
    "restart-etcd",
    "delete-claim",
    "edit-lease",
    "skewed-holder",
    "pause-leader",
    "stall-lease-watch",
];

/// Every holder's claim asks for this lock delay after an expiry.
const LOCK_DELAY: Duration = Duration::from_secs(1);

const MAX_KEY: &str = "maxToken";
const LOG_KEY: &str = "log";
const REFUSED_KEY: &str = "refused";

#[derive(Debug, PartialEq)]
enum Write {
    Accepted,
    Refused,
}

/// `fenced == false` is the negative control: write without checking the token.
async fn register_write(
    api: &Api<ConfigMap>,
    name: &str,
    token: i64,
    who: &str,
    fenced: bool,
) -> Option<Write> {
    for _ in 0..20 {
        let mut cm = match api.get_opt(name).await {
            Ok(Some(cm)) => cm,
            Ok(None) => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.into()),
                        ..ObjectMeta::default()
                    },
                    data: Some([(MAX_KEY.to_string(), "0".to_string())].into()),
                    ..ConfigMap::default()
                };
                let _ = api.create(&PostParams::default(), &cm).await;
                continue;
            }
            Err(_) => return None,
        };
        let data = cm.data.get_or_insert_with(Default::default);
        let max: i64 = data.get(MAX_KEY).and_then(|v| v.parse().ok()).unwrap_or(0);
        let result = if fenced && token < max {
            let refused = data.entry(REFUSED_KEY.into()).or_default();
            refused.push_str(&format!("{token} {who} (max {max})\n"));
            Write::Refused
        } else {
            data.insert(MAX_KEY.into(), max.max(token).to_string());
            let log = data.entry(LOG_KEY.into()).or_default();
            log.push_str(&format!("{token} {who}\n"));
            Write::Accepted
        };
        match api.replace(name, &PostParams::default(), &cm).await {
            Ok(_) => return Some(result),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(_) => return None,
        }
    }
    None
}

async fn holder(a: HolderArgs) {
    let client = client_for(&a.kubeconfig).await;
    let locks = LockClient::new(client.clone(), &a.namespace);
    let regs: Api<ConfigMap> = Api::namespaced(client, &a.namespace);
    let reg = format!("reg-{}", a.lease);
    let mut rng = StdRng::seed_from_u64(a.seed);
    loop {
        let opts = AcquireOptions {
            identity: Some(a.identity.clone()),
            lease_duration: Duration::from_secs(a.ttl),
            wait: Some(Duration::from_secs(30)),
            renew_time_skew: jiff::SignedDuration::from_secs(a.skew),
            lock_delay: LOCK_DELAY,
            owner_pod: false,
            ..AcquireOptions::default()
        };
        let guard = match locks.acquire(&a.lease, opts).await {
            Ok(g) => g,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let token = guard.fencing_token();
        // The work: a number of register writes. An honest holder checks the guard
        // before each one; the negative control ignores it and, once it has lost the
        // lock, goes on writing without the fence check.
        // The control works longer, so that it is still working when its loss shows.
        // Most holds are short; some span several renewals (2.4-4.8 s against a 2 s
        // TTL renewed every 0.67 s), so that expiry is judged on holders that renew.
        let long = !a.ignore_lost && rng.random_bool(0.15);
        let (writes, gap) = if a.ignore_lost {
            (rng.random_range(20..40), 60)
        } else if long {
            (rng.random_range(8..16), 300)
        } else {
            (rng.random_range(1..10), 60)
        };
        for _ in 0..writes {
            if guard.is_lost().is_some() && !a.ignore_lost {
                break;
            }
            let fenced = !(a.ignore_lost && guard.is_lost().is_some());
            register_write(&regs, &reg, token, &a.identity, fenced).await;
            tokio::time::sleep(Duration::from_millis(gap)).await;
        }
        if a.ignore_lost && guard.is_lost().is_some() {
            for _ in 0..40 {
                register_write(&regs, &reg, token, &a.identity, false).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let _ = guard.release().await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
    }
}

// ---------------------------------------------------------------------------------
// The run.

#[derive(Clone, Debug)]
struct Obs {
    /// Part of a re-list (after a watch restart): a snapshot, not an event in time.
    init: bool,
    reason: Option<String>,
    kind: &'static str,
    name: String,
    rv: u64,
    lease: String,
    phase: Option<Phase>,
    token: Option<i64>,
    holder: Option<String>,
    deleted: bool,
    /// When the recorder saw it (wall clock: the same clock the holders and the
    /// operator use on this machine).
    wall: jiff::Timestamp,
    /// A Lease's renewTime and leaseDurationSeconds.
    renew: Option<jiff::Timestamp>,
    duration: Option<i32>,
    /// A claim's status.expireTime.
    expire: Option<jiff::Timestamp>,
}

type History = Arc<Mutex<Vec<Obs>>>;

fn marker(kind: &'static str) -> Obs {
    Obs {
        init: true,
        reason: None,
        kind,
        name: String::new(),
        rv: 0,
        lease: String::new(),
        phase: None,
        token: None,
        holder: None,
        deleted: false,
        wall: jiff::Timestamp::now(),
        renew: None,
        duration: None,
        expire: None,
    }
}

/// Records every event of one watch into `history`, with markers around each (re-)list.
async fn watch_into<K>(
    api: Api<K>,
    history: History,
    markers: [&'static str; 2],
    to_obs: impl Fn(&K, bool, bool) -> Obs,
) where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .for_each(|ev| {
            let obs = match ev {
                Ok(watcher::Event::Apply(o)) => to_obs(&o, false, false),
                Ok(watcher::Event::InitApply(o)) => to_obs(&o, false, true),
                Ok(watcher::Event::Delete(o)) => to_obs(&o, true, false),
                Ok(watcher::Event::Init) => marker(markers[0]),
                Ok(watcher::Event::InitDone) => marker(markers[1]),
                Err(_) => return futures::future::ready(()),
            };
            history.lock().expect("lock").push(obs);
            futures::future::ready(())
        })
        .await;
}

fn rv_of(o: &impl kube::Resource) -> u64 {
    o.resource_version()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn record(client: Client, ns: String, history: History) {
    let claims = watch_into(
        Api::<LockClaim>::namespaced(client.clone(), &ns),
        history.clone(),
        ["ClaimsInit", "ClaimsInitDone"],
        |c, deleted, init| Obs {
            init,
            reason: c.condition("Granted").map(|x| x.reason.clone()),
            kind: "LockClaim",
            name: c.name_any(),
            rv: rv_of(c),
            lease: c.spec.lease_name.clone(),
            phase: c.phase(),
            token: c.status.as_ref().and_then(|s| s.fencing_token),
            holder: Some(c.identity()),
            deleted,
            wall: jiff::Timestamp::now(),
            renew: None,
            duration: None,
            expire: c
                .status
                .as_ref()
                .and_then(|s| s.expire_time.as_ref())
                .map(|t| t.0),
        },
    );
    let leases = watch_into(
        Api::<Lease>::namespaced(client, &ns),
        history,
        ["LeasesInit", "LeasesInitDone"],
        |l, deleted, init| {
            let spec = l.spec.as_ref();
            Obs {
                init,
                reason: None,
                kind: "Lease",
                name: l.name_any(),
                rv: rv_of(l),
                lease: l.name_any(),
                phase: None,
                token: None,
                holder: spec
                    .and_then(|s| s.holder_identity.clone())
                    .filter(|h| !h.is_empty()),
                deleted,
                wall: jiff::Timestamp::now(),
                renew: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
                duration: spec.and_then(|s| s.lease_duration_seconds),
                expire: None,
            }
        },
    );
    tokio::join!(claims, leases);
}

struct Replica {
    child: tokio::process::Child,
    identity: String,
    metrics: String,
}

fn spawn_replica(a: &RunArgs, identity: &str, ns: &str) -> Replica {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("target/chaos-{identity}.log"))
        .expect("log");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let metrics = format!("127.0.0.1:{port}");
    let mut cmd = tokio::process::Command::new(a.bin.join("leasekeeper"));
    cmd.args([
        "run",
        "--leader-elect",
        "--leader-namespace",
        ns,
        "--watch-namespace",
        ns,
        "--identity",
        identity,
    ])
    .args(["--metrics-addr", &metrics, "--gc-grace", "3s"])
    .args([
        "--leader-lease-duration",
        "3s",
        "--leader-renew-deadline",
        "2s",
        "--leader-retry-period",
        "300ms",
    ])
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

struct HolderProc {
    child: tokio::process::Child,
    paused: bool,
}

#[allow(clippy::too_many_arguments)]
fn spawn_holder(
    a: &RunArgs,
    ns: &str,
    lease: &str,
    identity: &str,
    seed: u64,
    skew: i64,
    ignore_lost: bool,
) -> HolderProc {
    let exe = std::env::current_exe().expect("exe");
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args([
        "holder",
        "--namespace",
        ns,
        "--lease",
        lease,
        "--identity",
        identity,
    ])
    .args([
        "--seed",
        &seed.to_string(),
        "--ttl",
        "2",
        "--skew",
        &skew.to_string(),
    ])
    .arg("--kubeconfig")
    .arg(a.plane.join("kubeconfig"))
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .kill_on_drop(true);
    if ignore_lost {
        cmd.arg("--ignore-lost");
    }
    HolderProc {
        child: cmd.spawn().expect("holder"),
        paused: false,
    }
}

fn signal(child: &tokio::process::Child, sig: nix::sys::signal::Signal) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

async fn plane(args: &RunArgs, what: &str) -> bool {
    tokio::process::Command::new("hack/control-plane.sh")
        .args(["restart"])
        .arg(&args.plane)
        .arg(what)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

async fn run(a: RunArgs) -> std::process::ExitCode {
    let seed = a
        .seed
        .unwrap_or_else(|| jiff::Timestamp::now().as_nanosecond() as u64);
    println!("lk-chaos: seed {seed} (replay with --seed {seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let client = client_for(&a.plane.join("kubeconfig")).await;
    // A namespace of its own per run: registers and Leases left by an earlier run on
    // the same control plane must not count in this one.
    let ns = format!("chaos-{}-{}", seed % 100_000, std::process::id());
    let _ = Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.clone()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await;
    leasekeeper::controller::install_crd(client.clone(), "lk-chaos", Duration::from_secs(60))
        .await
        .expect("CRD installed");

    let history: History = Arc::default();
    let recorder = tokio::spawn(record(client.clone(), ns.clone(), history.clone()));
    // Replicas run under a supervisor that restarts any that exit, as kubelet would.
    let replicas: Arc<tokio::sync::Mutex<Vec<Replica>>> = Arc::new(tokio::sync::Mutex::new(
        (0..a.replicas)
            .map(|i| spawn_replica(&a, &format!("op-{i}"), &ns))
            .collect(),
    ));
    let supervisor = tokio::spawn({
        let (replicas, a, ns) = (replicas.clone(), a.clone(), ns.clone());
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                for r in replicas.lock().await.iter_mut() {
                    if matches!(r.child.try_wait(), Ok(Some(_))) {
                        let id = r.identity.clone();
                        *r = spawn_replica(&a, &id, &ns);
                    }
                }
            }
        }
    });
    let ignore = a.break_.as_deref() == Some("holder-ignores-lost");
    let mut holders: Vec<(String, HolderProc)> = Vec::new();
    for l in 0..a.leases {
        for h in 0..a.holders {
            let skew = match h % 3 {
                0 => 0,
                1 => -600,
                _ => 600,
            };
            let lease = format!("lock-{l}");
            // In the holder-side control one holder per Lease ignores lost().
            holders.push((
                lease.clone(),
                spawn_holder(
                    &a,
                    &ns,
                    &lease,
                    &format!("h{l}-{h}"),
                    rng.random(),
                    skew,
                    ignore && h == 0,
                ),
            ));
        }
    }

    // Faults on a seeded schedule.
    let mut faults: BTreeMap<&'static str, usize> = BTreeMap::new();
    let allowed: Vec<usize> = (0..FAULT_KINDS.len())
        .filter(|i| a.faults.iter().any(|f| f == FAULT_KINDS[*i]))
        .collect();
    let started = Instant::now();
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    let mut next_progress = started + Duration::from_secs(60);
    while started.elapsed() < a.duration {
        if Instant::now() >= next_progress {
            next_progress += Duration::from_secs(60);
            let seen = history.lock().expect("lock").len();
            println!(
                "lk-chaos: {:.0} min, {} faults, {seen} states observed",
                started.elapsed().as_secs_f64() / 60.0,
                faults.values().sum::<usize>()
            );
        }
        let wait = Duration::from_secs_f64(rng.random_range(0.2..(2.0 * a.fault_every).max(0.3)));
        tokio::time::sleep(wait).await;

        let kind = if allowed.is_empty() {
            rng.random_range(0..FAULT_KINDS.len())
        } else {
            allowed[rng.random_range(0..allowed.len())]
        };
        let done: &'static str = match kind {
            0 => {
                // SIGKILL the leader replica, restart it as a fresh process.
                let leader =
                    leasekeeper::leader::current_leader(&leases, "leasekeeper-leader").await;
                let mut reps = replicas.lock().await;
                // SIGKILL only: the supervisor brings it back, as kubelet would.
                if let Some(r) = reps
                    .iter_mut()
                    .find(|r| Some(&r.identity) == leader.as_ref())
                {
                    let _ = r.child.start_kill();
                }
                "kill leader replica"
            }
            1 => {
                let mut reps = replicas.lock().await;
                let i = rng.random_range(0..reps.len());
                let _ = reps[i].child.start_kill();
                "kill random replica"
            }
            10 => {
                // The leader's Lease watch lags (3 s, past the holders' 2 s TTL) while
                // its API calls still work: its Lease cache is stale. Only the
                // resourceVersion it decided from stops it from expiring holders that
                // renewed meanwhile (check (h)).
                let leader =
                    leasekeeper::leader::current_leader(&leases, "leasekeeper-leader").await;
                if let Some(r) = replicas
                    .lock()
                    .await
                    .iter()
                    .find(|r| Some(&r.identity) == leader.as_ref())
                {
                    signal(&r.child, nix::sys::signal::Signal::SIGUSR1);
                }
                "stall the leader's Lease watch"
            }
            9 => {
                // Pause the leader past its term: it wakes up with writes decided before
                // the pause, while another replica leads. Preconditions must stop them.
                let leader =
                    leasekeeper::leader::current_leader(&leases, "leasekeeper-leader").await;
                let pid = replicas
                    .lock()
                    .await
                    .iter()
                    .find(|r| Some(&r.identity) == leader.as_ref())
                    .and_then(|r| r.child.id());
                if let Some(pid) = pid {
                    let pid = nix::unistd::Pid::from_raw(pid as i32);
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP);
                    tokio::time::sleep(Duration::from_millis(rng.random_range(3500..5000))).await;
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
                }
                "pause leader replica past its term"
            }
            2 | 3 => {
                // Pause a holder past its TTL (2 s), then let it wake believing it holds.
                // In the holder-side control, pause the holders that ignore lost().
                let i = if ignore {
                    // Pause an ignoring holder while it holds its Lease.
                    let mut found = None;
                    for l in 0..a.leases {
                        let h = leases
                            .get_opt(&format!("lock-{l}"))
                            .await
                            .ok()
                            .flatten()
                            .and_then(|x| x.spec?.holder_identity);
                        if h.as_deref() == Some(format!("h{l}-0").as_str()) {
                            found = Some(l * a.holders);
                            break;
                        }
                    }
                    found.unwrap_or_else(|| rng.random_range(0..a.leases) * a.holders)
                } else {
                    rng.random_range(0..holders.len())
                };
                if !holders[i].1.paused {
                    signal(&holders[i].1.child, nix::sys::signal::Signal::SIGSTOP);
                    holders[i].1.paused = true;
                    let pause = Duration::from_millis(rng.random_range(2500..4000));
                    tokio::time::sleep(pause).await;
                    signal(&holders[i].1.child, nix::sys::signal::Signal::SIGCONT);
                    holders[i].1.paused = false;
                }
                "pause holder past TTL"
            }
            4 => {
                if plane(&a, "apiserver").await {
                    "restart kube-apiserver"
                } else {
                    "restart kube-apiserver (failed)"
                }
            }
            5 => {
                if plane(&a, "etcd").await {
                    "restart etcd"
                } else {
                    "restart etcd (failed)"
                }
            }
            6 => {
                // A third party deletes a claim.
                let list = claims
                    .list(&Default::default())
                    .await
                    .map(|l| l.items)
                    .unwrap_or_default();
                let live: Vec<&LockClaim> = list
                    .iter()
                    .filter(|c| !c.phase().is_some_and(Phase::is_terminal))
                    .collect();
                if !live.is_empty() {
                    let c = live[rng.random_range(0..live.len())];
                    let _ = claims.delete(&c.name_any(), &Default::default()).await;
                }
                "third party deletes a claim"
            }
            7 => {
                // A third party edits a Lease: takes it for an intruder, or deletes it.
                let l = format!("lock-{}", rng.random_range(0..a.leases));
                if rng.random_bool(0.5) {
                    if let Ok(Some(mut lease)) = leases.get_opt(&l).await {
                        if let Some(s) = lease.spec.as_mut() {
                            s.holder_identity = Some("intruder".into());
                            s.renew_time =
                                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                                    jiff::Timestamp::now(),
                                ));
                        }
                        let _ = leases.replace(&l, &PostParams::default(), &lease).await;
                    }
                    "third party takes a Lease"
                } else {
                    let _ = leases.delete(&l, &Default::default()).await;
                    "third party deletes a Lease"
                }
            }
            8 => {
                // Skewed clocks run all along (a third of the holders are 10 min behind,
                // a third ahead); this slot restarts one such holder for good measure.
                let i = rng.random_range(0..holders.len());
                let _ = holders[i].1.child.start_kill();
                let _ = holders[i].1.child.wait().await;
                let lease = holders[i].0.clone();
                let id = format!("{}-r{}", lease, rng.random_range(0..1_000_000));
                holders[i].1 = spawn_holder(
                    &a,
                    &ns,
                    &lease,
                    &id,
                    rng.random(),
                    if rng.random_bool(0.5) { -600 } else { 600 },
                    false,
                );
                "kill holder (skewed replacement)"
            }
            _ => unreachable!("fault kinds are indexes into FAULT_KINDS"),
        };
        *faults.entry(done).or_default() += 1;
    }

    // A replica that is not the leader must have written nothing.
    let mut non_leader_writes = Vec::new();
    for r in replicas.lock().await.iter() {
        let text = leasekeeper::telemetry::scrape(&r.metrics, "/metrics").await;
        let wrote: f64 = text
            .lines()
            .find(|l| l.starts_with("leasekeeper_writes_while_not_leading_total "))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0);
        if wrote > 0.0 {
            non_leader_writes.push(format!(
                "{} wrote {wrote} times while not leading",
                r.identity
            ));
        }
    }

    // Settle: stop the holders (SIGKILL: what they held expires), let the operator finish.
    for (_, h) in &mut holders {
        signal(&h.child, nix::sys::signal::Signal::SIGCONT);
        let _ = h.child.start_kill();
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut report = check(&client, &ns, &history, a.leases).await;
    report
        .violations
        .insert("(g) a non-leader replica wrote", non_leader_writes);
    recorder.abort();
    supervisor.abort();
    for r in replicas.lock().await.iter_mut() {
        let _ = r.child.start_kill();
    }

    let mut out = Vec::new();
    out.push(format!("# lk-chaos summary (seed {seed})"));
    out.push(String::new());
    out.push(format!(
        "{} Leases, {} holders each, {} operator replicas, {:?} of faults{}.",
        a.leases,
        a.holders,
        a.replicas,
        a.duration,
        a.break_
            .as_deref()
            .map(|b| format!(", NEGATIVE CONTROL {b}"))
            .unwrap_or_default()
    ));
    out.push(String::new());
    out.push("| check | violations |".into());
    out.push("|---|---|".into());
    for (name, v) in &report.violations {
        out.push(format!("| {name} | {} |", v.len()));
    }
    out.push(String::new());
    out.push("| total | count |".into());
    out.push("|---|---|".into());
    for (k, v) in &report.totals {
        out.push(format!("| {k} | {v} |"));
    }
    for (k, v) in &faults {
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

/// Per Lease: the highest fencing token granted so far, and who got the last grant.
#[derive(Default)]
struct LastGrant {
    token: i64,
    holder: Option<String>,
}

/// Counts a grant (and a handoff, when the holder changed) and checks (c): its fencing
/// token is above every earlier one for that Lease.
fn note_grant(
    c: &Obs,
    totals: &mut BTreeMap<&'static str, usize>,
    last: &mut HashMap<String, LastGrant>,
    v: &mut BTreeMap<&'static str, Vec<String>>,
) {
    *totals.entry("grants").or_default() += 1;
    let t = c.token.unwrap_or(0);
    let m = last.entry(c.lease.clone()).or_default();
    if t <= m.token {
        v.get_mut("(c) fencing token not increasing")
            .expect("key")
            .push(format!(
                "{} on {} got {t} after {}",
                c.name, c.lease, m.token
            ));
    }
    m.token = m.token.max(t);
    // A handoff: the Lease goes to a different holder than its previous grant's.
    if m.holder.is_some() && m.holder != c.holder {
        *totals
            .entry("handoffs (a grant to another holder than the last)")
            .or_default() += 1;
    }
    m.holder.clone_from(&c.holder);
}

/// The resourceVersion ranges, per Lease, in which the recorder's Lease watch may have
/// missed states (see the caller).
fn lease_watch_gaps(obs: &[Obs]) -> HashMap<String, Vec<(u64, u64)>> {
    let mut gaps: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut open: HashMap<String, u64> = HashMap::new();
    let mut listed: Option<Vec<String>> = None;
    for o in obs {
        match o.kind {
            "LeasesInit" => listed = Some(Vec::new()),
            "LeasesInitDone" => {
                let listed = listed.take().unwrap_or_default();
                for (name, rv) in &last {
                    if !listed.contains(name) {
                        open.insert(name.clone(), *rv);
                    }
                }
            }
            "Lease" => {
                if let Some(lo) = open.remove(&o.name) {
                    gaps.entry(o.name.clone()).or_default().push((lo, o.rv));
                }
                if o.init {
                    if let Some(l) = listed.as_mut() {
                        l.push(o.name.clone());
                    }
                    let lo = last.get(&o.name).copied().unwrap_or(0);
                    if o.rv > lo {
                        gaps.entry(o.name.clone()).or_default().push((lo, o.rv));
                    }
                }
                if o.deleted {
                    last.remove(&o.name);
                } else {
                    last.insert(o.name.clone(), o.rv);
                }
            }
            _ => {}
        }
    }
    for (name, lo) in open {
        gaps.entry(name).or_default().push((lo, u64::MAX));
    }
    gaps
}

/// (h): the renewals of one Lease by its current holder, as the recorder saw them.
///
/// Times are bounded from both sides: a renewal committed no earlier than the renewTime
/// the holder wrote into it and no later than when the recorder saw it. An operator
/// expires a holder only once a full leaseDurationSeconds has passed since the last
/// renewal it saw (a new leader: since the Lease's renewTime, at the soonest), and
/// only if no renewal landed since then. So an expiry is certainly wrong when the
/// recorder saw it less than a duration after the last renewal's renewTime, and that
/// renewal was itself seen less than a duration after the one before it (it landed in
/// time). Holders with skewed clocks are left out: their renewTime bounds nothing.
#[derive(Default)]
struct Renewals {
    holder: Option<String>,
    skewed: bool,
    duration: i32,
    /// renewTime of the renewal before the last one (None: the last is the grant).
    before: Option<jiff::Timestamp>,
    /// The last renewal: its renewTime and when the recorder saw it.
    last: Option<(jiff::Timestamp, jiff::Timestamp)>,
}

impl Renewals {
    fn observe(&mut self, o: &Obs) {
        if o.deleted || o.holder != self.holder {
            *self = Renewals {
                holder: if o.deleted { None } else { o.holder.clone() },
                ..Renewals::default()
            };
        }
        let Some(renew) = o.renew else {
            self.skewed = true;
            return;
        };
        if self.last.is_some_and(|(r, _)| r == renew) {
            return;
        }
        let off = (o.wall - renew).get_seconds().abs();
        self.skewed |= off > 30;
        self.duration = o.duration.unwrap_or(0);
        self.before = self.last.map(|(r, _)| r);
        self.last = Some((renew, o.wall));
    }

    fn expired_while_healthy(&self, expiry: &Obs) -> Option<String> {
        if self.skewed || self.holder != expiry.holder || self.duration <= 0 {
            return None;
        }
        let (renew, seen) = self.last?;
        let d = jiff::SignedDuration::from_secs(i64::from(self.duration));
        let slack = jiff::SignedDuration::from_millis(50);
        let in_time = self.before.is_none_or(|b| seen < b + d - slack);
        let early = expiry.wall < renew + d - slack;
        (in_time && early).then(|| {
            format!(
                "expired (seen {}) {:?} after a renewal written at {renew} that landed in time",
                expiry.wall,
                expiry.wall - renew
            )
        })
    }
}

struct Report {
    violations: BTreeMap<&'static str, Vec<String>>,
    totals: BTreeMap<&'static str, usize>,
}

async fn check(client: &Client, ns: &str, history: &History, leases: usize) -> Report {
    let obs = history.lock().expect("lock").clone();
    let mut v: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for k in [
        "(a) two Granted at once",
        "(a) a Granted claim its Lease does not name",
        "(b) Lease disagrees once settled",
        "(c) fencing token not increasing",
        "(c) grant inside the lock delay after an expiry",
        "(d) register accepted a stale token",
        "(e) claim lost",
        "(h) a healthy holder expired",
    ] {
        v.insert(k, Vec::new());
    }
    let mut totals: BTreeMap<&'static str, usize> = BTreeMap::new();

    // (a) and (c), replaying the claims' watch stream in order.
    let mut latest: HashMap<String, Obs> = HashMap::new();
    let mut last_grant: HashMap<String, LastGrant> = HashMap::new();
    // A re-list replaces what the watcher knows: objects deleted while the watch was
    // down simply are not in it. Judge the state once the list is complete.
    let mut relist: Option<HashMap<String, Obs>> = None;
    for o in obs
        .iter()
        .filter(|o| o.kind == "LockClaim" || o.kind.starts_with("ClaimsInit"))
    {
        if o.kind == "ClaimsInit" {
            relist = Some(HashMap::new());
            continue;
        }
        if o.kind == "ClaimsInitDone" {
            if let Some(snapshot) = relist.take() {
                for (name, c) in &snapshot {
                    let prev = latest.get(name).and_then(|p| p.phase);
                    if c.phase == Some(Phase::Granted) && prev != Some(Phase::Granted) {
                        note_grant(c, &mut totals, &mut last_grant, &mut v);
                    }
                }
                latest = snapshot;
            }
        } else if let Some(snapshot) = relist.as_mut() {
            if o.init {
                snapshot.insert(o.name.clone(), o.clone());
                continue;
            }
        }
        if o.kind != "LockClaim" {
            continue;
        }
        let prev = latest.get(&o.name).and_then(|p| p.phase);
        if o.phase == Some(Phase::Granted) && prev != Some(Phase::Granted) && !o.deleted {
            note_grant(o, &mut totals, &mut last_grant, &mut v);
        }
        if o.phase == Some(Phase::Expired) && prev != Some(Phase::Expired) {
            *totals.entry("expiries").or_default() += 1;
        }
        if o.phase == Some(Phase::Released) && prev == Some(Phase::Granted) {
            *totals.entry("releases of a held lock").or_default() += 1;
        }
        if o.deleted {
            latest.remove(&o.name);
        } else {
            latest.insert(o.name.clone(), o.clone());
        }
        let mut per: HashMap<&str, Vec<&str>> = HashMap::new();
        for c in latest.values().filter(|c| c.phase == Some(Phase::Granted)) {
            per.entry(c.lease.as_str())
                .or_default()
                .push(c.name.as_str());
        }
        for (lease, names) in per {
            if names.len() > 1 {
                v.get_mut("(a) two Granted at once")
                    .expect("key")
                    .push(format!("{lease}: {names:?} (rv {})", o.rv));
            }
        }
    }
    *totals.entry("states observed").or_default() += obs.len();

    // Where the Lease watch has holes: a re-list (after a watch broke, e.g. across an
    // apiserver or etcd restart) shows each Lease as it is now, not the states it went
    // through meanwhile. Between the last state seen before and the re-listed one (or,
    // for a Lease gone from the list, its next event) the Lease is unknown.
    let gaps = lease_watch_gaps(&obs);
    *totals.entry("Lease watch re-lists").or_default() += obs
        .iter()
        .filter(|o| o.kind == "LeasesInit")
        .count()
        .saturating_sub(1);
    *totals
        .entry("Lease watch gaps (a Lease changed unseen)")
        .or_default() += gaps.values().map(Vec::len).sum::<usize>();
    let in_gap = |lease: &str, rv: u64| {
        gaps.get(lease)
            .is_some_and(|g| g.iter().any(|(lo, hi)| *lo < rv && rv < *hi))
    };

    // Claims and Leases together, in resourceVersion order (one etcd revision counter):
    // a Granted claim must be named by its Lease, unless a third party just wrote it.
    let mut merged: Vec<&Obs> = obs
        .iter()
        .filter(|o| o.kind == "LockClaim" || o.kind == "Lease")
        .collect();
    merged.sort_by_key(|o| o.rv);
    let mut claims_now: HashMap<&str, &Obs> = HashMap::new();
    let mut lease_now: HashMap<&str, &Obs> = HashMap::new();
    // The expireTime of the last expiry per Lease (written by the operator when it
    // decided; one-second precision, so never later than the decision).
    let mut last_expiry: HashMap<&str, jiff::Timestamp> = HashMap::new();
    let mut renewals: HashMap<&str, Renewals> = HashMap::new();
    for o in &merged {
        match o.kind {
            "Lease" => {
                lease_now.insert(o.name.as_str(), o);
                renewals.entry(o.name.as_str()).or_default().observe(o);
            }
            _ => {
                let prev = claims_now.get(o.name.as_str()).and_then(|p| p.phase);
                if o.init {
                    // A re-list: no timing can be read from it.
                    last_expiry.remove(o.lease.as_str());
                } else if o.phase == Some(Phase::Expired)
                    && prev == Some(Phase::Granted)
                    && o.reason.as_deref() != Some("LeaseLost")
                {
                    if let Some(t) = o.expire {
                        last_expiry.insert(o.lease.as_str(), t);
                    }
                    if o.reason.as_deref() == Some("Expired") {
                        if let Some(why) = renewals
                            .get(o.lease.as_str())
                            .and_then(|r| r.expired_while_healthy(o))
                        {
                            v.get_mut("(h) a healthy holder expired")
                                .expect("key")
                                .push(format!("{} on {}: {why}", o.name, o.lease));
                        }
                    }
                }
                if o.phase == Some(Phase::Granted) && prev != Some(Phase::Granted) && !o.init {
                    // The grant happened no later than the recorder saw it, and the
                    // expiry no earlier than its expireTime: a gap below the lock
                    // delay between those two is certain, whatever the watch lag.
                    if let Some(t) = last_expiry.get(o.lease.as_str()) {
                        let delay = jiff::SignedDuration::try_from(LOCK_DELAY).unwrap_or_default();
                        if o.wall < *t + delay {
                            v.get_mut("(c) grant inside the lock delay after an expiry")
                                .expect("key")
                                .push(format!(
                                    "{} on {} granted (seen {}) within {:?} of an expiry at {t}",
                                    o.name, o.lease, o.wall, LOCK_DELAY
                                ));
                        }
                    }
                }
                if o.deleted {
                    claims_now.remove(o.name.as_str());
                } else {
                    claims_now.insert(o.name.as_str(), o);
                }
            }
        }
        if o.kind == "LockClaim" && o.phase == Some(Phase::Granted) && !o.deleted {
            let lease = lease_now.get(o.lease.as_str());
            let third_party =
                lease.is_none_or(|l| l.deleted || l.holder.as_deref() == Some("intruder"));
            let differs = lease.and_then(|l| l.holder.as_deref()) != o.holder.as_deref();
            if third_party || !differs {
                continue;
            }
            if in_gap(&o.lease, o.rv) {
                *totals
                    .entry("Granted states not judged (inside a Lease watch gap)")
                    .or_default() += 1;
            } else {
                v.get_mut("(a) a Granted claim its Lease does not name")
                    .expect("key")
                    .push(format!(
                        "{} (holder {:?}, token {:?}) Granted (rv {}) while Lease {} names {:?} (Lease rv {}{})",
                        o.name,
                        o.holder,
                        o.token,
                        o.rv,
                        o.lease,
                        lease.and_then(|l| l.holder.clone()),
                        lease.map(|l| l.rv).unwrap_or(0),
                        if lease.is_some_and(|l| l.init) { ", from a re-list" } else { "" }
                    ));
            }
        }
    }

    // (e): every live claim is Granted or Pending with a position, and (b): each Lease
    // names its Granted claim or nobody. Only what holds still is judged: a state seen
    // twice, 1.5 s apart, unchanged (same resourceVersions); a step in flight is not.
    let claim_api: Api<LockClaim> = Api::namespaced(client.clone(), ns);
    let lease_api: Api<Lease> = Api::namespaced(client.clone(), ns);
    let snapshot = || async {
        let claims = claim_api
            .list(&Default::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let mut bad_claims = BTreeMap::new();
        for c in &claims {
            let ok = c.metadata.deletion_timestamp.is_some()
                || c.phase().is_some_and(Phase::is_terminal)
                || c.phase() == Some(Phase::Granted)
                || (c.phase() == Some(Phase::Pending)
                    && c.status.as_ref().and_then(|s| s.queue_position).is_some());
            if !ok {
                bad_claims.insert(
                    format!(
                        "{}@{}",
                        c.name_any(),
                        c.resource_version().unwrap_or_default()
                    ),
                    format!(
                        "{} is {:?} without a queue position",
                        c.name_any(),
                        c.phase()
                    ),
                );
            }
        }
        let mut bad_leases = BTreeMap::new();
        for l in 0..leases {
            let name = format!("lock-{l}");
            let lease = lease_api.get_opt(&name).await.ok().flatten();
            let rv = lease
                .as_ref()
                .and_then(|l| l.resource_version())
                .unwrap_or_default();
            let holder = lease
                .as_ref()
                .and_then(|l| l.spec.as_ref())
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty());
            let granted: Vec<&LockClaim> = claims
                .iter()
                .filter(|c| c.spec.lease_name == name && c.phase() == Some(Phase::Granted))
                .collect();
            let agree = match (granted.as_slice(), holder.as_deref()) {
                ([], None) | ([], Some("intruder")) => true,
                ([c], Some(h)) => c.identity() == h,
                _ => false,
            };
            if !agree {
                let g: Vec<String> = granted
                    .iter()
                    .map(|c| {
                        format!(
                            "{}@{}",
                            c.name_any(),
                            c.resource_version().unwrap_or_default()
                        )
                    })
                    .collect();
                bad_leases.insert(
                    format!("{name}@{rv}/{g:?}"),
                    format!("{name}: Lease names {holder:?}, Granted {g:?}"),
                );
            }
        }
        (bad_claims, bad_leases)
    };
    let (c1, l1) = snapshot().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (c2, l2) = snapshot().await;
    for (k, msg) in c2 {
        if c1.contains_key(&k) {
            v.get_mut("(e) claim lost").expect("key").push(msg);
        }
    }
    for (k, msg) in l2 {
        if l1.contains_key(&k) {
            v.get_mut("(b) Lease disagrees once settled")
                .expect("key")
                .push(msg);
        }
    }

    // Then everyone leaves: every claim deleted, and every Lease must come to name
    // nobody (or be collected).
    for c in claim_api
        .list(&Default::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        let _ = claim_api.delete(&c.name_any(), &Default::default()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && !claim_api
            .list(&Default::default())
            .await
            .map(|l| l.items.is_empty())
            .unwrap_or(false)
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for l in 0..leases {
        let name = format!("lock-{l}");
        let holder = lease_api
            .get_opt(&name)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
            .filter(|h| !h.is_empty() && h != "intruder");
        if let Some(h) = holder {
            v.get_mut("(b) Lease disagrees once settled")
                .expect("key")
                .push(format!(
                    "{name} still names {h} after every claim was deleted"
                ));
        }
    }
    if !claim_api
        .list(&Default::default())
        .await
        .map(|l| l.items.is_empty())
        .unwrap_or(false)
    {
        v.get_mut("(e) claim lost")
            .expect("key")
            .push("claims still exist 30 s after they were deleted".into());
    }

    // (d) registers: tokens in each accepted log never go down.
    let regs: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    for l in 0..leases {
        let Ok(Some(cm)) = regs.get_opt(&format!("reg-lock-{l}")).await else {
            continue;
        };
        let data = cm.data.unwrap_or_default();
        let mut max = 0i64;
        for line in data.get(LOG_KEY).map(String::as_str).unwrap_or("").lines() {
            let t: i64 = line
                .split(' ')
                .next()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            *totals.entry("register writes accepted").or_default() += 1;
            if t < max {
                v.get_mut("(d) register accepted a stale token")
                    .expect("key")
                    .push(format!("reg-lock-{l}: {line} after token {max}"));
            }
            max = max.max(t);
        }
        *totals
            .entry("register writes refused (stale token)")
            .or_default() += data
            .get(REFUSED_KEY)
            .map(|r| r.lines().count())
            .unwrap_or(0);
    }
    Report {
        violations: v,
        totals,
    }
}
