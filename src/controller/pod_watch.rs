//! Pods that ask for a lock (label `leasekeeper.io/lock`, scheduling gate
//! `leasekeeper.io/lock`): a label-selected watch (Pods without the label never reach
//! the operator), the node heartbeats their holds live by (`kube-node-lease`), and the
//! [`PodView`]s the arbiter decides from. A Pod that asks badly (a label value that
//! names no lock, a bad annotation, no gate) gets one Warning Event and nothing else.

use std::collections::{HashMap, HashSet};
use std::future::ready;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, PodSpec, PodStatus};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Resource, ResourceExt};

use super::{Context, LeaseKey};
use crate::api::{
    FENCING_TOKEN_ANNOTATION, POD_DURATION_ANNOTATION, POD_GATE, POD_LOCK_LABEL,
    POD_PRIORITY_ANNOTATION,
};
use crate::arbiter::pods::DEFAULT_POD_LEASE_SECONDS;
use crate::arbiter::{NodeView, Note, PodView, Reason, Target};

/// Where the kubelets' heartbeat Leases live.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// A reference to the Pod of `view` in `ns`, for Events.
pub fn pod_ref(ns: &str, view: &PodView) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: Some(ns.to_string()),
        name: Some(view.name.clone()),
        uid: Some(view.uid.clone()),
        ..ObjectReference::default()
    }
}

/// What the operator has observed of each node's heartbeat, on its own clock.
#[derive(Default)]
pub struct Heartbeats(Mutex<HashMap<String, Heard>>);

#[derive(Clone)]
struct Heard {
    /// spec.renewTime as last seen (only compared for change).
    renew_time: Option<String>,
    /// When (monotonic) it was seen to change, or first seen.
    at: Duration,
    /// The heartbeat Lease's resourceVersion as last seen.
    rv: Option<String>,
}

impl Heartbeats {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Heard>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A heartbeat Lease as the watch delivers it, seen at `now`.
    fn seen(&self, lease: &Lease, now: Duration) {
        let renew = lease
            .spec
            .as_ref()
            .and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0.to_string());
        let mut m = self.map();
        let h = m.entry(lease.name_any()).or_insert(Heard {
            renew_time: None,
            at: now,
            rv: None,
        });
        if h.renew_time != renew {
            h.renew_time = renew;
            h.at = now;
        }
        h.rv = lease.resource_version();
    }

    /// Node `node` as observed; one never seen is heard from now on (a full lease
    /// duration from first sight, as a Holder claim after a restart).
    fn node(&self, node: &str, now: Duration) -> NodeView {
        let mut m = self.map();
        let h = m.entry(node.to_string()).or_insert(Heard {
            renew_time: None,
            at: now,
            rv: None,
        });
        NodeView {
            name: node.to_string(),
            heard_at: h.at,
            lease_resource_version: h.rv.clone(),
        }
    }
}

/// Watches the node heartbeat Leases, noting when each was last seen renewed. Node
/// heartbeats trigger no reconcile: a Pod's hold schedules its own deadline.
pub(super) async fn watch_heartbeats(ctx: Arc<Context>, api: Api<Lease>) {
    watcher(api, watcher::Config::default())
        .default_backoff()
        .for_each(|ev| {
            match ev {
                Ok(Event::Apply(l) | Event::InitApply(l)) => ctx.heartbeats.seen(&l, ctx.mono()),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "node heartbeat watch error; retrying"),
            }
            ready(())
        })
        .await
}

/// Watches the Pods labelled `leasekeeper.io/lock` into `writer` (slimmed to what the
/// arbiter reads), deciding each one's lock again.
pub(super) async fn watch_pods(
    ctx: Arc<Context>,
    api: Api<DeserializeGuard<Pod>>,
    writer: Writer<Pod>,
) {
    let counting = ctx.clone();
    let events = watcher(api, watcher::Config::default().labels(POD_LOCK_LABEL))
        .inspect_ok(move |ev| super::watches::count_watch_event::<Pod, _>(&counting, ev))
        .map_ok(|ev| {
            ev.modify(|g| {
                if let Ok(p) = g.0.as_mut() {
                    slim(p);
                }
            })
        })
        .map_ok(|ev| match ev {
            Event::Apply(g) => g.0.ok().map(Event::Apply),
            Event::InitApply(g) => g.0.ok().map(Event::InitApply),
            Event::Delete(g) => g.0.ok().map(Event::Delete),
            Event::Init => Some(Event::Init),
            Event::InitDone => Some(Event::InitDone),
        })
        .try_filter_map(|e| ready(Ok(e)));
    reflector::reflector(writer, events)
        .default_backoff()
        .for_each(|ev| {
            match ev {
                Ok(Event::Apply(p) | Event::InitApply(p)) => pod_seen(&ctx, &p, false),
                Ok(Event::Delete(p)) => pod_seen(&ctx, &p, true),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "Pod watch error; retrying"),
            }
            ready(())
        })
        .await
}

/// What the cache keeps of a Pod: its identity, our label and annotations, the gates,
/// the node and the phase.
fn slim(p: &mut Pod) {
    let m = &mut p.metadata;
    m.managed_fields = None;
    m.owner_references = None;
    if let Some(l) = m.labels.as_mut() {
        l.retain(|k, _| k == POD_LOCK_LABEL);
    }
    if let Some(a) = m.annotations.as_mut() {
        a.retain(|k, _| {
            [
                POD_PRIORITY_ANNOTATION,
                POD_DURATION_ANNOTATION,
                FENCING_TOKEN_ANNOTATION,
            ]
            .contains(&k.as_str())
        });
    }
    let spec = p.spec.take().unwrap_or_default();
    p.spec = Some(PodSpec {
        node_name: spec.node_name,
        scheduling_gates: spec.scheduling_gates,
        ..PodSpec::default()
    });
    let phase = p.status.take().and_then(|s| s.phase);
    p.status = Some(PodStatus {
        phase,
        ..PodStatus::default()
    });
}

/// A Pod changed (or went): its lock is decided again; a Pod that asks badly is told.
fn pod_seen(ctx: &Context, p: &Pod, deleted: bool) {
    let (Some(ns), Some(lock)) = (p.namespace(), p.labels().get(POD_LOCK_LABEL).cloned()) else {
        return;
    };
    let uid = p.uid().unwrap_or_default();
    if deleted {
        ctx.pod_warned().retain(|(u, _)| *u != uid);
    } else if let Err(why) = view(p, |_| None) {
        warn_once(ctx, p, &why);
        return;
    }
    if lock_name_ok(&lock) {
        ctx.queue.now(LeaseKey {
            namespace: ns,
            name: lock,
        });
    }
}

/// A Warning Event on the Pod, once per Pod and cause.
fn warn_once(ctx: &Context, p: &Pod, why: &str) {
    let uid = p.uid().unwrap_or_default();
    if !ctx.pod_warned().insert((uid, why.to_string())) {
        return;
    }
    tracing::info!(namespace = ?p.namespace(), pod = %p.name_any(), why, "a Pod asks for a lock it cannot have");
    let note = Note {
        target: Target::Lease,
        warning: true,
        reason: Reason::PodNotHeld,
        message: why.to_string(),
    };
    ctx.events.send(&note, p.object_ref(&()));
}

/// Whether `v` can name a lock: a DNS-1123 subdomain not reserved for slot Leases.
fn lock_name_ok(v: &str) -> bool {
    let ok_chars = v
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let edges = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    ok_chars
        && !v.is_empty()
        && v.len() <= 253
        && edges(v.as_bytes().first())
        && edges(v.as_bytes().last())
        && !crate::arbiter::reserved_slot_name(v)
}

/// The Pod as the arbiter sees it, or why it cannot hold a lock. `node` gives the
/// observed heartbeat of a node.
fn view(p: &Pod, node: impl Fn(&str) -> Option<NodeView>) -> Result<PodView, String> {
    let lock = p.labels().get(POD_LOCK_LABEL).cloned().unwrap_or_default();
    if !lock_name_ok(&lock) {
        return Err(format!(
            "label {POD_LOCK_LABEL}={lock:?} names no lock (a lowercase DNS-1123 subdomain, not ending -slot-<digits>); the Pod is left as it is"
        ));
    }
    let number = |key: &str, default: i32, min: i32, max: i32| {
        match p.annotations().get(key) {
        None => Ok(default),
        Some(v) => v
            .parse::<i32>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| format!("annotation {key}={v:?} must be a whole number from {min} to {max}; the Pod is left as it is")),
    }
    };
    let priority = number(POD_PRIORITY_ANNOTATION, 0, -1_000_000_000, 1_000_000_000)?;
    let duration = number(
        POD_DURATION_ANNOTATION,
        DEFAULT_POD_LEASE_SECONDS,
        1,
        86_400,
    )?;
    let spec = p.spec.as_ref();
    let gated = spec
        .and_then(|s| s.scheduling_gates.as_ref())
        .is_some_and(|g| g.iter().any(|g| g.name == POD_GATE));
    let opened = p.annotations().contains_key(FENCING_TOKEN_ANNOTATION);
    if !gated && !opened {
        return Err(format!(
            "label {POD_LOCK_LABEL}={lock} asks for a lock, but the Pod lacks the scheduling gate {POD_GATE}: it could not be held back and runs without the lock (add the gate to its template)"
        ));
    }
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    Ok(PodView {
        name: p.name_any(),
        uid: p.uid().unwrap_or_default(),
        lock,
        gated,
        finished: matches!(phase, Some("Succeeded" | "Failed")),
        resource_version: p.resource_version().unwrap_or_default(),
        priority,
        lease_duration_seconds: duration,
        node: spec.and_then(|s| s.node_name.as_deref()).and_then(node),
    })
}

/// The Pods of `key`'s namespace that ask for its lock and can hold it.
pub(super) fn views(ctx: &Context, key: &LeaseKey) -> Vec<PodView> {
    let Some(store) = ctx.pods.as_ref() else {
        return Vec::new();
    };
    let now = ctx.mono();
    store
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(key.namespace.as_str()))
        .filter(|p| p.labels().get(POD_LOCK_LABEL) == Some(&key.name))
        .filter_map(|p| view(p, |n| Some(ctx.heartbeats.node(n, now))).ok())
        .collect()
}

impl Context {
    fn pod_warned(&self) -> std::sync::MutexGuard<'_, HashSet<(String, String)>> {
        self.pod_warned.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSchedulingGate;

    fn pod(lock: &str, gated: bool, annotations: &[(&str, &str)]) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some("p".into());
        p.metadata.labels = Some([(POD_LOCK_LABEL.to_string(), lock.to_string())].into());
        p.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        p.spec = Some(PodSpec {
            scheduling_gates: gated.then(|| {
                vec![PodSchedulingGate {
                    name: POD_GATE.into(),
                }]
            }),
            ..PodSpec::default()
        });
        p
    }

    #[test]
    fn a_pod_asks_well_or_is_told_why_not() {
        let v = view(
            &pod("nightly-backup", true, &[(POD_PRIORITY_ANNOTATION, "10")]),
            |_| None,
        )
        .expect("a well-formed request");
        assert_eq!(
            (
                v.lock.as_str(),
                v.priority,
                v.lease_duration_seconds,
                v.gated
            ),
            ("nightly-backup", 10, 40, true)
        );
        for (p, says) in [
            (pod("Nightly", true, &[]), "names no lock"),
            (pod("backup-slot-2", true, &[]), "names no lock"),
            (
                pod("ok", true, &[(POD_PRIORITY_ANNOTATION, "high")]),
                "leasekeeper.io/priority",
            ),
            (
                pod("ok", true, &[(POD_DURATION_ANNOTATION, "0")]),
                "lease-duration-seconds",
            ),
            (pod("ok", false, &[]), "lacks the scheduling gate"),
        ] {
            let err = view(&p, |_| None).expect_err("refused");
            assert!(err.contains(says), "{err}");
        }
        let opened = pod("ok", false, &[(FENCING_TOKEN_ANNOTATION, "42")]);
        assert!(
            view(&opened, |_| None).is_ok(),
            "a Pod opened by leasekeeper is still its"
        );
    }

    #[test]
    fn a_node_heartbeat_is_heard_when_its_renew_time_changes() {
        let hb = Heartbeats::default();
        let mut l = Lease::default();
        l.metadata.name = Some("node-1".into());
        l.metadata.resource_version = Some("5".into());
        hb.seen(&l, Duration::from_secs(10));
        hb.seen(&l, Duration::from_secs(20));
        assert_eq!(
            hb.node("node-1", Duration::from_secs(30)).heard_at,
            Duration::from_secs(10)
        );
        l.spec = Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            renew_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                jiff::Timestamp::from_second(1_800_000_000).expect("t"),
            )),
            ..Default::default()
        });
        l.metadata.resource_version = Some("6".into());
        hb.seen(&l, Duration::from_secs(25));
        let n = hb.node("node-1", Duration::from_secs(30));
        assert_eq!(
            (n.heard_at, n.lease_resource_version.as_deref()),
            (Duration::from_secs(25), Some("6"))
        );
        assert_eq!(
            hb.node("never", Duration::from_secs(31)).heard_at,
            Duration::from_secs(31),
            "first sight"
        );
    }
}
