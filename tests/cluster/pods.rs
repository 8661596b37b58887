//! Pods that hold locks from their template alone, on the real node: the examples as a
//! user applies them (the images swapped for the local ones), a watch of the Pods over
//! each run, the kubelet's own heartbeat as the renewal.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use leasekeeper::api::{LockClaim, Phase, FENCING_TOKEN_ANNOTATION, POD_GATE};
use leasekeeper::arbiter::pods::claim_name;
use testkit as support;
use tokio::time::Instant;

const T: Duration = Duration::from_secs(120);

/// An example with the local images instead of the registry's.
pub(super) fn example(name: &str) -> String {
    std::fs::read_to_string(support::root().join("examples").join(name))
        .expect("example")
        .replace("busybox:1.36", "localhost/lk-tools:dev")
}

/// A manifest given on stdin, with the local tools image.
pub(super) fn apply(ns: &str, yaml: &str) {
    support::kubectl_stdin(&["apply", "-n", ns, "-f", "-"], yaml);
}

pub(super) fn gated(p: &Pod) -> bool {
    p.spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.as_ref())
        .is_some_and(|g| g.iter().any(|g| g.name == POD_GATE))
}

pub(super) fn token(p: &Pod) -> Option<i64> {
    p.annotations()
        .get(FENCING_TOKEN_ANNOTATION)
        .and_then(|t| t.parse().ok())
}

pub(super) fn phase(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

/// Records, from a watch over the whole run, the most Pods (matching `selector`) seen
/// Running at once.
pub(super) struct Overlap {
    most: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl Overlap {
    pub(super) fn watch(client: &Client, ns: &str, selector: &str) -> Overlap {
        let most = Arc::new(Mutex::new(0));
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let cfg = watcher::Config::default().labels(selector);
        let task = tokio::spawn({
            let most = most.clone();
            async move {
                let mut running: BTreeMap<String, bool> = BTreeMap::new();
                let mut s = watcher(pods, cfg).boxed();
                while let Some(Ok(ev)) = s.next().await {
                    match ev {
                        watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                            running.insert(p.name_any(), phase(&p) == "Running");
                        }
                        watcher::Event::Delete(p) => {
                            running.remove(&p.name_any());
                        }
                        _ => {}
                    }
                    let now = running.values().filter(|r| **r).count();
                    let mut m = most.lock().expect("most");
                    *m = (*m).max(now);
                }
            }
        });
        Overlap { most, task }
    }

    pub(super) fn most(&self) -> usize {
        *self.most.lock().expect("most")
    }
}

impl Drop for Overlap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// examples/pods-serial-job.yaml: six Pods, three asked for at once, run one at a time
/// with rising tokens, each printing its own.
pub async fn serial_job(client: &Client, summary: &mut Vec<String>) {
    let ns = "pods-serial";
    support::create_namespace(client, ns, &[]).await;
    let overlap = Overlap::watch(client, ns, "job-name=serial-backup");
    let t0 = Instant::now();
    apply(ns, &example("pods-serial-job.yaml"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let done = loop {
        let list = pods.list(&Default::default()).await.expect("pods");
        let ok: Vec<Pod> = list
            .items
            .into_iter()
            .filter(|p| phase(p) == "Succeeded")
            .collect();
        if ok.len() >= 6 {
            break ok;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the serial Job did not finish"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let took = t0.elapsed();
    assert_eq!(overlap.most(), 1, "two Pods of the serial Job ran at once");
    let mut runs: Vec<(jiff::Timestamp, i64, String)> = done
        .iter()
        .map(|p| {
            let started = p
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .map(|t| t.0)
                .expect("started");
            (
                started,
                token(p).expect("a token in its annotations"),
                p.name_any(),
            )
        })
        .collect();
    runs.sort();
    for w in runs.windows(2) {
        assert!(
            w[0].1 < w[1].1,
            "tokens rise in the order the Pods ran: {runs:?}"
        );
    }
    for (_, t, name) in &runs {
        let (ok, logs, err) = support::kubectl_run(&["logs", "-n", ns, name]);
        assert!(ok, "{err}");
        assert!(
            logs.contains(&format!("fencing token {t}")),
            "{name} printed {logs:?}, not its token {t}"
        );
    }
    summary.push(format!(
        "- Pods (scheduling gates): the serial Job's 6 Pods ran one at a time (at most {} Running at once, from a watch), tokens rising, each printed its own; {:.1} s in all",
        overlap.most(),
        took.as_secs_f64()
    ));
    support::kubectl_run(&["delete", "namespace", ns, "--wait=false"]);
}

/// A gated Pod on lock `lock` running `script` in the tools image, with annotations.
fn gated_pod(name: &str, lock: &str, restart: &str, script: &str, duration: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{leasekeeper.io/lock: {lock}}}
  annotations: {{leasekeeper.io/lease-duration-seconds: "{duration}"}}
spec:
  restartPolicy: {restart}
  terminationGracePeriodSeconds: 2
  schedulingGates: [{{name: leasekeeper.io/lock}}]
  containers:
    - name: work
      image: localhost/lk-tools:dev
      imagePullPolicy: Never
      command: [sh, -c, "trap 'exit 0' TERM; {script}"]
"#
    )
}

async fn claim_phase(claims: &Api<LockClaim>, pod: &str) -> Option<Phase> {
    claims
        .get_opt(&claim_name(pod))
        .await
        .ok()
        .flatten()
        .and_then(|c| c.phase())
}

async fn wait_claim(
    claims: &Api<LockClaim>,
    pod: &str,
    phase: Phase,
    limit: Duration,
) -> LockClaim {
    support::wait_phase(claims, &claim_name(pod), phase, limit).await
}

async fn wait_opened(pods: &Api<Pod>, name: &str, limit: Duration) {
    support::wait_for(pods, name, limit, "opened", |p: &Pod| !gated(p)).await;
}

/// Failure, deletion and a container restart, each with a Pod waiting behind.
pub async fn endings(client: &Client, summary: &mut Vec<String>) {
    let ns = "pods-endings";
    support::create_namespace(client, ns, &[]).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), ns);
    // A container that restarts keeps the hold; the Pod failing ends it.
    apply(
        ns,
        &gated_pod("flaky", "end-lock", "OnFailure", "sleep 2; exit 1", "40"),
    );
    wait_claim(&claims, "flaky", Phase::Granted, T).await;
    let fail_on_cue = "while [ ! -f /tmp/fail ]; do sleep 0.2; done; exit 1";
    apply(
        ns,
        &gated_pod("next", "end-lock", "Never", fail_on_cue, "40"),
    );
    support::wait_for(&pods, "flaky", T, "restarted twice", |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first().map(|c| c.restart_count))
            .is_some_and(|n| n >= 2)
    })
    .await;
    assert_eq!(
        claim_phase(&claims, "flaky").await,
        Some(Phase::Granted),
        "restarts keep the hold"
    );
    assert!(
        gated(&pods.get("next").await.expect("pod")),
        "the next Pod still waits"
    );
    // Deleting the holder hands the lock on once the Pod is gone.
    support::kubectl_run(&["delete", "pod", "flaky", "-n", ns, "--wait=false"]);
    wait_opened(&pods, "next", T).await;
    let c = wait_claim(&claims, "next", Phase::Granted, T).await;
    assert!(c.status.and_then(|s| s.fencing_token).is_some());
    // A Pod that fails ends its hold.
    apply(
        ns,
        &gated_pod("third", "end-lock", "Never", "sleep 3600", "40"),
    );
    support::wait_for(&pods, "next", T, "Running", |p: &Pod| phase(p) == "Running").await;
    let (ok, _, err) =
        support::kubectl_run(&["exec", "-n", ns, "next", "--", "sh", "-c", ": > /tmp/fail"]);
    assert!(ok, "{err}");
    let done = wait_claim(&claims, "next", Phase::Released, T).await;
    let why = done
        .condition(leasekeeper::api::CONDITION_GRANTED)
        .map(|c| c.reason.clone());
    assert_eq!(why.as_deref(), Some("PodFinished"));
    wait_opened(&pods, "third", T).await;
    summary.push("- Pods: a restarting container kept its hold; deleting the holder and the holder failing each handed the lock on".into());
    support::kubectl_run(&["delete", "namespace", ns, "--wait=false"]);
}

/// The kubelet frozen (SIGSTOP): its heartbeat stops while the containers run on. The
/// hold ends the claim's duration after the last heartbeat the operator saw, the next
/// Pod is opened; then the kubelet is let go on.
pub async fn node_loss(client: &Client, kubelet_pid: i32, summary: &mut Vec<String>) {
    let ns = "pods-node-loss";
    support::create_namespace(client, ns, &[]).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), ns);
    apply(
        ns,
        &gated_pod("holder", "node-lock", "Never", "sleep 3600", "20"),
    );
    support::wait_for(&pods, "holder", T, "Running", |p: &Pod| {
        phase(p) == "Running"
    })
    .await;
    apply(
        ns,
        &gated_pod("standby", "node-lock", "Never", "sleep 3600", "20"),
    );
    wait_claim(&claims, "standby", Phase::Pending, T).await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "kube-node-lease");
    let node = pods
        .get("holder")
        .await
        .expect("pod")
        .spec
        .and_then(|s| s.node_name)
        .expect("scheduled");
    let renewed = |l: &k8s_openapi::api::coordination::v1::Lease| {
        l.spec.as_ref().and_then(|s| s.renew_time.clone())
    };
    let before = renewed(&leases.get(&node).await.expect("heartbeat"));
    // Freeze right after a heartbeat, so that the silence is measured from it.
    support::wait_for(
        &leases,
        &node,
        Duration::from_secs(30),
        "a fresh heartbeat",
        |l| renewed(l) != before,
    )
    .await;
    let frozen = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(kubelet_pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("stop kubelet");
    let lost = support::wait_phase(
        &claims,
        &claim_name("holder"),
        Phase::Expired,
        Duration::from_secs(90),
    )
    .await;
    let after = frozen.elapsed();
    let reason = lost
        .condition(leasekeeper::api::CONDITION_GRANTED)
        .map(|c| c.reason.clone());
    wait_opened(&pods, "standby", Duration::from_secs(30)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(kubelet_pid),
        nix::sys::signal::Signal::SIGCONT,
    )
    .expect("continue kubelet");
    assert_eq!(reason.as_deref(), Some("NodeLost"));
    assert!(
        after >= Duration::from_secs(19),
        "ended before the 20 s duration: {after:?}"
    );
    summary.push(format!(
        "- Pods: kubelet frozen (SIGSTOP) under a holder with a 20 s duration: NodeLost {:.1} s after the freeze, the standby opened (printed, not a benchmark)",
        after.as_secs_f64()
    ));
    support::kubectl_run(&["delete", "namespace", ns, "--wait=false"]);
}
