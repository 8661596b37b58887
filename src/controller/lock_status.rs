//! A Lock's status (capacity, held, waiting, holders) and its gauges, written after each
//! decision of its lock. Only locks with a Lock object get gauges, so the label sets are
//! bounded by the Locks an admin created; a deleted Lock's series are removed.

use std::sync::Arc;

use kube::ResourceExt;

use super::writer::WriteError;
use super::{Context, LeaseKey};
use crate::api::{slot_lease, Lock, LockClaim, LockHolder, LockStatus};
use crate::arbiter::LockPlan;
use crate::telemetry::LockLabel;

/// Writes the Lock's status if it changed, and sets (or removes) the lock's gauges.
pub(super) async fn publish(
    ctx: &Context,
    key: &LeaseKey,
    plan: &LockPlan,
    claims: &[Arc<LockClaim>],
    lock: Option<&Lock>,
    capacity: u32,
) {
    let label = LockLabel {
        namespace: key.namespace.clone(),
        lock: key.name.clone(),
    };
    let Some(lock) = lock else {
        ctx.metrics.lock_held.remove(&label);
        ctx.metrics.lock_waiting.remove(&label);
        return;
    };
    let status = status(key, plan, claims, lock, capacity);
    let held = i64::from(status.held.unwrap_or_default());
    ctx.metrics.lock_held.get_or_create(&label).set(held);
    ctx.metrics
        .lock_waiting
        .get_or_create(&label)
        .set(i64::from(status.waiting.unwrap_or_default()));
    if lock.status.as_ref() == Some(&status) || !ctx.writer.in_term() {
        return;
    }
    let write = ctx
        .writer
        .lock_status(&key.namespace, &lock.name_any(), &status)
        .await;
    if let Err(e @ WriteError::Api(_)) = write {
        tracing::warn!(namespace = %key.namespace, lock = %key.name, error = %e, "cannot write the Lock's status");
    }
}

/// The Lock's status once the plan is written.
fn status(
    key: &LeaseKey,
    plan: &LockPlan,
    claims: &[Arc<LockClaim>],
    lock: &Lock,
    capacity: u32,
) -> LockStatus {
    let identity = |claim: &str| {
        claims
            .iter()
            .find(|c| c.name_any() == claim)
            .map(|c| c.identity())
            .unwrap_or_default()
    };
    let holders: Vec<LockHolder> = plan
        .holders
        .iter()
        .map(|(slot, claim)| LockHolder {
            slot: i32::try_from(*slot).unwrap_or(i32::MAX),
            lease: slot_lease(&key.name, *slot),
            claim: claim.clone(),
            identity: identity(claim),
        })
        .collect();
    LockStatus {
        capacity: Some(i32::try_from(capacity).unwrap_or(i32::MAX)),
        held: Some(i32::try_from(holders.len()).unwrap_or(i32::MAX)),
        waiting: Some(i32::try_from(plan.waiting).unwrap_or(i32::MAX)),
        holders,
        observed_generation: lock.metadata.generation,
    }
}
