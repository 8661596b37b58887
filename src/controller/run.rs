//! Running the operator: leadership, the watches and the dispatcher that hands each
//! due Lease key to a reconcile, and shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::events::Reporter;
use kube::runtime::reflector;
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, CustomResourceExt};
use tokio::time::Instant;

use super::queue::WorkQueue;
use super::reconcile::reconcile_key;
use super::watches::{claim_seen, lease_seen, slim};
use super::{chaos, Context, Error, RunConfig, RunError};
use crate::api::LockClaim;
use crate::arbiter;
use crate::leader::Term;
use crate::telemetry::{self, Metrics, Readiness, ReasonLabel};

/// Runs the operator until it fails or receives SIGINT/SIGTERM.
pub async fn run(cfg: RunConfig) -> Result<(), RunError> {
    chaos::arm();
    let client = Client::try_default().await.map_err(RunError::Config)?;
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    let _probes =
        telemetry::serve_probes(cfg.metrics_addr, metrics.clone(), readiness.clone()).await?;
    wait_for_crd(client.clone(), cfg.crd_wait).await?;
    tracing::info!(
        namespace = cfg.watch_namespace.as_deref().unwrap_or("*"),
        "connected; LockClaim CRD established"
    );
    if !cfg.leader_elect {
        metrics.leader.set(1);
        return tokio::select! {
            res = controller(client, cfg, metrics, readiness, Term::unbounded()) => res,
            _ = shutdown_signal() => {
                tracing::info!("shutting down");
                Ok(())
            }
        };
    }
    // A follower is ready: it serves probes and waits to take over.
    readiness.set(true);
    let election = crate::leader::ElectionConfig {
        namespace: cfg.leader_namespace.clone().unwrap_or_else(own_namespace),
        name: cfg.leader_lease_name.clone(),
        identity: cfg.identity(),
        lease_duration: cfg.leader_lease_duration,
        renew_deadline: cfg.leader_renew_deadline,
        retry_period: cfg.leader_retry_period,
    };
    if let Some(res) =
        chaos::without_leadership(&client, &cfg, &metrics, &readiness, &election).await
    {
        return res;
    }
    tracing::info!(identity = %election.identity, lease = %election.name, namespace = %election.namespace, "waiting for leadership");
    let mut leadership = tokio::select! {
        l = election.acquire(client.clone()) => l?,
        _ = shutdown_signal() => return Ok(()),
    };
    metrics.leader.set(1);
    let term = leadership.term();
    let result = tokio::select! {
        res = controller(client, cfg, metrics.clone(), readiness, term) => res,
        _ = leadership.lost() => Err(RunError::LeadershipLost),
        _ = shutdown_signal() => {
            tracing::info!("shutting down; handing leadership over");
            leadership.release().await;
            Ok(())
        }
    };
    metrics.leader.set(0);
    result
}

/// The namespace this Pod runs in (service account mount), else "default".
fn own_namespace() -> String {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// The controller proper: watches, dispatcher and reconciles. Runs until a watch ends
/// (never, in practice) or the future is dropped. It writes only while `term` is
/// current ([`Term::unbounded`] without leader election).
pub async fn controller(
    client: Client,
    cfg: RunConfig,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    term: Term,
) -> Result<(), RunError> {
    let (claim_api, lease_api): (Api<LockClaim>, Api<Lease>) = match cfg.watch_namespace.as_deref()
    {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    start_counters_at_zero(&metrics);
    let (claims, claim_writer) = reflector::store();
    let (leases, lease_writer) = reflector::store();
    let ctx = Arc::new(Context {
        reporter: Reporter {
            controller: crate::MANAGER.into(),
            instance: Some(cfg.identity()),
        },
        client,
        metrics,
        claims,
        leases,
        index: Mutex::default(),
        keys: Mutex::default(),
        queue: WorkQueue::default(),
        config: arbiter::Config {
            gc_grace: cfg.gc_grace,
        },
        origin: Instant::now(),
        term,
    });
    let c = ctx.clone();
    let claim_watch = reflector::reflector(
        claim_writer,
        watcher(claim_api, watcher::Config::default()).modify(slim),
    )
    .default_backoff()
    .for_each(move |ev| {
        match ev {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                claim_seen(&c, &o, false)
            }
            Ok(watcher::Event::Delete(o)) => claim_seen(&c, &o, true),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "LockClaim watch error; retrying"),
        }
        futures::future::ready(())
    });
    let c = ctx.clone();
    let lease_watch = reflector::reflector(
        lease_writer,
        watcher(lease_api, watcher::Config::default())
            .modify(slim)
            .then(|ev| async move {
                chaos::lease_watch_point().await;
                ev
            }),
    )
    .default_backoff()
    .for_each(move |ev| {
        match ev {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                lease_seen(&c, &o, false)
            }
            Ok(watcher::Event::Delete(o)) => lease_seen(&c, &o, true),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Lease watch error; retrying"),
        }
        futures::future::ready(())
    });
    tokio::select! {
        _ = claim_watch => Err(RunError::WatchEnded("LockClaim")),
        _ = lease_watch => Err(RunError::WatchEnded("Lease")),
        _ = dispatch(ctx, readiness, cfg.concurrency) => Err(RunError::WatchEnded("cache")),
    }
}

/// Counters by reason exist from the start, at zero, so that rates work from the start.
fn start_counters_at_zero(metrics: &Metrics) {
    for reason in Error::REASONS {
        metrics
            .reconcile_errors
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc_by(0);
    }
    for reason in arbiter::Reason::EXPIRIES {
        metrics
            .expiries
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().into(),
            })
            .inc_by(0);
    }
}

/// Once both caches are synced (then the process is ready), hands each due Lease key to
/// a reconcile, at most `concurrency` at once and never one key twice at once.
async fn dispatch(ctx: Arc<Context>, readiness: Arc<Readiness>, concurrency: usize) {
    let (a, b) = tokio::join!(ctx.claims.wait_until_ready(), ctx.leases.wait_until_ready());
    if a.is_err() || b.is_err() {
        return;
    }
    readiness.set(true);
    tracing::info!("caches synced; reconciling");
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    loop {
        let key = ctx.queue.next().await;
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let c = ctx.clone();
        tokio::spawn(async move {
            reconcile_key(&c, &key).await;
            c.queue.done(&key);
            drop(permit);
        });
    }
}

/// Waits until the LockClaim CRD is Established (instead of crash-looping before it is).
pub async fn wait_for_crd(client: Client, timeout: Duration) -> Result<(), RunError> {
    let name = LockClaim::crd_name();
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    tracing::info!(crd = name, "waiting for the CRD to be established");
    match tokio::time::timeout(
        timeout,
        await_condition(crds, name, conditions::is_crd_established()),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(RunError::CrdWatch(e)),
        Err(_) => Err(RunError::CrdNotEstablished {
            name: name.to_string(),
            timeout,
        }),
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
