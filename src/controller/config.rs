//! The flags of `leasekeeper run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::telemetry::{MetricsAuth, ServeConfig};

/// Flags of `leasekeeper run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunConfig {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "LEASEKEEPER_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Delete a managed Lease that no live claim has named for this long.
    #[arg(long, env = "LEASEKEEPER_GC_GRACE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub gc_grace: Duration,
    /// Address of the /metrics server (and of /healthz and /readyz unless --probe-addr
    /// is set).
    #[arg(long, env = "LEASEKEEPER_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Address of a separate plain-HTTP server for /healthz and /readyz; the metrics
    /// address then serves /metrics only. Needed with --metrics-auth rbac.
    #[arg(long, env = "LEASEKEEPER_PROBE_ADDR")]
    pub probe_addr: Option<SocketAddr>,
    /// Who may read /metrics: `none` (whoever reaches the port, plain HTTP) or `rbac`
    /// (over HTTPS, callers whose bearer token the API server authenticates and whom
    /// RBAC allows `get` on the non-resource URL /metrics).
    #[arg(
        long,
        env = "LEASEKEEPER_METRICS_AUTH",
        value_enum,
        default_value = "none"
    )]
    pub metrics_auth: MetricsAuth,
    /// Directory holding tls.crt and tls.key for the HTTPS of protected metrics
    /// (default: a self-signed certificate made at start).
    #[arg(long, env = "LEASEKEEPER_METRICS_CERT_DIR")]
    pub metrics_cert_dir: Option<PathBuf>,
    /// How long to wait for the LockClaim CRD to be Established before giving up.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub crd_wait: Duration,
    /// Reconciles of different Leases that may run at once.
    #[arg(long, env = "LEASEKEEPER_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,
    /// Reconciles of one namespace that may run at once (namespaces are served in turn,
    /// so a busy one cannot take every slot from the others).
    #[arg(long, env = "LEASEKEEPER_NAMESPACE_CONCURRENCY", default_value_t = 8)]
    pub namespace_concurrency: usize,
    /// Name of this replica, for Events and leader election (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Elect one active replica through a Lease; the others wait and take over.
    #[arg(long, env = "LEASEKEEPER_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Namespace of the leadership Lease (default: the Pod's namespace, else "default").
    #[arg(long, env = "POD_NAMESPACE")]
    pub leader_namespace: Option<String>,
    /// The Secret (in the leadership Lease's namespace) holding the key of the proofs
    /// that the operator created a Lease; made at start if absent. Garbage collection
    /// deletes only Leases whose proof checks out.
    #[arg(
        long,
        env = "LEASEKEEPER_PROOF_KEY_SECRET",
        default_value = "leasekeeper-proof-key"
    )]
    pub proof_key_secret: String,
    /// Watch Pods labelled leasekeeper.io/lock and hold locks for them (claims of
    /// renewal Pod; needs get, list, watch and patch on Pods). false: the operator never
    /// touches Pods.
    #[arg(long, env = "LEASEKEEPER_PODS", default_value_t = true, action = clap::ArgAction::Set)]
    pub pods: bool,
    /// Keep an EndpointSlice listing the holder Pod(s) for each Service without a
    /// selector annotated leasekeeper.io/route-to-holder: LOCK (needs Services get, list,
    /// watch; EndpointSlices get, list, watch, create, update, delete; Pods get).
    #[arg(long, env = "LEASEKEEPER_ROUTES", default_value_t = true, action = clap::ArgAction::Set)]
    pub routes: bool,
    /// Name of the leadership Lease.
    #[arg(long, default_value = "leasekeeper-leader")]
    pub leader_lease_name: String,
    /// Leadership term without renewal.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub leader_lease_duration: Duration,
    /// A leader that has not renewed for this long stops and exits (< the term).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub leader_renew_deadline: Duration,
    /// A leader whose watch caches have not synced this long after it started leading
    /// steps down (releases the leadership Lease and exits) so that another replica can
    /// try; it is not Ready meanwhile.
    #[arg(long, env = "LEASEKEEPER_CACHE_SYNC_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub cache_sync_timeout: Duration,
    /// On shutdown or loss of leadership: the longest wait for in-flight reconciles
    /// (their term has ended, so they write nothing more) before the leadership Lease
    /// is released.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Waiters per Lease with an exact status.queuePosition; those further back show
    /// none (their condition says "more than N claims ahead"), so a handoff rewrites at
    /// most this many statuses.
    #[arg(long, env = "LEASEKEEPER_QUEUE_POSITIONS", default_value_t = 10)]
    pub queue_positions: u32,
    /// A waiter that only moved up is rewritten at most this long after the change, so a
    /// burst of handoffs rewrites a queue once (being next in line, moving back and
    /// every other change are written at once).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub queue_position_delay: Duration,
    /// Events published per second at most (they wait in a queue of four bursts; when
    /// that is full an Event is dropped and counted).
    #[arg(long, env = "LEASEKEEPER_EVENT_QPS", default_value_t = 50)]
    pub event_qps: u32,
    /// Events published at once before the rate applies.
    #[arg(long, env = "LEASEKEEPER_EVENT_BURST", default_value_t = 200)]
    pub event_burst: u32,
    /// How often the leader renews.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub leader_retry_period: Duration,
}

impl RunConfig {
    /// Where and how the probe and metrics servers listen.
    pub fn serve_config(&self) -> ServeConfig {
        ServeConfig {
            metrics_addr: self.metrics_addr,
            probe_addr: self.probe_addr,
            auth: self.metrics_auth,
            cert_dir: self.metrics_cert_dir.clone(),
        }
    }

    /// This replica's name: --identity, else the host name.
    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME")
                .unwrap_or_else(|_| format!("leasekeeper-{}", std::process::id()))
        })
    }
}
