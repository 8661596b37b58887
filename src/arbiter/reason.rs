//! Why: the stable reasons of conditions, Events and metric labels, and how a live
//! claim ends.

/// A stable PascalCase reason, used for conditions, Events and metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// The claim holds the Lease.
    Granted,
    /// Waiting behind another claim.
    Queued,
    /// Waiting: the Lease is held by someone who is not a LockClaim.
    HeldExternally,
    /// Waiting: the lock delay after an expiry has not run out.
    LockDelay,
    /// Waiting: the Lease exists, leasekeeper did not create it and its owner has not
    /// allowed a takeover; the operator never writes it.
    LeaseNotManaged,
    /// Another live claim for the Lease has the same holderIdentity.
    DuplicateIdentity,
    /// Released by delete or `release: true`.
    Released,
    /// The holder stopped renewing.
    Expired,
    /// spec.maxHoldSeconds ran out.
    MaxHoldExceeded,
    /// The Lease was deleted or given to someone else behind the operator's back.
    LeaseLost,
    /// A Lease held by an outsider expired and was taken over.
    TakenOver,
    /// An unused managed Lease was deleted.
    LeaseGarbageCollected,
    /// Rejected (a terminal phase, the Event reason of DuplicateIdentity).
    Rejected,
    /// An object the operator cannot decode (Event reason).
    InvalidObject,
    /// Not granted within spec.acquireTimeoutSeconds (try-lock: not at once).
    AcquireTimeout,
    /// Reconciles of the claim's lock keep failing for one reason (condition
    /// `Reconciled=False`, and a Warning Event).
    ReconcileFailed,
    /// Reconciles of the claim's lock succeed again (condition `Reconciled=True`).
    Reconciled,
    /// A Pod's hold ended: its node's heartbeat was not seen renewed for the claim's
    /// leaseDurationSeconds.
    NodeLost,
    /// A Pod's hold ended: the Pod Succeeded or Failed.
    PodFinished,
    /// A Pod's hold (or wait) ended: the Pod is gone.
    PodGone,
    /// A Pod asks for a lock it cannot have (Event on the Pod): a bad label value or
    /// annotation, or no scheduling gate.
    PodNotHeld,
    /// A Pod was opened: its gate removed, its fencing token written (Event on the Pod).
    PodOpened,
    /// The claim's leaseName ends -slot-<digits>, reserved for slot Leases (a claim
    /// made before the CRD refused such names).
    ReservedLeaseName,
}

impl Reason {
    /// The reason as written into conditions, Events and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Granted => "Granted",
            Reason::Queued => "Queued",
            Reason::HeldExternally => "HeldExternally",
            Reason::LockDelay => "LockDelay",
            Reason::LeaseNotManaged => "LeaseNotManaged",
            Reason::DuplicateIdentity => "DuplicateIdentity",
            Reason::Released => "Released",
            Reason::Expired => "Expired",
            Reason::MaxHoldExceeded => "MaxHoldExceeded",
            Reason::LeaseLost => "LeaseLost",
            Reason::TakenOver => "TakenOver",
            Reason::LeaseGarbageCollected => "LeaseGarbageCollected",
            Reason::Rejected => "Rejected",
            Reason::InvalidObject => "InvalidObject",
            Reason::AcquireTimeout => "AcquireTimeout",
            Reason::ReconcileFailed => "ReconcileFailed",
            Reason::Reconciled => "Reconciled",
            Reason::NodeLost => "NodeLost",
            Reason::PodFinished => "PodFinished",
            Reason::PodGone => "PodGone",
            Reason::PodNotHeld => "PodNotHeld",
            Reason::PodOpened => "PodOpened",
            Reason::ReservedLeaseName => "ReservedLeaseName",
        }
    }

    /// The reasons a grant can end by expiry (metrics start them at zero).
    pub const EXPIRIES: [Reason; 4] = [
        Reason::Expired,
        Reason::MaxHoldExceeded,
        Reason::LeaseLost,
        Reason::NodeLost,
    ];
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<Reason> for &str {
    fn eq(&self, other: &Reason) -> bool {
        *self == other.as_str()
    }
}

impl PartialEq<Reason> for String {
    fn eq(&self, other: &Reason) -> bool {
        self == other.as_str()
    }
}

/// How a live claim ends in a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Deleted or `release: true`.
    Released,
    /// Lost its grant: the reason is Expired, MaxHoldExceeded or LeaseLost.
    Expired(Reason),
    /// Can never be granted (a duplicate identity).
    Rejected,
    /// Waited past spec.acquireTimeoutSeconds.
    TimedOut,
    /// A Pod claim whose Pod is gone or finished (reason PodGone or PodFinished): a
    /// clean end, like a release.
    PodEnded(Reason),
}

impl End {
    /// Whether the verdict was drawn from the Lease (a missed renewal, a Lease gone or
    /// taken), so that it must be checked on a fresh read before it is written.
    pub fn drawn_from_lease(self) -> bool {
        matches!(self, End::Expired(Reason::Expired | Reason::LeaseLost))
    }
}
