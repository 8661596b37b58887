//! The test kit of leasekeeper: what its end-to-end tests, its benchmark (`lk-bench`) and
//! its chaos run (`lk-chaos`) share, so that none of it is product API.
//!
//! - [`plane`]: the test control plane (started or reused), clients, `kubectl`, `helm`.
//! - [`objects`]: namespaces, claims, Leases, Events and waiting for them.
//! - [`operator`]: the operator in-process or as a process, and its metrics.
//! - [`history`]: every LockClaim state a watcher sees, and the one-Granted check.
//! - [`tenant`]: acting as a user with only LockClaim rights (impersonation).
//! - [`etcd`]: writing objects into etcd directly (states no API request can make).
//! - [`recorder`], [`checker`]: every LockClaim and Lease state a run observes, and the
//!   mutual-exclusion checks on them (the chaos run's, reused on the real node).
//! - [`audit`]: the same checks on the API server's own record (its audit log).

pub mod audit;
pub mod checker;
pub mod etcd;
pub mod history;
pub mod objects;
pub mod operator;
pub mod plane;
pub mod recorder;
pub mod tenant;

pub use history::History;
pub use objects::*;
pub use operator::*;
pub use plane::*;
pub use tenant::*;

/// The path of a binary of the calling package's integration tests:
/// `testkit::bin!("leasekeeper")` is `env!("CARGO_BIN_EXE_leasekeeper")` there.
#[macro_export]
macro_rules! bin {
    ($name:literal) => {
        std::path::Path::new(env!(concat!("CARGO_BIN_EXE_", $name)))
    };
}
