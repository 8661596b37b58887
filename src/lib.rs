//! leasekeeper: a Kubernetes operator that manages `coordination.k8s.io/v1` Lease
//! lifecycle declaratively through `LockClaim` objects.
//!
//! - [`api`]: the `LockClaim` custom resource.
//! - [`arbiter`]: the pure decision core (state in, writes out; no client, no clock).
//! - [`controller`]: kube-runtime wiring that reads state, asks the arbiter and writes.
//! - [`client`]: the workload side: acquire, hold and release locks.
//! - [`leader`]: leader election among operator replicas.
//! - [`telemetry`]: logging, metrics and the probe server.

pub mod api;
pub mod arbiter;
pub mod client;
pub mod controller;
pub mod leader;
pub mod telemetry;

/// The field manager of every write the operator makes.
pub const MANAGER: &str = "leasekeeper";
/// The finalizer earlier versions put on every claim. Claims no longer carry it (the
/// Lease's claim annotation covers a deleted holder); the operator removes it where it
/// finds it, so that nothing is left stuck after an upgrade or an uninstall.
pub const FINALIZER: &str = "leasekeeper.io/release";
/// The label key and value that mark a Lease as created and managed by leasekeeper.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// See [`MANAGED_BY_LABEL`].
pub const MANAGED_BY_VALUE: &str = "leasekeeper";
/// The label by which the owner of a Lease leasekeeper did not create allows it to be
/// taken over once its holder stops renewing (value [`TAKEOVER_ALLOWED`]). Without it
/// the operator never writes, renews, clears or deletes such a Lease.
pub const TAKEOVER_LABEL: &str = "leasekeeper.io/takeover";
/// See [`TAKEOVER_LABEL`].
pub const TAKEOVER_ALLOWED: &str = "allowed";
