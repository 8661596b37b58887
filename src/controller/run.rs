//! Running the operator: leadership, the watches and the dispatcher that hands each
//! due Lease key to a reconcile, and shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::DeserializeGuard;
use kube::runtime::events::Reporter;
use kube::runtime::reflector;
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, CustomResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::reconcile::{reconcile_key, reconcile_panicked};
use super::watches;
use super::workqueue::WorkQueue;
use super::writer::Writer;
use super::{chaos, worker, Context, Error, LeaseKey, RunConfig, RunError};
use crate::api::{Lock, LockClaim};
use crate::arbiter;
use crate::leader::Term;
use crate::telemetry::{self, Metrics, Readiness, ReasonLabel};

/// Runs the operator until it fails or receives SIGINT/SIGTERM.
pub async fn run(mut cfg: RunConfig) -> Result<(), RunError> {
    let controls = chaos::controls();
    if cfg.leader_elect {
        // One identity per process, as client-go does (name_random): a container that
        // restarts under the same Pod name is a new candidate, not the old leader back.
        cfg.identity = Some(format!("{}_{}", cfg.identity(), unique_suffix()));
    }
    let election = election_config(&cfg);
    if cfg.leader_elect {
        election.check_timings()?;
    }
    let client = Client::try_default().await.map_err(RunError::Config)?;
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    let _servers = telemetry::serve(
        &cfg.serve_config(),
        metrics.clone(),
        readiness.clone(),
        Some(client.clone()),
    )
    .await?;
    wait_for_crd(client.clone(), cfg.crd_wait).await?;
    tracing::info!(
        namespace = cfg.watch_namespace.as_deref().unwrap_or("*"),
        "connected; LockClaim CRD established"
    );
    if !cfg.leader_elect {
        metrics.leader.set(1);
        return run_alone(client, cfg, metrics, readiness).await;
    }
    // A follower is ready: it serves probes and waits to take over.
    readiness.set(true);
    if controls.ignore_leadership {
        return run_ignoring_leadership(client, cfg, metrics, readiness, election).await;
    }
    tracing::info!(identity = %election.identity, lease = %election.name, namespace = %election.namespace, "waiting for leadership");
    let leadership = tokio::select! {
        l = election.acquire(client.clone()) => l?,
        _ = shutdown_signal() => return Ok(()),
    };
    lead(client, cfg, metrics, readiness, leadership, controls).await
}

/// The chaos build's `non-leader-writes` control: the election runs (and the leader
/// gauge tells the truth) but the controller does not wait for it. Never chosen in the
/// product build ([`chaos::controls`] is all off there).
async fn run_ignoring_leadership(
    client: Client,
    cfg: RunConfig,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    election: crate::leader::ElectionConfig,
) -> Result<(), RunError> {
    let elect = async {
        if let Ok(mut l) = election.acquire(client.clone()).await {
            metrics.leader.set(1);
            l.lost().await;
            metrics.leader.set(0);
        }
        std::future::pending::<()>().await
    };
    let run = controller(
        client.clone(),
        cfg,
        metrics.clone(),
        readiness,
        Term::unbounded(),
    );
    tokio::select! {
        res = run => res,
        _ = elect => Ok(()),
        _ = shutdown_signal() => Ok(()),
    }
}

/// Eight hex digits that differ between processes (the standard library's randomly
/// seeded hasher, over the pid and the time).
fn unique_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{:08x}", h.finish() as u32)
}

fn election_config(cfg: &RunConfig) -> crate::leader::ElectionConfig {
    crate::leader::ElectionConfig {
        namespace: cfg.leader_namespace.clone().unwrap_or_else(own_namespace),
        name: cfg.leader_lease_name.clone(),
        identity: cfg.identity(),
        lease_duration: cfg.leader_lease_duration,
        renew_deadline: cfg.leader_renew_deadline,
        retry_period: cfg.leader_retry_period,
    }
}

/// Without leader election: run until a signal, then end the term and drain.
async fn run_alone(
    client: Client,
    cfg: RunConfig,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
) -> Result<(), RunError> {
    let term = Term::unbounded();
    let (stop, stopped) = watch::channel(false);
    let ctl = controller_until(client, cfg, metrics, readiness, term.clone(), stopped);
    tokio::pin!(ctl);
    tokio::select! {
        res = &mut ctl => res,
        _ = shutdown_signal() => {
            tracing::info!("shutting down: term ended, draining in-flight reconciles");
            term.end();
            let _ = stop.send(true);
            ctl.await
        }
    }
}

/// What ended a leader's run.
enum Ending {
    /// The controller stopped by itself (the caches never synced, a watch ended).
    Stopped(Result<(), RunError>),
    /// Renewal failed past the deadline, or another replica took the Lease.
    Lost,
    /// SIGTERM or SIGINT.
    Signal,
}

/// Leads until the controller stops, leadership is lost, or a signal comes; then, in
/// this order: the term ends (nothing is written from here on), in-flight reconciles
/// are drained, and only then is the leadership Lease released, so that no write can
/// follow a successor's first.
async fn lead(
    client: Client,
    cfg: RunConfig,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    mut leadership: crate::leader::Leadership,
    controls: chaos::Controls,
) -> Result<(), RunError> {
    metrics.leader.set(1);
    // A new leader is not ready until its caches are synced.
    readiness.set(false);
    let term = leadership.term();
    let (stop, stopped) = watch::channel(false);
    let ctl = controller_until(
        client,
        cfg,
        metrics.clone(),
        readiness.clone(),
        term.clone(),
        stopped,
    );
    tokio::pin!(ctl);
    let ending = tokio::select! {
        res = &mut ctl => Ending::Stopped(res),
        _ = leadership.lost() => Ending::Lost,
        _ = shutdown_signal() => Ending::Signal,
    };
    let result = match ending {
        Ending::Stopped(res) => {
            // The controller drained itself before it returned.
            term.end();
            if let Err(RunError::CacheSyncTimeout(_)) = &res {
                metrics
                    .step_downs
                    .get_or_create(&ReasonLabel {
                        reason: "CacheSyncTimeout".into(),
                    })
                    .inc();
            }
            tracing::error!("stepping down: releasing leadership so that another replica can lead");
            leadership.release().await;
            res
        }
        Ending::Lost => {
            if controls.work_on_after_loss {
                tracing::warn!("CHAOS: lost leadership; working on for 2 s");
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut ctl).await;
            }
            term.end();
            let _ = stop.send(true);
            let _ = ctl.await;
            Err(RunError::LeadershipLost)
        }
        Ending::Signal if controls.release_before_drain => {
            // The chaos build's sloppy shutdown: leadership released first, while the
            // controller keeps running (polled here) for what is left of its term.
            let sloppy = async {
                leadership.release().await;
                let left = term.remaining().unwrap_or(Duration::from_secs(1));
                tracing::warn!(
                    ?left,
                    "CHAOS: released leadership before draining; working on"
                );
                tokio::time::sleep(left.min(Duration::from_secs(10))).await;
            };
            tokio::select! {
                _ = sloppy => {}
                _ = &mut ctl => {}
            }
            term.end();
            let _ = stop.send(true);
            let _ = (&mut ctl).await;
            Ok(())
        }
        Ending::Signal => {
            tracing::info!("shutting down: term ended, draining in-flight reconciles, then handing leadership over");
            term.end();
            let _ = stop.send(true);
            let _ = ctl.await;
            leadership.release().await;
            Ok(())
        }
    };
    metrics.leader.set(0);
    readiness.set(false);
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
/// (never, in practice), the caches do not sync in time, or the future is dropped. It
/// writes only while `term` is current ([`Term::unbounded`] without leader election).
pub async fn controller(
    client: Client,
    cfg: RunConfig,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    term: Term,
) -> Result<(), RunError> {
    let (_never, stopped) = watch::channel(false);
    controller_until(client, cfg, metrics, readiness, term, stopped).await
}

/// [`controller`] until `stop` turns true; then it stops taking work, waits for the
/// reconciles in flight (up to `--drain-timeout`) and returns `Ok`. End the term before
/// stopping it, so that what is still in flight writes nothing more.
pub async fn controller_until(
    client: Client,
    cfg: RunConfig,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    term: Term,
    stop: watch::Receiver<bool>,
) -> Result<(), RunError> {
    start_counters_at_zero(&metrics);
    let proof_ns = cfg.leader_namespace.clone().unwrap_or_else(own_namespace);
    let proof =
        super::proof::ProofKey::load(client.clone(), &proof_ns, &cfg.proof_key_secret).await?;
    let (ctx, writers) = context(client.clone(), &cfg, metrics, term, proof);
    tokio::select! {
        res = watch_all(ctx.clone(), client, &cfg, writers) => res,
        res = dispatch(ctx, readiness, &cfg, stop) => res,
    }
}

/// The reflectors' write ends, one per watch.
struct Writers {
    claims: reflector::store::Writer<LockClaim>,
    managed: reflector::store::Writer<Lease>,
    takeover: reflector::store::Writer<Lease>,
    locks: reflector::store::Writer<Lock>,
    pods: Option<reflector::store::Writer<Pod>>,
    services: Option<reflector::store::Writer<Service>>,
    slices: Option<reflector::store::Writer<EndpointSlice>>,
}

/// The controller's shared state, with empty caches and their write ends.
fn context(
    client: Client,
    cfg: &RunConfig,
    metrics: Arc<Metrics>,
    term: Term,
    proof: super::proof::ProofKey,
) -> (Arc<Context>, Writers) {
    let (claims, claim_writer) = reflector::store();
    let (managed, managed_writer) = reflector::store();
    let (takeover, takeover_writer) = reflector::store();
    let (locks, lock_writer) = reflector::store();
    let (pods, pod_writer) = optional_store(cfg.pods);
    let (services, service_writer) = optional_store(cfg.routes);
    let (slices, slice_writer) = optional_store(cfg.routes);
    let reporter = Reporter {
        controller: crate::api::MANAGER.into(),
        instance: Some(cfg.identity()),
    };
    let writer = Writer::new(client.clone(), term, metrics.clone(), Some(cfg.identity()));
    let events = super::events::EventSink::start(
        writer.clone(),
        reporter.clone(),
        metrics.clone(),
        cfg.event_qps,
        cfg.event_burst,
    );
    let ctx = Arc::new(Context {
        reporter,
        events,
        client,
        metrics,
        claims,
        leases: [managed, takeover],
        locks,
        slots: Mutex::default(),
        index: Mutex::default(),
        keys: Mutex::default(),
        queue: Arc::new(WorkQueue::with_group_limit(cfg.namespace_concurrency)),
        invalid: Mutex::default(),
        config: arbiter::Config {
            gc_grace: cfg.gc_grace,
            exact_positions: cfg.queue_positions,
            position_delay: cfg.queue_position_delay,
            pods: cfg.pods,
        },
        origin: Instant::now(),
        writer,
        proof,
        pods,
        heartbeats: Default::default(),
        pod_warned: Mutex::default(),
        services,
        slices,
    });
    let writers = Writers {
        claims: claim_writer,
        managed: managed_writer,
        takeover: takeover_writer,
        locks: lock_writer,
        pods: pod_writer,
        services: service_writer,
        slices: slice_writer,
    };
    (ctx, writers)
}

/// A cache and its write end, if `on`.
fn optional_store<K>(
    on: bool,
) -> (
    Option<reflector::Store<K>>,
    Option<reflector::store::Writer<K>>,
)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    if !on {
        return (None, None);
    }
    let (s, w) = reflector::store();
    (Some(s), Some(w))
}

/// Runs every watch; returns (an error) only if one ends.
async fn watch_all(
    ctx: Arc<Context>,
    client: Client,
    cfg: &RunConfig,
    w: Writers,
) -> Result<(), RunError> {
    fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let ns = cfg.watch_namespace.as_deref();
    let lease_api = api::<DeserializeGuard<Lease>>(&client, ns);
    let [managed_sel, takeover_sel] = watches::lease_selectors();
    let pods = async {
        match w.pods {
            Some(writer) => {
                let heartbeats =
                    Api::namespaced(client.clone(), super::pod_watch::NODE_LEASE_NAMESPACE);
                tokio::join!(
                    super::pod_watch::watch_pods(ctx.clone(), api(&client, ns), writer),
                    super::pod_watch::watch_heartbeats(ctx.clone(), heartbeats),
                );
            }
            None => std::future::pending().await,
        }
    };
    let routes = async {
        match (w.services, w.slices) {
            (Some(services), Some(slices)) => {
                tokio::join!(
                    super::routes::watch_services(ctx.clone(), api(&client, ns), services),
                    super::routes::watch_slices(api(&client, ns), slices),
                );
            }
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = routes => Err(RunError::WatchEnded("Service")),
        _ = watches::watch_claims(ctx.clone(), api(&client, ns), w.claims) => Err(RunError::WatchEnded("LockClaim")),
        _ = watches::watch_leases(ctx.clone(), lease_api.clone(), managed_sel, w.managed) => Err(RunError::WatchEnded("Lease")),
        _ = watches::watch_leases(ctx.clone(), lease_api, takeover_sel, w.takeover) => Err(RunError::WatchEnded("Lease")),
        _ = watches::watch_locks(ctx.clone(), api(&client, ns), w.locks) => Err(RunError::WatchEnded("Lock")),
        _ = pods => Err(RunError::WatchEnded("Pod")),
    }
}

/// Counters by reason exist from the start, at zero, so that rates work from the start.
fn start_counters_at_zero(metrics: &Metrics) {
    for reason in Error::reasons() {
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

/// Once both caches are synced (then the process is ready; not within
/// `--cache-sync-timeout`: an error), hands each due Lease key to a reconcile until
/// `stop`, then drains.
async fn dispatch(
    ctx: Arc<Context>,
    readiness: Arc<Readiness>,
    cfg: &RunConfig,
    stop: watch::Receiver<bool>,
) -> Result<(), RunError> {
    let synced = async {
        let [managed, takeover] = &ctx.leases;
        let pods = async {
            let pods = match &ctx.pods {
                Some(p) => p.wait_until_ready().await.is_ok(),
                None => true,
            };
            let services = match &ctx.services {
                Some(s) => s.wait_until_ready().await.is_ok(),
                None => true,
            };
            let slices = match &ctx.slices {
                Some(s) => s.wait_until_ready().await.is_ok(),
                None => true,
            };
            pods && services && slices
        };
        let (a, b, c, d, e) = tokio::join!(
            ctx.claims.wait_until_ready(),
            managed.wait_until_ready(),
            takeover.wait_until_ready(),
            ctx.locks.wait_until_ready(),
            pods,
        );
        a.is_ok() && b.is_ok() && c.is_ok() && d.is_ok() && e
    };
    match tokio::time::timeout(cfg.cache_sync_timeout, synced).await {
        Ok(true) => {}
        Ok(false) => return Err(RunError::WatchEnded("cache")),
        Err(_) => {
            let e = RunError::CacheSyncTimeout(cfg.cache_sync_timeout);
            tracing::error!(error = %e, "caches did not sync");
            return Err(e);
        }
    }
    readiness.set(true);
    tracing::info!("caches synced; reconciling");
    let work = {
        let ctx = ctx.clone();
        move |key: LeaseKey| {
            let ctx = ctx.clone();
            async move { reconcile_key(&ctx, &key).await }
        }
    };
    let on_panic = {
        let ctx = ctx.clone();
        move |key: &LeaseKey| reconcile_panicked(&ctx, key)
    };
    let drained = worker::serve(
        ctx.queue.clone(),
        cfg.concurrency,
        stop,
        cfg.drain_timeout,
        work,
        on_panic,
    )
    .await;
    if !drained {
        tracing::warn!(timeout = ?cfg.drain_timeout, "reconciles still in flight after the drain timeout (their term has ended: they write nothing more)");
    }
    Ok(())
}

/// Waits until the LockClaim CRD is Established (instead of crash-looping before it is).
pub async fn wait_for_crd(client: Client, timeout: Duration) -> Result<(), RunError> {
    let deadline = tokio::time::Instant::now() + timeout;
    for name in [LockClaim::crd_name(), crate::api::Lock::crd_name()] {
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        tracing::info!(crd = name, "waiting for the CRD to be established");
        match tokio::time::timeout_at(
            deadline,
            await_condition(crds, name, conditions::is_crd_established()),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(RunError::CrdWatch(e)),
            Err(_) => {
                return Err(RunError::CrdNotEstablished {
                    name: name.to_string(),
                    timeout,
                })
            }
        }
    }
    Ok(())
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
