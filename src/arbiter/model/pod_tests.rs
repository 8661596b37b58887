//! Pods as holders, on the model API server: claims made for gated Pods, Pods opened
//! only once their claim is Granted, holds ended by the Pod or by its node's silence.

use std::time::Duration;

use proptest::prelude::*;

use super::lease_world::{World, LEASE};
use crate::api::{Phase, Renewal};
use crate::arbiter::pods::claim_name;
use crate::arbiter::{NodeView, PodView, Reason, Step};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn pod(w: &mut World, name: &str) {
    w.rv += 1;
    w.pods.push(PodView {
        name: name.into(),
        uid: format!("uid-{name}"),
        lock: LEASE.into(),
        gated: true,
        finished: false,
        resource_version: w.rv.to_string(),
        priority: 0,
        lease_duration_seconds: 40,
        node: None,
    });
}

fn view<'a>(w: &'a mut World, name: &str) -> &'a mut PodView {
    w.pods.iter_mut().find(|p| p.name == name).expect("pod")
}

/// The Pod is scheduled on `node` and its kubelet heartbeats now.
fn heartbeat(w: &mut World, name: &str, node: &str) {
    let at = w.mono;
    view(w, name).node = Some(NodeView {
        name: node.into(),
        heard_at: at,
        lease_resource_version: Some(format!("hb-{}", at.as_millis())),
    });
}

fn token(w: &World, name: &str) -> i64 {
    w.status(&claim_name(name)).fencing_token.expect("token")
}

#[test]
fn a_gated_pod_gets_a_claim_and_is_opened_with_its_token_once_granted() {
    let mut w = World::default();
    pod(&mut w, "backup-0");
    let first = w.reconcile();
    assert!(
        matches!(&first.steps[0], Step::CreateClaim { claim } if claim.spec.renewal == Renewal::Pod
            && claim.identity() == "backup-0"
            && claim.metadata.owner_references.as_ref().is_some_and(|o| o[0].uid == "uid-backup-0")),
        "{:#?}",
        first.steps
    );
    w.settle();
    let claim = claim_name("backup-0");
    assert_eq!(w.phase(&claim), Some(Phase::Granted));
    assert_eq!(
        w.opened,
        vec![("backup-0".to_string(), token(&w, "backup-0"))]
    );
    assert!(!w.pods[0].gated, "the gate is gone");
    // Opened after the Granted status, in the same plan (the model checks the order).
    w.settle();
    assert_eq!(w.opened.len(), 1, "opened once");
    assert_eq!(w.claims.len(), 1, "one claim per Pod");
}

#[test]
fn a_finished_pod_hands_the_lock_to_the_next_pod_with_a_higher_token() {
    let mut w = World::default();
    pod(&mut w, "job-0");
    w.settle();
    pod(&mut w, "job-1");
    w.settle();
    assert_eq!(w.phase(&claim_name("job-1")), Some(Phase::Pending));
    assert!(w.pods[1].gated, "job-1 waits gated");
    view(&mut w, "job-0").finished = true;
    w.settle();
    let st = w.status(&claim_name("job-0"));
    assert_eq!(st.phase, Some(Phase::Released));
    assert_eq!(
        w.claims[&claim_name("job-0")]
            .condition(crate::api::CONDITION_GRANTED)
            .map(|c| c.reason.clone())
            .as_deref(),
        Some(Reason::PodFinished.as_str())
    );
    assert_eq!(w.phase(&claim_name("job-1")), Some(Phase::Granted));
    let t = &w.opened;
    assert_eq!(t.len(), 2);
    assert!(t[1].1 > t[0].1, "tokens rise: {t:?}");
}

#[test]
fn a_pod_that_is_gone_releases_its_claim_waiting_or_holding() {
    let mut w = World::default();
    pod(&mut w, "a");
    pod(&mut w, "b");
    w.settle();
    w.pods.retain(|p| p.name != "b");
    w.settle();
    assert_eq!(
        w.phase(&claim_name("b")),
        Some(Phase::Released),
        "a waiter whose Pod went"
    );
    w.pods.clear();
    w.settle();
    assert_eq!(w.phase(&claim_name("a")), Some(Phase::Released));
    assert_eq!(w.holder(), None, "the Lease is cleared");
}

#[test]
fn a_heartbeating_node_keeps_the_hold_and_a_silent_one_loses_it_after_the_duration() {
    let mut w = World::default();
    pod(&mut w, "a");
    pod(&mut w, "b");
    w.settle();
    heartbeat(&mut w, "a", "node-1");
    // Ten minutes of heartbeats every 10 s: never lost.
    for _ in 0..60 {
        w.advance(secs(10));
        heartbeat(&mut w, "a", "node-1");
        w.settle();
        assert_eq!(w.phase(&claim_name("a")), Some(Phase::Granted));
    }
    // Silent: lost exactly at the claim's 40 s, not before, after a fresh read.
    w.advance(secs(39));
    w.settle();
    assert_eq!(w.phase(&claim_name("a")), Some(Phase::Granted));
    w.advance(secs(1));
    let plan = w.reconcile();
    assert!(
        plan.steps
            .iter()
            .any(|s| matches!(s, Step::VerifyNode { node, .. } if node == "node-1")),
        "the node's heartbeat is read afresh before the verdict: {:#?}",
        plan.steps
    );
    w.settle();
    assert_eq!(w.phase(&claim_name("a")), Some(Phase::Expired));
    assert_eq!(w.phase(&claim_name("b")), Some(Phase::Granted), "handed on");
}

#[test]
fn a_lost_node_keeps_the_lock_free_for_the_lock_delay() {
    let mut w = World::default();
    pod(&mut w, "a");
    w.settle();
    let c = claim_name("a");
    // A Pod claim with a lock delay (a template annotation does not set it; a claim
    // made by hand with renewal Pod can).
    w.claims.get_mut(&c).expect("claim").spec.lock_delay_seconds = 30;
    heartbeat(&mut w, "a", "node-1");
    pod(&mut w, "b");
    w.settle();
    w.advance(secs(40));
    w.settle();
    assert_eq!(w.phase(&c), Some(Phase::Expired));
    assert_eq!(
        w.phase(&claim_name("b")),
        Some(Phase::Pending),
        "lock delay"
    );
    w.advance(secs(30));
    w.settle();
    assert_eq!(w.phase(&claim_name("b")), Some(Phase::Granted));
}

#[test]
fn a_pod_is_opened_only_for_the_lock_its_label_names() {
    let mut w = World::default();
    pod(&mut w, "p");
    view(&mut w, "p").lock = "other-lock".into();
    // Someone makes a Pod claim for p on this lock: it may be granted, but p asks for
    // another lock, so p is not opened by it.
    let mut s = super::lease_world::spec(15);
    s.renewal = Renewal::Pod;
    s.holder_identity = Some("p".into());
    w.create("forged", s);
    w.settle();
    assert!(
        w.opened.is_empty(),
        "p was opened by a claim for a lock it did not ask for"
    );
    assert!(w.pods[0].gated);
}

#[test]
fn an_opening_that_met_a_newer_pod_is_made_again() {
    let mut w = World::default();
    pod(&mut w, "a");
    w.reconcile(); // creates the claim
                   // The Pod changes between the plan and its opening (the kubelet, a label edit).
    let plan = w.plan();
    let snapshot = w.rvs();
    w.rv += 1;
    view(&mut w, "a").resource_version = w.rv.to_string();
    w.apply(&plan, &snapshot, usize::MAX);
    assert_eq!(w.phase(&claim_name("a")), Some(Phase::Granted));
    assert!(w.opened.is_empty(), "the opening met the newer Pod");
    w.settle();
    assert_eq!(
        w.opened,
        vec![("a".to_string(), token(&w, "a"))],
        "made again with the status's token"
    );
}

proptest! {
    #![proptest_config(super::proptests::config())]
    /// Random Pods appearing, finishing, going, scheduling and heartbeating: a Pod is
    /// only ever opened while its claim is Granted (the model checks it on every
    /// opening), at most one claim is Granted at a time (checked after every write),
    /// and a Pod whose node heartbeats in time never loses its hold.
    #[test]
    fn pods_are_opened_only_under_a_grant_and_healthy_ones_keep_it(
        ops in proptest::collection::vec((0u8..6, 0u8..4, 0u64..25), 1..60)
    ) {
        let mut w = World { panic_on_violation: false, ..World::default() };
        let mut healthy: Vec<String> = Vec::new();
        for (op, id, secs_) in ops {
            let name = format!("p{id}");
            let exists = w.pods.iter().any(|p| p.name == name);
            match op {
                0 if !exists => pod(&mut w, &name),
                1 if exists => view(&mut w, &name).finished = true,
                2 if exists => { w.pods.retain(|p| p.name != name); healthy.retain(|h| *h != name); }
                3 if exists && !w.pods.iter().any(|p| p.name == name && p.gated) => {
                    heartbeat(&mut w, &name, &format!("node-{id}"));
                    if !healthy.contains(&name) { healthy.push(name.clone()); }
                }
                _ => {}
            }
            // Healthy Pods' nodes heartbeat every 10 s while time passes.
            let mut left = secs(secs_);
            while !left.is_zero() {
                let step = left.min(secs(10));
                w.advance(step);
                left -= step;
                for h in healthy.clone() {
                    if w.pods.iter().any(|p| p.name == h) {
                        heartbeat(&mut w, &h, "node");
                    }
                }
            }
            w.reconcile();
            prop_assert!(w.violations.is_empty(), "{:?}", w.violations);
            prop_assert!(w.check().is_ok(), "{:?}", w.check());
            for h in &healthy {
                let c = claim_name(h);
                let lost = w.claims.get(&c).and_then(|c| c.condition(crate::api::CONDITION_GRANTED))
                    .is_some_and(|x| x.reason == Reason::NodeLost.as_str());
                prop_assert!(!lost, "{h} lost its hold although its node heartbeats");
            }
        }
    }
}
