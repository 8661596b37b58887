//! kube-runtime wiring around the pure [`crate::arbiter`], by concern. A key (one lock
//! in one namespace) goes: `watches` -> [`workqueue`] -> `worker` -> `reconcile` (read
//! the caches, ask the arbiter) -> `execute` (the plan's steps in order) -> `writer`.
//! - [`config`]: the flags of `leasekeeper run`;
//! - `run`: leadership, the watches and the dispatcher, shutdown;
//! - `watches`: what each watch event changes;
//! - [`workqueue`]: the per-lock work queue, fair across namespaces; `worker` serves it;
//! - `reconcile`: one lock read, decided and remembered; `foreign` the Leases the
//!   watches do not show;
//! - `execute`: a plan's steps performed in order, each with its precondition;
//! - `writer`: the one doorway for every API write (term, count, record);
//! - `lock_status`, `failure_notice`, `events`: the Lock's status, the Reconciled
//!   condition, Events (all through the writer);
//! - `errors`: what can fail;
//! - `chaos`: the fault hooks of the chaos run at two seams (the writer and the
//!   arbiter's input), compiled only with the `chaos-negative-controls` feature (no-ops
//!   otherwise).
//!
//! docs/design.md explains why a per-lock work queue rather than kube's `Controller`.

pub mod config;
mod errors;
mod events;
mod execute;
mod failure_notice;
mod foreign;
mod lock_status;
mod pod_watch;
mod proof;
mod reconcile;
mod routes;
mod run;
mod watches;
mod worker;
pub mod workqueue;
mod writer;

#[cfg(feature = "chaos-negative-controls")]
mod chaos;
#[cfg(not(feature = "chaos-negative-controls"))]
#[path = "chaos_off.rs"]
mod chaos;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::Client;
use tokio::time::Instant;

pub use config::RunConfig;
pub use errors::{Error, RunError};
pub use proof::{ProofKey, ProofKeyError};
pub use run::{controller, controller_until, run, shutdown_signal, wait_for_crd};

use crate::api::{Lock, LockClaim};
use crate::arbiter::{self, LockMemory};
use crate::telemetry::Metrics;
use workqueue::WorkQueue;

/// The key of one arbitration: a Lease name in a namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseKey {
    /// Namespace of the claims and the Lease.
    pub namespace: String,
    /// The Lease name.
    pub name: String,
}

impl workqueue::Grouped for LeaseKey {
    type Group = String;
    fn group(&self) -> String {
        self.namespace.clone()
    }
}

/// What this process keeps per lock between reconciles.
#[derive(Default)]
struct KeyState {
    memory: LockMemory,
    /// resourceVersions our last writes produced (per slot Lease, per claim): a cache
    /// older than these is stale.
    lease_rvs: BTreeMap<u32, u64>,
    claim_rvs: HashMap<String, u64>,
    failures: u32,
    /// The run of failures, for telling the claims when it persists.
    streak: arbiter::Streak,
    /// Whether a successful reconcile has looked for a `Reconciled=False` left by an
    /// earlier leader.
    looked_for_stale_failure: bool,
    waiting: usize,
    /// Claims waiting although a slot is free, as last read.
    stalled: usize,
    /// Slot Leases the watches do not show (neither our label nor the takeover label),
    /// learnt from a refused create; read again when `recheck` is due.
    foreign: BTreeMap<u32, Foreign>,
}

/// An unwatched Lease as last read, and when to read it again.
struct Foreign {
    lease: Arc<Lease>,
    /// Monotonic time ([`Context::mono`]) of the next read.
    recheck: Duration,
    /// The wait before the next read after this one (doubling, capped).
    backoff: Duration,
}

/// Shared state of the controller.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Who publishes Events (this controller and replica).
    pub reporter: Reporter,
    /// Where Events go (published off the critical path, rate-limited).
    events: events::EventSink,
    claims: Store<LockClaim>,
    /// The Leases we manage and the ones open to takeover (one watch each).
    leases: [Store<Lease>; 2],
    /// Locks (capacities).
    locks: Store<Lock>,
    /// The slots above 0 whose Lease exists, per lock.
    slots: Mutex<HashMap<LeaseKey, BTreeSet<u32>>>,
    /// Claim names per Lease key (leaseName is immutable, so this only grows and shrinks).
    index: Mutex<HashMap<LeaseKey, HashSet<String>>>,
    keys: Mutex<HashMap<LeaseKey, KeyState>>,
    queue: Arc<WorkQueue<LeaseKey>>,
    /// Objects the watches delivered that cannot be decoded: (kind, namespace, name).
    invalid: Mutex<HashSet<(String, String, String)>>,
    config: arbiter::Config,
    origin: Instant,
    /// Every write goes through it (the term, the count, the record).
    writer: writer::Writer,
    /// The key of the proofs that the operator created a Lease (garbage collection).
    proof: proof::ProofKey,
    /// Pods labelled leasekeeper.io/lock (None: Pods are not watched, --pods=false).
    pods: Option<Store<k8s_openapi::api::core::v1::Pod>>,
    /// The node heartbeats Pod holds live by.
    heartbeats: pod_watch::Heartbeats,
    /// Pods told (once) why they cannot hold a lock: (uid, why).
    pod_warned: Mutex<HashSet<(String, String)>>,
    /// Services (slim), for routes to holders (None: --routes=false).
    services: Option<Store<k8s_openapi::api::core::v1::Service>>,
    /// leasekeeper's EndpointSlices.
    slices: Option<Store<k8s_openapi::api::discovery::v1::EndpointSlice>>,
}

impl Context {
    /// Monotonic time since the controller started.
    pub fn mono(&self) -> Duration {
        self.origin.elapsed()
    }

    /// The Lease of `key` from the watched caches (the newer copy if both hold it).
    fn watched_lease(&self, key: &LeaseKey) -> Option<Arc<Lease>> {
        let r = ObjectRef::new(&key.name).within(&key.namespace);
        let rv = |l: &Lease| {
            l.metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
        };
        self.leases
            .iter()
            .filter_map(|s| s.get(&r))
            .max_by_key(|l| rv(l))
    }

    /// The slots above 0 whose Lease the watches have shown for lock `key`.
    fn slots_of(&self, key: &LeaseKey) -> Vec<u32> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Notes that slot `slot` of lock `key` has a Lease (or no longer has one).
    fn note_slot(&self, key: &LeaseKey, slot: u32, exists: bool) {
        let mut all = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if exists {
            all.entry(key.clone()).or_default().insert(slot);
        } else if let Some(s) = all.get_mut(key) {
            s.remove(&slot);
            if s.is_empty() {
                all.remove(key);
            }
        }
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseKey, KeyState>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn index(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseKey, HashSet<String>>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn invalid_objects(&self) -> std::sync::MutexGuard<'_, HashSet<(String, String, String)>> {
        self.invalid.lock().unwrap_or_else(|e| e.into_inner())
    }
}
