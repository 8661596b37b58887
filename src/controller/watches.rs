//! What the watches do with each event: keep the index of claims per Lease key, note
//! when the cache has caught up with our own writes, and schedule the key.

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;

use super::{Context, LeaseKey};
use crate::api::LockClaim;
use crate::arbiter;

pub(super) fn claim_seen(ctx: &Context, claim: &LockClaim, deleted: bool) {
    let Some(namespace) = claim.namespace() else {
        return;
    };
    let key = LeaseKey {
        namespace,
        name: claim.spec.lease_name.clone(),
    };
    if let Some(s) = ctx.keys().get_mut(&key) {
        let name = claim.name_any();
        let mut w = s.claim_rvs.get(&name).copied();
        caught_up(&mut w, claim.resource_version(), deleted);
        if w.is_none() {
            s.claim_rvs.remove(&name);
        }
    }
    {
        let mut index = ctx.index();
        let names = index.entry(key.clone()).or_default();
        if deleted {
            names.remove(&claim.name_any());
        } else {
            names.insert(claim.name_any());
        }
    }
    ctx.queue.now(key);
}

/// Drops what the arbiter never reads before an object enters the cache:
/// managedFields are most of an object's size (and of the operator's memory).
pub(super) fn slim<K: kube::Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// Once the watch delivers our own write (or anything later), the cache has caught up.
fn caught_up(written: &mut Option<u64>, seen: Option<String>, deleted: bool) {
    let seen = seen.and_then(|v| v.parse::<u64>().ok());
    if deleted || written.is_some_and(|w| seen.is_some_and(|r| r >= w)) {
        *written = None;
    }
}

pub(super) fn lease_seen(ctx: &Context, lease: &Lease, deleted: bool) {
    let Some(namespace) = lease.namespace() else {
        return;
    };
    let key = LeaseKey {
        namespace,
        name: lease.name_any(),
    };
    if let Some(s) = ctx.keys().get_mut(&key) {
        caught_up(&mut s.lease_rv, lease.resource_version(), deleted);
    }
    // Leases nobody claims and we did not create (node heartbeats, other controllers'
    // leader election) are not our business.
    let relevant = arbiter::is_managed(lease)
        || ctx.index().get(&key).is_some_and(|n| !n.is_empty())
        || ctx.keys().contains_key(&key);
    if relevant {
        ctx.queue.now(key);
    }
}
