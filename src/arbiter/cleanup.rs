//! Write-order step 4 (last), cleanup: finished claims past ttlSecondsAfterFinished are
//! deleted; a Lease the operator can prove it created (not merely one with its label)
//! that no live claim has named for the GC grace is deleted.

use super::verdicts::Verdicts;
use super::view::View;
use super::{add_secs, deleting, lease, name, status, Draft, Outcome, Reason, Step, Target};

/// ttlSecondsAfterFinished.
pub(super) fn ttl(v: &View<'_>, d: &mut Draft) {
    let now = v.now.wall;
    for c in v.finished.iter().filter(|c| !deleting(c)) {
        let (Some(ttl), Some(at)) = (c.spec.ttl_seconds_after_finished, status::finished_at(c))
        else {
            continue;
        };
        let when = add_secs(at, ttl);
        if now >= when {
            d.push(Step::DeleteClaim { claim: name(c) });
        } else {
            d.due.wall(now, when);
        }
    }
}

/// Garbage collection of an unused Lease the operator created.
pub(super) fn gc(v: &View<'_>, ends: &Verdicts, d: &mut Draft) {
    let now = v.now.mono;
    let live_after = v.live.iter().any(|c| !ends.ends(c));
    let unused = v.lease().filter(|l| {
        v.input.lease_proven
            && lease::writable(Some(l))
            && lease::is_managed(l)
            && !live_after
            && v.holder.is_none()
    });
    let Some(l) = unused else {
        d.plan.memory.unclaimed_since = None;
        return;
    };
    let since = *d.plan.memory.unclaimed_since.get_or_insert(now);
    let grace = v.input.config.gc_grace;
    let when = since + grace;
    if now < when {
        d.due.at(now, when);
        return;
    }
    let Some(rv) = l.metadata.resource_version.clone() else {
        return;
    };
    d.push(Step::DeleteLease {
        resource_version: rv,
    });
    let msg = format!(
        "no LockClaim has named Lease {} for {}s",
        v.lease_name(),
        grace.as_secs()
    );
    d.note(Target::Lease, Reason::LeaseGarbageCollected, msg);
    d.plan.outcomes.push(Outcome::GarbageCollected);
    d.plan.memory.unclaimed_since = None;
}
