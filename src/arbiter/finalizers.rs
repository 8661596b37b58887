//! Claims carry no finalizer: a pending claim holds nothing, and a holder's deletion is
//! covered by the Lease's claim annotation (name and uid), which makes a Lease whose
//! claim is gone free for the next grant. Earlier versions put one on every claim; it
//! comes off wherever it is found, in write-order step 4 (after every write that moves the
//! Lease off a deleted holder), so that nothing is left stuck after an upgrade.

use super::view::View;
use super::{has_finalizer, name, Draft, Step};

/// The legacy finalizer off every claim that still carries it.
pub(super) fn remove_legacy(v: &View<'_>, d: &mut Draft) {
    for c in v.claims.iter().filter(|c| has_finalizer(c)) {
        d.push(Step::RemoveFinalizer { claim: name(c) });
    }
}
