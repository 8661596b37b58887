//! Leases the watches do not show: only Leases with leasekeeper's label or the takeover
//! label are watched, so a Lease someone else created is learnt when a create of it is
//! refused ([`Error::UnwatchedLease`]), remembered per slot, used for decisions, and read
//! again with backoff (5 s, doubling to 60 s) until it changes or goes.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;

use super::{Context, Error, Foreign, LeaseKey};
use crate::api::slot_lease;
use crate::arbiter;

/// First and longest wait before an unwatched Lease is read again.
const RECHECK: (Duration, Duration) = (Duration::from_secs(5), Duration::from_secs(60));

/// Remembers slot `slot`'s Lease that the watches do not show.
pub(super) fn learn(ctx: &Context, key: &LeaseKey, slot: u32, mut lease: Lease) {
    arbiter::slim_lease(&mut lease);
    let now = ctx.mono();
    let mut keys = ctx.keys();
    let s = keys.entry(key.clone()).or_default();
    let backoff = s
        .foreign
        .get(&slot)
        .map_or(RECHECK.0, |f| (f.backoff * 2).min(RECHECK.1));
    s.foreign.insert(
        slot,
        Foreign {
            lease: Arc::new(lease),
            recheck: now + backoff,
            backoff,
        },
    );
}

/// Reads every unwatched Lease of the key whose recheck is due: gone, it is forgotten
/// (the next decision may create it); still there, remembered with a longer backoff.
pub(super) async fn refresh(ctx: &Context, key: &LeaseKey) -> Result<(), Error> {
    let due: Vec<u32> = ctx
        .keys()
        .get(key)
        .map(|s| {
            s.foreign
                .iter()
                .filter(|(_, f)| f.recheck <= ctx.mono())
                .map(|(slot, _)| *slot)
                .collect()
        })
        .unwrap_or_default();
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &key.namespace);
    for slot in due {
        let name = slot_lease(&key.name, slot);
        let read = api
            .get_opt(&name)
            .await
            .map_err(|source| Error::LeaseReadFailed { name, source })?;
        match read {
            Some(lease) => learn(ctx, key, slot, lease),
            None => {
                if let Some(s) = ctx.keys().get_mut(key) {
                    s.foreign.remove(&slot);
                }
            }
        }
    }
    Ok(())
}

/// When the first unwatched Lease of the key is due to be read again.
pub(super) fn recheck_in(ctx: &Context, key: &LeaseKey) -> Option<Duration> {
    let keys = ctx.keys();
    let first = keys.get(key)?.foreign.values().map(|f| f.recheck).min()?;
    Some(first.saturating_sub(ctx.mono()))
}
