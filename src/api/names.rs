//! Every name leasekeeper writes into objects or reads from them, defined once: the
//! field manager, condition types, annotations, labels and the legacy finalizer.

/// The field manager of every write the operator makes.
pub const MANAGER: &str = "leasekeeper";

/// The condition type a workload waits on: `kubectl wait --for=condition=Granted`.
pub const CONDITION_GRANTED: &str = "Granted";
/// The condition type that turns True when a claim reaches a terminal phase; its
/// lastTransitionTime is when the claim finished (ttlSecondsAfterFinished counts from it).
pub const CONDITION_FINISHED: &str = "Finished";
/// The condition type that turns False while reconciles of the claim's lock keep failing.
pub const CONDITION_RECONCILED: &str = "Reconciled";

/// Annotation on a Lease: the name of the LockClaim the operator granted it to. The
/// holderIdentity alone cannot tell two claims with one identity apart.
pub const CLAIM_ANNOTATION: &str = "leasekeeper.io/claim";
/// Annotation on a Lease: the uid of the LockClaim the operator granted it to, so that a
/// claim deleted and created again under the same name is not taken for the holder.
pub const CLAIM_UID_ANNOTATION: &str = "leasekeeper.io/claim-uid";
/// Annotation on a Lease: until when (RFC 3339, operator clock) it stays unassigned
/// after an expiry (spec.lockDelaySeconds of the expired claim).
pub const LOCK_DELAY_ANNOTATION: &str = "leasekeeper.io/lock-delay-until";

/// Annotation on a Lease: the operator's proof that it created this Lease, an HMAC of
/// its uid under a key only the operator holds. Garbage collection deletes only Leases
/// whose proof checks out (a label is no proof: anyone who may update can write it).
pub const ORIGIN_ANNOTATION: &str = "leasekeeper.io/origin";

/// Label on any object: the lock that guards it (fencing enforced by the API server, see
/// `leasekeeper::fence`).
pub const FENCED_BY_LABEL: &str = "leasekeeper.io/fenced-by";
/// Annotation on a guarded object (and on a Pod granted a lock): the fencing token of
/// the write, or of the Pod's grant.
pub const FENCING_TOKEN_ANNOTATION: &str = "leasekeeper.io/fencing-token";

/// Label on a Pod: the lock it must hold before it starts (with the scheduling gate
/// [`POD_GATE`] in its template).
pub const POD_LOCK_LABEL: &str = "leasekeeper.io/lock";
/// The scheduling gate that keeps a Pod from being scheduled until it holds its lock.
pub const POD_GATE: &str = "leasekeeper.io/lock";
/// Annotation on a Pod: its claim's priority (default 0).
pub const POD_PRIORITY_ANNOTATION: &str = "leasekeeper.io/priority";
/// Annotation on a Pod: its claim's leaseDurationSeconds (default 40): how long its
/// node may be silent before the hold ends.
pub const POD_DURATION_ANNOTATION: &str = "leasekeeper.io/lease-duration-seconds";
/// Annotation on a Pod granted its lock: the Lease it holds (one slot of a lock with
/// capacity).
pub const POD_LEASE_ANNOTATION: &str = "leasekeeper.io/lease";

/// Annotation on a Service without a selector: the lock whose holder Pod(s) it routes
/// to (an EndpointSlice leasekeeper keeps).
pub const ROUTE_ANNOTATION: &str = "leasekeeper.io/route-to-holder";

/// The label key and value that mark a Lease as created and managed by leasekeeper.
/// A label is no proof of creation (anyone who may update the Lease can write it).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// See [`MANAGED_BY_LABEL`].
pub const MANAGED_BY_VALUE: &str = "leasekeeper";
/// The label by which the owner of a Lease leasekeeper did not create allows it to be
/// taken over once its holder stops renewing (value [`TAKEOVER_ALLOWED`]). Without it
/// the operator never writes, renews, clears or deletes such a Lease.
pub const TAKEOVER_LABEL: &str = "leasekeeper.io/takeover";
/// See [`TAKEOVER_LABEL`].
pub const TAKEOVER_ALLOWED: &str = "allowed";

/// The finalizer earlier versions put on every claim. Claims no longer carry it (the
/// Lease's claim annotation covers a deleted holder); the operator removes it where it
/// finds it, so that nothing is left stuck after an upgrade or an uninstall.
pub const FINALIZER: &str = "leasekeeper.io/release";
