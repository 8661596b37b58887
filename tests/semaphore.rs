//! Locks with capacity (the `Lock` resource) and waiting with a deadline, end to end
//! against the real API server: slots, capacity changes under load, expiry of a slot's
//! holder, try-lock, deadlines with TTL, admission of reserved names.

use std::collections::BTreeSet;
use std::time::Duration;

use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use leasekeeper::api::{Lock, LockClaim, LockSpec, Phase, Renewal};
use testkit as support;
use testkit::{create_claim, spec, wait_phase, History, Operator};

const T: Duration = Duration::from_secs(20);
const GC: Duration = Duration::from_secs(300);

async fn set_capacity(api: &Api<Lock>, name: &str, capacity: i32) {
    let p = serde_json::json!({"spec": {"capacity": capacity}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&p))
        .await
        .expect("capacity");
}

fn slot_of(c: &LockClaim) -> Option<i32> {
    c.status.as_ref().and_then(|s| s.slot)
}

fn token_of(c: &LockClaim) -> i64 {
    c.status
        .as_ref()
        .and_then(|s| s.fencing_token)
        .unwrap_or_default()
}

async fn granted(api: &Api<LockClaim>) -> Vec<LockClaim> {
    api.list(&Default::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .filter(|c| c.phase() == Some(Phase::Granted))
        .collect()
}

/// Every state a watcher saw: no two Granted claims share a slot Lease.
fn assert_slots_never_shared(h: &History) -> usize {
    let states = h.granted_states();
    for (_, g) in &states {
        let mut leases = BTreeSet::new();
        for c in g {
            let lease = c.status.as_ref().and_then(|s| s.lease.clone());
            assert!(
                leases.insert(lease.clone()),
                "two claims Granted on {lease:?}: {g:?}"
            );
        }
    }
    states.len()
}

async fn wait_lock_status(api: &Api<Lock>, name: &str, held: i32, waiting: i32) -> Lock {
    support::wait_for(api, name, T, "Lock status", |l: &Lock| {
        l.status
            .as_ref()
            .is_some_and(|s| s.held == Some(held) && s.waiting == Some(waiting))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sem_01_capacity_three_grants_three_slots_and_a_release_hands_its_slot_on() {
    let client = support::client().await;
    let ns = support::namespace(&client, "sem-slots").await;
    let history = History::record(&client, &ns).await;
    let op = Operator::start(&client, &ns, GC).await;
    let locks = support::create_lock(&client, &ns, "gpu", 3).await;
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    for i in 0..5 {
        create_claim(&claims, &format!("c{i}"), spec("gpu")).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    for i in 0..3 {
        wait_phase(&claims, &format!("c{i}"), Phase::Granted, T).await;
    }
    let l = wait_lock_status(&locks, "gpu", 3, 2).await;
    let holders = l.status.expect("status").holders;
    assert_eq!(holders.len(), 3, "{holders:?}");
    let mut g = granted(&claims).await;
    g.sort_by_key(token_of);
    let slots: BTreeSet<i32> = g.iter().filter_map(slot_of).collect();
    assert_eq!(slots, BTreeSet::from([0, 1, 2]));
    // Tokens rise across slots in grant order (one etcd revision counter).
    let names: Vec<String> = g.iter().filter_map(|c| c.metadata.name.clone()).collect();
    assert_eq!(names, ["c0", "c1", "c2"]);
    for c in &g {
        let lease = c
            .status
            .as_ref()
            .and_then(|s| s.lease.clone())
            .expect("lease");
        let l = support::lease(&client, &ns, &lease)
            .await
            .expect("slot Lease");
        let holder = l.spec.and_then(|s| s.holder_identity);
        assert_eq!(holder, c.metadata.name, "{lease} names its claim");
    }
    for (n, p) in [("c3", 1), ("c4", 2)] {
        let c = claims.get(n).await.expect("claim");
        assert_eq!(c.phase(), Some(Phase::Pending));
        assert_eq!(c.status.and_then(|s| s.queue_position), Some(p));
    }
    let text = op.metrics.encode();
    let series = format!("leasekeeper_lock_held{{namespace=\"{ns}\",lock=\"gpu\"}} 3");
    assert!(text.contains(&series), "{text}");
    // Release the holder of slot 1: c3 gets that slot, with a higher token than any.
    let on_one = g
        .iter()
        .find(|c| slot_of(c) == Some(1))
        .and_then(|c| c.metadata.name.clone())
        .expect("slot 1");
    let top = g.iter().map(token_of).max().unwrap_or_default();
    claims
        .delete(&on_one, &Default::default())
        .await
        .expect("release");
    let c3 = wait_phase(&claims, "c3", Phase::Granted, T).await;
    assert_eq!(slot_of(&c3), Some(1));
    assert!(token_of(&c3) > top);
    let n = assert_slots_never_shared(&history);
    assert!(n > 10, "{n} states observed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sem_02_capacity_raised_grants_at_once_and_lowered_under_load_revokes_nobody() {
    let client = support::client().await;
    let ns = support::namespace(&client, "sem-capacity").await;
    let history = History::record(&client, &ns).await;
    let _op = Operator::start(&client, &ns, GC).await;
    let locks = support::create_lock(&client, &ns, "pool", 3).await;
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    for i in 0..8 {
        create_claim(&claims, &format!("c{i}"), spec("pool")).await;
    }
    wait_lock_status(&locks, "pool", 3, 5).await;
    set_capacity(&locks, "pool", 5).await;
    wait_lock_status(&locks, "pool", 5, 3).await;
    // Lower to 2 while claims keep coming and going.
    set_capacity(&locks, "pool", 2).await;
    let lowered = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(granted(&claims).await.len(), 5, "lowering revokes nobody");
    for i in 8..12 {
        create_claim(&claims, &format!("c{i}"), spec("pool")).await;
    }
    for _ in 0..6 {
        let g = granted(&claims).await;
        let Some(c) = g.first().and_then(|c| c.metadata.name.clone()) else {
            break;
        };
        claims
            .delete(&c, &Default::default())
            .await
            .expect("release");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    wait_lock_status(&locks, "pool", 2, 4).await;
    // Replayed from the moment of lowering: the holders only ever went down until
    // fewer than two held; never a new grant while two or more held.
    let mut allowed = usize::MAX;
    for (t, g) in history.granted_states() {
        if t < lowered {
            continue;
        }
        let held = g.len();
        assert!(
            held <= allowed,
            "{held} Granted after it had fallen to {allowed}"
        );
        allowed = held.max(2).min(allowed);
    }
    assert_slots_never_shared(&history);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sem_03_a_holder_that_stops_renewing_its_slot_expires_and_the_slot_is_granted_again() {
    let client = support::client().await;
    let ns = support::namespace(&client, "sem-expiry").await;
    let _op = Operator::start(&client, &ns, GC).await;
    support::create_lock(&client, &ns, "pool", 2).await;
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    create_claim(&claims, "steady", spec("pool")).await;
    wait_phase(&claims, "steady", Phase::Granted, T).await;
    let mut h = spec("pool");
    h.renewal = Renewal::Holder;
    h.lease_duration_seconds = 2;
    create_claim(&claims, "silent", h).await;
    let silent = wait_phase(&claims, "silent", Phase::Granted, T).await;
    let lease = silent.status.and_then(|s| s.lease).expect("lease");
    assert_eq!(lease, "pool-slot-1");
    create_claim(&claims, "next", spec("pool")).await;
    wait_phase(&claims, "silent", Phase::Expired, T).await;
    let next = wait_phase(&claims, "next", Phase::Granted, T).await;
    assert_eq!(
        next.status.and_then(|s| s.lease).as_deref(),
        Some("pool-slot-1")
    );
    assert_eq!(
        claims.get("steady").await.expect("steady").phase(),
        Some(Phase::Granted)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sem_04_try_lock_times_out_at_once_and_a_deadline_times_out_a_waiter_then_its_ttl_deletes_it(
) {
    let client = support::client().await;
    let ns = support::namespace(&client, "sem-deadline").await;
    let _op = Operator::start(&client, &ns, GC).await;
    support::create_lock(&client, &ns, "pool", 1).await;
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    create_claim(&claims, "holder", spec("pool")).await;
    wait_phase(&claims, "holder", Phase::Granted, T).await;
    let mut try_lock = spec("pool");
    try_lock.acquire_timeout_seconds = Some(0);
    let started = tokio::time::Instant::now();
    create_claim(&claims, "try", try_lock).await;
    let c = wait_phase(&claims, "try", Phase::TimedOut, T).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let reason = c
        .condition(leasekeeper::api::CONDITION_GRANTED)
        .map(|x| x.reason.clone());
    assert_eq!(reason.as_deref(), Some("AcquireTimeout"));
    let mut late = spec("pool");
    late.acquire_timeout_seconds = Some(2);
    late.ttl_seconds_after_finished = Some(1);
    create_claim(&claims, "late", late).await;
    wait_phase(&claims, "late", Phase::Pending, T).await;
    wait_phase(&claims, "late", Phase::TimedOut, T).await;
    support::wait_gone(&claims, "late", T).await;
    assert_eq!(
        claims.get("holder").await.expect("holder").phase(),
        Some(Phase::Granted)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sem_05_reserved_slot_names_are_refused_at_admission_and_kubectl_get_leasekeeper_lists_both_kinds(
) {
    let client = support::client().await;
    let ns = support::namespace(&client, "sem-names").await;
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    let err = claims
        .create(
            &PostParams::default(),
            &LockClaim::new("x", spec("db-slot-2")),
        )
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("spec.leaseName"), "{err}");
    let locks: Api<Lock> = Api::namespaced(client.clone(), &ns);
    let err = locks
        .create(
            &PostParams::default(),
            &Lock::new("db-slot-7", LockSpec { capacity: 2 }),
        )
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("metadata.name"), "{err}");
    let err = locks
        .create(
            &PostParams::default(),
            &Lock::new("db", LockSpec { capacity: 1001 }),
        )
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("spec.capacity"), "{err}");
    support::create_lock(&client, &ns, "db", 2).await;
    create_claim(&claims, "mine", spec("db")).await;
    // A fresh discovery cache: categories are read from discovery, and a cache from
    // before the CRDs changed would not know this one.
    let cache = support::root().join(format!("target/kubectl-cache-{ns}"));
    let cache = cache.to_string_lossy().into_owned();
    let (ok, out, err) =
        support::kubectl_run(&["--cache-dir", &cache, "get", "leasekeeper", "-n", &ns]);
    assert!(ok, "{err}");
    assert!(out.contains("lock.leasekeeper.io/db"), "{out}");
    assert!(out.contains("lockclaim.leasekeeper.io/mine"), "{out}");
}
