//! The pure decision core: state in, plan out. No client, no async and no clock read
//! in here: time is an argument.
//!
//! The entry point is [`decide`] (in `slots`): everything known about one lock (its
//! claims, its slot Leases as read, its capacity, what this operator process
//! remembers, the time) in, a [`LockPlan`] out: the writes to make, in the order that
//! keeps every watcher safe, the Events, the new memory, and when to look again. A lock
//! of capacity 1 is a single Lease; a lock of capacity N is N slot Leases, each decided
//! by [`decide_lease`] exactly as a single Lease is, and composed by `slots`.
//!
//! [`decide_lease`] reads as its phases, one module each (docs/design.md, "The
//! arbiter"): 1. [`view`] observes, 2. [`verdicts`] decides which claims end, 3. [`free`]
//! whether the Lease is free and who is next. Then the writes, in write order
//! (docs/design.md, "Write order", same numbers):
//! 1. claims that stop holding are marked not Granted ([`endings`]), after a fresh read
//!    of the Lease when the verdict came from it ([`verify`]);
//! 2. the Lease is written, with the resourceVersion it was decided from ([`grant`]);
//! 3. the new holder is marked Granted, its fencing token the Lease's new
//!    resourceVersion ([`grant`]);
//! 4. waiting claims get their queue positions ([`positions`]); a legacy finalizer comes
//!    off ([`finalizers`]); finished claims and unused Leases due for garbage
//!    collection are deleted ([`cleanup`]).
//!
//! A Lease the operator did not create, and whose owner has not allowed a takeover, is
//! never written ([`view::Holding::Foreign`]). The model API server and the tests live
//! in `model/`.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;

use crate::api::{LockClaim, LockClaimStatus, Phase};
use crate::api::{CONDITION_FINISHED, FINALIZER};

mod cleanup;
mod endings;
mod finalizers;
mod free;
mod grant;
mod lease;
pub mod pods;
mod positions;
mod reason;
mod slots;
mod status;
mod streak;
mod verdicts;
mod verify;
mod view;

pub use lease::{is_managed, slim as slim_lease, takeover_allowed, update_patch, writable};
pub use pods::{NodeView, PodView};
pub use reason::{End, Reason};
pub use slots::{decide, reserved_slot_name, LockInput, LockMemory, LockPlan, LockStep};
pub use streak::{
    failing_status, notified, recovered_status, stalled_waiters, Notice, Streak, MAX_NOTIFIED,
    PERSISTENT_FAILURES,
};
pub use view::min_takeover_grace;

/// The model API server and the arbiter's unit and property tests (tests only).
#[cfg(test)]
pub(crate) mod model;

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
    /// Waiters with an exact `queuePosition`; those further back have none (their
    /// condition says "more than N ahead"), so a handoff rewrites at most this many.
    pub exact_positions: u32,
    /// A waiter whose position only improved (it moved up, or waits on a new holder) is
    /// rewritten at most this long after the first such change: during a burst of
    /// handoffs a queue is rewritten once, not once per handoff. Every other change
    /// (first queued, next in line, moved back, another reason) is written at once.
    pub position_delay: Duration,
    /// Whether Pods are watched: only then are claims of renewal Pod judged by their
    /// Pods (else they are held like Controller claims, never ended for a Pod unseen).
    pub pods: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            gc_grace: Duration::from_secs(300),
            exact_positions: 10,
            position_delay: Duration::from_secs(1),
            pods: true,
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
    /// The claim this process granted the Lease to, and when (the exact acquireTime it
    /// wrote; the claim's status has only seconds).
    pub acquired: Option<(String, Timestamp)>,
    /// When deferred queue-position updates are written (see
    /// [`Config::position_delay`]).
    pub positions_due: Option<Duration>,
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
    /// Why.
    pub reason: Reason,
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
    /// Create the claim for a Pod that asks for the lock (see [`pods`]).
    CreateClaim {
        /// The claim, owned by its Pod.
        claim: Box<LockClaim>,
    },
    /// Open a Pod whose claim is Granted: one patch (with the Pod's resourceVersion as
    /// precondition) writes the fencing token and the Lease into its annotations and
    /// removes leasekeeper's scheduling gate.
    OpenPod {
        /// The Pod.
        pod: String,
        /// Its resourceVersion as read.
        resource_version: String,
        /// The Lease it holds.
        lease: String,
        /// The token, unless `fill_token` takes it from the plan's Lease write.
        token: Option<i64>,
        /// Take the token from the preceding Lease write.
        fill_token: bool,
    },
    /// Re-read node `node`'s heartbeat Lease and stop the plan unless its
    /// resourceVersion is still this one: put before a verdict that the node is lost.
    VerifyNode {
        /// The node.
        node: String,
        /// The heartbeat Lease's resourceVersion the verdict was drawn from.
        resource_version: Option<String>,
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
    Expired(Reason),
    /// The Lease was garbage-collected.
    GarbageCollected,
    /// A waiting claim gave up (acquireTimeoutSeconds).
    TimedOut,
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
    /// Whether the Lease could be granted to a waiting claim now (nobody keeps it, no
    /// live outsider, no lock delay, ours to write): a lock with capacity hands such a
    /// slot to its next waiter.
    pub free: bool,
    /// The claim that holds the Lease once this plan is written.
    pub holder_after: Option<String>,
}

/// Everything the arbiter looks at for one Lease name.
pub struct Input<'a> {
    /// The Lease name.
    pub lease_name: &'a str,
    /// Which slot of its lock the Lease is (0: the Lease named like the lock), written
    /// into a Granted claim's status with the Lease name.
    pub slot: u32,
    /// All claims in the namespace whose spec.leaseName is `lease_name`.
    pub claims: &'a [&'a LockClaim],
    /// The Lease as read, if it exists.
    pub lease: Option<&'a Lease>,
    /// Whether the Lease carries the operator's proof that it created it (checked by
    /// the caller, who holds the key): only such a Lease is ever garbage-collected.
    pub lease_proven: bool,
    /// The Pods that ask for the lock (renewal `Pod` claims stand for them).
    pub pods: &'a [PodView],
    /// What this process remembers.
    pub memory: &'a Memory,
    /// The time.
    pub now: Now,
    /// Settings.
    pub config: Config,
}

/// Decides what to write for one Lease: the phases, then the writes in write order
/// (see the module documentation).
pub fn decide_lease(input: &Input<'_>) -> Plan {
    let mut d = Draft::new(input);
    let v = view::View::observe(input, &mut d.plan.memory);
    d.plan.has_live_claims = !v.live.is_empty();
    let mut ends = verdicts::judge(&v, &mut d);
    let free = free::find(&v, &ends, &mut d);
    verdicts::try_locks(&v, free.next, &mut ends);
    d.plan.free =
        free.holder_stays.is_none() && !free.outsider_alive && !free.in_lock_delay && !free.foreign;
    d.plan.holder_after = free.next.or(free.holder_stays).map(name);

    verify::before_verdicts(&v, &ends, &free, &mut d);
    endings::mark(&v, &ends, &free, &mut d);
    let granted = grant::write_lease(&v, &free, &mut d);
    positions::positions(&v, &ends, &free, granted, &mut d);
    finalizers::remove_legacy(&v, &mut d);
    cleanup::ttl(&v, &mut d);
    cleanup::gc(&v, &ends, &mut d);
    d.finish()
}

/// The plan under construction, and the earliest instant something falls due.
struct Draft {
    plan: Plan,
    due: Due,
}

impl Draft {
    fn new(input: &Input<'_>) -> Draft {
        Draft {
            plan: Plan {
                memory: input.memory.clone(),
                ..Plan::default()
            },
            due: Due::default(),
        }
    }

    fn push(&mut self, step: Step) {
        self.plan.steps.push(step);
    }

    /// Publishes a Normal Event at this point of the plan.
    fn note(&mut self, target: Target, reason: Reason, message: String) {
        self.push(Step::Event(Note {
            target,
            warning: false,
            reason,
            message,
        }));
    }

    /// Publishes a Warning Event at this point of the plan.
    fn warn(&mut self, target: Target, reason: Reason, message: String) {
        self.push(Step::Event(Note {
            target,
            warning: true,
            reason,
            message,
        }));
    }

    fn finish(mut self) -> Plan {
        self.plan.requeue_after = self.due.0;
        self.plan
    }
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

impl Seen {
    /// A renewal by `holder` (renewTime `renew_time`) observed at `at`, for a grant of
    /// `duration`: expired a duration later, renewed by the operator a third later.
    fn renewed(
        holder: &str,
        renew_time: Option<Timestamp>,
        at: Duration,
        duration: Duration,
    ) -> Seen {
        Seen {
            holder: holder.to_string(),
            renew_time,
            observed_at: at,
            deadline: at + duration,
            renew_due: at + duration / 3,
        }
    }
}

/// Duration of a grant for a claim.
fn claim_duration(c: &LockClaim) -> Duration {
    Duration::from_secs(u64::try_from(c.spec.lease_duration_seconds.max(1)).unwrap_or(1))
}

/// Truncates to microseconds, the precision of a Lease's MicroTime fields.
fn micros(t: Timestamp) -> Timestamp {
    Timestamp::from_microsecond(t.as_microsecond()).unwrap_or(t)
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
