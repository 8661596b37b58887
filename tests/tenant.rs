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
use testkit::{create_claim, spec, wait_phase, History, Operator, Renewer};

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
    let _op = Operator::start(&admin, &ns, GC).await;
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
    let before = snapshot(&admin, &ns, "app-leader").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        snapshot(&admin, &ns, "app-leader").await,
        before,
        "the foreign Lease was written"
    );
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
    let _op = Operator::start(&admin, &ns, GC).await;
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
    let before = snapshot(&admin, &ns, "app-leader").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        snapshot(&admin, &ns, "app-leader").await,
        before,
        "the foreign Lease was taken"
    );
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
        &[(leasekeeper::TAKEOVER_LABEL, leasekeeper::TAKEOVER_ALLOWED)],
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
    let _op = Operator::start(&admin, &ns, GC).await;
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
    let _op = Operator::start(&admin, &ns, GC).await;
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
    let op = Operator::start(&admin, &ns, GC).await;
    let lease_events = || {
        op.metrics
            .watch_events
            .get_or_create(&leasekeeper::telemetry::KindLabel {
                kind: "Lease".into(),
            })
            .get()
    };
    let claims: Api<LockClaim> = Api::namespaced(tenant.clone(), &ns);
    create_claim(&claims, "grab", spec("app-leader")).await;
    support::wait_for(&claims, "grab", T, "LeaseNotManaged", |c: &LockClaim| {
        reason(c).as_deref() == Some("LeaseNotManaged")
    })
    .await;
    let before = lease_events();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // About 60 writes to the two foreign Leases meanwhile; none reached the operator.
    assert_eq!(
        lease_events(),
        before,
        "a foreign Lease's write was watched"
    );
    assert_eq!(before, 0, "the operator watched a foreign Lease");
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
