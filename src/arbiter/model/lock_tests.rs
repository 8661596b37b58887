//! Locks with capacity: one test per rule, then property tests over random histories
//! with the lock's invariants checked after every write, and a negative control.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;

use super::lock_world::{holder_spec, spec, LockWorld, LOCK};
use crate::api::{LockClaim, LockClaimSpec, Phase};
use crate::arbiter::{decide_lease, Input, Step};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn phase(w: &LockWorld, n: &str) -> Option<Phase> {
    w.claims.get(n).and_then(LockClaim::phase)
}

fn slot(w: &LockWorld, n: &str) -> Option<i32> {
    w.claims[n].status.as_ref().and_then(|s| s.slot)
}

fn token(w: &LockWorld, n: &str) -> i64 {
    w.claims[n]
        .status
        .as_ref()
        .and_then(|s| s.fencing_token)
        .unwrap_or_default()
}

fn settle(w: &mut LockWorld) {
    assert!(w.settle(), "did not settle");
    assert_eq!(w.check(), Ok(()));
}

/// Claims c0..c{n} created one second apart (so the queue order is their number).
fn claims(w: &mut LockWorld, n: usize) {
    for i in 0..n {
        w.create(&format!("c{i}"), spec(15));
        w.advance(secs(1));
    }
}

#[test]
fn capacity_three_grants_three_distinct_slots_with_rising_tokens_and_queues_the_rest() {
    let mut w = LockWorld::default();
    claims(&mut w, 5);
    settle(&mut w);
    let held: Vec<&str> = ["c0", "c1", "c2"].to_vec();
    for n in &held {
        assert_eq!(phase(&w, n), Some(Phase::Granted), "{n}");
    }
    let mut slots: Vec<i32> = held.iter().filter_map(|n| slot(&w, n)).collect();
    slots.sort();
    assert_eq!(slots, [0, 1, 2]);
    assert!(token(&w, "c0") < token(&w, "c1") && token(&w, "c1") < token(&w, "c2"));
    let leases: Vec<String> = w
        .leases
        .values()
        .filter_map(|l| l.metadata.name.clone())
        .collect();
    assert_eq!(
        leases,
        [
            LOCK.to_string(),
            format!("{LOCK}-slot-1"),
            format!("{LOCK}-slot-2")
        ]
    );
    for (n, p) in [("c3", 1), ("c4", 2)] {
        let st = w.claims[n].status.clone().expect("status");
        assert_eq!(
            (st.phase, st.queue_position),
            (Some(Phase::Pending), Some(p))
        );
    }
}

/// A grant interrupted after its Lease write (slot 1) is completed in the plan that
/// also grants slot 0 once its lock delay is over: both publish, tokens rising in the
/// order the statuses are written (the model checks every grant against the highest
/// token before it).
#[test]
fn an_interrupted_slot_grant_and_a_new_grant_in_one_plan_publish_with_rising_tokens() {
    let mut w = LockWorld {
        capacity: 2,
        ..LockWorld::default()
    };
    let mut h = holder_spec(4);
    h.lock_delay_seconds = 10;
    w.create("h", h);
    w.advance(secs(1));
    w.create("a", spec(15));
    w.advance(secs(1));
    w.create("w1", spec(15));
    w.advance(secs(1));
    w.create("w2", spec(15));
    settle(&mut w);
    assert_eq!((slot(&w, "h"), slot(&w, "a")), (Some(0), Some(1)));
    w.advance(secs(5));
    settle(&mut w);
    assert_eq!(phase(&w, "h"), Some(Phase::Expired));
    assert_eq!(
        phase(&w, "w1"),
        Some(Phase::Pending),
        "slot 0 in its lock delay"
    );
    w.release("a");
    let plan = w.plan();
    let snap = w.rvs();
    let lease_write = plan
        .steps
        .iter()
        .rposition(|s| s.slot == 1 && matches!(s.step, Step::WriteLease { .. }))
        .expect("slot 1 is granted");
    let cap = w.capacity;
    assert!(
        !w.apply(&plan, &snap, lease_write + 1, cap),
        "crash after the Lease write"
    );
    assert_eq!(
        phase(&w, "w1"),
        Some(Phase::Pending),
        "interrupted before its status"
    );
    w.advance(secs(12));
    settle(&mut w);
    assert_eq!(phase(&w, "w1"), Some(Phase::Granted));
    assert_eq!(phase(&w, "w2"), Some(Phase::Granted));
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

#[test]
fn a_released_slot_goes_to_the_next_waiter_on_that_slot() {
    let mut w = LockWorld::default();
    claims(&mut w, 5);
    settle(&mut w);
    let before = slot(&w, "c1");
    let top = w.max_token;
    w.release("c1");
    settle(&mut w);
    assert_eq!(phase(&w, "c1"), Some(Phase::Released));
    assert_eq!(phase(&w, "c3"), Some(Phase::Granted));
    assert_eq!(slot(&w, "c3"), before);
    assert!(token(&w, "c3") > top, "the token rises across slots");
    assert_eq!(
        w.claims["c4"]
            .status
            .as_ref()
            .and_then(|s| s.queue_position),
        Some(1)
    );
}

#[test]
fn raising_the_capacity_grants_at_once_and_lowering_it_revokes_nobody() {
    let mut w = LockWorld::default();
    claims(&mut w, 6);
    settle(&mut w);
    w.capacity = 5;
    settle(&mut w);
    assert_eq!(w.granted().len(), 5);
    w.capacity = 2;
    settle(&mut w);
    assert_eq!(w.granted().len(), 5, "lowering revokes nobody");
    // Releases bring the holders down to the new capacity before anyone new is let in.
    for n in ["c0", "c1", "c2"] {
        w.release(n);
        settle(&mut w);
        assert_eq!(phase(&w, "c5"), Some(Phase::Pending), "after {n}");
    }
    assert_eq!(w.granted().len(), 2);
    w.release("c3");
    settle(&mut w);
    assert_eq!(phase(&w, "c5"), Some(Phase::Granted));
    let s = slot(&w, "c5").expect("slot");
    assert!(
        s < 2,
        "a new grant takes a slot below the capacity, not {s}"
    );
}

#[test]
fn a_holder_that_stops_renewing_its_slot_expires_and_the_slot_is_granted_again() {
    let mut w = LockWorld::default();
    w.create("a", spec(15));
    w.create("b", spec(15));
    w.create("h", holder_spec(4));
    w.advance(secs(1));
    w.create("next", spec(15));
    settle(&mut w);
    let held = slot(&w, "h");
    assert_eq!(phase(&w, "next"), Some(Phase::Pending));
    w.advance(secs(5));
    settle(&mut w);
    assert_eq!(phase(&w, "h"), Some(Phase::Expired));
    assert_eq!(phase(&w, "next"), Some(Phase::Granted));
    assert_eq!(slot(&w, "next"), held);
}

#[test]
fn a_try_lock_on_a_full_lock_times_out_at_once_and_on_a_free_slot_is_granted() {
    let mut w = LockWorld::default();
    claims(&mut w, 2);
    let mut try_lock = spec(15);
    try_lock.acquire_timeout_seconds = Some(0);
    w.create("try-free", try_lock.clone());
    settle(&mut w);
    assert_eq!(phase(&w, "try-free"), Some(Phase::Granted));
    w.create("try-full", try_lock);
    settle(&mut w);
    assert_eq!(phase(&w, "try-full"), Some(Phase::TimedOut));
}

#[test]
fn a_deadline_times_out_a_waiter_and_its_ttl_deletes_it() {
    let mut w = LockWorld::default();
    claims(&mut w, 3);
    let mut s = spec(15);
    s.acquire_timeout_seconds = Some(4);
    s.ttl_seconds_after_finished = Some(10);
    w.create("late", s);
    settle(&mut w);
    assert_eq!(phase(&w, "late"), Some(Phase::Pending));
    w.advance(secs(6));
    settle(&mut w);
    assert_eq!(phase(&w, "late"), Some(Phase::TimedOut));
    w.advance(secs(12));
    settle(&mut w);
    assert!(!w.claims.contains_key("late"), "deleted after its TTL");
}

#[test]
fn a_duplicate_identity_across_slots_is_rejected() {
    let mut w = LockWorld::default();
    w.create("a", spec(15));
    w.advance(secs(1));
    let mut s = spec(15);
    s.holder_identity = Some("a".into());
    w.create("a-again", s);
    settle(&mut w);
    assert_eq!(phase(&w, "a"), Some(Phase::Granted));
    assert_eq!(phase(&w, "a-again"), Some(Phase::Rejected));
}

#[test]
fn capacity_one_without_slots_is_exactly_the_single_lease_arbiter() {
    let mut w = LockWorld {
        capacity: 1,
        ..LockWorld::default()
    };
    claims(&mut w, 3);
    let plan = w.plan();
    let claims: Vec<&LockClaim> = w.claims.values().collect();
    let single = decide_lease(&Input {
        lease_name: LOCK,
        slot: 0,
        claims: &claims,
        lease: None,
        lease_proven: false,
        pods: &[],
        memory: &Default::default(),
        now: crate::arbiter::Now {
            wall: w.wall,
            mono: w.mono,
        },
        config: w.config,
    });
    let steps: Vec<Step> = plan.steps.into_iter().map(|s| s.step).collect();
    assert_eq!(steps, single.steps);
}

/// The negative control, one history: the capacity was lowered, one holder leaves slot
/// 2 while a waiter gets slot 1 in the same plan. Applied grants first, three claims are
/// Granted under a capacity of two for a moment; in the arbiter's order, never.
#[test]
fn the_model_catches_a_grant_written_before_the_holder_it_replaces_left() {
    for grants_first in [false, true] {
        let mut w = LockWorld {
            grants_first,
            ..LockWorld::default()
        };
        claims(&mut w, 3);
        assert!(w.settle());
        w.capacity = 2;
        let on_one = w
            .claims
            .values()
            .find(|c| c.status.as_ref().and_then(|s| s.slot) == Some(1))
            .and_then(|c| c.metadata.name.clone())
            .expect("slot 1 held");
        w.release(&on_one);
        assert!(w.settle());
        w.create("d", spec(15));
        assert!(w.settle());
        assert_eq!(phase(&w, "d"), Some(Phase::Pending));
        let on_two = w
            .claims
            .values()
            .find(|c| c.status.as_ref().and_then(|s| s.slot) == Some(2))
            .and_then(|c| c.metadata.name.clone())
            .expect("slot 2 held");
        w.release(&on_two);
        w.settle();
        assert_eq!(w.check().is_err(), grants_first, "{:?}", w.violations);
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        id: u8,
        priority: i32,
        holder: bool,
        duration: i32,
        timeout: Option<i64>,
    },
    Delete(u8),
    Release(u8),
    Capacity(u32),
    Advance(u64),
    Reconcile,
    Crash(usize),
    Restart,
    /// Decide, let `inner` happen, then write.
    Stale(Box<Op>),
}

fn leaf() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..8, -1i32..2, proptest::bool::weighted(0.3), 2i32..10, proptest::option::weighted(0.2, prop_oneof![Just(0i64), 1i64..15]))
            .prop_map(|(id, priority, holder, duration, timeout)| Op::Create { id, priority, holder, duration, timeout }),
        1 => (0u8..8).prop_map(Op::Delete),
        2 => (0u8..8).prop_map(Op::Release),
        1 => (1u32..6).prop_map(Op::Capacity),
        3 => (0u64..12_000).prop_map(Op::Advance),
        5 => Just(Op::Reconcile),
        1 => (0usize..10).prop_map(Op::Crash),
        1 => Just(Op::Restart),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => leaf(),
        1 => leaf().prop_map(|o| Op::Stale(Box::new(o))),
    ]
}

fn run(w: &mut LockWorld, op: &Op) {
    let name = |id: &u8| format!("c{id}");
    match op {
        Op::Create {
            id,
            priority,
            holder,
            duration,
            timeout,
        } => {
            if w.claims.contains_key(&name(id)) {
                return;
            }
            let mut s = if *holder {
                holder_spec(*duration)
            } else {
                spec(*duration)
            };
            s.priority = *priority;
            s.acquire_timeout_seconds = *timeout;
            w.create(&name(id), s);
        }
        Op::Delete(id) => w.delete(&name(id)),
        Op::Release(id) => w.release(&name(id)),
        Op::Capacity(c) => w.capacity = *c,
        Op::Advance(ms) => w.advance(Duration::from_millis(*ms)),
        Op::Reconcile => {
            w.reconcile();
        }
        Op::Crash(k) => {
            let plan = w.plan();
            let snap = w.rvs();
            let cap = w.capacity;
            w.apply(&plan, &snap, *k, cap);
            w.restart();
        }
        Op::Restart => w.restart(),
        Op::Stale(inner) => {
            let plan = w.plan();
            let snap = w.rvs();
            let cap = w.capacity;
            run(w, inner);
            w.apply(&plan, &snap, usize::MAX, cap);
        }
    }
}

fn history(ops: &[Op], grants_first: bool) -> Result<(), TestCaseError> {
    let mut w = LockWorld {
        grants_first,
        ..LockWorld::default()
    };
    for op in ops {
        run(&mut w, op);
        if let Err(e) = w.check() {
            return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
        }
    }
    for _ in 0..6 {
        if !w.settle() {
            return Err(TestCaseError::fail("did not settle"));
        }
        w.advance(secs(20));
    }
    w.check_settled()
        .map_err(|e| TestCaseError::fail(format!("settled: {e}")))
}

proptest! {
    #![proptest_config(super::proptests::config())]

    /// At most the capacity in force when they were granted, each slot Lease naming
    /// exactly its claim, tokens rising across slots; settled, every slot used.
    #[test]
    fn lock_invariants_hold_under_random_histories(ops in proptest::collection::vec(op(), 1..60)) {
        history(&ops, false)?;
    }
}

/// The negative control over random histories: applying grants before the holders they
/// replace have left breaks the capacity invariant somewhere in 20,000 histories.
#[test]
fn the_lock_model_catches_grants_written_first_in_random_histories() {
    let mut runner = super::proptests::negative_control_runner();
    let result = runner.run(&proptest::collection::vec(op(), 1..60), |ops| {
        history(&ops, true)
    });
    assert!(result.is_err(), "no history broke the capacity invariant");
}

#[test]
fn a_claim_on_a_reserved_slot_name_is_rejected_and_its_lease_never_written() {
    // leaseName `pool-slot-1` is slot 1 of lock `pool`: a second key must not
    // arbitrate that Lease (a legacy claim from before the CRD refused the name).
    let mut c = LockClaim::new("legacy", LockClaimSpec::for_lease("pool-slot-1"));
    c.metadata.namespace = Some("ns".into());
    c.metadata.uid = Some("u".into());
    let claims = [&c];
    let plan = crate::arbiter::decide(&crate::arbiter::LockInput {
        lock_name: "pool-slot-1",
        capacity: 1,
        claims: &claims,
        leases: &BTreeMap::new(),
        proven: &Default::default(),
        pods: &[],
        memory: &Default::default(),
        now: crate::arbiter::Now {
            wall: jiff::Timestamp::from_second(1_800_000_000).expect("t"),
            mono: secs(10),
        },
        config: Default::default(),
    });
    assert!(
        plan.steps
            .iter()
            .all(|s| matches!(s.step, Step::SetStatus { .. } | Step::Event(_))),
        "only the claim is written: {:#?}",
        plan.steps
    );
    let Step::SetStatus { status, .. } = &plan.steps[0].step else {
        panic!("a status first")
    };
    assert_eq!(status.phase, Some(Phase::Rejected));
    assert!(crate::arbiter::reserved_slot_name("pool-slot-1"));
    assert!(
        !crate::arbiter::reserved_slot_name("pool-slot-x")
            && !crate::arbiter::reserved_slot_name("slot-1")
    );
}
