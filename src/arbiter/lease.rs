//! Reading a Lease, and building the writes that change it.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::ObjectMeta;

use super::{LeaseWriteKind, Now};
use crate::api::{
    LockClaim, CLAIM_ANNOTATION, CLAIM_UID_ANNOTATION, DEFAULT_LEASE_DURATION_SECONDS,
    LOCK_DELAY_ANNOTATION, MANAGED_BY_LABEL, MANAGED_BY_VALUE, ORIGIN_ANNOTATION, TAKEOVER_ALLOWED,
    TAKEOVER_LABEL,
};

/// `spec.holderIdentity`, unless empty.
pub(super) fn holder(lease: Option<&Lease>) -> Option<String> {
    lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty())
}

/// `spec.renewTime`.
pub(super) fn renew_time(lease: &Lease) -> Option<Timestamp> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0)
}

/// `spec.acquireTime`.
pub(super) fn acquire_time(lease: Option<&Lease>) -> Option<Timestamp> {
    lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.acquire_time.as_ref())
        .map(|t| t.0)
}

/// `spec.leaseDurationSeconds` (at least one second).
pub(super) fn duration(lease: &Lease) -> Duration {
    let secs = lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_duration_seconds)
        .unwrap_or(DEFAULT_LEASE_DURATION_SECONDS)
        .max(1);
    Duration::from_secs(u64::try_from(secs).unwrap_or(1))
}

fn label_is(lease: &Lease, key: &str, value: &str) -> bool {
    lease
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .is_some_and(|v| v == value)
}

/// Whether the Lease carries the managed-by label: leasekeeper created it.
pub fn is_managed(lease: &Lease) -> bool {
    label_is(lease, MANAGED_BY_LABEL, MANAGED_BY_VALUE)
}

/// Whether the Lease's owner allows a takeover (the takeover label).
pub fn takeover_allowed(lease: &Lease) -> bool {
    label_is(lease, TAKEOVER_LABEL, TAKEOVER_ALLOWED)
}

/// `spec.strategy`, unless empty: set on a Lease that coordinated leader election runs
/// (the CoordinatedLeaderElection feature; the API server drops the field where the
/// feature is off).
pub(super) fn strategy(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_deref())
        .filter(|s| !s.is_empty())
}

/// Whether the operator may write the Lease: absent (it will create it), created by
/// leasekeeper, or opened to a takeover by its owner, and in no case one run by
/// coordinated leader election. Nothing else is ever written.
pub fn writable(lease: Option<&Lease>) -> bool {
    lease.is_none_or(|l| strategy(l).is_none() && (is_managed(l) || takeover_allowed(l)))
}

/// The claim the operator granted the Lease to (annotation).
pub(super) fn claim_annotation(lease: &Lease) -> Option<String> {
    annotation(lease, CLAIM_ANNOTATION)
}

/// The uid of the claim the operator granted the Lease to (annotation).
pub(super) fn claim_uid_annotation(lease: &Lease) -> Option<String> {
    annotation(lease, CLAIM_UID_ANNOTATION)
}

/// Until when the Lease stays unassigned after an expiry (annotation).
pub(super) fn lock_delay_annotation(lease: &Lease) -> Option<Timestamp> {
    annotation(lease, LOCK_DELAY_ANNOTATION).and_then(|v| v.parse().ok())
}

fn annotation(lease: &Lease, key: &str) -> Option<String> {
    lease.metadata.annotations.as_ref()?.get(key).cloned()
}

fn set_annotation(lease: &mut Lease, key: &str, value: Option<String>) {
    let ann = lease.metadata.annotations.get_or_insert_with(BTreeMap::new);
    match value {
        Some(v) => {
            ann.insert(key.to_string(), v);
        }
        None => {
            ann.remove(key);
        }
    }
    if ann.is_empty() {
        lease.metadata.annotations = None;
    }
}

/// The Lease write that grants `lease` (or a new Lease `name`) to `c`.
pub(super) fn grant(
    name: &str,
    lease: Option<&Lease>,
    c: &LockClaim,
    now: Now,
) -> (LeaseWriteKind, Lease) {
    let identity = c.identity();
    let Some(old) = lease else {
        let created = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: c.metadata.namespace.clone(),
                labels: Some([(MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string())].into()),
                annotations: Some(grant_annotations(c)),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity),
                acquire_time: Some(MicroTime(now.wall)),
                renew_time: Some(MicroTime(now.wall)),
                lease_duration_seconds: Some(c.spec.lease_duration_seconds),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return (LeaseWriteKind::Create, created);
    };
    let mut l = old.clone();
    let prev_holder = holder(Some(old));
    let spec = l.spec.get_or_insert_with(LeaseSpec::default);
    let transitions = spec.lease_transitions.unwrap_or(0);
    if prev_holder.as_deref() != Some(identity.as_str()) {
        spec.lease_transitions = Some(transitions.saturating_add(1));
    }
    spec.holder_identity = Some(identity);
    spec.acquire_time = Some(MicroTime(now.wall));
    spec.renew_time = Some(MicroTime(now.wall));
    spec.lease_duration_seconds = Some(c.spec.lease_duration_seconds);
    set_annotation(&mut l, LOCK_DELAY_ANNOTATION, None);
    for (k, v) in grant_annotations(c) {
        set_annotation(&mut l, &k, Some(v));
    }
    if c.metadata.uid.is_none() {
        set_annotation(&mut l, CLAIM_UID_ANNOTATION, None);
    }
    (LeaseWriteKind::Grant, l)
}

/// The annotations that say which claim a grant is for: its name and uid.
fn grant_annotations(c: &LockClaim) -> BTreeMap<String, String> {
    let mut a = BTreeMap::from([(CLAIM_ANNOTATION.to_string(), super::name(c))]);
    if let Some(uid) = &c.metadata.uid {
        a.insert(CLAIM_UID_ANNOTATION.to_string(), uid.clone());
    }
    a
}

/// The Lease write that clears the holder, keeping a lock delay that still runs.
pub(super) fn clear(lease: &Lease, lock_delay_until: Option<Timestamp>) -> Lease {
    let mut l = lease.clone();
    let spec = l.spec.get_or_insert_with(LeaseSpec::default);
    spec.holder_identity = None;
    spec.acquire_time = None;
    spec.renew_time = None;
    set_annotation(
        &mut l,
        LOCK_DELAY_ANNOTATION,
        lock_delay_until.map(|u| u.to_string()),
    );
    set_annotation(&mut l, CLAIM_ANNOTATION, None);
    set_annotation(&mut l, CLAIM_UID_ANNOTATION, None);
    l
}

/// The Lease write that renews it (Controller renewal).
pub(super) fn renew(lease: &Lease, now: Timestamp) -> Lease {
    let mut l = lease.clone();
    let spec = l.spec.get_or_insert_with(LeaseSpec::default);
    spec.renew_time = Some(MicroTime(now));
    l
}

/// The JSON merge patch that turns the Lease into `desired`, touching only what the
/// operator owns: the spec's holder fields and its own annotations, with the
/// resourceVersion `desired` was decided from as the precondition. Labels and
/// annotations of others are never sent, so a cache that dropped them (to save memory)
/// never writes them away.
pub fn update_patch(desired: &Lease) -> serde_json::Value {
    let spec = desired.spec.clone().unwrap_or_default();
    let ours = |k: &str| {
        desired
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(k))
            .cloned()
    };
    let mut patch = serde_json::json!({
        "metadata": {
            "resourceVersion": desired.metadata.resource_version,
            "annotations": {
                CLAIM_ANNOTATION: ours(CLAIM_ANNOTATION),
                CLAIM_UID_ANNOTATION: ours(CLAIM_UID_ANNOTATION),
                LOCK_DELAY_ANNOTATION: ours(LOCK_DELAY_ANNOTATION),
            },
        },
        "spec": {
            "holderIdentity": spec.holder_identity,
            "acquireTime": spec.acquire_time,
            "renewTime": spec.renew_time,
            "leaseDurationSeconds": spec.lease_duration_seconds,
            "leaseTransitions": spec.lease_transitions,
        },
    });
    // No precondition is no key: a null would ask the API server to clear the field.
    if desired.metadata.resource_version.is_none() {
        patch["metadata"]
            .as_object_mut()
            .map(|m| m.remove("resourceVersion"));
    }
    patch
}

/// What the operator's cache keeps of a Lease: its spec, and of its metadata only what
/// the arbiter reads (our annotations, the managed-by and takeover labels).
pub fn slim(l: &mut Lease) {
    let m = &mut l.metadata;
    m.managed_fields = None;
    if let Some(a) = m.annotations.as_mut() {
        a.retain(|k, _| {
            [
                CLAIM_ANNOTATION,
                CLAIM_UID_ANNOTATION,
                LOCK_DELAY_ANNOTATION,
                ORIGIN_ANNOTATION,
            ]
            .contains(&k.as_str())
        });
    }
    if let Some(labels) = m.labels.as_mut() {
        labels.retain(|k, _| k == MANAGED_BY_LABEL || k == TAKEOVER_LABEL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_patch_sends_only_our_fields_and_clears_with_nulls() {
        let mut l = Lease::default();
        l.metadata.resource_version = Some("42".into());
        l.metadata.labels = Some([("team".to_string(), "a".to_string())].into());
        l.metadata.annotations = Some(
            [
                ("owner-note".to_string(), "keep me".to_string()),
                (CLAIM_ANNOTATION.to_string(), "c".to_string()),
            ]
            .into(),
        );
        l.spec = Some(LeaseSpec {
            holder_identity: Some("c".into()),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        });
        let p = update_patch(&l);
        assert_eq!(p["metadata"]["resourceVersion"], "42");
        assert_eq!(p["metadata"]["annotations"][CLAIM_ANNOTATION], "c");
        assert!(p["metadata"]["annotations"][CLAIM_UID_ANNOTATION].is_null());
        assert!(
            p["metadata"]["annotations"].get("owner-note").is_none(),
            "others' annotations are not ours to send"
        );
        assert!(p["metadata"].get("labels").is_none());
        assert_eq!(p["spec"]["holderIdentity"], "c");
        assert!(
            p["spec"]["renewTime"].is_null(),
            "a cleared field is sent as null"
        );
        assert!(p["spec"].get("preferredHolder").is_none() && p["spec"].get("strategy").is_none());
    }

    #[test]
    fn an_update_patch_without_a_resource_version_sends_no_key() {
        let p = update_patch(&Lease::default());
        assert!(
            p["metadata"].get("resourceVersion").is_none(),
            "a null resourceVersion is refused by the API server: {p}"
        );
    }

    #[test]
    fn the_cache_keeps_only_what_the_arbiter_reads() {
        let mut l = Lease::default();
        l.metadata.labels = Some(
            [
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
                ("big".to_string(), "x".repeat(1000)),
            ]
            .into(),
        );
        l.metadata.annotations = Some(
            [
                (CLAIM_ANNOTATION.to_string(), "c".to_string()),
                (
                    "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                    "y".repeat(1000),
                ),
            ]
            .into(),
        );
        slim(&mut l);
        assert!(is_managed(&l));
        assert_eq!(claim_annotation(&l).as_deref(), Some("c"));
        assert_eq!(l.metadata.labels.as_ref().map(|x| x.len()), Some(1));
        assert_eq!(l.metadata.annotations.as_ref().map(|x| x.len()), Some(1));
    }
}
