//! Phase 1, observe: the claims in queue order, split into live and finished; who holds
//! the Lease (one of our grants, an outsider, or nobody) and whether the operator may
//! write it at all; what this process has now observed of the Lease (its memory),
//! before any expiry is judged.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;

use super::{claim_duration, lease, micros, Input, Memory, Now, Phase, Seen};
use crate::api::LockClaim;

/// Who holds the Lease, as the operator sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Holding<'a> {
    /// No Lease, or nobody named in it.
    Nobody,
    /// A live claim holds it: the Lease names the claim our grant went to (annotation:
    /// name and uid) and that claim's identity. Identity alone never makes a holder.
    Claim(&'a LockClaim),
    /// Our grant to a claim that has finished, or is gone (deleted, or deleted and
    /// created again under its name): the Lease is ours to clear or hand on.
    Ended {
        /// The claim no longer exists.
        gone: bool,
    },
    /// Someone else holds a Lease the operator may write (one it created that was taken
    /// behind its back, or one whose owner allowed a takeover): respected until its
    /// holder stops renewing.
    Outsider,
    /// A Lease leasekeeper did not create and may not write.
    Foreign,
}

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
    /// Who that is.
    pub holding: Holding<'a>,
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
        let holding = holding(input.lease, holder.as_deref(), &claims);
        let holder_claim = match holding {
            Holding::Claim(c) => Some(c),
            _ => None,
        };
        // A claim's grant lasts what its spec says, whatever the Lease's own
        // leaseDurationSeconds (which the holder can edit) claims.
        let duration = holder_claim.map(claim_duration);
        observe(memory, input.lease, holder.as_deref(), duration, now);
        View {
            input,
            now,
            claims,
            live,
            finished,
            holder,
            holding,
            holder_claim,
        }
    }

    /// Whether `c` is the holder claim.
    pub fn is_holder(&self, c: &LockClaim) -> bool {
        self.holder_claim
            .is_some_and(|h| h.metadata.name == c.metadata.name)
    }

    /// Whether the operator may not write the Lease.
    pub fn foreign(&self) -> bool {
        self.holding == Holding::Foreign
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

/// Who holds `l`: see [`Holding`]. A live holder is found only through our own grant's
/// annotation on a Lease the operator may write.
fn holding<'a>(l: Option<&Lease>, holder: Option<&str>, claims: &[&'a LockClaim]) -> Holding<'a> {
    let Some(l) = l else {
        return Holding::Nobody;
    };
    if !lease::writable(Some(l)) {
        return Holding::Foreign;
    }
    let Some(holder) = holder else {
        return Holding::Nobody;
    };
    let Some(granted_to) = lease::claim_annotation(l) else {
        return Holding::Outsider;
    };
    let uid = lease::claim_uid_annotation(l);
    let claim = claims
        .iter()
        .copied()
        .find(|c| c.metadata.name.as_deref() == Some(granted_to.as_str()));
    match claim {
        None => Holding::Ended { gone: true },
        Some(c) if uid.is_some() && c.metadata.uid != uid => Holding::Ended { gone: true },
        Some(c) if c.identity() != holder => Holding::Outsider,
        Some(c) if c.phase().is_some_and(Phase::is_terminal) => Holding::Ended { gone: false },
        Some(c) => Holding::Claim(c),
    }
}

/// The minimum grace a held Lease gets when this process first observes it: half the
/// lease duration, which a holder renewing every third of the duration (our client) or
/// every retry period (client-go) always fits in.
pub fn min_takeover_grace(duration: Duration) -> Duration {
    duration / 2
}

/// Updates the observation of the Lease's (holder, renewTime). `duration` is the
/// holder claim's; an outsider's is the Lease's own.
fn observe(
    mem: &mut Memory,
    l: Option<&Lease>,
    holder: Option<&str>,
    duration: Option<Duration>,
    now: Now,
) {
    let (Some(l), Some(holder)) = (l, holder) else {
        mem.seen = None;
        return;
    };
    let renew = lease::renew_time(l);
    let d = duration.unwrap_or_else(|| lease::duration(l));
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
