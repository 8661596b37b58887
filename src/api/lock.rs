//! The `Lock` custom resource (`leasekeeper.io/v1alpha1`): the one place a lock's
//! capacity is set. Doc comments become `kubectl explain lock` text.

// See the note in `api/mod.rs`: separate printer columns, not duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Default and smallest `spec.capacity`.
pub const MIN_CAPACITY: i32 = 1;
/// Largest `spec.capacity`.
pub const MAX_CAPACITY: i32 = 1000;

/// A lock that up to `capacity` LockClaims may hold at once (a semaphore).
///
/// The Lock's name is the lock: claims name it in spec.leaseName. A lock of capacity N
/// is N Leases: slot 0 is the Lease with the lock's name, slot i the Lease
/// `<name>-slot-<i>`; each is granted to one claim at a time. Without a Lock object a
/// lock has capacity 1.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "leasekeeper.io",
    version = "v1alpha1",
    kind = "Lock",
    namespaced,
    status = "LockStatus",
    category = "leasekeeper",
    derive = "PartialEq",
    doc = "Lock sets how many LockClaims may hold a lock at once: claims whose spec.leaseName is this Lock's name share spec.capacity slots, each a coordination.k8s.io/v1 Lease (slot 0 named like the lock, slot i named <name>-slot-<i>). Raising the capacity grants waiting claims at once; lowering it never revokes a holder.",
    printcolumn(
        name = "Capacity",
        type_ = "integer",
        json_path = ".spec.capacity",
        description = "Claims that may hold the lock at once"
    ),
    printcolumn(
        name = "Held",
        type_ = "integer",
        json_path = ".status.held",
        description = "Claims holding it now"
    ),
    printcolumn(
        name = "Waiting",
        type_ = "integer",
        json_path = ".status.waiting",
        description = "Claims waiting for it"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct LockSpec {
    /// How many claims may hold the lock at once: 1 to 1000, default 1. Raising it
    /// grants waiting claims at once; lowering it revokes nobody (no new grant is made
    /// until fewer claims than the new capacity hold).
    #[serde(default = "default_capacity")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("spec.capacity must be between 1 and 1000"))]
    pub capacity: i32,
}

fn default_capacity() -> i32 {
    MIN_CAPACITY
}

/// What leasekeeper observed of the lock.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LockStatus {
    /// The capacity in force (spec.capacity as last acted on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub capacity: Option<i32>,
    /// Claims holding the lock now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub held: Option<i32>,
    /// Claims waiting for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub waiting: Option<i32>,
    /// Who holds which slot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<LockHolder>,
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
}

/// One holder of a lock.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LockHolder {
    /// The slot (0 to capacity - 1, or above after the capacity was lowered).
    #[schemars(range(min = 0, max = 999))]
    pub slot: i32,
    /// The slot's Lease.
    pub lease: String,
    /// The LockClaim holding it.
    pub claim: String,
    /// Its holderIdentity.
    pub identity: String,
}

/// The rule, on the CRD's root, that refuses a Lock named like a slot Lease.
pub(super) fn name_rule(
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::ValidationRule {
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::ValidationRule {
        rule: "!self.metadata.name.matches('-slot-[0-9]+$')".into(),
        message: Some(
            "metadata.name must not end in -slot-<digits>: such names are the slot Leases of locks"
                .into(),
        ),
        ..Default::default()
    }
}

/// The Lease of slot `slot` of lock `lock`: slot 0 is the lock's own name.
pub fn slot_lease(lock: &str, slot: u32) -> String {
    if slot == 0 {
        lock.to_string()
    } else {
        format!("{lock}-slot-{slot}")
    }
}

/// The lock and slot a Lease name belongs to, if it is a slot Lease above 0.
pub fn parse_slot_lease(lease: &str) -> Option<(&str, u32)> {
    let (lock, n) = lease.rsplit_once("-slot-")?;
    if lock.is_empty() || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let slot: u32 = n.parse().ok()?;
    (slot >= 1).then_some((lock, slot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_leases_round_trip_and_other_names_are_not_slots() {
        assert_eq!(slot_lease("db", 0), "db");
        assert_eq!(slot_lease("db", 3), "db-slot-3");
        assert_eq!(parse_slot_lease("db-slot-3"), Some(("db", 3)));
        assert_eq!(parse_slot_lease("a-slot-b-slot-12"), Some(("a-slot-b", 12)));
        for not in [
            "db",
            "db-slot-",
            "db-slot-x1",
            "-slot-2",
            "db-slot-0",
            "db-slot-+1",
        ] {
            assert_eq!(parse_slot_lease(not), None, "{not}");
        }
    }
}
