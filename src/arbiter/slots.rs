//! The arbiter's entry point, [`decide`]: one lock. A lock of capacity N is N slot
//! Leases (slot 0 named like the lock, slot i `<lock>-slot-<i>`), each arbitrated by
//! [`decide_lease`] exactly as a single Lease is. [`decide`] composes them:
//! 1. every claim that holds, held or lost a slot stays with that slot ("home");
//! 2. each slot is decided with its home claims only, which says whether it is free;
//! 3. the first waiters in queue order get the free slots below the capacity, lowest
//!    first, but only while fewer than `capacity` claims hold (lowering the capacity
//!    revokes nobody); those slots are decided again with their new waiter;
//! 4. the writes: waiters that end (released, timed out, duplicates), then the plans
//!    of slots without a new grant (their holders leaving), then those with one, then
//!    the positions of claims still waiting. So at every moment a watcher can observe,
//!    no more claims are Granted than the capacity allowed when they were granted.
//!
//! A lock of capacity 1 with no slot above 0 in play is exactly a single Lease: one
//! call of [`decide_lease`] with every claim.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;

use super::pods::{self, PodView};
use super::{
    add_secs, created, decide_lease, deleting, lease, name, queue_cmp, status, Config, Input,
    Memory, Note, Now, Outcome, Plan, Reason, Step, Target,
};
use crate::api::{slot_lease, LockClaim, LockClaimStatus, Phase, CONDITION_GRANTED};

/// Everything the arbiter looks at for one lock.
pub struct LockInput<'a> {
    /// The lock's name (the claims' spec.leaseName; slot 0's Lease).
    pub lock_name: &'a str,
    /// The capacity in force: the Lock's spec.capacity, 1 without a Lock.
    pub capacity: u32,
    /// Every claim whose spec.leaseName is the lock.
    pub claims: &'a [&'a LockClaim],
    /// The lock's slot Leases as read, by slot; absent ones are missing.
    pub leases: &'a BTreeMap<u32, &'a Lease>,
    /// The slots whose Lease carries the operator's proof of creation (only those are
    /// ever garbage-collected).
    pub proven: &'a BTreeSet<u32>,
    /// The Pods that ask for the lock (label `leasekeeper.io/lock`).
    pub pods: &'a [PodView],
    /// What this process remembers, per slot.
    pub memory: &'a LockMemory,
    /// The time.
    pub now: Now,
    /// Settings.
    pub config: Config,
}

/// What this process remembers of a lock: each slot's [`Memory`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockMemory {
    /// By slot.
    pub slots: BTreeMap<u32, Memory>,
}

/// A step of a lock's plan and the slot whose Lease it concerns (claim writes and
/// Events carry the slot they were decided for; only Lease steps need it).
#[derive(Clone, Debug, PartialEq)]
pub struct LockStep {
    /// The slot.
    pub slot: u32,
    /// The step.
    pub step: Step,
}

/// The arbiter's answer for one lock.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LockPlan {
    /// Writes and Events in order; the executor stops at the first failed write.
    pub steps: Vec<LockStep>,
    /// What to remember.
    pub memory: LockMemory,
    /// Look again after this long even if nothing changes.
    pub requeue_after: Option<Duration>,
    /// Counted once the writes succeed.
    pub outcomes: Vec<Outcome>,
    /// Claims waiting after this plan.
    pub waiting: usize,
    /// Whether any live claim names the lock.
    pub has_live_claims: bool,
    /// Who holds which slot once the plan is written: slot -> claim name.
    pub holders: BTreeMap<u32, String>,
}

impl LockPlan {
    /// A waiter's status write, not tied to a slot's Lease (carried as slot 0).
    fn waiter_status(&mut self, c: &LockClaim, status: LockClaimStatus) {
        self.steps.push(LockStep {
            slot: 0,
            step: Step::SetStatus {
                claim: name(c),
                status,
                fill_token: false,
            },
        });
    }

    /// An Event on a waiting claim (carried as slot 0).
    fn waiter_event(&mut self, c: &LockClaim, warning: bool, reason: Reason, message: String) {
        self.steps.push(LockStep {
            slot: 0,
            step: Step::Event(Note {
                target: Target::Claim(name(c)),
                warning,
                reason,
                message,
            }),
        });
    }
}

/// Decides what to write for one lock (see the module documentation).
pub fn decide(input: &LockInput<'_>) -> LockPlan {
    if reserved_slot_name(input.lock_name) {
        return reject_all(input);
    }
    let mut plan = if is_single(input) {
        single(input)
    } else {
        several(input)
    };
    // A gated Pod without a claim gets one first; it queues once the watch shows it.
    let created: Vec<LockStep> = pods::missing_claims(input.pods, input.claims, input.lock_name)
        .into_iter()
        .map(|step| LockStep { slot: 0, step })
        .collect();
    plan.has_live_claims |= !created.is_empty();
    plan.steps.splice(0..0, created);
    plan
}

/// Whether `name` ends `-slot-<digits>`: a slot Lease of another lock. The CRD refuses
/// such a leaseName; a claim made before it did must never make a second key arbitrate
/// a Lease that a lock's key arbitrates too (two keys, one Lease: a double grant).
pub fn reserved_slot_name(name: &str) -> bool {
    name.rsplit_once("-slot-").is_some_and(|(l, n)| {
        !l.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
    })
}

/// Claims naming a reserved slot Lease name: each live one Rejected (reason
/// ReservedLeaseName), and nothing else written, the Lease least of all.
fn reject_all(input: &LockInput<'_>) -> LockPlan {
    let mut out = LockPlan::default();
    let lease = input.lock_name;
    for c in input.claims.iter().filter(|c| live(c) && !deleting(c)) {
        let msg = format!(
            "leaseName {lease} ends -slot-<digits>, a name reserved for the slot Leases of locks with capacity; this claim is never granted (make a new one with another leaseName)"
        );
        let st = status::finished(
            c,
            Phase::Rejected,
            Reason::ReservedLeaseName,
            &msg,
            None,
            input.now.wall,
        );
        out.waiter_status(c, st);
        out.waiter_event(c, true, Reason::Rejected, msg);
    }
    out
}

/// A lock with slots above 0 in play.
fn several(input: &LockInput<'_>) -> LockPlan {
    let mut claims: Vec<&LockClaim> = input.claims.to_vec();
    claims.sort_by(|a, b| queue_cmp(a, b));
    let homes = homes(input, &claims);
    let slots = slots_in_play(input, &homes);
    let first: BTreeMap<u32, Plan> = slots
        .iter()
        .map(|s| {
            (
                *s,
                decide_slot(input, *s, &home_claims(&claims, &homes, *s)),
            )
        })
        .collect();
    let mut out = LockPlan {
        has_live_claims: claims.iter().any(|c| live(c)),
        ..LockPlan::default()
    };
    let waiters: Vec<&LockClaim> = claims
        .iter()
        .copied()
        .filter(|c| live(c) && !homes.contains_key(&name(c)))
        .collect();
    let mut fate = waiter_fates(input, &waiters, &first, &homes, &claims, &mut out);
    let seconds: BTreeMap<u32, Plan> = fate
        .assigned
        .iter()
        .map(|(slot, c)| {
            let mut subset = home_claims(&claims, &homes, *slot);
            subset.push(c);
            (*slot, decide_slot(input, *slot, &subset))
        })
        .collect();
    lay_out(input, first, seconds, &mut fate, &mut out);
    out
}

/// Capacity 1 and nothing above slot 0 in play: the single-Lease arbiter, unchanged.
fn is_single(input: &LockInput<'_>) -> bool {
    input.capacity <= 1
        && input.leases.keys().all(|s| *s == 0)
        && input
            .claims
            .iter()
            .all(|c| c.status.as_ref().and_then(|s| s.slot).unwrap_or(0) == 0)
}

fn single(input: &LockInput<'_>) -> LockPlan {
    let memory = input.memory.slots.get(&0).cloned().unwrap_or_default();
    let plan = decide_lease(&Input {
        lease_name: input.lock_name,
        slot: 0,
        claims: input.claims,
        lease: input.leases.get(&0).copied(),
        lease_proven: input.proven.contains(&0),
        pods: input.pods,
        memory: &memory,
        now: input.now,
        config: input.config,
    });
    let mut out = LockPlan {
        has_live_claims: plan.has_live_claims,
        waiting: plan.waiting,
        requeue_after: plan.requeue_after,
        ..LockPlan::default()
    };
    absorb(0, plan, &mut out);
    out
}

/// Adds one slot's plan to the lock's.
fn absorb(slot: u32, plan: Plan, out: &mut LockPlan) {
    out.steps
        .extend(plan.steps.into_iter().map(|step| LockStep { slot, step }));
    out.outcomes.extend(plan.outcomes);
    out.requeue_after = earliest(out.requeue_after, plan.requeue_after);
    if let Some(h) = plan.holder_after {
        out.holders.insert(slot, h);
    }
    out.memory.slots.insert(slot, plan.memory);
}

fn earliest(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn live(c: &LockClaim) -> bool {
    !c.phase().is_some_and(Phase::is_terminal)
}

/// Each claim that belongs to a slot: the slot Lease names it (our grant), its status
/// says it was Granted there, or it finished there. Live claims without one wait.
fn homes(input: &LockInput<'_>, claims: &[&LockClaim]) -> HashMap<String, u32> {
    let mut out = HashMap::new();
    for (slot, l) in input.leases {
        if let Some(c) = claims.iter().find(|c| grant_names(l, c)) {
            out.insert(name(c), *slot);
        }
    }
    for c in claims {
        let st_slot = c
            .status
            .as_ref()
            .and_then(|s| s.slot)
            .and_then(|s| u32::try_from(s).ok());
        let held_here = c.phase() == Some(Phase::Granted) || !live(c);
        if !out.contains_key(&name(c)) && held_here {
            out.insert(name(c), st_slot.unwrap_or(0));
        }
    }
    out
}

/// Whether Lease `l` is our grant to claim `c` (annotation name and uid).
fn grant_names(l: &Lease, c: &LockClaim) -> bool {
    lease::claim_annotation(l).as_deref() == c.metadata.name.as_deref()
        && lease::claim_uid_annotation(l).is_none_or(|u| c.metadata.uid.as_deref() == Some(&u))
}

/// Slots below the capacity, slots whose Lease exists, and slots claims belong to.
fn slots_in_play(input: &LockInput<'_>, homes: &HashMap<String, u32>) -> BTreeSet<u32> {
    let mut s: BTreeSet<u32> = (0..input.capacity.max(1)).collect();
    s.extend(input.leases.keys().copied());
    s.extend(homes.values().copied());
    s
}

fn home_claims<'a>(
    claims: &[&'a LockClaim],
    homes: &HashMap<String, u32>,
    slot: u32,
) -> Vec<&'a LockClaim> {
    claims
        .iter()
        .copied()
        .filter(|c| homes.get(&name(c)) == Some(&slot))
        .collect()
}

/// One slot decided as a single Lease, from `claims` (its home claims, and the waiter
/// it is handed to, if any).
fn decide_slot(input: &LockInput<'_>, slot: u32, claims: &[&LockClaim]) -> Plan {
    let memory = input.memory.slots.get(&slot).cloned().unwrap_or_default();
    let lease_name = slot_lease(input.lock_name, slot);
    decide_lease(&Input {
        lease_name: &lease_name,
        slot,
        claims,
        lease: input.leases.get(&slot).copied(),
        lease_proven: input.proven.contains(&slot),
        pods: input.pods,
        memory: &memory,
        now: input.now,
        config: input.config,
    })
}

/// What becomes of the claims that wait: the slots some get, how the others end, and
/// the places of the rest.
#[derive(Default)]
struct Fates<'a> {
    assigned: BTreeMap<u32, &'a LockClaim>,
    ending: Vec<(&'a LockClaim, Phase, Reason, String)>,
    still: Vec<&'a LockClaim>,
}

fn waiter_fates<'a>(
    input: &LockInput<'_>,
    waiters: &[&'a LockClaim],
    first: &BTreeMap<u32, Plan>,
    homes: &HashMap<String, u32>,
    claims: &[&LockClaim],
    out: &mut LockPlan,
) -> Fates<'a> {
    let mut f = Fates::default();
    let rejected = duplicates(waiters, claims, homes);
    let held = first.values().filter(|p| p.holder_after.is_some()).count();
    let mut room = usize::try_from(input.capacity)
        .unwrap_or(usize::MAX)
        .saturating_sub(held);
    let mut free = first
        .iter()
        .filter(|(s, p)| **s < input.capacity && p.free)
        .map(|(s, _)| *s);
    for c in waiters.iter().copied() {
        if let Some(end) = waiter_end(input, c, &rejected, out) {
            f.ending.push((c, end.0, end.1, end.2));
            continue;
        }
        if room > 0 {
            if let Some(slot) = free.next() {
                f.assigned.insert(slot, c);
                room -= 1;
                continue;
            }
        }
        if c.spec.acquire_timeout_seconds == Some(0) {
            let msg = format!("lock {} was not free (try-lock)", input.lock_name);
            f.ending
                .push((c, Phase::TimedOut, Reason::AcquireTimeout, msg));
        } else if !deleting(c) {
            f.still.push(c);
        }
    }
    f
}

/// How a waiter ends before any grant, if it does.
fn waiter_end(
    input: &LockInput<'_>,
    c: &LockClaim,
    rejected: &BTreeSet<String>,
    out: &mut LockPlan,
) -> Option<(Phase, Reason, String)> {
    let lock = input.lock_name;
    if c.spec.release || deleting(c) {
        return Some((
            Phase::Released,
            Reason::Released,
            format!("released lock {lock}"),
        ));
    }
    if rejected.contains(&name(c)) {
        let msg = format!(
            "another live claim for lock {lock} has holderIdentity {:?}",
            c.identity()
        );
        return Some((Phase::Rejected, Reason::DuplicateIdentity, msg));
    }
    let t = c.spec.acquire_timeout_seconds.filter(|t| *t > 0)?;
    let deadline = add_secs(created(c)?, t.saturating_add(1));
    if input.now.wall >= deadline {
        let msg = format!("not granted lock {lock} within acquireTimeoutSeconds={t}");
        return Some((Phase::TimedOut, Reason::AcquireTimeout, msg));
    }
    let after = super::since(deadline, input.now.wall).unwrap_or_default();
    out.requeue_after = earliest(out.requeue_after, Some(after.max(Duration::from_millis(1))));
    None
}

/// Waiters whose identity another live claim of the lock already uses (a holder, or an
/// older waiter).
fn duplicates(
    waiters: &[&LockClaim],
    claims: &[&LockClaim],
    homes: &HashMap<String, u32>,
) -> BTreeSet<String> {
    let mut taken: BTreeSet<String> = claims
        .iter()
        .filter(|c| live(c) && homes.contains_key(&name(c)))
        .map(|c| c.identity())
        .collect();
    let mut oldest_first: Vec<&&LockClaim> = waiters.iter().collect();
    oldest_first.sort_by_key(|c| (created(c), name(c)));
    let mut out = BTreeSet::new();
    for c in oldest_first {
        if !taken.insert(c.identity()) && !c.spec.release && !deleting(c) {
            out.insert(name(c));
        }
    }
    out
}

/// The writes in the order of the module documentation.
fn lay_out(
    input: &LockInput<'_>,
    first: BTreeMap<u32, Plan>,
    mut seconds: BTreeMap<u32, Plan>,
    fate: &mut Fates<'_>,
    out: &mut LockPlan,
) {
    end_waiters(input, &fate.ending, out);
    for (slot, plan) in first {
        if !seconds.contains_key(&slot) {
            absorb(slot, plan, out);
        }
    }
    for slot in seconds.keys().copied().collect::<Vec<_>>() {
        if let Some(plan) = seconds.remove(&slot) {
            absorb(slot, plan, out);
        }
    }
    queue(input, &fate.still, out);
}

fn end_waiters(
    input: &LockInput<'_>,
    ending: &[(&LockClaim, Phase, Reason, String)],
    out: &mut LockPlan,
) {
    for (c, phase, why, msg) in ending {
        if deleting(c) {
            continue;
        }
        let st = status::finished(c, *phase, *why, msg, None, input.now.wall);
        out.waiter_status(c, st);
        if *phase == Phase::TimedOut {
            out.outcomes.push(Outcome::TimedOut);
        }
        let event_reason = match phase {
            Phase::TimedOut => Reason::AcquireTimeout,
            Phase::Rejected => Reason::Rejected,
            _ => Reason::Released,
        };
        out.waiter_event(c, *phase != Phase::Released, event_reason, msg.clone());
    }
}

/// Claims still waiting: their places (exact for the first `exact_positions`), written
/// only when they change; a claim's first queueing is an Event.
fn queue(input: &LockInput<'_>, still: &[&LockClaim], out: &mut LockPlan) {
    let exact = i32::try_from(input.config.exact_positions).unwrap_or(i32::MAX);
    for (i, c) in still.iter().enumerate() {
        let place = i32::try_from(i + 1).unwrap_or(i32::MAX);
        let position = (place <= exact).then_some(place);
        let where_ = match position {
            Some(p) => format!("position {p}"),
            None => format!("more than {exact} claims ahead"),
        };
        let msg = format!(
            "waiting for lock {} (capacity {}, no slot free); {where_}",
            input.lock_name, input.capacity
        );
        let st = status::waiting(c, position, Reason::Queued, &msg, None, input.now.wall);
        if Some(&st) != c.status.as_ref() {
            out.waiter_status(c, st);
        }
        let first_time = c.status.as_ref().and_then(|s| s.phase).is_none();
        let queued_before = c
            .condition(CONDITION_GRANTED)
            .is_some_and(|x| x.reason == Reason::Queued.as_str());
        if first_time || !queued_before {
            out.waiter_event(c, false, Reason::Queued, msg);
        }
    }
    out.waiting = still.len();
}
