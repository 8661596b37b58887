//! The mutual-exclusion checker of the chaos run (and of the real-node upgrade test):
//! it judges a recorded history ([`crate::recorder`]) and the state a run leaves behind.
//!
//! The history checks ([`replay_claims`], [`replay_merged`],
//! [`writes_after_succession`]) and the checks of a settled state
//! ([`unsettled_claims`], [`disagreeing_leases`], [`register_log`]) are pure functions
//! of what was observed, unit-tested with hand-made histories.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use leasekeeper::api::{LockClaim, Phase};

use crate::recorder::{Kind, Obs};

/// The data keys of a fenced register (a ConfigMap per Lease): the highest token
/// accepted, the accepted writes and the refused ones.
pub const MAX_KEY: &str = "maxToken";
/// See [`MAX_KEY`].
pub const LOG_KEY: &str = "log";
/// See [`MAX_KEY`].
pub const REFUSED_KEY: &str = "refused";

pub const TWO_GRANTED: &str = "(a) two Granted at once";
pub const OVER_CAPACITY: &str = "(a) more Granted on a lock than its capacity";
pub const NOT_NAMED: &str = "(a) a Granted claim its Lease does not name";
pub const DISAGREES: &str = "(b) Lease disagrees once settled";
pub const TOKEN: &str = "(c) fencing token not increasing";
pub const LOCK_DELAY_BROKEN: &str = "(c) grant inside the lock delay after an expiry";
pub const STALE_WRITE: &str = "(d) register accepted a stale token";
pub const LOST: &str = "(e) claim lost";
pub const NON_LEADER_WROTE: &str = "(g) a non-leader replica wrote";
pub const WROTE_AFTER_SUCCESSION: &str = "(g) a write landed after another replica took leadership";
pub const HEALTHY_EXPIRED: &str = "(h) a healthy holder expired";

/// Violations by check, and totals.
pub struct Report {
    pub violations: BTreeMap<&'static str, Vec<String>>,
    pub totals: BTreeMap<&'static str, usize>,
}

impl Default for Report {
    /// Every check present with no violations, so that the summary lists each.
    fn default() -> Self {
        let checks = [
            TWO_GRANTED,
            OVER_CAPACITY,
            NOT_NAMED,
            DISAGREES,
            TOKEN,
            LOCK_DELAY_BROKEN,
            STALE_WRITE,
            LOST,
            HEALTHY_EXPIRED,
            WROTE_AFTER_SUCCESSION,
        ];
        Report {
            violations: checks.into_iter().map(|k| (k, Vec::new())).collect(),
            totals: BTreeMap::new(),
        }
    }
}

impl Report {
    /// Records a violation of `check`.
    pub fn flag(&mut self, check: &'static str, msg: String) {
        self.violations.entry(check).or_default().push(msg);
    }

    /// Adds `n` to a total.
    pub fn count(&mut self, total: &'static str, n: usize) {
        *self.totals.entry(total).or_default() += n;
    }

    /// Violations of one check.
    pub fn of(&self, check: &str) -> &[String] {
        self.violations.get(check).map_or(&[], Vec::as_slice)
    }

    /// All violations.
    pub fn violation_count(&self) -> usize {
        self.violations.values().map(Vec::len).sum()
    }
}

/// Per Lease: the highest fencing token granted so far, and who got the last grant.
#[derive(Default)]
struct LastGrant {
    token: i64,
    holder: Option<String>,
}

/// Counts a grant (and a handoff, when the holder changed) and checks (c): its fencing
/// token is above every earlier one for that Lease.
fn note_grant(c: &Obs, last: &mut HashMap<String, LastGrant>, r: &mut Report) {
    r.count("grants", 1);
    let t = c.token.unwrap_or(0);
    // Tokens rise per lock, across its slots: one etcd revision counter.
    let m = last.entry(c.lock.clone()).or_default();
    if t <= m.token {
        r.flag(
            TOKEN,
            format!("{} on {} got {t} after {}", c.name, c.lease, m.token),
        );
    }
    m.token = m.token.max(t);
    // A handoff: the Lease goes to a different holder than its previous grant's.
    if m.holder.is_some() && m.holder != c.holder {
        r.count("handoffs (a grant to another holder than the last)", 1);
    }
    m.holder.clone_from(&c.holder);
}

/// (a) two Granted at once on one Lease, or more than `capacity` on one lock, and (c)
/// rising tokens, replaying the claims' watch stream in order; also counts grants,
/// expiries and releases.
pub fn replay_claims(obs: &[Obs], capacity: usize, r: &mut Report) {
    let mut latest: HashMap<String, Obs> = HashMap::new();
    let mut last_grant: HashMap<String, LastGrant> = HashMap::new();
    // A re-list replaces what the watcher knows: objects deleted while the watch was
    // down simply are not in it. Judge the state once the list is complete.
    let mut relist: Option<HashMap<String, Obs>> = None;
    let claims = obs.iter().filter(|o| {
        matches!(
            o.kind,
            Kind::Claim | Kind::ClaimsInit | Kind::ClaimsInitDone
        )
    });
    for o in claims {
        match o.kind {
            Kind::ClaimsInit => {
                relist = Some(HashMap::new());
                continue;
            }
            Kind::ClaimsInitDone => {
                if let Some(snapshot) = relist.take() {
                    // Grants published while the watch was down: the order they were
                    // published in was not seen, so they are judged in token order.
                    let mut unseen: Vec<&Obs> = snapshot
                        .iter()
                        .filter(|(name, c)| {
                            c.phase == Some(Phase::Granted)
                                && latest.get(*name).and_then(|p| p.phase) != Some(Phase::Granted)
                        })
                        .map(|(_, c)| c)
                        .collect();
                    unseen.sort_by_key(|c| (c.token, c.rv));
                    r.count("grants seen only in a re-list", unseen.len());
                    for c in unseen {
                        note_grant(c, &mut last_grant, r);
                    }
                    latest = snapshot;
                }
                continue;
            }
            _ => {}
        }
        if let Some(snapshot) = relist.as_mut().filter(|_| o.init) {
            snapshot.insert(o.name.clone(), o.clone());
            continue;
        }
        let prev = latest.get(&o.name).and_then(|p| p.phase);
        if o.phase == Some(Phase::Granted) && prev != Some(Phase::Granted) && !o.deleted {
            note_grant(o, &mut last_grant, r);
        }
        if o.phase == Some(Phase::Expired) && prev != Some(Phase::Expired) {
            r.count("expiries", 1);
        }
        if o.phase == Some(Phase::Released) && prev == Some(Phase::Granted) {
            r.count("releases of a held lock", 1);
        }
        if o.deleted {
            latest.remove(&o.name);
        } else {
            latest.insert(o.name.clone(), o.clone());
        }
        two_granted(&latest, o.rv, capacity, r);
    }
}

fn two_granted(latest: &HashMap<String, Obs>, rv: u64, capacity: usize, r: &mut Report) {
    let mut per_lease: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut per_lock: HashMap<&str, Vec<&str>> = HashMap::new();
    for c in latest.values().filter(|c| c.phase == Some(Phase::Granted)) {
        per_lease
            .entry(c.lease.as_str())
            .or_default()
            .push(c.name.as_str());
        per_lock
            .entry(c.lock.as_str())
            .or_default()
            .push(c.name.as_str());
    }
    for (lease, mut names) in per_lease {
        if names.len() > 1 {
            names.sort();
            r.flag(TWO_GRANTED, format!("{lease}: {names:?} (rv {rv})"));
        }
    }
    for (lock, mut names) in per_lock {
        if names.len() > capacity {
            names.sort();
            r.flag(
                OVER_CAPACITY,
                format!("{lock} (capacity {capacity}): {names:?} (rv {rv})"),
            );
        }
    }
}

/// The resourceVersion ranges, per Lease, in which the recorder's Lease watch may have
/// missed states: a re-list (after a watch broke, e.g. across an apiserver or etcd
/// restart) shows each Lease as it is now, not the states it went through meanwhile.
/// Between the last state seen before and the re-listed one (or, for a Lease gone from
/// the list, its next event) the Lease is unknown.
pub fn lease_watch_gaps(obs: &[Obs]) -> HashMap<String, Vec<(u64, u64)>> {
    let mut gaps: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut open: HashMap<String, u64> = HashMap::new();
    let mut listed: Option<Vec<String>> = None;
    for o in obs {
        match o.kind {
            Kind::LeasesInit => listed = Some(Vec::new()),
            Kind::LeasesInitDone => {
                let listed = listed.take().unwrap_or_default();
                for (name, rv) in &last {
                    if !listed.contains(name) {
                        open.insert(name.clone(), *rv);
                    }
                }
            }
            Kind::Lease => {
                if let Some(lo) = open.remove(&o.name) {
                    gaps.entry(o.name.clone()).or_default().push((lo, o.rv));
                }
                if o.init {
                    if let Some(l) = listed.as_mut() {
                        l.push(o.name.clone());
                    }
                    let lo = last.get(&o.name).copied().unwrap_or(0);
                    if o.rv > lo {
                        gaps.entry(o.name.clone()).or_default().push((lo, o.rv));
                    }
                }
                if o.deleted {
                    last.remove(&o.name);
                } else {
                    last.insert(o.name.clone(), o.rv);
                }
            }
            _ => {}
        }
    }
    for (name, lo) in open {
        gaps.entry(name).or_default().push((lo, u64::MAX));
    }
    gaps
}

/// (h): the renewals of one Lease by its current holder, as the recorder saw them.
///
/// Times are bounded from both sides: a renewal committed no earlier than the renewTime
/// the holder wrote into it and no later than when the recorder saw it. An operator
/// expires a holder only once a full leaseDurationSeconds has passed since the last
/// renewal it saw (a new leader: since the Lease's renewTime, at the soonest), and
/// only if no renewal landed since then. So an expiry is certainly wrong when the
/// recorder saw it less than a duration after the last renewal's renewTime, and that
/// renewal was itself seen less than a duration after the one before it (it landed in
/// time). Holders with skewed clocks are left out: their renewTime bounds nothing.
#[derive(Default)]
struct Renewals {
    holder: Option<String>,
    skewed: bool,
    duration: i32,
    /// renewTime of the renewal before the last one (None: the last is the grant).
    before: Option<jiff::Timestamp>,
    /// The last renewal: its renewTime and when the recorder saw it.
    last: Option<(jiff::Timestamp, jiff::Timestamp)>,
}

impl Renewals {
    fn observe(&mut self, o: &Obs) {
        if o.deleted || o.holder != self.holder {
            *self = Renewals {
                holder: if o.deleted { None } else { o.holder.clone() },
                ..Renewals::default()
            };
        }
        let Some(renew) = o.renew else {
            self.skewed = true;
            return;
        };
        if self.last.is_some_and(|(r, _)| r == renew) {
            return;
        }
        let off = (o.wall - renew).get_seconds().abs();
        self.skewed |= off > 30;
        self.duration = o.duration.unwrap_or(0);
        self.before = self.last.map(|(r, _)| r);
        self.last = Some((renew, o.wall));
    }

    fn expired_while_healthy(&self, expiry: &Obs) -> Option<String> {
        if self.skewed || self.holder != expiry.holder || self.duration <= 0 {
            return None;
        }
        let (renew, seen) = self.last?;
        let d = jiff::SignedDuration::from_secs(i64::from(self.duration));
        let slack = jiff::SignedDuration::from_millis(50);
        let in_time = self.before.is_none_or(|b| seen < b + d - slack);
        let early = expiry.wall < renew + d - slack;
        (in_time && early).then(|| {
            format!(
                "expired (seen {}) {:?} after a renewal written at {renew} that landed in time",
                expiry.wall,
                expiry.wall - renew
            )
        })
    }
}

/// Claims and Leases together, in resourceVersion order (one etcd revision counter):
/// (a) a Granted claim must be named by its Lease, unless a third party just wrote it
/// or the Lease watch has a gap there; (c) no grant inside the lock delay after an
/// expiry (`lock_delay`: what every claim of the run asks for); (h) no healthy holder
/// expired.
pub fn replay_merged(obs: &[Obs], lock_delay: Duration, r: &mut Report) {
    let gaps = lease_watch_gaps(obs);
    let relists = obs.iter().filter(|o| o.kind == Kind::LeasesInit).count();
    r.count("Lease watch re-lists", relists.saturating_sub(1));
    r.count(
        "Lease watch gaps (a Lease changed unseen)",
        gaps.values().map(Vec::len).sum(),
    );
    let in_gap = |lease: &str, rv: u64| {
        gaps.get(lease)
            .is_some_and(|g| g.iter().any(|(lo, hi)| *lo < rv && rv < *hi))
    };
    let mut merged: Vec<&Obs> = obs
        .iter()
        .filter(|o| matches!(o.kind, Kind::Claim | Kind::Lease))
        .collect();
    merged.sort_by_key(|o| o.rv);
    let mut m = Merged {
        lock_delay,
        ..Merged::default()
    };
    for o in merged {
        match o.kind {
            Kind::Lease => m.lease(o),
            _ => m.claim(o, r),
        }
        if o.kind == Kind::Claim && o.phase == Some(Phase::Granted) && !o.deleted {
            m.check_named(o, &in_gap, r);
        }
    }
}

/// The state of the merged replay.
#[derive(Default)]
struct Merged<'a> {
    claims_now: HashMap<&'a str, &'a Obs>,
    lease_now: HashMap<&'a str, &'a Obs>,
    /// The expireTime of the last expiry per Lease (written by the operator when it
    /// decided; one-second precision, so never later than the decision).
    last_expiry: HashMap<&'a str, jiff::Timestamp>,
    renewals: HashMap<&'a str, Renewals>,
    lock_delay: Duration,
}

impl<'a> Merged<'a> {
    fn lease(&mut self, o: &'a Obs) {
        self.lease_now.insert(o.name.as_str(), o);
        self.renewals.entry(o.name.as_str()).or_default().observe(o);
    }

    fn claim(&mut self, o: &'a Obs, r: &mut Report) {
        let prev = self.claims_now.get(o.name.as_str()).and_then(|p| p.phase);
        if o.init {
            // A re-list: no timing can be read from it.
            self.last_expiry.remove(o.lease.as_str());
        } else if o.phase == Some(Phase::Expired)
            && prev == Some(Phase::Granted)
            && o.reason.as_deref() != Some("LeaseLost")
        {
            self.expired(o, r);
        }
        if o.phase == Some(Phase::Granted) && prev != Some(Phase::Granted) && !o.init {
            self.granted(o, r);
        }
        if o.deleted {
            self.claims_now.remove(o.name.as_str());
        } else {
            self.claims_now.insert(o.name.as_str(), o);
        }
    }

    fn expired(&mut self, o: &'a Obs, r: &mut Report) {
        if let Some(t) = o.expire {
            self.last_expiry.insert(o.lease.as_str(), t);
        }
        if o.reason.as_deref() != Some("Expired") {
            return;
        }
        if let Some(why) = self
            .renewals
            .get(o.lease.as_str())
            .and_then(|x| x.expired_while_healthy(o))
        {
            r.flag(HEALTHY_EXPIRED, format!("{} on {}: {why}", o.name, o.lease));
        }
    }

    /// The grant happened no later than the recorder saw it, and the expiry no earlier
    /// than its expireTime: a gap below the lock delay between those two is certain,
    /// whatever the watch lag.
    fn granted(&self, o: &Obs, r: &mut Report) {
        let Some(t) = self.last_expiry.get(o.lease.as_str()) else {
            return;
        };
        let delay = jiff::SignedDuration::try_from(self.lock_delay).unwrap_or_default();
        if o.wall < *t + delay {
            r.flag(
                LOCK_DELAY_BROKEN,
                format!(
                    "{} on {} granted (seen {}) within {:?} of an expiry at {t}",
                    o.name, o.lease, o.wall, self.lock_delay
                ),
            );
        }
    }

    fn check_named(&self, o: &Obs, in_gap: &impl Fn(&str, u64) -> bool, r: &mut Report) {
        let lease = self.lease_now.get(o.lease.as_str());
        let third_party =
            lease.is_none_or(|l| l.deleted || l.holder.as_deref() == Some("intruder"));
        let differs = lease.and_then(|l| l.holder.as_deref()) != o.holder.as_deref();
        if third_party || !differs {
            return;
        }
        if in_gap(&o.lease, o.rv) {
            r.count("Granted states not judged (inside a Lease watch gap)", 1);
            return;
        }
        r.flag(
            NOT_NAMED,
            format!(
                "{} (holder {:?}, token {:?}) Granted (rv {}) while Lease {} names {:?} (Lease rv {}{})",
                o.name,
                o.holder,
                o.token,
                o.rv,
                o.lease,
                lease.and_then(|l| l.holder.clone()),
                lease.map(|l| l.rv).unwrap_or(0),
                if lease.is_some_and(|l| l.init) { ", from a re-list" } else { "" }
            ),
        );
    }
}

/// (e) in one snapshot: live claims that are neither Granted nor Pending at a position
/// (an exact one, or "more than K claims ahead" beyond the first K waiters), keyed by
/// name@resourceVersion (so that two snapshots can be compared).
pub fn unsettled_claims(claims: &[LockClaim]) -> BTreeMap<String, String> {
    let mut bad = BTreeMap::new();
    for c in claims {
        let ok = c.metadata.deletion_timestamp.is_some()
            || c.phase().is_some_and(Phase::is_terminal)
            || c.phase() == Some(Phase::Granted)
            || (c.phase() == Some(Phase::Pending) && has_position(c));
        if !ok {
            bad.insert(
                format!(
                    "{}@{}",
                    c.name_any(),
                    c.resource_version().unwrap_or_default()
                ),
                format!(
                    "{} is {:?} without a queue position",
                    c.name_any(),
                    c.phase()
                ),
            );
        }
    }
    bad
}

/// A Pending claim's place in its queue is written: exact, or beyond the exact ones.
pub fn has_position(c: &LockClaim) -> bool {
    c.status.as_ref().and_then(|s| s.queue_position).is_some()
        || c.condition(leasekeeper::api::CONDITION_GRANTED)
            .is_some_and(|g| g.message.contains("claims ahead"))
}

/// (b) in one snapshot: Leases that do not name their single Granted claim (or nobody,
/// or the intruder, when none is Granted), keyed by Lease@rv/claims@rv.
pub fn disagreeing_leases(
    claims: &[LockClaim],
    leases: &[(String, Option<Lease>)],
) -> BTreeMap<String, String> {
    let mut bad = BTreeMap::new();
    for (name, lease) in leases {
        let rv = lease
            .as_ref()
            .and_then(|l| l.resource_version())
            .unwrap_or_default();
        let holder = lease
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.holder_identity.clone())
            .filter(|h| !h.is_empty());
        // The Lease a Granted claim holds: status.lease (a slot of a lock with
        // capacity), else the one it names.
        let held = |c: &LockClaim| {
            c.status
                .as_ref()
                .and_then(|s| s.lease.clone())
                .unwrap_or_else(|| c.spec.lease_name.clone())
        };
        let granted: Vec<&LockClaim> = claims
            .iter()
            .filter(|c| held(c) == *name && c.phase() == Some(Phase::Granted))
            .collect();
        let agree = match (granted.as_slice(), holder.as_deref()) {
            ([], None) | ([], Some("intruder")) => true,
            ([c], Some(h)) => c.identity() == h,
            _ => false,
        };
        if !agree {
            let g: Vec<String> = granted
                .iter()
                .map(|c| {
                    format!(
                        "{}@{}",
                        c.name_any(),
                        c.resource_version().unwrap_or_default()
                    )
                })
                .collect();
            bad.insert(
                format!("{name}@{rv}/{g:?}"),
                format!("{name}: Lease names {holder:?}, Granted {g:?}"),
            );
        }
    }
    bad
}

/// (d): the tokens in one register's accepted log never go down; counts its writes.
pub fn register_log(name: &str, data: &BTreeMap<String, String>, r: &mut Report) {
    let mut max = 0i64;
    for line in data.get(LOG_KEY).map(String::as_str).unwrap_or("").lines() {
        let t: i64 = line
            .split(' ')
            .next()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        r.count("register writes accepted", 1);
        if t < max {
            r.flag(STALE_WRITE, format!("{name}: {line} after token {max}"));
        }
        max = max.max(t);
    }
    let refused = data
        .get(REFUSED_KEY)
        .map(|x| x.lines().count())
        .unwrap_or(0);
    r.count("register writes refused (stale token)", refused);
}

/// One successful operator write: who made it and the resourceVersion it produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub identity: String,
    pub rv: u64,
}

/// The writes replica logs report for namespace `ns` (lines `CHAOS-WROTE identity=..
/// ns=.. rv=..`, written by the chaos build).
pub fn parse_writes(log: &str, ns: &str) -> Vec<Write> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("CHAOS-WROTE ")? + "CHAOS-WROTE ".len()..];
            let field = |k: &str| {
                rest.split_whitespace()
                    .find_map(|f| f.strip_prefix(k))
                    .map(|v| v.trim_matches('"').to_string())
            };
            (field("ns=")? == ns).then_some(())?;
            Some(Write {
                identity: field("identity=")?,
                rv: field("rv=")?.parse().ok()?,
            })
        })
        .collect()
}

/// (g) in etcd's revision order, which orders every write: each write must land while
/// the leadership Lease (`leader_lease`) names its writer. A write after the writer
/// released, or after another replica took over, is a violation; one that falls in a
/// gap of the recorder's Lease watch is not judged.
pub fn writes_after_succession(writes: &[Write], obs: &[Obs], leader_lease: &str, r: &mut Report) {
    let gaps = lease_watch_gaps(obs);
    let gaps = gaps.get(leader_lease).cloned().unwrap_or_default();
    let mut timeline: Vec<(u64, Option<&str>)> = obs
        .iter()
        .filter(|o| o.kind == Kind::Lease && o.name == leader_lease)
        .map(|o| (o.rv, if o.deleted { None } else { o.holder.as_deref() }))
        .collect();
    timeline.sort_by_key(|(rv, _)| *rv);
    r.count("operator writes ordered against leadership", writes.len());
    for w in writes {
        let Some(i) = timeline
            .partition_point(|(rv, _)| *rv < w.rv)
            .checked_sub(1)
        else {
            continue;
        };
        let (at, leader) = timeline[i];
        if leader == Some(w.identity.as_str()) {
            continue;
        }
        if gaps.iter().any(|(lo, hi)| *lo < w.rv && w.rv < *hi) {
            r.count("writes not judged (inside a leadership-Lease watch gap)", 1);
            continue;
        }
        r.flag(
            WROTE_AFTER_SUCCESSION,
            format!(
                "{} wrote rv {} while the leadership Lease (rv {at}) named {leader:?}",
                w.identity, w.rv
            ),
        );
    }
}

#[cfg(test)]
mod tests;
