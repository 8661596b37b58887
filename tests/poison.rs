//! One object the operator cannot decode never stops it for anyone else. Objects are
//! put into that state through etcd directly, as an object written before a schema
//! bound existed would be (the API server now refuses such values at admission:
//! tests/tenant.rs). In a binary of its own: one test runs an operator over every
//! namespace.

use std::time::Duration;

use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use leasekeeper::api::{LockClaim, Phase};
use testkit as support;
use testkit::{create_claim, etcd, spec, wait_phase, Operator};

const T: Duration = Duration::from_secs(30);

/// Rewrites claim `ns/name` in etcd with `edit` applied to its JSON.
async fn poison(ns: &str, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> bool {
    let Some(addr) = etcd::etcd_addr() else {
        return false;
    };
    let key = etcd::object_key("leasekeeper.io", "lockclaims", ns, name);
    let raw = etcd::etcd_get(&addr, &key)
        .await
        .expect("the claim is in etcd");
    let mut v: serde_json::Value = serde_json::from_slice(&raw).expect("stored as JSON");
    edit(&mut v);
    etcd::etcd_put(&addr, &key, &serde_json::to_vec(&v).expect("json")).await;
    true
}

async fn raw_status(client: &Client, ns: &str, name: &str, field: &str) -> serde_json::Value {
    let (ok, out, err) = support::kubectl_run(&["get", "lockclaim", name, "-n", ns, "-o", "json"]);
    assert!(ok, "{err}");
    let _ = client;
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["status"][field].clone()
}

/// Waits for claim `ns/name` to reach `phase`, reading it raw (a typed watch would
/// itself fail on the undecodable objects this test makes).
async fn wait_raw_phase(ns: &str, name: &str, phase: &str) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (_, out, _) = support::kubectl_run(&[
            "get",
            "lockclaim",
            name,
            "-n",
            ns,
            "-o",
            "jsonpath={.status.phase}",
        ]);
        if out.trim() == phase {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{ns}/{name} is {out:?}, not {phase}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn invalid_gauge(metrics: &str) -> f64 {
    support::metric(metrics, "leasekeeper_invalid_objects{kind=\"LockClaim\"}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_01_undecodable_claims_stop_nothing_a_status_is_repaired_and_readiness_is_true() {
    let client = support::client().await;
    let ns_a = support::namespace(&client, "poison-a").await;
    let ns_b = support::namespace(&client, "poison-b").await;
    let claims_a: Api<LockClaim> = Api::namespaced(client.clone(), &ns_a);
    create_claim(&claims_a, "bad-status", spec("x")).await;
    create_claim(&claims_a, "bad-spec", spec("y")).await;
    let status_poisoned = poison(&ns_a, "bad-status", |v| {
        v["status"] = serde_json::json!({"phase": "Pending", "queuePosition": 3_000_000_000u64});
    })
    .await;
    if !status_poisoned {
        eprintln!("poison_01: not on the test plane's own etcd; nothing to test here");
        return;
    }
    poison(&ns_a, "bad-spec", |v| {
        v["spec"]["priority"] = serde_json::json!(3_000_000_000u64)
    })
    .await;
    assert_eq!(
        raw_status(&client, &ns_a, "bad-status", "queuePosition").await,
        serde_json::json!(3_000_000_000u64),
        "the API serves the poisoned object"
    );

    // A fresh replica with leader election, as the chart runs it, on that namespace: it
    // leads, syncs, is Ready, reconciles, and repairs the status it owns.
    let port = support::free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut op = support::spawn_operator(
        testkit::bin!("leasekeeper"),
        support::kubeconfig_path(),
        &format!("poison-{ns_a}"),
        &[
            "--leader-elect",
            "--watch-namespace",
            &ns_a,
            "--leader-namespace",
            &ns_a,
            "--metrics-addr",
            &metrics,
            "--identity",
            "poison-op",
        ],
    );
    // Repaired, then arbitrated like any claim.
    wait_raw_phase(&ns_a, "bad-status", "Granted").await;
    let text = support::scrape(&metrics, "/metrics").await;
    assert!(
        support::metric(&text, "leasekeeper_reconciles_total") >= 1.0,
        "{text}"
    );
    assert_eq!(support::scrape(&metrics, "/readyz").await, "ready");
    assert_eq!(
        invalid_gauge(&text),
        1.0,
        "the claim with the bad spec: {text}"
    );
    let evs = support::wait_event(&ns_a, "LockClaim", Some("bad-spec"), "InvalidObject").await;
    assert!(
        evs.iter()
            .any(|(_, n, r)| n == "bad-spec" && r == "InvalidObject"),
        "{evs:?}"
    );
    assert!(
        evs.iter()
            .any(|(_, n, r)| n == "bad-status" && r == "InvalidObject"),
        "{evs:?}"
    );
    let _ = op.kill();
    let _ = op.wait();

    // A fresh operator over every namespace syncs and grants elsewhere; a claim poisoned
    // while it runs is repaired again.
    let op = Operator::start_cluster_wide(&client).await;
    let claims_b: Api<LockClaim> = Api::namespaced(client.clone(), &ns_b);
    create_claim(&claims_b, "elsewhere", spec("z")).await;
    wait_phase(&claims_b, "elsewhere", Phase::Granted, T).await;
    poison(&ns_a, "bad-status", |v| {
        v["status"]["queuePosition"] = serde_json::json!(4_000_000_000u64)
    })
    .await;
    create_claim(&claims_b, "after", spec("w")).await;
    wait_phase(&claims_b, "after", Phase::Granted, T).await;
    let deadline = tokio::time::Instant::now() + T;
    while raw_status(&client, &ns_a, "bad-status", "queuePosition").await != serde_json::Value::Null
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "status not repaired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_raw_phase(&ns_a, "bad-status", "Granted").await;
    // bad-spec is still undecodable (and, on a plane kept across runs, earlier runs'
    // bad-spec claims in their namespaces); deleting it takes it off the gauge.
    let before = invalid_gauge(&op.metrics.encode());
    assert!(before >= 1.0, "bad-spec counted");
    claims_a
        .delete("bad-spec", &Default::default())
        .await
        .expect("delete");
    let deadline = tokio::time::Instant::now() + T;
    while invalid_gauge(&op.metrics.encode()) != before - 1.0 {
        assert!(tokio::time::Instant::now() < deadline, "gauge not cleared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_02_a_leader_whose_caches_cannot_sync_is_not_ready_and_steps_down() {
    use k8s_openapi::api::rbac::v1::{
        ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
    };
    let client = support::client().await;
    let ns = support::namespace(&client, "stepdown").await;
    let user = format!("no-claims-{ns}");
    let rule = |groups: &[&str], res: &[&str], verbs: &[&str]| PolicyRule {
        api_groups: Some(groups.iter().map(|s| s.to_string()).collect()),
        resources: Some(res.iter().map(|s| s.to_string()).collect()),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..PolicyRule::default()
    };
    let subject = vec![Subject {
        kind: "User".into(),
        name: user.clone(),
        api_group: Some("rbac.authorization.k8s.io".into()),
        ..Subject::default()
    }];
    let meta = |name: &str| ObjectMeta {
        name: Some(name.into()),
        ..ObjectMeta::default()
    };
    let pp = PostParams::default();
    // It may wait for the CRD and elect itself, but not list LockClaims.
    Api::<ClusterRole>::all(client.clone())
        .create(
            &pp,
            &ClusterRole {
                metadata: meta(&user),
                rules: Some(vec![rule(
                    &["apiextensions.k8s.io"],
                    &["customresourcedefinitions"],
                    &["get", "list", "watch"],
                )]),
                ..ClusterRole::default()
            },
        )
        .await
        .expect("cluster role");
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(
            &pp,
            &ClusterRoleBinding {
                metadata: meta(&user),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "ClusterRole".into(),
                    name: user.clone(),
                },
                subjects: Some(subject.clone()),
            },
        )
        .await
        .expect("cluster role binding");
    Api::<Role>::namespaced(client.clone(), &ns)
        .create(
            &pp,
            &Role {
                metadata: meta("elect"),
                rules: Some(vec![
                    rule(
                        &["coordination.k8s.io"],
                        &["leases"],
                        &["get", "list", "watch", "create", "update"],
                    ),
                    // The proof key's Secret, read (or made) as the leader starts.
                    rule(&[""], &["secrets"], &["get", "create"]),
                ]),
            },
        )
        .await
        .expect("role");
    Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .create(
            &pp,
            &RoleBinding {
                metadata: meta("elect"),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "Role".into(),
                    name: "elect".into(),
                },
                subjects: Some(subject),
            },
        )
        .await
        .expect("role binding");
    let kubeconfig = support::kubeconfig_as(&user);
    let metrics = format!("127.0.0.1:{}", support::free_port());
    let mut op = support::spawn_operator(
        testkit::bin!("leasekeeper"),
        &kubeconfig,
        &format!("stepdown-{ns}"),
        &[
            "--leader-elect",
            "--watch-namespace",
            &ns,
            "--leader-namespace",
            &ns,
            "--identity",
            "lonely",
            "--metrics-addr",
            &metrics,
            "--cache-sync-timeout",
            "4s",
        ],
    );
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &ns);
    let t0 = tokio::time::Instant::now();
    while !support::current_leader(&leases, "leasekeeper-leader")
        .await
        .is_some_and(|h| support::is_replica(&h, "lonely"))
    {
        assert!(t0.elapsed() < T, "never led");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A follower is Ready; the new leader turns not Ready as its term starts, a moment
    // after its Lease write (which is what the loop above saw), and stays so while its
    // caches cannot sync, until it steps down and exits.
    let t1 = tokio::time::Instant::now();
    while support::scrape(&metrics, "/readyz").await != "not ready" {
        assert!(
            t1.elapsed() < Duration::from_secs(2),
            "a leader with unsynced caches is not Ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_ne!(
            support::scrape(&metrics, "/readyz").await,
            "ready",
            "Ready again with unsynced caches"
        );
    }
    let status = tokio::task::spawn_blocking(move || op.wait())
        .await
        .expect("join")
        .expect("exit status");
    assert!(!status.success(), "it exits non-zero after stepping down");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "stepped down at the timeout: {:?}",
        t0.elapsed()
    );
    assert_eq!(
        support::current_leader(&leases, "leasekeeper-leader").await,
        None,
        "the leadership Lease was released"
    );
    let log = std::fs::read_to_string(support::root().join(format!("target/stepdown-{ns}.log")))
        .expect("log");
    assert!(
        log.contains("caches did not sync") && log.contains("stepping down"),
        "{log}"
    );
}
