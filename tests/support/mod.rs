//! Shared end-to-end test support: a real kube-apiserver + etcd (started or reused),
//! the CRD installed once, a fresh namespace per test, and wait helpers.
//!
//! The control plane is `hack/control-plane.sh up target/e2e-plane` unless
//! `LEASEKEEPER_TEST_KUBECONFIG` names another cluster to use.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, Resource};
use serde::de::DeserializeOwned;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Plane {
    kubeconfig: PathBuf,
    bin: PathBuf,
}

fn plane() -> &'static Plane {
    static PLANE: OnceLock<Plane> = OnceLock::new();
    PLANE.get_or_init(|| {
        let script = root().join("hack/control-plane.sh");
        let bin = String::from_utf8(run_ok(Command::new(&script).arg("bin")).stdout)
            .expect("utf-8 path")
            .trim()
            .into();
        let kubeconfig = match std::env::var_os("LEASEKEEPER_TEST_KUBECONFIG") {
            Some(k) => PathBuf::from(k),
            None => {
                let dir = root().join("target/e2e-plane");
                run_ok(Command::new(&script).arg("up").arg(&dir));
                dir.join("kubeconfig")
            }
        };
        let plane = Plane { kubeconfig, bin };
        install_crd(&plane);
        plane
    })
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn install_crd(plane: &Plane) {
    let crd = root().join("crds/lockclaims.leasekeeper.io.yaml");
    let mut apply = kubectl_cmd(plane);
    apply
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(&crd);
    run_ok(&mut apply);
    let mut wait = kubectl_cmd(plane);
    wait.args([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/lockclaims.leasekeeper.io",
    ]);
    run_ok(&mut wait);
}

fn kubectl_cmd(plane: &Plane) -> Command {
    let mut c = Command::new(plane.bin.join("kubectl"));
    c.env("KUBECONFIG", &plane.kubeconfig);
    c
}

/// The kubeconfig file of the test control plane.
pub fn kubeconfig_path() -> &'static Path {
    &plane().kubeconfig
}

/// The directory holding kubectl, helm, kube-apiserver and etcd.
pub fn bin_dir() -> &'static Path {
    &plane().bin
}

/// A `kubectl` command pointed at the test control plane.
pub fn kubectl() -> Command {
    kubectl_cmd(plane())
}

/// Runs kubectl with `args` and returns (success, stdout, stderr).
pub fn kubectl_run(args: &[&str]) -> (bool, String, String) {
    let out = kubectl().args(args).output().expect("kubectl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A client for the test control plane (one per test: clients are tied to a runtime).
pub async fn client() -> Client {
    let path = kubeconfig_path().to_path_buf();
    let kc = Kubeconfig::read_from(&path).expect("kubeconfig readable");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig valid");
    Client::try_from(cfg).expect("client")
}

/// Creates a fresh namespace named after the test, with a random suffix.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let suffix: u32 = rand_u32();
    let name = format!("{}-{:08x}", prefix.replace('_', "-"), suffix);
    let name = name.chars().take(63).collect::<String>();
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some([("leasekeeper.io/e2e".to_string(), "true".to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
    name
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish() as u32
}

/// Watches `name` until `cond` holds, for at most `timeout`; returns the object.
/// Panics with the last seen object when the time runs out.
pub async fn wait_for<K, F>(api: &Api<K>, name: &str, timeout: Duration, what: &str, cond: F) -> K
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(&K) -> bool,
{
    let watched = kube::runtime::wait::await_condition(api.clone(), name, |o: Option<&K>| {
        o.is_some_and(&cond)
    });
    match tokio::time::timeout(timeout, watched).await {
        Ok(Ok(Some(obj))) => obj,
        Ok(other) => panic!("watch on {name} ended while waiting for {what}: {other:?}"),
        Err(_) => {
            let last = api.get_opt(name).await;
            panic!("timed out after {timeout:?} waiting for {name}: {what}; last seen: {last:#?}")
        }
    }
}

/// An in-process operator watching one namespace; stopped (aborted) on drop.
pub struct Operator {
    task: tokio::task::JoinHandle<()>,
    /// Its metrics.
    pub metrics: std::sync::Arc<leasekeeper::telemetry::Metrics>,
}

impl Operator {
    /// Starts the controller for `ns` with the given GC grace and waits for its caches.
    pub async fn start(client: &Client, ns: &str, gc_grace: Duration) -> Operator {
        Operator::start_in_term(client, ns, gc_grace, leasekeeper::leader::Term::unbounded()).await
    }

    /// Like [`Operator::start`], writing only while `term` is current.
    pub async fn start_in_term(
        client: &Client,
        ns: &str,
        gc_grace: Duration,
        term: leasekeeper::leader::Term,
    ) -> Operator {
        let mut cfg = leasekeeper::controller::RunConfig::for_namespace(Some(ns.to_string()));
        cfg.gc_grace = gc_grace;
        cfg.identity = Some(format!("e2e-{ns}"));
        let metrics = std::sync::Arc::new(leasekeeper::telemetry::Metrics::new());
        let ready = std::sync::Arc::new(leasekeeper::telemetry::Readiness::default());
        let task = tokio::spawn({
            let (client, metrics, ready) = (client.clone(), metrics.clone(), ready.clone());
            async move {
                if let Err(e) =
                    leasekeeper::controller::controller(client, cfg, metrics, ready, term).await
                {
                    eprintln!("operator stopped: {e}");
                }
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !ready.get() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "operator caches did not sync"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Operator { task, metrics }
    }

    /// Stops the operator (like a crash: nothing is cleaned up).
    pub async fn stop(mut self) {
        self.task.abort();
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = task.await;
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A LockClaim spec with defaults, for `lease`.
pub fn spec(lease: &str) -> leasekeeper::api::LockClaimSpec {
    leasekeeper::api::LockClaimSpec {
        lease_name: lease.into(),
        holder_identity: None,
        lease_duration_seconds: 15,
        priority: 0,
        renewal: leasekeeper::api::Renewal::Controller,
        lock_delay_seconds: 0,
        release: false,
        max_hold_seconds: None,
        ttl_seconds_after_finished: None,
    }
}

/// Creates a claim.
pub async fn create_claim(
    api: &Api<leasekeeper::api::LockClaim>,
    name: &str,
    spec: leasekeeper::api::LockClaimSpec,
) -> leasekeeper::api::LockClaim {
    api.create(
        &PostParams::default(),
        &leasekeeper::api::LockClaim::new(name, spec),
    )
    .await
    .unwrap_or_else(|e| panic!("create {name}: {e}"))
}

/// Waits for a claim to reach `phase`.
pub async fn wait_phase(
    api: &Api<leasekeeper::api::LockClaim>,
    name: &str,
    phase: leasekeeper::api::Phase,
    timeout: Duration,
) -> leasekeeper::api::LockClaim {
    wait_for(
        api,
        name,
        timeout,
        &format!("phase {phase:?}"),
        |c: &leasekeeper::api::LockClaim| c.phase() == Some(phase),
    )
    .await
}

/// Records every LockClaim state a watcher sees in a namespace, in order.
pub struct History {
    task: tokio::task::JoinHandle<()>,
    seen:
        std::sync::Arc<std::sync::Mutex<Vec<(tokio::time::Instant, leasekeeper::api::LockClaim)>>>,
}

impl History {
    /// Starts watching `ns`.
    pub async fn record(client: &Client, ns: &str) -> History {
        use futures::StreamExt;
        let api: Api<leasekeeper::api::LockClaim> = Api::namespaced(client.clone(), ns);
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                let mut ready_tx = Some(ready_tx);
                let mut stream = kube::runtime::WatchStreamExt::default_backoff(
                    kube::runtime::watcher(api, kube::runtime::watcher::Config::default()),
                )
                .boxed();
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(
                            kube::runtime::watcher::Event::Apply(o)
                            | kube::runtime::watcher::Event::InitApply(o),
                        ) => {
                            seen.lock()
                                .expect("lock")
                                .push((tokio::time::Instant::now(), o));
                        }
                        Ok(kube::runtime::watcher::Event::InitDone) => {
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        _ => {}
                    }
                }
            }
        });
        let _ = ready_rx.await;
        History { task, seen }
    }

    /// Every state seen so far, in order.
    pub fn states(&self) -> Vec<(tokio::time::Instant, leasekeeper::api::LockClaim)> {
        self.seen.lock().expect("lock").clone()
    }

    /// Replays the stream: after every observed change, at most one claim per Lease is
    /// Granted. Returns how many states were checked.
    pub fn assert_never_two_granted(&self) -> usize {
        let mut latest: std::collections::BTreeMap<String, leasekeeper::api::LockClaim> =
            Default::default();
        let states = self.states();
        for (_, c) in &states {
            latest.insert(c.metadata.name.clone().unwrap_or_default(), c.clone());
            let mut per_lease: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
            for c in latest
                .values()
                .filter(|c| c.phase() == Some(leasekeeper::api::Phase::Granted))
            {
                per_lease
                    .entry(c.spec.lease_name.as_str())
                    .or_default()
                    .push(c.metadata.name.clone().unwrap_or_default());
            }
            for (lease, holders) in per_lease {
                assert!(
                    holders.len() <= 1,
                    "a watcher saw {holders:?} Granted at once on Lease {lease}"
                );
            }
        }
        states.len()
    }

    /// Whether `name` was ever seen in `phase`.
    pub fn ever(&self, name: &str, phase: leasekeeper::api::Phase) -> bool {
        self.states()
            .iter()
            .any(|(_, c)| c.metadata.name.as_deref() == Some(name) && c.phase() == Some(phase))
    }

    /// When `name` was first seen in `phase`; waits up to 5 s for the recorder's own
    /// watch to catch up with whatever the caller already observed.
    pub async fn first(
        &self,
        name: &str,
        phase: leasekeeper::api::Phase,
    ) -> Option<tokio::time::Instant> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let found = self
                .states()
                .iter()
                .find(|(_, c)| c.metadata.name.as_deref() == Some(name) && c.phase() == Some(phase))
                .map(|(t, _)| *t);
            if found.is_some() || tokio::time::Instant::now() >= deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Renews a Lease as a holder would (spec.renewTime, with the resourceVersion
/// precondition), every `every`, writing renewTime shifted by `skew`, until dropped.
pub struct Renewer {
    task: tokio::task::JoinHandle<()>,
}

impl Renewer {
    /// Starts renewing `lease` in `ns` while it names `identity`.
    pub fn start(
        client: &Client,
        ns: &str,
        lease: &str,
        identity: &str,
        every: Duration,
        skew: jiff::SignedDuration,
    ) -> Renewer {
        let api: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(client.clone(), ns);
        let (lease, identity) = (lease.to_string(), identity.to_string());
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Ok(Some(mut l)) = api.get_opt(&lease).await else {
                    continue;
                };
                let Some(spec) = l.spec.as_mut() else {
                    continue;
                };
                if spec.holder_identity.as_deref() != Some(identity.as_str()) {
                    continue;
                }
                let t = jiff::Timestamp::now()
                    .checked_add(skew)
                    .unwrap_or_else(|_| jiff::Timestamp::now());
                spec.renew_time =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(t));
                let _ = api.replace(&lease, &PostParams::default(), &l).await;
            }
        });
        Renewer { task }
    }

    /// Stops renewing.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The Lease in `ns`, if it exists.
pub async fn lease(
    client: &Client,
    ns: &str,
    name: &str,
) -> Option<k8s_openapi::api::coordination::v1::Lease> {
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .expect("lease read")
}

/// Event reasons recorded in `ns` for objects of `kind` (name, reason).
pub fn events(ns: &str) -> Vec<(String, String, String)> {
    let (ok, out, err) = kubectl_run(&["get", "events", "-n", ns, "-o", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|e| {
                    (
                        e["involvedObject"]["kind"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        e["involvedObject"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        e["reason"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (watching) until `name` no longer exists.
pub async fn wait_gone<K>(api: &Api<K>, name: &str, timeout: Duration)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let gone = kube::runtime::wait::await_condition(api.clone(), name, |o: Option<&K>| o.is_none());
    match tokio::time::timeout(timeout, gone).await {
        Ok(Ok(_)) => {}
        other => panic!("{name} still exists after {timeout:?}: {other:?}"),
    }
}

/// Runs `helm` against the test control plane.
pub fn helm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin_dir().join("helm"))
        .args(args)
        .env("KUBECONFIG", kubeconfig_path())
        .env("HELM_CACHE_HOME", root().join("target/helm/cache"))
        .env("HELM_CONFIG_HOME", root().join("target/helm/config"))
        .env("HELM_DATA_HOME", root().join("target/helm/data"))
        .output()
        .expect("helm runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `leasekeeper run ARGS` as a process with `kubeconfig`; logs to target/NAME.log.
pub fn spawn_operator(kubeconfig: &Path, name: &str, args: &[&str]) -> std::process::Child {
    let log = root().join(format!("target/{name}.log"));
    let out = std::fs::File::create(&log).expect("log file");
    Command::new(env!("CARGO_BIN_EXE_leasekeeper"))
        .arg("run")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(out)
        .spawn()
        .expect("leasekeeper starts")
}

/// Waits up to 10 s for an Event (kind, name, reason) in `ns`: Events are published
/// after the writes they describe. Returns every Event seen.
pub async fn wait_event(
    ns: &str,
    kind: &str,
    name: Option<&str>,
    reason: &str,
) -> Vec<(String, String, String)> {
    let mut evs = events(ns);
    for _ in 0..100 {
        if evs
            .iter()
            .any(|(k, n, r)| k == kind && name.is_none_or(|x| x == n) && r == reason)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        evs = events(ns);
    }
    evs
}

/// The sum of the samples of metric `name` (with its labels, if given) in Prometheus
/// text `text`.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// kube-controller-manager running only its garbage collector against the test plane,
/// killed on drop. The local plane has no controller manager of its own; a cluster
/// given by `LEASEKEEPER_TEST_KUBECONFIG` has one, so there this is `None`.
pub struct GarbageCollector(std::process::Child);

impl GarbageCollector {
    /// Starts it (log in `target/kcm-<pid>.log`).
    pub fn start() -> Option<GarbageCollector> {
        if std::env::var_os("LEASEKEEPER_TEST_KUBECONFIG").is_some() {
            return None;
        }
        let log = root().join(format!("target/kcm-{}.log", std::process::id()));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin_dir().join("kube-controller-manager"))
            .arg(format!("--kubeconfig={}", kubeconfig_path().display()))
            .args([
                "--controllers=garbagecollector",
                "--leader-elect=false",
                "--secure-port=0",
                "--use-service-account-credentials=false",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("kube-controller-manager starts (hack/control-plane.sh build): {e}")
            });
        Some(GarbageCollector(child))
    }
}

impl Drop for GarbageCollector {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
