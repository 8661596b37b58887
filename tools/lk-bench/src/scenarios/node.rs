//! Scenarios 8 and 9, on a real node (`make bench-node`: kubelet, containerd, the
//! operator installed with Helm): what a Pod's handoff and a route's switch cost, every
//! time taken by this process when its watch delivers the change.
//!
//! 8. Pods on a lock: the holder deleted (force, grace 0) -> the next Pod's gate removed
//!    -> it Running; the floor beside it, interleaved: an ungated Pod created -> Running.
//!    Two more rows say where a handoff's extra time goes: an ungated Pod created while
//!    another Pod is force-deleted (the kubelet tears one down as it starts the other, as
//!    in a handoff), and a Pod whose foreign gate this process removes (the scheduler's
//!    gate path, nothing of ours and no teardown).
//!
//!    The kubelet reports a started container at its next relist of the runtime (once a
//!    second), so "Running" comes on a 1 s clock. Every measured action waits a random
//!    0-1 s first ([`off_phase`]): with fixed waits the loop locks onto that clock and
//!    a row's time says how its fixed waits fall against it (the run of commit 8a08bbc,
//!    bench/results/node-2026-12-04-fixed-phase.md, shows 1.0 s against 1.5 s rows,
//!    a foreign gate included).
//! 9. A route to the holder (examples/active-passive.yaml): the holder Pod deleted ->
//!    the slice without it -> the next holder Granted -> the slice naming it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use leasekeeper::api::{LockClaim, Phase, POD_GATE};
use tokio::time::Instant;

use crate::measure::{stats, Report};
use crate::Bench;

/// When this process saw each change of each object (by name).
type Seen = Arc<Mutex<BTreeMap<String, Vec<(Instant, String)>>>>;

/// Notes, for every Pod of `ns`, when it was first seen opened (gate gone) and Running.
fn watch_pods(client: &Client, ns: &str) -> (Seen, tokio::task::JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let task = tokio::spawn({
        let seen = seen.clone();
        async move {
            let mut s = watcher(pods, watcher::Config::default()).boxed();
            while let Some(Ok(ev)) = s.next().await {
                if let watcher::Event::Apply(p) | watcher::Event::InitApply(p) = ev {
                    let now = Instant::now();
                    let gated = p
                        .spec
                        .as_ref()
                        .and_then(|s| s.scheduling_gates.as_ref())
                        .is_some_and(|g| g.iter().any(|g| g.name == POD_GATE));
                    let running =
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                    let mut m = seen.lock().expect("seen");
                    let e = m.entry(p.name_any()).or_default();
                    for (what, yes) in [("open", !gated), ("running", running)] {
                        if yes && !e.iter().any(|(_, w)| w == what) {
                            e.push((now, what.to_string()));
                        }
                    }
                }
            }
        }
    });
    (seen, task)
}

async fn when(seen: &Seen, name: &str, what: &str, limit: Duration) -> Option<Instant> {
    let t0 = Instant::now();
    loop {
        if let Some(t) = seen
            .lock()
            .expect("seen")
            .get(name)
            .and_then(|e| e.iter().find(|(_, w)| w == what).map(|(t, _)| *t))
        {
            return Some(t);
        }
        if t0.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A gate that is not ours: scenario 8 removes it by hand.
const MANUAL_GATE: &str = "bench.leasekeeper.io/manual";

fn pod(name: &str, lock: Option<&str>) -> Pod {
    let mut p = pod_with_gate(name, lock.map(|_| POD_GATE));
    if let Some(l) = lock {
        p.metadata.labels = Some(BTreeMap::from([(
            leasekeeper::api::POD_LOCK_LABEL.to_string(),
            l.to_string(),
        )]));
    }
    p
}

fn pod_with_gate(name: &str, gate: Option<&str>) -> Pod {
    use k8s_openapi::api::core::v1::{Container, PodSchedulingGate, PodSpec};
    Pod {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            termination_grace_period_seconds: Some(0),
            restart_policy: Some("Never".into()),
            scheduling_gates: gate.map(|g| vec![PodSchedulingGate { name: g.into() }]),
            containers: vec![Container {
                name: "c".into(),
                image: Some("localhost/lk-tools:dev".into()),
                image_pull_policy: Some("Never".into()),
                command: Some(vec!["sleep".into(), "3600".into()]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

/// Waits a random 0-1 s, so that a measured action falls anywhere against the kubelet's
/// once-a-second relist.
async fn off_phase() {
    let ms = rand::random_range(0..1000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

async fn force_delete(pods: &Api<Pod>, name: &str) {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    let _ = pods.delete(name, &dp).await;
}

/// Creates an ungated Pod as `victim` (running) is force-deleted: created -> Running.
async fn floor_beside_deletion(
    pods: &Api<Pod>,
    seen: &Seen,
    name: &str,
    victim: &str,
) -> Option<Duration> {
    let (fresh, pp) = (pod(name, None), PostParams::default());
    off_phase().await;
    let t0 = Instant::now();
    let (created, ()) = tokio::join!(pods.create(&pp, &fresh), force_delete(pods, victim));
    created.ok()?;
    let t = when(seen, name, "running", Duration::from_secs(60)).await;
    force_delete(pods, name).await;
    Some(t? - t0)
}

/// A Pod held by a gate that is not ours, the gate removed by this process once the Pod
/// is seen: gate removed -> Running.
async fn manual_gate(pods: &Api<Pod>, seen: &Seen, name: &str) -> Option<Duration> {
    use kube::api::{Patch, PatchParams};
    pods.create(
        &PostParams::default(),
        &pod_with_gate(name, Some(MANUAL_GATE)),
    )
    .await
    .ok()?;
    while !seen.lock().expect("seen").contains_key(name) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let the scheduler file it as gated first, as it has a lock-gated Pod.
    tokio::time::sleep(Duration::from_millis(500)).await;
    off_phase().await;
    let t0 = Instant::now();
    let open = serde_json::json!({"spec": {"schedulingGates": null}});
    pods.patch(name, &PatchParams::default(), &Patch::Merge(&open))
        .await
        .ok()?;
    let t = when(seen, name, "running", Duration::from_secs(60)).await;
    force_delete(pods, name).await;
    Some(t? - t0)
}

/// 8: Pod handoffs against the floor.
pub async fn pods(b: &Bench, r: &mut Report) {
    let ns = "bench-pods";
    testkit::create_namespace(&b.client, ns, &[]).await;
    let pods: Api<Pod> = Api::namespaced(b.client.clone(), ns);
    let (seen, task) = watch_pods(&b.client, ns);
    let lock = "bench-pod-lock";
    let limit = Duration::from_secs(60);
    let (mut gate, mut run, mut start, mut floor) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut beside, mut manual) = (Vec::new(), Vec::new());
    pods.create(&PostParams::default(), &pod("p0", Some(lock)))
        .await
        .expect("p0");
    when(&seen, "p0", "running", limit)
        .await
        .expect("the first Pod runs");
    let n = b.n.min(60).max(if b.args.smoke { 3 } else { 50 });
    for i in 1..=n {
        let next = format!("p{i}");
        pods.create(&PostParams::default(), &pod(&next, Some(lock)))
            .await
            .expect("next");
        // Let the next Pod's claim queue behind the holder before the holder goes.
        tokio::time::sleep(Duration::from_millis(500)).await;
        off_phase().await;
        let t0 = Instant::now();
        force_delete(&pods, &format!("p{}", i - 1)).await;
        let opened = when(&seen, &next, "open", limit).await;
        let running = when(&seen, &next, "running", limit).await;
        if let Some(t) = opened {
            gate.push(t - t0);
        }
        if let Some(t) = running {
            run.push(t - t0);
        }
        if let (Some(o), Some(t)) = (opened, running) {
            start.push(t.saturating_duration_since(o));
        }
        // The floor, interleaved: an ungated Pod created -> Running.
        let f = format!("floor{i}");
        off_phase().await;
        let t0 = Instant::now();
        pods.create(&PostParams::default(), &pod(&f, None))
            .await
            .expect("floor pod");
        if let Some(t) = when(&seen, &f, "running", limit).await {
            floor.push(t - t0);
        }
        let beside_name = format!("beside{i}");
        beside.extend(floor_beside_deletion(&pods, &seen, &beside_name, &f).await);
        manual.extend(manual_gate(&pods, &seen, &format!("manual{i}")).await);
    }
    task.abort();
    let (g, rn, st, fl) = (stats(gate), stats(run), stats(start), stats(floor));
    let (bs, mn) = (stats(beside), stats(manual));
    r.add("## 8. Pods holding a lock by a scheduling gate (real node)");
    r.add(String::new());
    r.add("The holder Pod force-deleted; the next Pod, gated on the same lock, is granted, opened (gate removed, token written) and started; the floor, interleaved, is an ungated Pod created -> Running on the same node. Times as this process's watch saw them.");
    r.add(String::new());
    r.header();
    r.row("holder deleted -> next Pod's gate removed", &g);
    r.row("holder deleted -> next Pod Running", &rn);
    r.row(
        "next Pod's gate removed -> Running (scheduler and kubelet)",
        &st,
    );
    r.row("floor: ungated Pod created -> Running", &fl);
    r.row(
        "ungated Pod created as another is force-deleted -> Running",
        &bs,
    );
    r.row(
        "a foreign gate removed by hand -> Running (no lock, no deletion)",
        &mn,
    );
    r.add(String::new());
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    r.add(format!(
        "A handoff to a gated Pod costs p50 {:+.0} ms, p99 {:+.0} ms over the floor (target: at most +50 ms at p99).",
        ms(rn.p50) - ms(fl.p50),
        ms(rn.p99) - ms(fl.p99)
    ));
    r.add(format!(
        "Of that, the operator's part (holder deleted -> gate removed) is p50 {:.1} ms, p99 {:.1} ms; from the gate's removal to Running takes p50 {:+.0} ms over the floor.",
        ms(g.p50),
        ms(g.p99),
        ms(st.p50) - ms(fl.p50)
    ));
    r.add(format!(
        "Where that goes: creating an ungated Pod while another is force-deleted takes p50 {:+.0} ms, p99 {:+.0} ms over the floor (the kubelet tearing one Pod down as it starts the other); a gate removed by hand, with no deletion, p50 {:+.0} ms, p99 {:+.0} ms.",
        ms(bs.p50) - ms(fl.p50),
        ms(bs.p99) - ms(fl.p99),
        ms(mn.p50) - ms(fl.p50),
        ms(mn.p99) - ms(fl.p99)
    ));
    r.add(String::new());
}

/// 9: route switches of examples/active-passive.yaml.
pub async fn routes(b: &Bench, r: &mut Report) {
    let ns = "bench-route";
    testkit::create_namespace(&b.client, ns, &[]).await;
    let manifest = std::fs::read_to_string(testkit::root().join("examples/active-passive.yaml"))
        .expect("example")
        .replace(
            "ghcr.io/leasekeeper/leasekeeper:0.1.0",
            "localhost/leasekeeper:dev",
        )
        .replace("busybox:1.36", "localhost/lk-tools:dev");
    testkit::kubectl_stdin(&["apply", "-n", ns, "-f", "-"], &manifest);
    let slices: Api<EndpointSlice> = Api::namespaced(b.client.clone(), ns);
    let claims: Api<LockClaim> = Api::namespaced(b.client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(b.client.clone(), ns);
    let listed = |s: &EndpointSlice| -> Vec<String> {
        s.endpoints
            .iter()
            .filter_map(|e| e.target_ref.as_ref()?.name.clone())
            .collect()
    };
    let n = if b.args.smoke { 3 } else { 20 };
    let (mut gap, mut after_grant) = (Vec::new(), Vec::new());
    for _ in 0..n {
        // Both replicas Ready, one listed.
        let holder = loop {
            let s = slices.get_opt("web-leasekeeper").await.ok().flatten();
            let ready = pods
                .list(&Default::default())
                .await
                .map(|l| {
                    l.items
                        .iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_none() && ready(p))
                        .count()
                })
                .unwrap_or(0);
            if let Some(h) = s.map(|s| listed(&s)).filter(|l| l.len() == 1 && ready == 2) {
                break h[0].clone();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let (t_empty, t_next, t_grant) = switch(&slices, &claims, &pods, &holder).await;
        if let (Some(e), Some(x)) = (t_empty, t_next) {
            gap.push(x.saturating_duration_since(e));
        }
        if let (Some(g), Some(x)) = (t_grant, t_next) {
            after_grant.push(x.saturating_duration_since(g));
        }
    }
    let (g, a) = (stats(gap), stats(after_grant));
    r.add("## 9. Traffic to the holder: route switches (real node, examples/active-passive.yaml)");
    r.add(String::new());
    r.add("The holder Pod deleted (graceful: its sidecar releases on SIGTERM); times as this process's watches saw them.");
    r.add(String::new());
    r.header();
    r.row("no Pod listed (old one removed -> new one listed)", &g);
    r.row("new holder Granted -> listed (target: under 100 ms)", &a);
    r.add(String::new());
}

/// Deletes `holder` and watches the slice and the claims until another Pod is listed:
/// (holder removed from the slice, next listed, next Granted), as seen.
async fn switch(
    slices: &Api<EndpointSlice>,
    claims: &Api<LockClaim>,
    pods: &Api<Pod>,
    holder: &str,
) -> (Option<Instant>, Option<Instant>, Option<Instant>) {
    let granted: Arc<Mutex<Option<Instant>>> = Arc::default();
    let before: std::collections::BTreeSet<String> = claims
        .list(&Default::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|c| c.phase() == Some(Phase::Granted))
                .filter_map(|c| c.metadata.name.clone())
                .collect()
        })
        .unwrap_or_default();
    let claim_watch = tokio::spawn({
        let (claims, granted) = (claims.clone(), granted.clone());
        async move {
            let mut s = watcher(claims, watcher::Config::default()).boxed();
            while let Some(Ok(ev)) = s.next().await {
                if let watcher::Event::Apply(c) = ev {
                    if c.phase() == Some(Phase::Granted) && !before.contains(&c.name_any()) {
                        granted.lock().expect("g").get_or_insert(Instant::now());
                    }
                }
            }
        }
    });
    let mut s = watcher(
        slices.clone(),
        watcher::Config::default().fields("metadata.name=web-leasekeeper"),
    )
    .boxed();
    let _ = pods.delete(holder, &DeleteParams::default()).await;
    let (mut empty, mut next) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while next.is_none() && Instant::now() < deadline {
        let Ok(Some(Ok(ev))) = tokio::time::timeout(Duration::from_secs(5), s.next()).await else {
            continue;
        };
        if let watcher::Event::Apply(sl) = ev {
            let names: Vec<String> = sl
                .endpoints
                .iter()
                .filter_map(|e| e.target_ref.as_ref()?.name.clone())
                .collect();
            if !names.contains(&holder.to_string()) && empty.is_none() {
                empty = Some(Instant::now());
            }
            if names.iter().any(|n| n != holder) {
                next = Some(Instant::now());
            }
        }
    }
    claim_watch.abort();
    let g = *granted.lock().expect("g");
    (empty, next, g)
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
