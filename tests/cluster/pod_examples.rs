//! The other Pod examples, as a user applies them on the real node (images swapped for
//! the local ones): Jobs sharing a Lock of capacity 2, a CronJob that waits for another
//! team's Job, and a cold-standby Deployment through a rollout restart. Every "at most
//! N at once" comes from a Pod watch over the whole run.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, ResourceExt};
use leasekeeper::api::{slot_lease, POD_LEASE_ANNOTATION};
use testkit as support;
use tokio::time::Instant;

use super::pods::{apply, example, gated, phase, token, Overlap};

/// The Pods of `ns` matching `selector`, listed.
async fn list(client: &Client, ns: &str, selector: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = kube::api::ListParams::default().labels(selector);
    pods.list(&lp).await.map(|l| l.items).unwrap_or_default()
}

/// Waits until `n` Pods matching `selector` have Succeeded; returns them.
async fn succeeded(
    client: &Client,
    ns: &str,
    selector: &str,
    n: usize,
    limit: Duration,
) -> Vec<Pod> {
    let t0 = Instant::now();
    loop {
        let ok: Vec<Pod> = list(client, ns, selector)
            .await
            .into_iter()
            .filter(|p| phase(p) == "Succeeded")
            .collect();
        if ok.len() >= n {
            return ok;
        }
        assert!(
            t0.elapsed() < limit,
            "{n} Pods of {selector} did not succeed in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Each Pod printed the token (and the Lease, if asked) the operator gave it.
fn printed_own_token(ns: &str, pods: &[Pod], with_lease: bool) {
    for p in pods {
        let t = token(p).expect("a token in its annotations");
        let (ok, logs, err) = support::kubectl_run(&["logs", "-n", ns, &p.name_any()]);
        assert!(ok, "{err}");
        assert!(
            logs.contains(&format!("token {t}")),
            "{} printed {logs:?}, not {t}",
            p.name_any()
        );
        if with_lease {
            let lease = p
                .annotations()
                .get(POD_LEASE_ANNOTATION)
                .cloned()
                .unwrap_or_default();
            assert!(
                logs.contains(&lease),
                "{} printed {logs:?}, not its Lease {lease}",
                p.name_any()
            );
        }
    }
}

/// examples/pods-semaphore.yaml: two Jobs of three Pods each share a Lock of capacity 2.
pub async fn semaphore_jobs(client: &Client, summary: &mut Vec<String>) {
    let ns = "pods-semaphore";
    support::create_namespace(client, ns, &[]).await;
    let selector = "leasekeeper.io/lock=etl-pool";
    let overlap = Overlap::watch(client, ns, selector);
    let t0 = Instant::now();
    apply(ns, &example("pods-semaphore.yaml"));
    let done = succeeded(client, ns, selector, 6, Duration::from_secs(300)).await;
    assert!(
        overlap.most() <= 2,
        "{} Pods ran at once on a Lock of capacity 2",
        overlap.most()
    );
    printed_own_token(ns, &done, true);
    let slots: std::collections::BTreeSet<String> = done
        .iter()
        .filter_map(|p| p.annotations().get(POD_LEASE_ANNOTATION).cloned())
        .collect();
    let lock_slots: Vec<String> = (0..2).map(|i| slot_lease("etl-pool", i)).collect();
    assert!(
        slots.iter().all(|s| lock_slots.contains(s)),
        "each Pod held one of the Lock's slot Leases {lock_slots:?}: {slots:?}"
    );
    summary.push(format!(
        "- Pods on a Lock of capacity 2 (examples/pods-semaphore.yaml): two Jobs' 6 Pods, at most {} Running at once (from a watch), slot Leases {slots:?}, each printed its token and Lease; {:.1} s in all",
        overlap.most(),
        t0.elapsed().as_secs_f64()
    ));
    support::kubectl_run(&["delete", "namespace", ns, "--wait=false"]);
}

/// The terminated state of the Pod's only container: when it started and finished.
fn ran(p: &Pod) -> Option<(jiff::Timestamp, jiff::Timestamp)> {
    let s = p.status.as_ref()?.container_statuses.as_ref()?.first()?;
    let t = s.state.as_ref()?.terminated.as_ref()?;
    Some((t.started_at.as_ref()?.0, t.finished_at.as_ref()?.0))
}

/// examples/pods-cronjob.yaml, with the migration Job made to run 70 s so that the
/// CronJob's next run (every minute) comes while it holds: the run waits gated and
/// starts after the migration finished, with a higher token.
pub async fn cronjob_waits_for_the_migration(client: &Client, summary: &mut Vec<String>) {
    let ns = "pods-cronjob";
    support::create_namespace(client, ns, &[]).await;
    let selector = "leasekeeper.io/lock=reporting-db";
    let overlap = Overlap::watch(client, ns, selector);
    let yaml = example("pods-cronjob.yaml").replace(
        r#""migration with token $FENCING_TOKEN"; sleep 5"#,
        r#""migration with token $FENCING_TOKEN"; sleep 70"#,
    );
    assert!(
        yaml.contains("sleep 70"),
        "the example's migration command changed"
    );
    apply(ns, &yaml);
    let mut seen_gated = false;
    let t0 = Instant::now();
    let (migration, run) = loop {
        let pods = list(client, ns, selector).await;
        let cron: Vec<&Pod> = pods
            .iter()
            .filter(|p| p.name_any().starts_with("nightly-report-"))
            .collect();
        let mig = pods
            .iter()
            .find(|p| p.name_any().starts_with("schema-migration-"));
        if mig.is_some_and(|m| phase(m) == "Running") && cron.iter().any(|p| gated(p)) {
            seen_gated = true;
        }
        if let (Some(m), Some(c)) = (mig, cron.iter().find(|p| phase(p) == "Succeeded")) {
            if phase(m) == "Succeeded" {
                break (m.clone(), (*c).clone());
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "the migration and a report run did not both finish"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(overlap.most(), 1, "the report ran beside the migration");
    assert!(
        seen_gated,
        "the report run was never seen waiting behind the migration"
    );
    let (m_end, r_start) = (
        ran(&migration).expect("finished").1,
        ran(&run).expect("started").0,
    );
    assert!(
        r_start >= m_end,
        "the report started at {r_start} before the migration ended at {m_end}"
    );
    assert!(
        token(&run) > token(&migration),
        "tokens rise: {:?} then {:?}",
        token(&migration),
        token(&run)
    );
    printed_own_token(ns, &[migration, run], false);
    support::kubectl_run(&["delete", "cronjob", "nightly-report", "-n", ns]);
    summary.push(format!(
        "- A CronJob and another team's Job on one lock (examples/pods-cronjob.yaml, the migration made 70 s): the report run waited gated and started after the migration ended, at most {} Running at once",
        overlap.most()
    ));
    support::kubectl_run(&["delete", "namespace", ns, "--wait=false"]);
}

/// The one Running Pod of the Deployment and the one waiting gated, once it is so.
async fn one_active(client: &Client, ns: &str, not: &[String]) -> (Pod, Pod) {
    let t0 = Instant::now();
    loop {
        let pods: Vec<Pod> = list(client, ns, "app=singleton")
            .await
            .into_iter()
            .filter(|p| !not.contains(&p.name_any()))
            .collect();
        let running: Vec<&Pod> = pods.iter().filter(|p| phase(p) == "Running").collect();
        let waiting: Vec<&Pod> = pods.iter().filter(|p| gated(p)).collect();
        if let ([r], [w]) = (running.as_slice(), waiting.as_slice()) {
            return ((*r).clone(), (*w).clone());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "never one active and one waiting: {:?}",
            pods.iter()
                .map(|p| (p.name_any(), phase(p), gated(p)))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until Deployment `name` runs its current template only: every replica updated,
/// no Pod of an older template left.
async fn replaced(client: &Client, ns: &str, name: &str, limit: Duration) {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let t0 = Instant::now();
    loop {
        let d = deployments.get(name).await.ok();
        let want = d.as_ref().and_then(|d| d.spec.as_ref()?.replicas);
        let seen = d.as_ref().and_then(|d| d.metadata.generation);
        let st = d
            .as_ref()
            .and_then(|d| d.status.clone())
            .unwrap_or_default();
        if want.is_some()
            && st.observed_generation >= seen
            && st.updated_replicas == want
            && st.replicas == want
        {
            return;
        }
        assert!(
            t0.elapsed() < limit,
            "Deployment {name} still runs Pods of its old template after {limit:?}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// examples/pods-cold-standby.yaml: two replicas, one active; `kubectl rollout restart`
/// (maxSurge 0, maxUnavailable 100%) replaces both Pods and a new Pod becomes the active
/// one. `kubectl rollout status` never reports this rollout complete (the gated standby is
/// never available), so the test waits for what the Deployment does report: both Pods
/// of the new template, none of the old.
pub async fn cold_standby_rollout(client: &Client, summary: &mut Vec<String>) {
    let ns = "pods-standby";
    support::create_namespace(client, ns, &[]).await;
    let overlap = Overlap::watch(client, ns, "app=singleton");
    apply(ns, &example("pods-cold-standby.yaml"));
    let (active, standby) = one_active(client, ns, &[]).await;
    let before = token(&active).expect("token");
    let t0 = Instant::now();
    support::kubectl_run(&["rollout", "restart", "deployment/singleton", "-n", ns]);
    replaced(client, ns, "singleton", Duration::from_secs(180)).await;
    let took = t0.elapsed();
    let old = vec![active.name_any(), standby.name_any()];
    let (next, _) = one_active(client, ns, &old).await;
    let after = token(&next).expect("token");
    assert!(
        after > before,
        "the new active Pod's token {after} is not above {before}"
    );
    assert_eq!(overlap.most(), 1, "two replicas ran at once");
    summary.push(format!(
        "- Cold standby (examples/pods-cold-standby.yaml): one active, one gated; rollout restart replaced both Pods in {:.1} s, a new Pod active with token {after} > {before}; at most {} Running at once",
        took.as_secs_f64(),
        overlap.most()
    ));
    support::kubectl_run(&["delete", "namespace", ns, "--wait=false"]);
}
