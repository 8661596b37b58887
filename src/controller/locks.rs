//! A Lock's status (capacity, held, waiting, holders) and its gauges, written after each
//! decision of its lock. Only locks with a Lock object get gauges, so the label sets are
//! bounded by the Locks an admin created; a deleted Lock's series are removed.

use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::reconcile::Read;
use super::{Context, LeaseKey};
use crate::api::{slot_lease, Lock, LockHolder, LockStatus};
use crate::arbiter::LockPlan;
use crate::telemetry::LockLabel;
use crate::MANAGER;

/// Writes the Lock's status if it changed, and sets (or removes) the lock's gauges.
pub(super) async fn publish(ctx: &Context, key: &LeaseKey, plan: &LockPlan, r: &Read) {
    let label = LockLabel {
        namespace: key.namespace.clone(),
        lock: key.name.clone(),
    };
    let Some(lock) = r.lock.as_ref() else {
        ctx.metrics.lock_held.remove(&label);
        ctx.metrics.lock_waiting.remove(&label);
        return;
    };
    let status = status(key, plan, r, lock);
    let held = i64::from(status.held.unwrap_or_default());
    ctx.metrics.lock_held.get_or_create(&label).set(held);
    ctx.metrics
        .lock_waiting
        .get_or_create(&label)
        .set(i64::from(status.waiting.unwrap_or_default()));
    if lock.status.as_ref() == Some(&status) || !ctx.term.is_current() {
        return;
    }
    let api: Api<Lock> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let body = json!({
        "apiVersion": "leasekeeper.io/v1alpha1",
        "kind": "Lock",
        "metadata": {"name": lock.name_any()},
        "status": status,
    });
    let pp = PatchParams::apply(MANAGER).force();
    let write = ctx
        .term
        .within(api.patch_status(&lock.name_any(), &pp, &Patch::Apply(&body)))
        .await;
    if let Some(Err(e)) = write {
        tracing::warn!(namespace = %key.namespace, lock = %key.name, error = %e, "cannot write the Lock's status");
    }
}

/// The Lock's status once the plan is written.
fn status(key: &LeaseKey, plan: &LockPlan, r: &Read, lock: &Lock) -> LockStatus {
    let identity = |claim: &str| {
        r.claims
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
        capacity: Some(i32::try_from(r.capacity).unwrap_or(i32::MAX)),
        held: Some(i32::try_from(holders.len()).unwrap_or(i32::MAX)),
        waiting: Some(i32::try_from(plan.waiting).unwrap_or(i32::MAX)),
        holders,
        observed_generation: lock.metadata.generation,
    }
}
