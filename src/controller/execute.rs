//! Performs a [`LockPlan`](crate::arbiter::LockPlan)'s steps in order, each write
//! carrying the resourceVersion it was decided from; stops at the first failure. A
//! step's slot says which of the lock's Leases it concerns.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::pod_watch::{pod_ref, NODE_LEASE_NAMESPACE};
use super::writer::WriteError;
use super::{Context, Error, LeaseKey};
use crate::api::{
    slot_lease, LockClaim, LockClaimStatus, FENCING_TOKEN_ANNOTATION, FINALIZER, ORIGIN_ANNOTATION,
    POD_GATE, POD_LEASE_ANNOTATION,
};
use crate::arbiter::{
    pods, LeaseWriteKind, LockPlan, LockStep, Note, PodView, Reason, Step, Target,
};
use crate::telemetry::WriteKind;

/// 409 (stale resourceVersion) and 404 (gone) both mean: re-read and re-decide; a term
/// that ended drops the rest of the plan.
fn classify(
    e: WriteError,
    key: &LeaseKey,
    what: String,
    other: impl FnOnce(kube::Error) -> Error,
) -> Error {
    match e {
        WriteError::TermEnded => Error::TermEnded {
            lease: key.name.clone(),
        },
        e if e.is_status(409) || e.is_status(404) => Error::Conflict { what },
        WriteError::Api(e) => other(e),
    }
}

fn parse_rv(rv: Option<&String>) -> Option<u64> {
    rv.and_then(|v| v.parse().ok())
}

/// What our last write did to one slot's Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseWrite {
    /// Written; its resourceVersion after the write.
    Written(u64),
    /// Deleted.
    Deleted,
}

/// What a plan wrote, so the next reconcile can tell a lagging cache.
#[derive(Default)]
pub struct Written {
    /// Per slot, our last write to its Lease.
    pub leases: BTreeMap<u32, LeaseWrite>,
    /// Claims' resourceVersions after our writes.
    pub claims: HashMap<String, u64>,
    /// Per slot, when (monotonic) a granting Lease write completed.
    pub granted_at: BTreeMap<u32, Duration>,
}

impl Written {
    /// Whether slot `slot`'s Lease was deleted by this plan.
    pub fn deleted(&self, slot: u32) -> bool {
        self.leases.get(&slot) == Some(&LeaseWrite::Deleted)
    }
}

/// Runs the plan's steps in order.
pub async fn execute(
    ctx: &Arc<Context>,
    key: &LeaseKey,
    plan: &LockPlan,
    claims: &[Arc<LockClaim>],
    leases: &BTreeMap<u32, Arc<Lease>>,
    pods: &[PodView],
) -> Result<Written, Error> {
    let mut x = Executor::new(ctx, key, claims, leases, pods);
    for step in &plan.steps {
        // Every write goes through the writer, which refuses it once the leadership
        // term has ended: a leader that froze mid-plan and woke past its term stops at
        // its next write (docs/design.md, "Leadership and the term").
        x.step(step).await?;
    }
    Ok(x.written)
}

/// The state of one plan's execution: the preconditions each next write carries.
struct Executor<'a> {
    ctx: &'a Context,
    key: &'a LeaseKey,
    lease_api: Api<Lease>,
    by_name: HashMap<String, &'a LockClaim>,
    /// Each claim's resourceVersion as last read or written.
    rvs: HashMap<String, String>,
    finalizers: HashMap<String, Vec<String>>,
    /// Each slot's Lease as read, then as our last write left it.
    leases: BTreeMap<u32, Lease>,
    /// The resourceVersion our last Lease write returned: the next grant's token.
    lease_token: Option<i64>,
    /// The Pods that ask for the lock.
    pods: &'a [PodView],
    written: Written,
}

impl<'a> Executor<'a> {
    fn new(
        ctx: &'a Context,
        key: &'a LeaseKey,
        claims: &'a [Arc<LockClaim>],
        leases: &BTreeMap<u32, Arc<Lease>>,
        pods: &'a [PodView],
    ) -> Executor<'a> {
        Executor {
            ctx,
            key,
            lease_api: Api::namespaced(ctx.client.clone(), &key.namespace),
            by_name: claims.iter().map(|c| (c.name_any(), c.as_ref())).collect(),
            rvs: claims
                .iter()
                .map(|c| (c.name_any(), c.resource_version().unwrap_or_default()))
                .collect(),
            finalizers: claims
                .iter()
                .map(|c| (c.name_any(), c.finalizers().to_vec()))
                .collect(),
            leases: leases.iter().map(|(s, l)| (*s, (**l).clone())).collect(),
            lease_token: None,
            pods,
            written: Written::default(),
        }
    }

    async fn step(&mut self, s: &LockStep) -> Result<(), Error> {
        let slot = s.slot;
        match &s.step {
            Step::VerifyLease { resource_version } => {
                self.verify_lease(slot, resource_version).await
            }
            Step::AddFinalizer { claim } => self.finalizer(claim, true).await,
            Step::RemoveFinalizer { claim } => self.finalizer(claim, false).await,
            Step::SetStatus {
                claim,
                status,
                fill_token,
            } => self.set_status(claim, status, *fill_token).await,
            Step::WriteLease { kind, lease } => self.write_lease(slot, *kind, lease).await,
            Step::DeleteLease { resource_version } => {
                self.delete_lease(slot, resource_version).await
            }
            Step::DeleteClaim { claim } => self.delete_claim(claim).await,
            Step::CreateClaim { claim } => self.create_claim(claim).await,
            Step::OpenPod {
                pod,
                resource_version,
                lease,
                token,
                fill_token,
            } => {
                let token = if *fill_token {
                    self.lease_token
                } else {
                    *token
                };
                self.open_pod(pod, resource_version, lease, token).await
            }
            Step::VerifyNode {
                node,
                resource_version,
            } => self.verify_node(node, resource_version).await,
            Step::Event(note) => {
                self.event(slot, note);
                Ok(())
            }
        }
    }

    /// The name of slot `slot`'s Lease.
    fn lease_name(&self, slot: u32) -> String {
        slot_lease(&self.key.name, slot)
    }

    fn lease_conflict(&self, slot: u32) -> String {
        format!("Lease {}", self.lease_name(slot))
    }

    /// A quorum read of the Lease: the plan goes on only if it is as decided from.
    async fn verify_lease(
        &self,
        slot: u32,
        resource_version: &Option<String>,
    ) -> Result<(), Error> {
        let name = self.lease_name(slot);
        let fresh = self
            .lease_api
            .get_opt(&name)
            .await
            .map_err(|source| Error::LeaseReadFailed { name, source })?;
        let rv = fresh.as_ref().and_then(|l| l.resource_version());
        if &rv != resource_version {
            return Err(Error::Conflict {
                what: self.lease_conflict(slot),
            });
        }
        Ok(())
    }

    async fn finalizer(&mut self, claim: &str, add: bool) -> Result<(), Error> {
        let mut f = self.finalizers.get(claim).cloned().unwrap_or_default();
        if add {
            f.push(FINALIZER.to_string());
        } else {
            f.retain(|x| x != FINALIZER);
        }
        let patch = json!({"metadata": {
            "resourceVersion": self.rvs.get(claim),
            "finalizers": f,
        }});
        let res = self
            .ctx
            .writer
            .claim_metadata(&self.key.namespace, claim, &patch)
            .await;
        match res {
            Ok(obj) => {
                self.note_claim(claim, obj.resource_version());
                self.finalizers.insert(claim.to_string(), f);
                Ok(())
            }
            Err(e) => match classify(e, self.key, format!("LockClaim {claim}"), |source| {
                Error::FinalizerFailed {
                    claim: claim.to_string(),
                    source,
                }
            }) {
                // The object went away (or moved on) once its last finalizer came off.
                Error::Conflict { .. } if !add => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn set_status(
        &mut self,
        claim: &str,
        status: &LockClaimStatus,
        fill_token: bool,
    ) -> Result<(), Error> {
        let mut status = status.clone();
        if fill_token {
            status.fencing_token = self.lease_token;
        }
        let rv = self.rvs.get(claim).map(String::as_str);
        let obj = self
            .ctx
            .writer
            .claim_status(&self.key.namespace, claim, rv, &status)
            .await
            .map_err(|e| {
                classify(e, self.key, format!("LockClaim {claim}"), |source| {
                    Error::ClaimStatusFailed {
                        claim: claim.to_string(),
                        source,
                    }
                })
            })?;
        self.note_claim(claim, obj.resource_version());
        Ok(())
    }

    async fn write_lease(
        &mut self,
        slot: u32,
        kind: LeaseWriteKind,
        lease: &Lease,
    ) -> Result<(), Error> {
        let name = self.lease_name(slot);
        let (w, ns) = (&self.ctx.writer, self.key.namespace.as_str());
        let result = match write_kind(kind) {
            WriteKind::LeaseCreate => w.create_lease(ns, lease).await,
            // A merge patch of only what the operator owns, with the resourceVersion as
            // precondition: the cache dropped others' labels and annotations, so a
            // whole-object replace would write them away.
            other => {
                let patch = crate::arbiter::update_patch(lease);
                w.patch_lease(other, ns, &name, &patch).await
            }
        };
        if kind == LeaseWriteKind::Create {
            if let Err(e) = &result {
                if e.is_status(409) {
                    return Err(self.existing_lease(slot).await);
                }
            }
        }
        let mut obj = result.map_err(|e| {
            classify(e, self.key, self.lease_conflict(slot), |source| {
                Error::LeaseWriteFailed {
                    name: name.clone(),
                    source,
                }
            })
        })?;
        if kind == LeaseWriteKind::Create {
            obj = self.stamp_origin(&name, &obj).await.map_err(|e| {
                classify(e, self.key, self.lease_conflict(slot), |source| {
                    Error::LeaseWriteFailed { name, source }
                })
            })?;
        }
        let rv = obj.resource_version();
        self.lease_token = rv.as_ref().and_then(|v| v.parse().ok());
        if let Some(n) = parse_rv(rv.as_ref()) {
            self.written.leases.insert(slot, LeaseWrite::Written(n));
        }
        if matches!(kind, LeaseWriteKind::Create | LeaseWriteKind::Grant) {
            self.written.granted_at.insert(slot, self.ctx.mono());
        }
        self.leases.insert(slot, obj);
        Ok(())
    }

    /// Right after creating a Lease, its proof of creation (an HMAC of its uid, which
    /// only the create's answer tells): garbage collection deletes nothing without it.
    /// The grant's token is this write's resourceVersion, the Lease write just before
    /// the Granted status. An operator that dies in between leaves a Lease that is never
    /// collected (docs/operations.md says so): never one collected that it did not make.
    async fn stamp_origin(&self, name: &str, created: &Lease) -> Result<Lease, WriteError> {
        let proof = self.ctx.proof.proof(&created.uid().unwrap_or_default());
        let patch = json!({"metadata": {
            "resourceVersion": created.resource_version(),
            "annotations": {ORIGIN_ANNOTATION: proof},
        }});
        let ns = self.key.namespace.as_str();
        self.ctx
            .writer
            .patch_lease(WriteKind::LeaseProof, ns, name, &patch)
            .await
    }

    /// The create found a Lease the watches do not show (only Leases with our label or
    /// the takeover label are watched): read it, so the next decision sees it.
    async fn existing_lease(&self, slot: u32) -> Error {
        let name = self.lease_name(slot);
        match self.lease_api.get_opt(&name).await {
            Ok(Some(lease)) => Error::UnwatchedLease {
                name,
                slot,
                lease: Box::new(lease),
            },
            Ok(None) => Error::Conflict {
                what: self.lease_conflict(slot),
            },
            Err(source) => Error::LeaseReadFailed { name, source },
        }
    }

    async fn delete_lease(&mut self, slot: u32, resource_version: &str) -> Result<(), Error> {
        let name = self.lease_name(slot);
        let deleted = self
            .ctx
            .writer
            .delete_lease(&self.key.namespace, &name, resource_version)
            .await;
        deleted.map_err(|e| {
            classify(e, self.key, self.lease_conflict(slot), |source| {
                Error::LeaseDeleteFailed { name, source }
            })
        })?;
        // The Lease stays known here: an Event about its deletion still refers to it.
        self.written.leases.insert(slot, LeaseWrite::Deleted);
        Ok(())
    }

    async fn delete_claim(&mut self, claim: &str) -> Result<(), Error> {
        let rv = self.rvs.get(claim).cloned();
        match self
            .ctx
            .writer
            .delete_claim(&self.key.namespace, claim, rv)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.is_status(404) => Ok(()),
            Err(e) => Err(classify(
                e,
                self.key,
                format!("LockClaim {claim}"),
                |source| Error::ClaimDeleteFailed {
                    claim: claim.to_string(),
                    source,
                },
            )),
        }
    }

    fn event(&self, slot: u32, note: &Note) {
        let reference = match &note.target {
            Target::Claim(n) => self.by_name.get(n).map(|c| c.object_ref(&())),
            Target::Lease => self.leases.get(&slot).map(|l| l.object_ref(&())),
        };
        if let Some(reference) = reference {
            self.ctx.events.send(note, reference);
        }
        // A Pod's claim: the Pod is told too.
        if let Target::Claim(n) = &note.target {
            let claim = self.by_name.get(n);
            let pod = claim.and_then(|c| pods::pod_of(self.pods, c, &c.spec.lease_name));
            if let Some(p) = pod {
                self.ctx.events.send(note, pod_ref(&self.key.namespace, p));
            }
        }
    }

    /// Creates a Pod's claim; one that exists already (made by an earlier plan whose
    /// answer was lost) is fine: the watch shows it.
    async fn create_claim(&mut self, claim: &LockClaim) -> Result<(), Error> {
        let name = claim.name_any();
        match self
            .ctx
            .writer
            .create_claim(&self.key.namespace, claim)
            .await
        {
            Ok(c) => {
                self.note_claim(&name, c.resource_version());
                Ok(())
            }
            Err(e) if e.is_status(409) => Ok(()),
            Err(e) => Err(classify(
                e,
                self.key,
                format!("LockClaim {name}"),
                |source| Error::ClaimCreateFailed {
                    claim: name.clone(),
                    source,
                },
            )),
        }
    }

    /// Opens Pod `pod` granted Lease `lease` with fencing token `token`: one strategic
    /// merge patch with the Pod's resourceVersion as precondition writes the token and
    /// the Lease into its annotations and removes leasekeeper's scheduling gate.
    async fn open_pod(
        &mut self,
        pod: &str,
        resource_version: &str,
        lease: &str,
        token: Option<i64>,
    ) -> Result<(), Error> {
        let Some(token) = token else {
            // Never open a Pod without a token: the next reconcile completes it.
            return Err(Error::Conflict {
                what: format!("Pod {pod} (no fencing token yet)"),
            });
        };
        let patch = json!({
            "metadata": {
                "resourceVersion": resource_version,
                "annotations": {
                    FENCING_TOKEN_ANNOTATION: token.to_string(),
                    POD_LEASE_ANNOTATION: lease,
                },
            },
            "spec": {"schedulingGates": [{"name": POD_GATE, "$patch": "delete"}]},
        });
        let opened = self
            .ctx
            .writer
            .patch_pod(&self.key.namespace, pod, &patch)
            .await
            .map_err(|e| {
                classify(e, self.key, format!("Pod {pod}"), |source| {
                    Error::PodOpenFailed {
                        pod: pod.to_string(),
                        source,
                    }
                })
            })?;
        let note = Note {
            target: Target::Lease,
            warning: false,
            reason: Reason::PodOpened,
            message: format!(
                "granted Lease {lease} (fencing token {token}); scheduling gate {POD_GATE} removed"
            ),
        };
        self.ctx.events.send(&note, opened.object_ref(&()));
        Ok(())
    }

    /// A quorum read of node `node`'s heartbeat Lease: the plan goes on only if it is
    /// as the verdict was drawn from.
    async fn verify_node(
        &self,
        node: &str,
        resource_version: &Option<String>,
    ) -> Result<(), Error> {
        let api: Api<Lease> = Api::namespaced(self.ctx.client.clone(), NODE_LEASE_NAMESPACE);
        let fresh = api
            .get_opt(node)
            .await
            .map_err(|source| Error::LeaseReadFailed {
                name: format!("{NODE_LEASE_NAMESPACE}/{node}"),
                source,
            })?;
        if &fresh.as_ref().and_then(|l| l.resource_version()) != resource_version {
            return Err(Error::Conflict {
                what: format!("the heartbeat of node {node}"),
            });
        }
        Ok(())
    }

    fn note_claim(&mut self, claim: &str, rv: Option<String>) {
        if let Some(rv) = rv {
            if let Ok(n) = rv.parse() {
                self.written.claims.insert(claim.to_string(), n);
            }
            self.rvs.insert(claim.to_string(), rv);
        }
    }
}

/// The counted kind of a Lease write.
fn write_kind(kind: LeaseWriteKind) -> WriteKind {
    match kind {
        LeaseWriteKind::Create => WriteKind::LeaseCreate,
        LeaseWriteKind::Grant => WriteKind::LeaseGrant,
        LeaseWriteKind::Renew => WriteKind::LeaseRenew,
        LeaseWriteKind::Clear => WriteKind::LeaseClear,
    }
}
