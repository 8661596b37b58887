//! One reconcile of one Lease key: read the caches, decide (the arbiter), execute the
//! plan, remember; with backoff after failures.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;
use tokio::time::Instant;

use super::execute::{self, LeaseWrite, Written};
use super::{
    chaos, failure_notice, foreign, lock_status, pod_watch, routes, Context, Error, KeyState,
    LeaseKey,
};
use crate::api::{slot_lease, Lock, LockClaim, MAX_CAPACITY, MIN_CAPACITY};
use crate::arbiter::{self, LockMemory, LockPlan, Outcome, PodView};
use crate::telemetry::{NamespaceLabel, ReasonLabel};
use prometheus_client::metrics::{family::Family, gauge::Gauge};

/// Backoff after failures: conflicts retry fast (the cache usually just lags).
fn backoff(failures: u32, conflict: bool) -> Duration {
    let base = if conflict { 20 } else { 200 };
    let cap = if conflict { 2_000 } else { 30_000 };
    Duration::from_millis((base << failures.min(10)).min(cap))
}

/// Reconciles `key` and schedules it again when the plan (or a failure) says.
pub(super) async fn reconcile_key(ctx: &Arc<Context>, key: &LeaseKey) {
    ctx.metrics.reconciles.inc();
    let started = ctx.mono();
    let next = match reconcile(ctx, key).await {
        Ok(next) => {
            if let Some(s) = ctx.keys().get_mut(key) {
                s.failures = 0;
            }
            failure_notice::succeeded(ctx, key).await;
            next
        }
        Err(Error::UnwatchedLease { lease, slot, .. }) => {
            count_error(ctx, "UnwatchedLease");
            foreign::learn(ctx, key, slot, *lease);
            Some(Duration::ZERO)
        }
        Err(e) => {
            let after = failed(ctx, key, &e);
            failure_notice::failed(ctx, key, &e).await;
            Some(after)
        }
    };
    tracing::trace!(namespace = %key.namespace, lease = %key.name, took_us = (ctx.mono() - started).as_micros() as u64, "reconciled");
    if let Some(after) = next {
        ctx.queue.schedule(key.clone(), Instant::now() + after);
    }
}

/// A reconcile panicked (the worker contained it): counted as an error of reason
/// `Panic`, and the key tried again with backoff, like any failure.
pub(super) fn reconcile_panicked(ctx: &Arc<Context>, key: &LeaseKey) {
    let e = Error::Panic {
        lease: key.name.clone(),
    };
    let after = failed(ctx, key, &e);
    ctx.queue.schedule(key.clone(), Instant::now() + after);
    failure_notice::panicked(ctx, key, e);
}

/// Counts and logs a failed reconcile; returns the backoff before the next try.
fn failed(ctx: &Context, key: &LeaseKey, e: &Error) -> Duration {
    let failures = {
        let mut keys = ctx.keys();
        let s = keys.entry(key.clone()).or_default();
        s.failures = s.failures.saturating_add(1);
        s.failures
    };
    count_error(ctx, e.reason());
    if e.is_conflict() {
        tracing::debug!(namespace = %key.namespace, lease = %key.name, error = %e, "conflict; re-reading");
    } else {
        tracing::warn!(namespace = %key.namespace, lease = %key.name, error = %e, reason = e.reason(), "reconcile failed; backing off");
    }
    backoff(failures - 1, e.is_conflict())
}

fn count_error(ctx: &Context, reason: &str) {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ReasonLabel {
            reason: reason.to_string(),
        })
        .inc();
}

/// Reads the state of one lock, decides, and writes. Returns when to look again.
async fn reconcile(ctx: &Arc<Context>, key: &LeaseKey) -> Result<Option<Duration>, Error> {
    if routes::is_orphan(key) {
        routes::remove_orphan(ctx, key).await;
        return Ok(None);
    }
    foreign::refresh(ctx, key).await?;
    let mut r = read(ctx, key);
    // What the arbiter sees and what it plans pass the chaos build's seam (nothing
    // happens there in the product build).
    let Read {
        claims,
        leases,
        capacity,
        pods,
        ..
    } = &mut r;
    let (capacity, pods) = (*capacity, &*pods);
    let plan = chaos::arbiter(key, claims, leases, |claims, leases| {
        decide(ctx, key, claims, leases, capacity, pods)
    });
    let Some(plan) = plan else {
        tracing::debug!(namespace = %key.namespace, lease = %key.name, "cache behind our last write; waiting for the watch");
        return Ok(Some(Duration::from_secs(1)));
    };
    let written = if plan.steps.is_empty() {
        Written::default()
    } else {
        execute::execute(ctx, key, &plan, &r.claims, &r.leases, &r.pods).await?
    };
    record(ctx, key, &plan.outcomes);
    lock_status::publish(ctx, key, &plan, &r.claims, r.lock.as_deref(), r.capacity).await;
    let route_refresh = routes::publish(ctx, key, &plan, &r.claims).await;
    remember(ctx, key, &plan, written, &r);
    let recheck = foreign::recheck_in(ctx, key);
    Ok([plan.requeue_after, recheck, route_refresh]
        .into_iter()
        .flatten()
        .min())
}

/// The plan for the lock as read; None while the caches are older than our own last
/// writes (deciding from them would only produce refused writes: the watch delivering
/// them triggers the key again).
fn decide(
    ctx: &Context,
    key: &LeaseKey,
    claims: &[Arc<LockClaim>],
    leases: &BTreeMap<u32, Arc<Lease>>,
    capacity: u32,
    pods: &[PodView],
) -> Option<LockPlan> {
    note_stalled(ctx, key, claims, capacity);
    let memory = memory_unless_stale(ctx, key, claims, leases)?;
    let refs: Vec<&LockClaim> = claims.iter().map(|c| c.as_ref()).collect();
    let proven: BTreeSet<u32> = leases
        .iter()
        .filter(|(_, l)| ctx.proof.proves(l))
        .map(|(s, _)| *s)
        .collect();
    let leases: BTreeMap<u32, &Lease> = leases.iter().map(|(s, l)| (*s, l.as_ref())).collect();
    Some(arbiter::decide(&arbiter::LockInput {
        lock_name: &key.name,
        capacity,
        claims: &refs,
        leases: &leases,
        proven: &proven,
        pods,
        memory: &memory,
        now: arbiter::Now {
            wall: jiff::Timestamp::now(),
            mono: ctx.mono(),
        },
        config: ctx.config,
    }))
}

/// What one reconcile reads from the caches.
struct Read {
    /// The claims that name the lock.
    pub claims: Vec<Arc<LockClaim>>,
    /// Its slot Leases, by slot: from the watched caches, else as last read when the
    /// watches do not show them.
    pub leases: BTreeMap<u32, Arc<Lease>>,
    /// The capacity in force (the Lock's, else 1).
    pub capacity: u32,
    /// The Lock object, if any.
    pub lock: Option<Arc<Lock>>,
    /// The Pods that ask for the lock.
    pub pods: Vec<PodView>,
}

fn read(ctx: &Context, key: &LeaseKey) -> Read {
    let names: Vec<String> = ctx
        .index()
        .get(key)
        .map(|n| n.iter().cloned().collect())
        .unwrap_or_default();
    let claims = names
        .iter()
        .filter_map(|n| ctx.claims.get(&ObjectRef::new(n).within(&key.namespace)))
        .filter(|c| c.spec.lease_name == key.name)
        .collect();
    let lock = ctx
        .locks
        .get(&ObjectRef::new(&key.name).within(&key.namespace));
    let capacity = lock.as_ref().map_or(1, |l| {
        u32::try_from(l.spec.capacity.clamp(MIN_CAPACITY, MAX_CAPACITY)).unwrap_or(1)
    });
    let mut leases = BTreeMap::new();
    let (slots, foreign) = {
        let keys = ctx.keys();
        let s = keys.get(key);
        let foreign: BTreeMap<u32, Arc<Lease>> = s
            .map(|s| {
                s.foreign
                    .iter()
                    .map(|(k, f)| (*k, f.lease.clone()))
                    .collect()
            })
            .unwrap_or_default();
        (ctx.slots_of(key), foreign)
    };
    for slot in std::iter::once(0).chain(slots) {
        let name = LeaseKey {
            namespace: key.namespace.clone(),
            name: slot_lease(&key.name, slot),
        };
        if let Some(l) = ctx.watched_lease(&name) {
            leases.insert(slot, l);
        }
    }
    for (slot, l) in foreign {
        leases.entry(slot).or_insert(l);
    }
    Read {
        claims,
        leases,
        capacity,
        lock,
        pods: pod_watch::views(ctx, key),
    }
}

/// What this process remembers of the key, unless the caches are older than its own
/// last writes (None).
fn memory_unless_stale(
    ctx: &Context,
    key: &LeaseKey,
    claims: &[Arc<LockClaim>],
    leases: &BTreeMap<u32, Arc<Lease>>,
) -> Option<LockMemory> {
    let keys = ctx.keys();
    let Some(s) = keys.get(key) else {
        return Some(LockMemory::default());
    };
    let rv = |o: Option<String>| o.and_then(|v| v.parse::<u64>().ok());
    let lease_behind = s.lease_rvs.iter().any(|(slot, w)| {
        // Absent from the cache although we wrote it: the watch has not caught up.
        rv(leases.get(slot).and_then(|l| l.resource_version())).is_none_or(|have| have < *w)
    });
    let claim_behind = claims.iter().any(|c| {
        s.claim_rvs
            .get(&c.name_any())
            .is_some_and(|w| rv(c.resource_version()).is_some_and(|have| have < *w))
    });
    (!lease_behind && !claim_behind).then(|| s.memory.clone())
}

/// Keeps the plan's memory and what it wrote for the next reconcile, or forgets the key
/// when no live claim names the lock and none of its Leases is (or still is) ours.
fn remember(ctx: &Context, key: &LeaseKey, plan: &LockPlan, written: Written, r: &Read) {
    let mut keys = ctx.keys();
    let ours_left = r
        .leases
        .iter()
        .any(|(slot, l)| !written.deleted(*slot) && arbiter::is_managed(l));
    if !plan.has_live_claims && !ours_left && r.lock.is_none() {
        if let Some(s) = keys.remove(key) {
            adjust_queue_depth(ctx, key, s.waiting, 0);
            adjust(&ctx.metrics.stalled_waiters, key, s.stalled, 0);
        }
        drop(keys);
        let mut index = ctx.index();
        if index.get(key).is_some_and(HashSet::is_empty) {
            index.remove(key);
        }
        return;
    }
    let state: &mut KeyState = keys.entry(key.clone()).or_default();
    state.memory = plan.memory.clone();
    for (slot, at) in &written.granted_at {
        if let Some(m) = state.memory.slots.get_mut(slot) {
            m.rebase_grant(*at);
        }
    }
    for (slot, w) in &written.leases {
        match w {
            LeaseWrite::Written(rv) => state.lease_rvs.insert(*slot, *rv),
            LeaseWrite::Deleted => state.lease_rvs.remove(slot),
        };
    }
    state
        .claim_rvs
        .retain(|n, _| r.claims.iter().any(|c| c.name_any() == *n));
    state.claim_rvs.extend(written.claims);
    let before = std::mem::replace(&mut state.waiting, plan.waiting);
    drop(keys);
    adjust_queue_depth(ctx, key, before, plan.waiting);
}

fn adjust_queue_depth(ctx: &Context, key: &LeaseKey, before: usize, after: usize) {
    adjust(&ctx.metrics.queue_depth, key, before, after);
}

/// Moves a per-namespace gauge by one key's change from `before` to `after`.
fn adjust(gauge: &Family<NamespaceLabel, Gauge>, key: &LeaseKey, before: usize, after: usize) {
    if before != after {
        let g = gauge.get_or_create(&NamespaceLabel {
            namespace: key.namespace.clone(),
        });
        g.inc_by(after as i64 - before as i64);
    }
}

/// Counts the lock's claims that wait although a slot is free, as read (before the
/// plan, so that a grant that keeps failing keeps them counted).
fn note_stalled(ctx: &Context, key: &LeaseKey, claims: &[Arc<LockClaim>], capacity: u32) {
    let refs: Vec<&LockClaim> = claims.iter().map(|c| c.as_ref()).collect();
    let now = arbiter::stalled_waiters(&refs, capacity);
    let before = {
        let mut keys = ctx.keys();
        let s = keys.entry(key.clone()).or_default();
        std::mem::replace(&mut s.stalled, now)
    };
    adjust(&ctx.metrics.stalled_waiters, key, before, now);
}

/// Counts what the plan changed.
fn record(ctx: &Context, key: &LeaseKey, outcomes: &[Outcome]) {
    let m = &ctx.metrics;
    for o in outcomes {
        match o {
            Outcome::Granted {
                waited,
                handoff,
                transition,
            } => {
                m.grants.inc();
                if let Some(w) = waited {
                    m.grant_latency.observe(w.as_secs_f64());
                }
                if let Some(h) = handoff {
                    m.handoff_latency.observe(h.as_secs_f64());
                }
                if *transition {
                    m.lease_transitions.inc();
                }
                tracing::info!(namespace = %key.namespace, lease = %key.name, "granted");
            }
            Outcome::Released => {
                m.releases.inc();
            }
            Outcome::Expired(r) => {
                m.expiries
                    .get_or_create(&ReasonLabel {
                        reason: r.as_str().to_string(),
                    })
                    .inc();
                tracing::info!(namespace = %key.namespace, lease = %key.name, reason = r.as_str(), "grant expired");
            }
            Outcome::TimedOut => {
                m.acquire_timeouts.inc();
            }
            Outcome::GarbageCollected => {
                m.gc_deleted.inc();
                tracing::info!(namespace = %key.namespace, lease = %key.name, "garbage-collected Lease");
            }
        }
    }
}
