//! The history as the API server recorded it: its audit log (`hack/control-plane.sh up`
//! with `LK_AUDIT=1`) holds every write to Leases, LockClaims and Locks, who made it (each
//! operator replica impersonates a user of its own) and the object the API server
//! answered with its resourceVersion. Replayed in resourceVersion order, whoever wrote,
//! no watch gap can hide a state and no counter of the operator's is trusted.
//!
//! Deletes: the API server answers with the object as it was, not with the deletion's
//! revision, so a deletion is placed right after the object's last version; a state
//! that lasted only until a deletion may thus be missed by this view (never invented).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use leasekeeper::api::{Phase, CLAIM_ANNOTATION};
use serde_json::Value;

use crate::checker::Report;

pub const TWO_GRANTED: &str = "(a') audit: two Granted at once on a Lease";
pub const OVER_CAPACITY: &str = "(a') audit: more Granted on a lock than its capacity";
pub const NOT_NAMED: &str =
    "(b') audit: an operator write left a Granted claim its Lease does not name";
pub const TOKEN: &str = "(c') audit: fencing token not increasing";
pub const AFTER_SUCCESSION: &str = "(g') audit: a replica wrote after another took leadership";
pub const VIEWS_DISAGREE: &str = "(v) a grant the watches saw is missing from the audit log";

/// Every audit check, for a report that lists each.
pub const STALE_ADMITTED: &str =
    "(d') audit: a guarded object was written with a lower token than it held";

/// Every audit check, for a report that lists each.
pub const CHECKS: [&str; 7] = [
    TWO_GRANTED,
    OVER_CAPACITY,
    NOT_NAMED,
    TOKEN,
    AFTER_SUCCESSION,
    VIEWS_DISAGREE,
    STALE_ADMITTED,
];

/// One successful write, as the audit log has it.
#[derive(Clone, Debug)]
pub struct Write {
    /// The resourceVersion the write produced (the object's last, for a delete).
    pub rv: u64,
    /// A delete (placed right after `rv`).
    pub delete: bool,
    /// `leases` or `lockclaims` or `locks`.
    pub resource: String,
    pub namespace: String,
    pub name: String,
    /// Who wrote: the impersonated user if any, else the authenticated one.
    pub user: String,
    /// The object after the write (before, for a delete).
    pub object: Value,
}

/// The writes of namespace `ns` in the audit log `text` (JSON lines), in
/// resourceVersion order.
///
/// A delete answers with a Status, not with the deletion's revision; it is placed right
/// after every write that had completed before the delete was received, after the
/// version its precondition named (the operator deletes with one), and after every write
/// of the same name that had completed before the delete did (a write the delete raced
/// with; never a later incarnation of the name, which is created after the delete):
/// as early as it can have happened, so that a deleted claim is never counted Granted
/// past its deletion (a state that lasted only until a deletion may be missed; none is
/// invented).
pub fn parse(text: &str, ns: &str) -> Vec<Write> {
    let mut writes = Vec::new();
    let mut deletes = Vec::new();
    for line in text.lines() {
        match event_of(line, ns) {
            Some(Event::Write(w, done)) => writes.push((w, done)),
            Some(Event::Delete(d)) => deletes.push(d),
            None => {}
        }
    }
    let all = Completions::new(writes.iter().map(|(w, done)| (*done, w.rv)));
    let mut per_name: HashMap<(&str, &str), Vec<(jiff::Timestamp, u64)>> = HashMap::new();
    for (w, done) in &writes {
        per_name
            .entry((w.resource.as_str(), w.name.as_str()))
            .or_default()
            .push((*done, w.rv));
    }
    let per_name: HashMap<(&str, &str), Completions> = per_name
        .into_iter()
        .map(|(k, v)| (k, Completions::new(v)))
        .collect();
    let mut out: Vec<Write> = Vec::with_capacity(writes.len() + deletes.len());
    for mut d in deletes {
        let raced = per_name
            .get(&(d.write.resource.as_str(), d.write.name.as_str()))
            .map_or(0, |c| c.last_rv_until(d.completed, true));
        d.write.rv = all
            .last_rv_until(d.received, false)
            .max(raced)
            .max(d.precondition.unwrap_or(0));
        out.push(d.write);
    }
    out.extend(writes.into_iter().map(|(w, _)| w));
    out.sort_by_key(|w| (w.rv, w.delete));
    out
}

/// Writes by completion time, with the highest resourceVersion completed so far.
struct Completions(Vec<(jiff::Timestamp, u64)>);

impl Completions {
    fn new(it: impl IntoIterator<Item = (jiff::Timestamp, u64)>) -> Completions {
        let mut v: Vec<_> = it.into_iter().collect();
        v.sort();
        let mut top = 0;
        for x in &mut v {
            top = top.max(x.1);
            x.1 = top;
        }
        Completions(v)
    }

    /// The highest resourceVersion among writes completed before `t` (or at `t` too).
    fn last_rv_until(&self, t: jiff::Timestamp, inclusive: bool) -> u64 {
        let n = self
            .0
            .partition_point(|(done, _)| if inclusive { *done <= t } else { *done < t });
        n.checked_sub(1).map_or(0, |i| self.0[i].1)
    }
}

/// A successful write (and when it completed), or a delete.
enum Event {
    Write(Write, jiff::Timestamp),
    Delete(Delete),
}

/// A successful delete: when the API server received it and answered it, and the
/// resourceVersion its precondition named, if any.
struct Delete {
    write: Write,
    received: jiff::Timestamp,
    completed: jiff::Timestamp,
    precondition: Option<u64>,
}

fn event_of(line: &str, ns: &str) -> Option<Event> {
    let e: Value = serde_json::from_str(line).ok()?;
    let verb = e["verb"].as_str()?;
    if !["create", "update", "patch", "delete"].contains(&verb) {
        return None;
    }
    let code = e["responseStatus"]["code"].as_u64().unwrap_or(0);
    if !(200..300).contains(&code) {
        return None;
    }
    let r = &e["objectRef"];
    if r["namespace"].as_str() != Some(ns) {
        return None;
    }
    let time = |k: &str| {
        e[k].as_str()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
    };
    let object = e["responseObject"].clone();
    let user = e["impersonatedUser"]["username"]
        .as_str()
        .or(e["user"]["username"].as_str())
        .unwrap_or_default()
        .to_string();
    let rv = object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok());
    let w = Write {
        rv: rv.unwrap_or(0),
        delete: verb == "delete",
        resource: r["resource"].as_str()?.to_string(),
        namespace: ns.to_string(),
        name: r["name"].as_str()?.to_string(),
        user,
        object,
    };
    if w.delete {
        let precondition = e["requestObject"]["preconditions"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok());
        Some(Event::Delete(Delete {
            write: w,
            received: time("requestReceivedTimestamp")?,
            completed: time("stageTimestamp")?,
            precondition,
        }))
    } else {
        rv?;
        Some(Event::Write(w, time("stageTimestamp")?))
    }
}

/// The state replayed so far.
#[derive(Default)]
struct State {
    claims: BTreeMap<String, Value>,
    leases: BTreeMap<String, Value>,
    capacities: BTreeMap<String, usize>,
    /// The holder identity of the leadership Lease, as last written.
    leader: Option<String>,
    /// Per lock, the highest token granted so far.
    tokens: HashMap<String, i64>,
    /// Per guarded object, the token it holds.
    guarded: HashMap<String, u128>,
    /// Leases whose last change was someone else's: deleted by a third party, or taken
    /// for the chaos run's intruder. A claim marked Granted meanwhile (its Lease was
    /// written, then deleted before its status landed) is the outsider's doing, and the
    /// operator demotes it on its next look (LeaseLost), as the watch view allows too.
    outsider: std::collections::BTreeSet<String>,
}

fn phase(c: &Value) -> Option<&str> {
    c["status"]["phase"].as_str()
}

/// The Lease a Granted claim holds.
fn held(c: &Value) -> String {
    c["status"]["lease"]
        .as_str()
        .or(c["spec"]["leaseName"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Every grant the audit log shows: (claim, fencing token).
pub fn grants(writes: &[Write]) -> BTreeSet<(String, i64)> {
    writes
        .iter()
        .filter(|w| w.resource == "lockclaims" && !w.delete)
        .filter(|w| phase(&w.object) == Some("Granted"))
        .filter_map(|w| Some((w.name.clone(), w.object["status"]["fencingToken"].as_i64()?)))
        .collect()
}

/// Grants (claim, fencing token) that a write to a claim of namespace `ns` carried while
/// the API server answered it with a server-side error (5xx: the writer gave up while
/// etcd restarted, a timeout). Such a write may have been committed all the same, and
/// then the audit log holds its request but not the object it made.
pub fn unknown_outcome_grants(text: &str, ns: &str) -> BTreeSet<(String, i64)> {
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|e| e["responseStatus"]["code"].as_u64().unwrap_or(0) >= 500)
        .filter(|e| ["create", "update", "patch"].contains(&e["verb"].as_str().unwrap_or("")))
        .filter(|e| e["objectRef"]["namespace"].as_str() == Some(ns))
        .filter(|e| e["objectRef"]["resource"].as_str() == Some("lockclaims"))
        .filter(|e| phase(&e["requestObject"]) == Some("Granted"))
        .filter_map(|e| {
            let name = e["objectRef"]["name"].as_str()?.to_string();
            Some((name, e["requestObject"]["status"]["fencingToken"].as_i64()?))
        })
        .collect()
}

/// The two views agree: every grant the watches saw (claim, token) is in the audit log,
/// or was carried by a write the API server answered with a 5xx (`unknown`: committed
/// all the same; counted apart). The audit log sees more (a grant that began and ended
/// inside a watch gap), never less.
pub fn views_agree(
    writes: &[Write],
    watched: &BTreeSet<(String, i64)>,
    unknown: &BTreeSet<(String, i64)>,
    r: &mut Report,
) {
    let audited = grants(writes);
    for (claim, token) in watched.difference(&audited) {
        if unknown.contains(&(claim.clone(), *token)) {
            r.count(
                "grants seen by the watches whose write the API server answered with a 5xx",
                1,
            );
            continue;
        }
        r.flag(
            VIEWS_DISAGREE,
            format!("{claim} Granted with token {token} in a watch, not in the audit log"),
        );
    }
    r.count(
        "grants seen by the watches, all in the audit log",
        watched.len(),
    );
}

/// Replays `writes` and checks every state. `operator` tells an operator replica's user
/// apart from anyone else's and gives the prefix of its leader identity; `leader_lease`
/// is the leadership Lease; `capacity` the default capacity of a lock. Returns the
/// grants seen (claims turning Granted).
pub fn check(
    writes: &[Write],
    operator: impl Fn(&str) -> Option<String>,
    leader_lease: &str,
    capacity: usize,
    r: &mut Report,
) -> usize {
    for c in CHECKS {
        r.violations.entry(c).or_default();
    }
    let mut s = State::default();
    let mut grants = 0;
    for w in writes {
        let replica = operator(&w.user);
        if let Some(id) = &replica {
            if w.name != leader_lease {
                let own = format!("{id}_");
                if let Some(l) = s.leader.as_deref().filter(|l| !l.starts_with(&own)) {
                    r.flag(
                        AFTER_SUCCESSION,
                        format!(
                            "{} wrote {}/{} at rv {} while {l} led",
                            w.user, w.resource, w.name, w.rv
                        ),
                    );
                }
            }
        }
        match (w.resource.as_str(), w.delete) {
            ("lockclaims", false) => grants += claim_written(&mut s, w, r),
            ("lockclaims", true) => {
                s.claims.remove(&w.name);
            }
            ("leases", false) if w.name == leader_lease => {
                s.leader = w.object["spec"]["holderIdentity"]
                    .as_str()
                    .map(String::from);
            }
            ("leases", false) => {
                s.leases.insert(w.name.clone(), w.object.clone());
                if replica.is_some() {
                    s.outsider.remove(&w.name);
                    lease_written_by_operator(&s, w, r);
                } else if w.object["spec"]["holderIdentity"].as_str() == Some("intruder") {
                    s.outsider.insert(w.name.clone());
                }
            }
            ("leases", true) => {
                s.leases.remove(&w.name);
                if replica.is_none() {
                    s.outsider.insert(w.name.clone());
                }
            }
            ("locks", false) => {
                let c = w.object["spec"]["capacity"].as_u64().unwrap_or(1) as usize;
                s.capacities.insert(w.name.clone(), c);
            }
            ("locks", true) => {
                s.capacities.remove(&w.name);
            }
            ("configmaps", false) => guarded_written(&mut s, w, r),
            _ => {}
        }
        granted_at_once(&s, w.rv, capacity, r);
    }
    r.count("grants in the audit history", grants);
    r.count("writes in the audit history", writes.len());
    grants
}

/// A claim written; returns 1 if it turned Granted (checking its token and its Lease).
fn claim_written(s: &mut State, w: &Write, r: &mut Report) -> usize {
    let before = s
        .claims
        .get(&w.name)
        .and_then(|c| phase(c).map(String::from));
    let c = w.object.clone();
    let now = phase(&c).map(String::from);
    s.claims.insert(w.name.clone(), c.clone());
    let granted = Phase::Granted;
    let is_granted = |p: &Option<String>| p.as_deref() == Some(format!("{granted:?}").as_str());
    if !is_granted(&now) || is_granted(&before) {
        return 0;
    }
    let lock = c["spec"]["leaseName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let token = c["status"]["fencingToken"].as_i64().unwrap_or(0);
    let max = s.tokens.entry(lock.clone()).or_default();
    if token <= *max {
        r.flag(
            TOKEN,
            format!(
                "{} granted {lock} with token {token} after {max} (rv {})",
                w.name, w.rv
            ),
        );
    }
    *max = (*max).max(token);
    // Marked Granted: its Lease must name it (the Lease is written first), unless
    // someone else deleted or took the Lease since.
    let lease = held(&c);
    if s.outsider.contains(&lease) {
        r.count(
            "grants not judged (their Lease deleted or taken by a third party before)",
            1,
        );
        return 1;
    }
    let named = s
        .leases
        .get(&lease)
        .and_then(|l| l["metadata"]["annotations"][CLAIM_ANNOTATION].as_str());
    if named != Some(w.name.as_str()) {
        r.flag(
            NOT_NAMED,
            format!(
                "{} marked Granted at rv {} while Lease {lease} names {named:?}",
                w.name, w.rv
            ),
        );
    }
    1
}

/// A guarded object (label `leasekeeper.io/fenced-by`) never stores a lower token.
fn guarded_written(s: &mut State, w: &Write, r: &mut Report) {
    let meta = &w.object["metadata"];
    if meta["labels"][leasekeeper::api::FENCED_BY_LABEL]
        .as_str()
        .is_none()
    {
        return;
    }
    let Some(token) = meta["annotations"][leasekeeper::api::FENCING_TOKEN_ANNOTATION]
        .as_str()
        .and_then(|t| t.parse::<u128>().ok())
    else {
        return;
    };
    let held = s.guarded.entry(w.name.clone()).or_default();
    if token < *held {
        r.flag(
            STALE_ADMITTED,
            format!(
                "{} stored token {token} over {held} (rv {}, by {})",
                w.name, w.rv, w.user
            ),
        );
    }
    *held = (*held).max(token);
    r.count("guarded writes in the audit history", 1);
}

/// An operator's Lease write must not leave another claim Granted on that Lease.
fn lease_written_by_operator(s: &State, w: &Write, r: &mut Report) {
    let named = w.object["metadata"]["annotations"][CLAIM_ANNOTATION].as_str();
    for (name, c) in &s.claims {
        if phase(c) == Some("Granted") && held(c) == w.name && named != Some(name.as_str()) {
            r.flag(
                NOT_NAMED,
                format!(
                    "Lease {} written for {named:?} at rv {} while {name} is Granted on it",
                    w.name, w.rv
                ),
            );
        }
    }
}

/// At most one Granted claim per Lease, and at most the capacity per lock.
fn granted_at_once(s: &State, rv: u64, capacity: usize, r: &mut Report) {
    let mut per_lease: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut per_lock: BTreeMap<String, usize> = BTreeMap::new();
    for (name, c) in &s.claims {
        if phase(c) == Some("Granted") {
            per_lease.entry(held(c)).or_default().push(name);
            *per_lock
                .entry(
                    c["spec"]["leaseName"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
                .or_default() += 1;
        }
    }
    for (lease, holders) in per_lease.iter().filter(|(_, h)| h.len() > 1) {
        r.flag(
            TWO_GRANTED,
            format!("{holders:?} Granted at once on Lease {lease} (rv {rv})"),
        );
    }
    for (lock, n) in per_lock {
        let cap = s.capacities.get(&lock).copied().unwrap_or(capacity);
        if n > cap {
            r.flag(
                OVER_CAPACITY,
                format!("{n} Granted on lock {lock} of capacity {cap} (rv {rv})"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn w(rv: u64, resource: &str, name: &str, user: &str, object: Value) -> Write {
        Write {
            rv,
            delete: false,
            resource: resource.into(),
            namespace: "ns".into(),
            name: name.into(),
            user: user.into(),
            object,
        }
    }

    fn claim(phase: &str, token: i64) -> Value {
        json!({"spec": {"leaseName": "l"}, "status": {"phase": phase, "fencingToken": token}})
    }

    fn lease(claim: &str) -> Value {
        json!({"metadata": {"annotations": {CLAIM_ANNOTATION: claim}}})
    }

    fn op(user: &str) -> Option<String> {
        user.strip_prefix("lk-").map(String::from)
    }

    fn leader(id: &str) -> Value {
        json!({"spec": {"holderIdentity": id}})
    }

    fn run(writes: &[Write]) -> Report {
        let mut r = Report::default();
        check(writes, op, "leasekeeper-leader", 1, &mut r);
        r
    }

    #[test]
    fn a_clean_handoff_passes() {
        let r = run(&[
            w(
                1,
                "leases",
                "leasekeeper-leader",
                "lk-op-0",
                leader("op-0_ab"),
            ),
            w(2, "leases", "l", "lk-op-0", lease("a")),
            w(3, "lockclaims", "a", "lk-op-0", claim("Granted", 2)),
            w(4, "lockclaims", "a", "lk-op-0", claim("Released", 2)),
            w(5, "leases", "l", "lk-op-0", lease("b")),
            w(6, "lockclaims", "b", "lk-op-0", claim("Granted", 5)),
        ]);
        assert_eq!(r.violation_count(), 0, "{:?}", r.violations);
    }

    #[test]
    fn the_handoff_reorder_is_caught_at_the_lease_write() {
        // A Granted -> Lease written for B -> A not Granted -> B Granted.
        let r = run(&[
            w(2, "leases", "l", "lk-op-0", lease("a")),
            w(3, "lockclaims", "a", "lk-op-0", claim("Granted", 2)),
            w(4, "leases", "l", "lk-op-0", lease("b")),
            w(5, "lockclaims", "a", "lk-op-0", claim("Released", 2)),
            w(6, "lockclaims", "b", "lk-op-0", claim("Granted", 4)),
        ]);
        assert_eq!(r.of(NOT_NAMED).len(), 1, "{:?}", r.violations);
        assert!(r.of(TWO_GRANTED).is_empty());
    }

    #[test]
    fn a_double_grant_between_two_writes_is_seen_whatever_a_watch_missed() {
        let r = run(&[
            w(3, "lockclaims", "a", "lk-op-0", claim("Granted", 2)),
            w(4, "lockclaims", "b", "lk-op-0", claim("Granted", 4)),
            w(5, "lockclaims", "a", "lk-op-0", claim("Released", 2)),
        ]);
        assert_eq!(r.of(TWO_GRANTED).len(), 1);
    }

    #[test]
    fn tokens_and_succession_are_checked_and_third_parties_are_not_replicas() {
        let r = run(&[
            w(
                1,
                "leases",
                "leasekeeper-leader",
                "lk-op-0",
                leader("op-0_ab"),
            ),
            w(2, "leases", "l", "lk-op-0", lease("a")),
            w(3, "lockclaims", "a", "lk-op-0", claim("Granted", 9)),
            w(
                4,
                "leases",
                "leasekeeper-leader",
                "lk-op-1",
                leader("op-1_cd"),
            ),
            w(5, "lockclaims", "a", "lk-op-0", claim("Released", 9)),
            w(6, "leases", "l", "admin", lease("someone")),
            w(7, "leases", "l", "lk-op-1", lease("b")),
            w(8, "lockclaims", "b", "lk-op-1", claim("Granted", 3)),
        ]);
        assert_eq!(r.of(AFTER_SUCCESSION).len(), 1, "op-0 wrote after op-1 led");
        assert_eq!(r.of(TOKEN).len(), 1, "3 after 9");
        assert!(
            r.of(NOT_NAMED).is_empty(),
            "the third party's Lease write is not the operator's"
        );
    }

    #[test]
    fn a_grant_published_after_a_third_party_deleted_its_lease_is_not_the_operators_doing() {
        let deleted = |rv: u64, user: &str| Write {
            delete: true,
            ..w(rv, "leases", "l", user, json!({}))
        };
        // Lease written for a, deleted by someone else, then a's Granted status lands.
        let r = run(&[
            w(1, "leases", "l", "lk-op-0", lease("a")),
            deleted(2, "admin"),
            w(3, "lockclaims", "a", "lk-op-0", claim("Granted", 1)),
        ]);
        assert!(r.of(NOT_NAMED).is_empty());
        // The operator's own delete is no excuse; nor is an outsider's change the operator
        // has written over since.
        let r = run(&[
            w(1, "leases", "l", "lk-op-0", lease("a")),
            deleted(2, "lk-op-0"),
            w(3, "lockclaims", "a", "lk-op-0", claim("Granted", 1)),
        ]);
        assert_eq!(r.of(NOT_NAMED).len(), 1);
        let r = run(&[
            deleted(1, "admin"),
            w(2, "leases", "l", "lk-op-0", lease("b")),
            w(3, "lockclaims", "a", "lk-op-0", claim("Granted", 1)),
        ]);
        assert_eq!(r.of(NOT_NAMED).len(), 1);
    }

    #[test]
    fn audit_lines_are_parsed_and_ordered_by_resource_version() {
        let line = |rv: &str, verb: &str, name: &str| {
            json!({
                "verb": verb,
                "objectRef": {"resource": "lockclaims", "namespace": "ns", "name": name, "subresource": "status"},
                "user": {"username": "admin"},
                "impersonatedUser": {"username": "lk-op-2"},
                "responseStatus": {"code": 200},
                "responseObject": {"metadata": {"resourceVersion": rv}},
                "requestReceivedTimestamp": format!("2026-12-04T10:00:{rv}Z"),
                "stageTimestamp": format!("2026-12-04T10:00:{rv}.5Z"),
            })
            .to_string()
        };
        // A delete answers with a Status: placed after what completed before it came.
        let mut delete: Value = serde_json::from_str(&line("15", "delete", "c")).expect("json");
        delete["responseObject"] = json!({"kind": "Status", "status": "Success"});
        let text = [
            line("20", "patch", "b"),
            line("10", "update", "a"),
            delete.to_string(),
            line("x", "get", "d"),
        ]
        .join("\n");
        let ws = parse(&text, "ns");
        assert_eq!(
            ws.iter().map(|w| (w.rv, w.delete)).collect::<Vec<_>>(),
            [(10, false), (10, true), (20, false)]
        );
        assert_eq!(ws[0].user, "lk-op-2");
        assert_eq!(ws[1].name, "c");
        assert!(parse(&text, "other").is_empty());
    }

    #[test]
    fn a_delete_is_placed_by_its_own_time_never_after_a_later_incarnation_of_the_name() {
        let line = |verb: &str, name: &str, rv: Option<&str>, received: &str, done: &str| {
            let mut e = json!({
                "verb": verb,
                "objectRef": {"resource": "leases", "namespace": "ns", "name": name},
                "impersonatedUser": {"username": "lk-op-0"},
                "responseStatus": {"code": 200},
                "requestReceivedTimestamp": format!("2026-12-04T10:00:{received}Z"),
                "stageTimestamp": format!("2026-12-04T10:00:{done}Z"),
            });
            match rv {
                Some(rv) => e["responseObject"] = json!({"metadata": {"resourceVersion": rv}}),
                None => e["responseObject"] = json!({"kind": "Status"}),
            }
            e
        };
        let mut delete = line("delete", "x", None, "02.0", "02.2");
        delete["requestObject"] = json!({"preconditions": {"resourceVersion": "5"}});
        let text = [
            line("create", "x", Some("5"), "01.0", "01.1"),
            // A write of another object that completed while the delete was in flight.
            line("update", "y", Some("6"), "02.0", "02.1"),
            delete,
            // The name again, later: a new Lease.
            line("create", "x", Some("9"), "04.0", "04.1"),
            line("update", "x", Some("12"), "05.0", "05.1"),
        ]
        .map(|v| v.to_string())
        .join("\n");
        let ws = parse(&text, "ns");
        let d = ws.iter().find(|w| w.delete).expect("the delete");
        assert_eq!(
            d.rv, 5,
            "right after the version it deleted, not after rv 12"
        );

        // Without a precondition, a write of the same name that completed while the
        // delete was in flight comes before it.
        let mut racing = line("delete", "x", None, "02.0", "02.2");
        racing["objectRef"]["name"] = "x".into();
        let text = [
            line("create", "x", Some("5"), "01.0", "01.1"),
            line("update", "x", Some("7"), "01.9", "02.1"),
            racing,
            line("create", "x", Some("9"), "04.0", "04.1"),
        ]
        .map(|v| v.to_string())
        .join("\n");
        let ws = parse(&text, "ns");
        let d = ws.iter().find(|w| w.delete).expect("the delete");
        assert_eq!(d.rv, 7);
    }

    #[test]
    fn a_grant_answered_with_a_5xx_is_an_unknown_outcome_not_a_disagreement() {
        let failed = |code: u64, token: i64| {
            json!({
                "verb": "patch",
                "objectRef": {"resource": "lockclaims", "namespace": "ns", "name": "c", "subresource": "status"},
                "responseStatus": {"code": code},
                "requestObject": {"status": {"phase": "Granted", "fencingToken": token}},
            })
            .to_string()
        };
        let text = [failed(504, 7), failed(409, 8)].join("\n");
        let unknown = unknown_outcome_grants(&text, "ns");
        assert_eq!(unknown, BTreeSet::from([("c".to_string(), 7)]));
        assert!(unknown_outcome_grants(&text, "other").is_empty());

        let watched = BTreeSet::from([("c".to_string(), 7), ("c".to_string(), 8)]);
        let mut r = Report::default();
        views_agree(&[], &watched, &unknown, &mut r);
        // Token 8 was refused (409): a watch cannot have seen it; token 7 may have landed.
        assert_eq!(r.violations.get(VIEWS_DISAGREE).map(Vec::len), Some(1));
        assert_eq!(
            r.totals
                .get("grants seen by the watches whose write the API server answered with a 5xx"),
            Some(&1)
        );
    }
}

#[cfg(test)]
mod guarded_tests {
    use super::*;
    use serde_json::json;

    fn cm(token: &str) -> Value {
        json!({"metadata": {
            "labels": {leasekeeper::api::FENCED_BY_LABEL: "l"},
            "annotations": {leasekeeper::api::FENCING_TOKEN_ANNOTATION: token},
        }})
    }

    #[test]
    fn a_guarded_object_that_stores_a_lower_token_is_flagged() {
        let w = |rv: u64, token: &str| Write {
            rv,
            delete: false,
            resource: "configmaps".into(),
            namespace: "ns".into(),
            name: "guard-l".into(),
            user: "admin".into(),
            object: cm(token),
        };
        let mut r = Report::default();
        check(
            &[w(1, "5"), w(2, "7"), w(3, "7")],
            |_| None,
            "leader",
            1,
            &mut r,
        );
        assert!(r.of(STALE_ADMITTED).is_empty());
        let mut r = Report::default();
        check(
            &[w(1, "5"), w(2, "7"), w(3, "6")],
            |_| None,
            "leader",
            1,
            &mut r,
        );
        assert_eq!(r.of(STALE_ADMITTED).len(), 1);
    }
}
