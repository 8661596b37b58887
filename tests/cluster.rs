//! The install path users take, on a real one-node cluster (kubelet, containerd, CNI
//! bridge, kube-proxy: `hack/node.sh`): the image built from the Dockerfile, `helm
//! install` with the chart's defaults (2 replicas, leader election), Pods Ready, claims
//! granted, a Job holding a lock, failover by Pod deletion, container kill and network
//! partition, `helm upgrade` under load, RBAC, PDB and ServiceMonitor, the dashboard,
//! alerts and protected metrics, `helm uninstall`.
//!
//! Ignored in `make test` (no node there); `make e2e-cluster` brings the node up, builds
//! and imports the images, and runs these with `--ignored`. The steps share one release,
//! so they run in order in one test. Times are printed, not asserted (the benchmark
//! measures); bounds that are asserted are liveness bounds, twice what the design says.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use leasekeeper::api::{LockClaim, Phase};
use testkit as support;
use testkit::{checker, create_claim, recorder, spec, wait_phase};
use tokio::time::Instant;

#[path = "cluster/pod_examples.rs"]
mod pod_examples;
#[path = "cluster/pods.rs"]
mod pods;

const NS: &str = "leasekeeper-system";
const RELEASE: &str = "lk";
const T: Duration = Duration::from_secs(60);
/// The chart's default leader lease duration and renew deadline.
const LEADER_LEASE: Duration = Duration::from_secs(15);
const RENEW_DEADLINE: Duration = Duration::from_secs(10);

fn node_dir() -> PathBuf {
    support::kubeconfig_path()
        .parent()
        .expect("node dir")
        .to_path_buf()
}

fn kubectl(args: &[&str]) -> String {
    let (ok, out, err) = support::kubectl_run(args);
    assert!(ok, "kubectl {args:?}: {out}{err}");
    out
}

fn helm(args: &[&str]) -> String {
    let (ok, out, err) = support::helm(args);
    assert!(ok, "helm {args:?}: {out}{err}");
    out
}

/// `helm upgrade` of the release with its values kept and `sets` changed.
fn helm_upgrade(sets: &[&str]) -> String {
    let chart = support::root().join("charts/leasekeeper");
    let chart = chart.to_string_lossy();
    let mut args = vec!["upgrade", RELEASE, &chart, "-n", NS, "--reuse-values"];
    for s in sets {
        args.extend(["--set", s]);
    }
    helm(&args)
}

/// [`helm_upgrade`] with `sets`, then `kubectl rollout status` until the Deployment has
/// rolled; how long both took.
fn roll_out(sets: &[&str]) -> Duration {
    let t0 = Instant::now();
    helm_upgrade(sets);
    kubectl(&[
        "rollout",
        "status",
        "deployment",
        "-n",
        NS,
        "--timeout=180s",
    ]);
    t0.elapsed()
}

fn ctr(args: &[&str]) -> String {
    let out = Command::new("ctr")
        .args(["-n", "k8s.io"])
        .args(args)
        .output()
        .expect("ctr");
    assert!(out.status.success(), "ctr {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn operator_pods(client: &Client) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), NS)
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/name=leasekeeper"))
        .await
        .expect("pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

fn pod_ip(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default()
}

fn pod_name(p: &Pod) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The leader's Pod name (its election identity is `{pod}_{random}`).
async fn leader(client: &Client) -> Option<String> {
    let holder = support::current_leader(
        &Api::<Lease>::namespaced(client.clone(), NS),
        "leasekeeper-leader",
    )
    .await?;
    Some(
        holder
            .rsplit_once('_')
            .map_or(holder.clone(), |(pod, _)| pod.to_string()),
    )
}

/// The leadership Lease's holder identity, exactly.
async fn leader_identity(client: &Client) -> Option<String> {
    support::current_leader(
        &Api::<Lease>::namespaced(client.clone(), NS),
        "leasekeeper-leader",
    )
    .await
}

/// Waits until the leadership Lease names another process than `not` (an identity);
/// returns who (the Pod) and when.
async fn new_leader(client: &Client, not: &str, limit: Duration) -> (String, Duration) {
    let t0 = Instant::now();
    loop {
        if leader_identity(client).await.is_some_and(|l| l != not) {
            return (leader(client).await.unwrap_or_default(), t0.elapsed());
        }
        assert!(t0.elapsed() < limit, "no new leader within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two Pods Running and Ready.
async fn wait_ready_pods(client: &Client) -> Vec<Pod> {
    let t0 = Instant::now();
    loop {
        let pods = operator_pods(client).await;
        if pods.len() == 2 && pods.iter().all(ready) {
            return pods;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "Pods not Ready: {pods:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Claims created, granted and released in a loop on three Leases, from the start of a
/// disruption to its end. Counts grants and claims that never got a grant.
struct Churn {
    stop: Arc<AtomicBool>,
    grants: Arc<AtomicUsize>,
    lost: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Churn {
    fn start(client: &Client, ns: &str, round: &'static str) -> Churn {
        let stop: Arc<AtomicBool> = Arc::default();
        let (grants, lost): (Arc<AtomicUsize>, Arc<AtomicUsize>) = (Arc::default(), Arc::default());
        let tasks = (0..3)
            .map(|w| {
                let api: Api<LockClaim> = Api::namespaced(client.clone(), ns);
                let (stop, grants, lost) =
                    (Arc::clone(&stop), Arc::clone(&grants), Arc::clone(&lost));
                tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        let name = format!("{round}-{w}-{n}");
                        create_claim(&api, &name, spec(&format!("churn-{w}"))).await;
                        if !granted_within(&api, &name, T).await {
                            lost.fetch_add(1, Ordering::SeqCst);
                            continue;
                        }
                        grants.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        let release = serde_json::json!({"spec": {"release": true}});
                        let _ = api
                            .patch(&name, &PatchParams::default(), &Patch::Merge(release))
                            .await;
                        wait_phase(&api, &name, Phase::Released, T).await;
                    }
                })
            })
            .collect();
        Churn {
            stop,
            grants,
            lost,
            tasks,
        }
    }

    async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.expect("churn worker");
        }
        (
            self.grants.load(Ordering::SeqCst),
            self.lost.load(Ordering::SeqCst),
        )
    }
}

async fn granted_within(api: &Api<LockClaim>, name: &str, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Ok(c) = api.get(name).await {
            if c.phase() == Some(Phase::Granted) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The mutual-exclusion checks of the chaos run on what the recorder saw.
fn check(history: &recorder::History, what: &str) -> checker::Report {
    let obs = history.lock().expect("lock").clone();
    let mut r = checker::Report::default();
    checker::replay_claims(&obs, 1, &mut r);
    checker::replay_merged(&obs, Duration::ZERO, &mut r);
    for (k, v) in &r.violations {
        assert!(v.is_empty(), "{what}: {k}: {v:?}");
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the real node: make e2e-cluster"]
async fn cluster_install_run_fail_over_upgrade_and_uninstall() {
    let client = support::client().await;
    let mut summary = vec!["# e2e-cluster (real node)".to_string(), String::new()];
    install(&client, &mut summary).await;
    examples_and_job(&client).await;
    pods::serial_job(&client, &mut summary).await;
    pod_examples::semaphore_jobs(&client, &mut summary).await;
    pod_examples::cronjob_waits_for_the_migration(&client, &mut summary).await;
    pod_examples::cold_standby_rollout(&client, &mut summary).await;
    pods::endings(&client, &mut summary).await;
    active_passive(&client, &mut summary).await;
    rbac_and_foreign_lease(&client).await;
    support::create_namespace(&client, "churn", &[]).await;
    let history: recorder::History = Arc::default();
    let rec = tokio::spawn(recorder::record(
        client.clone(),
        "churn".into(),
        history.clone(),
    ));
    let churn = Churn::start(&client, "churn", "failover");
    fail_over_by_pod_deletion(&client, &mut summary).await;
    fail_over_by_container_kill(&client, &mut summary).await;
    fail_over_by_partition(&client, &mut summary).await;
    let (grants, lost) = churn.stop().await;
    // Last of the node's own faults: the kubelet frozen, then let go on.
    let kubelet: i32 = std::fs::read_to_string(node_dir().join("kubelet.pid"))
        .expect("kubelet pid")
        .trim()
        .parse()
        .expect("pid");
    pods::node_loss(&client, kubelet, &mut summary).await;
    let r = check(&history, "failovers");
    summary.push(format!(
        "- failovers under load: {grants} grants, {lost} claims never granted, {} grants recorded and checked, 0 violations",
        r.totals.get("grants").copied().unwrap_or_default()
    ));
    assert_eq!(lost, 0, "claims lost across the failovers");
    upgrade_under_load(&client, &history, &mut summary).await;
    rec.abort();
    pdb_and_service_monitor();
    observability_and_protected_metrics(&client, &mut summary).await;
    uninstall(&client).await;
    let text = summary.join("\n");
    println!("{text}");
    let _ = std::fs::write(support::root().join("target/e2e-cluster.md"), text + "\n");
}

/// helm install with the chart's defaults: both Pods Ready, probes answering, one leader,
/// and a follower that writes nothing.
async fn install(client: &Client, summary: &mut Vec<String>) {
    let chart = support::root().join("charts/leasekeeper");
    let t0 = Instant::now();
    helm(&[
        "install",
        RELEASE,
        &chart.to_string_lossy(),
        "-n",
        NS,
        "--create-namespace",
        "--set",
        "image.repository=localhost/leasekeeper",
        "--set",
        "image.tag=dev",
        "--set",
        "image.pullPolicy=Never",
    ]);
    let pods = wait_ready_pods(client).await;
    summary.push(format!(
        "- helm install -> 2 Pods Ready in {:.1} s",
        t0.elapsed().as_secs_f64()
    ));
    let lead = leader(client).await.expect("a leader");
    for p in &pods {
        let addr = format!("{}:8080", pod_ip(p));
        assert_eq!(support::scrape(&addr, "/healthz").await, "ok", "{addr}");
        assert_eq!(support::scrape(&addr, "/readyz").await, "ready", "{addr}");
        if pod_name(p) != lead {
            let m = support::scrape(&addr, "/metrics").await;
            assert_eq!(
                support::metric(&m, "leasekeeper_api_writes_total"),
                0.0,
                "{m}"
            );
            assert_eq!(support::metric(&m, "leasekeeper_leader "), 0.0, "{m}");
        }
    }
    let size = std::fs::read_to_string(support::root().join("target/image/leasekeeper-dev.size"))
        .unwrap_or_default();
    summary.push(format!(
        "- image localhost/leasekeeper:dev: {}",
        size.trim()
    ));
}

/// The example claims are arbitrated; a Job running `kubectl lock run` holds a lock
/// through a Pod-owned claim, and deleting the Job releases it (garbage collector).
async fn examples_and_job(client: &Client) {
    support::create_namespace(client, "examples", &[]).await;
    // The claim examples here; the Pod examples run in their own step (tests/cluster/pods.rs).
    for entry in std::fs::read_dir(support::root().join("examples")).expect("examples") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name.ends_with(".yaml") && !name.starts_with("pods-") {
            kubectl(&["apply", "-n", "examples", "-f", &path.to_string_lossy()]);
        }
    }
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), "examples");
    wait_phase(&claims, "db-maintenance", Phase::Granted, T).await;
    // Three claims on one Lease: one holds it (whichever came first: no preemption),
    // the others queue, the higher priority first.
    let t0 = Instant::now();
    loop {
        let list = claims.list(&Default::default()).await.expect("claims");
        let on_gpu: Vec<&LockClaim> = list
            .items
            .iter()
            .filter(|c| c.spec.lease_name == "shared-gpu")
            .collect();
        let granted = on_gpu
            .iter()
            .filter(|c| c.phase() == Some(Phase::Granted))
            .count();
        let mut positions: Vec<i32> = on_gpu
            .iter()
            .filter_map(|c| c.status.as_ref().and_then(|s| s.queue_position))
            .collect();
        positions.sort();
        if granted == 1 && positions == [1, 2] {
            break;
        }
        assert!(t0.elapsed() < T, "examples not arbitrated: {on_gpu:#?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // examples/semaphore.yaml: a Lock of capacity 3; three hold it, the fourth waits.
    for n in ["etl-a", "etl-b", "etl-c"] {
        wait_phase(&claims, n, Phase::Granted, T).await;
    }
    let d = wait_phase(&claims, "etl-d", Phase::Pending, T).await;
    assert_eq!(d.status.and_then(|s| s.queue_position), Some(1));
    support::create_namespace(client, "jobs", &[]).await;
    support::kubectl_stdin(&["apply", "-n", "jobs", "-f", "-"], JOB);
    let jobs: Api<LockClaim> = Api::namespaced(client.clone(), "jobs");
    let t0 = Instant::now();
    let held = loop {
        let list = jobs.list(&Default::default()).await.expect("claims");
        if let Some(c) = list
            .items
            .into_iter()
            .find(|c| c.phase() == Some(Phase::Granted))
        {
            break c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the Job's claim was not granted"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let owner = held.metadata.owner_references.clone().unwrap_or_default();
    assert!(
        owner.iter().any(|o| o.kind == "Pod"),
        "owned by its Pod: {owner:?}"
    );
    create_claim(&jobs, "after-job", spec("batch-lock")).await;
    wait_phase(&jobs, "after-job", Phase::Pending, T).await;
    kubectl(&[
        "delete",
        "job",
        "locker",
        "-n",
        "jobs",
        "--cascade=background",
        "--wait=false",
    ]);
    wait_phase(&jobs, "after-job", Phase::Granted, Duration::from_secs(120)).await;
}

/// examples/active-passive.yaml (the sidecar): exactly one ready endpoint behind the
/// Service; deleting that Pod makes the other replica the endpoint.
async fn active_passive(client: &Client, summary: &mut Vec<String>) {
    support::create_namespace(client, "web", &[]).await;
    let manifest = std::fs::read_to_string(support::root().join("examples/active-passive.yaml"))
        .expect("example")
        .replace(
            "ghcr.io/leasekeeper/leasekeeper:0.1.0",
            "localhost/leasekeeper:dev",
        )
        .replace("busybox:1.36", "localhost/lk-tools:dev");
    // Every list of Pods the Service's slices ever named, from a watch over the step.
    let listed = Arc::new(std::sync::Mutex::new(Vec::<(Instant, Vec<String>)>::new()));
    let watch = {
        use futures::StreamExt;
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "web");
        let listed = listed.clone();
        tokio::spawn(async move {
            let cfg =
                kube::runtime::watcher::Config::default().labels("kubernetes.io/service-name=web");
            let mut s = kube::runtime::watcher(slices, cfg).boxed();
            while let Some(Ok(ev)) = s.next().await {
                if let kube::runtime::watcher::Event::Apply(sl)
                | kube::runtime::watcher::Event::InitApply(sl) = ev
                {
                    let names = sl
                        .endpoints
                        .iter()
                        .filter_map(|e| e.target_ref.as_ref()?.name.clone())
                        .collect();
                    listed.lock().expect("listed").push((Instant::now(), names));
                }
            }
        })
    };
    support::kubectl_stdin(&["apply", "-n", "web", "-f", "-"], &manifest);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "web");
    let live = || async {
        pods.list(&kube::api::ListParams::default().labels("app=web"))
            .await
            .expect("pods")
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect::<Vec<Pod>>()
    };
    // Both replicas Ready (readiness is health), the Service routed to exactly one.
    let t0 = Instant::now();
    let holder = loop {
        let all = live().await;
        let ready_n = all.iter().filter(|p| ready(p)).count();
        let eps = ready_endpoints(client).await;
        if ready_n == 2 && eps.len() == 1 {
            break eps[0].clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "not active/passive: {ready_n} ready, endpoints {eps:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // The holder deleted: the route moves to the other replica.
    let t1 = Instant::now();
    kubectl(&["delete", "pod", &holder, "-n", "web", "--wait=false"]);
    loop {
        let eps = ready_endpoints(client).await;
        if eps.len() == 1 && !eps.contains(&holder) {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(40),
            "the other replica did not become the endpoint: {eps:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let moved = t1.elapsed();
    // A rollout restart completes: both new Pods become Ready by health, the old ones
    // go, the lock and the route move with them.
    let t2 = Instant::now();
    kubectl(&["rollout", "restart", "deployment/web", "-n", "web"]);
    kubectl(&[
        "rollout",
        "status",
        "deployment/web",
        "-n",
        "web",
        "--timeout=180s",
    ]);
    let rolled = t2.elapsed();
    let available = kubectl(&[
        "get",
        "deployment",
        "web",
        "-n",
        "web",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Available\")].status}",
    ]);
    assert_eq!(available.trim(), "True", "the Deployment reports Available");
    let t3 = Instant::now();
    while ready_endpoints(client).await.len() != 1 {
        assert!(
            t3.elapsed() < Duration::from_secs(40),
            "no holder endpoint after the rollout"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    watch.abort();
    let listed = listed.lock().expect("listed").clone();
    assert!(
        listed.iter().all(|(_, n)| n.len() <= 1),
        "the Service listed two Pods: {listed:?}"
    );
    // The gaps with no Pod listed, each from the slice losing its Pod to naming the next.
    let mut gaps = Vec::new();
    let mut empty_since = None;
    for (at, names) in &listed {
        match (names.is_empty(), empty_since) {
            (true, None) => empty_since = Some(*at),
            (false, Some(since)) => {
                gaps.push(at.duration_since(since));
                empty_since = None;
            }
            _ => {}
        }
    }
    summary.push(format!(
        "- active/passive by route (examples/active-passive.yaml): never two Pods listed ({} slice states watched); holder Pod deleted -> the other listed after {:.2} s; rollout restart completed in {:.1} s, Available; gaps with no Pod listed: {:?} (printed, not a benchmark)",
        listed.len(),
        moved.as_secs_f64(),
        rolled.as_secs_f64(),
        gaps.iter().map(|g| format!("{:.2}s", g.as_secs_f64())).collect::<Vec<_>>()
    ));
}

/// The Pods behind Service web/web that are ready endpoints.
async fn ready_endpoints(client: &Client) -> Vec<String> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "web");
    slices
        .list(&kube::api::ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .expect("endpoint slices")
        .items
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .filter_map(|e| e.target_ref.as_ref().and_then(|t| t.name.clone()))
        .collect()
}

const JOB: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: locker}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: locker}
rules:
  - {apiGroups: [leasekeeper.io], resources: [lockclaims], verbs: [get, list, watch, create, delete, patch]}
  - {apiGroups: [coordination.k8s.io], resources: [leases], verbs: [get, update]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: locker}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: locker}
subjects: [{kind: ServiceAccount, name: locker}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: locker}
spec:
  backoffLimit: 0
  template:
    spec:
      serviceAccountName: locker
      restartPolicy: Never
      containers:
        - name: work
          image: localhost/lk-tools:dev
          imagePullPolicy: Never
          command: [kubectl-lock, run, batch-lock, --ttl, 6s, --, sleep, "3600"]
          env:
            - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
            - {name: POD_UID, valueFrom: {fieldRef: {fieldPath: metadata.uid}}}
"#;

/// The operator's identity is exactly the chart's: it cannot read Secrets, and a claim
/// cannot make it write a Lease someone else created.
async fn rbac_and_foreign_lease(client: &Client) {
    let sa = format!("system:serviceaccount:{NS}:{RELEASE}-leasekeeper");
    let (_, can, _) = support::kubectl_run(&["auth", "can-i", "get", "secrets", "-A", "--as", &sa]);
    assert_eq!(can.trim(), "no");
    let (_, can, _) = support::kubectl_run(&[
        "auth", "can-i", "patch", "leases", "-n", "jobs", "--as", &sa,
    ]);
    assert_eq!(
        can.trim(),
        "yes",
        "it needs Lease write; what it writes is the product's rule"
    );
    support::create_namespace(client, "foreign", &[]).await;
    support::kubectl_stdin(
        &["apply", "-n", "foreign", "-f", "-"],
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {name: theirs}\nspec: {holderIdentity: someone, leaseDurationSeconds: 1}\n",
    );
    let before = kubectl(&["get", "lease", "theirs", "-n", "foreign", "-o", "json"]);
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), "foreign");
    create_claim(&claims, "grab", spec("theirs")).await;
    support::wait_for(&claims, "grab", T, "LeaseNotManaged", |c: &LockClaim| {
        c.condition("Granted")
            .is_some_and(|x| x.reason == "LeaseNotManaged")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        kubectl(&["get", "lease", "theirs", "-n", "foreign", "-o", "json"]),
        before
    );
}

/// `kubectl delete pod` of the leader: a graceful stop hands leadership over at once.
async fn fail_over_by_pod_deletion(client: &Client, summary: &mut Vec<String>) {
    let old = leader(client).await.expect("leader");
    let old_id = leader_identity(client).await.expect("leader");
    kubectl(&["delete", "pod", &old, "-n", NS, "--wait=false"]);
    let (new, took) = new_leader(client, &old_id, 2 * LEADER_LEASE).await;
    summary.push(format!(
        "- kubectl delete pod of the leader -> {new} leads after {:.3} s",
        took.as_secs_f64()
    ));
    wait_ready_pods(client).await;
}

/// SIGKILL of the leader's container (through containerd): the standby leads once the
/// leader's Lease runs out.
async fn fail_over_by_container_kill(client: &Client, summary: &mut Vec<String>) {
    let old = leader(client).await.expect("leader");
    let pod = operator_pods(client)
        .await
        .into_iter()
        .find(|p| pod_name(p) == old)
        .expect("leader pod");
    let old_id = leader_identity(client).await.expect("leader");
    let id = container_id(&pod);
    ctr(&["tasks", "kill", "-s", "SIGKILL", &id]);
    let (new, took) = new_leader(client, &old_id, 2 * LEADER_LEASE).await;
    summary.push(format!(
        "- SIGKILL of the leader's container -> {new} leads after {:.3} s (leader lease {} s)",
        took.as_secs_f64(),
        LEADER_LEASE.as_secs()
    ));
    wait_ready_pods(client).await;
}

fn container_id(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.clone())
        .and_then(|id| id.strip_prefix("containerd://").map(str::to_string))
        .expect("container id")
}

/// The pid of a container's task, to enter its network namespace.
fn task_pid(id: &str) -> String {
    ctr(&["tasks", "ls"])
        .lines()
        .find(|l| l.starts_with(id))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        .expect("task pid")
}

/// Pins the network namespace of process `pid` to a file, so that it can be entered
/// after the Pod's container restarts (the Pod keeps its namespace).
fn pin_netns(pid: &str) -> PathBuf {
    let path = node_dir().join("partition.netns");
    let _ = std::fs::write(&path, "");
    let ok = Command::new("mount")
        .arg("--bind")
        .arg(format!("/proc/{pid}/ns/net"))
        .arg(&path)
        .status()
        .expect("mount")
        .success();
    assert!(ok, "pin the Pod's network namespace");
    path
}

fn netns_iptables(netns: &std::path::Path, action: &str, dest: &str) {
    let ok = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["iptables", action, "OUTPUT", "-d", dest, "-j", "DROP"])
        .status()
        .expect("nsenter")
        .success();
    assert!(
        ok,
        "iptables {action} {dest} in the Pod's network namespace"
    );
}

/// The leader's Pod cut off from the API server (iptables in its network namespace):
/// the standby leads, and the API server's audit log shows no write from the old
/// leader's address after its term (renew deadline after the cut).
async fn fail_over_by_partition(client: &Client, summary: &mut Vec<String>) {
    let old = leader(client).await.expect("leader");
    let pod = operator_pods(client)
        .await
        .into_iter()
        .find(|p| pod_name(p) == old)
        .expect("leader pod");
    let old_id = leader_identity(client).await.expect("leader");
    let ip = pod_ip(&pod);
    let netns = pin_netns(&task_pid(&container_id(&pod)));
    let cut = jiff::Timestamp::now();
    for dest in ["10.0.0.1", "10.244.0.1"] {
        netns_iptables(&netns, "-I", dest);
    }
    let (new, took) = new_leader(client, &old_id, 3 * LEADER_LEASE).await;
    // Keep it cut off past its renew deadline (it exits then), then heal.
    tokio::time::sleep(RENEW_DEADLINE.saturating_sub(took) + Duration::from_secs(3)).await;
    for dest in ["10.0.0.1", "10.244.0.1"] {
        netns_iptables(&netns, "-D", dest);
    }
    let _ = Command::new("umount").arg(&netns).status();
    wait_ready_pods(client).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let term_end = cut + jiff::SignedDuration::try_from(RENEW_DEADLINE).unwrap_or_default();
    let earlier = cut - jiff::SignedDuration::from_mins(5);
    assert!(
        !writes_from(&ip, earlier).is_empty(),
        "the audit log records the leader's writes by its address (else this check proves nothing)"
    );
    let late = writes_from(&ip, term_end);
    summary.push(format!(
        "- leader Pod partitioned from the API server -> {new} leads after {:.3} s; writes from the old leader ({ip}) after its term: {}",
        took.as_secs_f64(),
        late.len()
    ));
    assert!(late.is_empty(), "writes after the term: {late:#?}");
}

/// Successful writes in the audit log from `ip` after `after`.
fn writes_from(ip: &str, after: jiff::Timestamp) -> Vec<String> {
    let log = std::fs::read_to_string(node_dir().join("audit.log")).expect("audit log");
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| {
            let from = e["sourceIPs"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == ip));
            let ok = e["responseStatus"]["code"]
                .as_i64()
                .is_some_and(|c| c < 300);
            let when = e["stageTimestamp"]
                .as_str()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok());
            from && ok && when.is_some_and(|t| t > after)
        })
        .map(|e| {
            format!(
                "{} {} {}",
                e["verb"], e["objectRef"]["resource"], e["stageTimestamp"]
            )
        })
        .collect()
}

/// helm upgrade to another image tag while claims are granted and released in a loop:
/// the rolling update completes, no claim is lost, no two are ever Granted at once.
async fn upgrade_under_load(
    client: &Client,
    history: &recorder::History,
    summary: &mut Vec<String>,
) {
    ctr(&[
        "images",
        "tag",
        "--force",
        "localhost/leasekeeper:dev",
        "localhost/leasekeeper:dev2",
    ]);
    let churn = Churn::start(client, "churn", "upgrade");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rolled = roll_out(&["image.tag=dev2"]);
    let pods = wait_ready_pods(client).await;
    for p in &pods {
        let image = p
            .spec
            .as_ref()
            .map(|s| s.containers[0].image.clone())
            .unwrap_or_default();
        assert_eq!(image.as_deref(), Some("localhost/leasekeeper:dev2"));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (grants, lost) = churn.stop().await;
    let r = check(history, "upgrade");
    summary.push(format!(
        "- helm upgrade to a new image tag under load: rollout {:.1} s; {grants} grants, {lost} lost, {} grants and 0 violations over the whole recorded history",
        rolled.as_secs_f64(),
        r.totals.get("grants").copied().unwrap_or_default()
    ));
    assert_eq!(lost, 0, "claims lost across the upgrade");
    assert!(grants > 0);
}

/// The PodDisruptionBudget and the ServiceMonitor render and apply (the latter with a
/// minimal stand-in of the Prometheus Operator's CRD).
fn pdb_and_service_monitor() {
    support::kubectl_stdin(&["apply", "-f", "-"], &monitoring_crd("ServiceMonitor"));
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/servicemonitors.monitoring.coreos.com",
        "--timeout=30s",
    ]);
    helm_upgrade(&[
        "podDisruptionBudget.enabled=true",
        "serviceMonitor.enabled=true",
    ]);
    let out = kubectl(&[
        "get",
        "poddisruptionbudget,servicemonitor",
        "-n",
        NS,
        "-o",
        "name",
    ]);
    assert!(
        out.contains("poddisruptionbudget") && out.contains("servicemonitor"),
        "{out}"
    );
}

/// The dashboard ConfigMap and the PrometheusRule apply (the rule with a stand-in of the
/// Prometheus Operator's CRD); with `metrics.auth=true` the Pods roll, become Ready
/// through probes on their own port, and serve /metrics over HTTPS to a token bound to
/// the chart's reader role only (the operator's ServiceAccount makes the reviews).
async fn observability_and_protected_metrics(client: &Client, summary: &mut Vec<String>) {
    support::kubectl_stdin(&["apply", "-f", "-"], &monitoring_crd("PrometheusRule"));
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/prometheusrules.monitoring.coreos.com",
        "--timeout=30s",
    ]);
    let rolled = roll_out(&[
        "grafanaDashboard.enabled=true",
        "prometheusRule.enabled=true",
        "metrics.auth=true",
    ]);
    let pods = wait_ready_pods(client).await;
    let out = kubectl(&["get", "prometheusrule,configmap", "-n", NS, "-o", "name"]);
    assert!(
        out.contains("prometheusrule.monitoring.coreos.com/lk-leasekeeper")
            && out.contains("configmap/lk-leasekeeper-dashboard"),
        "{out}"
    );
    let reader = "lk-leasekeeper-metrics-reader";
    support::kubectl_stdin(
        &["apply", "-f", "-"],
        &support::scrapers(NS, reader, "prometheus", "nobody"),
    );
    support::wait_can_get_metrics(NS, "prometheus");
    let token = |sa: &str| {
        kubectl(&["create", "token", sa, "-n", NS, "--duration=1h"])
            .trim()
            .to_string()
    };
    let (reader_token, other_token) = (token("prometheus"), token("nobody"));
    for p in &pods {
        let ip = pod_ip(p);
        let url = format!("https://{ip}:8080/metrics");
        let (code, body) = support::curl(&url, Some(&reader_token));
        assert_eq!(code, 200, "{url} with the reader's token: {body}");
        assert!(body.contains("leasekeeper_leader"), "{body}");
        assert_eq!(
            support::curl(&url, Some(&other_token)).0,
            403,
            "{url} without the RBAC"
        );
        assert_eq!(support::curl(&url, None).0, 401, "{url} without a token");
        assert_eq!(
            support::curl(&format!("http://{ip}:8081/healthz"), None),
            (200, "ok".to_string())
        );
    }
    kubectl(&["delete", "clusterrolebinding", reader]);
    summary.push(format!(
        "- dashboard ConfigMap and PrometheusRule applied; metrics.auth=true rolled out in {:.1} s, Pods Ready through the probe port; /metrics over HTTPS: reader token 200, other token 403, none 401",
        rolled.as_secs_f64()
    ));
}

/// A minimal stand-in for one of the Prometheus Operator's CRDs (any spec accepted), so
/// the chart's objects of that kind apply.
fn monitoring_crd(kind: &str) -> String {
    let plural = format!("{}s", kind.to_lowercase());
    format!(
        r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: {plural}.monitoring.coreos.com}}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {{kind: {kind}, plural: {plural}, singular: {singular}}}
  versions:
    - name: v1
      served: true
      storage: true
      schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}
"#,
        singular = kind.to_lowercase()
    )
}

/// helm uninstall leaves nothing stuck: a namespace full of claims deletes completely.
async fn uninstall(client: &Client) {
    helm(&["uninstall", RELEASE, "-n", NS]);
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    ns.delete("churn", &Default::default())
        .await
        .expect("delete namespace");
    support::wait_gone(&ns, "churn", Duration::from_secs(120)).await;
}
