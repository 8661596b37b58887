//! Write-order step 1: claims that end are marked not Granted before the Lease moves.

use super::free::Free;
use super::verdicts::Verdicts;
use super::view::{Holding, View};
use super::{deleting, name, status, Draft, End, Note, Outcome, Reason, Step, Target};
use crate::api::{LockClaim, Phase};

pub(super) fn mark(v: &View<'_>, ends: &Verdicts, free: &Free<'_>, d: &mut Draft) {
    let mut notes = Vec::new();
    for c in &v.live {
        let Some(end) = ends.of(c) else {
            continue;
        };
        let was_holder = c.phase() == Some(Phase::Granted);
        if deleting(c) && !was_holder {
            // Nothing to tell a watcher: it never held the Lease. Just let it go.
            continue;
        }
        let (phase, why, msg) = verdict(v.lease_name(), c, end);
        let st = status::finished(c, phase, why, &msg, free.holder_now.clone(), v.now.wall);
        d.push(Step::SetStatus {
            claim: name(c),
            status: st,
            fill_token: false,
        });
        let (warning, reason) = match end {
            End::Released => (false, Reason::Released),
            End::PodEnded(r) => (false, r),
            End::Expired(_) => (true, Reason::Expired),
            End::Rejected => (true, Reason::Rejected),
            End::TimedOut => (true, Reason::AcquireTimeout),
        };
        notes.push(Note {
            target: Target::Claim(name(c)),
            warning,
            reason,
            message: msg,
        });
        if end == End::TimedOut {
            d.plan.outcomes.push(Outcome::TimedOut);
        }
        if was_holder {
            d.plan.outcomes.push(match end {
                End::Expired(r) => Outcome::Expired(r),
                _ => Outcome::Released,
            });
            d.plan.memory.freed_at = Some(v.now.mono);
        }
    }
    d.plan.steps.extend(notes.into_iter().map(Step::Event));
    if v.holding == (Holding::Ended { gone: true }) {
        // The holder's claim was deleted (claims carry no finalizer): its grant ends as
        // the Lease moves on in this plan.
        d.plan.outcomes.push(Outcome::Released);
        d.plan.memory.freed_at = Some(v.now.mono);
    }
}

/// The phase, condition reason and message of an ending.
fn verdict(lease: &str, c: &LockClaim, end: End) -> (Phase, Reason, String) {
    match end {
        End::Released => (
            Phase::Released,
            Reason::Released,
            format!("released Lease {lease}"),
        ),
        End::Expired(r) => (Phase::Expired, r, expiry_message(r, lease, c)),
        End::PodEnded(r) => (
            Phase::Released,
            r,
            format!(
                "released Lease {lease}: Pod {} {}",
                c.identity(),
                if r == Reason::PodGone {
                    "is gone"
                } else {
                    "has finished"
                }
            ),
        ),
        End::TimedOut => (
            Phase::TimedOut,
            Reason::AcquireTimeout,
            match c.spec.acquire_timeout_seconds {
                Some(0) => format!("Lease {lease} was not free (try-lock)"),
                t => format!(
                    "not granted Lease {lease} within acquireTimeoutSeconds={}",
                    t.unwrap_or_default()
                ),
            },
        ),
        End::Rejected => (
            Phase::Rejected,
            Reason::DuplicateIdentity,
            format!(
                "another live claim for Lease {lease} has holderIdentity {:?}",
                c.identity()
            ),
        ),
    }
}

fn expiry_message(r: Reason, lease: &str, c: &LockClaim) -> String {
    match r {
        Reason::MaxHoldExceeded => format!(
            "held Lease {lease} for maxHoldSeconds={}",
            c.spec.max_hold_seconds.unwrap_or_default()
        ),
        Reason::LeaseLost => {
            format!("Lease {lease} was deleted or given to someone else outside leasekeeper")
        }
        Reason::NodeLost => format!(
            "the node of Pod {} has not renewed its heartbeat for leaseDurationSeconds={}; its containers may still run, cut off (the lock delay is {}s)",
            c.identity(),
            c.spec.lease_duration_seconds,
            c.spec.lock_delay_seconds
        ),
        _ => format!(
            "no renewal of Lease {lease} observed for leaseDurationSeconds={}",
            c.spec.lease_duration_seconds
        ),
    }
}
