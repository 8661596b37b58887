//! The watches: every object is decoded on its own (an object that cannot be decoded
//! never stops a list or a watch, so one bad object cannot stop the operator for
//! everyone); what each event changes (the index of claims per Lease key, whether the
//! cache caught up with our own writes); and the key scheduled.

use std::future::ready;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use kube::core::{DeserializeGuard, DynamicObject, GroupVersionKind};
use kube::discovery::ApiResource;
use kube::runtime::reflector::{self, store::Writer, ObjectRef};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource, ResourceExt};

use super::writer::WriteError;
use super::{Context, LeaseKey};
use crate::api::{parse_slot_lease, Lock, LockClaim, LockClaimSpec, LockSpec};
use crate::arbiter::{self, Note, Reason, Target};
use crate::telemetry::KindLabel;

/// The label selectors of the two Lease watches: the Leases leasekeeper created, and
/// the ones their owners opened to takeover. Every other Lease in the cluster (node
/// heartbeats, other controllers' leader election) never reaches the operator.
pub(super) fn lease_selectors() -> [String; 2] {
    [
        format!(
            "{}={}",
            crate::api::MANAGED_BY_LABEL,
            crate::api::MANAGED_BY_VALUE
        ),
        format!(
            "{}={}",
            crate::api::TAKEOVER_LABEL,
            crate::api::TAKEOVER_ALLOWED
        ),
    ]
}

/// Claims per list page of the claim watch.
const CLAIM_PAGE: u32 = 100;

/// Watches claims into `writer` (decoded one by one, slimmed), noting each in the
/// index and scheduling its Lease key. Ends only if the watch stream does.
pub(super) async fn watch_claims(
    ctx: Arc<Context>,
    api: Api<DeserializeGuard<LockClaim>>,
    writer: Writer<LockClaim>,
) {
    // Small list pages: a claim may carry up to the API server's object size limit in
    // annotations, and a page is held whole while it is decoded.
    let events = watcher(api, watcher::Config::default().page_size(CLAIM_PAGE))
        .map_ok(decoding(ctx.clone(), claim_stub))
        .try_filter_map(|e| ready(Ok(e)))
        .modify(slim_claim);
    reflector::reflector(writer, events)
        .default_backoff()
        .for_each(|ev| {
            match ev {
                Ok(Event::Apply(o) | Event::InitApply(o)) => claim_seen(&ctx, &o, false),
                Ok(Event::Delete(o)) => claim_seen(&ctx, &o, true),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "LockClaim watch error; retrying"),
            }
            ready(())
        })
        .await
}

/// Watches the Leases that match `selector` into `writer` (see [`watch_claims`]).
pub(super) async fn watch_leases(
    ctx: Arc<Context>,
    api: Api<DeserializeGuard<Lease>>,
    selector: String,
    writer: Writer<Lease>,
) {
    let events = watcher(api, watcher::Config::default().labels(&selector))
        .map_ok(decoding(ctx.clone(), lease_stub))
        .try_filter_map(|e| ready(Ok(e)))
        .modify(arbiter::slim_lease);
    reflector::reflector(writer, events)
        .default_backoff()
        .for_each(|ev| {
            match ev {
                Ok(Event::Apply(o) | Event::InitApply(o)) => lease_seen(&ctx, &o, false),
                Ok(Event::Delete(o)) => lease_seen(&ctx, &o, true),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, selector, "Lease watch error; retrying"),
            }
            ready(())
        })
        .await
}

/// Decodes the events of a guarded watch: an object that cannot be decoded is
/// reported (and a claim's status repaired) and left out; the store keeps its last
/// decodable version, if any.
fn decoding<K>(
    ctx: Arc<Context>,
    stub: fn(&Context, &kube::api::ObjectMeta) -> K,
) -> impl FnMut(Event<DeserializeGuard<K>>) -> Option<Event<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    move |ev| decoded(&ctx, ev, stub)
}

/// Counts an object's event of a watch of kind `K` in `leasekeeper_watch_events_total`.
pub(super) fn count_watch_event<K: Resource<DynamicType = ()>, T>(ctx: &Context, ev: &Event<T>) {
    if matches!(ev, Event::Apply(_) | Event::InitApply(_) | Event::Delete(_)) {
        ctx.metrics
            .watch_events
            .get_or_create(&KindLabel {
                kind: K::kind(&()).to_string(),
            })
            .inc();
    }
}

/// An event with its object decoded, or None when the object cannot be; a deleted
/// object that cannot be decoded becomes a deletion of a stand-in of the same name.
fn decoded<K>(
    ctx: &Arc<Context>,
    ev: Event<DeserializeGuard<K>>,
    stub: fn(&Context, &kube::api::ObjectMeta) -> K,
) -> Option<Event<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    count_watch_event::<K, _>(ctx, &ev);
    let one = |g: DeserializeGuard<K>, deleted: bool| match g.0 {
        Ok(o) => {
            ctx.valid_again::<K>(o.meta());
            Some(o)
        }
        Err(bad) if deleted => {
            ctx.valid_again::<K>(&bad.metadata);
            Some(stub(ctx, &bad.metadata))
        }
        Err(bad) => {
            ctx.invalid::<K>(&bad.metadata, &bad.error);
            None
        }
    };
    Some(match ev {
        Event::Apply(g) => Event::Apply(one(g, false)?),
        Event::InitApply(g) => Event::InitApply(one(g, false)?),
        Event::Delete(g) => Event::Delete(one(g, true)?),
        Event::Init => Event::Init,
        Event::InitDone => Event::InitDone,
    })
}

/// A claim deleted while undecodable: its last decodable version names its Lease.
fn claim_stub(ctx: &Context, meta: &kube::api::ObjectMeta) -> LockClaim {
    let name = meta.name.clone().unwrap_or_default();
    let ns = meta.namespace.clone().unwrap_or_default();
    let lease_name = ctx
        .claims
        .get(&ObjectRef::new(&name).within(&ns))
        .map(|c| c.spec.lease_name.clone())
        .unwrap_or_default();
    let mut c = LockClaim::new(&name, LockClaimSpec::for_lease(lease_name));
    c.metadata = meta.clone();
    c
}

fn lease_stub(_: &Context, meta: &kube::api::ObjectMeta) -> Lease {
    Lease {
        metadata: meta.clone(),
        spec: None,
    }
}

impl Context {
    /// An object that cannot be decoded: logged and counted once, a Warning Event on a
    /// claim, and a claim's status (which the operator owns) repaired.
    fn invalid<K: Resource<DynamicType = ()>>(
        self: &Arc<Self>,
        meta: &kube::api::ObjectMeta,
        error: &str,
    ) {
        let kind = K::kind(&()).to_string();
        let key = (
            kind.clone(),
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        );
        let new = self.invalid_objects().insert(key);
        if !new {
            return;
        }
        self.metrics
            .invalid_objects
            .get_or_create(&KindLabel { kind: kind.clone() })
            .inc();
        tracing::warn!(kind = %kind, namespace = ?meta.namespace, name = ?meta.name, error, "cannot decode an object; leaving it out of arbitration");
        if kind == "LockClaim" {
            let (ctx, meta, error) = (self.clone(), meta.clone(), error.to_string());
            tokio::spawn(async move { ctx.repair_claim(&meta, &error).await });
        }
    }

    /// The object decodes again (or is gone).
    fn valid_again<K: Resource<DynamicType = ()>>(&self, meta: &kube::api::ObjectMeta) {
        let kind = K::kind(&()).to_string();
        let key = (
            kind.clone(),
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        );
        if self.invalid_objects().remove(&key) {
            self.metrics
                .invalid_objects
                .get_or_create(&KindLabel { kind })
                .dec();
        }
    }

    /// A claim that cannot be decoded gets a Warning Event naming the error; if the
    /// cause is its status (the operator's to write), the status is cleared so that the
    /// next reconcile writes it afresh. A spec that cannot be decoded is its owner's to
    /// fix: the claim stays out of arbitration meanwhile.
    async fn repair_claim(&self, meta: &kube::api::ObjectMeta, error: &str) {
        let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else {
            return;
        };
        let status_only = self.fails_only_in_status(ns, name).await;
        let message = if status_only {
            format!("status cannot be decoded ({error}); leasekeeper writes it afresh")
        } else {
            format!("spec cannot be decoded ({error}); the claim is left out of arbitration until it is fixed")
        };
        let mut reference = LockClaim::new(name, LockClaimSpec::for_lease("")).object_ref(&());
        reference.namespace = Some(ns.to_string());
        reference.uid.clone_from(&meta.uid);
        let note = Note {
            target: Target::Claim(name.to_string()),
            warning: true,
            reason: Reason::InvalidObject,
            message,
        };
        self.events.send(&note, reference);
        if status_only {
            let rv = meta.resource_version.as_deref();
            match self.writer.clear_claim_status(ns, name, rv).await {
                Err(WriteError::TermEnded) => {}
                Ok(_) => tracing::info!(
                    namespace = ns,
                    name,
                    "cleared a status that could not be decoded"
                ),
                Err(e) => {
                    tracing::warn!(namespace = ns, name, error = %e, "cannot clear the status of a claim that cannot be decoded")
                }
            }
        }
    }

    /// Whether claim `ns/name` decodes once its status is left out.
    async fn fails_only_in_status(&self, ns: &str, name: &str) -> bool {
        let gvk = GroupVersionKind::gvk(crate::api::GROUP, crate::api::VERSION, "LockClaim");
        let ar = ApiResource::from_gvk_with_plural(&gvk, "lockclaims");
        let raw: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), ns, &ar);
        let Ok(Some(obj)) = raw.get_opt(name).await else {
            return false;
        };
        let mut v = match serde_json::to_value(&obj) {
            Ok(v) => v,
            Err(_) => return false,
        };
        if let Some(o) = v.as_object_mut() {
            o.remove("status");
        }
        serde_json::from_value::<LockClaim>(v).is_ok()
    }
}

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

/// A Lock changed (or went): its lock is decided again with the new capacity.
pub(super) fn lock_seen(ctx: &Context, lock: &Lock) {
    if let Some(namespace) = lock.namespace() {
        ctx.queue.now(LeaseKey {
            namespace,
            name: lock.name_any(),
        });
    }
}

/// Watches Locks into `writer` (decoded one by one), deciding each one's lock again.
pub(super) async fn watch_locks(
    ctx: Arc<Context>,
    api: Api<DeserializeGuard<Lock>>,
    writer: Writer<Lock>,
) {
    let events = watcher(api, watcher::Config::default())
        .map_ok(decoding(ctx.clone(), lock_stub))
        .try_filter_map(|e| ready(Ok(e)))
        .modify(|l: &mut Lock| l.metadata.managed_fields = None);
    reflector::reflector(writer, events)
        .default_backoff()
        .for_each(|ev| {
            match ev {
                Ok(Event::Apply(l) | Event::InitApply(l) | Event::Delete(l)) => lock_seen(&ctx, &l),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "Lock watch error; retrying"),
            }
            ready(())
        })
        .await
}

fn lock_stub(_: &Context, meta: &kube::api::ObjectMeta) -> Lock {
    let mut l = Lock::new("", LockSpec { capacity: 1 });
    l.metadata = meta.clone();
    l
}

/// Drops what the arbiter never reads before a claim enters the cache: managedFields,
/// labels, annotations (a tenant may annotate its claims with anything, up to the API
/// server's size limit) and owner references other than a Pod (the holder's Pod, for
/// routes). Finalizers stay: the legacy one is removed by the arbiter.
pub(super) fn slim_claim(c: &mut LockClaim) {
    let m = &mut c.metadata;
    m.managed_fields = None;
    m.annotations = None;
    m.labels = None;
    // Only a Pod owner is read (the holder's Pod, for routes to the holder).
    if let Some(o) = m.owner_references.as_mut() {
        o.retain(|o| o.kind == "Pod" && o.api_version == "v1");
    }
    if m.owner_references.as_ref().is_some_and(Vec::is_empty) {
        m.owner_references = None;
    }
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
    // A slot Lease above 0 belongs to its lock's key.
    let name = lease.name_any();
    let (lock, slot) = match parse_slot_lease(&name) {
        Some((lock, slot)) => (lock.to_string(), slot),
        None => (name.clone(), 0),
    };
    let key = LeaseKey {
        namespace,
        name: lock,
    };
    if slot > 0 {
        ctx.note_slot(&key, slot, !deleted);
    }
    if let Some(s) = ctx.keys().get_mut(&key) {
        let mut w = s.lease_rvs.get(&slot).copied();
        caught_up(&mut w, lease.resource_version(), deleted);
        match w {
            Some(w) => s.lease_rvs.insert(slot, w),
            None => s.lease_rvs.remove(&slot),
        };
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
