//! Performs a [`LockPlan`](crate::arbiter::LockPlan)'s steps in order, each write
//! carrying the resourceVersion it was decided from; stops at the first failure. A
//! step's slot says which of the lock's Leases it concerns.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::{chaos, Context, Error, LeaseKey};
use crate::api::{slot_lease, LockClaim, LockClaimStatus};
use crate::arbiter::{LeaseWriteKind, LockPlan, LockStep, Note, Step, Target};
use crate::telemetry::WriteKind;
use crate::{FINALIZER, MANAGER};

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// 409 (stale resourceVersion) and 404 (gone) both mean: re-read and re-decide.
fn classify(e: kube::Error, what: String, other: impl FnOnce(kube::Error) -> Error) -> Error {
    if is_status(&e, 409) || is_status(&e, 404) {
        Error::Conflict { what }
    } else {
        other(e)
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
) -> Result<Written, Error> {
    let mut x = Executor::new(ctx, key, claims, leases);
    for step in sabotaged(&plan.steps, leases) {
        // A write decided as leader is made only while the term lasts: a leader that
        // froze mid-plan and woke past its term stops here (reads and Events go on).
        let ended = || Error::TermEnded {
            lease: key.name.clone(),
        };
        if is_write(&step.step) && !ctx.term.is_current() {
            return Err(ended());
        }
        // Nor may a write wait past the term for the API server and land after it.
        ctx.term.within(x.step(&step)).await.ok_or_else(ended)??;
    }
    Ok(x.written)
}

/// The steps as the chaos build's `grant-before-lease` control reorders them, one
/// slot's run of steps at a time (unchanged in the product build).
fn sabotaged(steps: &[LockStep], leases: &BTreeMap<u32, Arc<Lease>>) -> Vec<LockStep> {
    let mut out = Vec::with_capacity(steps.len());
    for run in steps.chunk_by(|a, b| a.slot == b.slot) {
        let slot = run[0].slot;
        let plain: Vec<Step> = run.iter().map(|s| s.step.clone()).collect();
        let lease = leases.get(&slot).map(|l| l.as_ref());
        out.extend(
            chaos::steps(&plain, lease)
                .iter()
                .cloned()
                .map(|step| LockStep { slot, step }),
        );
    }
    out
}

/// Whether a step writes an object (Events are best effort and not arbitration state).
fn is_write(step: &Step) -> bool {
    !matches!(step, Step::VerifyLease { .. } | Step::Event(_))
}

/// The state of one plan's execution: the preconditions each next write carries.
struct Executor<'a> {
    ctx: &'a Context,
    key: &'a LeaseKey,
    claim_api: Api<LockClaim>,
    lease_api: Api<Lease>,
    by_name: HashMap<String, &'a LockClaim>,
    /// Each claim's resourceVersion as last read or written.
    rvs: HashMap<String, String>,
    finalizers: HashMap<String, Vec<String>>,
    /// Each slot's Lease as read, then as our last write left it.
    leases: BTreeMap<u32, Lease>,
    /// The resourceVersion our last Lease write returned: the next grant's token.
    lease_token: Option<i64>,
    written: Written,
}

impl<'a> Executor<'a> {
    fn new(
        ctx: &'a Context,
        key: &'a LeaseKey,
        claims: &'a [Arc<LockClaim>],
        leases: &BTreeMap<u32, Arc<Lease>>,
    ) -> Executor<'a> {
        Executor {
            ctx,
            key,
            claim_api: Api::namespaced(ctx.client.clone(), &key.namespace),
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
            written: Written::default(),
        }
    }

    async fn step(&mut self, s: &LockStep) -> Result<(), Error> {
        let slot = s.slot;
        match &s.step {
            Step::VerifyLease { .. } if chaos::skips_lease_check() => Ok(()),
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
            .claim_api
            .patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        self.ctx.metrics.write(WriteKind::ClaimFinalizer);
        match res {
            Ok(obj) => {
                self.note_claim(claim, obj.resource_version());
                self.finalizers.insert(claim.to_string(), f);
                Ok(())
            }
            Err(e) => match classify(e, format!("LockClaim {claim}"), |source| {
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
        let body = json!({
            "apiVersion": "leasekeeper.io/v1alpha1",
            "kind": "LockClaim",
            "metadata": {"name": claim, "resourceVersion": self.rvs.get(claim)},
            "status": status,
        });
        let obj = self
            .claim_api
            .patch_status(
                claim,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(|e| {
                classify(e, format!("LockClaim {claim}"), |source| {
                    Error::ClaimStatusFailed {
                        claim: claim.to_string(),
                        source,
                    }
                })
            })?;
        self.ctx.metrics.write(WriteKind::ClaimStatus);
        self.note_claim(claim, obj.resource_version());
        Ok(())
    }

    async fn write_lease(
        &mut self,
        slot: u32,
        kind: LeaseWriteKind,
        lease: &Lease,
    ) -> Result<(), Error> {
        let pp = PostParams::default();
        let name = self.lease_name(slot);
        let result = match chaos::write_lease(&self.lease_api, &name, lease).await {
            Some(sabotaged) => sabotaged,
            None if kind == LeaseWriteKind::Create => self.lease_api.create(&pp, lease).await,
            // A merge patch of only what the operator owns, with the resourceVersion as
            // precondition: the cache dropped others' labels and annotations, so a
            // whole-object replace would write them away.
            None => {
                let patch = crate::arbiter::update_patch(lease);
                self.lease_api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
            }
        };
        if kind == LeaseWriteKind::Create {
            if let Err(e) = &result {
                if is_status(e, 409) {
                    return Err(self.existing_lease(slot).await);
                }
            }
        }
        let obj = result.map_err(|e| {
            classify(e, self.lease_conflict(slot), |source| {
                Error::LeaseWriteFailed { name, source }
            })
        })?;
        self.ctx.metrics.write(match kind {
            LeaseWriteKind::Create => WriteKind::LeaseCreate,
            LeaseWriteKind::Grant => WriteKind::LeaseGrant,
            LeaseWriteKind::Renew => WriteKind::LeaseRenew,
            LeaseWriteKind::Clear => WriteKind::LeaseClear,
        });
        let rv = obj.resource_version();
        self.wrote(rv.as_deref());
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
        let dp = precondition(Some(resource_version.to_string()));
        let name = self.lease_name(slot);
        self.lease_api.delete(&name, &dp).await.map_err(|e| {
            classify(e, self.lease_conflict(slot), |source| {
                Error::LeaseDeleteFailed { name, source }
            })
        })?;
        self.ctx.metrics.write(WriteKind::LeaseDelete);
        // The Lease stays known here: an Event about its deletion still refers to it.
        self.written.leases.insert(slot, LeaseWrite::Deleted);
        Ok(())
    }

    async fn delete_claim(&mut self, claim: &str) -> Result<(), Error> {
        let dp = precondition(self.rvs.get(claim).cloned());
        match self.claim_api.delete(claim, &dp).await {
            Ok(_) => {
                self.ctx.metrics.write(WriteKind::ClaimDelete);
                Ok(())
            }
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(classify(e, format!("LockClaim {claim}"), |source| {
                Error::ClaimDeleteFailed {
                    claim: claim.to_string(),
                    source,
                }
            })),
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
    }

    /// A write landed, producing resourceVersion `rv` (the chaos build logs it).
    fn wrote(&self, rv: Option<&str>) {
        chaos::wrote(
            self.ctx.reporter.instance.as_deref(),
            &self.key.namespace,
            rv,
        );
    }

    fn note_claim(&mut self, claim: &str, rv: Option<String>) {
        self.wrote(rv.as_deref());
        if let Some(rv) = rv {
            if let Ok(n) = rv.parse() {
                self.written.claims.insert(claim.to_string(), n);
            }
            self.rvs.insert(claim.to_string(), rv);
        }
    }
}

fn precondition(resource_version: Option<String>) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            resource_version,
            uid: None,
        }),
        ..DeleteParams::default()
    }
}
