//! kube-runtime wiring: watches, the per-Lease work queue, and the reconcile that reads
//! state, asks the [`crate::arbiter`] and performs its decisions in the safe order.

mod execute;
pub mod queue;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use tokio::time::Instant;

pub use execute::Error;

use crate::api::LockClaim;
use crate::arbiter::{self, Memory, Outcome};
use crate::leader::Term;
use crate::telemetry::{self, Metrics, NamespaceLabel, Readiness, ReasonLabel};
use queue::WorkQueue;
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
    Telemetry(#[from] telemetry::TelemetryError),
    /// A watch stream ended, which only happens when the process is stopping.
    #[error("the {0} watch ended")]
    WatchEnded(&'static str),
    /// Applying the CRD failed.
    #[error("cannot apply the LockClaim CRD: {0}")]
    CrdInstall(#[source] kube::Error),
    /// Leader election failed.
    #[error(transparent)]
    Election(#[from] crate::leader::ElectionError),
    /// This replica lost leadership: it stopped writing and exits so it restarts clean.
    #[error("lost leadership; exiting so that this replica restarts clean")]
    LeadershipLost,
}

/// Flags of `leasekeeper run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunConfig {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "LEASEKEEPER_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Delete a managed Lease that no live claim has named for this long.
    #[arg(long, env = "LEASEKEEPER_GC_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub gc_grace: Duration,
    /// Address of the /healthz, /readyz and /metrics server.
    #[arg(long, env = "LEASEKEEPER_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// How long to wait for the LockClaim CRD to be Established before giving up.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub crd_wait: Duration,
    /// Reconciles of different Leases that may run at once.
    #[arg(long, env = "LEASEKEEPER_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,
    /// Name of this replica, for Events and leader election (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Elect one active replica through a Lease; the others wait and take over.
    #[arg(long, env = "LEASEKEEPER_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Namespace of the leadership Lease (default: the Pod's namespace, else "default").
    #[arg(long, env = "POD_NAMESPACE")]
    pub leader_namespace: Option<String>,
    /// Name of the leadership Lease.
    #[arg(long, default_value = "leasekeeper-leader")]
    pub leader_lease_name: String,
    /// Leadership term without renewal.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub leader_lease_duration: Duration,
    /// A leader that has not renewed for this long stops and exits (< the term).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub leader_renew_deadline: Duration,
    /// How often the leader renews.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub leader_retry_period: Duration,
}

impl RunConfig {
    fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME")
                .unwrap_or_else(|_| format!("leasekeeper-{}", std::process::id()))
        })
    }
}

/// Negative controls of the chaos run: deliberately broken behaviour, compiled only
/// with the `chaos-negative-controls` feature and chosen by `LEASEKEEPER_BREAK`.
#[cfg(feature = "chaos-negative-controls")]
pub(crate) fn broken(what: &str) -> bool {
    std::env::var("LEASEKEEPER_BREAK").is_ok_and(|v| v.split(',').any(|x| x == what))
}

/// Without the `chaos-negative-controls` feature nothing is ever broken.
#[cfg(not(feature = "chaos-negative-controls"))]
#[inline(always)]
pub(crate) fn broken(_what: &str) -> bool {
    false
}

/// Fault injection of the chaos run (chaos build only): on SIGUSR1 this replica stops
/// taking in Lease watch events for `LEASEKEEPER_CHAOS_LEASE_WATCH_STALL` (default 3 s),
/// then takes in what queued up, late: a lagging watch, as after a slow watch cache or
/// a stuck stream. Its Lease cache is stale meanwhile, while API calls still work.
#[cfg(feature = "chaos-negative-controls")]
mod chaos_stall {
    use std::sync::Mutex;
    use std::time::Duration;
    use tokio::time::Instant;

    static UNTIL: Mutex<Option<Instant>> = Mutex::new(None);

    pub(super) fn arm() {
        let stall = std::env::var("LEASEKEEPER_CHAOS_LEASE_WATCH_STALL")
            .ok()
            .and_then(|v| humantime::parse_duration(&v).ok())
            .unwrap_or(Duration::from_secs(3));
        let Ok(mut sig) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        else {
            return;
        };
        tokio::spawn(async move {
            while sig.recv().await.is_some() {
                tracing::warn!(?stall, "CHAOS: stalling the Lease watch");
                if let Ok(mut u) = UNTIL.lock() {
                    *u = Some(Instant::now() + stall);
                }
            }
        });
    }

    pub(super) async fn point() {
        let until = UNTIL.lock().ok().and_then(|u| *u);
        if let Some(t) = until.filter(|t| *t > Instant::now()) {
            tokio::time::sleep_until(t).await;
        }
    }
}

#[cfg(not(feature = "chaos-negative-controls"))]
mod chaos_stall {
    #[inline(always)]
    pub(super) fn arm() {}
    #[inline(always)]
    pub(super) async fn point() {}
}

/// The key of one arbitration: a Lease name in a namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    /// Namespace of the claims and the Lease.
    pub namespace: String,
    /// The Lease name.
    pub name: String,
}

/// What this process keeps per Lease between reconciles.
#[derive(Default)]
struct KeyState {
    memory: Memory,
    /// resourceVersions our last writes produced: a cache older than these is stale.
    lease_rv: Option<u64>,
    claim_rvs: HashMap<String, u64>,
    failures: u32,
    waiting: usize,
}

/// Shared state of the controller.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Who publishes Events (this controller and replica).
    pub reporter: Reporter,
    claims: Store<LockClaim>,
    leases: Store<Lease>,
    /// Claim names per Lease key (leaseName is immutable, so this only grows and shrinks).
    index: Mutex<HashMap<LeaseKey, HashSet<String>>>,
    keys: Mutex<HashMap<LeaseKey, KeyState>>,
    queue: WorkQueue<LeaseKey>,
    config: arbiter::Config,
    origin: Instant,
    /// The leadership term writes are made under.
    term: Term,
}

impl Context {
    /// Monotonic time since the controller started.
    pub fn mono(&self) -> Duration {
        self.origin.elapsed()
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseKey, KeyState>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn index(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseKey, HashSet<String>>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs the operator until it fails or receives SIGINT/SIGTERM.
pub async fn run(cfg: RunConfig) -> Result<(), RunError> {
    chaos_stall::arm();
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
    if broken("non-leader-writes") {
        // The election still runs (and the leader gauge tells the truth); the
        // controller just does not wait for it.
        tracing::warn!("NEGATIVE CONTROL: acting without leadership");
        let elect = async {
            if let Ok(mut l) = election.clone().acquire(client.clone()).await {
                metrics.leader.set(1);
                l.lost().await;
                metrics.leader.set(0);
            }
            std::future::pending::<()>().await
        };
        return tokio::select! {
            res = controller(client.clone(), cfg, metrics.clone(), readiness, Term::unbounded()) => res,
            _ = elect => Ok(()),
            _ = shutdown_signal() => Ok(()),
        };
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
    for reason in Error::REASONS {
        metrics
            .reconcile_errors
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc_by(0);
    }
    for reason in [
        arbiter::reason::EXPIRED,
        arbiter::reason::MAX_HOLD_EXCEEDED,
        arbiter::reason::LEASE_LOST,
    ] {
        metrics
            .expiries
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc_by(0);
    }
    let (claims, claim_writer) = reflector::store();
    let (leases, lease_writer) = reflector::store();
    let reporter = Reporter {
        controller: crate::MANAGER.into(),
        instance: Some(cfg.identity()),
    };
    let ctx = Arc::new(Context {
        reporter,
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
                chaos_stall::point().await;
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

    let c = ctx.clone();
    let dispatcher = async move {
        let (a, b) = tokio::join!(c.claims.wait_until_ready(), c.leases.wait_until_ready());
        if a.is_err() || b.is_err() {
            return;
        }
        readiness.set(true);
        tracing::info!("caches synced; reconciling");
        let permits = Arc::new(tokio::sync::Semaphore::new(cfg.concurrency.max(1)));
        loop {
            let key = c.queue.next().await;
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let c = c.clone();
            tokio::spawn(async move {
                reconcile_key(&c, &key).await;
                c.queue.done(&key);
                drop(permit);
            });
        }
    };
    tokio::select! {
        _ = claim_watch => Err(RunError::WatchEnded("LockClaim")),
        _ = lease_watch => Err(RunError::WatchEnded("Lease")),
        _ = dispatcher => Err(RunError::WatchEnded("cache")),
    }
}

fn claim_seen(ctx: &Context, claim: &LockClaim, deleted: bool) {
    let Some(namespace) = claim.namespace() else {
        return;
    };
    let key = LeaseKey {
        namespace,
        name: claim.spec.lease_name.clone(),
    };
    if let Some(s) = ctx.keys().get_mut(&key) {
        let name = claim.name_any();
        let mut w = s.claim_rvs.get(&name).copied();
        caught_up(&mut w, claim.resource_version(), deleted);
        if w.is_none() {
            s.claim_rvs.remove(&name);
        }
    }
    {
        let mut index = ctx.index();
        let names = index.entry(key.clone()).or_default();
        if deleted {
            names.remove(&claim.name_any());
        } else {
            names.insert(claim.name_any());
        }
    }
    ctx.queue.now(key);
}

/// Drops what the arbiter never reads before an object enters the cache:
/// managedFields are most of an object's size (and of the operator's memory).
fn slim<K: kube::Resource>(o: &mut K) {
    o.meta_mut().managed_fields = None;
}

/// Once the watch delivers our own write (or anything later), the cache has caught up.
fn caught_up(written: &mut Option<u64>, seen: Option<String>, deleted: bool) {
    let seen = seen.and_then(|v| v.parse::<u64>().ok());
    if deleted || written.is_some_and(|w| seen.is_some_and(|r| r >= w)) {
        *written = None;
    }
}

fn lease_seen(ctx: &Context, lease: &Lease, deleted: bool) {
    let Some(namespace) = lease.namespace() else {
        return;
    };
    let key = LeaseKey {
        namespace,
        name: lease.name_any(),
    };
    if let Some(s) = ctx.keys().get_mut(&key) {
        caught_up(&mut s.lease_rv, lease.resource_version(), deleted);
    }
    // Leases nobody claims and we did not create (node heartbeats, other controllers'
    // leader election) are not our business.
    let relevant = arbiter::is_managed(lease)
        || ctx.index().get(&key).is_some_and(|n| !n.is_empty())
        || ctx.keys().contains_key(&key);
    if relevant {
        ctx.queue.now(key);
    }
}

/// Backoff after failures: conflicts retry fast (the cache usually just lags).
fn backoff(failures: u32, conflict: bool) -> Duration {
    let base = if conflict { 20 } else { 200 };
    let cap = if conflict { 2_000 } else { 30_000 };
    Duration::from_millis((base << failures.min(10)).min(cap))
}

async fn reconcile_key(ctx: &Arc<Context>, key: &LeaseKey) {
    ctx.metrics.reconciles.inc();
    let started = ctx.mono();
    let next = match reconcile(ctx, key).await {
        Ok(next) => {
            if let Some(s) = ctx.keys().get_mut(key) {
                s.failures = 0;
            }
            next
        }
        Err(e) => {
            let failures = {
                let mut keys = ctx.keys();
                let s = keys.entry(key.clone()).or_default();
                s.failures = s.failures.saturating_add(1);
                s.failures
            };
            ctx.metrics
                .reconcile_errors
                .get_or_create(&ReasonLabel {
                    reason: e.reason().to_string(),
                })
                .inc();
            if e.is_conflict() {
                tracing::debug!(namespace = %key.namespace, lease = %key.name, error = %e, "conflict; re-reading");
            } else {
                tracing::warn!(namespace = %key.namespace, lease = %key.name, error = %e, reason = e.reason(), "reconcile failed; backing off");
            }
            Some(backoff(failures - 1, e.is_conflict()))
        }
    };
    tracing::trace!(namespace = %key.namespace, lease = %key.name, took_us = (ctx.mono() - started).as_micros() as u64, "reconciled");
    if let Some(after) = next {
        ctx.queue.schedule(key.clone(), Instant::now() + after);
    }
}

/// Reads the state of one Lease key, decides, and writes. Returns when to look again.
async fn reconcile(ctx: &Arc<Context>, key: &LeaseKey) -> Result<Option<Duration>, Error> {
    let names: Vec<String> = ctx
        .index()
        .get(key)
        .map(|n| n.iter().cloned().collect())
        .unwrap_or_default();
    let claims: Vec<Arc<LockClaim>> = names
        .iter()
        .filter_map(|n| ctx.claims.get(&ObjectRef::new(n).within(&key.namespace)))
        .filter(|c| c.spec.lease_name == key.name)
        .collect();
    let lease = ctx
        .leases
        .get(&ObjectRef::new(&key.name).within(&key.namespace));

    // A cache older than our own last writes would only produce refused writes: wait
    // for the watch to deliver them (it triggers this key again).
    let (memory, stale) = {
        let keys = ctx.keys();
        let state = keys.get(key);
        let rv = |o: Option<String>| o.and_then(|v| v.parse::<u64>().ok());
        let stale = state.is_some_and(|s| {
            let lease_behind = s.lease_rv.is_some_and(|w| {
                // Absent from the cache although we wrote it: the watch has not caught up.
                rv(lease.as_ref().and_then(|l| l.resource_version())).is_none_or(|r| r < w)
            });
            let claim_behind = claims.iter().any(|c| {
                s.claim_rvs
                    .get(&c.name_any())
                    .is_some_and(|w| rv(c.resource_version()).is_some_and(|r| r < *w))
            });
            lease_behind || claim_behind
        });
        (state.map(|s| s.memory.clone()).unwrap_or_default(), stale)
    };
    if stale {
        tracing::debug!(namespace = %key.namespace, lease = %key.name, "cache behind our last write; waiting for the watch");
        return Ok(Some(Duration::from_secs(1)));
    }

    let (claims, lease) = if broken("skip-lock-delay") {
        let claims: Vec<Arc<LockClaim>> = claims
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
    } else {
        (claims, lease)
    };
    let now = arbiter::Now {
        wall: jiff::Timestamp::now(),
        mono: ctx.mono(),
    };
    let refs: Vec<&LockClaim> = claims.iter().map(|c| c.as_ref()).collect();
    let plan = arbiter::decide(&arbiter::Input {
        lease_name: &key.name,
        claims: &refs,
        lease: lease.as_deref(),
        memory: &memory,
        now,
        config: ctx.config,
    });

    let written = if plan.steps.is_empty() {
        execute::Written::default()
    } else {
        execute::execute(ctx, key, &plan, &claims, lease.as_deref()).await?
    };
    record(ctx, key, &plan);

    let mut keys = ctx.keys();
    let forget = !plan.has_live_claims
        && (written.lease_deleted || lease.as_ref().is_none_or(|l| !arbiter::is_managed(l)));
    if forget {
        if let Some(s) = keys.remove(key) {
            adjust_queue_depth(ctx, key, s.waiting, 0);
        }
        drop(keys);
        let mut index = ctx.index();
        if index.get(key).is_some_and(HashSet::is_empty) {
            index.remove(key);
        }
        return Ok(plan.requeue_after);
    }
    let state = keys.entry(key.clone()).or_default();
    state.memory = plan.memory.clone();
    if let Some(at) = written.granted_at {
        state.memory.rebase_grant(at);
    }
    if written.lease.is_some() || written.lease_deleted {
        state.lease_rv = written.lease;
    }
    state
        .claim_rvs
        .retain(|n, _| claims.iter().any(|c| c.name_any() == *n));
    state.claim_rvs.extend(written.claims);
    let before = std::mem::replace(&mut state.waiting, plan.waiting);
    drop(keys);
    adjust_queue_depth(ctx, key, before, plan.waiting);
    Ok(plan.requeue_after)
}

fn adjust_queue_depth(ctx: &Context, key: &LeaseKey, before: usize, after: usize) {
    if before != after {
        let g = ctx.metrics.queue_depth.get_or_create(&NamespaceLabel {
            namespace: key.namespace.clone(),
        });
        g.inc_by(after as i64 - before as i64);
    }
}

fn record(ctx: &Context, key: &LeaseKey, plan: &arbiter::Plan) {
    let m = &ctx.metrics;
    for o in &plan.outcomes {
        match o {
            Outcome::Granted {
                waited,
                handoff,
                transition,
            } => {
                m.grants.inc();
                if let Some(w) = waited {
                    m.grant_latency.observe(w.as_secs_f64());
                }
                if let Some(h) = handoff {
                    m.handoff_latency.observe(h.as_secs_f64());
                }
                if *transition {
                    m.lease_transitions.inc();
                }
                tracing::info!(namespace = %key.namespace, lease = %key.name, "granted");
            }
            Outcome::Released => {
                m.releases.inc();
            }
            Outcome::Expired(r) => {
                m.expiries
                    .get_or_create(&ReasonLabel {
                        reason: (*r).to_string(),
                    })
                    .inc();
                tracing::info!(namespace = %key.namespace, lease = %key.name, reason = r, "grant expired");
            }
            Outcome::GarbageCollected => {
                m.gc_deleted.inc();
                tracing::info!(namespace = %key.namespace, lease = %key.name, "garbage-collected Lease");
            }
        }
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
