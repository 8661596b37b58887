//! The fault hooks of the chaos run, compiled only with the `chaos-negative-controls`
//! feature (without it `chaos_off.rs` stands in: the same names, doing nothing). The
//! product touches them at two seams and reads one decision:
//!
//! - the arbiter's seam ([`arbiter`], called once per reconcile): what the arbiter sees
//!   and what it plans;
//! - the writer's seam ([`wrote`] after every write, [`create_over_existing`] when a
//!   Lease create finds the Lease);
//! - [`controls`], read once by `run`, which acts on it (acting without leadership,
//!   releasing leadership before draining). Nothing here calls into `run`.
//!
//! Negative controls (deliberately broken behaviour the chaos checker must catch) are
//! chosen with `LEASEKEEPER_BREAK` (comma-separated): `no-precondition`,
//! `grant-before-lease`, `skip-lock-delay`, `non-leader-writes`,
//! `release-before-drain`, `lease-before-ending` (the Lease written for the next
//! holder before the old one is marked not Granted), `flash-double-grant` (a waiter
//! marked Granted and back at once beside each grant), `ignore-term` (the writer skips
//! the leadership term, and a leader that lost it works on for 2 s). The Lease-watch stall fault: on SIGUSR1 the arbiter's view of
//! every lock's Leases stops changing for `LEASEKEEPER_CHAOS_LEASE_WATCH_STALL` (default
//! 3 s), as behind a stuck watch; then it catches up at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::PostParams;
use kube::Api;
use tokio::time::Instant;

use super::LeaseKey;
use crate::api::{LockClaim, LOCK_DELAY_ANNOTATION};
use crate::arbiter::{LeaseWriteKind, LockPlan, LockStep, Step};
use crate::telemetry::WriteKind;

/// Whether the negative control `what` is on.
fn broken(what: &str) -> bool {
    std::env::var("LEASEKEEPER_BREAK").is_ok_and(|v| v.split(',').any(|x| x == what))
}

/// What `run` does differently in this build (see [`controls`]).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Controls {
    /// `non-leader-writes`: run the controller without waiting for leadership (the
    /// election still runs, so the leader gauge tells the truth).
    pub ignore_leadership: bool,
    /// `release-before-drain`: on SIGTERM release leadership first and keep working for
    /// what is left of the term (a shutdown that forgot to end its term and drain).
    pub release_before_drain: bool,
    /// `ignore-term`: besides the writer skipping the term, a leader that lost
    /// leadership works on for 2 s before it stops (one that does not heed its term).
    pub work_on_after_loss: bool,
}

/// The controls in force; also arms the Lease-watch stall (SIGUSR1). Call once, at start.
pub(super) fn controls() -> Controls {
    arm_stall();
    let c = Controls {
        ignore_leadership: broken("non-leader-writes"),
        release_before_drain: broken("release-before-drain"),
        work_on_after_loss: broken("ignore-term"),
    };
    if c.ignore_leadership || c.release_before_drain || c.work_on_after_loss {
        tracing::warn!(?c, "NEGATIVE CONTROL: leadership sabotaged");
    }
    c
}

/// Until when the Lease view is stalled, and each lock's view frozen at the stall's start.
struct Stall {
    until: Option<Instant>,
    frozen: BTreeMap<LeaseKey, BTreeMap<u32, Arc<Lease>>>,
}

static STALL: Mutex<Stall> = Mutex::new(Stall {
    until: None,
    frozen: BTreeMap::new(),
});

fn stall() -> std::sync::MutexGuard<'static, Stall> {
    STALL.lock().unwrap_or_else(|e| e.into_inner())
}

fn arm_stall() {
    let length = std::env::var("LEASEKEEPER_CHAOS_LEASE_WATCH_STALL")
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
        .unwrap_or(Duration::from_secs(3));
    let Ok(mut sig) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
    else {
        return;
    };
    tokio::spawn(async move {
        while sig.recv().await.is_some() {
            tracing::warn!(?length, "CHAOS: stalling the Lease view");
            let mut s = stall();
            s.until = Some(Instant::now() + length);
            s.frozen.clear();
        }
    });
}

/// The arbiter's seam: edits what the arbiter sees (`skip-lock-delay`, the stalled
/// Lease view), decides, then edits the plan (`grant-before-lease`, `no-precondition`).
pub(super) fn arbiter(
    key: &LeaseKey,
    claims: &mut [Arc<LockClaim>],
    leases: &mut BTreeMap<u32, Arc<Lease>>,
    decide: impl FnOnce(&[Arc<LockClaim>], &BTreeMap<u32, Arc<Lease>>) -> Option<LockPlan>,
) -> Option<LockPlan> {
    stalled_view(key, leases);
    if broken("skip-lock-delay") {
        skip_lock_delay(claims, leases);
    }
    let mut plan = decide(claims, leases)?;
    if broken("grant-before-lease") {
        plan.steps = grant_before_lease(&plan.steps, leases);
    }
    if broken("no-precondition") {
        drop_preconditions(&mut plan.steps);
    }
    if broken("lease-before-ending") {
        plan.steps = lease_before_ending(&plan.steps);
    }
    if broken("flash-double-grant") {
        plan.steps = flash_double_grant(&plan.steps, claims);
    }
    Some(plan)
}

/// `lease-before-ending`: within each slot's run of steps, a granting Lease write moves
/// before the status writes that end the old holder (the handoff order reversed).
fn lease_before_ending(steps: &[LockStep]) -> Vec<LockStep> {
    let mut out = Vec::with_capacity(steps.len());
    for run in steps.chunk_by(|a, b| a.slot == b.slot) {
        let mut run = run.to_vec();
        let granting = |s: &LockStep| {
            matches!(
                s.step,
                Step::WriteLease {
                    kind: LeaseWriteKind::Grant,
                    ..
                }
            )
        };
        let ending = |s: &LockStep| {
            matches!(&s.step, Step::SetStatus { status, fill_token: false, .. }
                if status.phase.is_some_and(crate::api::Phase::is_terminal))
        };
        if let (Some(e), Some(g)) = (run.iter().position(ending), run.iter().position(granting)) {
            if e < g {
                let w = run.remove(g);
                run.insert(e, w);
            }
        }
        out.extend(run);
    }
    out
}

/// `flash-double-grant`: right after each grant, another waiting claim is marked
/// Granted and at once marked back (two writes a watch may never show apart).
fn flash_double_grant(steps: &[LockStep], claims: &[Arc<LockClaim>]) -> Vec<LockStep> {
    let mut out = Vec::with_capacity(steps.len() + 2);
    for s in steps {
        out.push(s.clone());
        let Step::SetStatus {
            claim,
            fill_token: true,
            ..
        } = &s.step
        else {
            continue;
        };
        let waiter = claims.iter().find(|c| {
            c.metadata.name.as_deref() != Some(claim.as_str())
                && c.phase() == Some(crate::api::Phase::Pending)
        });
        if let Some(c) = waiter {
            let before = c.status.clone().unwrap_or_default();
            let mut flash = before.clone();
            flash.phase = Some(crate::api::Phase::Granted);
            let name = c.metadata.name.clone().unwrap_or_default();
            for status in [flash, before] {
                out.push(LockStep {
                    slot: s.slot,
                    step: Step::SetStatus {
                        claim: name.clone(),
                        status,
                        fill_token: false,
                    },
                });
            }
        }
    }
    out
}

/// The writer's seam, `ignore-term`: writes go on after the leadership term ended.
pub(super) fn ignores_term() -> bool {
    broken("ignore-term")
}

/// During a stall, each lock's Leases are seen as they were when the stall began.
fn stalled_view(key: &LeaseKey, leases: &mut BTreeMap<u32, Arc<Lease>>) {
    let mut s = stall();
    match s.until {
        Some(t) if t > Instant::now() => {
            let frozen = s
                .frozen
                .entry(key.clone())
                .or_insert_with(|| leases.clone());
            leases.clone_from(frozen);
        }
        Some(_) => {
            *s = Stall {
                until: None,
                frozen: BTreeMap::new(),
            }
        }
        None => {}
    }
}

/// `skip-lock-delay`: the arbiter never sees a lock delay.
fn skip_lock_delay(claims: &mut [Arc<LockClaim>], leases: &mut BTreeMap<u32, Arc<Lease>>) {
    for c in claims.iter_mut() {
        Arc::make_mut(c).spec.lock_delay_seconds = 0;
    }
    for l in leases.values_mut() {
        if let Some(a) = Arc::make_mut(l).metadata.annotations.as_mut() {
            a.remove(LOCK_DELAY_ANNOTATION);
        }
    }
}

/// `grant-before-lease`: within each slot's run of steps, the new holder is marked
/// Granted (with the token the Lease had) before the Lease is written for it.
fn grant_before_lease(steps: &[LockStep], leases: &BTreeMap<u32, Arc<Lease>>) -> Vec<LockStep> {
    let mut out = Vec::with_capacity(steps.len());
    for run in steps.chunk_by(|a, b| a.slot == b.slot) {
        let mut run = run.to_vec();
        let granting = |s: &LockStep| {
            matches!(
                s.step,
                Step::WriteLease {
                    kind: LeaseWriteKind::Create | LeaseWriteKind::Grant,
                    ..
                }
            )
        };
        let filled = |s: &LockStep| {
            matches!(
                s.step,
                Step::SetStatus {
                    fill_token: true,
                    ..
                }
            )
        };
        if let (Some(w), Some(g)) = (run.iter().position(granting), run.iter().position(filled)) {
            let mut early = run.remove(g);
            if let Step::SetStatus {
                status, fill_token, ..
            } = &mut early.step
            {
                *fill_token = false;
                status.fencing_token = leases
                    .get(&early.slot)
                    .and_then(|l| l.metadata.resource_version.as_ref())
                    .and_then(|v| v.parse().ok());
            }
            run.insert(w, early);
        }
        out.extend(run);
    }
    out
}

/// `no-precondition`: no fresh read before an expiry, and Lease writes without the
/// resourceVersion they were decided from (a create that finds the Lease replaces it:
/// [`create_over_existing`]).
fn drop_preconditions(steps: &mut Vec<LockStep>) {
    steps.retain(|s| !matches!(s.step, Step::VerifyLease { .. }));
    for s in steps.iter_mut() {
        if let Step::WriteLease { lease, .. } = &mut s.step {
            lease.metadata.resource_version = None;
        }
    }
}

/// The writer's seam, `no-precondition`: a Lease create that found the Lease replaces
/// it, whatever it holds. None when the control is off (the create's conflict stands).
pub(super) async fn create_over_existing(
    api: &Api<Lease>,
    lease: &Lease,
) -> Option<Result<Lease, kube::Error>> {
    if !broken("no-precondition") {
        return None;
    }
    let name = lease.metadata.name.clone().unwrap_or_default();
    let mut l = lease.clone();
    Some(match api.get_opt(&name).await {
        Ok(Some(cur)) => {
            l.metadata.resource_version = cur.metadata.resource_version;
            api.replace(&name, &PostParams::default(), &l).await
        }
        Ok(None) => api.create(&PostParams::default(), &l).await,
        Err(e) => Err(e),
    })
}

/// The writer's seam: every successful write is logged with the resourceVersion it
/// produced, so that the chaos checker can order it against the leadership Lease's
/// history (etcd's one revision counter orders both): no write may follow a successor's
/// taking over.
pub(super) fn wrote(identity: Option<&str>, kind: WriteKind, namespace: &str, rv: Option<&str>) {
    if let Some(rv) = rv {
        tracing::warn!(
            "CHAOS-WROTE identity={} kind={kind:?} ns={namespace} rv={rv}",
            identity.unwrap_or("")
        );
    }
}
