//! Performs a [`Plan`](crate::arbiter::Plan)'s steps in order, each write carrying the
//! resourceVersion it was decided from; stops at the first failure.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::{Context, LeaseKey};
use crate::api::LockClaim;
use crate::arbiter::{LeaseWriteKind, Note, Plan, Step, Target};
use crate::telemetry::WriteKind;
use crate::{FINALIZER, MANAGER};

/// A failed reconcile step. Variants double as stable reasons for metrics and Events.
#[derive(Debug, thiserror::Error)]
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
    /// Deleting a finished claim failed.
    #[error("cannot delete LockClaim {claim}: {source}")]
    ClaimDeleteFailed {
        /// Claim name.
        claim: String,
        /// Cause.
        #[source]
        source: kube::Error,
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
    pub const REASONS: [&'static str; 8] = [
        "Conflict",
        "LeaseReadFailed",
        "LeaseWriteFailed",
        "LeaseDeleteFailed",
        "ClaimStatusFailed",
        "FinalizerFailed",
        "ClaimDeleteFailed",
        "TermEnded",
    ];

    /// A stable PascalCase reason for metric labels and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Conflict { .. } => "Conflict",
            Error::LeaseReadFailed { .. } => "LeaseReadFailed",
            Error::LeaseWriteFailed { .. } => "LeaseWriteFailed",
            Error::LeaseDeleteFailed { .. } => "LeaseDeleteFailed",
            Error::ClaimStatusFailed { .. } => "ClaimStatusFailed",
            Error::FinalizerFailed { .. } => "FinalizerFailed",
            Error::ClaimDeleteFailed { .. } => "ClaimDeleteFailed",
            Error::TermEnded { .. } => "TermEnded",
        }
    }

    /// Conflicts resolve themselves on the next read; everything else backs off longer.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }
}

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

/// What a successful plan wrote, so the next reconcile can tell a lagging cache.
#[derive(Default)]
pub struct Written {
    /// The Lease's resourceVersion after our last write to it (None after a delete).
    pub lease: Option<u64>,
    /// Whether the Lease was deleted.
    pub lease_deleted: bool,
    /// Claims' resourceVersions after our writes.
    pub claims: HashMap<String, u64>,
    /// When (monotonic) a granting Lease write completed.
    pub granted_at: Option<std::time::Duration>,
}

/// Runs the plan's steps in order.
pub async fn execute(
    ctx: &Arc<Context>,
    key: &LeaseKey,
    plan: &Plan,
    claims: &[Arc<LockClaim>],
    lease: Option<&Lease>,
) -> Result<Written, Error> {
    let claim_api: Api<LockClaim> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let lease_api: Api<Lease> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let by_name: HashMap<String, &LockClaim> =
        claims.iter().map(|c| (c.name_any(), c.as_ref())).collect();
    let mut rvs: HashMap<String, String> = claims
        .iter()
        .map(|c| (c.name_any(), c.resource_version().unwrap_or_default()))
        .collect();
    let mut finalizers: HashMap<String, Vec<String>> = claims
        .iter()
        .map(|c| (c.name_any(), c.finalizers().to_vec()))
        .collect();
    let mut written = Written::default();
    let mut last_lease: Option<Lease> = lease.cloned();
    let mut last_lease_rv: Option<i64> = None;

    let steps = sabotage(&plan.steps, lease);
    for step in steps.iter() {
        // A write decided as leader is made only while the term lasts: a leader that
        // froze mid-plan and woke past its term stops here (reads and Events go on).
        if is_write(step) && !ctx.term.is_current() {
            return Err(Error::TermEnded {
                lease: key.name.clone(),
            });
        }
        match step {
            Step::VerifyLease { .. } if super::broken("no-precondition") => {}
            Step::VerifyLease { resource_version } => {
                let fresh = lease_api.get_opt(&key.name).await.map_err(|source| {
                    Error::LeaseReadFailed {
                        name: key.name.clone(),
                        source,
                    }
                })?;
                let rv = fresh.as_ref().and_then(|l| l.resource_version());
                if &rv != resource_version {
                    return Err(Error::Conflict {
                        what: format!("Lease {}", key.name),
                    });
                }
            }
            Step::AddFinalizer { claim } | Step::RemoveFinalizer { claim } => {
                let mut f = finalizers.get(claim).cloned().unwrap_or_default();
                if matches!(step, Step::AddFinalizer { .. }) {
                    f.push(FINALIZER.to_string());
                } else {
                    f.retain(|x| x != FINALIZER);
                }
                let patch = json!({"metadata": {
                    "resourceVersion": rvs.get(claim),
                    "finalizers": f,
                }});
                let res = claim_api
                    .patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(|e| {
                        classify(e, format!("LockClaim {claim}"), |source| {
                            Error::FinalizerFailed {
                                claim: claim.clone(),
                                source,
                            }
                        })
                    });
                ctx.metrics.write(WriteKind::ClaimFinalizer);
                match res {
                    Ok(obj) => {
                        note_claim(&mut rvs, &mut written, claim, obj.resource_version());
                        finalizers.insert(claim.clone(), f);
                    }
                    // The object went away once its last finalizer came off: fine.
                    Err(Error::Conflict { .. }) if matches!(step, Step::RemoveFinalizer { .. }) => {
                    }
                    Err(e) => return Err(e),
                }
            }
            Step::SetStatus {
                claim,
                status,
                fill_token,
            } => {
                let mut status = status.clone();
                if *fill_token {
                    status.fencing_token = last_lease_rv;
                }
                let body = json!({
                    "apiVersion": "leasekeeper.io/v1alpha1",
                    "kind": "LockClaim",
                    "metadata": {"name": claim, "resourceVersion": rvs.get(claim)},
                    "status": status,
                });
                let obj = claim_api
                    .patch_status(
                        claim,
                        &PatchParams::apply(MANAGER).force(),
                        &Patch::Apply(&body),
                    )
                    .await
                    .map_err(|e| {
                        classify(e, format!("LockClaim {claim}"), |source| {
                            Error::ClaimStatusFailed {
                                claim: claim.clone(),
                                source,
                            }
                        })
                    })?;
                ctx.metrics.write(WriteKind::ClaimStatus);
                note_claim(&mut rvs, &mut written, claim, obj.resource_version());
            }
            Step::WriteLease { kind, lease } => {
                let result = if super::broken("no-precondition") {
                    // NEGATIVE CONTROL: write whatever is there, with no precondition.
                    let mut l = (**lease).clone();
                    l.metadata.resource_version = None;
                    match lease_api.create(&PostParams::default(), &l).await {
                        Err(kube::Error::Api(s)) if s.code == 409 => {
                            match lease_api.get_opt(&key.name).await {
                                Ok(Some(cur)) => {
                                    l.metadata.resource_version = cur.metadata.resource_version;
                                    lease_api
                                        .replace(&key.name, &PostParams::default(), &l)
                                        .await
                                }
                                Ok(None) => lease_api.create(&PostParams::default(), &l).await,
                                Err(e) => Err(e),
                            }
                        }
                        other => other,
                    }
                } else {
                    match kind {
                        LeaseWriteKind::Create => {
                            lease_api.create(&PostParams::default(), lease).await
                        }
                        _ => {
                            lease_api
                                .replace(&key.name, &PostParams::default(), lease)
                                .await
                        }
                    }
                };
                let obj = result.map_err(|e| {
                    classify(e, format!("Lease {}", key.name), |source| {
                        Error::LeaseWriteFailed {
                            name: key.name.clone(),
                            source,
                        }
                    })
                })?;
                ctx.metrics.write(match kind {
                    LeaseWriteKind::Create => WriteKind::LeaseCreate,
                    LeaseWriteKind::Grant => WriteKind::LeaseGrant,
                    LeaseWriteKind::Renew => WriteKind::LeaseRenew,
                    LeaseWriteKind::Clear => WriteKind::LeaseClear,
                });
                let rv = obj.resource_version();
                last_lease_rv = rv.as_ref().and_then(|v| v.parse().ok());
                written.lease = parse_rv(rv.as_ref());
                if matches!(kind, LeaseWriteKind::Create | LeaseWriteKind::Grant) {
                    written.granted_at = Some(ctx.mono());
                }
                last_lease = Some(obj);
            }
            Step::DeleteLease { resource_version } => {
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        resource_version: Some(resource_version.clone()),
                        uid: None,
                    }),
                    ..DeleteParams::default()
                };
                lease_api.delete(&key.name, &dp).await.map_err(|e| {
                    classify(e, format!("Lease {}", key.name), |source| {
                        Error::LeaseDeleteFailed {
                            name: key.name.clone(),
                            source,
                        }
                    })
                })?;
                ctx.metrics.write(WriteKind::LeaseDelete);
                written.lease = None;
                written.lease_deleted = true;
            }
            Step::DeleteClaim { claim } => {
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        resource_version: rvs.get(claim).cloned(),
                        uid: None,
                    }),
                    ..DeleteParams::default()
                };
                match claim_api.delete(claim, &dp).await {
                    Ok(_) => ctx.metrics.write(WriteKind::ClaimDelete),
                    Err(e) if is_status(&e, 404) => {}
                    Err(e) => {
                        return Err(classify(e, format!("LockClaim {claim}"), |source| {
                            Error::ClaimDeleteFailed {
                                claim: claim.clone(),
                                source,
                            }
                        }))
                    }
                }
            }
            Step::Event(note) => {
                let reference = match &note.target {
                    Target::Claim(n) => by_name.get(n).map(|c| c.object_ref(&())),
                    Target::Lease => last_lease.as_ref().or(lease).map(|l| l.object_ref(&())),
                };
                if let Some(reference) = reference {
                    publish(ctx, note, &reference).await;
                }
            }
        }
    }
    Ok(written)
}

/// Whether a step writes an object (Events are best effort and not arbitration state).
fn is_write(step: &Step) -> bool {
    !matches!(step, Step::VerifyLease { .. } | Step::Event(_))
}

/// The plan as the negative controls break it (unchanged unless a control is on):
/// `grant-before-lease` marks the new holder Granted before the Lease is written.
fn sabotage<'a>(steps: &'a [Step], lease: Option<&Lease>) -> std::borrow::Cow<'a, [Step]> {
    if !super::broken("grant-before-lease") {
        return std::borrow::Cow::Borrowed(steps);
    }
    let mut out: Vec<Step> = steps.to_vec();
    let write = out.iter().position(|s| {
        matches!(
            s,
            Step::WriteLease {
                kind: LeaseWriteKind::Create | LeaseWriteKind::Grant,
                ..
            }
        )
    });
    let grant = out.iter().position(|s| {
        matches!(
            s,
            Step::SetStatus {
                fill_token: true,
                ..
            }
        )
    });
    if let (Some(w), Some(g)) = (write, grant) {
        let mut step = out.remove(g);
        if let Step::SetStatus {
            status, fill_token, ..
        } = &mut step
        {
            *fill_token = false;
            status.fencing_token = lease
                .and_then(|l| l.metadata.resource_version.as_ref())
                .and_then(|v| v.parse().ok());
        }
        out.insert(w, step);
    }
    std::borrow::Cow::Owned(out)
}

fn note_claim(
    rvs: &mut HashMap<String, String>,
    written: &mut Written,
    claim: &str,
    rv: Option<String>,
) {
    if let Some(rv) = rv {
        if let Ok(n) = rv.parse() {
            written.claims.insert(claim.to_string(), n);
        }
        rvs.insert(claim.to_string(), rv);
    }
}

/// Publishes an Event; a failure is logged, never fatal (Events are best effort).
pub async fn publish(ctx: &Context, note: &Note, reference: &ObjectReference) {
    let ev = Event {
        type_: if note.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: note.reason.to_string(),
        note: Some(note.message.clone()),
        action: "Arbitrate".into(),
        secondary: None,
    };
    // A fresh Recorder per Event: kube's Recorder keeps every Event it published for six
    // minutes (to count repeats of the same Event) and scans that cache on each publish.
    // Ours never repeat (each marks one transition of one claim), so the cache would only
    // hold tens of thousands of Events under load, and cost a scan per publish.
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    if let Err(e) = recorder.publish(&ev, reference).await {
        tracing::debug!(error = %e, reason = note.reason, "cannot publish Event");
    }
}
