//! Tenant safety, end to end: every test acts as a user bound only to a Role that allows
//! get, list, watch, create, delete and patch on lockclaims in its namespace (reached by
//! impersonation), against an operator holding Lease write everywhere. A claim must never
//! make the operator do to a Lease what its creator could not do.

use std::time::Duration;

use jiff::SignedDuration;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use leasekeeper::api::{LockClaim, Phase, Renewal, CONDITION_GRANTED};
use testkit as support;
use testkit::{create_claim, spec, wait_phase, ChartOperator, History, Renewer};

const T: Duration = Duration::from_secs(20);
const GC: Duration = Duration::from_secs(300);

/// A namespace where `user` may only handle LockClaims; returns (admin, tenant, ns).
async fn setup(prefix: &str, user: &str) -> (Client, Client, String) {
    let admin = support::client().await;
    let ns = support::namespace(&admin, prefix).await;
    support::make_tenant(&admin, &ns, user).await;
    (admin, support::client_as(user).await, ns)
}

/// A Lease someone else created (no leasekeeper label), held by `holder`.
async fn foreign_lease(
    admin: &Client,
    ns: &str,
    name: &str,
    holder: &str,
    labels: &[(&str, &str)],
) {
    let now = jiff::Timestamp::now();
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(2),
            renew_time: Some(MicroTime(now)),
            acquire_time: Some(MicroTime(now)),
            lease_transitions: Some(4),
            ..LeaseSpec::default()
        }),
    };
    Api::<Lease>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &lease)
        .await
        .expect("foreign Lease");
}

/// Waits out two more decisions of the operator on a claim for an unwatched Lease: it
/// re-reads such a Lease 5 s after learning it, then 10 s after that (doubling), so
/// 16 s hold both re-reads, each a reconcile. Checks that reconciles did run.
async fn two_decisions(op: &ChartOperator) {
    let before = op.metric("leasekeeper_reconciles_total").await;
    tokio::time::sleep(Duration::from_secs(16)).await;
    let after = op.metric("leasekeeper_reconciles_total").await;
    assert!(
        after - before >= 2.0,
        "only {} reconciles in 16 s",
        after - before
    );
}

fn reason(c: &LockClaim) -> Option<String> {
    c.condition(CONDITION_GRANTED).map(|x| x.reason.clone())
}

/// The Lease exactly as stored (every byte the API returns).
async fn snapshot(admin: &Client, ns: &str, name: &str) -> String {
    let l = Api::<Lease>::namespaced(admin.clone(), ns)
        .get(name)
        .await
        .expect("lease");
    serde_json::to_string(&l).expect("json")
}

/// Lease `name` stays byte for byte as it is now through two decisions of `op`;
/// returns it as it stayed.
async fn stays_unwritten(
    admin: &Client,
    ns: &str,
    name: &str,
    op: &ChartOperator,
    what: &str,
) -> String {
    let before = snapshot(admin, ns, name).await;
    two_decisions(op).await;
    assert_eq!(snapshot(admin, ns, name).await, before, "{what}");
    before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_01_the_tenant_cannot_write_leases_itself() {
    let (_admin, tenant, ns) = setup("tenant-rbac", "team-a-dev").await;
    let leases: Api<Lease> = Api::namespaced(tenant.clone(), &ns);
    let err = leases
        .create(
            &PostParams::default(),
            &Lease {
                metadata: ObjectMeta {
                    name: Some("mine".into()),
                    ..ObjectMeta::default()
                },
                spec: None,
            },
        )
        .await
        .expect_err("a tenant may not create Leases");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 403),
        "{err}"
    );
    let claims: Api<LockClaim> = Api::namespaced(tenant, &ns);
    create_claim(&claims, "allowed", spec("x")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_02_a_claim_cannot_adopt_a_foreign_lease_by_its_holder_identity() {
    let (admin, tenant, ns) = setup("tenant-adopt", "team-a-dev").await;
    foreign_lease(&admin, &ns, "app-leader", "app-0_abc", &[]).await;
    let renewer = Renewer::start(
        &admin,
        &ns,
        "app-leader",
        "app-0_abc",
        Duration::from_millis(700),
        SignedDuration::ZERO,
    );
    let history = History::record(&admin, &ns).await;
    let _op = ChartOperator::start(testkit::bin!("leasekeeper"), &admin, &ns, GC).await;
    let claims: Api<LockClaim> = Api::namespaced(tenant.clone(), &ns);
    let mut s = spec("app-leader");
    s.holder_identity = Some("app-0_abc".into());
    s.lease_duration_seconds = 1;
    create_claim(&claims, "adopt", s).await;
    let c = support::wait_for(&claims, "adopt", T, "LeaseNotManaged", |c: &LockClaim| {
        reason(c).as_deref() == Some("LeaseNotManaged")
    })
    .await;
    assert_eq!(c.phase(), Some(Phase::Pending));
    let msg = c
        .condition(CONDITION_GRANTED)
        .map(|x| x.message.clone())
        .unwrap_or_default();
    assert!(
        msg.contains("app-leader") && msg.contains("leasekeeper.io/takeover=allowed"),
        "the message names the Lease and the label: {msg}"
    );
    let evs = support::wait_event(&ns, "LockClaim", Some("adopt"), "LeaseNotManaged").await;
    assert!(
        evs.iter()
            .any(|(_, n, r)| n == "adopt" && r == "LeaseNotManaged"),
        "{evs:?}"
    );
    // The real holder stops renewing: the operator must not renew on the claim's behalf.
    renewer.stop();
    let before = stays_unwritten(
        &admin,
        &ns,
        "app-leader",
        &_op,
        "the foreign Lease was written",
    )
    .await;
    claims
        .delete("adopt", &Default::default())
        .await
        .expect("delete");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        snapshot(&admin, &ns, "app-leader").await,
        before,
        "deleting the claim wrote the Lease"
    );
    assert!(!history.ever("adopt", Phase::Granted));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_03_a_claim_cannot_take_over_a_foreign_lease_without_its_owners_label() {
    let (admin, tenant, ns) = setup("tenant-grab", "team-a-dev").await;
    foreign_lease(&admin, &ns, "app-leader", "app-0_abc", &[]).await;
    let renewer = Renewer::start(
        &admin,
        &ns,
        "app-leader",
        "app-0_abc",
        Duration::from_millis(700),
        SignedDuration::ZERO,
    );
    let _op = ChartOperator::start(testkit::bin!("leasekeeper"), &admin, &ns, GC).await;
    let claims: Api<LockClaim> = Api::namespaced(tenant.clone(), &ns);
    let mut s = spec("app-leader");
    s.lease_duration_seconds = 86_400;
    create_claim(&claims, "grab", s).await;
    support::wait_for(&claims, "grab", T, "LeaseNotManaged", |c: &LockClaim| {
        reason(c).as_deref() == Some("LeaseNotManaged")
    })
    .await;
    // The holder pauses well past its 2 s duration.
    renewer.stop();
    stays_unwritten(
        &admin,
        &ns,
        "app-leader",
        &_op,
        "the foreign Lease was taken",
    )
    .await;
    let c = claims.get("grab").await.expect("claim");
    assert_eq!(c.phase(), Some(Phase::Pending));
    assert_eq!(reason(&c).as_deref(), Some("LeaseNotManaged"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_04_with_the_owners_takeover_label_a_lease_is_respected_then_taken_over() {
    let (admin, tenant, ns) = setup("tenant-takeover", "team-a-dev").await;
    foreign_lease(
        &admin,
        &ns,
        "app-leader",
        "app-0_abc",
        &[(
            leasekeeper::api::TAKEOVER_LABEL,
            leasekeeper::api::TAKEOVER_ALLOWED,
        )],
    )
    .await;
    let renewer = Renewer::start(
        &admin,
        &ns,
        "app-leader",
        "app-0_abc",
        Duration::from_millis(700),
        SignedDuration::ZERO,
    );
    let history = History::record(&admin, &ns).await;
    let _op = ChartOperator::start(testkit::bin!("leasekeeper"), &admin, &ns, GC).await;
    let claims: Api<LockClaim> = Api::namespaced(tenant.clone(), &ns);
    create_claim(&claims, "next", spec("app-leader")).await;
    support::wait_for(&claims, "next", T, "HeldExternally", |c: &LockClaim| {
        reason(c).as_deref() == Some("HeldExternally")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !history.ever("next", Phase::Granted),
        "taken while the owner renewed"
    );
    renewer.stop();
    wait_phase(&claims, "next", Phase::Granted, T).await;
    let l = Api::<Lease>::namespaced(admin.clone(), &ns)
        .get("app-leader")
        .await
        .expect("lease");
    let s = l.spec.expect("spec");
    assert_eq!(s.holder_identity.as_deref(), Some("next"));
    assert_eq!(s.lease_transitions, Some(5));
    let evs = support::wait_event(&ns, "LockClaim", Some("next"), "TakenOver").await;
    assert!(
        evs.iter().any(|(_, n, r)| n == "next" && r == "TakenOver"),
        "{evs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_05_expiry_and_max_hold_follow_the_claim_not_fields_the_holder_edits() {
    let (admin, tenant, ns) = setup("tenant-expiry", "team-a-dev").await;
    let _op = ChartOperator::start(testkit::bin!("leasekeeper"), &admin, &ns, GC).await;
    let claims: Api<LockClaim> = Api::namespaced(tenant.clone(), &ns);
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &ns);
    // A Holder claim of 2 s whose holder stretches the Lease's own duration to a day and
    // then stops renewing.
    let mut s = spec("stretch");
    s.renewal = Renewal::Holder;
    s.lease_duration_seconds = 2;
    create_claim(&claims, "stretch", s).await;
    wait_phase(&claims, "stretch", Phase::Granted, T).await;
    let far = jiff::Timestamp::now() + SignedDuration::from_hours(24);
    let patch = serde_json::json!({"spec": {"leaseDurationSeconds": 86_400, "acquireTime": MicroTime(far)}});
    leases
        .patch("stretch", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("holder edits its Lease");
    let c = wait_phase(&claims, "stretch", Phase::Expired, Duration::from_secs(10)).await;
    assert_eq!(reason(&c).as_deref(), Some("Expired"));
    // maxHoldSeconds: the holder renews on time and rewrites the Lease's acquireTime to
    // now with every renewal; the hold still ends when the claim says.
    let mut s = spec("capped");
    s.renewal = Renewal::Holder;
    s.lease_duration_seconds = 3;
    s.max_hold_seconds = Some(3);
    create_claim(&claims, "capped", s).await;
    wait_phase(&claims, "capped", Phase::Granted, T).await;
    let l2 = leases.clone();
    let rewriter = tokio::spawn(async move {
        loop {
            let now = MicroTime(jiff::Timestamp::now());
            let patch = serde_json::json!({"spec": {"acquireTime": now, "renewTime": now}});
            let _ = l2
                .patch("capped", &PatchParams::default(), &Patch::Merge(patch))
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let c = wait_phase(&claims, "capped", Phase::Expired, Duration::from_secs(10)).await;
    rewriter.abort();
    assert_eq!(reason(&c).as_deref(), Some("MaxHoldExceeded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_06_out_of_range_status_integers_are_refused_at_admission_naming_the_field() {
    let admin = support::client().await;
    let ns = support::namespace(&admin, "tenant-bounds").await;
    let claims: Api<LockClaim> = Api::namespaced(admin.clone(), &ns);
    create_claim(&claims, "x", spec("x")).await;
    for (field, value) in [
        ("queuePosition", serde_json::json!(3_000_000_000u64)),
        ("queuePosition", serde_json::json!(0)),
        ("fencingToken", serde_json::json!(-1)),
        ("observedGeneration", serde_json::json!(-5)),
    ] {
        let patch = serde_json::json!({"status": {field: value}});
        let err = claims
            .patch_status("x", &PatchParams::default(), &Patch::Merge(patch))
            .await
            .expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains(&format!("status.{field}")),
            "{field}={value}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_07_a_foreign_leases_writes_never_reach_the_operator_and_its_claim_rechecks() {
    let (admin, tenant, ns) = setup("tenant-unwatched", "team-a-dev").await;
    foreign_lease(&admin, &ns, "app-leader", "app-0_abc", &[]).await;
    foreign_lease(&admin, &ns, "node-1", "node-1", &[]).await;
    let renewers = [("app-leader", "app-0_abc"), ("node-1", "node-1")].map(|(l, h)| {
        Renewer::start(
            &admin,
            &ns,
            l,
            h,
            Duration::from_millis(100),
            SignedDuration::ZERO,
        )
    });
    let op = ChartOperator::start(testkit::bin!("leasekeeper"), &admin, &ns, GC).await;
    let lease_events = || op.metric("leasekeeper_watch_events_total{kind=\"Lease\"}");
    let claims: Api<LockClaim> = Api::namespaced(tenant.clone(), &ns);
    create_claim(&claims, "grab", spec("app-leader")).await;
    support::wait_for(&claims, "grab", T, "LeaseNotManaged", |c: &LockClaim| {
        reason(c).as_deref() == Some("LeaseNotManaged")
    })
    .await;
    let before = lease_events().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // About 60 writes to the two foreign Leases meanwhile; none reached the operator.
    assert_eq!(
        lease_events().await,
        before,
        "a foreign Lease's write was watched"
    );
    assert_eq!(before, 0.0, "the operator watched a foreign Lease");
    for r in &renewers {
        r.stop();
    }
    Api::<Lease>::namespaced(admin.clone(), &ns)
        .delete("app-leader", &Default::default())
        .await
        .expect("delete the foreign Lease");
    // The refused create is re-read with backoff (5 s, then doubling): the claim learns
    // that the Lease is gone without any watch event for it.
    wait_phase(&claims, "grab", Phase::Granted, Duration::from_secs(70)).await;
    let l = Api::<Lease>::namespaced(admin.clone(), &ns)
        .get("app-leader")
        .await
        .expect("lease");
    assert!(leasekeeper::arbiter::is_managed(&l), "{l:?}");
}

/// A user who may get and update Leases in `ns`, but not delete them.
async fn lease_editor(admin: &Client, ns: &str, user: &str) -> Client {
    use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
    let pp = PostParams::default();
    let role = Role {
        metadata: ObjectMeta {
            name: Some("lease-editor".into()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["coordination.k8s.io".into()]),
            resources: Some(vec!["leases".into()]),
            verbs: ["get", "list", "watch", "update", "patch"]
                .map(String::from)
                .to_vec(),
            ..PolicyRule::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&pp, &role)
        .await
        .expect("role");
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some(format!("lease-editor-{user}")),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "lease-editor".into(),
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            name: user.into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            ..Subject::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&pp, &binding)
        .await
        .expect("binding");
    support::client_as(user).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_08_a_lease_labelled_as_leasekeepers_by_someone_who_cannot_delete_it_is_never_collected(
) {
    let (admin, tenant, ns) = setup("tenant-forged-gc", "team-a-dev").await;
    let editor = lease_editor(&admin, &ns, "lease-editor").await;
    let gc = Duration::from_secs(2);
    let op = ChartOperator::start(testkit::bin!("leasekeeper"), &admin, &ns, gc).await;
    let admin_leases: Api<Lease> = Api::namespaced(admin.clone(), &ns);
    let edit_leases: Api<Lease> = Api::namespaced(editor.clone(), &ns);
    let err = edit_leases
        .delete("anything", &Default::default())
        .await
        .expect_err("the editor may not delete Leases");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 403),
        "{err}"
    );

    // A Lease the operator creates (and stamps with its proof), then no longer needs.
    let claims: Api<LockClaim> = Api::namespaced(tenant.clone(), &ns);
    create_claim(&claims, "ours", spec("ours")).await;
    wait_phase(&claims, "ours", Phase::Granted, T).await;
    let proof = admin_leases
        .get("ours")
        .await
        .expect("our Lease")
        .metadata
        .annotations
        .and_then(|a| a.get(leasekeeper::api::ORIGIN_ANNOTATION).cloned())
        .expect("the operator stamps its proof of creation on a Lease it creates");

    // Someone else's unheld Lease; the editor labels it as leasekeeper's and copies the
    // proof of another Lease onto it: neither makes it the operator's.
    foreign_lease(&admin, &ns, "theirs", "someone", &[]).await;
    let forged = serde_json::json!({"metadata": {
        "labels": {leasekeeper::api::MANAGED_BY_LABEL: leasekeeper::api::MANAGED_BY_VALUE},
        "annotations": {leasekeeper::api::ORIGIN_ANNOTATION: proof},
    }, "spec": {"holderIdentity": null}});
    edit_leases
        .patch("theirs", &PatchParams::default(), &Patch::Merge(&forged))
        .await
        .expect("the editor may label and annotate the Lease");

    // The operator collects its own unused Lease after the grace: the GC runs here.
    claims
        .delete("ours", &Default::default())
        .await
        .expect("delete claim");
    support::wait_gone(&admin_leases, "ours", Duration::from_secs(30)).await;
    // The forged Lease was seen (watched: it carries the label) when labelled; a GC
    // deciding on the label would have deleted it one grace (2 s) later. Wait three
    // graces, touch it (another decision, past the grace), and wait three more.
    tokio::time::sleep(3 * gc).await;
    let touch = serde_json::json!({"metadata": {"annotations": {"touched": "yes"}}});
    edit_leases
        .patch("theirs", &PatchParams::default(), &Patch::Merge(&touch))
        .await
        .expect("touch");
    tokio::time::sleep(3 * gc).await;
    assert!(
        admin_leases
            .get_opt("theirs")
            .await
            .expect("read")
            .is_some(),
        "the operator deleted a Lease it did not create, on a forged label and proof"
    );
    let collected = op.metric("leasekeeper_gc_deleted_total").await;
    assert_eq!(
        collected, 1.0,
        "only the operator's own Lease was collected"
    );
    drop(op);
}

/// Puts claim `name` into etcd as a copy of `template`'s stored object with
/// `spec.leaseName` set to `lease`: a claim made before the CRD refused such names.
async fn legacy_claim(ns: &str, template: &str, name: &str, lease: &str) {
    let addr = support::etcd::etcd_addr().expect("the test plane's etcd");
    let from = support::etcd::object_key("leasekeeper.io", "lockclaims", ns, template);
    let raw = support::etcd::etcd_get(&addr, &from).await.expect("stored");
    let mut v: serde_json::Value = serde_json::from_slice(&raw).expect("json");
    v["metadata"]["name"] = name.into();
    v["metadata"]["uid"] = format!("legacy-{name}").into();
    v["spec"]["leaseName"] = lease.into();
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    v["status"] = serde_json::Value::Null;
    let to = support::etcd::object_key("leasekeeper.io", "lockclaims", ns, name);
    support::etcd::etcd_put(&addr, &to, &serde_json::to_vec(&v).expect("json")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_09_a_legacy_claim_on_a_slot_leases_name_never_shares_it_with_the_lock() {
    // A claim whose leaseName is `pool-slot-1` (refused by the CRD today, but one made
    // before that rule may exist) names the Lease that is also slot 1 of lock `pool`.
    // Two keys must never arbitrate one Lease: the claim is rejected, the Lease stays
    // the lock's.
    let (admin, tenant, ns) = setup("tenant-slot-name", "team-a-dev").await;
    let _op = ChartOperator::start(testkit::bin!("leasekeeper"), &admin, &ns, GC).await;
    let history = History::record(&admin, &ns).await;
    support::create_lock(&admin, &ns, "pool", 2).await;
    let claims: Api<LockClaim> = Api::namespaced(tenant.clone(), &ns);
    create_claim(&claims, "template", spec("elsewhere")).await;
    wait_phase(&claims, "template", Phase::Granted, T).await;
    legacy_claim(&ns, "template", "legacy", "pool-slot-1").await;
    for n in ["d1", "d2", "d3"] {
        create_claim(&claims, n, spec("pool")).await;
    }
    let legacy = support::wait_for(&claims, "legacy", T, "an answer", |c: &LockClaim| {
        c.phase().is_some_and(|p| p != Phase::Pending)
    })
    .await;
    assert_eq!(legacy.phase(), Some(Phase::Rejected), "{:?}", legacy.status);
    assert_eq!(reason(&legacy).as_deref(), Some("ReservedLeaseName"));
    // The lock's two slots go to its claims, whatever the legacy claim does; let the
    // holders change a few times (each release hands a slot on).
    wait_phase(&claims, "d1", Phase::Granted, T).await;
    wait_phase(&claims, "d2", Phase::Granted, T).await;
    let release = serde_json::json!({"spec": {"release": true}});
    claims
        .patch("d1", &PatchParams::default(), &Patch::Merge(&release))
        .await
        .expect("release d1");
    wait_phase(&claims, "d3", Phase::Granted, T).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Never two Granted claims on one Lease, by the Lease each holds (slot Leases too).
    let mut latest: std::collections::BTreeMap<String, LockClaim> = Default::default();
    for (_, c) in history.states() {
        latest.insert(c.metadata.name.clone().unwrap_or_default(), c);
        let mut per_lease: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for g in latest
            .values()
            .filter(|c| c.phase() == Some(Phase::Granted))
        {
            let held = g
                .status
                .as_ref()
                .and_then(|s| s.lease.clone())
                .unwrap_or(g.spec.lease_name.clone());
            per_lease
                .entry(held)
                .or_default()
                .push(g.metadata.name.clone().unwrap_or_default());
        }
        for (lease, holders) in per_lease {
            assert!(
                holders.len() <= 1,
                "{holders:?} Granted at once on Lease {lease}"
            );
        }
    }
    let l = Api::<Lease>::namespaced(admin.clone(), &ns)
        .get("pool-slot-1")
        .await
        .expect("slot 1");
    let named = l
        .metadata
        .annotations
        .unwrap_or_default()
        .get(leasekeeper::api::CLAIM_ANNOTATION)
        .cloned();
    assert_ne!(
        named.as_deref(),
        Some("legacy"),
        "the legacy claim never holds the slot Lease"
    );
}

/// A tenant (`user`) claims `lease` in `ns` (an operator watches it with the chart's
/// rights): the claim waits with reason `LeaseNotManaged`. Returns the tenant's claims.
async fn claim_not_managed(ns: &str, lease: &str, user: &str) -> Api<LockClaim> {
    let claims: Api<LockClaim> = Api::namespaced(support::client_as(user).await, ns);
    let claim = format!("grab-{lease}");
    let mut s = spec(lease);
    s.lease_duration_seconds = 86_400;
    create_claim(&claims, &claim, s).await;
    let c = support::wait_for(&claims, &claim, T, "LeaseNotManaged", |c: &LockClaim| {
        reason(c).as_deref() == Some("LeaseNotManaged")
    })
    .await;
    assert_eq!(c.phase(), Some(Phase::Pending), "{ns}/{lease}");
    claims
}

/// A foreign Lease in a system namespace, renewed by its holder, claimed by a tenant:
/// once the holder stops renewing, through two more decisions, the Lease stays byte for
/// byte as it was (never written, taken or collected; GC grace 2 s).
async fn system_lease_never_touched(
    admin: &Client,
    ns: &str,
    lease: &str,
    holder: &str,
    user: &str,
) {
    support::make_tenant(admin, ns, user).await;
    foreign_lease(admin, ns, lease, holder, &[]).await;
    let period = Duration::from_millis(700);
    let renewer = Renewer::start(admin, ns, lease, holder, period, SignedDuration::ZERO);
    let op = ChartOperator::start(
        testkit::bin!("leasekeeper"),
        admin,
        ns,
        Duration::from_secs(2),
    )
    .await;
    let claims = claim_not_managed(ns, lease, user).await;
    renewer.stop();
    stays_unwritten(admin, ns, lease, &op, &format!("{ns}/{lease} was written")).await;
    let claim = format!("grab-{lease}");
    let c = claims.get(&claim).await.expect("claim");
    assert_eq!(
        reason(&c).as_deref(),
        Some("LeaseNotManaged"),
        "{ns}/{lease}"
    );
    let _ = claims.delete(&claim, &Default::default()).await;
    let _ = Api::<Lease>::namespaced(admin.clone(), ns)
        .delete(lease, &Default::default())
        .await;
}

/// The operator's own leadership Lease, claimed by a tenant in the namespace the
/// operator runs in and watches (as a cluster-wide install does): the claim waits, and
/// through two decisions the Lease stays the operator's (same holder, no claim named,
/// no transition) and the operator stays leader.
async fn own_leadership_never_claimed(admin: &Client, user: &str) {
    let ns = support::namespace(admin, "tenant-own-leader").await;
    support::make_tenant(admin, &ns, user).await;
    let op = ChartOperator::start_leading(
        testkit::bin!("leasekeeper"),
        admin,
        &ns,
        Duration::from_secs(2),
    )
    .await;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &ns);
    let state = |l: Lease| {
        let s = l.spec.unwrap_or_default();
        let named = l
            .metadata
            .annotations
            .unwrap_or_default()
            .remove(leasekeeper::api::CLAIM_ANNOTATION);
        (s.holder_identity, s.lease_transitions, named)
    };
    let before = state(
        leases
            .get("leasekeeper-leader")
            .await
            .expect("leader Lease"),
    );
    let me = before.0.clone().unwrap_or_default();
    assert!(me.starts_with(&format!("chart-sa-{ns}")), "leader is {me}");
    let _claims = claim_not_managed(&ns, "leasekeeper-leader", user).await;
    two_decisions(&op).await;
    let after = state(
        leases
            .get("leasekeeper-leader")
            .await
            .expect("leader Lease"),
    );
    assert_eq!(
        after, before,
        "the leadership Lease changed hands or was annotated"
    );
    assert_eq!(
        op.metric("leasekeeper_leader").await,
        1.0,
        "the operator stopped leading"
    );
}

/// The Leases docs/security.md names as never the operator's, where they really live: a
/// node's heartbeat Lease in kube-node-lease, a controller's leader Lease in kube-system
/// (each namespace watched by an operator with the chart's rights there, a tenant
/// allowed LockClaims there), and the operator's own `leasekeeper-leader`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenant_10_node_heartbeats_controller_leader_leases_and_its_own_leadership_stay_untouched()
{
    let admin = support::client().await;
    let id = format!("{:08x}", support::rand_u32());
    let user = format!("tenant-10-{id}");
    let (node, controller) = (format!("node-{id}"), format!("controller-{id}"));
    let holder = format!("controller-0_{id}");
    tokio::join!(
        system_lease_never_touched(&admin, "kube-node-lease", &node, &node, &user),
        system_lease_never_touched(&admin, "kube-system", &controller, &holder, &user),
        own_leadership_never_claimed(&admin, &user),
    );
}

/// Someone else's Lease at a slot name (`pool-slot-1`, created before the Lock `pool` of
/// capacity 2): that slot is never the operator's. The Lease stays byte for byte through
/// its holder stopping and two more decisions (GC grace 2 s), and slot 0 (the Lease
/// named like the lock) alone serves the lock's claims, one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_11_a_foreign_lease_at_a_slot_name_is_never_taken_and_the_other_slot_serves() {
    let (admin, tenant, ns) = setup("tenant-slot-foreign", "team-a-dev").await;
    foreign_lease(&admin, &ns, "pool-slot-1", "other-app-0", &[]).await;
    let period = Duration::from_millis(700);
    let renewer = Renewer::start(
        &admin,
        &ns,
        "pool-slot-1",
        "other-app-0",
        period,
        SignedDuration::ZERO,
    );
    let history = History::record(&admin, &ns).await;
    let op = ChartOperator::start(
        testkit::bin!("leasekeeper"),
        &admin,
        &ns,
        Duration::from_secs(2),
    )
    .await;
    support::create_lock(&admin, &ns, "pool", 2).await;
    let claims: Api<LockClaim> = Api::namespaced(tenant.clone(), &ns);
    for n in ["a", "b", "c"] {
        create_claim(&claims, n, spec("pool")).await;
    }
    let a = wait_phase(&claims, "a", Phase::Granted, T).await;
    assert_eq!(a.status.and_then(|s| s.lease).as_deref(), Some("pool"));
    renewer.stop();
    let before = stays_unwritten(
        &admin,
        &ns,
        "pool-slot-1",
        &op,
        "the foreign slot Lease was written",
    )
    .await;
    for n in ["b", "c"] {
        let c = claims.get(n).await.expect("claim");
        assert_eq!(
            c.phase(),
            Some(Phase::Pending),
            "{n} was granted beside a while slot 1 is someone else's"
        );
    }
    claims
        .delete("a", &Default::default())
        .await
        .expect("release a");
    let b = wait_phase(&claims, "b", Phase::Granted, T).await;
    assert_eq!(b.status.and_then(|s| s.lease).as_deref(), Some("pool"));
    assert_eq!(
        snapshot(&admin, &ns, "pool-slot-1").await,
        before,
        "the foreign slot Lease was written"
    );
    let most = history
        .granted_states()
        .iter()
        .map(|(_, g)| g.len())
        .max()
        .unwrap_or(0);
    assert_eq!(
        most, 1,
        "more than one claim held the lock while one slot is foreign"
    );
}
