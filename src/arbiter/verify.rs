//! Write-order step 1, first: before a verdict drawn from the Lease (a missed renewal, a Lease gone or taken, an
//! outsider's term run out) is written, the Lease is re-read from the API server: a
//! verdict is never drawn from a cache that may lag.

use super::free::Free;
use super::verdicts::Verdicts;
use super::view::View;
use super::{Draft, Step};

pub(super) fn before_verdicts(v: &View<'_>, ends: &Verdicts, free: &Free<'_>, d: &mut Draft) {
    let takeover = free.outsider.is_some() && free.next.is_some();
    if ends.any_drawn_from_lease() || takeover {
        d.push(Step::VerifyLease {
            resource_version: v.lease().and_then(|l| l.metadata.resource_version.clone()),
        });
    }
    // A node judged lost from the heartbeat the watch delivered: read it afresh.
    if let Some((node, resource_version)) = &ends.node_lost {
        d.push(Step::VerifyNode {
            node: node.clone(),
            resource_version: resource_version.clone(),
        });
    }
}
