//! The pure decision core.
//!
//! [`decide`] takes everything known about one Lease name in one namespace (the claims
//! that name it, the Lease as read, what this operator process remembers, and the
//! time) and returns a [`Plan`]: the writes to make, in the order that keeps every
//! watcher safe, the Events to publish, the new memory, and when to look again.
//! There is no client, no async and no clock read in here: time is an argument.
//!
//! Order of writes within a plan (DESIGN.md, "Handoff order"):
//! 1. finalizers added to new claims;
//! 2. claims that stop holding are marked not Granted;
//! 3. the Lease is written (with the resourceVersion it was decided from);
//! 4. the new holder is marked Granted (its fencing token is the Lease's new
//!    resourceVersion);
//! 5. waiting claims get their queue positions; finished claims lose their finalizer;
//!    Leases and claims due for garbage collection are deleted.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::api::ObjectMeta;

use crate::api::{
    LockClaim, LockClaimStatus, Phase, Renewal, CONDITION_GRANTED, DEFAULT_LEASE_DURATION_SECONDS,
};
use crate::{FINALIZER, MANAGED_BY_LABEL, MANAGED_BY_VALUE};

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;

/// The condition type that turns True when a claim reaches a terminal phase; its
/// lastTransitionTime is when the claim finished (ttlSecondsAfterFinished counts from it).
pub const CONDITION_FINISHED: &str = "Finished";
/// Annotation on a Lease: the name of the LockClaim the operator granted it to. The
/// holderIdentity alone cannot tell two claims with one identity apart.
pub const CLAIM_ANNOTATION: &str = "leasekeeper.io/claim";
/// Annotation on a Lease: until when (RFC 3339, operator clock) it stays unassigned
/// after an expiry (spec.lockDelaySeconds of the expired claim).
pub const LOCK_DELAY_ANNOTATION: &str = "leasekeeper.io/lock-delay-until";

/// Stable reasons, used for conditions, Events and metric labels.
pub mod reason {
    /// The claim holds the Lease.
    pub const GRANTED: &str = "Granted";
    /// Waiting behind another claim.
    pub const QUEUED: &str = "Queued";
    /// Waiting: the Lease is held by someone who is not a LockClaim.
    pub const HELD_EXTERNALLY: &str = "HeldExternally";
    /// Waiting: the lock delay after an expiry has not run out.
    pub const LOCK_DELAY: &str = "LockDelay";
    /// Another live claim for the Lease has the same holderIdentity.
    pub const DUPLICATE_IDENTITY: &str = "DuplicateIdentity";
    /// Released by delete or `release: true`.
    pub const RELEASED: &str = "Released";
    /// The holder stopped renewing.
    pub const EXPIRED: &str = "Expired";
    /// spec.maxHoldSeconds ran out.
    pub const MAX_HOLD_EXCEEDED: &str = "MaxHoldExceeded";
    /// The Lease was deleted or given to someone else behind the operator's back.
    pub const LEASE_LOST: &str = "LeaseLost";
    /// A Lease held by an outsider expired and was taken over.
    pub const TAKEN_OVER: &str = "TakenOver";
    /// An unused managed Lease was deleted.
    pub const LEASE_GARBAGE_COLLECTED: &str = "LeaseGarbageCollected";
    /// Rejected (a terminal phase, the Event reason of DuplicateIdentity).
    pub const REJECTED: &str = "Rejected";
}

/// The time, as two clocks. `mono` decides expiry (it never jumps); `wall` is what is
/// written into objects and compared only with times this operator wrote itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Wall-clock time.
    pub wall: Timestamp,
    /// Monotonic time since an arbitrary origin fixed for the life of the process.
    pub mono: Duration,
}

/// Settings of the arbiter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// A managed Lease that no live claim names for this long is deleted.
    pub gc_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            gc_grace: Duration::from_secs(300),
        }
    }
}

/// What this operator process remembers about one Lease between reconciles. It is
/// lost on restart, and every rule tolerates that (see [`Seen`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// The holder and renewTime last observed on the Lease.
    pub seen: Option<Seen>,
    /// Since when no live claim has named this managed Lease.
    pub unclaimed_since: Option<Duration>,
    /// When the last grant ended (for the handoff-latency metric).
    pub freed_at: Option<Duration>,
}

impl Memory {
    /// Called by the executor when a plan's granting Lease write has completed at
    /// `written` (monotonic): the new holder's clock starts when the Lease names it, not
    /// when the grant was decided, so a slow write never shortens its first duration.
    pub fn rebase_grant(&mut self, written: Duration) {
        if let Some(s) = self.seen.as_mut() {
            if written > s.observed_at {
                let shift = written - s.observed_at;
                s.observed_at = written;
                s.deadline += shift;
                s.renew_due += shift;
            }
        }
    }
}

/// One observation of a held Lease, on the monotonic clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// `spec.holderIdentity` as observed.
    pub holder: String,
    /// `spec.renewTime` as observed (written by the holder: only compared for change).
    pub renew_time: Option<Timestamp>,
    /// When the (holder, renewTime) pair was first observed.
    pub observed_at: Duration,
    /// The holder is expired at this instant unless a renewal is observed first.
    pub deadline: Duration,
    /// For Controller renewal: when the operator renews next.
    pub renew_due: Duration,
}

/// Where an Event goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The LockClaim of this name.
    Claim(String),
    /// The Lease.
    Lease,
}

/// An Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// The object the Event is about.
    pub target: Target,
    /// Warning (true) or Normal.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: &'static str,
    /// Human-readable text.
    pub message: String,
}

/// How a Lease write changes the Lease (for metrics and logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseWriteKind {
    /// Creates the Lease for a new holder.
    Create,
    /// Gives an existing Lease to a new holder.
    Grant,
    /// Refreshes renewTime for a Controller-renewal holder.
    Renew,
    /// Clears the holder.
    Clear,
}

/// One write, in plan order.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Re-read the Lease from the API server (a quorum read, not the cache) and stop
    /// the plan unless its resourceVersion is still this one. Put before an expiry, so
    /// that a renewal the watch has not delivered yet is never judged missing.
    VerifyLease {
        /// The resourceVersion the expiry was decided from.
        resource_version: Option<String>,
    },
    /// Add the leasekeeper finalizer to a claim.
    AddFinalizer {
        /// Claim name.
        claim: String,
    },
    /// Server-side apply a claim's status. With `fill_token`, the executor sets
    /// `status.fencingToken` to the resourceVersion returned by the plan's Lease write.
    SetStatus {
        /// Claim name.
        claim: String,
        /// The whole status.
        status: LockClaimStatus,
        /// Take the fencing token from the preceding Lease write.
        fill_token: bool,
    },
    /// Create (no resourceVersion) or replace (resourceVersion as precondition) the Lease.
    WriteLease {
        /// What the write does.
        kind: LeaseWriteKind,
        /// The Lease to write; `metadata.resourceVersion` is the precondition.
        lease: Box<Lease>,
    },
    /// Delete the Lease, with its resourceVersion as precondition.
    DeleteLease {
        /// The precondition.
        resource_version: String,
    },
    /// Remove the leasekeeper finalizer from a claim.
    RemoveFinalizer {
        /// Claim name.
        claim: String,
    },
    /// Delete a finished claim (ttlSecondsAfterFinished).
    DeleteClaim {
        /// Claim name.
        claim: String,
    },
    /// Publish an Event.
    Event(Note),
}

/// What changed, for metrics.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// A claim was granted; `waited` is creation to now on the wall clock,
    /// `handoff` the monotonic time since the previous grant ended (if known).
    Granted {
        /// Wall-clock wait since the claim was created.
        waited: Option<Duration>,
        /// Monotonic time since the previous grant ended.
        handoff: Option<Duration>,
        /// Whether the Lease changed holder (leaseTransitions moved).
        transition: bool,
    },
    /// A grant ended by release.
    Released,
    /// A grant ended by expiry, with the reason.
    Expired(&'static str),
    /// The Lease was garbage-collected.
    GarbageCollected,
}

/// The arbiter's answer for one Lease.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Writes and Events, in order. The executor stops at the first failed write.
    pub steps: Vec<Step>,
    /// What to remember for next time.
    pub memory: Memory,
    /// Look again after this long even if nothing changes (expiry, renewal, lock
    /// delay, GC, TTL, whichever falls due first).
    pub requeue_after: Option<Duration>,
    /// Counted for metrics once the writes succeed.
    pub outcomes: Vec<Outcome>,
    /// Claims waiting after this plan (for the queue-depth gauge).
    pub waiting: usize,
    /// Whether any live claim names this Lease (if not, and the Lease is not managed,
    /// the caller may forget the memory).
    pub has_live_claims: bool,
}

/// Everything the arbiter looks at for one Lease name.
pub struct Input<'a> {
    /// The Lease name.
    pub lease_name: &'a str,
    /// All claims in the namespace whose spec.leaseName is `lease_name`.
    pub claims: &'a [&'a LockClaim],
    /// The Lease as read, if it exists.
    pub lease: Option<&'a Lease>,
    /// What this process remembers.
    pub memory: &'a Memory,
    /// The time.
    pub now: Now,
    /// Settings.
    pub config: Config,
}

/// Duration of a grant for a claim.
fn claim_duration(c: &LockClaim) -> Duration {
    Duration::from_secs(u64::try_from(c.spec.lease_duration_seconds.max(1)).unwrap_or(1))
}

/// The minimum grace a held Lease gets when this process first observes it: half the
/// lease duration, which a holder renewing every third of the duration (our client) or
/// every retry period (client-go) always fits in.
pub fn min_takeover_grace(duration: Duration) -> Duration {
    duration / 2
}

/// Truncates to microseconds, the precision of a Lease's MicroTime fields.
fn micros(t: Timestamp) -> Timestamp {
    let us = t.as_microsecond();
    Timestamp::from_microsecond(us).unwrap_or(t)
}

fn lease_holder(lease: Option<&Lease>) -> Option<String> {
    lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty())
}

fn lease_renew_time(lease: &Lease) -> Option<Timestamp> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0)
}

fn lease_duration(lease: &Lease) -> Duration {
    let secs = lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_duration_seconds)
        .unwrap_or(DEFAULT_LEASE_DURATION_SECONDS)
        .max(1);
    Duration::from_secs(u64::try_from(secs).unwrap_or(1))
}

/// Whether the Lease carries the managed-by label.
pub fn is_managed(lease: &Lease) -> bool {
    lease
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY_VALUE)
}

/// The queue order: higher priority first, then older, then by name.
fn queue_cmp(a: &LockClaim, b: &LockClaim) -> std::cmp::Ordering {
    b.spec
        .priority
        .cmp(&a.spec.priority)
        .then_with(|| created(a).cmp(&created(b)))
        .then_with(|| a.metadata.name.cmp(&b.metadata.name))
}

fn created(c: &LockClaim) -> Option<Timestamp> {
    c.metadata.creation_timestamp.as_ref().map(|t| t.0)
}

fn has_finalizer(c: &LockClaim) -> bool {
    c.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

fn deleting(c: &LockClaim) -> bool {
    c.metadata.deletion_timestamp.is_some()
}

fn name(c: &LockClaim) -> String {
    c.metadata.name.clone().unwrap_or_default()
}

fn since(later: Timestamp, earlier: Timestamp) -> Option<Duration> {
    let us = later
        .as_microsecond()
        .checked_sub(earlier.as_microsecond())?;
    u64::try_from(us).ok().map(Duration::from_micros)
}

fn add_secs(t: Timestamp, secs: i64) -> Timestamp {
    t.checked_add(jiff::SignedDuration::from_secs(secs))
        .unwrap_or(t)
}

/// How a live claim ends in this plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Released,
    Expired(&'static str),
    Rejected,
}

/// Tracks the earliest instant something falls due.
#[derive(Default)]
struct Due(Option<Duration>);

impl Due {
    fn at(&mut self, now: Duration, when: Duration) {
        let after = when.saturating_sub(now).max(Duration::from_millis(1));
        self.0 = Some(self.0.map_or(after, |d| d.min(after)));
    }
    fn wall(&mut self, now: Timestamp, when: Timestamp) {
        let after = since(when, now)
            .unwrap_or_default()
            .max(Duration::from_millis(1));
        self.0 = Some(self.0.map_or(after, |d| d.min(after)));
    }
}

/// Decides what to write for one Lease. See the module documentation.
pub fn decide(input: &Input<'_>) -> Plan {
    let now = Now {
        wall: micros(input.now.wall),
        mono: input.now.mono,
    };
    let mut plan = Plan {
        memory: input.memory.clone(),
        ..Plan::default()
    };
    let mut due = Due::default();

    let mut claims: Vec<&LockClaim> = input.claims.to_vec();
    claims.sort_by(|a, b| queue_cmp(a, b));
    let (live, finished): (Vec<&LockClaim>, Vec<&LockClaim>) = claims
        .iter()
        .partition(|c| !c.phase().is_some_and(Phase::is_terminal));
    plan.has_live_claims = !live.is_empty();

    // --- Observe the Lease (memory), before any expiry is judged. ---
    let holder = lease_holder(input.lease);
    observe(&mut plan.memory, input.lease, holder.as_deref(), now);

    let mut ends: BTreeMap<String, End> = BTreeMap::new();
    let mut notes_before: Vec<Note> = Vec::new();

    // Claims that want out.
    for c in &live {
        if c.spec.release || deleting(c) {
            ends.insert(name(c), End::Released);
        }
    }

    // Who holds the Lease, among live claims: the claim our grant named (annotation) if
    // its identity still matches; without the annotation, by identity, preferring the
    // one marked Granted, then the oldest.
    let granted_to = input.lease.and_then(lease_claim_annotation);
    let ours = |c: &LockClaim, h: &str| {
        c.identity() == h
            && granted_to
                .as_deref()
                .is_none_or(|n| Some(n) == c.metadata.name.as_deref())
    };
    let holder_claim: Option<&LockClaim> = holder.as_deref().and_then(|h| {
        let mut same: Vec<&LockClaim> = live.iter().copied().filter(|c| ours(c, h)).collect();
        same.sort_by_key(|c| (c.phase() != Some(Phase::Granted), created(c), name(c)));
        same.first().copied()
    });

    // Claims marked Granted that the Lease no longer names lost it.
    for c in &live {
        let is_holder = holder_claim.is_some_and(|h| h.metadata.name == c.metadata.name);
        if c.phase() == Some(Phase::Granted) && !is_holder && !ends.contains_key(&name(c)) {
            ends.insert(name(c), End::Expired(reason::LEASE_LOST));
        }
    }

    // Is the holder claim still entitled to the Lease?
    let mut lock_delay_from_expiry: Option<i64> = None;
    if let Some(h) = holder_claim {
        let n = name(h);
        if !ends.contains_key(&n) {
            let seen = plan.memory.seen.as_ref();
            // The Lease's acquireTime has microseconds; the claim's status (metav1.Time)
            // only seconds, so it is the fallback, rounded up.
            let acquired = input
                .lease
                .and_then(|l| l.spec.as_ref())
                .and_then(|s| s.acquire_time.as_ref())
                .map(|t| t.0)
                .or_else(|| {
                    h.status
                        .as_ref()
                        .and_then(|s| s.acquire_time.as_ref())
                        .map(|t| add_secs(t.0, 1))
                });
            if h.spec.renewal == Renewal::Holder && seen.is_some_and(|s| now.mono >= s.deadline) {
                ends.insert(n.clone(), End::Expired(reason::EXPIRED));
            } else if let (Some(max), Some(acq)) = (h.spec.max_hold_seconds, acquired) {
                let until = add_secs(acq, max);
                if now.wall >= until {
                    ends.insert(n.clone(), End::Expired(reason::MAX_HOLD_EXCEEDED));
                } else {
                    due.wall(now.wall, until);
                }
            }
            if let Some(End::Expired(_)) = ends.get(&n) {
                if h.spec.lock_delay_seconds > 0 {
                    lock_delay_from_expiry = Some(i64::from(h.spec.lock_delay_seconds));
                }
            } else if h.spec.renewal == Renewal::Holder {
                if let Some(s) = seen {
                    due.at(now.mono, s.deadline);
                }
            }
        }
    }

    // Duplicate identities among claims that stay live: keep the holder, else the oldest.
    {
        let mut by_identity: HashMap<String, Vec<&LockClaim>> = HashMap::new();
        for c in &live {
            if !ends.contains_key(&name(c)) {
                by_identity.entry(c.identity()).or_default().push(c);
            }
        }
        for group in by_identity.values().filter(|g| g.len() > 1) {
            let keep = group
                .iter()
                .find(|c| holder_claim.is_some_and(|h| h.metadata.name == c.metadata.name))
                .or_else(|| group.iter().min_by_key(|c| (created(c), name(c))))
                .map(|c| name(c));
            for c in group {
                if Some(name(c)) != keep {
                    ends.insert(name(c), End::Rejected);
                }
            }
        }
    }

    // --- Is the Lease free for a grant? ---
    let holder_stays = holder_claim.filter(|h| !ends.contains_key(&name(h)));
    // An outsider: a holder that is neither a live claim nor one of our finished claims.
    let outsider = holder
        .as_deref()
        .filter(|h| holder_claim.is_none() && !finished.iter().any(|c| ours(c, h)));
    let outsider_alive = outsider.is_some()
        && plan
            .memory
            .seen
            .as_ref()
            .is_some_and(|s| now.mono < s.deadline);
    if outsider_alive {
        if let Some(s) = plan.memory.seen.as_ref() {
            due.at(now.mono, s.deadline);
        }
    }
    let lock_delay_until =
        lock_delay_until(input.lease, &finished, lock_delay_from_expiry, now.wall);
    let in_lock_delay = lock_delay_until.is_some_and(|u| now.wall < u);
    if let Some(u) = lock_delay_until.filter(|_| in_lock_delay) {
        due.wall(now.wall, u);
    }

    let next: Option<&LockClaim> = if holder_stays.is_some() || outsider_alive || in_lock_delay {
        None
    } else {
        live.iter()
            .copied()
            .find(|c| !ends.contains_key(&name(c)) && !deleting(c))
    };

    // Who holds the Lease once this plan is written.
    let holder_now: Option<String> = next
        .map(|c| c.identity())
        .or_else(|| holder_stays.map(|c| c.identity()))
        .or_else(|| outsider.filter(|_| outsider_alive).map(str::to_string));

    // --- Finalizers on new claims (before anything can be granted to them). ---
    for c in &live {
        if !deleting(c) && !has_finalizer(c) && !ends.contains_key(&name(c)) {
            plan.steps.push(Step::AddFinalizer { claim: name(c) });
        }
    }

    // --- A verdict drawn from the Lease (a missed renewal, a Lease gone or taken, an
    // outsider's term run out) is checked on a fresh read, never on a cache that may lag.
    let lease_verdict = ends
        .values()
        .any(|e| matches!(e, End::Expired(reason::EXPIRED | reason::LEASE_LOST)));
    if lease_verdict || outsider.is_some() && next.is_some() {
        plan.steps.push(Step::VerifyLease {
            resource_version: input
                .lease
                .and_then(|l| l.metadata.resource_version.clone()),
        });
    }

    // --- Claims that end: marked not Granted before the Lease moves. ---
    for c in &live {
        let n = name(c);
        let Some(end) = ends.get(&n).copied() else {
            continue;
        };
        let was_holder = c.phase() == Some(Phase::Granted);
        let (phase, why, msg) = match end {
            End::Released => (
                Phase::Released,
                reason::RELEASED,
                format!("released Lease {}", input.lease_name),
            ),
            End::Expired(r) => (Phase::Expired, r, expiry_message(r, input.lease_name, c)),
            End::Rejected => (
                Phase::Rejected,
                reason::DUPLICATE_IDENTITY,
                format!(
                    "another live claim for Lease {} has holderIdentity {:?}",
                    input.lease_name,
                    c.identity()
                ),
            ),
        };
        if deleting(c) && !was_holder {
            // Nothing to tell a watcher: it never held the Lease. Just let it go.
            continue;
        }
        let mut st = base_status(c);
        st.phase = Some(phase);
        st.queue_position = None;
        st.holder_identity = holder_now.clone();
        if matches!(end, End::Expired(_)) {
            st.expire_time = Some(Time(now.wall));
        }
        set_condition(&mut st, c, CONDITION_GRANTED, false, why, &msg, now.wall);
        set_condition(&mut st, c, CONDITION_FINISHED, true, why, &msg, now.wall);
        plan.steps.push(Step::SetStatus {
            claim: n.clone(),
            status: st,
            fill_token: false,
        });
        let (warning, ev_reason) = match end {
            End::Released => (false, reason::RELEASED),
            End::Expired(_) => (true, reason::EXPIRED),
            End::Rejected => (true, reason::REJECTED),
        };
        notes_before.push(Note {
            target: Target::Claim(n.clone()),
            warning,
            reason: ev_reason,
            message: msg,
        });
        if was_holder {
            plan.outcomes.push(match end {
                End::Expired(r) => Outcome::Expired(r),
                _ => Outcome::Released,
            });
            plan.memory.freed_at = Some(now.mono);
        }
    }
    plan.steps.extend(notes_before.into_iter().map(Step::Event));

    // --- The Lease write. ---
    let mut granted_now: Option<&LockClaim> = None;
    if let Some(c) = next {
        let (kind, lease) = grant_lease(input, c, now);
        let transition =
            kind == LeaseWriteKind::Grant && holder.as_deref() != Some(c.identity().as_str());
        let took_over = outsider.is_some();
        plan.steps.push(Step::WriteLease {
            kind,
            lease: Box::new(lease),
        });
        let d = claim_duration(c);
        plan.memory.seen = Some(Seen {
            holder: c.identity(),
            renew_time: Some(now.wall),
            observed_at: now.mono,
            deadline: now.mono + d,
            renew_due: now.mono + d / 3,
        });
        let mut st = base_status(c);
        st.phase = Some(Phase::Granted);
        st.queue_position = None;
        st.holder_identity = Some(c.identity());
        st.acquire_time = Some(Time(now.wall));
        st.renew_time = Some(Time(now.wall));
        st.expire_time = None;
        st.fencing_token = None;
        let msg = format!("granted Lease {} to {}", input.lease_name, c.identity());
        set_condition(
            &mut st,
            c,
            CONDITION_GRANTED,
            true,
            reason::GRANTED,
            &msg,
            now.wall,
        );
        remove_condition(&mut st, CONDITION_FINISHED);
        plan.steps.push(Step::SetStatus {
            claim: name(c),
            status: st,
            fill_token: true,
        });
        plan.steps.push(Step::Event(Note {
            target: Target::Claim(name(c)),
            warning: false,
            reason: reason::GRANTED,
            message: msg,
        }));
        if took_over {
            let m = format!(
                "Lease {} held by {:?} expired without renewal; taken over for {}",
                input.lease_name,
                outsider.unwrap_or_default(),
                c.identity()
            );
            plan.steps.push(Step::Event(Note {
                target: Target::Claim(name(c)),
                warning: false,
                reason: reason::TAKEN_OVER,
                message: m.clone(),
            }));
            plan.steps.push(Step::Event(Note {
                target: Target::Lease,
                warning: false,
                reason: reason::TAKEN_OVER,
                message: m,
            }));
        }
        plan.outcomes.push(Outcome::Granted {
            waited: created(c).and_then(|t| since(now.wall, t)),
            handoff: input
                .memory
                .freed_at
                .or(plan.memory.freed_at)
                .map(|f| now.mono.saturating_sub(f)),
            transition,
        });
        plan.memory.freed_at = None;
        if c.spec.renewal == Renewal::Holder {
            due.at(now.mono, now.mono + d);
        } else {
            due.at(now.mono, now.mono + d / 3);
        }
        if let Some(max) = c.spec.max_hold_seconds {
            due.wall(now.wall, add_secs(now.wall, max));
        }
        granted_now = Some(c);
    } else if let (Some(lease), Some(_)) = (input.lease, holder.as_deref()) {
        // Named, but by nobody entitled to it: a claim that ended here or earlier.
        let stale = holder_stays.is_none() && outsider.is_none();
        if stale {
            // The holder is gone (released, expired, finished) and nobody is next yet:
            // clear the Lease so it names nobody.
            let mut l = lease.clone();
            let spec = l.spec.get_or_insert_with(LeaseSpec::default);
            spec.holder_identity = None;
            spec.acquire_time = None;
            spec.renew_time = None;
            set_lock_delay_annotation(&mut l, lock_delay_until.filter(|_| in_lock_delay));
            set_annotation(&mut l, CLAIM_ANNOTATION, None);
            plan.steps.push(Step::WriteLease {
                kind: LeaseWriteKind::Clear,
                lease: Box::new(l),
            });
            plan.memory.seen = None;
        } else if let Some(hc) = holder_stays {
            // The holder keeps the Lease. Complete an interrupted grant, renew if due.
            if hc.phase() != Some(Phase::Granted) && !deleting(hc) {
                // No Lease write of ours precedes this grant: make sure the Lease still
                // names the claim, not just the cache.
                if !plan
                    .steps
                    .iter()
                    .any(|s| matches!(s, Step::VerifyLease { .. }))
                {
                    plan.steps.push(Step::VerifyLease {
                        resource_version: lease.metadata.resource_version.clone(),
                    });
                }
                let mut st = base_status(hc);
                st.phase = Some(Phase::Granted);
                st.queue_position = None;
                st.holder_identity = Some(hc.identity());
                st.fencing_token = lease
                    .metadata
                    .resource_version
                    .as_deref()
                    .and_then(|rv| rv.parse().ok());
                st.acquire_time = Some(Time(
                    lease
                        .spec
                        .as_ref()
                        .and_then(|s| s.acquire_time.as_ref())
                        .map_or(now.wall, |t| t.0),
                ));
                st.renew_time = lease_renew_time(lease).map(Time);
                let msg = format!("granted Lease {} to {}", input.lease_name, hc.identity());
                set_condition(
                    &mut st,
                    hc,
                    CONDITION_GRANTED,
                    true,
                    reason::GRANTED,
                    &msg,
                    now.wall,
                );
                plan.steps.push(Step::SetStatus {
                    claim: name(hc),
                    status: st,
                    fill_token: false,
                });
                plan.steps.push(Step::Event(Note {
                    target: Target::Claim(name(hc)),
                    warning: false,
                    reason: reason::GRANTED,
                    message: msg,
                }));
                plan.outcomes.push(Outcome::Granted {
                    waited: created(hc).and_then(|t| since(now.wall, t)),
                    handoff: None,
                    transition: false,
                });
                granted_now = Some(hc);
            }
            if hc.spec.renewal == Renewal::Controller {
                if let Some(s) = plan.memory.seen.as_mut() {
                    if now.mono >= s.renew_due {
                        let mut l = lease.clone();
                        let spec = l.spec.get_or_insert_with(LeaseSpec::default);
                        spec.renew_time = Some(MicroTime(now.wall));
                        plan.steps.push(Step::WriteLease {
                            kind: LeaseWriteKind::Renew,
                            lease: Box::new(l),
                        });
                        let d = claim_duration(hc);
                        s.renew_time = Some(now.wall);
                        s.observed_at = now.mono;
                        s.deadline = now.mono + d;
                        s.renew_due = now.mono + d / 3;
                    }
                    due.at(now.mono, s.renew_due);
                }
            }
        }
    }

    // --- Everyone still waiting: queue positions and whom they wait on. ---
    let wait_reason = if outsider_alive && holder_stays.is_none() {
        reason::HELD_EXTERNALLY
    } else if in_lock_delay && holder_stays.is_none() {
        reason::LOCK_DELAY
    } else {
        reason::QUEUED
    };
    let mut position = 0;
    for c in &live {
        let n = name(c);
        if ends.contains_key(&n) || deleting(c) {
            continue;
        }
        if granted_now.is_some_and(|g| g.metadata.name == c.metadata.name)
            || holder_stays.is_some_and(|h| h.metadata.name == c.metadata.name)
        {
            continue;
        }
        position += 1;
        let mut st = base_status(c);
        let first_time = c.status.as_ref().and_then(|s| s.phase).is_none();
        st.phase = Some(Phase::Pending);
        st.queue_position = Some(position);
        st.holder_identity = holder_now.clone();
        let msg = match (wait_reason, holder_now.as_deref()) {
            (reason::LOCK_DELAY, _) => format!(
                "waiting for the lock delay of Lease {} to end",
                input.lease_name
            ),
            (_, Some(h)) => format!(
                "waiting for Lease {} held by {h}; position {position}",
                input.lease_name
            ),
            (_, None) => format!(
                "waiting for Lease {}; position {position}",
                input.lease_name
            ),
        };
        set_condition(
            &mut st,
            c,
            CONDITION_GRANTED,
            false,
            wait_reason,
            &msg,
            now.wall,
        );
        if Some(&st) != c.status.as_ref() {
            plan.steps.push(Step::SetStatus {
                claim: n.clone(),
                status: st,
                fill_token: false,
            });
        }
        if first_time {
            plan.steps.push(Step::Event(Note {
                target: Target::Claim(n),
                warning: false,
                reason: reason::QUEUED,
                message: msg,
            }));
        }
    }
    plan.waiting = position as usize;

    // --- Let go of deleted claims, once the Lease no longer names them. ---
    for c in claims.iter().filter(|c| deleting(c) && has_finalizer(c)) {
        plan.steps.push(Step::RemoveFinalizer { claim: name(c) });
    }

    // --- ttlSecondsAfterFinished. ---
    for c in finished.iter().filter(|c| !deleting(c)) {
        let (Some(ttl), Some(at)) = (c.spec.ttl_seconds_after_finished, finished_at(c)) else {
            continue;
        };
        let when = add_secs(at, ttl);
        if now.wall >= when {
            plan.steps.push(Step::DeleteClaim { claim: name(c) });
        } else {
            due.wall(now.wall, when);
        }
    }

    // --- Garbage collection of an unused managed Lease. ---
    let live_after = live.iter().any(|c| !ends.contains_key(&name(c)));
    match input.lease {
        Some(lease) if is_managed(lease) && !live_after && holder.is_none() => {
            let since = *plan.memory.unclaimed_since.get_or_insert(now.mono);
            let when = since + input.config.gc_grace;
            if now.mono >= when {
                if let Some(rv) = lease.metadata.resource_version.clone() {
                    plan.steps.push(Step::DeleteLease {
                        resource_version: rv,
                    });
                    plan.steps.push(Step::Event(Note {
                        target: Target::Lease,
                        warning: false,
                        reason: reason::LEASE_GARBAGE_COLLECTED,
                        message: format!(
                            "no LockClaim has named Lease {} for {}s",
                            input.lease_name,
                            input.config.gc_grace.as_secs()
                        ),
                    }));
                    plan.outcomes.push(Outcome::GarbageCollected);
                    plan.memory.unclaimed_since = None;
                }
            } else {
                due.at(now.mono, when);
            }
        }
        _ => plan.memory.unclaimed_since = None,
    }
    if input.lease.is_none() {
        plan.memory.unclaimed_since = None;
    }

    plan.requeue_after = due.0;
    plan
}

fn expiry_message(r: &str, lease: &str, c: &LockClaim) -> String {
    match r {
        reason::MAX_HOLD_EXCEEDED => format!(
            "held Lease {lease} for maxHoldSeconds={}",
            c.spec.max_hold_seconds.unwrap_or_default()
        ),
        reason::LEASE_LOST => {
            format!("Lease {lease} was deleted or given to someone else outside leasekeeper")
        }
        _ => format!(
            "no renewal of Lease {lease} observed for leaseDurationSeconds={}",
            c.spec.lease_duration_seconds
        ),
    }
}

/// Updates the observation of the Lease's (holder, renewTime).
fn observe(mem: &mut Memory, lease: Option<&Lease>, holder: Option<&str>, now: Now) {
    let (Some(lease), Some(holder)) = (lease, holder) else {
        mem.seen = None;
        return;
    };
    let renew = lease_renew_time(lease);
    let d = lease_duration(lease);
    match mem.seen.as_mut() {
        Some(s) if s.holder == holder && s.renew_time == renew => {}
        Some(s) => {
            *s = Seen {
                holder: holder.to_string(),
                renew_time: renew,
                observed_at: now.mono,
                deadline: now.mono + d,
                renew_due: now.mono + d / 3,
            };
        }
        None => {
            // First sight since this process started (restart or failover): a full
            // duration, shortened by how old the Lease's own renewTime looks, but never
            // below the minimum a healthy holder's renewals fit in.
            let elapsed = renew
                .and_then(|r| since(now.wall, r))
                .unwrap_or_default()
                .min(d);
            let grace = d.saturating_sub(elapsed).max(min_takeover_grace(d));
            mem.seen = Some(Seen {
                holder: holder.to_string(),
                renew_time: renew,
                observed_at: now.mono,
                deadline: now.mono + grace,
                renew_due: now.mono + (d / 3).saturating_sub(elapsed),
            });
        }
    }
}

fn lock_delay_until(
    lease: Option<&Lease>,
    finished: &[&LockClaim],
    from_expiry_now: Option<i64>,
    now: Timestamp,
) -> Option<Timestamp> {
    let from_annotation = lease
        .and_then(|l| l.metadata.annotations.as_ref())
        .and_then(|a| a.get(LOCK_DELAY_ANNOTATION))
        .and_then(|v| v.parse::<Timestamp>().ok());
    let from_claims = finished
        .iter()
        .filter(|c| c.phase() == Some(Phase::Expired) && c.spec.lock_delay_seconds > 0)
        .filter_map(|c| {
            // expireTime has one-second precision: round up.
            let at = c.status.as_ref()?.expire_time.as_ref()?.0;
            Some(add_secs(at, i64::from(c.spec.lock_delay_seconds) + 1))
        })
        .max();
    let from_now = from_expiry_now.map(|s| add_secs(now, s));
    // The annotation is exact and written with the expiry; the claims' expireTime
    // (rounded up) stands in when that Lease write did not happen.
    [from_annotation.or(from_claims), from_now]
        .into_iter()
        .flatten()
        .max()
}

fn lease_claim_annotation(lease: &Lease) -> Option<String> {
    lease
        .metadata
        .annotations
        .as_ref()?
        .get(CLAIM_ANNOTATION)
        .cloned()
}

fn set_annotation(lease: &mut Lease, key: &str, value: Option<String>) {
    let ann = lease.metadata.annotations.get_or_insert_with(BTreeMap::new);
    match value {
        Some(v) => {
            ann.insert(key.to_string(), v);
        }
        None => {
            ann.remove(key);
        }
    }
    if ann.is_empty() {
        lease.metadata.annotations = None;
    }
}

fn set_lock_delay_annotation(lease: &mut Lease, until: Option<Timestamp>) {
    set_annotation(lease, LOCK_DELAY_ANNOTATION, until.map(|u| u.to_string()));
}

/// The Lease write that grants the Lease to `c`.
fn grant_lease(input: &Input<'_>, c: &LockClaim, now: Now) -> (LeaseWriteKind, Lease) {
    let identity = c.identity();
    match input.lease {
        None => (
            LeaseWriteKind::Create,
            Lease {
                metadata: ObjectMeta {
                    name: Some(input.lease_name.to_string()),
                    namespace: c.metadata.namespace.clone(),
                    labels: Some(
                        [(MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string())].into(),
                    ),
                    annotations: Some([(CLAIM_ANNOTATION.to_string(), name(c))].into()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(identity),
                    acquire_time: Some(MicroTime(now.wall)),
                    renew_time: Some(MicroTime(now.wall)),
                    lease_duration_seconds: Some(c.spec.lease_duration_seconds),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            },
        ),
        Some(old) => {
            let mut l = old.clone();
            let prev_holder = lease_holder(Some(old));
            let spec = l.spec.get_or_insert_with(LeaseSpec::default);
            let transitions = spec.lease_transitions.unwrap_or(0);
            if prev_holder.as_deref() != Some(identity.as_str()) {
                spec.lease_transitions = Some(transitions.saturating_add(1));
            }
            spec.holder_identity = Some(identity);
            spec.acquire_time = Some(MicroTime(now.wall));
            spec.renew_time = Some(MicroTime(now.wall));
            spec.lease_duration_seconds = Some(c.spec.lease_duration_seconds);
            set_lock_delay_annotation(&mut l, None);
            set_annotation(&mut l, CLAIM_ANNOTATION, c.metadata.name.clone());
            (LeaseWriteKind::Grant, l)
        }
    }
}

/// The claim's status as it is, with observedGeneration brought up to date.
fn base_status(c: &LockClaim) -> LockClaimStatus {
    let mut st = c.status.clone().unwrap_or_default();
    st.observed_generation = c.metadata.generation;
    st
}

/// When the claim finished, at the latest: the Finished condition's lastTransitionTime
/// is stored with one-second precision, so round up rather than act early.
fn finished_at(c: &LockClaim) -> Option<Timestamp> {
    c.condition(CONDITION_FINISHED)
        .filter(|x| x.status == "True")
        .map(|x| add_secs(x.last_transition_time.0, 1))
}

/// Sets a condition; lastTransitionTime moves only when the status flips.
fn set_condition(
    st: &mut LockClaimStatus,
    c: &LockClaim,
    type_: &str,
    status: bool,
    reason: &str,
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
        reason: reason.to_string(),
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
