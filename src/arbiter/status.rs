//! Building a claim's status: conditions with metav1.Condition semantics, and the
//! Granted status, built in one place.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::{add_secs, Reason, CONDITION_FINISHED};
use crate::api::{LockClaim, LockClaimStatus, Phase, CONDITION_GRANTED};

/// The claim's status as it is, with observedGeneration brought up to date.
pub(super) fn base(c: &LockClaim) -> LockClaimStatus {
    let mut st = c.status.clone().unwrap_or_default();
    st.observed_generation = c.metadata.generation;
    st
}

/// What a Granted status says.
pub(super) struct Grant {
    /// When the claim acquired the Lease.
    pub acquired: Timestamp,
    /// The last renewal observed.
    pub renewed: Option<Timestamp>,
}

/// The status that marks `c` Granted Lease `lease`, and its message.
pub(super) fn granted(
    c: &LockClaim,
    lease: &str,
    slot: u32,
    g: Grant,
    now: Timestamp,
) -> (LockClaimStatus, String) {
    let mut st = base(c);
    st.phase = Some(Phase::Granted);
    st.lease = Some(lease.to_string());
    st.slot = Some(i32::try_from(slot).unwrap_or(i32::MAX));
    st.queue_position = None;
    st.holder_identity = Some(c.identity());
    st.acquire_time = Some(Time(g.acquired));
    st.renew_time = g.renewed.map(Time);
    st.expire_time = None;
    // Always filled by the executor from the Lease write just before this status.
    st.fencing_token = None;
    let msg = format!("granted Lease {lease} to {}", c.identity());
    set_condition(
        &mut st,
        c,
        CONDITION_GRANTED,
        true,
        Reason::Granted,
        &msg,
        now,
    );
    remove_condition(&mut st, CONDITION_FINISHED);
    (st, msg)
}

/// The terminal status of a claim that ends in `phase` for `why`.
pub(super) fn finished(
    c: &LockClaim,
    phase: Phase,
    why: Reason,
    msg: &str,
    holder_now: Option<String>,
    now: Timestamp,
) -> LockClaimStatus {
    let mut st = base(c);
    st.phase = Some(phase);
    st.queue_position = None;
    st.holder_identity = holder_now;
    if phase == Phase::Expired {
        st.expire_time = Some(Time(now));
    }
    set_condition(&mut st, c, CONDITION_GRANTED, false, why, msg, now);
    set_condition(&mut st, c, CONDITION_FINISHED, true, why, msg, now);
    st
}

/// The status of a claim waiting at `position` (None: further back than the exact
/// positions) for `why`.
pub(super) fn waiting(
    c: &LockClaim,
    position: Option<i32>,
    why: Reason,
    msg: &str,
    holder_now: Option<String>,
    now: Timestamp,
) -> LockClaimStatus {
    let mut st = base(c);
    st.phase = Some(Phase::Pending);
    st.queue_position = position;
    st.holder_identity = holder_now;
    set_condition(&mut st, c, CONDITION_GRANTED, false, why, msg, now);
    st
}

/// When the claim finished, at the latest: the Finished condition's lastTransitionTime
/// is stored with one-second precision, so round up rather than act early.
pub(super) fn finished_at(c: &LockClaim) -> Option<Timestamp> {
    c.condition(CONDITION_FINISHED)
        .filter(|x| x.status == "True")
        .map(|x| add_secs(x.last_transition_time.0, 1))
}

/// Sets a condition; lastTransitionTime moves only when the status flips.
pub(super) fn set_condition(
    st: &mut LockClaimStatus,
    c: &LockClaim,
    type_: &str,
    status: bool,
    reason: Reason,
    message: &str,
    now: Timestamp,
) {
    let status_s = if status { "True" } else { "False" };
    let ltt = c
        .condition(type_)
        .filter(|x| x.status == status_s)
        .map(|x| x.last_transition_time.clone())
        .unwrap_or(Time(now));
    let cond = Condition {
        type_: type_.to_string(),
        status: status_s.to_string(),
        reason: reason.as_str().to_string(),
        message: message.to_string(),
        last_transition_time: ltt,
        observed_generation: c.metadata.generation,
    };
    match st.conditions.iter_mut().find(|x| x.type_ == type_) {
        Some(x) => *x = cond,
        None => st.conditions.push(cond),
    }
}

fn remove_condition(st: &mut LockClaimStatus, type_: &str) {
    st.conditions.retain(|x| x.type_ != type_);
}
