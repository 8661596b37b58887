//! Phase 3, is the Lease free for a grant: whether the holder stays, whether an
//! outsider is still alive, whether a lock delay runs, whether the operator may write
//! the Lease at all; and so who is next, and who holds the Lease once the plan is
//! written.

use jiff::Timestamp;

use super::verdicts::Verdicts;
use super::view::{Holding, View};
use super::{add_secs, deleting, lease, Draft};
use crate::api::{LockClaim, Phase};

pub(super) struct Free<'a> {
    /// The holder claim, if it keeps the Lease.
    pub holder_stays: Option<&'a LockClaim>,
    /// The Lease's holder when it is someone else on a Lease the operator may write.
    pub outsider: Option<String>,
    /// Whether that outsider's term still runs.
    pub outsider_alive: bool,
    /// The Lease exists and the operator may not write it.
    pub foreign: bool,
    /// Until when the Lease stays unassigned after an expiry.
    pub lock_delay_until: Option<Timestamp>,
    /// Whether that lock delay still runs.
    pub in_lock_delay: bool,
    /// The claim granted in this plan.
    pub next: Option<&'a LockClaim>,
    /// Who holds the Lease once this plan is written.
    pub holder_now: Option<String>,
}

pub(super) fn find<'a>(v: &View<'a>, ends: &Verdicts, d: &mut Draft) -> Free<'a> {
    let now = v.now;
    let holder_stays = v.holder_claim.filter(|h| !ends.ends(h));
    let outsider = v.holder.clone().filter(|_| v.holding == Holding::Outsider);
    let deadline = d.plan.memory.seen.as_ref().map(|s| s.deadline);
    let outsider_alive = outsider.is_some() && deadline.is_some_and(|t| now.mono < t);
    if let Some(t) = deadline.filter(|_| outsider_alive) {
        d.due.at(now.mono, t);
    }
    let lock_delay_until = lock_delay_until(v, ends.lock_delay_from_expiry);
    let in_lock_delay = lock_delay_until.is_some_and(|u| now.wall < u);
    if let Some(u) = lock_delay_until.filter(|_| in_lock_delay) {
        d.due.wall(now.wall, u);
    }
    let foreign = v.foreign();
    let next = if holder_stays.is_some() || outsider_alive || in_lock_delay || foreign {
        None
    } else {
        v.live
            .iter()
            .copied()
            .find(|c| !ends.ends(c) && !deleting(c))
    };
    let holder_now = next
        .map(|c| c.identity())
        .or_else(|| holder_stays.map(|c| c.identity()))
        .or_else(|| outsider.clone().filter(|_| outsider_alive))
        .or_else(|| v.holder.clone().filter(|_| foreign));
    Free {
        holder_stays,
        outsider,
        outsider_alive,
        foreign,
        lock_delay_until,
        in_lock_delay,
        next,
        holder_now,
    }
}

/// The end of the lock delay: from the Lease's annotation (exact, written with the
/// expiry) or, when that Lease write did not happen, from the expired claims'
/// expireTime (rounded up); and from an expiry decided in this plan.
fn lock_delay_until(v: &View<'_>, from_expiry_now: Option<i64>) -> Option<Timestamp> {
    let from_annotation = v.lease().and_then(lease::lock_delay_annotation);
    let from_claims = v
        .finished
        .iter()
        .filter(|c| c.phase() == Some(Phase::Expired) && c.spec.lock_delay_seconds > 0)
        .filter_map(|c| {
            // expireTime has one-second precision: round up.
            let at = c.status.as_ref()?.expire_time.as_ref()?.0;
            Some(add_secs(at, i64::from(c.spec.lock_delay_seconds) + 1))
        })
        .max();
    let from_now = from_expiry_now.map(|s| add_secs(v.now.wall, s));
    [from_annotation.or(from_claims), from_now]
        .into_iter()
        .flatten()
        .max()
}
