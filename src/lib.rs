//! leasekeeper: a Kubernetes operator that manages `coordination.k8s.io/v1` Lease
//! lifecycle declaratively through `LockClaim` objects.
//!
//! - [`api`]: the `LockClaim` custom resource.
//! - [`arbiter`]: the pure decision core (state in, writes out; no client, no clock).
//! - [`controller`]: kube-runtime wiring that reads state, asks the arbiter and writes.
//! - [`client`]: the workload side: acquire, hold and release locks.
//! - [`fence`]: fencing enforced by the API server (an admission policy).
//! - [`leader`]: leader election among operator replicas.
//! - [`telemetry`]: logging, metrics and the probe server.

pub mod api;
pub mod arbiter;
pub mod client;
pub mod controller;
pub mod fence;
pub mod leader;
pub mod telemetry;
