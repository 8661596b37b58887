//! Write-order steps 2 and 3: the Lease write (a grant, a clear, or a renewal), then
//! the new holder marked Granted; or an interrupted grant completed.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;

use super::free::Free;
use super::pods;
use super::view::View;
use super::{
    claim_duration, created, deleting, lease, name, since, status, Draft, LeaseWriteKind, Outcome,
    Reason, Seen, Step, Target,
};
use crate::api::{LockClaim, Phase, Renewal};

/// Writes the Lease as the plan decided; returns the claim granted in this plan.
pub(super) fn write_lease<'a>(
    v: &View<'a>,
    free: &Free<'a>,
    d: &mut Draft,
) -> Option<&'a LockClaim> {
    if let Some(c) = free.next {
        grant(v, free, c, d);
        return Some(c);
    }
    let (Some(l), Some(_)) = (v.lease(), v.holder.as_deref()) else {
        return None;
    };
    if free.foreign {
        // Never written: not ours, and its owner has not allowed a takeover.
        return None;
    }
    // Named, but by nobody entitled to it: a claim that ended here or earlier.
    if free.holder_stays.is_none() && free.outsider.is_none() {
        // The holder is gone (released, expired, finished) and nobody is next yet:
        // clear the Lease so it names nobody.
        let until = free.lock_delay_until.filter(|_| free.in_lock_delay);
        d.push(Step::WriteLease {
            kind: LeaseWriteKind::Clear,
            lease: Box::new(lease::clear(l, until)),
        });
        d.plan.memory.seen = None;
        return None;
    }
    let hc = free.holder_stays?;
    if hc.phase() != Some(Phase::Granted) && !deleting(hc) {
        complete_grant(v, hc, l, d);
        return Some(hc);
    }
    if hc.spec.renewal != Renewal::Holder {
        renew_if_due(v, hc, l, d);
    }
    // A Pod granted earlier whose opening did not land (its patch met a newer Pod).
    let token = hc.status.as_ref().and_then(|s| s.fencing_token);
    open_pod(v, hc, token, false, d);
    None
}

/// Write-order step 3, after the Granted status: a Pod claim's Pod, still gated, is
/// opened (the gate removed, the token and the Lease written into its annotations).
fn open_pod(v: &View<'_>, c: &LockClaim, token: Option<i64>, fill_token: bool, d: &mut Draft) {
    let Some(p) = pods::pod_of(v.input.pods, c, &c.spec.lease_name).filter(|p| p.gated) else {
        return;
    };
    d.push(Step::OpenPod {
        pod: p.name.clone(),
        resource_version: p.resource_version.clone(),
        lease: v.lease_name().to_string(),
        token,
        fill_token,
    });
}

/// Grants the Lease to `c`: the Lease write, then the Granted status with the token
/// the write returns, then the Events.
fn grant(v: &View<'_>, free: &Free<'_>, c: &LockClaim, d: &mut Draft) {
    let now = v.now;
    let (kind, l) = lease::grant(v.lease_name(), v.lease(), c, now);
    let transition =
        kind == LeaseWriteKind::Grant && v.holder.as_deref() != Some(c.identity().as_str());
    d.push(Step::WriteLease {
        kind,
        lease: Box::new(l),
    });
    let handoff = v
        .input
        .memory
        .freed_at
        .or(d.plan.memory.freed_at)
        .map(|f| now.mono.saturating_sub(f));
    let g = status::Grant {
        acquired: now.wall,
        renewed: Some(now.wall),
    };
    mark_granted(v, c, g, handoff, transition, d);
    open_pod(v, c, None, true, d);
    d.plan.memory.freed_at = None;
    if let Some(outsider) = &free.outsider {
        let m = format!(
            "Lease {} held by {outsider:?} expired without renewal; taken over for {}",
            v.lease_name(),
            c.identity()
        );
        d.note(Target::Claim(name(c)), Reason::TakenOver, m.clone());
        d.note(Target::Lease, Reason::TakenOver, m);
    }
    if let Some(max) = c.spec.max_hold_seconds {
        d.due.wall(now.wall, super::add_secs(now.wall, max));
    }
}

/// The Lease names `hc` but its status does not say Granted: a grant interrupted after
/// its Lease write. The Lease is written again (renewTime now, with its resourceVersion
/// as precondition, so a stale cache only costs a conflict) and the token is the
/// resourceVersion that write returns: the grant it completes may be published after
/// grants of the lock's other slots, and its token must still be above theirs.
fn complete_grant(v: &View<'_>, hc: &LockClaim, l: &Lease, d: &mut Draft) {
    let now = v.now;
    d.push(Step::WriteLease {
        kind: LeaseWriteKind::Renew,
        lease: Box::new(lease::renew(l, now.wall)),
    });
    // The Lease's acquireTime, written by our interrupted grant, never later than now
    // (the holder could have moved it since; a later one would stretch maxHoldSeconds).
    let g = status::Grant {
        acquired: lease::acquire_time(Some(l)).map_or(now.wall, |t| t.min(now.wall)),
        renewed: Some(now.wall),
    };
    mark_granted(v, hc, g, None, false, d);
    open_pod(v, hc, None, true, d);
}

/// Write-order step 3, after the plan's Lease write: `c` marked Granted (its token from
/// that write), remembered as the holder seen renewing now, the grant counted, and its
/// first renewal (Controller) or deadline (Holder) scheduled.
fn mark_granted(
    v: &View<'_>,
    c: &LockClaim,
    g: status::Grant,
    handoff: Option<Duration>,
    transition: bool,
    d: &mut Draft,
) {
    let now = v.now;
    let dur = claim_duration(c);
    d.plan.memory.seen = Some(Seen::renewed(&c.identity(), Some(now.wall), now.mono, dur));
    d.plan.memory.acquired = Some((name(c), g.acquired));
    let (st, msg) = status::granted(c, v.lease_name(), v.input.slot, g, now.wall);
    d.push(Step::SetStatus {
        claim: name(c),
        status: st,
        fill_token: true,
    });
    d.note(Target::Claim(name(c)), Reason::Granted, msg);
    d.plan.outcomes.push(Outcome::Granted {
        waited: created(c).and_then(|t| since(now.wall, t)),
        handoff,
        transition,
    });
    let first_due = if c.spec.renewal == Renewal::Holder {
        dur
    } else {
        dur / 3
    };
    d.due.at(now.mono, now.mono + first_due);
}

/// Controller renewal: the operator refreshes renewTime every third of the duration.
fn renew_if_due(v: &View<'_>, hc: &LockClaim, l: &Lease, d: &mut Draft) {
    let now = v.now;
    let Some(seen) = d.plan.memory.seen.as_mut() else {
        return;
    };
    if now.mono >= seen.renew_due {
        let dur = claim_duration(hc);
        seen.renew_time = Some(now.wall);
        seen.observed_at = now.mono;
        seen.deadline = now.mono + dur;
        seen.renew_due = now.mono + dur / 3;
        d.plan.steps.push(Step::WriteLease {
            kind: LeaseWriteKind::Renew,
            lease: Box::new(lease::renew(l, now.wall)),
        });
    }
    let due = seen.renew_due;
    d.due.at(now.mono, due);
}
