//! Write-order step 5, cleanup: finished claims past ttlSecondsAfterFinished are
//! deleted; a managed Lease that no live claim has named for the GC grace is deleted.

use super::ends::Ends;
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

/// Garbage collection of an unused managed Lease.
pub(super) fn gc(v: &View<'_>, ends: &Ends, d: &mut Draft) {
    let now = v.now.mono;
    let live_after = v.live.iter().any(|c| !ends.ends(c));
    let unused = v.lease().filter(|l| {
        lease::writable(Some(l)) && lease::is_managed(l) && !live_after && v.holder.is_none()
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
