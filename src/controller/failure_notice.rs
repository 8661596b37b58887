//! Telling a lock's claims that its reconciles keep failing, or work again (when to is
//! decided by [`arbiter::Streak`]): a Warning Event `ReconcileFailed` and the condition
//! `Reconciled=False` on each claim [`arbiter::notified`] picks; `Reconciled=True` and a
//! Normal Event once a reconcile succeeds. Best effort and only within the term: a
//! write refused here (often for the same cause) is logged, and the Event still goes.

use std::sync::Arc;

use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};

use super::writer::WriteError;
use super::{Context, Error, LeaseKey};
use crate::api::{LockClaim, LockClaimStatus};
use crate::arbiter::{self, Note, Notice, Reason, Target};

/// Records a failure of `key`'s reconcile; tells its claims once it persists.
pub(super) async fn failed(ctx: &Context, key: &LeaseKey, e: &Error) {
    if e.is_conflict() || matches!(e, Error::TermEnded { .. }) {
        return;
    }
    let notice = ctx
        .keys()
        .entry(key.clone())
        .or_default()
        .streak
        .failed(e.reason());
    if let Some(n) = notice {
        tell(ctx, key, &n, Some(e)).await;
    }
}

/// Records a successful reconcile of `key`; tells its claims if a failure was shown,
/// by this process or by an earlier leader (a claim that still says
/// `Reconciled=False`).
pub(super) async fn succeeded(ctx: &Context, key: &LeaseKey) {
    // The claims are looked at once per key and process, not on every reconcile: what
    // an earlier leader wrote is in the caches by this process's first reconcile.
    let (notice, look) = match ctx.keys().get_mut(key) {
        Some(s) => (
            s.streak.succeeded(),
            !std::mem::replace(&mut s.looked_for_stale_failure, true),
        ),
        None => (None, false),
    };
    let shown_before = || {
        look && live_claims(ctx, key).iter().any(|c| {
            c.condition(crate::api::CONDITION_RECONCILED)
                .is_some_and(|x| x.status == "False")
        })
    };
    if let Some(n) = notice.or_else(|| shown_before().then_some(Notice::Recovered)) {
        tell(ctx, key, &n, None).await;
    }
}

/// A panicked reconcile is a failure too; told from a task of its own (the worker's
/// panic hook cannot wait).
pub(super) fn panicked(ctx: &Arc<Context>, key: &LeaseKey, e: Error) {
    let (ctx, key) = (ctx.clone(), key.clone());
    tokio::spawn(async move { failed(&ctx, &key, &e).await });
}

async fn tell(ctx: &Context, key: &LeaseKey, notice: &Notice, e: Option<&Error>) {
    let claims = live_claims(ctx, key);
    let refs: Vec<&LockClaim> = claims.iter().map(|c| c.as_ref()).collect();
    let (warning, reason, message) = match (notice, e) {
        (Notice::Failing { reason, count }, Some(e)) => (
            true,
            Reason::ReconcileFailed,
            format!(
                "reconciling lock {} failed {count} times in a row ({reason}): {}; retrying with backoff",
                key.name,
                e.brief()
            ),
        ),
        _ => (
            false,
            Reason::Reconciled,
            format!("reconciling lock {} works again", key.name),
        ),
    };
    tracing::warn!(namespace = %key.namespace, lease = %key.name, claims = refs.len(), %message, "telling the lock's claims");
    let now = jiff::Timestamp::now();
    let status = |c: &LockClaim| {
        if warning {
            arbiter::failing_status(c, &message, now)
        } else {
            arbiter::recovered_status(c, now)
        }
    };
    for c in arbiter::notified(&refs) {
        write_status(ctx, key, c, &status).await;
        let note = Note {
            target: Target::Claim(c.name_any()),
            warning,
            reason,
            message: message.clone(),
        };
        ctx.events.send(&note, c.object_ref(&()));
    }
}

fn live_claims(ctx: &Context, key: &LeaseKey) -> Vec<Arc<LockClaim>> {
    let names: Vec<String> = ctx
        .index()
        .get(key)
        .map(|n| n.iter().cloned().collect())
        .unwrap_or_default();
    names
        .iter()
        .filter_map(|n| ctx.claims.get(&ObjectRef::new(n).within(&key.namespace)))
        .filter(|c| c.spec.lease_name == key.name)
        .collect()
}

/// The claim's whole status, applied with its resourceVersion as read (the executor's
/// field manager owns the whole status, so a partial apply would drop the rest). The
/// cache may lag the reconcile's own writes: on a conflict the claim is read afresh and
/// the status built again, once.
async fn write_status(
    ctx: &Context,
    key: &LeaseKey,
    cached: &LockClaim,
    status: &impl Fn(&LockClaim) -> Option<LockClaimStatus>,
) {
    let name = cached.name_any();
    let Some(st) = status(cached) else {
        return;
    };
    match apply_status(ctx, key, cached, &st).await {
        Err(e) if e.is_status(409) && ctx.writer.in_term() => {
            let api: Api<LockClaim> = Api::namespaced(ctx.client.clone(), &key.namespace);
            if let Ok(Some(c)) = api.get_opt(&name).await {
                if let Some(st) = status(&c) {
                    let _ = apply_status(ctx, key, &c, &st)
                        .await
                        .map(|rv| note_written(ctx, key, &name, rv))
                        .map_err(|e| not_written(&name, &e));
                }
            }
        }
        Ok(rv) => note_written(ctx, key, &name, rv),
        Err(e) => not_written(&name, &e),
    }
}

/// One apply of `st` to claim `c` (through the writer: within the term); the
/// resourceVersion it produced.
async fn apply_status(
    ctx: &Context,
    key: &LeaseKey,
    c: &LockClaim,
    st: &LockClaimStatus,
) -> Result<Option<String>, WriteError> {
    let rv = c.resource_version();
    let obj = ctx
        .writer
        .claim_status(&key.namespace, &c.name_any(), rv.as_deref(), st)
        .await?;
    Ok(obj.resource_version())
}

fn note_written(ctx: &Context, key: &LeaseKey, name: &str, rv: Option<String>) {
    if let Some(rv) = rv.and_then(|v| v.parse().ok()) {
        if let Some(s) = ctx.keys().get_mut(key) {
            s.claim_rvs.insert(name.to_string(), rv);
        }
    }
}

fn not_written(name: &str, e: &WriteError) {
    tracing::debug!(claim = %name, error = %e, "could not write the Reconciled condition");
}
