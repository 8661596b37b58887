//! End-to-end tests of the controller on a real kube-apiserver + etcd. Each test has
//! its own namespace and its own in-process operator watching only that namespace.

use testkit as support;

use std::time::Duration;

use jiff::SignedDuration;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::Api;
use leasekeeper::api::{LockClaim, Phase, Renewal, CONDITION_GRANTED};
use support::{create_claim, spec, wait_phase, History, Operator, Renewer};
use tokio::time::Instant;

const T: Duration = Duration::from_secs(20);
const GC: Duration = Duration::from_secs(300);

fn token(c: &LockClaim) -> i64 {
    c.status
        .as_ref()
        .and_then(|s| s.fencing_token)
        .expect("fencing token")
}

fn holder_of(l: &Lease) -> Option<String> {
    l.spec.as_ref().and_then(|s| s.holder_identity.clone())
}

fn transitions(l: &Lease) -> i32 {
    l.spec
        .as_ref()
        .and_then(|s| s.lease_transitions)
        .unwrap_or_default()
}

async fn release(api: &Api<LockClaim>, name: &str) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"release": true}})),
    )
    .await
    .expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_01_claim_on_absent_lease_is_granted_and_kubectl_wait_returns() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-grant").await;
    let _op = Operator::start(&client, &ns, GC).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    let t0 = Instant::now();
    create_claim(&api, "first", spec("orders-db")).await;
    let (ok, out, err) = support::kubectl_run(&[
        "wait",
        "-n",
        &ns,
        "--for=condition=Granted",
        "--timeout=20s",
        "lockclaim/first",
    ]);
    assert!(ok, "kubectl wait failed: {out} {err}");
    println!(
        "e2e_01: claim created -> kubectl wait returned in {:?}",
        t0.elapsed()
    );
    let c = api.get("first").await.expect("claim");
    assert_eq!(c.phase(), Some(Phase::Granted));
    let l = support::lease(&client, &ns, "orders-db")
        .await
        .expect("Lease created");
    let s = l.spec.clone().expect("spec");
    assert_eq!(s.holder_identity.as_deref(), Some("first"));
    assert!(s.acquire_time.is_some() && s.renew_time.is_some());
    assert_eq!(s.lease_duration_seconds, Some(15));
    assert_eq!(
        l.metadata
            .labels
            .as_ref()
            .and_then(|m| m.get("app.kubernetes.io/managed-by"))
            .map(String::as_str),
        Some("leasekeeper")
    );
    let lease_rv: i64 = l
        .metadata
        .resource_version
        .expect("rv")
        .parse()
        .expect("integer rv");
    assert!(token(&c) > 0 && token(&c) <= lease_rv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_02_waiting_claims_queue_by_priority_then_age() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-queue").await;
    let _op = Operator::start(&client, &ns, GC).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    create_claim(&api, "holder", spec("gpu")).await;
    wait_phase(&api, "holder", Phase::Granted, T).await;
    create_claim(&api, "early", spec("gpu")).await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // creationTimestamp has 1 s precision
    create_claim(&api, "late", spec("gpu")).await;
    let mut urgent = spec("gpu");
    urgent.priority = 10;
    create_claim(&api, "urgent", urgent).await;
    for (name, pos) in [("urgent", 1), ("early", 2), ("late", 3)] {
        let c = support::wait_for(
            &api,
            name,
            T,
            &format!("position {pos}"),
            |c: &LockClaim| c.status.as_ref().and_then(|s| s.queue_position) == Some(pos),
        )
        .await;
        let st = c.status.expect("status");
        assert_eq!(st.phase, Some(Phase::Pending));
        assert_eq!(st.holder_identity.as_deref(), Some("holder"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_03_release_by_delete_and_by_release_true_hands_over_with_one_granted_at_a_time() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-release").await;
    let history = History::record(&client, &ns).await;
    let _op = Operator::start(&client, &ns, GC).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    for n in ["a", "b", "c"] {
        create_claim(&api, n, spec("db")).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let a = wait_phase(&api, "a", Phase::Granted, T).await;
    support::wait_for(&api, "c", T, "queued", |c: &LockClaim| {
        c.status.as_ref().and_then(|s| s.queue_position) == Some(2)
    })
    .await;
    let before = support::lease(&client, &ns, "db").await.expect("lease");

    // Release by delete.
    let t0 = Instant::now();
    api.delete("a", &DeleteParams::default())
        .await
        .expect("delete");
    let b = wait_phase(&api, "b", Phase::Granted, T).await;
    println!("e2e_03: delete -> next Granted in {:?}", t0.elapsed());
    support::wait_gone(&api, "a", T).await;
    let after_b = support::lease(&client, &ns, "db").await.expect("lease");
    assert_eq!(holder_of(&after_b).as_deref(), Some("b"));
    assert_eq!(transitions(&after_b), transitions(&before) + 1);
    assert!(token(&b) > token(&a));

    // Release by `release: true`.
    let t0 = Instant::now();
    release(&api, "b").await;
    let c = wait_phase(&api, "c", Phase::Granted, T).await;
    println!("e2e_03: release:true -> next Granted in {:?}", t0.elapsed());
    assert_eq!(
        api.get("b").await.expect("b").phase(),
        Some(Phase::Released)
    );
    let after_c = support::lease(&client, &ns, "db").await.expect("lease");
    assert_eq!(transitions(&after_c), transitions(&before) + 2);
    assert!(token(&c) > token(&b));
    let checked = history.assert_never_two_granted();
    assert!(checked >= 9, "the watch recorded {checked} states");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_04_holder_renewal_keeps_the_grant_and_expiry_follows_silence_plus_lock_delay() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-holder").await;
    let history = History::record(&client, &ns).await;
    let _op = Operator::start(&client, &ns, GC).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    let mut s = spec("job");
    s.renewal = Renewal::Holder;
    s.lease_duration_seconds = 3;
    s.lock_delay_seconds = 2;
    create_claim(&api, "worker", s.clone()).await;
    wait_phase(&api, "worker", Phase::Granted, T).await;
    let mut next = spec("job");
    next.renewal = Renewal::Holder;
    next.lease_duration_seconds = 3;
    create_claim(&api, "next", next).await;
    let renewer = Renewer::start(
        &client,
        &ns,
        "job",
        "worker",
        Duration::from_secs(1),
        SignedDuration::ZERO,
    );
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        api.get("worker").await.expect("worker").phase(),
        Some(Phase::Granted),
        "renewed for 8 s > 3 s"
    );
    renewer.stop();
    let stopped = Instant::now();
    wait_phase(&api, "worker", Phase::Expired, T).await;
    let expired_at = history
        .first("worker", Phase::Expired)
        .await
        .expect("seen Expired");
    wait_phase(&api, "next", Phase::Granted, T).await;
    let granted_at = history
        .first("next", Phase::Granted)
        .await
        .expect("seen Granted");
    let to_expiry = expired_at - stopped;
    let delay = granted_at - expired_at;
    println!("e2e_04: renewals stopped -> Expired in {to_expiry:?}; Expired -> next Granted in {delay:?}");
    assert!(
        to_expiry >= Duration::from_secs(2),
        "expired {to_expiry:?} after the last renewal (duration 3 s)"
    );
    assert!(
        to_expiry <= Duration::from_secs(5),
        "expired late: {to_expiry:?}"
    );
    assert!(
        delay >= Duration::from_millis(1900),
        "lock delay of 2 s not kept: {delay:?}"
    );
    history.assert_never_two_granted();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_05_controller_renewal_keeps_the_lease_fresh_and_max_hold_expires() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-ctrl").await;
    let _op = Operator::start(&client, &ns, GC).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    let mut s = spec("maint");
    s.lease_duration_seconds = 3;
    create_claim(&api, "ops", s).await;
    wait_phase(&api, "ops", Phase::Granted, T).await;
    let mut renewals = std::collections::BTreeSet::new();
    for _ in 0..14 {
        let l = support::lease(&client, &ns, "maint").await.expect("lease");
        if let Some(t) = l.spec.and_then(|s| s.renew_time) {
            renewals.insert(t.0);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        api.get("ops").await.expect("ops").phase(),
        Some(Phase::Granted),
        "held for 7 s > 2 durations"
    );
    println!(
        "e2e_05: {} distinct renewTimes in 7 s with a 3 s duration",
        renewals.len()
    );
    assert!(
        renewals.len() >= 5,
        "renewed about every second: {renewals:?}"
    );

    let mut capped = spec("window");
    capped.max_hold_seconds = Some(2);
    create_claim(&api, "capped", capped).await;
    wait_phase(&api, "capped", Phase::Granted, T).await;
    let c = wait_phase(&api, "capped", Phase::Expired, Duration::from_secs(10)).await;
    assert_eq!(
        c.condition(CONDITION_GRANTED).map(|x| x.reason.as_str()),
        Some("MaxHoldExceeded")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_06_a_skewed_holder_that_renews_on_time_is_never_expired() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-skew").await;
    let history = History::record(&client, &ns).await;
    let _op = Operator::start(&client, &ns, GC).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    let mut renewers = Vec::new();
    for (name, skew) in [("past", -600), ("future", 600)] {
        let mut s = spec(name);
        s.renewal = Renewal::Holder;
        s.lease_duration_seconds = 3;
        create_claim(&api, name, s).await;
        wait_phase(&api, name, Phase::Granted, T).await;
        renewers.push(Renewer::start(
            &client,
            &ns,
            name,
            name,
            Duration::from_secs(1),
            SignedDuration::from_secs(skew),
        ));
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    for name in ["past", "future"] {
        assert!(!history.ever(name, Phase::Expired), "{name} was expired");
        assert_eq!(
            api.get(name).await.expect("claim").phase(),
            Some(Phase::Granted)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_07_after_an_operator_restart_a_dead_holder_expires_within_the_bounded_grace() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-restart").await;
    let history = History::record(&client, &ns).await;
    let op = Operator::start(&client, &ns, GC).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    let mut s = spec("dead");
    s.renewal = Renewal::Holder;
    s.lease_duration_seconds = 4;
    create_claim(&api, "dead", s.clone()).await;
    s.lease_name = "alive".into();
    create_claim(&api, "alive", s).await;
    wait_phase(&api, "dead", Phase::Granted, T).await;
    wait_phase(&api, "alive", Phase::Granted, T).await;
    let _renewer = Renewer::start(
        &client,
        &ns,
        "alive",
        "alive",
        Duration::from_secs(1),
        SignedDuration::ZERO,
    );
    // "dead" never renews. Stop the operator, wait, start a new one.
    op.stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restarted = Instant::now();
    let _op2 = Operator::start(&client, &ns, GC).await;
    wait_phase(&api, "dead", Phase::Expired, T).await;
    let took = history.first("dead", Phase::Expired).await.expect("seen") - restarted;
    println!(
        "e2e_07: dead holder expired {took:?} after the restart (duration 4 s, Lease 3 s old)"
    );
    // Lease renewTime ~3 s old: grace = max(4 - 3, 4 / 2) = 2 s; bound: one duration.
    assert!(
        took <= Duration::from_millis(4500),
        "expired {took:?} after restart"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        !history.ever("alive", Phase::Expired),
        "a healthy holder was expired by the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_08_a_lease_whose_owner_allows_takeover_is_respected_while_renewed_then_taken_over() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-external").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let now = jiff::Timestamp::now();
    leases
        .create(
            &PostParams::default(),
            &Lease {
                metadata: ObjectMeta {
                    name: Some("legacy".into()),
                    // Its owner allows a takeover once it stops renewing.
                    labels: Some(
                        [(
                            leasekeeper::api::TAKEOVER_LABEL.to_string(),
                            leasekeeper::api::TAKEOVER_ALLOWED.to_string(),
                        )]
                        .into(),
                    ),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some("someone-else".into()),
                    lease_duration_seconds: Some(3),
                    renew_time: Some(MicroTime(now)),
                    acquire_time: Some(MicroTime(now)),
                    lease_transitions: Some(4),
                    ..LeaseSpec::default()
                }),
            },
        )
        .await
        .expect("outsider's Lease");
    let outsider = Renewer::start(
        &client,
        &ns,
        "legacy",
        "someone-else",
        Duration::from_secs(1),
        SignedDuration::ZERO,
    );
    let history = History::record(&client, &ns).await;
    let _op = Operator::start(&client, &ns, GC).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    create_claim(&api, "mine", spec("legacy")).await;
    let c = support::wait_for(&api, "mine", T, "HeldExternally", |c: &LockClaim| {
        c.condition(CONDITION_GRANTED)
            .is_some_and(|x| x.reason == "HeldExternally")
    })
    .await;
    assert_eq!(
        c.status.and_then(|s| s.holder_identity).as_deref(),
        Some("someone-else")
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        !history.ever("mine", Phase::Granted),
        "taken while the outsider renewed"
    );
    outsider.stop();
    wait_phase(&api, "mine", Phase::Granted, T).await;
    let l = leases.get("legacy").await.expect("lease");
    assert_eq!(holder_of(&l).as_deref(), Some("mine"));
    assert_eq!(transitions(&l), 5);
    let evs = support::wait_event(&ns, "LockClaim", Some("mine"), "TakenOver").await;
    assert!(
        evs.iter()
            .any(|(k, n, r)| k == "LockClaim" && n == "mine" && r == "TakenOver"),
        "{evs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_09_a_duplicate_identity_is_rejected() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-dup").await;
    let _op = Operator::start(&client, &ns, GC).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    let mut s = spec("singleton");
    s.holder_identity = Some("worker-0".into());
    create_claim(&api, "one", s.clone()).await;
    wait_phase(&api, "one", Phase::Granted, T).await;
    create_claim(&api, "two", s).await;
    let c = wait_phase(&api, "two", Phase::Rejected, T).await;
    assert_eq!(
        c.condition(CONDITION_GRANTED).map(|x| x.reason.as_str()),
        Some("DuplicateIdentity")
    );
    assert_eq!(
        api.get("one").await.expect("one").phase(),
        Some(Phase::Granted)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_10_unused_leases_are_collected_tokens_keep_rising_and_finished_claims_expire() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-gc").await;
    let _op = Operator::start(&client, &ns, Duration::from_secs(2)).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    let first = {
        create_claim(&api, "first", spec("scratch")).await;
        wait_phase(&api, "first", Phase::Granted, T).await
    };
    api.delete("first", &DeleteParams::default())
        .await
        .expect("delete");
    let t0 = Instant::now();
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    while leases.get_opt("scratch").await.expect("read").is_some() {
        assert!(t0.elapsed() < T, "Lease not collected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "e2e_10: unused Lease deleted {:?} after its last claim (grace 2 s)",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "collected before the grace period"
    );
    let evs = support::wait_event(&ns, "Lease", None, "LeaseGarbageCollected").await;
    assert!(
        evs.iter()
            .any(|(k, _, r)| k == "Lease" && r == "LeaseGarbageCollected"),
        "{evs:?}"
    );
    create_claim(&api, "second", spec("scratch")).await;
    let second = wait_phase(&api, "second", Phase::Granted, T).await;
    assert!(token(&second) > token(&first), "the token rose across GC");

    let mut s = spec("ttl");
    s.ttl_seconds_after_finished = Some(1);
    create_claim(&api, "short-lived", s).await;
    wait_phase(&api, "short-lived", Phase::Granted, T).await;
    release(&api, "short-lived").await;
    let t0 = Instant::now();
    while api.get_opt("short-lived").await.expect("read").is_some() {
        assert!(t0.elapsed() < T, "finished claim not deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(700),
        "deleted before its TTL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_11_a_claim_deleted_or_released_while_waiting_is_never_granted() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-withdraw").await;
    let history = History::record(&client, &ns).await;
    let _op = Operator::start(&client, &ns, GC).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    create_claim(&api, "holder", spec("l")).await;
    wait_phase(&api, "holder", Phase::Granted, T).await;
    create_claim(&api, "deleted", spec("l")).await;
    create_claim(&api, "released", spec("l")).await;
    wait_phase(&api, "released", Phase::Pending, T).await;
    wait_phase(&api, "deleted", Phase::Pending, T).await;
    api.delete("deleted", &DeleteParams::default())
        .await
        .expect("delete");
    release(&api, "released").await;
    release(&api, "holder").await;
    wait_phase(&api, "holder", Phase::Released, T).await;
    wait_phase(&api, "released", Phase::Released, T).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(api.get_opt("deleted").await.expect("read").is_none());
    assert!(!history.ever("deleted", Phase::Granted));
    assert!(!history.ever("released", Phase::Granted));
    let l = support::lease(&client, &ns, "l").await.expect("lease");
    assert_eq!(holder_of(&l), None, "nobody holds the Lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_12_events_land_on_the_right_objects() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-events").await;
    let _op = Operator::start(&client, &ns, Duration::from_secs(1)).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    create_claim(&api, "a", spec("ev")).await;
    wait_phase(&api, "a", Phase::Granted, T).await;
    let mut b = spec("ev");
    b.renewal = Renewal::Holder;
    b.lease_duration_seconds = 2;
    create_claim(&api, "b", b).await;
    wait_phase(&api, "b", Phase::Pending, T).await;
    release(&api, "a").await;
    wait_phase(&api, "b", Phase::Granted, T).await;
    wait_phase(&api, "b", Phase::Expired, T).await; // b never renews
                                                    // An outsider's expired Lease whose owner allows a takeover, taken over.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let old = jiff::Timestamp::now();
    leases
        .create(
            &PostParams::default(),
            &Lease {
                metadata: ObjectMeta {
                    name: Some("ext".into()),
                    labels: Some(
                        [(
                            leasekeeper::api::TAKEOVER_LABEL.to_string(),
                            leasekeeper::api::TAKEOVER_ALLOWED.to_string(),
                        )]
                        .into(),
                    ),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some("gone".into()),
                    lease_duration_seconds: Some(1),
                    renew_time: Some(MicroTime(old)),
                    ..LeaseSpec::default()
                }),
            },
        )
        .await
        .expect("lease");
    create_claim(&api, "c", spec("ext")).await;
    wait_phase(&api, "c", Phase::Granted, T).await;
    // "ev" is unused now: collected after 1 s.
    let t0 = Instant::now();
    while leases.get_opt("ev").await.expect("read").is_some() {
        assert!(t0.elapsed() < T, "not collected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let evs = support::events(&ns);
    for (kind, name, reason) in [
        ("LockClaim", "a", "Granted"),
        ("LockClaim", "b", "Queued"),
        ("LockClaim", "a", "Released"),
        ("LockClaim", "b", "Expired"),
        ("LockClaim", "c", "TakenOver"),
        ("Lease", "ext", "TakenOver"),
        ("Lease", "ev", "LeaseGarbageCollected"),
    ] {
        assert!(
            evs.iter()
                .any(|(k, n, r)| k == kind && n == name && r == reason),
            "no {reason} Event on {kind}/{name}: {evs:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_13_conditions_follow_metav1_condition_semantics() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-cond").await;
    let _op = Operator::start(&client, &ns, GC).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    create_claim(&api, "holder", spec("c")).await;
    wait_phase(&api, "holder", Phase::Granted, T).await;
    create_claim(&api, "waiter", spec("c")).await;
    let w = wait_phase(&api, "waiter", Phase::Pending, T).await;
    let cond = w
        .condition(CONDITION_GRANTED)
        .cloned()
        .expect("Granted condition");
    assert_eq!(cond.status, "False");
    assert_eq!(cond.observed_generation, Some(1));
    assert_eq!(
        w.status.as_ref().and_then(|s| s.observed_generation),
        Some(1)
    );
    // Reorder the queue: waiter's position changes, its condition stays False, so
    // lastTransitionTime must not move.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut urgent = spec("c");
    urgent.priority = 5;
    create_claim(&api, "urgent", urgent).await;
    let w = support::wait_for(&api, "waiter", T, "position 2", |c: &LockClaim| {
        c.status.as_ref().and_then(|s| s.queue_position) == Some(2)
    })
    .await;
    assert_eq!(
        w.condition(CONDITION_GRANTED)
            .map(|c| c.last_transition_time.clone()),
        Some(cond.last_transition_time.clone())
    );
    // The waiter's release bumps its generation; observedGeneration follows.
    release(&api, "waiter").await;
    let w = wait_phase(&api, "waiter", Phase::Released, T).await;
    let c2 = w.condition(CONDITION_GRANTED).cloned().expect("condition");
    assert_eq!(c2.status, "False");
    assert_eq!(
        c2.last_transition_time, cond.last_transition_time,
        "still False: no transition"
    );
    assert_eq!(c2.observed_generation, Some(2));
    // And a flip moves it (metav1.Time has one-second precision: wait past it).
    let queued = api
        .get("urgent")
        .await
        .expect("urgent")
        .condition(CONDITION_GRANTED)
        .cloned()
        .expect("condition");
    assert_eq!(queued.status, "False");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    release(&api, "holder").await;
    let u = wait_phase(&api, "urgent", Phase::Granted, T).await;
    let c3 = u.condition(CONDITION_GRANTED).cloned().expect("condition");
    assert_eq!(c3.status, "True");
    assert!(
        c3.last_transition_time.0 > queued.last_transition_time.0,
        "moved on the flip to True"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_14_a_lease_deleted_by_hand_while_held_is_reported_not_crashed_on() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-handdelete").await;
    let _op = Operator::start(&client, &ns, GC).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    create_claim(&api, "held", spec("fragile")).await;
    wait_phase(&api, "held", Phase::Granted, T).await;
    create_claim(&api, "next", spec("fragile")).await;
    wait_phase(&api, "next", Phase::Pending, T).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    leases
        .delete("fragile", &DeleteParams::default())
        .await
        .expect("delete the Lease by hand");
    let c = wait_phase(&api, "held", Phase::Expired, T).await;
    assert_eq!(
        c.condition(CONDITION_GRANTED).map(|x| x.reason.as_str()),
        Some("LeaseLost")
    );
    wait_phase(&api, "next", Phase::Granted, T).await;
    let (ok, out, _) = support::kubectl_run(&[
        "get",
        "events",
        "-n",
        &ns,
        "--field-selector",
        "type=Warning",
        "-o",
        "json",
    ]);
    assert!(ok);
    assert!(
        out.contains("\"held\"") && out.contains("outside leasekeeper"),
        "a Warning Event on the claim: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_15_a_replica_whose_leadership_term_ran_out_writes_nothing_until_renewed() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-term").await;
    // A term that ended already: a leader that woke from a freeze past its term.
    let term = leasekeeper::leader::Term::until(Instant::now());
    let op = Operator::start_in_term(&client, &ns, GC, term.clone()).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    create_claim(&api, "late", spec("termed")).await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    // It decides (and keeps deciding) to grant, but makes none of the plan's writes.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut refused = 0.0;
    while Instant::now() < deadline {
        let c = api.get("late").await.expect("read the claim");
        assert!(c.status.is_none(), "no status written: {:?}", c.status);
        assert!(
            leases.get_opt("termed").await.expect("read").is_none(),
            "no Lease written"
        );
        refused = support::metric(
            &op.metrics.encode(),
            "leasekeeper_reconcile_errors_total{reason=\"TermEnded\"}",
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        refused >= 1.0,
        "plans dropped for the ended term: {refused}"
    );
    // Renewed: the same replica grants.
    term.extend(Instant::now() + Duration::from_secs(600));
    let c = wait_phase(&api, "late", Phase::Granted, T).await;
    assert!(token(&c) > 0);
    let lease = leases.get("termed").await.expect("the Lease");
    assert_eq!(
        holder_of(&lease).as_deref(),
        c.status.as_ref().and_then(|s| s.holder_identity.as_deref())
    );
}

/// An admission policy that refuses creating the Lease `name` in `ns` (as a cluster
/// admin's policy might): every grant of it fails the same way.
fn lease_block_policy(ns: &str, name: &str) -> String {
    format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: block-{ns}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: [coordination.k8s.io]
      apiVersions: [v1]
      operations: [CREATE]
      resources: [leases]
  matchConditions:
  - name: the-blocked-lease
    expression: "object.metadata.name == '{name}'"
  validations:
  - expression: "false"
    message: "Lease {name} is refused by policy block-{ns}"
    reason: Forbidden
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: block-{ns}}}
spec:
  policyName: block-{ns}
  validationActions: [Deny]
  matchResources:
    namespaceSelector:
      matchLabels: {{kubernetes.io/metadata.name: {ns}}}
"#
    )
}

/// Whether the API server refuses creating Lease `name` now (a dry run goes through
/// admission; the policy takes effect a moment after it is created).
async fn lease_create_refused(leases: &Api<Lease>, name: &str) -> bool {
    let l = Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        spec: None,
    };
    let pp = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    leases.create(&pp, &l).await.is_err()
}

fn reconciled(c: &LockClaim) -> Option<(String, String, String)> {
    c.condition(leasekeeper::api::CONDITION_RECONCILED)
        .map(|x| (x.status.clone(), x.reason.clone(), x.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_16_a_failure_that_persists_shows_on_the_claim_and_clears_when_it_ends() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-failing").await;
    let policy = lease_block_policy(&ns, "blocked");
    support::kubectl_stdin(&["apply", "-f", "-"], &policy);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let t0 = Instant::now();
    while !lease_create_refused(&leases, "blocked").await {
        assert!(t0.elapsed() < T, "the admission policy never took effect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let op = Operator::start(&client, &ns, GC).await;
    let stalled = |op: &Operator| {
        let line = format!("leasekeeper_stalled_waiters{{namespace=\"{ns}\"}} ");
        op.metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(line.as_str()).map(str::to_string))
            .unwrap_or_default()
    };
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    create_claim(&api, "a", spec("blocked")).await;
    create_claim(&api, "fine", spec("other")).await;
    // The Lease write fails every time: after three failures the claim says why.
    let t0 = Instant::now();
    let (status, reason, message) = loop {
        let c = api.get("a").await.expect("claim");
        if let Some(r) = reconciled(&c) {
            break r;
        }
        assert!(t0.elapsed() < T, "no Reconciled condition: {:?}", c.status);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "ReconcileFailed")
    );
    assert!(
        message.contains("LeaseWriteFailed")
            && message.contains("refused by policy")
            && message.contains("HTTP 403"),
        "the message names the reason and the API server's error: {message}"
    );
    assert_ne!(api.get("a").await.expect("a").phase(), Some(Phase::Granted));
    // a waits on a free Lease: counted as stalled ("fine" too, for the moment before its
    // grant is read back).
    let t0 = Instant::now();
    while stalled(&op) != "1" {
        assert!(t0.elapsed() < T, "stalled waiters: {}", stalled(&op));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One failing lock stops nobody else.
    wait_phase(&api, "fine", Phase::Granted, T).await;
    assert!(reconciled(&api.get("fine").await.expect("fine")).is_none());
    let t0 = Instant::now();
    while !support::events(&ns)
        .iter()
        .any(|(k, n, r)| k == "LockClaim" && n == "a" && r == "ReconcileFailed")
    {
        assert!(t0.elapsed() < T, "no ReconcileFailed Warning Event on a");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The cause goes away: the claim is granted and the condition turns True.
    let (ok, _, err) = support::kubectl_run(&[
        "delete",
        "validatingadmissionpolicybinding,validatingadmissionpolicy",
        &format!("block-{ns}"),
    ]);
    assert!(ok, "{err}");
    wait_phase(&api, "a", Phase::Granted, Duration::from_secs(60)).await;
    let t0 = Instant::now();
    loop {
        let c = api.get("a").await.expect("claim");
        if let Some((s, r, _)) = reconciled(&c) {
            if s == "True" {
                assert_eq!(r, "Reconciled");
                break;
            }
        }
        assert!(
            t0.elapsed() < T,
            "Reconciled never turned True: {:?}",
            c.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let t0 = Instant::now();
    while stalled(&op) != "0" {
        assert!(t0.elapsed() < T, "granted, but still counted as stalled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until claim `name` carries condition Reconciled with `status`.
async fn wait_reconciled(api: &Api<LockClaim>, name: &str, status: &str) -> (String, String) {
    let t0 = Instant::now();
    loop {
        let c = api.get(name).await.expect("claim");
        if let Some((s, r, m)) = reconciled(&c) {
            if s == status {
                return (r, m);
            }
        }
        assert!(
            t0.elapsed() < T,
            "Reconciled never {status}: {:?}",
            c.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_17_a_failure_shown_by_an_earlier_operator_is_cleared_by_the_next() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-failing-restart").await;
    support::kubectl_stdin(&["apply", "-f", "-"], &lease_block_policy(&ns, "blocked"));
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let t0 = Instant::now();
    while !lease_create_refused(&leases, "blocked").await {
        assert!(t0.elapsed() < T, "the admission policy never took effect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    let op = Operator::start(&client, &ns, GC).await;
    create_claim(&api, "a", spec("blocked")).await;
    wait_reconciled(&api, "a", "False").await;
    // That operator goes; the cause is fixed; the next one, which never saw the
    // failures, grants the claim and clears what the first one said.
    op.stop().await;
    let (ok, _, err) = support::kubectl_run(&[
        "delete",
        "validatingadmissionpolicybinding,validatingadmissionpolicy",
        &format!("block-{ns}"),
    ]);
    assert!(ok, "{err}");
    let _op = Operator::start(&client, &ns, GC).await;
    wait_phase(&api, "a", Phase::Granted, T).await;
    let (reason, _) = wait_reconciled(&api, "a", "True").await;
    assert_eq!(reason, "Reconciled");
}
