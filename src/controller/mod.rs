//! kube-runtime wiring: watches, the per-Lease work queue, and the reconcile that reads
//! state, asks the [`crate::arbiter`] and performs its decisions in the safe order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, CustomResourceExt};

use crate::api::LockClaim;
use crate::telemetry::{self, Metrics, Readiness};

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
}

/// Runs the operator until it fails or receives SIGINT/SIGTERM.
pub async fn run(cfg: RunConfig) -> Result<(), RunError> {
    let client = Client::try_default().await.map_err(RunError::Config)?;
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    let _probes =
        telemetry::serve_probes(cfg.metrics_addr, metrics.clone(), readiness.clone()).await?;
    wait_for_crd(client.clone(), cfg.crd_wait).await?;
    readiness.set(true);
    tracing::info!(
        namespace = cfg.watch_namespace.as_deref().unwrap_or("*"),
        "connected; LockClaim CRD established"
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    Ok(())
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
