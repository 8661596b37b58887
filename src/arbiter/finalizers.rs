//! Write-order steps 1 and 5: the finalizer goes on a claim before anything can be
//! granted to it, and comes off a deleted claim once the Lease no longer names it.

use super::ends::Ends;
use super::view::View;
use super::{deleting, has_finalizer, name, Draft, Step};

/// Finalizers on new claims, before anything can be granted to them.
pub(super) fn add(v: &View<'_>, ends: &Ends, d: &mut Draft) {
    for c in &v.live {
        if !deleting(c) && !has_finalizer(c) && !ends.ends(c) {
            d.push(Step::AddFinalizer { claim: name(c) });
        }
    }
}

/// Let go of deleted claims: every write that moves the Lease off them precedes this.
pub(super) fn remove(v: &View<'_>, d: &mut Draft) {
    for c in v.claims.iter().filter(|c| deleting(c) && has_finalizer(c)) {
        d.push(Step::RemoveFinalizer { claim: name(c) });
    }
}
