//! Every fault hook of the chaos run, in one place, compiled only with the
//! `chaos-negative-controls` feature (without it, `chaos_off.rs` stands in with no-ops
//! of the same names). `make lint` runs clippy on both builds.
//!
//! - Negative controls: deliberately broken behaviour chosen by `LEASEKEEPER_BREAK`
//!   (comma-separated): `no-precondition`, `grant-before-lease`, `skip-lock-delay`,
//!   `non-leader-writes`, `release-before-drain`. The chaos checker must catch each.
//! - Every successful write logged with the resourceVersion it produced (`CHAOS-WROTE`),
//!   so the checker can order it against the leadership Lease.
//! - The Lease-watch stall fault: on SIGUSR1 this replica stops taking in Lease watch
//!   events for `LEASEKEEPER_CHAOS_LEASE_WATCH_STALL` (default 3 s), then takes in what
//!   queued up, late: a lagging watch, as after a slow watch cache or a stuck stream.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::time::Instant;

use super::run::{controller, shutdown_signal};
use super::{RunConfig, RunError};
use crate::api::LockClaim;
use crate::arbiter::{self, LeaseWriteKind, Step};
use crate::leader::{ElectionConfig, Term};
use crate::telemetry::{Metrics, Readiness};

/// Whether the negative control `what` is on.
fn broken(what: &str) -> bool {
    std::env::var("LEASEKEEPER_BREAK").is_ok_and(|v| v.split(',').any(|x| x == what))
}

static STALL_UNTIL: Mutex<Option<Instant>> = Mutex::new(None);

/// Arms the Lease-watch stall fault (SIGUSR1).
pub(super) fn arm() {
    let stall = std::env::var("LEASEKEEPER_CHAOS_LEASE_WATCH_STALL")
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
        .unwrap_or(Duration::from_secs(3));
    let Ok(mut sig) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
    else {
        return;
    };
    tokio::spawn(async move {
        while sig.recv().await.is_some() {
            tracing::warn!(?stall, "CHAOS: stalling the Lease watch");
            if let Ok(mut u) = STALL_UNTIL.lock() {
                *u = Some(Instant::now() + stall);
            }
        }
    });
}

/// Where the Lease watch waits out a stall.
pub(super) async fn lease_watch_point() {
    let until = STALL_UNTIL.lock().ok().and_then(|u| *u);
    if let Some(t) = until.filter(|t| *t > Instant::now()) {
        tokio::time::sleep_until(t).await;
    }
}

/// `non-leader-writes`: the election still runs (and the leader gauge tells the truth);
/// the controller just does not wait for it. None when the control is off.
pub(super) async fn without_leadership(
    client: &Client,
    cfg: &RunConfig,
    metrics: &Arc<Metrics>,
    readiness: &Arc<Readiness>,
    election: &ElectionConfig,
) -> Option<Result<(), RunError>> {
    if !broken("non-leader-writes") {
        return None;
    }
    tracing::warn!("NEGATIVE CONTROL: acting without leadership");
    let elect = async {
        if let Ok(mut l) = election.clone().acquire(client.clone()).await {
            metrics.leader.set(1);
            l.lost().await;
            metrics.leader.set(0);
        }
        std::future::pending::<()>().await
    };
    let run = controller(
        client.clone(),
        cfg.clone(),
        metrics.clone(),
        readiness.clone(),
        Term::unbounded(),
    );
    Some(tokio::select! {
        res = run => res,
        _ = elect => Ok(()),
        _ = shutdown_signal() => Ok(()),
    })
}

/// `skip-lock-delay`: the arbiter never sees a lock delay.
pub(super) fn inputs(
    claims: Vec<Arc<LockClaim>>,
    lease: Option<Arc<Lease>>,
) -> (Vec<Arc<LockClaim>>, Option<Arc<Lease>>) {
    if !broken("skip-lock-delay") {
        return (claims, lease);
    }
    let claims = claims
        .iter()
        .map(|c| {
            let mut c = (**c).clone();
            c.spec.lock_delay_seconds = 0;
            Arc::new(c)
        })
        .collect();
    let lease = lease.map(|l| {
        let mut l = (*l).clone();
        if let Some(a) = l.metadata.annotations.as_mut() {
            a.remove(arbiter::LOCK_DELAY_ANNOTATION);
        }
        Arc::new(l)
    });
    (claims, lease)
}

/// `grant-before-lease`: the new holder is marked Granted before the Lease is written.
pub(super) fn steps<'a>(steps: &'a [Step], lease: Option<&Lease>) -> Cow<'a, [Step]> {
    if !broken("grant-before-lease") {
        return Cow::Borrowed(steps);
    }
    let mut out: Vec<Step> = steps.to_vec();
    let granting = |s: &Step| {
        matches!(
            s,
            Step::WriteLease {
                kind: LeaseWriteKind::Create | LeaseWriteKind::Grant,
                ..
            }
        )
    };
    let write = out.iter().position(granting);
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
    Cow::Owned(out)
}

/// `no-precondition`: the fresh read before an expiry is skipped.
pub(super) fn skips_lease_check() -> bool {
    broken("no-precondition")
}

/// `no-precondition`: the Lease is written over whatever is there. None when off.
pub(super) async fn write_lease(
    api: &Api<Lease>,
    name: &str,
    lease: &Lease,
) -> Option<Result<Lease, kube::Error>> {
    if !broken("no-precondition") {
        return None;
    }
    let mut l = lease.clone();
    l.metadata.resource_version = None;
    let pp = PostParams::default();
    Some(match api.create(&pp, &l).await {
        Err(kube::Error::Api(s)) if s.code == 409 => match api.get_opt(name).await {
            Ok(Some(cur)) => {
                l.metadata.resource_version = cur.metadata.resource_version;
                api.replace(name, &pp, &l).await
            }
            Ok(None) => api.create(&pp, &l).await,
            Err(e) => Err(e),
        },
        other => other,
    })
}

/// `release-before-drain`: on SIGTERM the leader releases leadership first and keeps
/// working for what is left of its term (a shutdown that forgot to end its term and
/// drain before the release).
pub(super) fn releases_before_draining() -> bool {
    broken("release-before-drain")
}

/// The sloppy shutdown's work after its release (see [`releases_before_draining`]): the
/// controller, still polled by the caller, runs on until the term it no longer renews
/// runs out.
pub(super) async fn keep_working_after_release(term: &Term) {
    let left = term.remaining().unwrap_or(Duration::from_secs(1));
    tracing::warn!(
        ?left,
        "CHAOS: released leadership before draining; working on"
    );
    tokio::time::sleep(left.min(Duration::from_secs(10))).await;
}

/// Every successful write is logged with the resourceVersion it produced, so that the
/// chaos checker can order it against the leadership Lease's history (etcd's one
/// revision counter orders both): no write may follow a successor's taking over.
pub(super) fn wrote(identity: Option<&str>, namespace: &str, rv: Option<&str>) {
    if let Some(rv) = rv {
        tracing::warn!(
            "CHAOS-WROTE identity={} ns={namespace} rv={rv}",
            identity.unwrap_or("")
        );
    }
}
