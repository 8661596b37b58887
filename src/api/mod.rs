//! The `LockClaim` custom resource (`leasekeeper.io/v1alpha1`).
//!
//! Doc comments on these types become the `kubectl explain` text of the CRD, so they
//! are written for the person typing `kubectl explain lockclaim.spec`.

// clippy reads the repeated `printcolumn(type_ = ..)` arguments of the derive as
// duplicated attributes; they are separate columns.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

mod lock;
mod names;
pub use lock::{
    parse_slot_lease, slot_lease, Lock, LockHolder, LockSpec, LockStatus, MAX_CAPACITY,
    MIN_CAPACITY,
};
pub use names::*;

/// The API group of every leasekeeper resource.
pub const GROUP: &str = "leasekeeper.io";
/// The only served version.
pub const VERSION: &str = "v1alpha1";

/// Default `spec.leaseDurationSeconds`.
pub const DEFAULT_LEASE_DURATION_SECONDS: i32 = 15;
/// Upper bound of `spec.leaseDurationSeconds` (one day).
pub const MAX_LEASE_DURATION_SECONDS: i32 = 86_400;
/// Bound of `spec.priority` in both directions.
pub const MAX_PRIORITY: i32 = 1_000_000_000;
/// Upper bound of `spec.lockDelaySeconds` (one hour).
pub const MAX_LOCK_DELAY_SECONDS: i32 = 3_600;
/// Upper bound of `spec.maxHoldSeconds` and `spec.ttlSecondsAfterFinished` (one year).
pub const MAX_SECONDS_FIELD: i64 = 31_536_000;

/// A request to hold a `coordination.k8s.io/v1` Lease.
///
/// leasekeeper arbitrates all LockClaims that name one Lease: it grants the Lease to
/// one claim at a time (highest priority first, then oldest), keeps waiting claims
/// queued, expires holders that stop renewing, and hands the Lease to the next claim.
/// Wait for your turn with `kubectl wait --for=condition=Granted lockclaim/NAME`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "leasekeeper.io",
    version = "v1alpha1",
    kind = "LockClaim",
    namespaced,
    status = "LockClaimStatus",
    shortname = "lc",
    shortname = "lockclaim",
    category = "leasekeeper",
    derive = "PartialEq",
    doc = "LockClaim asks leasekeeper for a coordination.k8s.io/v1 Lease in the same namespace. The operator grants the Lease to one claim at a time, queues the others, expires holders that stop renewing, and hands the Lease on. Wait for it with `kubectl wait --for=condition=Granted lockclaim/NAME`.",
    printcolumn(
        name = "Lock",
        type_ = "string",
        json_path = ".spec.leaseName",
        description = "The lock (Lease name) this claim contends for"
    ),
    printcolumn(
        name = "Lease",
        type_ = "string",
        json_path = ".status.lease",
        description = "The Lease this claim holds or last held (a slot Lease of a lock with capacity)"
    ),
    printcolumn(
        name = "Holder",
        type_ = "string",
        json_path = ".status.holderIdentity",
        description = "Who holds the Lease now"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Granted, Released, Expired, TimedOut or Rejected"
    ),
    printcolumn(
        name = "Position",
        type_ = "integer",
        json_path = ".status.queuePosition",
        description = "1 = next in line; empty unless Pending"
    ),
    printcolumn(
        name = "Token",
        type_ = "integer",
        json_path = ".status.fencingToken",
        description = "Fencing token of the current or last grant"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "has(self.holderIdentity) == has(oldSelf.holderIdentity) && (!has(self.holderIdentity) || self.holderIdentity == oldSelf.holderIdentity)"
).message("spec.holderIdentity is immutable: it cannot be added, changed or removed after the claim is created").field_path(".holderIdentity"))]
#[x_kube(validation = Rule::new(
    "has(self.maxHoldSeconds) == has(oldSelf.maxHoldSeconds) && (!has(self.maxHoldSeconds) || self.maxHoldSeconds == oldSelf.maxHoldSeconds)"
).message("spec.maxHoldSeconds is immutable: it cannot be added, changed or removed after the claim is created").field_path(".maxHoldSeconds"))]
#[x_kube(validation = Rule::new(
    "has(self.acquireTimeoutSeconds) == has(oldSelf.acquireTimeoutSeconds) && (!has(self.acquireTimeoutSeconds) || self.acquireTimeoutSeconds == oldSelf.acquireTimeoutSeconds)"
).message("spec.acquireTimeoutSeconds is immutable: it cannot be added, changed or removed after the claim is created").field_path(".acquireTimeoutSeconds"))]
#[x_kube(validation = Rule::new(
    "has(self.ttlSecondsAfterFinished) == has(oldSelf.ttlSecondsAfterFinished) && (!has(self.ttlSecondsAfterFinished) || self.ttlSecondsAfterFinished == oldSelf.ttlSecondsAfterFinished)"
).message("spec.ttlSecondsAfterFinished is immutable: it cannot be added, changed or removed after the claim is created").field_path(".ttlSecondsAfterFinished"))]
#[serde(rename_all = "camelCase")]
pub struct LockClaimSpec {
    /// Name of the coordination.k8s.io/v1 Lease, in this claim's namespace, to contend
    /// for. A DNS-1123 subdomain (lower-case letters, digits, '-' and '.', at most 253
    /// characters). The Lease is created on the first grant if it does not exist.
    /// Immutable.
    #[x_kube(validation = Rule::new(
        "self.size() <= 253 && self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')"
    ).message("spec.leaseName must be a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.leaseName is immutable"))]
    #[x_kube(validation = Rule::new("!self.matches('-slot-[0-9]+$')").message("spec.leaseName must not end in -slot-<digits>: such names are the slot Leases of locks with capacity (name the lock instead)"))]
    #[schemars(length(min = 1, max = 253))]
    pub lease_name: String,

    /// The identity written to the Lease's spec.holderIdentity while this claim holds
    /// it. Defaults to the claim's name. Two live claims for one Lease with the same
    /// identity: the younger is rejected (reason DuplicateIdentity). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub holder_identity: Option<String>,

    /// How long, in seconds, a grant lasts without renewal; written to the Lease's
    /// spec.leaseDurationSeconds. 1 to 86400, default 15. Immutable.
    #[serde(default = "default_lease_duration")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 86400").message("spec.leaseDurationSeconds must be between 1 and 86400"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.leaseDurationSeconds is immutable"))]
    pub lease_duration_seconds: i32,

    /// Higher priority is granted first; equal priorities go to the older claim
    /// (creationTimestamp, then name). -1000000000 to 1000000000, default 0. A waiting
    /// claim never preempts a holder. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= -1000000000 && self <= 1000000000").message("spec.priority must be between -1000000000 and 1000000000"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.priority is immutable"))]
    pub priority: i32,

    /// Who proves that the holder is alive. Controller (default): the claim object
    /// itself; the operator renews the Lease while the claim exists and is not
    /// released. Holder: the holder must update the Lease's spec.renewTime at least
    /// once per leaseDurationSeconds (as client-go leader election does) or it is
    /// expired. Pod: the claim leasekeeper makes for a Pod labelled leasekeeper.io/lock
    /// (holderIdentity is the Pod's name): held while the Pod exists, has not Succeeded
    /// or Failed, and its node's heartbeat Lease has been seen renewed within
    /// leaseDurationSeconds. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.renewal is immutable"))]
    pub renewal: Renewal,

    /// Seconds the Lease stays unassigned after this claim's grant ends by expiry (not
    /// by a clean release), so that a holder that is alive but cut off has time to
    /// notice and stop. 0 to 3600, default 0. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 3600").message("spec.lockDelaySeconds must be between 0 and 3600"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.lockDelaySeconds is immutable"))]
    pub lock_delay_seconds: i32,

    /// Set to true to release the lock (or give up waiting) without deleting the
    /// claim; the claim becomes Released. It cannot be set back to false.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self || !oldSelf").message("spec.release cannot be set back to false once it is true"))]
    pub release: bool,

    /// A hard cap, in seconds, on one hold, separate from renewal: when it runs out the
    /// claim becomes Expired with reason MaxHoldExceeded. 1 to 31536000. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 31536000").message("spec.maxHoldSeconds must be between 1 and 31536000"))]
    pub max_hold_seconds: Option<i64>,

    /// Delete the claim this many seconds after it became Released or Expired.
    /// 0 to 31536000; unset keeps finished claims. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 31536000").message("spec.ttlSecondsAfterFinished must be between 0 and 31536000"))]
    pub ttl_seconds_after_finished: Option<i64>,

    /// Give up if not granted within this many seconds of the claim's creation: the
    /// claim becomes TimedOut (reason AcquireTimeout) and ttlSecondsAfterFinished
    /// applies. 0 is try-lock: granted only if the lock is free when the claim is first
    /// arbitrated, TimedOut otherwise. 0 to 31536000; unset waits for ever. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 31536000").message("spec.acquireTimeoutSeconds must be between 0 and 31536000"))]
    pub acquire_timeout_seconds: Option<i64>,
}

fn default_lease_duration() -> i32 {
    DEFAULT_LEASE_DURATION_SECONDS
}

impl LockClaimSpec {
    /// A spec for Lease `lease_name` with every other field at its documented default.
    pub fn for_lease(lease_name: impl Into<String>) -> LockClaimSpec {
        LockClaimSpec {
            lease_name: lease_name.into(),
            holder_identity: None,
            lease_duration_seconds: DEFAULT_LEASE_DURATION_SECONDS,
            priority: 0,
            renewal: Renewal::Controller,
            lock_delay_seconds: 0,
            release: false,
            max_hold_seconds: None,
            ttl_seconds_after_finished: None,
            acquire_timeout_seconds: None,
        }
    }
}

/// Who proves that a holder is alive.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum Renewal {
    /// The claim object is the proof of life; the operator renews the Lease.
    #[default]
    Controller,
    /// The holder renews the Lease's spec.renewTime itself.
    Holder,
    /// A Pod holds it (a claim leasekeeper made for a Pod labelled leasekeeper.io/lock):
    /// alive while the Pod runs and its node's kubelet heartbeats.
    Pod,
}

/// The summary phase of a claim; the Granted condition carries the detail.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum Phase {
    /// Waiting for the Lease.
    Pending,
    /// Holds the Lease now.
    Granted,
    /// Gave the Lease (or its place in the queue) back; terminal.
    Released,
    /// Lost the Lease by missing renewals or exceeding maxHoldSeconds; terminal.
    Expired,
    /// Can never be granted (for example a duplicate holderIdentity); terminal.
    Rejected,
    /// Not granted within spec.acquireTimeoutSeconds; terminal.
    TimedOut,
}

impl Phase {
    /// Released, Expired, Rejected and TimedOut claims never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Phase::Released | Phase::Expired | Phase::Rejected | Phase::TimedOut
        )
    }
}

/// What leasekeeper observed and decided about this claim.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LockClaimStatus {
    /// Pending, Granted, Released, Expired, TimedOut or Rejected: a summary for printer columns.
    /// The operator owns the whole status; users should not be given write access to
    /// the status subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Standard conditions. Type Granted is True while this claim holds the Lease; its
    /// reason says why not otherwise (Queued, HeldExternally, LockDelay,
    /// LeaseNotManaged, DuplicateIdentity, Released, Expired, MaxHoldExceeded,
    /// LeaseLost, AcquireTimeout). Type Finished turns True when the claim reaches a terminal phase.
    /// Type Reconciled appears only when reconciles of the claim's lock fail for one
    /// reason three times in a row: False (reason ReconcileFailed, the message names the
    /// error) until a reconcile succeeds again, then True.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Who holds the Lease now, so that a waiting claim can see whom it waits on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_identity: Option<String>,

    /// The Lease this claim holds (or last held): the Lease named by spec.leaseName, or
    /// for a lock with capacity one of its slot Leases. A Holder-renewal holder renews
    /// this Lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,

    /// The slot of the lock this claim holds (or last held): 0 is the Lease named
    /// spec.leaseName, i the Lease <leaseName>-slot-<i>.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 999))]
    pub slot: Option<i32>,

    /// Place in the queue: 1 = next in line. Absent unless Pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2_147_483_647))]
    pub queue_position: Option<i32>,

    /// A number that strictly increases with every grant of this Lease name, also
    /// across Lease deletion and operator restarts: the Lease's resourceVersion after
    /// the granting write. Pass it to downstream systems so they can reject writes from
    /// a stale holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub fencing_token: Option<i64>,

    /// When this claim was granted the Lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquire_time: Option<Time>,

    /// The last renewal of the Lease that the operator observed for this claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<Time>,

    /// When the grant ended by expiry, or when it will expire if not renewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_time: Option<Time>,

    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
}

impl LockClaim {
    /// The identity this claim writes to the Lease: spec.holderIdentity, else its name.
    pub fn identity(&self) -> String {
        self.spec
            .holder_identity
            .clone()
            .or_else(|| self.metadata.name.clone())
            .unwrap_or_default()
    }

    /// The phase recorded in status, if any.
    pub fn phase(&self) -> Option<Phase> {
        self.status.as_ref().and_then(|s| s.phase)
    }

    /// The condition of the given type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
    }
}

/// The LockClaim CRD, with doc-comment line breaks unwrapped so that `kubectl explain`
/// can re-flow the text (a blank line still separates paragraphs).
pub fn crd() -> CustomResourceDefinition {
    use kube::CustomResourceExt;
    unwrapped(LockClaim::crd())
}

/// The Lock CRD (see [`crd`]), with a rule on its root that refuses names of slot
/// Leases.
pub fn lock_crd() -> CustomResourceDefinition {
    use kube::CustomResourceExt;
    let mut crd = unwrapped(Lock::crd());
    for version in &mut crd.spec.versions {
        if let Some(root) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            root.x_kubernetes_validations
                .get_or_insert_with(Vec::new)
                .push(lock::name_rule());
        }
    }
    crd
}

fn unwrapped(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            unwrap_descriptions(schema);
        }
    }
    crd
}

fn unwrap_descriptions(schema: &mut JSONSchemaProps) {
    if let Some(d) = schema.description.as_mut() {
        *d = d
            .split("\n\n")
            .map(|para| para.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n\n");
    }
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        unwrap_descriptions(child);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(item)) = schema.items.as_mut() {
        unwrap_descriptions(item);
    }
}

/// Every CRD leasekeeper serves, in the order they are installed.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![crd(), lock_crd()]
}

/// A CRD as YAML, exactly as `leasekeeper crd` prints it and `crds/` commits it (one
/// file per CRD, named after it).
pub fn crd_yaml_of(crd: &CustomResourceDefinition) -> Result<String, serde_saphyr::ser::Error> {
    serde_saphyr::to_string(crd)
}

/// The LockClaim CRD as YAML (see [`crd_yaml_of`]).
pub fn crd_yaml() -> Result<String, serde_saphyr::ser::Error> {
    crd_yaml_of(&crd())
}
