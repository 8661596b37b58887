//! Reconcile failures that persist. A lock whose reconciles fail for one reason several
//! times in a row (a Lease write refused by an admission policy, RBAC taken away, a
//! status write the API server keeps rejecting) shows it on its claims: a Warning Event
//! and the condition `Reconciled=False` naming the reason and the error, so that
//! `kubectl describe lockclaim` tells what logs and counters alone would hide. The first
//! reconcile that succeeds afterwards turns the condition True again.
//!
//! [`Streak`] decides when to say so (pure, no clock); the controller writes.

use jiff::Timestamp;

use super::status::{base, set_condition};
use super::Reason;
use crate::api::{LockClaim, LockClaimStatus, Phase, CONDITION_GRANTED, CONDITION_RECONCILED};

/// Failures in a row, for one reason, that make a failure persistent.
pub const PERSISTENT_FAILURES: u32 = 3;
/// At most this many claims of one lock are told (holders first, then the head of the
/// queue), so that a failing lock with a thousand waiters costs a bounded number of writes.
pub const MAX_NOTIFIED: usize = 20;

/// The run of failures of one lock's reconciles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Streak {
    reason: Option<String>,
    count: u32,
    /// The current reason has been announced.
    announced: bool,
    /// A `Reconciled=False` condition is out there (maybe for an earlier reason).
    shown: bool,
}

/// What to tell the claims of a lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Reconciles failed `count` times in a row for `reason`.
    Failing {
        /// The error's reason (`LeaseWriteFailed`, ...).
        reason: String,
        /// Failures in a row.
        count: u32,
    },
    /// A reconcile succeeded after a failure was announced.
    Recovered,
}

impl Streak {
    /// A reconcile failed for `reason`; a notice once the same reason failed
    /// [`PERSISTENT_FAILURES`] times in a row, and only once per run of it.
    pub fn failed(&mut self, reason: &str) -> Option<Notice> {
        if self.reason.as_deref() == Some(reason) {
            self.count = self.count.saturating_add(1);
        } else {
            self.reason = Some(reason.to_string());
            self.count = 1;
            self.announced = false;
        }
        if self.count < PERSISTENT_FAILURES || self.announced {
            return None;
        }
        self.announced = true;
        self.shown = true;
        Some(Notice::Failing {
            reason: reason.to_string(),
            count: self.count,
        })
    }

    /// A reconcile succeeded: the run ends; a notice if a failure had been shown.
    pub fn succeeded(&mut self) -> Option<Notice> {
        let shown = self.shown;
        *self = Streak::default();
        shown.then_some(Notice::Recovered)
    }
}

/// The claims of a lock to tell: live ones, holders first, then by queue position and
/// age; at most [`MAX_NOTIFIED`].
pub fn notified<'a>(claims: &[&'a LockClaim]) -> Vec<&'a LockClaim> {
    let mut live: Vec<&LockClaim> = claims
        .iter()
        .copied()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .filter(|c| !c.phase().is_some_and(Phase::is_terminal))
        .collect();
    live.sort_by_key(|c| {
        let holds = c.phase() == Some(Phase::Granted);
        let position = c.status.as_ref().and_then(|s| s.queue_position);
        (
            !holds,
            position.unwrap_or(i32::MAX),
            c.metadata.creation_timestamp.clone().map(|t| t.0),
        )
    });
    live.truncate(MAX_NOTIFIED);
    live
}

/// Claims that wait although their lock has a free slot, as the claims say: live
/// claims not Granted (or not yet arbitrated) while fewer than `capacity` claims are
/// Granted. A claim waiting on a Lease someone else holds (`HeldExternally`) or one the
/// operator may not write (`LeaseNotManaged`) has its reason and is not counted. A lock
/// delay makes this briefly non-zero; a grant that keeps failing keeps it non-zero (the
/// alert `LeasekeeperClaimsStuck`).
pub fn stalled_waiters(claims: &[&LockClaim], capacity: u32) -> usize {
    let live = |c: &&&LockClaim| {
        c.metadata.deletion_timestamp.is_none() && !c.phase().is_some_and(Phase::is_terminal)
    };
    let granted = claims
        .iter()
        .filter(live)
        .filter(|c| c.phase() == Some(Phase::Granted))
        .count();
    if granted >= capacity as usize {
        return 0;
    }
    let explained = |c: &LockClaim| {
        c.condition(CONDITION_GRANTED).is_some_and(|x| {
            x.reason == Reason::HeldExternally.as_str()
                || x.reason == Reason::LeaseNotManaged.as_str()
        })
    };
    claims
        .iter()
        .filter(live)
        .filter(|c| c.phase() != Some(Phase::Granted) && !c.spec.release && !explained(c))
        .count()
}

/// The status that says `c`'s lock keeps failing: `Reconciled=False`, reason
/// `ReconcileFailed`, `message` as given. None if the claim says so already.
pub fn failing_status(c: &LockClaim, message: &str, now: Timestamp) -> Option<LockClaimStatus> {
    let same = c
        .condition(CONDITION_RECONCILED)
        .is_some_and(|x| x.status == "False" && x.message == message);
    if same {
        return None;
    }
    let mut st = base(c);
    set_condition(
        &mut st,
        c,
        CONDITION_RECONCILED,
        false,
        Reason::ReconcileFailed,
        message,
        now,
    );
    Some(st)
}

/// The status that says `c`'s lock reconciles again: `Reconciled=True`. None unless the
/// claim shows `Reconciled=False`.
pub fn recovered_status(c: &LockClaim, now: Timestamp) -> Option<LockClaimStatus> {
    c.condition(CONDITION_RECONCILED)
        .filter(|x| x.status == "False")?;
    let mut st = base(c);
    set_condition(
        &mut st,
        c,
        CONDITION_RECONCILED,
        true,
        Reason::Reconciled,
        "reconciled again after the failures",
        now,
    );
    Some(st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::LockClaimSpec;
    use proptest::prelude::*;

    fn claim(name: &str, phase: Option<Phase>, position: Option<i32>) -> LockClaim {
        let mut c = LockClaim::new(name, LockClaimSpec::for_lease("l"));
        c.metadata.generation = Some(1);
        c.status = Some(LockClaimStatus {
            phase,
            queue_position: position,
            ..LockClaimStatus::default()
        });
        c
    }

    #[test]
    fn a_reason_failing_three_times_in_a_row_is_announced_once_and_recovery_once() {
        let mut s = Streak::default();
        assert_eq!(s.failed("LeaseWriteFailed"), None);
        assert_eq!(s.failed("LeaseWriteFailed"), None);
        assert_eq!(
            s.failed("LeaseWriteFailed"),
            Some(Notice::Failing {
                reason: "LeaseWriteFailed".into(),
                count: 3
            })
        );
        assert_eq!(s.failed("LeaseWriteFailed"), None, "announced twice");
        assert_eq!(s.succeeded(), Some(Notice::Recovered));
        assert_eq!(s.succeeded(), None, "recovered twice");
    }

    #[test]
    fn a_change_of_reason_starts_a_new_run_and_recovery_follows_an_older_announcement() {
        let mut s = Streak::default();
        for _ in 0..3 {
            s.failed("LeaseWriteFailed");
        }
        assert_eq!(s.failed("ClaimStatusFailed"), None);
        assert_eq!(s.failed("ClaimStatusFailed"), None);
        assert!(
            matches!(s.failed("ClaimStatusFailed"), Some(Notice::Failing { reason, .. }) if reason == "ClaimStatusFailed")
        );
        let mut t = Streak::default();
        for _ in 0..3 {
            t.failed("LeaseWriteFailed");
        }
        t.failed("Panic");
        assert_eq!(
            t.succeeded(),
            Some(Notice::Recovered),
            "the False condition stays out there"
        );
    }

    #[test]
    fn failures_below_the_threshold_then_success_say_nothing() {
        let mut s = Streak::default();
        s.failed("LeaseWriteFailed");
        s.failed("LeaseWriteFailed");
        assert_eq!(s.succeeded(), None);
        assert_eq!(s.failed("LeaseWriteFailed"), None, "the count restarted");
    }

    #[test]
    fn holders_then_the_head_of_the_queue_are_told_and_finished_claims_never() {
        let holder = claim("h", Some(Phase::Granted), None);
        let second = claim("w2", Some(Phase::Pending), Some(2));
        let first = claim("w1", Some(Phase::Pending), Some(1));
        let done = claim("d", Some(Phase::Released), None);
        let picked: Vec<String> = notified(&[&second, &done, &first, &holder])
            .iter()
            .map(|c| c.metadata.name.clone().unwrap_or_default())
            .collect();
        assert_eq!(picked, ["h", "w1", "w2"]);
        let many: Vec<LockClaim> = (1..=50)
            .map(|i| claim(&format!("w{i}"), Some(Phase::Pending), Some(i)))
            .collect();
        let refs: Vec<&LockClaim> = many.iter().collect();
        assert_eq!(notified(&refs).len(), MAX_NOTIFIED);
    }

    /// The Reconciled condition's (status, reason) in `st`.
    fn reconciled(st: &LockClaimStatus) -> (&str, &str) {
        let cond = st
            .conditions
            .iter()
            .find(|x| x.type_ == CONDITION_RECONCILED)
            .expect("condition");
        (cond.status.as_str(), cond.reason.as_str())
    }

    #[test]
    fn the_condition_is_written_once_per_message_and_turns_true_only_after_false() {
        let c = claim("a", Some(Phase::Pending), Some(1));
        let now = Timestamp::now();
        assert_eq!(recovered_status(&c, now), None, "nothing to recover from");
        let st = failing_status(&c, "3 failed: denied", now).expect("written");
        assert_eq!(reconciled(&st), ("False", "ReconcileFailed"));
        assert_eq!(
            st.phase,
            Some(Phase::Pending),
            "the rest of the status is kept"
        );
        let mut c2 = c.clone();
        c2.status = Some(st);
        assert_eq!(
            failing_status(&c2, "3 failed: denied", now),
            None,
            "rewritten"
        );
        let back = recovered_status(&c2, now).expect("recovered");
        assert_eq!(reconciled(&back), ("True", "Reconciled"));
    }

    #[test]
    fn waiters_count_as_stalled_only_while_a_slot_is_free_and_nothing_explains_the_wait() {
        let holder = claim("h", Some(Phase::Granted), None);
        let waiter = claim("w", Some(Phase::Pending), Some(1));
        let new = claim("n", None, None);
        let done = claim("d", Some(Phase::Expired), None);
        assert_eq!(
            stalled_waiters(&[&holder, &waiter, &new, &done], 1),
            0,
            "the lock is full"
        );
        assert_eq!(
            stalled_waiters(&[&holder, &waiter, &new], 2),
            2,
            "one slot free"
        );
        assert_eq!(stalled_waiters(&[&waiter, &done], 1), 1, "nobody holds");
        let mut external = waiter.clone();
        let now = Timestamp::now();
        let mut st = base(&external);
        set_condition(
            &mut st,
            &external,
            CONDITION_GRANTED,
            false,
            Reason::HeldExternally,
            "x",
            now,
        );
        external.status = Some(st);
        assert_eq!(
            stalled_waiters(&[&external], 1),
            0,
            "waits on an outside holder"
        );
    }

    proptest! {
        #![proptest_config(crate::arbiter::model::proptests::config())]
        /// Over any sequence of outcomes: a Failing notice comes exactly when a reason
        /// reaches its third failure in a row, and Recovered exactly at the first success
        /// after some Failing notice.
        #[test]
        fn notices_come_exactly_at_the_third_failure_in_a_row_and_the_first_success_after(
            outcomes in proptest::collection::vec(proptest::option::of(0..3u8), 0..60)
        ) {
            let mut s = Streak::default();
            let mut run: Option<(u8, u32)> = None;
            let mut shown = false;
            for o in outcomes {
                match o {
                    Some(r) => {
                        let n = match run { Some((x, n)) if x == r => n + 1, _ => 1 };
                        run = Some((r, n));
                        let got = s.failed(&format!("R{r}"));
                        prop_assert_eq!(got.is_some(), n == PERSISTENT_FAILURES);
                        shown |= n == PERSISTENT_FAILURES;
                    }
                    None => {
                        run = None;
                        prop_assert_eq!(s.succeeded().is_some(), shown);
                        shown = false;
                    }
                }
            }
        }
    }
}
