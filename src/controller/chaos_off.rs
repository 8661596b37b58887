//! Without the `chaos-negative-controls` feature every fault hook is a no-op (see
//! `chaos.rs` for what each does in the chaos build).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;

use super::LeaseKey;
use crate::api::LockClaim;
use crate::arbiter::LockPlan;
use crate::telemetry::WriteKind;

/// Nothing is sabotaged.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Controls {
    pub ignore_leadership: bool,
    pub release_before_drain: bool,
    pub work_on_after_loss: bool,
}

#[inline(always)]
pub(super) fn controls() -> Controls {
    Controls::default()
}

#[inline(always)]
pub(super) fn arbiter(
    _: &LeaseKey,
    claims: &mut [Arc<LockClaim>],
    leases: &mut BTreeMap<u32, Arc<Lease>>,
    decide: impl FnOnce(&[Arc<LockClaim>], &BTreeMap<u32, Arc<Lease>>) -> Option<LockPlan>,
) -> Option<LockPlan> {
    decide(claims, leases)
}

#[inline(always)]
pub(super) async fn create_over_existing(
    _: &Api<Lease>,
    _: &Lease,
) -> Option<Result<Lease, kube::Error>> {
    None
}

#[inline(always)]
pub(super) fn ignores_term() -> bool {
    false
}

#[inline(always)]
pub(super) fn wrote(_: Option<&str>, _: WriteKind, _: &str, _: Option<&str>) {}
