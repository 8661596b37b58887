//! Write-order step 5: everyone still waiting gets their queue position and whom they
//! wait on; a claim's first queueing is an Event.

use super::ends::Ends;
use super::free::Free;
use super::view::View;
use super::{deleting, name, status, Draft, Reason, Step, Target};
use crate::api::LockClaim;

pub(super) fn positions(
    v: &View<'_>,
    ends: &Ends,
    free: &Free<'_>,
    granted_now: Option<&LockClaim>,
    d: &mut Draft,
) {
    let why = wait_reason(free);
    let same = |a: &LockClaim, b: Option<&LockClaim>| {
        b.is_some_and(|b| b.metadata.name == a.metadata.name)
    };
    let mut position = 0;
    for c in &v.live {
        if ends.ends(c) || deleting(c) || same(c, granted_now) || same(c, free.holder_stays) {
            continue;
        }
        position += 1;
        let msg = message(v.lease_name(), why, free.holder_now.as_deref(), position);
        let st = status::waiting(c, position, why, &msg, free.holder_now.clone(), v.now.wall);
        let first_time = c.status.as_ref().and_then(|s| s.phase).is_none();
        if Some(&st) != c.status.as_ref() {
            d.push(Step::SetStatus {
                claim: name(c),
                status: st,
                fill_token: false,
            });
        }
        if why == Reason::LeaseNotManaged && !already(c, why) {
            d.warn(Target::Claim(name(c)), why, msg);
        } else if first_time {
            d.note(Target::Claim(name(c)), Reason::Queued, msg);
        }
    }
    d.plan.waiting = position as usize;
}

/// Whether `c` already waits for `why` (its Event was published then).
fn already(c: &LockClaim, why: Reason) -> bool {
    c.condition(crate::api::CONDITION_GRANTED)
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

fn message(lease: &str, why: Reason, holder: Option<&str>, position: i32) -> String {
    match (why, holder) {
        (Reason::LeaseNotManaged, _) => format!(
            "Lease {lease} exists and was not created by leasekeeper: it is never written unless its owner labels it {}={}; position {position}",
            crate::TAKEOVER_LABEL,
            crate::TAKEOVER_ALLOWED
        ),
        (Reason::LockDelay, _) => format!("waiting for the lock delay of Lease {lease} to end"),
        (_, Some(h)) => format!("waiting for Lease {lease} held by {h}; position {position}"),
        (_, None) => format!("waiting for Lease {lease}; position {position}"),
    }
}
