//! Logging (tracing, text or JSON), Prometheus metrics and the probe server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

mod auth;
mod tls;

pub use auth::{bearer, Authorizer, Verdict, METRICS_PATH};

/// Who may read `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsAuth {
    /// Anyone who reaches the port (plain HTTP).
    None,
    /// Callers whose bearer token the API server authenticates (TokenReview) and RBAC
    /// allows `get` on the non-resource URL /metrics (SubjectAccessReview); over HTTPS.
    Rbac,
}

/// Where and how the probe and metrics servers listen.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The /metrics address (also /healthz and /readyz unless `probe_addr` is set).
    pub metrics_addr: SocketAddr,
    /// A separate plain-HTTP address for /healthz and /readyz.
    pub probe_addr: Option<SocketAddr>,
    /// Who may read /metrics.
    pub auth: MetricsAuth,
    /// tls.crt and tls.key for the HTTPS of protected metrics (else self-signed).
    pub cert_dir: Option<std::path::PathBuf>,
}

/// Errors of the telemetry layer.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter could not be parsed.
    #[error("invalid log level/filter {filter:?}: {source}")]
    BadFilter {
        /// The filter as given.
        filter: String,
        /// Why it was refused.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was installed already.
    #[error("logging was initialised twice")]
    AlreadyInitialised,
    /// The probe server could not bind its address.
    #[error("cannot bind the metrics/probe address {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTPS of protected metrics could not be set up.
    #[error("metrics TLS: {0}")]
    Tls(String),
    /// Protected metrics need the probes on a port of their own.
    #[error("--metrics-auth rbac needs --probe-addr: kubelet's probes carry no token, so /healthz and /readyz must be served apart from the protected /metrics")]
    ProbesNeedTheirOwnPort,
}

/// Installs the global tracing subscriber. `RUST_LOG`, when set, wins over `level`.
pub fn init_logging(format: LogFormat, level: &str) -> Result<(), TelemetryError> {
    let filter_text = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let filter = EnvFilter::try_new(&filter_text).map_err(|source| TelemetryError::BadFilter {
        filter: filter_text.clone(),
        source,
    })?;
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|_| TelemetryError::AlreadyInitialised)
}

/// Label set carrying one `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A stable PascalCase reason.
    pub reason: String,
}

/// Label set carrying one `namespace`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabel {
    /// The namespace.
    pub namespace: String,
}

/// Label set carrying an object `kind` (LockClaim, Lease).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The kind.
    pub kind: String,
}

/// Label set of a lock: its `namespace` and `lock` name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LockLabel {
    /// The namespace.
    pub namespace: String,
    /// The lock (its Lock object's name).
    pub lock: String,
}

/// Label set carrying a write `kind`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabel {
    /// What was written.
    pub kind: WriteKind,
}

/// The kinds of API writes the operator makes, counted so their cost stays visible.
/// Every one is made through `controller::writer`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue, strum::EnumIter)]
pub enum WriteKind {
    /// Lease create.
    LeaseCreate,
    /// Lease update that changes the holder.
    LeaseGrant,
    /// Lease update that only refreshes renewTime (Controller renewal).
    LeaseRenew,
    /// Lease update that clears the holder.
    LeaseClear,
    /// Lease delete (garbage collection).
    LeaseDelete,
    /// The proof of creation stamped on a Lease right after its create.
    LeaseProof,
    /// LockClaim status write.
    ClaimStatus,
    /// LockClaim finalizer add or remove.
    ClaimFinalizer,
    /// LockClaim delete (ttlSecondsAfterFinished).
    ClaimDelete,
    /// LockClaim create (the claim of a Pod labelled leasekeeper.io/lock).
    ClaimCreate,
    /// Pod patch opening a Pod granted its lock (gate removed, token written).
    PodOpen,
    /// EndpointSlice create, update or delete: a Service routed to a lock's holder.
    EndpointSlice,
    /// LockClaim status cleared because it could not be decoded.
    ClaimStatusClear,
    /// Lock status write.
    LockStatus,
    /// An Event published.
    Event,
}

/// Every metric the operator exports.
pub struct Metrics {
    /// Grants made.
    pub grants: Counter,
    /// Grants ended by release (delete or `release: true`).
    pub releases: Counter,
    /// Grants ended by expiry, by reason.
    pub expiries: Family<ReasonLabel, Counter>,
    /// Holder changes written to Leases.
    pub lease_transitions: Counter,
    /// Waiting claims, per namespace.
    pub queue_depth: Family<NamespaceLabel, Gauge>,
    /// Claims waiting although their lock has a free slot, per namespace.
    pub stalled_waiters: Family<NamespaceLabel, Gauge>,
    /// Claim creation to Granted.
    pub grant_latency: Histogram,
    /// Previous grant ended to next Granted.
    pub handoff_latency: Histogram,
    /// Reconcile errors, by reason.
    pub reconcile_errors: Family<ReasonLabel, Counter>,
    /// Reconciles run.
    pub reconciles: Counter,
    /// 1 while this replica is the leader (or leader election is off).
    pub leader: Gauge,
    /// Leases deleted by garbage collection.
    pub gc_deleted: Counter,
    /// API writes, by kind.
    pub writes: Family<WriteLabel, Counter>,
    /// API writes made while this replica did not lead (must stay 0 with leader election).
    pub writes_not_leading: Counter,
    /// Objects the watches delivered that cannot be decoded, now.
    pub invalid_objects: Family<KindLabel, Gauge>,
    /// Times this replica gave up leadership on purpose, by reason.
    pub step_downs: Family<ReasonLabel, Counter>,
    /// Events dropped because the publishing queue was full.
    pub events_dropped: Counter,
    /// Waiting claims that gave up (acquireTimeoutSeconds).
    pub acquire_timeouts: Counter,
    /// Claims holding each lock that has a Lock object.
    pub lock_held: Family<LockLabel, Gauge>,
    /// Claims waiting for each lock that has a Lock object.
    pub lock_waiting: Family<LockLabel, Gauge>,
    /// Watch events received, by kind (what the rest of the cluster costs the operator).
    pub watch_events: Family<KindLabel, Counter>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let buckets = || {
            Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 300.0,
            ])
        };
        let mut m = Metrics {
            grants: Counter::default(),
            releases: Counter::default(),
            expiries: Family::default(),
            lease_transitions: Counter::default(),
            queue_depth: Family::default(),
            stalled_waiters: Family::default(),
            grant_latency: buckets(),
            handoff_latency: buckets(),
            reconcile_errors: Family::default(),
            reconciles: Counter::default(),
            leader: Gauge::default(),
            gc_deleted: Counter::default(),
            writes: Family::default(),
            writes_not_leading: Counter::default(),
            invalid_objects: Family::default(),
            step_downs: Family::default(),
            events_dropped: Counter::default(),
            watch_events: Family::default(),
            acquire_timeouts: Counter::default(),
            lock_held: Family::default(),
            lock_waiting: Family::default(),
            registry: Registry::with_prefix("leasekeeper"),
        };
        let r = &mut m.registry;
        r.register("grants", "Lease grants made", m.grants.clone());
        r.register(
            "releases",
            "Grants ended by a clean release",
            m.releases.clone(),
        );
        r.register(
            "expiries",
            "Grants ended by expiry, by reason",
            m.expiries.clone(),
        );
        r.register(
            "lease_transitions",
            "Holder changes written to Leases",
            m.lease_transitions.clone(),
        );
        r.register(
            "queue_depth",
            "Claims waiting, per namespace",
            m.queue_depth.clone(),
        );
        r.register(
            "stalled_waiters",
            "Claims waiting although their lock has a free slot (lock delay, or grants that keep failing), per namespace",
            m.stalled_waiters.clone(),
        );
        r.register(
            "grant_latency_seconds",
            "Seconds from claim creation to Granted",
            m.grant_latency.clone(),
        );
        r.register(
            "handoff_latency_seconds",
            "Seconds from the end of one grant to the next Granted on the same Lease",
            m.handoff_latency.clone(),
        );
        r.register(
            "reconcile_errors",
            "Reconciles that failed, by reason",
            m.reconcile_errors.clone(),
        );
        r.register("reconciles", "Reconciles run", m.reconciles.clone());
        r.register("leader", "1 while this replica leads", m.leader.clone());
        r.register(
            "gc_deleted",
            "Leases deleted by garbage collection",
            m.gc_deleted.clone(),
        );
        r.register("api_writes", "API writes made, by kind", m.writes.clone());
        r.register(
            "writes_while_not_leading",
            "API writes made while this replica was not the leader",
            m.writes_not_leading.clone(),
        );
        r.register(
            "invalid_objects",
            "Objects the watches delivered that cannot be decoded (logged, with a Warning Event on a claim; a claim's status is repaired)",
            m.invalid_objects.clone(),
        );
        r.register(
            "leader_step_downs",
            "Times this replica gave leadership up on purpose, by reason (CacheSyncTimeout)",
            m.step_downs.clone(),
        );
        r.register(
            "events_dropped",
            "Events dropped because the rate-limited publishing queue was full",
            m.events_dropped.clone(),
        );
        r.register(
            "lock_held",
            "Claims holding the lock, for each lock with a Lock object (series removed with the Lock)",
            m.lock_held.clone(),
        );
        r.register(
            "lock_waiting",
            "Claims waiting for the lock, for each lock with a Lock object (series removed with the Lock)",
            m.lock_waiting.clone(),
        );
        r.register(
            "acquire_timeouts",
            "Waiting claims that were not granted within acquireTimeoutSeconds (try-lock included)",
            m.acquire_timeouts.clone(),
        );
        r.register(
            "watch_events",
            "Objects received from the watches, by kind (Leases only with leasekeeper's label or the takeover label)",
            m.watch_events.clone(),
        );
        for kind in ["LockClaim", "Lease"] {
            m.watch_events
                .get_or_create(&KindLabel { kind: kind.into() })
                .inc_by(0);
            m.invalid_objects
                .get_or_create(&KindLabel { kind: kind.into() })
                .set(0);
        }
        m.step_downs
            .get_or_create(&ReasonLabel {
                reason: "CacheSyncTimeout".into(),
            })
            .inc_by(0);
        m
    }

    /// Counts one write.
    pub fn write(&self, kind: WriteKind) {
        self.writes.get_or_create(&WriteLabel { kind }).inc();
        if self.leader.get() == 0 {
            self.writes_not_leading.inc();
        }
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail except on a formatter error, which String never raises.
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// What `/readyz` reports.
#[derive(Default)]
pub struct Readiness {
    ready: AtomicBool,
}

impl Readiness {
    /// Marks the process ready (connected, CRD established, caches synced) or not.
    pub fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
    /// Whether the process is ready.
    pub fn get(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct ProbeState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    authorizer: Option<Arc<Authorizer>>,
}

/// Starts the probe and metrics servers as `cfg` says; they run until the tasks are
/// dropped. `client` reviews scrapers' tokens under [`MetricsAuth::Rbac`].
pub async fn serve(
    cfg: &ServeConfig,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    client: Option<kube::Client>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, TelemetryError> {
    let authorizer = match (cfg.auth, client) {
        (MetricsAuth::Rbac, _) if cfg.probe_addr.is_none() => {
            return Err(TelemetryError::ProbesNeedTheirOwnPort)
        }
        (MetricsAuth::Rbac, Some(c)) => Some(Arc::new(Authorizer::new(c))),
        (MetricsAuth::Rbac, None) => {
            return Err(TelemetryError::Tls(
                "protected metrics need an API client".into(),
            ))
        }
        (MetricsAuth::None, _) => None,
    };
    let state = ProbeState {
        metrics,
        readiness,
        authorizer,
    };
    let probes = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz));
    let scrape = Router::new().route(METRICS_PATH, get(metrics_text));
    let mut tasks = Vec::new();
    match cfg.probe_addr {
        None => {
            let app = probes.merge(scrape).with_state(state);
            tasks.push(serve_plain(cfg.metrics_addr, app, "/healthz, /readyz and /metrics").await?);
        }
        Some(addr) => {
            tasks.push(
                serve_plain(
                    addr,
                    probes.with_state(state.clone()),
                    "/healthz and /readyz",
                )
                .await?,
            );
            let app = scrape.with_state(state);
            tasks.push(match cfg.auth {
                MetricsAuth::None => serve_plain(cfg.metrics_addr, app, "/metrics").await?,
                MetricsAuth::Rbac => serve_tls(cfg, app).await?,
            });
        }
    }
    Ok(tasks)
}

async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, TelemetryError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::Bind { addr, source })
}

async fn serve_plain(
    addr: SocketAddr,
    app: Router,
    what: &'static str,
) -> Result<tokio::task::JoinHandle<()>, TelemetryError> {
    let listener = bind(addr).await?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %local, "serving {what} over HTTP");
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "probe server stopped");
        }
    }))
}

async fn serve_tls(
    cfg: &ServeConfig,
    app: Router,
) -> Result<tokio::task::JoinHandle<()>, TelemetryError> {
    let acceptor = tls::acceptor(cfg.cert_dir.as_deref())?;
    let listener = bind(cfg.metrics_addr).await?;
    let local = listener.local_addr().unwrap_or(cfg.metrics_addr);
    tracing::info!(addr = %local, "serving /metrics over HTTPS to callers RBAC allows");
    Ok(tokio::spawn(tls::serve(listener, app, acceptor)))
}

async fn readyz(State(s): State<ProbeState>) -> impl IntoResponse {
    if s.readiness.get() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics_text(State(s): State<ProbeState>, headers: HeaderMap) -> Response {
    if let Some(authorizer) = &s.authorizer {
        let header = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match authorizer.check(header).await {
            Ok(Verdict::Allowed) => {}
            Ok(Verdict::Unauthenticated) => {
                return (StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response()
            }
            Ok(Verdict::Forbidden) => {
                return (
                    StatusCode::FORBIDDEN,
                    "Forbidden: RBAC does not allow get on /metrics\n",
                )
                    .into_response()
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot review a scraper's token");
                return (StatusCode::SERVICE_UNAVAILABLE, "cannot review the token\n")
                    .into_response();
            }
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}
