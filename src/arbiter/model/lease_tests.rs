//! One test per rule of the arbiter, driven through the API model in `sim`.

use std::time::Duration;

use super::lease_world::{spec, HolderProc, World};
use crate::api::{Phase, Renewal, CONDITION_GRANTED};
use crate::api::{CONDITION_FINISHED, LOCK_DELAY_ANNOTATION};
use crate::api::{FINALIZER, MANAGED_BY_LABEL};
use crate::arbiter::{LeaseWriteKind, Reason, Step, Target};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn holder_spec(d: i32) -> crate::api::LockClaimSpec {
    let mut s = spec(d);
    s.renewal = Renewal::Holder;
    s
}

fn reasons(w: &World, target: &str) -> Vec<&'static str> {
    w.notes
        .iter()
        .filter(|n| n.target == Target::Claim(target.into()))
        .map(|n| n.reason.as_str())
        .collect()
}

#[test]
fn a_claim_on_an_absent_lease_creates_it_and_is_granted() {
    let mut w = World::default();
    w.create("a", spec(15));
    w.settle();
    let lease = w.lease().cloned().expect("lease created");
    let ls = lease.spec.clone().expect("spec");
    assert_eq!(ls.holder_identity.as_deref(), Some("a"));
    assert_eq!(ls.lease_duration_seconds, Some(15));
    assert_eq!(ls.lease_transitions, Some(0));
    assert!(ls.acquire_time.is_some() && ls.renew_time.is_some());
    assert_eq!(
        lease
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY_LABEL))
            .map(String::as_str),
        Some("leasekeeper")
    );
    let st = w.status("a");
    assert_eq!(st.phase, Some(Phase::Granted));
    assert_eq!(st.holder_identity.as_deref(), Some("a"));
    let token = st.fencing_token.expect("token");
    let lease_rv: i64 = lease
        .metadata
        .resource_version
        .expect("rv")
        .parse()
        .expect("int");
    assert_eq!(
        token, lease_rv,
        "the token is the Lease's resourceVersion after the granting write"
    );
    assert!(
        w.claims["a"].metadata.finalizers.is_none(),
        "claims carry no finalizer"
    );
    let ann = lease.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        ann.get(crate::api::CLAIM_ANNOTATION).map(String::as_str),
        Some("a")
    );
    assert_eq!(
        ann.get(crate::api::CLAIM_UID_ANNOTATION),
        w.claims["a"].metadata.uid.as_ref(),
        "the grant names the claim's uid"
    );
    assert_eq!(
        w.condition_status("a", CONDITION_GRANTED).as_deref(),
        Some("True")
    );
    assert!(reasons(&w, "a").contains(&Reason::Granted.as_str()));
}

#[test]
fn a_legacy_finalizer_comes_off_after_the_lease_moves_and_none_is_added() {
    let mut w = World::default();
    w.create("a", spec(15));
    w.claims.get_mut("a").expect("a").metadata.finalizers = Some(vec![FINALIZER.into()]);
    w.create("b", spec(15));
    let plan = w.plan();
    assert!(!plan
        .steps
        .iter()
        .any(|s| matches!(s, Step::AddFinalizer { .. })));
    let write = plan
        .steps
        .iter()
        .position(|s| matches!(s, Step::WriteLease { .. }));
    let off = plan
        .steps
        .iter()
        .position(|s| matches!(s, Step::RemoveFinalizer { .. }));
    assert!(write.expect("lease write") < off.expect("legacy finalizer off"));
    w.settle();
    assert!(w
        .claims
        .values()
        .all(|c| c.metadata.finalizers.as_ref().is_none_or(|f| f.is_empty())));
}

#[test]
fn waiting_claims_get_queue_positions_priority_first_then_age() {
    let mut w = World::default();
    w.create("holder", spec(15));
    w.settle();
    w.advance(secs(1));
    w.create("b", spec(15));
    w.advance(secs(1));
    w.create("c", spec(15));
    w.advance(secs(1));
    let mut high = spec(15);
    high.priority = 10;
    w.create("d-high", high);
    w.settle();
    assert_eq!(w.status("d-high").queue_position, Some(1));
    assert_eq!(w.status("b").queue_position, Some(2));
    assert_eq!(w.status("c").queue_position, Some(3));
    for n in ["b", "c", "d-high"] {
        let st = w.status(n);
        assert_eq!(st.phase, Some(Phase::Pending));
        assert_eq!(st.holder_identity.as_deref(), Some("holder"));
        assert_eq!(
            w.claims[n]
                .condition(CONDITION_GRANTED)
                .map(|c| c.reason.as_str()),
            Some(Reason::Queued.as_str())
        );
        assert!(reasons(&w, n).contains(&Reason::Queued.as_str()));
    }
    w.check_settled().expect("settled");
}

#[test]
fn equal_priority_and_same_second_ties_go_by_name() {
    let mut w = World::default();
    w.create("holder", spec(15));
    w.settle();
    w.create("zz", spec(15));
    w.create("aa", spec(15));
    w.settle();
    assert_eq!(w.status("aa").queue_position, Some(1));
    assert_eq!(w.status("zz").queue_position, Some(2));
}

#[test]
fn delete_hands_the_lease_straight_to_the_next_claim() {
    let mut w = World::default();
    w.create("a", spec(15));
    w.settle();
    w.advance(secs(1));
    w.create("b", spec(15));
    w.create("c", spec(15));
    w.settle();
    let t1 = w.status("a").fencing_token.expect("token");
    w.delete("a");
    w.settle();
    assert!(
        !w.claims.contains_key("a"),
        "the finalizer was removed and the claim is gone"
    );
    assert_eq!(w.phase("b"), Some(Phase::Granted));
    assert!(w.status("b").fencing_token.expect("token") > t1);
    assert_eq!(w.holder().as_deref(), Some("b"));
    assert_eq!(
        w.lease()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.lease_transitions),
        Some(1)
    );
    assert_eq!(w.status("c").queue_position, Some(1));
}

#[test]
fn release_true_marks_released_then_the_next_claim_is_granted_in_that_order() {
    let mut w = World::default();
    w.create("a", spec(15));
    w.settle();
    w.create("b", spec(15));
    w.settle();
    w.release("a");
    let plan = w.plan();
    let pos =
        |pred: &dyn Fn(&Step) -> bool| plan.steps.iter().position(pred).expect("step present");
    let demote = pos(&|s| matches!(s, Step::SetStatus { claim, .. } if claim == "a"));
    let write = pos(&|s| matches!(s, Step::WriteLease { .. }));
    let grant =
        pos(&|s| matches!(s, Step::SetStatus { claim, fill_token: true, .. } if claim == "b"));
    assert!(
        demote < write && write < grant,
        "old not Granted -> Lease -> new Granted"
    );
    w.settle();
    assert_eq!(w.phase("a"), Some(Phase::Released));
    assert_eq!(w.phase("b"), Some(Phase::Granted));
    assert_eq!(
        w.condition_status("a", CONDITION_FINISHED).as_deref(),
        Some("True")
    );
    assert!(reasons(&w, "a").contains(&Reason::Released.as_str()));
}

#[test]
fn release_with_nobody_waiting_clears_the_lease() {
    let mut w = World::default();
    w.create("a", spec(15));
    w.settle();
    w.release("a");
    w.settle();
    assert_eq!(w.holder(), None);
    w.check_settled().expect("settled");
}

#[test]
fn a_holder_that_renews_stays_granted_and_one_that_stops_expires_after_the_duration() {
    let mut w = World::default();
    w.create("a", holder_spec(10));
    w.settle();
    w.create("b", holder_spec(10));
    w.settle();
    for _ in 0..10 {
        w.advance(secs(3));
        w.renew("a", 0);
        w.settle();
        assert_eq!(w.phase("a"), Some(Phase::Granted));
    }
    // Renewals stop now.
    w.advance(secs(9));
    w.settle();
    assert_eq!(
        w.phase("a"),
        Some(Phase::Granted),
        "not expired before leaseDurationSeconds"
    );
    w.advance(secs(1));
    let plan = w.reconcile();
    w.settle();
    assert_eq!(w.phase("a"), Some(Phase::Expired));
    assert_eq!(w.phase("b"), Some(Phase::Granted));
    assert!(plan
        .outcomes
        .contains(&crate::arbiter::Outcome::Expired(Reason::Expired)));
    assert!(w.status("a").expire_time.is_some());
}

#[test]
fn expiry_is_scheduled_for_the_instant_it_falls_due() {
    let mut w = World::default();
    w.create("a", holder_spec(10));
    w.settle();
    w.advance(secs(4));
    w.renew("a", 0);
    let plan = w.reconcile();
    assert_eq!(
        plan.requeue_after,
        Some(secs(10)),
        "due one full duration after the renewal was observed"
    );
}

#[test]
fn lock_delay_keeps_the_lease_unassigned_after_an_expiry() {
    let mut w = World::default();
    let mut s = holder_spec(5);
    s.lock_delay_seconds = 7;
    w.create("a", s);
    w.settle();
    w.create("b", holder_spec(5));
    w.settle();
    w.advance(secs(5));
    w.settle();
    assert_eq!(w.phase("a"), Some(Phase::Expired));
    assert_eq!(w.phase("b"), Some(Phase::Pending));
    assert_eq!(w.holder(), None);
    let ann = w
        .lease()
        .and_then(|l| l.metadata.annotations.as_ref())
        .and_then(|a| a.get(LOCK_DELAY_ANNOTATION).cloned());
    assert!(
        ann.is_some(),
        "the delay survives a restart through the Lease annotation"
    );
    assert_eq!(w.reason("b").as_deref(), Some(Reason::LockDelay.as_str()));
    w.restart();
    w.advance(secs(6));
    w.settle();
    assert_eq!(
        w.phase("b"),
        Some(Phase::Pending),
        "still inside the 7 s delay"
    );
    w.advance(secs(1));
    w.settle();
    assert_eq!(w.phase("b"), Some(Phase::Granted));
}

#[test]
fn a_clean_release_has_no_lock_delay() {
    let mut w = World::default();
    let mut s = spec(5);
    s.lock_delay_seconds = 30;
    w.create("a", s);
    w.settle();
    w.create("b", spec(5));
    w.settle();
    w.release("a");
    w.settle();
    assert_eq!(w.phase("b"), Some(Phase::Granted));
}

#[test]
fn controller_renewal_refreshes_the_lease_every_third_of_the_duration() {
    let mut w = World::default();
    w.create("a", spec(15));
    w.settle();
    let renew_time = |w: &World| {
        w.lease()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.renew_time.clone())
    };
    let first = renew_time(&w);
    w.advance(secs(4));
    w.settle();
    assert_eq!(renew_time(&w), first, "not before a third of the duration");
    w.advance(secs(1));
    let plan = w.reconcile();
    assert!(plan.steps.iter().any(|s| matches!(
        s,
        Step::WriteLease {
            kind: crate::arbiter::LeaseWriteKind::Renew,
            ..
        }
    )));
    assert_ne!(renew_time(&w), first);
    for _ in 0..40 {
        w.advance(secs(5));
        w.settle();
    }
    assert_eq!(
        w.phase("a"),
        Some(Phase::Granted),
        "a Controller claim lasts while it exists"
    );
}

#[test]
fn max_hold_ends_a_grant_as_expired() {
    let mut w = World::default();
    let mut s = spec(15);
    s.max_hold_seconds = Some(20);
    w.create("a", s);
    w.settle();
    w.advance(Duration::from_millis(19_900));
    w.settle();
    assert_eq!(
        w.phase("a"),
        Some(Phase::Granted),
        "not before maxHoldSeconds"
    );
    w.advance(Duration::from_millis(100));
    w.settle();
    assert_eq!(w.phase("a"), Some(Phase::Expired));
    assert_eq!(
        w.reason("a").as_deref(),
        Some(Reason::MaxHoldExceeded.as_str())
    );
}

#[test]
fn clock_skew_of_the_holder_never_expires_a_holder_that_renews() {
    for skew in [-600, 600] {
        let mut w = World::default();
        w.create("a", holder_spec(10));
        w.settle();
        w.healthy.insert(
            "a".into(),
            HolderProc {
                identity: "a".into(),
                every: secs(3),
                skew_secs: skew,
                next: w.mono + secs(3),
            },
        );
        for i in 0..30 {
            w.advance(secs(2));
            if i % 7 == 3 {
                w.restart();
            }
            w.settle();
            assert_eq!(w.phase("a"), Some(Phase::Granted), "skew {skew}, round {i}");
        }
    }
}

#[test]
fn after_a_restart_a_dead_holder_gets_a_bounded_grace() {
    let mut w = World::default();
    w.create("a", holder_spec(10));
    w.settle();
    w.create("b", holder_spec(10));
    w.settle();
    w.advance(secs(8));
    w.restart();
    w.settle();
    // The Lease's renewTime is 8 s old: grace = max(10 - 8, 10 / 2) = 5 s.
    w.advance(Duration::from_millis(4900));
    w.settle();
    assert_eq!(w.phase("a"), Some(Phase::Granted));
    w.advance(Duration::from_millis(100));
    w.settle();
    assert_eq!(w.phase("a"), Some(Phase::Expired));
    assert_eq!(w.phase("b"), Some(Phase::Granted));
}

#[test]
fn after_a_restart_a_fresh_lease_gets_a_full_duration() {
    let mut w = World::default();
    w.create("a", holder_spec(10));
    w.settle();
    w.advance(secs(1));
    w.renew("a", 0);
    w.restart();
    w.settle();
    w.advance(Duration::from_millis(9900));
    w.settle();
    assert_eq!(w.phase("a"), Some(Phase::Granted));
    w.advance(Duration::from_millis(100));
    w.settle();
    assert_eq!(w.phase("a"), Some(Phase::Expired));
}

#[test]
fn an_outsiders_lease_is_respected_while_renewed_then_taken_over_when_its_owner_allows() {
    let mut w = World::default();
    w.outsider_write(Some("someone-else"), 6, true);
    w.create("a", spec(15));
    w.settle();
    assert_eq!(w.phase("a"), Some(Phase::Pending));
    assert_eq!(
        w.reason("a").as_deref(),
        Some(Reason::HeldExternally.as_str())
    );
    assert_eq!(
        w.status("a").holder_identity.as_deref(),
        Some("someone-else")
    );
    for _ in 0..5 {
        w.advance(secs(4));
        w.outsider_write(Some("someone-else"), 6, true);
        w.settle();
        assert_eq!(w.phase("a"), Some(Phase::Pending));
    }
    w.advance(secs(6));
    w.settle();
    assert_eq!(w.phase("a"), Some(Phase::Granted));
    assert!(reasons(&w, "a").contains(&Reason::TakenOver.as_str()));
    assert!(w
        .notes
        .iter()
        .any(|n| n.target == Target::Lease && n.reason == Reason::TakenOver));
    let lease = w.lease().expect("lease");
    assert!(
        !crate::arbiter::is_managed(lease),
        "an outsider's Lease is not labelled as ours"
    );
}

#[test]
fn a_foreign_lease_is_never_written_and_its_claims_wait_with_lease_not_managed() {
    let mut w = World::default();
    w.outsider_write(Some("app-0_abc"), 2, false);
    let rv = w.lease().and_then(|l| l.metadata.resource_version.clone());
    let mut s = spec(86_400);
    s.holder_identity = Some("app-0_abc".into());
    w.create("adopt", s);
    w.create("grab", spec(1));
    for _ in 0..5 {
        w.settle();
        w.advance(secs(10));
    }
    w.delete("adopt");
    w.settle();
    assert_eq!(
        w.lease().and_then(|l| l.metadata.resource_version.clone()),
        rv,
        "the Lease was never written"
    );
    assert_eq!(w.phase("grab"), Some(Phase::Pending));
    let c = w.claims["grab"]
        .condition(CONDITION_GRANTED)
        .cloned()
        .expect("condition");
    assert_eq!(c.reason, Reason::LeaseNotManaged.as_str());
    assert!(
        c.message.contains("leasekeeper.io/takeover=allowed"),
        "{}",
        c.message
    );
    let warnings = w
        .notes
        .iter()
        .filter(|n| {
            n.warning
                && n.reason == Reason::LeaseNotManaged
                && n.target == Target::Claim("grab".into())
        })
        .count();
    assert_eq!(
        warnings, 1,
        "one Warning Event when the claim starts waiting on it"
    );
    // Once the owner allows it, the stalled Lease is taken over.
    if let Some(l) = w.lease_mut() {
        l.metadata.labels = Some(
            [(
                crate::api::TAKEOVER_LABEL.to_string(),
                crate::api::TAKEOVER_ALLOWED.to_string(),
            )]
            .into(),
        );
    }
    w.settle();
    assert_eq!(w.phase("grab"), Some(Phase::Granted));
}

/// A Lease run by coordinated leader election (`spec.strategy` set) is never written,
/// not even one leasekeeper created (someone set the strategy since) nor one its owner
/// opened to a takeover; never deleted by the GC either; its claims say why they wait.
#[test]
fn a_lease_run_by_coordinated_leader_election_is_never_written_or_collected() {
    let mut w = World::default();
    w.create("first", spec(15));
    w.settle();
    w.delete("first");
    w.settle();
    let l = w.lease_mut().expect("our Lease");
    assert!(crate::arbiter::is_managed(l));
    let labels = l.metadata.labels.get_or_insert_with(Default::default);
    labels.insert(
        crate::api::TAKEOVER_LABEL.into(),
        crate::api::TAKEOVER_ALLOWED.into(),
    );
    if let Some(spec) = l.spec.as_mut() {
        spec.strategy = Some("OldestEmulationVersion".into());
        spec.holder_identity = None;
    }
    let rv = l.metadata.resource_version.clone();
    w.create("grab", spec(1));
    for _ in 0..5 {
        w.settle();
        w.advance(secs(120));
    }
    let after = w.lease().expect("never deleted by the GC");
    assert_eq!(after.metadata.resource_version, rv, "never written");
    assert_eq!(w.phase("grab"), Some(Phase::Pending));
    let c = w.claims["grab"]
        .condition(CONDITION_GRANTED)
        .cloned()
        .expect("condition");
    assert_eq!(c.reason, Reason::LeaseNotManaged.as_str());
    assert!(
        c.message.contains("coordinated leader election")
            && c.message.contains("OldestEmulationVersion"),
        "{}",
        c.message
    );
}

#[test]
fn the_holders_identity_alone_never_makes_a_claim_the_holder() {
    let mut w = World::default();
    w.outsider_write(Some("app-0_abc"), 30, true);
    let mut s = spec(1);
    s.holder_identity = Some("app-0_abc".into());
    w.create("adopt", s);
    w.settle();
    assert_eq!(
        w.phase("adopt"),
        Some(Phase::Pending),
        "not adopted by identity"
    );
    assert_eq!(
        w.reason("adopt").as_deref(),
        Some(Reason::HeldExternally.as_str())
    );
}

#[test]
fn expiry_and_max_hold_follow_the_claim_not_fields_the_holder_edits_on_the_lease() {
    let mut w = World::default();
    w.create("a", holder_spec(4));
    w.settle();
    w.holder_stretches_lease();
    w.advance(secs(3));
    w.settle();
    assert_eq!(w.phase("a"), Some(Phase::Granted));
    w.advance(secs(2));
    w.settle();
    assert_eq!(
        w.phase("a"),
        Some(Phase::Expired),
        "expired by the claim's 4 s"
    );
    let mut s = holder_spec(10);
    s.max_hold_seconds = Some(5);
    w.create("b", s);
    w.settle();
    assert_eq!(w.phase("b"), Some(Phase::Granted));
    for _ in 0..4 {
        w.advance(secs(2));
        w.renew("b", 0);
        w.holder_stretches_lease();
        w.settle();
    }
    assert_eq!(w.phase("b"), Some(Phase::Expired));
    assert_eq!(
        w.reason("b").as_deref(),
        Some(Reason::MaxHoldExceeded.as_str())
    );
}

#[test]
fn a_deleted_holder_hands_the_lease_on_with_one_write_and_its_grant_is_counted() {
    let mut w = World::default();
    w.create("a", spec(15));
    w.settle();
    w.create("b", spec(15));
    w.settle();
    w.delete("a");
    let plan = w.reconcile();
    assert!(plan.outcomes.contains(&crate::arbiter::Outcome::Released));
    let lease_writes = plan
        .steps
        .iter()
        .filter(|s| matches!(s, Step::WriteLease { .. }))
        .count();
    assert_eq!(
        lease_writes, 1,
        "straight to the next holder: {:#?}",
        plan.steps
    );
    assert_eq!(w.phase("b"), Some(Phase::Granted));
    assert_eq!(w.holder().as_deref(), Some("b"));
}

#[test]
fn a_claim_created_again_under_the_holders_name_is_not_the_holder() {
    let mut w = World::default();
    w.create("a", spec(15));
    w.settle();
    let t1 = w.status("a").fencing_token.expect("token");
    w.advance(secs(1));
    w.recreate("a");
    w.settle();
    assert_eq!(w.phase("a"), Some(Phase::Granted));
    let t2 = w.status("a").fencing_token.expect("token");
    assert!(
        t2 > t1,
        "a new grant (token {t2} after {t1}), not the old one taken over"
    );
}

#[test]
fn a_duplicate_identity_is_rejected_and_the_older_claim_kept() {
    let mut w = World::default();
    let mut s = spec(15);
    s.holder_identity = Some("worker".into());
    w.create("first", s.clone());
    w.advance(secs(1));
    w.create("second", s);
    w.settle();
    assert_eq!(w.phase("first"), Some(Phase::Granted));
    assert_eq!(w.phase("second"), Some(Phase::Rejected));
    assert_eq!(
        w.reason("second").as_deref(),
        Some(Reason::DuplicateIdentity.as_str())
    );
}

#[test]
fn an_unused_managed_lease_is_garbage_collected_and_tokens_keep_rising() {
    let mut w = World::default();
    w.create("a", spec(15));
    w.settle();
    let t1 = w.status("a").fencing_token.expect("token");
    w.delete("a");
    w.settle();
    assert!(w.lease().is_some());
    w.advance(secs(59));
    w.settle();
    assert!(w.lease().is_some(), "not before the grace period");
    w.advance(secs(1));
    let plan = w.reconcile();
    assert!(w.lease().is_none(), "deleted after the grace period");
    assert!(plan
        .steps
        .iter()
        .any(|s| matches!(s, Step::Event(n) if n.reason == Reason::LeaseGarbageCollected)));
    w.create("b", spec(15));
    w.settle();
    assert!(w.status("b").fencing_token.expect("token") > t1);
}

#[test]
fn a_lease_we_did_not_create_is_never_garbage_collected() {
    let mut w = World::default();
    w.outsider_write(None, 15, false);
    w.advance(secs(3600));
    w.settle();
    assert!(w.lease().is_some());
}

#[test]
fn finished_claims_are_deleted_after_their_ttl() {
    let mut w = World::default();
    let mut s = spec(15);
    s.ttl_seconds_after_finished = Some(30);
    w.create("a", s);
    w.settle();
    w.release("a");
    w.settle();
    w.advance(Duration::from_millis(29_900));
    w.settle();
    assert!(
        w.claims.contains_key("a"),
        "not before ttlSecondsAfterFinished"
    );
    w.advance(Duration::from_millis(1_200));
    w.settle();
    assert!(!w.claims.contains_key("a"));
}

#[test]
fn a_claim_deleted_or_released_while_waiting_is_never_granted() {
    let mut w = World::default();
    w.create("a", spec(15));
    w.settle();
    w.create("b", spec(15));
    w.create("c", spec(15));
    w.settle();
    w.delete("b");
    w.release("c");
    w.release("a");
    w.settle();
    assert!(!w.claims.contains_key("b"));
    assert_eq!(w.phase("c"), Some(Phase::Released));
    assert_eq!(w.holder(), None);
    assert!(!reasons(&w, "b").contains(&Reason::Granted.as_str()));
    assert!(!reasons(&w, "c").contains(&Reason::Granted.as_str()));
}

#[test]
fn last_transition_time_moves_only_when_the_status_flips() {
    let mut w = World::default();
    w.create("a", spec(15));
    w.settle();
    w.create("b", spec(15));
    w.settle();
    let ltt = |w: &World| {
        w.claims["b"]
            .condition(CONDITION_GRANTED)
            .map(|c| c.last_transition_time.clone())
    };
    let before = ltt(&w);
    w.advance(secs(5));
    let mut hi = spec(15);
    hi.priority = 5;
    w.create("c", hi);
    w.settle();
    assert_eq!(w.status("b").queue_position, Some(2));
    assert_eq!(ltt(&w), before, "position changed, Granted stayed False");
    w.advance(secs(5));
    w.release("a");
    w.release("c");
    w.settle();
    assert_eq!(w.phase("b"), Some(Phase::Granted));
    assert_ne!(ltt(&w), before, "flipped to True");
    let c = w.claims["b"]
        .condition(CONDITION_GRANTED)
        .cloned()
        .expect("condition");
    assert_eq!(c.observed_generation, Some(1));
    assert_eq!(w.status("b").observed_generation, Some(1));
}

#[test]
fn a_lease_deleted_while_held_is_reported_and_regranted() {
    let mut w = World::default();
    w.create("a", spec(15));
    w.settle();
    w.create("b", spec(15));
    w.settle();
    w.delete_lease();
    w.settle();
    assert_eq!(w.phase("a"), Some(Phase::Expired));
    assert_eq!(w.reason("a").as_deref(), Some(Reason::LeaseLost.as_str()));
    assert!(w
        .notes
        .iter()
        .any(|n| n.warning && n.target == Target::Claim("a".into())));
    assert_eq!(w.phase("b"), Some(Phase::Granted));
}

#[test]
fn a_grant_interrupted_after_the_lease_write_is_completed() {
    let mut w = World::default();
    w.create("a", spec(15));
    let plan = w.plan();
    let snap = w.rvs();
    let write = plan
        .steps
        .iter()
        .position(|s| matches!(s, Step::WriteLease { .. }))
        .expect("write");
    assert!(
        !w.apply(&plan, &snap, write + 1),
        "crash right after the Lease write"
    );
    assert_eq!(w.holder().as_deref(), Some("a"));
    assert_eq!(w.phase("a"), None);
    w.restart();
    let plan = w.plan();
    let completion: Vec<&Step> = plan
        .steps
        .iter()
        .filter(|s| !matches!(s, Step::Event(_)))
        .collect();
    assert!(
        matches!(
            completion.as_slice(),
            [
                Step::WriteLease {
                    kind: LeaseWriteKind::Renew,
                    ..
                },
                Step::SetStatus {
                    fill_token: true,
                    ..
                }
            ]
        ),
        "the completion writes the Lease and takes its token from that write \
         (a token from the interrupted write could be below a grant published since): {completion:?}"
    );
    let interrupted = w
        .lease()
        .and_then(|l| l.metadata.resource_version.as_deref())
        .and_then(|rv| rv.parse::<i64>().ok());
    w.settle();
    assert_eq!(w.phase("a"), Some(Phase::Granted));
    assert!(w.status("a").fencing_token > interrupted);
}

#[test]
fn a_plan_decided_from_a_stale_lease_is_refused_by_the_precondition() {
    let mut w = World::default();
    w.create("a", holder_spec(15));
    w.settle();
    w.create("b", holder_spec(15));
    w.settle();
    w.advance(secs(15));
    let plan = w.plan(); // decides to expire a
    let snap = w.rvs();
    w.renew("a", 0); // ...but a renews first
    w.apply(&plan, &snap, usize::MAX);
    assert_eq!(
        w.holder().as_deref(),
        Some("a"),
        "the stale Lease write was refused"
    );
    w.check().expect("invariants");
}

fn status_writes(plan: &crate::arbiter::Plan) -> usize {
    plan.steps
        .iter()
        .filter(|s| matches!(s, Step::SetStatus { .. }))
        .count()
}

#[test]
fn waiters_past_the_exact_positions_carry_no_number_and_say_how_far_back_they_are() {
    let mut w = World::default(); // exact_positions: 3
    w.create("holder", spec(15));
    w.settle();
    for i in 0..5 {
        w.advance(secs(1));
        w.create(&format!("w{i}"), spec(15));
    }
    w.settle_fully();
    assert_eq!(w.status("w2").queue_position, Some(3));
    for late in ["w3", "w4"] {
        assert_eq!(w.status(late).queue_position, None);
        let msg = w.claims[late]
            .condition(CONDITION_GRANTED)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        assert!(msg.contains("more than 3 claims ahead"), "{msg}");
    }
    w.check_settled().expect("settled");
}

#[test]
fn a_handoff_costs_a_bounded_number_of_status_writes_however_long_the_queue() {
    let mut w = World::default();
    w.create("holder", spec(15));
    w.settle();
    for i in 0..50 {
        w.advance(Duration::from_millis(1100));
        w.create(&format!("w{i:02}"), spec(15));
        w.settle();
    }
    w.settle_fully();
    w.delete("holder");
    let plan = w.reconcile();
    // w00 granted; w01 next in line now: at once; w03 enters the exact positions: at
    // once. w02 moved up: later. Everyone further back: unchanged (no number, no holder).
    assert_eq!(w.phase("w00"), Some(Phase::Granted));
    assert_eq!(w.status("w01").queue_position, Some(1));
    assert_eq!(
        w.status("w02").queue_position,
        Some(3),
        "moved up: deferred"
    );
    assert_eq!(
        status_writes(&plan),
        3,
        "a handoff with 49 waiters: the new holder, the next in line, the one entering the exact positions"
    );
    // A burst of handoffs inside the delay: still nothing for the waiters behind.
    w.release("w00");
    let plan = w.reconcile();
    assert!(status_writes(&plan) <= 4, "{}", status_writes(&plan));
    // After the delay, the queue is rewritten once, at most the exact positions.
    w.advance(secs(1));
    let plan = w.reconcile();
    assert!(status_writes(&plan) <= 3, "{}", status_writes(&plan));
    w.check_settled()
        .expect("true positions once the delay ran out");
}

#[test]
fn a_waiter_pushed_back_by_a_higher_priority_claim_is_told_at_once() {
    let mut w = World::default();
    w.create("holder", spec(15));
    w.settle();
    w.advance(secs(1));
    w.create("a", spec(15));
    w.settle_fully();
    assert_eq!(w.status("a").queue_position, Some(1));
    let mut urgent = spec(15);
    urgent.priority = 10;
    w.create("vip", urgent);
    w.settle();
    assert_eq!(w.status("vip").queue_position, Some(1));
    assert_eq!(
        w.status("a").queue_position,
        Some(2),
        "moving back is written at once"
    );
}

#[test]
fn a_waiter_past_its_acquire_timeout_times_out_and_finishes_and_the_holder_keeps_the_lease() {
    let mut w = World::default();
    w.create("holder", spec(15));
    w.settle();
    let mut s = spec(15);
    s.acquire_timeout_seconds = Some(5);
    s.ttl_seconds_after_finished = Some(30);
    w.create("impatient", s);
    w.settle();
    assert_eq!(w.status("impatient").phase, Some(Phase::Pending));
    // creationTimestamp has one-second precision: never early, at most a second late.
    w.advance(secs(5));
    w.settle();
    assert_eq!(w.status("impatient").phase, Some(Phase::Pending), "early");
    w.advance(secs(1) + Duration::from_millis(10));
    w.settle();
    let st = w.status("impatient");
    assert_eq!(st.phase, Some(Phase::TimedOut));
    let granted = w.claims["impatient"].condition(CONDITION_GRANTED).cloned();
    assert_eq!(
        granted.map(|c| (c.status, c.reason)),
        Some(("False".into(), Reason::AcquireTimeout.as_str().into()))
    );
    assert_eq!(
        w.condition_status("impatient", CONDITION_FINISHED)
            .as_deref(),
        Some("True")
    );
    assert!(reasons(&w, "impatient").contains(&Reason::AcquireTimeout.as_str()));
    assert_eq!(w.status("holder").phase, Some(Phase::Granted));
    // ttlSecondsAfterFinished applies to a timed-out claim.
    w.advance(secs(32));
    w.settle();
    assert!(!w.claims.contains_key("impatient"), "deleted by its TTL");
}

#[test]
fn a_try_lock_is_granted_on_a_free_lease_and_times_out_at_once_on_a_held_one() {
    let mut w = World::default();
    let mut try_lock = spec(15);
    try_lock.acquire_timeout_seconds = Some(0);
    w.create("first", try_lock.clone());
    w.settle();
    assert_eq!(w.status("first").phase, Some(Phase::Granted));
    w.create("second", try_lock.clone());
    w.settle();
    assert_eq!(w.status("second").phase, Some(Phase::TimedOut));
    assert_eq!(w.status("first").phase, Some(Phase::Granted));
    // Behind a higher-priority waiter a Lease freed at that moment is not its either.
    let mut vip = spec(15);
    vip.priority = 10;
    w.create("vip", vip);
    w.settle();
    w.release("first");
    w.create("third", try_lock);
    w.settle();
    assert_eq!(w.status("vip").phase, Some(Phase::Granted));
    assert_eq!(w.status("third").phase, Some(Phase::TimedOut));
}

#[test]
fn a_waiter_granted_before_its_deadline_is_never_timed_out() {
    let mut w = World::default();
    w.create("holder", spec(15));
    w.settle();
    let mut s = spec(15);
    s.acquire_timeout_seconds = Some(10);
    w.create("next", s);
    w.settle();
    w.advance(secs(3));
    w.release("holder");
    w.settle();
    w.advance(secs(30));
    w.settle();
    assert_eq!(w.status("next").phase, Some(Phase::Granted));
}
