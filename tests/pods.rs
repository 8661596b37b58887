//! Pods that hold locks from their template alone, on the API server: the test plays
//! the scheduler (a Binding) and the kubelet (Pod status, the node's heartbeat Lease),
//! so every rule is exercised without a node; `tests/cluster.rs` runs the examples on a
//! real one.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Binding, Container, Namespace, ObjectReference, Pod, PodSchedulingGate, PodSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use leasekeeper::api::{
    LockClaim, Phase, Renewal, CONDITION_GRANTED, FENCING_TOKEN_ANNOTATION,
    POD_DURATION_ANNOTATION, POD_GATE, POD_LEASE_ANNOTATION, POD_LOCK_LABEL,
    POD_PRIORITY_ANNOTATION,
};
use leasekeeper::arbiter::pods::claim_name;
use testkit as support;
use testkit::{wait_phase, Operator};

const T: Duration = Duration::from_secs(20);

/// A Pod asking for `lock` (label, gate unless `gated` is false), with annotations.
fn pod(name: &str, lock: &str, gated: bool, annotations: &[(&str, &str)]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                POD_LOCK_LABEL.to_string(),
                lock.to_string(),
            )])),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            scheduling_gates: gated.then(|| {
                vec![PodSchedulingGate {
                    name: POD_GATE.into(),
                }]
            }),
            containers: vec![Container {
                name: "work".into(),
                image: Some("localhost/none:never".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: None,
    }
}

async fn create(pods: &Api<Pod>, p: Pod) -> Pod {
    pods.create(&PostParams::default(), &p).await.expect("pod")
}

fn gated(p: &Pod) -> bool {
    p.spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.as_ref())
        .is_some_and(|g| g.iter().any(|g| g.name == POD_GATE))
}

fn annotation(p: &Pod, k: &str) -> Option<String> {
    p.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(k).cloned())
}

async fn wait_opened(pods: &Api<Pod>, name: &str) -> Pod {
    support::wait_for(pods, name, T, "opened", |p: &Pod| !gated(p)).await
}

/// The scheduler's part: bind the Pod to `node`.
async fn bind(client: &Client, ns: &str, name: &str, node: &str) {
    let b = Binding {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        target: ObjectReference {
            kind: Some("Node".into()),
            name: Some(node.into()),
            ..ObjectReference::default()
        },
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.create_subresource::<Binding, serde_json::Value>(
        "binding",
        name,
        &PostParams::default(),
        &b,
    )
    .await
    .expect("bind");
}

/// The kubelet's part: the Pod's phase.
async fn set_phase(pods: &Api<Pod>, name: &str, phase: &str) {
    let p = serde_json::json!({"status": {"phase": phase}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&p))
        .await
        .expect("pod status");
}

/// The kubelet's heartbeat: renews `kube-node-lease/<node>` now.
async fn heartbeat(client: &Client, node: &str) {
    let api: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let l = Lease {
        metadata: ObjectMeta {
            name: Some(node.into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(node.into()),
            lease_duration_seconds: Some(40),
            renew_time: Some(MicroTime(jiff::Timestamp::now())),
            ..LeaseSpec::default()
        }),
    };
    let pp = PatchParams::apply("fake-kubelet").force();
    let mut v = serde_json::to_value(&l).expect("json");
    v["apiVersion"] = "coordination.k8s.io/v1".into();
    v["kind"] = "Lease".into();
    api.patch(node, &pp, &Patch::Apply(v))
        .await
        .expect("heartbeat");
}

async fn node_lease_namespace(client: &Client) {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some("kube-node-lease".into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    let _ = Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await;
}

/// Waits for an Event with `reason` on Pod `name`.
async fn expect_event(ns: &str, name: &str, reason: &str) {
    let evs = support::wait_event(ns, "Pod", Some(name), reason).await;
    assert!(
        evs.iter()
            .any(|(k, n, r)| k == "Pod" && n == name && r == reason),
        "no {reason} Event on Pod {name}: {evs:?}"
    );
}

fn reason(c: &LockClaim) -> Option<String> {
    c.condition(CONDITION_GRANTED).map(|x| x.reason.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_01_gated_pods_take_turns_and_each_is_opened_with_a_higher_token() {
    let client = support::client().await;
    let ns = support::namespace(&client, "pods-turns").await;
    let _op = Operator::start(&client, &ns, Duration::from_secs(300)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    create(&pods, pod("backup-0", "nightly", true, &[])).await;
    let opened = wait_opened(&pods, "backup-0").await;
    let c0 = wait_phase(&claims, &claim_name("backup-0"), Phase::Granted, T).await;
    assert_eq!(c0.spec.renewal, Renewal::Pod);
    assert_eq!(c0.identity(), "backup-0");
    assert_eq!(
        c0.spec.lease_duration_seconds, 40,
        "a Pod claim's default duration"
    );
    let owner = c0.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(
        owner.first().map(|o| o.uid.as_str()),
        opened.metadata.uid.as_deref(),
        "owned by its Pod"
    );
    let t0 = c0
        .status
        .as_ref()
        .and_then(|s| s.fencing_token)
        .expect("token");
    assert_eq!(
        annotation(&opened, FENCING_TOKEN_ANNOTATION),
        Some(t0.to_string())
    );
    assert_eq!(
        annotation(&opened, POD_LEASE_ANNOTATION).as_deref(),
        Some("nightly")
    );

    // A second Pod waits gated, its claim queued behind the first.
    create(
        &pods,
        pod(
            "backup-1",
            "nightly",
            true,
            &[(POD_PRIORITY_ANNOTATION, "5")],
        ),
    )
    .await;
    let c1 = support::wait_for(
        &claims,
        &claim_name("backup-1"),
        T,
        "queued",
        |c: &LockClaim| c.status.as_ref().and_then(|s| s.queue_position) == Some(1),
    )
    .await;
    assert_eq!(c1.spec.priority, 5);
    assert!(gated(&pods.get("backup-1").await.expect("pod")));
    // The first one finishes: the second is opened with a higher token.
    set_phase(&pods, "backup-0", "Succeeded").await;
    let second = wait_opened(&pods, "backup-1").await;
    let t1: i64 = annotation(&second, FENCING_TOKEN_ANNOTATION)
        .expect("token")
        .parse()
        .expect("int");
    assert!(t1 > t0, "tokens rise: {t0} then {t1}");
    let done = wait_phase(&claims, &claim_name("backup-0"), Phase::Released, T).await;
    assert_eq!(reason(&done).as_deref(), Some("PodFinished"));
    // The claims' Events are on the Pods too.
    expect_event(&ns, "backup-0", "Granted").await;
    expect_event(&ns, "backup-1", "Granted").await;
    expect_event(&ns, "backup-1", "PodOpened").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_02_a_node_that_stops_heartbeating_loses_the_hold_and_deletion_alone_does_not() {
    let client = support::client().await;
    node_lease_namespace(&client).await;
    let ns = support::namespace(&client, "pods-node").await;
    let _op = Operator::start(&client, &ns, Duration::from_secs(300)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    let node = format!("node-{ns}");
    // Six seconds of silence end the hold (the kubelet's default renews every 10 s;
    // here the test's kubelet renews every second).
    let short = [(POD_DURATION_ANNOTATION, "6")];
    create(&pods, pod("a", "db", true, &short)).await;
    wait_opened(&pods, "a").await;
    create(&pods, pod("b", "db", true, &short)).await;
    bind(&client, &ns, "a", &node).await;
    set_phase(&pods, "a", "Running").await;
    for _ in 0..10 {
        heartbeat(&client, &node).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let a = claims.get(&claim_name("a")).await.expect("claim");
    assert_eq!(
        a.phase(),
        Some(Phase::Granted),
        "10 s of heartbeats, a 6 s duration: still held"
    );
    // Deleting the Pod alone ends nothing: its containers run through their grace
    // (there is no kubelet here to finish it: it stays Terminating).
    pods.delete("a", &DeleteParams::default())
        .await
        .expect("delete");
    // The silence is timed from the last heartbeat's answer: the operator cannot have
    // seen that renewal land after it.
    let mut silent = std::time::Instant::now();
    for _ in 0..8 {
        heartbeat(&client, &node).await;
        silent = std::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let a = claims.get(&claim_name("a")).await.expect("claim");
    assert_eq!(
        a.phase(),
        Some(Phase::Granted),
        "a deletionTimestamp ends no hold"
    );
    // The node goes silent: the hold ends 6 s after the last heartbeat, the next Pod
    // is opened.
    let a = wait_phase(&claims, &claim_name("a"), Phase::Expired, T).await;
    assert_eq!(reason(&a).as_deref(), Some("NodeLost"));
    // At least the 6 s duration, less the last heartbeat's answer time (1 s allowed).
    assert!(
        silent.elapsed() >= Duration::from_secs(5),
        "not before the duration: {:?} after the last heartbeat",
        silent.elapsed()
    );
    wait_opened(&pods, "b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_03_pods_that_ask_badly_are_told_and_stop_nothing_else() {
    let client = support::client().await;
    let ns = support::namespace(&client, "pods-bad").await;
    let _op = Operator::start(&client, &ns, Duration::from_secs(300)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    create(&pods, pod("no-gate", "nightly", false, &[])).await;
    create(&pods, pod("bad-lock", "Nightly_Backup", true, &[])).await;
    create(&pods, pod("slot-name", "nightly-slot-2", true, &[])).await;
    create(
        &pods,
        pod(
            "bad-priority",
            "nightly",
            true,
            &[(POD_PRIORITY_ANNOTATION, "urgent")],
        ),
    )
    .await;
    create(&pods, pod("good", "nightly", true, &[])).await;
    wait_opened(&pods, "good").await;
    for name in ["no-gate", "bad-lock", "slot-name", "bad-priority"] {
        expect_event(&ns, name, "PodNotHeld").await;
        assert!(
            claims
                .get_opt(&claim_name(name))
                .await
                .expect("read")
                .is_none(),
            "{name} got a claim"
        );
    }
    for name in ["bad-lock", "slot-name", "bad-priority"] {
        assert!(
            gated(&pods.get(name).await.expect("pod")),
            "{name} stays gated"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_04_a_pod_is_held_to_the_rules_of_any_claim_in_its_namespace() {
    // A user who may create Pods but not LockClaims gains nothing else: the claim is
    // made in the Pod's namespace and a Lease leasekeeper did not create stays out of
    // reach.
    let client = support::client().await;
    let ns = support::namespace(&client, "pods-tenant").await;
    let _op = Operator::start(&client, &ns, Duration::from_secs(300)).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let foreign = Lease {
        metadata: ObjectMeta {
            name: Some("app-leader".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("app-0".into()),
            lease_duration_seconds: Some(3600),
            renew_time: Some(MicroTime(jiff::Timestamp::now())),
            ..LeaseSpec::default()
        }),
    };
    leases
        .create(&PostParams::default(), &foreign)
        .await
        .expect("foreign lease");
    let before =
        serde_json::to_string(&leases.get("app-leader").await.expect("lease")).expect("json");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    create(&pods, pod("grab", "app-leader", true, &[])).await;
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    support::wait_for(
        &claims,
        &claim_name("grab"),
        T,
        "LeaseNotManaged",
        |c: &LockClaim| reason(c).as_deref() == Some("LeaseNotManaged"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        gated(&pods.get("grab").await.expect("pod")),
        "the Pod stays gated"
    );
    let after =
        serde_json::to_string(&leases.get("app-leader").await.expect("lease")).expect("json");
    assert_eq!(before, after, "the foreign Lease was not written");
}

/// The kubelet's part: the Pod Running and Ready at `ip`.
async fn run_at(pods: &Api<Pod>, name: &str, ip: &str) {
    let p = serde_json::json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&p))
        .await
        .expect("pod status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_05_a_service_routes_to_the_holder_alone_and_switches_in_one_write() {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let client = support::client().await;
    let ns = support::namespace(&client, "pods-route").await;
    let _op = Operator::start(&client, &ns, Duration::from_secs(300)).await;
    let svc = Service {
        metadata: ObjectMeta {
            name: Some("web".into()),
            annotations: Some(BTreeMap::from([(
                leasekeeper::api::ROUTE_ANNOTATION.to_string(),
                "web-leader".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080),
                ),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    Api::<Service>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &svc)
        .await
        .expect("service");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    // Every address list the slice ever had, from a watch over the whole test.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<String>>::new()));
    let watch = {
        let (slices, seen) = (slices.clone(), seen.clone());
        tokio::spawn(async move {
            let cfg =
                kube::runtime::watcher::Config::default().fields("metadata.name=web-leasekeeper");
            let mut s = kube::runtime::watcher(slices, cfg).boxed();
            while let Some(Ok(ev)) = s.next().await {
                if let kube::runtime::watcher::Event::Apply(sl)
                | kube::runtime::watcher::Event::InitApply(sl) = ev
                {
                    let addrs = sl
                        .endpoints
                        .iter()
                        .flat_map(|e| e.addresses.clone())
                        .collect();
                    seen.lock().expect("seen").push(addrs);
                }
            }
        })
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let addresses = |ip: &'static str| {
        move |s: &EndpointSlice| {
            s.endpoints
                .iter()
                .flat_map(|e| e.addresses.clone())
                .collect::<Vec<_>>()
                == [ip]
        }
    };
    create(&pods, pod("web-0", "web-leader", true, &[])).await;
    create(&pods, pod("web-1", "web-leader", true, &[])).await;
    wait_opened(&pods, "web-0").await;
    run_at(&pods, "web-0", "10.244.9.10").await;
    let s = support::wait_for(
        &slices,
        "web-leasekeeper",
        T,
        "the holder listed",
        addresses("10.244.9.10"),
    )
    .await;
    let labels = s.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("kubernetes.io/service-name").map(String::as_str),
        Some("web")
    );
    assert_eq!(s.ports.as_ref().and_then(|p| p[0].port), Some(8080));
    // The holder ends; the other Pod is granted, opened, gets its address: the slice
    // switches to it, never listing both.
    set_phase(&pods, "web-0", "Succeeded").await;
    wait_opened(&pods, "web-1").await;
    run_at(&pods, "web-1", "10.244.9.11").await;
    support::wait_for(
        &slices,
        "web-leasekeeper",
        T,
        "the new holder listed",
        addresses("10.244.9.11"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    watch.abort();
    let seen = seen.lock().expect("seen").clone();
    assert!(
        seen.iter().all(|a| a.len() <= 1),
        "the slice listed two Pods: {seen:?}"
    );
    // The annotation removed: the slice goes.
    let p = serde_json::json!({"metadata": {"annotations": {leasekeeper::api::ROUTE_ANNOTATION: null}}});
    Api::<Service>::namespaced(client.clone(), &ns)
        .patch("web", &PatchParams::default(), &Patch::Merge(&p))
        .await
        .expect("unannotate");
    support::wait_gone(&slices, "web-leasekeeper", T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_06_the_charts_admission_policy_refuses_a_gate_without_a_label_or_a_bad_lock_name() {
    // The chart's policy as `helm template` renders it, bound to this test's namespace
    // only (the plane is shared with other tests).
    let client = support::client().await;
    let ns = support::namespace(&client, "pods-policy").await;
    let (ok, out, err) = support::helm(&[
        "template",
        "lk",
        &support::root().join("charts/leasekeeper").to_string_lossy(),
    ]);
    assert!(ok, "{err}");
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&out).expect("yaml");
    let mut policy = docs
        .iter()
        .find(|d| {
            d["kind"] == "ValidatingAdmissionPolicy"
                && d["metadata"]["name"] == "lk-leasekeeper-pod-gate"
        })
        .cloned()
        .expect(
            "the chart's pod gate policy (pods.enabled and pods.admissionPolicy are on by default)",
        );
    let name = format!("pod-gate-{ns}");
    policy["metadata"]["name"] = name.clone().into();
    let binding = serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}},
        },
    });
    for doc in [policy, binding] {
        support::kubectl_stdin(&["apply", "-f", "-"], &doc.to_string());
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    // Until the API server enforces it, then each bad Pod is refused with its reason.
    let mut gate_only = pod("gate-only", "x", true, &[]);
    gate_only.metadata.labels = None;
    let t0 = std::time::Instant::now();
    let refused = loop {
        match pods.create(&PostParams::default(), &gate_only).await {
            Err(kube::Error::Api(s)) => break s.message,
            Ok(_) => {
                pods.delete("gate-only", &DeleteParams::default())
                    .await
                    .expect("delete");
            }
            Err(e) => panic!("{e}"),
        }
        assert!(t0.elapsed() < T, "the policy never took effect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        refused.contains("carries the scheduling gate leasekeeper.io/lock but not the label"),
        "{refused}"
    );
    let e = pods
        .create(
            &PostParams::default(),
            &pod("bad", "backup-slot-3", true, &[]),
        )
        .await
        .expect_err("a slot Lease's name is refused");
    assert!(e.to_string().contains("cannot name a lock"), "{e}");
    create(&pods, pod("fine", "backup", true, &[])).await;
    create(&pods, pod("ungated", "backup", false, &[])).await;
    for kind in [
        "ValidatingAdmissionPolicyBinding",
        "ValidatingAdmissionPolicy",
    ] {
        support::kubectl_run(&["delete", kind, &name]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_07_pods_without_the_label_never_reach_the_operator() {
    use leasekeeper::telemetry::KindLabel;
    let client = support::client().await;
    let ns = support::namespace(&client, "pods-unlabelled").await;
    let op = Operator::start(&client, &ns, Duration::from_secs(300)).await;
    let pod_events = || {
        op.metrics
            .watch_events
            .get_or_create(&KindLabel { kind: "Pod".into() })
            .get()
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut plain = pod("plain-0", "unused", true, &[]);
    plain.metadata.labels = Some(BTreeMap::from([("app".to_string(), "web".to_string())]));
    plain.spec.as_mut().expect("spec").scheduling_gates = None;
    let before = pod_events();
    for i in 0..20 {
        plain.metadata.name = Some(format!("plain-{i}"));
        create(&pods, plain.clone()).await;
    }
    for i in 0..20 {
        let touch = serde_json::json!({"metadata": {"annotations": {"touched": "yes"}}});
        pods.patch(
            &format!("plain-{i}"),
            &PatchParams::default(),
            &Patch::Merge(&touch),
        )
        .await
        .expect("touch");
    }
    // A labelled Pod created after them is seen: the watch was live meanwhile.
    create(&pods, pod("asks", "nightly", true, &[])).await;
    wait_opened(&pods, "asks").await;
    let after = pod_events();
    assert!(after > before, "the labelled Pod was not counted");
    assert!(
        after - before <= 3,
        "40 writes to unlabelled Pods reached the operator: {} Pod events",
        after - before
    );
}
