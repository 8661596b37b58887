//! The model API server that both drivers run on (`lease_world` for a single Lease,
//! `lock_world` for a lock with capacity): claims and Leases by name, resourceVersions
//! drawn from one global revision (as etcd does), claim preconditions, finalizers, and
//! the two clocks an operator reads. The drivers decide with the product's two entry
//! points and apply the plans here; the invariants they check are their own.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{LockClaim, LockClaimSpec};
use crate::arbiter::Now;

/// The namespace of every object in the model.
pub const NS: &str = "ns";

/// A write refused by its precondition (or aimed at an object that is gone).
#[derive(Debug, PartialEq, Eq)]
pub struct Conflict;

pub struct Server {
    pub claims: BTreeMap<String, LockClaim>,
    pub leases: BTreeMap<String, Lease>,
    /// The last revision handed out.
    pub rv: u64,
    pub wall: Timestamp,
    pub mono: Duration,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            claims: BTreeMap::new(),
            leases: BTreeMap::new(),
            rv: 100,
            // Off a whole second, so that the API's one-second truncation of metav1.Time shows.
            wall: Timestamp::from_millisecond(1_800_000_000_700).expect("valid"),
            mono: Duration::from_secs(1000),
        }
    }
}

impl Server {
    pub fn next_rv(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    pub fn now(&self) -> Now {
        Now {
            wall: self.wall,
            mono: self.mono,
        }
    }

    /// Advances both clocks by `d`.
    pub fn step_clock(&mut self, d: Duration) {
        self.mono += d;
        self.wall = self
            .wall
            .checked_add(jiff::SignedDuration::try_from(d).unwrap_or_default())
            .unwrap_or(self.wall);
    }

    pub fn create(&mut self, name: &str, spec: LockClaimSpec) {
        let mut c = LockClaim::new(name, spec);
        c.metadata.namespace = Some(NS.into());
        c.metadata.generation = Some(1);
        // creationTimestamp has one-second precision in Kubernetes: ties happen.
        let secs = self.wall.as_second();
        c.metadata.creation_timestamp = Some(Time(Timestamp::from_second(secs).expect("valid")));
        c.metadata.resource_version = Some(self.next_rv());
        c.metadata.uid = Some(format!("uid-{}", self.rv));
        self.claims.insert(name.into(), c);
    }

    /// A delete: marked with a deletionTimestamp while a finalizer holds the claim,
    /// removed otherwise.
    pub fn delete(&mut self, name: &str) {
        let Some(c) = self.claims.get_mut(name) else {
            return;
        };
        if c.metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| !f.is_empty())
        {
            if c.metadata.deletion_timestamp.is_none() {
                c.metadata.deletion_timestamp = Some(Time(self.wall));
                self.rv += 1;
                c.metadata.resource_version = Some(self.rv.to_string());
            }
        } else {
            self.claims.remove(name);
            self.rv += 1;
        }
    }

    /// The claim's owner sets `spec.release`.
    pub fn release(&mut self, name: &str) {
        let rv = self.next_rv();
        if let Some(c) = self.claims.get_mut(name) {
            if !c.spec.release {
                c.spec.release = true;
                c.metadata.generation = Some(c.metadata.generation.unwrap_or(1) + 1);
                c.metadata.resource_version = Some(rv);
            }
        }
    }

    /// A claim deleted and created again under the same name (a new uid), seen at once.
    pub fn recreate(&mut self, name: &str) {
        let Some(spec) = self.claims.get(name).map(|c| c.spec.clone()) else {
            return;
        };
        self.claims.remove(name);
        self.create(name, spec);
    }

    /// Every claim's resourceVersion: what a plan was decided on.
    pub fn rvs(&self) -> HashMap<String, String> {
        self.claims
            .iter()
            .map(|(n, c)| {
                (
                    n.clone(),
                    c.metadata.resource_version.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    /// The claim `name` to write, if it still has the resourceVersion in `rvs`.
    pub fn claim_precondition(
        &mut self,
        name: &str,
        rvs: &HashMap<String, String>,
    ) -> Result<&mut LockClaim, Conflict> {
        let c = self.claims.get_mut(name).ok_or(Conflict)?;
        if rvs.get(name) != c.metadata.resource_version.as_ref() {
            return Err(Conflict);
        }
        Ok(c)
    }

    /// The resourceVersion of Lease `name`, if it exists.
    pub fn lease_rv(&self, name: &str) -> Option<String> {
        self.leases
            .get(name)
            .and_then(|l| l.metadata.resource_version.clone())
    }

    /// A Lease read with a precondition: `want` is its resourceVersion now.
    pub fn verify_lease(&self, name: &str, want: &Option<String>) -> Result<(), Conflict> {
        if &self.lease_rv(name) == want {
            Ok(())
        } else {
            Err(Conflict)
        }
    }
}
