//! Phase 1, observe: the claims in queue order, split into live and finished; the
//! Lease's holder and which live claim that is; what this process has now observed of
//! the Lease (its memory), before any expiry is judged.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;

use super::{created, lease, micros, name, Input, Memory, Now, Phase, Seen};
use crate::api::LockClaim;

/// Everything the later phases read.
pub(super) struct View<'a> {
    pub input: &'a Input<'a>,
    /// The time, truncated to the Lease's microsecond precision.
    pub now: Now,
    /// Every claim, in queue order.
    pub claims: Vec<&'a LockClaim>,
    /// Claims not in a terminal phase, in queue order.
    pub live: Vec<&'a LockClaim>,
    /// Claims in a terminal phase.
    pub finished: Vec<&'a LockClaim>,
    /// The Lease's holderIdentity.
    pub holder: Option<String>,
    /// The claim the operator's last grant named (the Lease's claim annotation).
    pub granted_to: Option<String>,
    /// The live claim that holds the Lease.
    pub holder_claim: Option<&'a LockClaim>,
}

impl<'a> View<'a> {
    /// Observes the input; updates `memory` with what the Lease shows now.
    pub fn observe(input: &'a Input<'a>, memory: &mut Memory) -> View<'a> {
        let now = Now {
            wall: micros(input.now.wall),
            mono: input.now.mono,
        };
        let mut claims: Vec<&LockClaim> = input.claims.to_vec();
        claims.sort_by(|a, b| super::queue_cmp(a, b));
        let (live, finished): (Vec<&LockClaim>, Vec<&LockClaim>) = claims
            .iter()
            .partition(|c| !c.phase().is_some_and(Phase::is_terminal));
        let holder = lease::holder(input.lease);
        observe(memory, input.lease, holder.as_deref(), now);
        let mut v = View {
            input,
            now,
            claims,
            live,
            finished,
            holder,
            granted_to: input.lease.and_then(lease::claim_annotation),
            holder_claim: None,
        };
        v.holder_claim = v.find_holder_claim();
        v
    }

    /// Whether `c` can be the holder named `h`: its identity, and the claim the last
    /// grant named, if the Lease says.
    pub fn ours(&self, c: &LockClaim, h: &str) -> bool {
        c.identity() == h
            && self
                .granted_to
                .as_deref()
                .is_none_or(|n| Some(n) == c.metadata.name.as_deref())
    }

    /// Who holds the Lease, among live claims: the claim our grant named (annotation)
    /// if its identity still matches; without the annotation, by identity, preferring
    /// the one marked Granted, then the oldest.
    fn find_holder_claim(&self) -> Option<&'a LockClaim> {
        let h = self.holder.as_deref()?;
        let mut same: Vec<&LockClaim> = self
            .live
            .iter()
            .copied()
            .filter(|c| self.ours(c, h))
            .collect();
        same.sort_by_key(|c| (c.phase() != Some(Phase::Granted), created(c), name(c)));
        same.first().copied()
    }

    /// Whether `c` is the holder claim.
    pub fn is_holder(&self, c: &LockClaim) -> bool {
        self.holder_claim
            .is_some_and(|h| h.metadata.name == c.metadata.name)
    }

    /// The Lease name.
    pub fn lease_name(&self) -> &'a str {
        self.input.lease_name
    }

    /// The Lease as read.
    pub fn lease(&self) -> Option<&'a Lease> {
        self.input.lease
    }
}

/// The minimum grace a held Lease gets when this process first observes it: half the
/// lease duration, which a holder renewing every third of the duration (our client) or
/// every retry period (client-go) always fits in.
pub fn min_takeover_grace(duration: Duration) -> Duration {
    duration / 2
}

/// Updates the observation of the Lease's (holder, renewTime).
fn observe(mem: &mut Memory, l: Option<&Lease>, holder: Option<&str>, now: Now) {
    let (Some(l), Some(holder)) = (l, holder) else {
        mem.seen = None;
        return;
    };
    let renew = lease::renew_time(l);
    let d = lease::duration(l);
    match mem.seen.as_mut() {
        Some(s) if s.holder == holder && s.renew_time == renew => {}
        Some(s) => *s = Seen::renewed(holder, renew, now.mono, d),
        None => {
            // First sight since this process started (restart or failover): a full
            // duration, shortened by how old the Lease's own renewTime looks, but never
            // below the minimum a healthy holder's renewals fit in.
            let elapsed = renew
                .and_then(|r| super::since(now.wall, r))
                .unwrap_or_default()
                .min(d);
            let grace = d.saturating_sub(elapsed).max(min_takeover_grace(d));
            mem.seen = Some(Seen {
                holder: holder.to_string(),
                renew_time: renew,
                observed_at: now.mono,
                deadline: now.mono + grace,
                renew_due: now.mono + (d / 3).saturating_sub(elapsed),
            });
        }
    }
}
