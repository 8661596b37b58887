//! The arbiter's tests and the model API server they run on ([`server`]): claims and
//! Leases with resourceVersions drawn from one global revision (as etcd does),
//! preconditions on every write, and the invariants of docs/design.md checked after every
//! single write. Two drivers decide with the product's two entry points and apply the
//! plans on that one server:
//!
//! - `lease_world`: one Lease and its claims (`decide_lease`); `lease_tests`,
//!   `pod_tests` and `proptests` run on it;
//! - `lock_world`: a lock with capacity and its slot Leases (`decide`); `lock_tests` run
//!   on it.

mod lease_tests;
mod lease_world;
mod lock_tests;
mod lock_world;
mod pod_tests;
pub(crate) mod proptests;
mod server;
