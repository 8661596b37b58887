//! One reconcile of one Lease key: read the caches, decide (the arbiter), execute the
//! plan, remember; with backoff after failures.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use tokio::time::Instant;

use super::execute::{self, Written};
use super::{chaos, Context, Error, Foreign, KeyState, LeaseKey};
use crate::api::LockClaim;
use crate::arbiter::{self, Memory, Outcome, Plan};
use crate::telemetry::{NamespaceLabel, ReasonLabel};

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
            next
        }
        Err(Error::UnwatchedLease { lease, .. }) => {
            count_error(ctx, "UnwatchedLease");
            learn_foreign(ctx, key, *lease);
            Some(Duration::ZERO)
        }
        Err(e) => Some(failed(ctx, key, &e)),
    };
    tracing::trace!(namespace = %key.namespace, lease = %key.name, took_us = (ctx.mono() - started).as_micros() as u64, "reconciled");
    if let Some(after) = next {
        ctx.queue.schedule(key.clone(), Instant::now() + after);
    }
}

/// A reconcile panicked (the worker contained it): counted as an error of reason
/// `Panic`, and the key tried again with backoff, like any failure.
pub(super) fn reconcile_panicked(ctx: &Context, key: &LeaseKey) {
    let e = Error::Panicked {
        lease: key.name.clone(),
    };
    let after = failed(ctx, key, &e);
    ctx.queue.schedule(key.clone(), Instant::now() + after);
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

/// First and longest wait before an unwatched Lease is read again.
const FOREIGN_RECHECK: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(60));

/// Remembers a Lease the watches do not show (a create of it was refused), so that the
/// next decisions see it; it is read again with backoff ([`refresh_foreign`]).
fn learn_foreign(ctx: &Context, key: &LeaseKey, mut lease: Lease) {
    arbiter::slim_lease(&mut lease);
    let now = ctx.mono();
    let mut keys = ctx.keys();
    let s = keys.entry(key.clone()).or_default();
    let backoff = s.foreign.as_ref().map_or(FOREIGN_RECHECK.0, |f| {
        (f.backoff * 2).min(FOREIGN_RECHECK.1)
    });
    s.foreign = Some(Foreign {
        lease: Arc::new(lease),
        recheck: now + backoff,
        backoff,
    });
}

/// Reads an unwatched Lease again once its recheck is due: gone, it is forgotten (the
/// next decision may create it); still there, it is remembered with a longer backoff.
async fn refresh_foreign(ctx: &Context, key: &LeaseKey) -> Result<(), Error> {
    let due = ctx
        .keys()
        .get(key)
        .and_then(|s| s.foreign.as_ref())
        .is_some_and(|f| f.recheck <= ctx.mono());
    if !due {
        return Ok(());
    }
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let read = api
        .get_opt(&key.name)
        .await
        .map_err(|source| Error::LeaseReadFailed {
            name: key.name.clone(),
            source,
        })?;
    match read {
        Some(lease) => learn_foreign(ctx, key, lease),
        None => {
            if let Some(s) = ctx.keys().get_mut(key) {
                s.foreign = None;
            }
        }
    }
    Ok(())
}

/// When an unwatched Lease in use is due to be read again.
fn foreign_recheck_in(ctx: &Context, key: &LeaseKey) -> Option<Duration> {
    let keys = ctx.keys();
    let f = keys.get(key)?.foreign.as_ref()?;
    Some(f.recheck.saturating_sub(ctx.mono()))
}

/// Reads the state of one Lease key, decides, and writes. Returns when to look again.
async fn reconcile(ctx: &Arc<Context>, key: &LeaseKey) -> Result<Option<Duration>, Error> {
    refresh_foreign(ctx, key).await?;
    let (claims, lease, foreign) = read(ctx, key);
    // A cache older than our own last writes would only produce refused writes: wait
    // for the watch to deliver them (it triggers this key again).
    let Some(memory) = memory_unless_stale(ctx, key, &claims, lease.as_deref()) else {
        tracing::debug!(namespace = %key.namespace, lease = %key.name, "cache behind our last write; waiting for the watch");
        return Ok(Some(Duration::from_secs(1)));
    };
    let (claims, lease) = chaos::inputs(claims, lease);
    let now = arbiter::Now {
        wall: jiff::Timestamp::now(),
        mono: ctx.mono(),
    };
    let refs: Vec<&LockClaim> = claims.iter().map(|c| c.as_ref()).collect();
    let plan = arbiter::decide(&arbiter::Input {
        lease_name: &key.name,
        claims: &refs,
        lease: lease.as_deref(),
        memory: &memory,
        now,
        config: ctx.config,
    });
    let written = if plan.steps.is_empty() {
        Written::default()
    } else {
        execute::execute(ctx, key, &plan, &claims, lease.as_deref()).await?
    };
    record(ctx, key, &plan);
    remember(ctx, key, &plan, written, &claims, lease.as_deref());
    let recheck = foreign.then(|| foreign_recheck_in(ctx, key)).flatten();
    Ok(match (plan.requeue_after, recheck) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// The claims that name the key's Lease, and the Lease: from the watched caches, else
/// the unwatched one last read (then `true`).
fn read(ctx: &Context, key: &LeaseKey) -> (Vec<Arc<LockClaim>>, Option<Arc<Lease>>, bool) {
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
    if let Some(lease) = ctx.watched_lease(key) {
        return (claims, Some(lease), false);
    }
    let foreign = ctx
        .keys()
        .get(key)
        .and_then(|s| s.foreign.as_ref().map(|f| f.lease.clone()));
    let unwatched = foreign.is_some();
    (claims, foreign, unwatched)
}

/// What this process remembers of the key, unless the caches are older than its own
/// last writes (None).
fn memory_unless_stale(
    ctx: &Context,
    key: &LeaseKey,
    claims: &[Arc<LockClaim>],
    lease: Option<&Lease>,
) -> Option<Memory> {
    let keys = ctx.keys();
    let Some(s) = keys.get(key) else {
        return Some(Memory::default());
    };
    let rv = |o: Option<String>| o.and_then(|v| v.parse::<u64>().ok());
    let lease_behind = s.lease_rv.is_some_and(|w| {
        // Absent from the cache although we wrote it: the watch has not caught up.
        rv(lease.and_then(|l| l.resource_version())).is_none_or(|r| r < w)
    });
    let claim_behind = claims.iter().any(|c| {
        s.claim_rvs
            .get(&c.name_any())
            .is_some_and(|w| rv(c.resource_version()).is_some_and(|r| r < *w))
    });
    (!lease_behind && !claim_behind).then(|| s.memory.clone())
}

/// Keeps the plan's memory and what it wrote for the next reconcile, or forgets the key
/// when no live claim names it and the Lease is not (or no longer) ours.
fn remember(
    ctx: &Context,
    key: &LeaseKey,
    plan: &Plan,
    written: Written,
    claims: &[Arc<LockClaim>],
    lease: Option<&Lease>,
) {
    let mut keys = ctx.keys();
    let forget = !plan.has_live_claims
        && (written.lease_deleted || lease.is_none_or(|l| !arbiter::is_managed(l)));
    if forget {
        if let Some(s) = keys.remove(key) {
            adjust_queue_depth(ctx, key, s.waiting, 0);
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
    if let Some(at) = written.granted_at {
        state.memory.rebase_grant(at);
    }
    if written.lease.is_some() || written.lease_deleted {
        state.lease_rv = written.lease;
    }
    state
        .claim_rvs
        .retain(|n, _| claims.iter().any(|c| c.name_any() == *n));
    state.claim_rvs.extend(written.claims);
    let before = std::mem::replace(&mut state.waiting, plan.waiting);
    drop(keys);
    adjust_queue_depth(ctx, key, before, plan.waiting);
}

fn adjust_queue_depth(ctx: &Context, key: &LeaseKey, before: usize, after: usize) {
    if before != after {
        let g = ctx.metrics.queue_depth.get_or_create(&NamespaceLabel {
            namespace: key.namespace.clone(),
        });
        g.inc_by(after as i64 - before as i64);
    }
}

/// Counts what the plan changed.
fn record(ctx: &Context, key: &LeaseKey, plan: &Plan) {
    let m = &ctx.metrics;
    for o in &plan.outcomes {
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
            Outcome::GarbageCollected => {
                m.gc_deleted.inc();
                tracing::info!(namespace = %key.namespace, lease = %key.name, "garbage-collected Lease");
            }
        }
    }
}
