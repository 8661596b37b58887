//! Without the `chaos-negative-controls` feature every fault hook is a no-op (see
//! `chaos.rs` for what each does in the chaos build).

use std::borrow::Cow;
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};

use super::{RunConfig, RunError};
use crate::api::LockClaim;
use crate::arbiter::Step;
use crate::leader::{ElectionConfig, Term};
use crate::telemetry::{Metrics, Readiness};

#[inline(always)]
pub(super) fn arm() {}

#[inline(always)]
pub(super) async fn lease_watch_point() {}

#[inline(always)]
pub(super) async fn without_leadership(
    _: &Client,
    _: &RunConfig,
    _: &Arc<Metrics>,
    _: &Arc<Readiness>,
    _: &ElectionConfig,
) -> Option<Result<(), RunError>> {
    None
}

#[inline(always)]
pub(super) fn inputs(
    claims: Vec<Arc<LockClaim>>,
    lease: Option<Arc<Lease>>,
) -> (Vec<Arc<LockClaim>>, Option<Arc<Lease>>) {
    (claims, lease)
}

#[inline(always)]
pub(super) fn steps<'a>(steps: &'a [Step], _: Option<&Lease>) -> Cow<'a, [Step]> {
    Cow::Borrowed(steps)
}

#[inline(always)]
pub(super) fn skips_lease_check() -> bool {
    false
}

#[inline(always)]
pub(super) async fn write_lease(
    _: &Api<Lease>,
    _: &str,
    _: &Lease,
) -> Option<Result<Lease, kube::Error>> {
    None
}

#[inline(always)]
pub(super) fn releases_before_draining() -> bool {
    false
}

#[inline(always)]
pub(super) async fn keep_working_after_release(_: &Term) {}

#[inline(always)]
pub(super) fn wrote(_: Option<&str>, _: &str, _: Option<&str>) {}
