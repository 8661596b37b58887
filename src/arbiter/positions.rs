//! Write-order step 4: everyone still waiting gets their queue position and whom they
//! wait on; a claim's first queueing is an Event. The cost is bounded: only the first
//! `exact_positions` waiters carry a number, and changes that only improve a waiter's
//! standing are written at most once per `position_delay` (so a burst of handoffs
//! rewrites a queue once, not once per handoff).

use super::free::Free;
use super::verdicts::Verdicts;
use super::view::View;
use super::{deleting, lease, name, status, Draft, Reason, Step, Target};
use crate::api::{LockClaim, LockClaimStatus, Phase, CONDITION_GRANTED};

pub(super) fn positions(
    v: &View<'_>,
    ends: &Verdicts,
    free: &Free<'_>,
    granted_now: Option<&LockClaim>,
    d: &mut Draft,
) {
    let why = wait_reason(free);
    let same = |a: &LockClaim, b: Option<&LockClaim>| {
        b.is_some_and(|b| b.metadata.name == a.metadata.name)
    };
    let exact = i32::try_from(v.input.config.exact_positions).unwrap_or(i32::MAX);
    let mut waiting = 0;
    let mut deferred = Vec::new();
    for c in &v.live {
        if ends.ends(c) || deleting(c) || same(c, granted_now) || same(c, free.holder_stays) {
            continue;
        }
        waiting += 1;
        let position = (waiting <= exact).then_some(waiting);
        // Further back than the exact positions, a status names neither a number nor the
        // holder, so that no handoff changes it.
        let holder = free.holder_now.clone().filter(|_| position.is_some());
        let strategy = v.lease().and_then(lease::strategy);
        let msg = message(
            v.lease_name(),
            why,
            holder.as_deref(),
            position,
            exact,
            strategy,
        );
        let st = status::waiting(c, position, why, &msg, holder, v.now.wall);
        if Some(&st) != c.status.as_ref() {
            let step = Step::SetStatus {
                claim: name(c),
                status: st.clone(),
                fill_token: false,
            };
            if can_wait(c.status.as_ref(), &st) {
                deferred.push(step);
            } else {
                d.push(step);
            }
        }
        let first_time = c.status.as_ref().and_then(|s| s.phase).is_none();
        if why == Reason::LeaseNotManaged && !already(c, why) {
            d.warn(Target::Claim(name(c)), why, msg);
        } else if first_time {
            d.note(Target::Claim(name(c)), Reason::Queued, msg);
        }
    }
    d.plan.waiting = usize::try_from(waiting).unwrap_or_default();
    coalesce(v, deferred, d);
}

/// Writes the deferred updates once their delay has run out; until then, looks again
/// at that instant.
fn coalesce(v: &View<'_>, deferred: Vec<Step>, d: &mut Draft) {
    let now = v.now.mono;
    if deferred.is_empty() {
        d.plan.memory.positions_due = None;
        return;
    }
    let due = *d
        .plan
        .memory
        .positions_due
        .get_or_insert(now + v.input.config.position_delay);
    if now >= due {
        d.plan.steps.extend(deferred);
        d.plan.memory.positions_due = None;
    } else {
        d.due.at(now, due);
    }
}

/// Whether a waiter's new status may wait: it was already Pending for the same reason
/// and at a position, and now only stands better (a smaller position, or another holder
/// to wait on at the same place). Being next in line, moving back, losing or gaining a
/// position, and every other change are written at once.
fn can_wait(old: Option<&LockClaimStatus>, new: &LockClaimStatus) -> bool {
    let Some(old) = old else {
        return false;
    };
    let reason = |s: &LockClaimStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == CONDITION_GRANTED)
            .map(|c| c.reason.clone())
    };
    let (Some(was), Some(is)) = (old.queue_position, new.queue_position) else {
        return false;
    };
    old.phase == Some(Phase::Pending)
        && new.phase == Some(Phase::Pending)
        && reason(old) == reason(new)
        && is > 1
        && is <= was
}

/// Whether `c` already waits for `why` (its Event was published then).
fn already(c: &LockClaim, why: Reason) -> bool {
    c.condition(CONDITION_GRANTED)
        .is_some_and(|x| x.reason == why.as_str())
}

/// Why claims wait: the Lease is not ours to write, an outsider holds it, a lock delay
/// runs, or a claim holds it.
fn wait_reason(free: &Free<'_>) -> Reason {
    if free.foreign {
        Reason::LeaseNotManaged
    } else if free.holder_stays.is_some() {
        Reason::Queued
    } else if free.outsider_alive {
        Reason::HeldExternally
    } else if free.in_lock_delay {
        Reason::LockDelay
    } else {
        Reason::Queued
    }
}

fn message(
    lease: &str,
    why: Reason,
    holder: Option<&str>,
    position: Option<i32>,
    exact: i32,
    strategy: Option<&str>,
) -> String {
    let place = match position {
        Some(p) => format!("position {p}"),
        None => format!("more than {exact} claims ahead"),
    };
    if let (Reason::LeaseNotManaged, Some(strategy)) = (why, strategy) {
        return format!(
            "Lease {lease} is run by coordinated leader election (spec.strategy {strategy}): leasekeeper never writes it; {place}"
        );
    }
    match (why, holder) {
        (Reason::LeaseNotManaged, _) => format!(
            "Lease {lease} exists and was not created by leasekeeper: it is never written unless its owner labels it {}={}; {place}",
            crate::api::TAKEOVER_LABEL,
            crate::api::TAKEOVER_ALLOWED
        ),
        (Reason::LockDelay, _) => format!("waiting for the lock delay of Lease {lease} to end; {place}"),
        (_, Some(h)) => format!("waiting for Lease {lease} held by {h}; {place}"),
        (_, None) => format!("waiting for Lease {lease}; {place}"),
    }
}
