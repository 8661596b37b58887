//! Phase 2, what ends: claims that want out, holders that lost the Lease, a holder no
//! longer entitled to it (missed renewals, maxHoldSeconds), duplicate identities,
//! waiters past their acquireTimeoutSeconds (try-lock claims once the grant is decided:
//! [`try_locks`]).

use std::collections::{BTreeMap, HashMap};

use super::pods::{self, PodHold};
use super::view::View;
use super::{add_secs, deleting, name, Draft, End, Reason};
use crate::api::{LockClaim, Phase, Renewal};

/// How each live claim that ends in this plan ends.
#[derive(Default)]
pub(super) struct Verdicts {
    by_claim: BTreeMap<String, End>,
    /// Seconds of lock delay owed by the holder's expiry in this plan.
    pub lock_delay_from_expiry: Option<i64>,
    /// The node (and its heartbeat Lease's resourceVersion) whose silence ends the
    /// holder's hold in this plan: read afresh before the verdict is written.
    pub node_lost: Option<(String, Option<String>)>,
}

impl Verdicts {
    /// How `c` ends, if it does.
    pub fn of(&self, c: &LockClaim) -> Option<End> {
        self.by_claim.get(&name(c)).copied()
    }

    /// Whether `c` ends in this plan.
    pub fn ends(&self, c: &LockClaim) -> bool {
        self.by_claim.contains_key(&name(c))
    }

    /// Whether any verdict was drawn from the Lease.
    pub fn any_drawn_from_lease(&self) -> bool {
        self.by_claim.values().any(|e| e.drawn_from_lease())
    }

    fn end(&mut self, c: &LockClaim, how: End) {
        self.by_claim.insert(name(c), how);
    }
}

pub(super) fn judge(v: &View<'_>, d: &mut Draft) -> Verdicts {
    let mut e = Verdicts::default();
    for c in v.live.iter().filter(|c| c.spec.release || deleting(c)) {
        e.end(c, End::Released);
    }
    // Claims marked Granted that the Lease no longer names lost it.
    for c in &v.live {
        if c.phase() == Some(Phase::Granted) && !v.is_holder(c) && !e.ends(c) {
            e.end(c, End::Expired(Reason::LeaseLost));
        }
    }
    pods(v, d, &mut e);
    if let Some(h) = v.holder_claim.filter(|h| !e.ends(h)) {
        holder_entitlement(v, h, d, &mut e);
    }
    duplicates(v, &mut e);
    timeouts(v, d, &mut e);
    e
}

/// Whether `c` waits (live, not holding, not ending).
fn waits(v: &View<'_>, e: &Verdicts, c: &LockClaim) -> bool {
    c.phase() != Some(Phase::Granted) && !v.is_holder(c) && !e.ends(c)
}

/// Waiters whose acquireTimeoutSeconds ran out since their creation. creationTimestamp
/// has one-second precision, so the deadline is rounded up: never early.
fn timeouts(v: &View<'_>, d: &mut Draft, e: &mut Verdicts) {
    let waiting: Vec<&LockClaim> = v.live.iter().copied().filter(|c| waits(v, e, c)).collect();
    for c in waiting {
        let Some(t) = c.spec.acquire_timeout_seconds.filter(|t| *t > 0) else {
            continue;
        };
        let Some(created) = super::created(c) else {
            continue;
        };
        let deadline = add_secs(created, t.saturating_add(1));
        if v.now.wall >= deadline {
            e.end(c, End::TimedOut);
        } else {
            d.due.wall(v.now.wall, deadline);
        }
    }
}

/// Try-lock claims (acquireTimeoutSeconds 0) that are not granted in this plan: once
/// the grant is decided, every other one times out.
pub(super) fn try_locks(v: &View<'_>, next: Option<&LockClaim>, e: &mut Verdicts) {
    let next = next.map(name);
    for c in &v.live {
        let try_lock = c.spec.acquire_timeout_seconds == Some(0);
        if try_lock && waits(v, e, c) && Some(name(c)) != next {
            e.end(c, End::TimedOut);
        }
    }
}

/// Is the holder claim still entitled to the Lease? A Holder-renewal claim whose
/// renewal has not been observed for its own leaseDurationSeconds expires;
/// maxHoldSeconds caps a hold. Both are judged from the claim and the operator's own
/// observations, never from fields of the Lease the holder can edit.
fn holder_entitlement(v: &View<'_>, h: &LockClaim, d: &mut Draft, e: &mut Verdicts) {
    let now = v.now;
    let seen = d.plan.memory.seen.clone();
    // When the hold began, as this process remembers writing it, else as the operator
    // wrote it into the claim's status (one-second precision, so rounded up: a hold is
    // never cut short). Never the Lease's acquireTime: the holder can rewrite that.
    let acquired = d
        .plan
        .memory
        .acquired
        .as_ref()
        .filter(|(n, _)| *n == name(h))
        .map(|(_, t)| *t)
        .or_else(|| {
            h.status
                .as_ref()
                .and_then(|s| s.acquire_time.as_ref())
                .map(|t| add_secs(t.0, 1))
        });
    if h.spec.renewal == Renewal::Holder && seen.as_ref().is_some_and(|s| now.mono >= s.deadline) {
        e.end(h, End::Expired(Reason::Expired));
    } else if let (Some(max), Some(acq)) = (h.spec.max_hold_seconds, acquired) {
        let until = add_secs(acq, max);
        if now.wall >= until {
            e.end(h, End::Expired(Reason::MaxHoldExceeded));
        } else {
            d.due.wall(now.wall, until);
        }
    }
    if let Some(End::Expired(_)) = e.of(h) {
        if h.spec.lock_delay_seconds > 0 {
            e.lock_delay_from_expiry = Some(i64::from(h.spec.lock_delay_seconds));
        }
    } else if h.spec.renewal == Renewal::Holder {
        if let Some(s) = seen {
            d.due.at(now.mono, s.deadline);
        }
    }
}

/// Pod claims: a Pod gone or finished ends its claim (a clean end); a holder whose node
/// has been silent for the claim's duration loses the Lease (NodeLost, lock delay).
fn pods(v: &View<'_>, d: &mut Draft, e: &mut Verdicts) {
    if !v.input.config.pods {
        return;
    }
    let pod_claims: Vec<&LockClaim> = v
        .live
        .iter()
        .copied()
        .filter(|c| c.spec.renewal == Renewal::Pod && !e.ends(c))
        .collect();
    for c in pod_claims {
        let pod = pods::pod_of(v.input.pods, c, &c.spec.lease_name);
        match pods::hold(pod, c, v.now.mono) {
            PodHold::Ended { gone } => {
                let why = if gone {
                    Reason::PodGone
                } else {
                    Reason::PodFinished
                };
                e.end(c, End::PodEnded(why));
            }
            PodHold::NodeLost {
                node,
                resource_version,
            } if v.is_holder(c) => {
                e.end(c, End::Expired(Reason::NodeLost));
                e.node_lost = Some((node, resource_version));
                if c.spec.lock_delay_seconds > 0 {
                    e.lock_delay_from_expiry = Some(i64::from(c.spec.lock_delay_seconds));
                }
            }
            PodHold::Alive { until: Some(t) } if v.is_holder(c) => d.due.at(v.now.mono, t),
            _ => {}
        }
    }
}

/// Duplicate identities among claims that stay live: keep the holder, else the oldest.
fn duplicates(v: &View<'_>, e: &mut Verdicts) {
    let mut by_identity: HashMap<String, Vec<&LockClaim>> = HashMap::new();
    for c in v.live.iter().filter(|c| !e.ends(c)) {
        by_identity.entry(c.identity()).or_default().push(c);
    }
    for group in by_identity.values().filter(|g| g.len() > 1) {
        let keep = group
            .iter()
            .find(|c| v.is_holder(c))
            .or_else(|| group.iter().min_by_key(|c| (super::created(c), name(c))))
            .map(|c| name(c));
        for c in group {
            if Some(name(c)) != keep {
                e.end(c, End::Rejected);
            }
        }
    }
}
