//! Before a verdict drawn from the Lease (a missed renewal, a Lease gone or taken, an
//! outsider's term run out) is written, the Lease is re-read from the API server: a
//! verdict is never drawn from a cache that may lag.

use super::ends::Ends;
use super::free::Free;
use super::view::View;
use super::{Draft, Step};

pub(super) fn before_verdicts(v: &View<'_>, ends: &Ends, free: &Free<'_>, d: &mut Draft) {
    let takeover = free.outsider.is_some() && free.next.is_some();
    if ends.any_drawn_from_lease() || takeover {
        d.push(Step::VerifyLease {
            resource_version: v.lease().and_then(|l| l.metadata.resource_version.clone()),
        });
    }
}
