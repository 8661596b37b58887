//! What can fail: a reconcile step ([`Error`], retried with backoff) and the operator
//! process itself ([`RunError`], which stops it).

use std::time::Duration;

/// A failed reconcile step. Variants double as stable reasons for metrics and Events:
/// [`ErrorReason`], derived from the variants, names each one.
#[derive(Debug, thiserror::Error, strum::EnumDiscriminants)]
#[strum_discriminants(
    name(ErrorReason),
    derive(strum::EnumIter, strum::IntoStaticStr),
    doc = "The reason of each [`Error`] variant: its name, a metric label and Event reason."
)]
pub enum Error {
    /// An object changed (or vanished) since it was read: re-read and re-decide.
    #[error("{what} changed since it was read")]
    Conflict {
        /// The object.
        what: String,
    },
    /// Reading the Lease failed.
    #[error("cannot read Lease {name}: {source}")]
    LeaseReadFailed {
        /// Lease name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Creating or updating the Lease failed.
    #[error("cannot write Lease {name}: {source}")]
    LeaseWriteFailed {
        /// Lease name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Deleting the Lease failed.
    #[error("cannot delete Lease {name}: {source}")]
    LeaseDeleteFailed {
        /// Lease name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Writing a claim's status failed.
    #[error("cannot write the status of LockClaim {claim}: {source}")]
    ClaimStatusFailed {
        /// Claim name.
        claim: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Adding or removing the finalizer failed.
    #[error("cannot update the finalizer of LockClaim {claim}: {source}")]
    FinalizerFailed {
        /// Claim name.
        claim: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Creating a Pod's claim failed.
    #[error("cannot create LockClaim {claim}: {source}")]
    ClaimCreateFailed {
        /// Claim name.
        claim: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Opening a Pod granted its lock failed.
    #[error(
        "cannot open Pod {pod} (remove its scheduling gate, write its fencing token): {source}"
    )]
    PodOpenFailed {
        /// Pod name.
        pod: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Deleting a claim failed.
    #[error("cannot delete LockClaim {claim}: {source}")]
    ClaimDeleteFailed {
        /// Claim name.
        claim: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The Lease exists but is not watched (it carries neither our label nor the
    /// takeover label): it was read, and the next decision uses it.
    #[error("Lease {name} exists and carries neither leasekeeper's label nor the takeover label")]
    UnwatchedLease {
        /// Lease name.
        name: String,
        /// Its slot of the lock.
        slot: u32,
        /// The Lease as read.
        lease: Box<k8s_openapi::api::coordination::v1::Lease>,
    },
    /// The reconcile of Lease `lease` panicked: contained, counted, retried with backoff.
    #[error("the reconcile of Lease {lease} panicked")]
    Panic {
        /// Lease name.
        lease: String,
    },
    /// This replica's leadership term ran out before a write of the plan for Lease
    /// `lease`: the rest of the plan is dropped (the next leader decides afresh).
    #[error("leadership term ran out before a write for Lease {lease}; plan dropped")]
    TermEnded {
        /// Lease name.
        lease: String,
    },
}

impl Error {
    /// Every reason [`Error::reason`] can return (metrics start them at zero).
    pub fn reasons() -> impl Iterator<Item = &'static str> {
        <ErrorReason as strum::IntoEnumIterator>::iter().map(<&'static str>::from)
    }

    /// A stable PascalCase reason for metric labels and Events.
    pub fn reason(&self) -> &'static str {
        ErrorReason::from(self).into()
    }

    /// The error for people (conditions, Events): as displayed, except that an API
    /// server's refusal is given by its message and code (kube's display of it appends
    /// the whole response, which would not fit an Event).
    pub fn brief(&self) -> String {
        use std::error::Error as _;
        let full = self.to_string();
        match self.source().and_then(|s| s.downcast_ref::<kube::Error>()) {
            Some(cause @ kube::Error::Api(s)) => {
                let cause = cause.to_string();
                let what = full.strip_suffix(cause.as_str()).unwrap_or(&full);
                format!("{what}{} (HTTP {} {})", s.message, s.code, s.reason)
            }
            _ => full,
        }
    }

    /// Conflicts resolve themselves on the next read; everything else backs off longer.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. } | Error::UnwatchedLease { .. })
    }
}

/// Errors that stop the operator process.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No kubeconfig or in-cluster configuration could be loaded.
    #[error("cannot configure a Kubernetes client (set KUBECONFIG or run in a cluster): {0}")]
    Config(#[source] kube::Error),
    /// The CRD never became Established.
    #[error("the LockClaim CRD {name} is not established after {timeout:?}: install it with `leasekeeper crd | kubectl apply -f -` or the Helm chart")]
    CrdNotEstablished {
        /// The CRD name.
        name: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// Watching the CRD failed.
    #[error("cannot watch the LockClaim CRD: {0}")]
    CrdWatch(#[source] kube::runtime::wait::Error),
    /// The probe server could not start.
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    /// A watch stream ended, which only happens when the process is stopping.
    #[error("the {0} watch ended")]
    WatchEnded(&'static str),
    /// Leader election failed.
    #[error(transparent)]
    Election(#[from] crate::leader::ElectionError),
    /// The watch caches did not sync in time: the leader steps down so another replica
    /// can try.
    #[error("the caches did not sync within {0:?} (can this replica list LockClaims and Leases? see the RBAC in the chart); stepped down so that another replica can lead")]
    CacheSyncTimeout(Duration),
    /// This replica lost leadership: it stopped writing and exits so it restarts clean.
    #[error("lost leadership; exiting so that this replica restarts clean")]
    LeadershipLost,
    /// The key that proves which Leases the operator created is not to be had.
    #[error(transparent)]
    ProofKey(#[from] super::proof::ProofKeyError),
}
