//! Pods as holders. A Pod labelled `leasekeeper.io/lock: L` with the scheduling gate
//! `leasekeeper.io/lock` asks for lock L in its template alone. The arbiter sees each
//! such Pod as a [`PodView`] (built by the controller from its caches) and:
//! - makes a claim for a gated Pod that has none (renewal `Pod`, holderIdentity the
//!   Pod's name, owned by the Pod): it queues and is granted like any claim;
//! - once that claim is Granted, opens the Pod: one patch writes the fencing token and
//!   the Lease into its annotations and removes the gate ([`Step::OpenPod`], after the
//!   Granted status);
//! - ends the hold when the Pod is gone or has Succeeded or Failed (released, no lock
//!   delay), or when its node's heartbeat Lease has not been seen renewed for the
//!   claim's leaseDurationSeconds on the operator's own clock (expired: `NodeLost`, the
//!   lock delay applies), never on `deletionTimestamp`.
//!
//! A Pod claim stands for the Pod named by its holderIdentity only if the Pod asks for
//! the claim's lock: whoever made the claim, it can open a Pod only for the lock the
//! Pod's own template asks for.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::ObjectMeta;

use super::{name, Step};
use crate::api::{LockClaim, LockClaimSpec, Renewal};

/// Default leaseDurationSeconds of a Pod claim: a node is lost after this much silence
/// (the kubelet renews its heartbeat every 10 s by default).
pub const DEFAULT_POD_LEASE_SECONDS: i32 = 40;

/// A Pod that asks for a lock, as the controller read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    /// The Pod's name (its claim's holderIdentity).
    pub name: String,
    /// Its uid (the claim's owner).
    pub uid: String,
    /// The lock its label names.
    pub lock: String,
    /// It still carries leasekeeper's scheduling gate.
    pub gated: bool,
    /// It has Succeeded or Failed.
    pub finished: bool,
    /// Its resourceVersion (the precondition of the patch that opens it).
    pub resource_version: String,
    /// Its claim's priority (annotation `leasekeeper.io/priority`).
    pub priority: i32,
    /// Its claim's leaseDurationSeconds (annotation, default
    /// [`DEFAULT_POD_LEASE_SECONDS`]).
    pub lease_duration_seconds: i32,
    /// Its node, once scheduled.
    pub node: Option<NodeView>,
}

/// A node as the operator observes its heartbeat Lease (`kube-node-lease/<node>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// The node's name.
    pub name: String,
    /// When (monotonic) this process last saw the heartbeat renewed, or first saw it.
    pub heard_at: Duration,
    /// The heartbeat Lease's resourceVersion as last read (checked afresh before a
    /// node is judged lost); None if no heartbeat Lease was ever seen.
    pub lease_resource_version: Option<String>,
}

/// The name of the claim made for Pod `pod`.
pub fn claim_name(pod: &str) -> String {
    let name = format!("pod-{pod}");
    if name.len() <= 253 {
        return name;
    }
    // Longest Pod names: cut, and keep them apart by a hash of the whole name.
    let hash = pod.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{}-{hash:016x}", &name[..236])
}

/// The claim made for `pod`: owned by it, renewal Pod, its name as the identity.
pub fn claim_for(pod: &PodView) -> LockClaim {
    let mut c = LockClaim::new(
        &claim_name(&pod.name),
        LockClaimSpec {
            holder_identity: Some(pod.name.clone()),
            lease_duration_seconds: pod.lease_duration_seconds,
            priority: pod.priority,
            renewal: Renewal::Pod,
            ..LockClaimSpec::for_lease(&pod.lock)
        },
    );
    c.metadata = ObjectMeta {
        name: Some(claim_name(&pod.name)),
        owner_references: Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: pod.name.clone(),
            uid: pod.uid.clone(),
            controller: Some(true),
            block_owner_deletion: None,
        }]),
        ..ObjectMeta::default()
    };
    c
}

/// The Pod a Pod-renewal claim stands for: named by the claim's identity, asking for
/// the claim's lock (`lock`).
pub fn pod_of<'a>(pods: &'a [PodView], c: &LockClaim, lock: &str) -> Option<&'a PodView> {
    if c.spec.renewal != Renewal::Pod {
        return None;
    }
    let identity = c.identity();
    pods.iter().find(|p| p.name == identity && p.lock == lock)
}

/// A claim for each gated Pod that has none (no claim of its name, and no Pod claim
/// for it under another name).
pub fn missing_claims(pods: &[PodView], claims: &[&LockClaim], lock: &str) -> Vec<Step> {
    pods.iter()
        .filter(|p| p.gated && !p.finished && p.lock == lock)
        .filter(|p| {
            !claims.iter().any(|c| {
                name(c) == claim_name(&p.name)
                    || (c.spec.renewal == Renewal::Pod && c.identity() == p.name)
            })
        })
        .map(|p| Step::CreateClaim {
            claim: Box::new(claim_for(p)),
        })
        .collect()
}

/// How a Pod claim's hold stands, judged at `now` (monotonic).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodHold {
    /// The Pod runs (or is on its way) and its node heartbeats; look again at `until`.
    Alive {
        /// When the node's silence would end the hold (None: not scheduled yet).
        until: Option<Duration>,
    },
    /// The Pod is gone, or has Succeeded or Failed.
    Ended {
        /// The Pod is gone (else it finished).
        gone: bool,
    },
    /// Its node has not been heard for the claim's duration.
    NodeLost {
        /// The node.
        node: String,
        /// The heartbeat Lease's resourceVersion the verdict was drawn from.
        resource_version: Option<String>,
    },
}

/// Judges the hold of Pod claim `c` (see [`PodHold`]).
pub fn hold(pod: Option<&PodView>, c: &LockClaim, now: Duration) -> PodHold {
    let Some(p) = pod else {
        return PodHold::Ended { gone: true };
    };
    if p.finished {
        return PodHold::Ended { gone: false };
    }
    let Some(n) = &p.node else {
        return PodHold::Alive { until: None };
    };
    let silence =
        Duration::from_secs(u64::try_from(c.spec.lease_duration_seconds.max(1)).unwrap_or(1));
    let until = n.heard_at + silence;
    if now >= until {
        PodHold::NodeLost {
            node: n.name.clone(),
            resource_version: n.lease_resource_version.clone(),
        }
    } else {
        PodHold::Alive { until: Some(until) }
    }
}
