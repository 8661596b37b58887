//! The chaos run's checks on the cluster it leaves behind, around the pure checker of
//! the test kit ([`testkit::checker`]).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client, ResourceExt};
use leasekeeper::api::{slot_lease, LockClaim};
use testkit::checker::{
    disagreeing_leases, register_log, replay_claims, replay_merged, unsettled_claims, Report,
    DISAGREES, LOST,
};
use testkit::recorder::History;
use tokio::time::Instant;

use crate::holder::LOCK_DELAY;

/// Judges the recorded history, then the cluster as the run leaves it.
pub async fn check(
    client: &Client,
    ns: &str,
    history: &History,
    locks: usize,
    capacity: u32,
) -> Report {
    let obs = history.lock().expect("lock").clone();
    let mut r = Report::default();
    replay_claims(&obs, usize::try_from(capacity).unwrap_or(1), &mut r);
    r.count("states observed", obs.len());
    replay_merged(&obs, LOCK_DELAY, &mut r);
    let cluster = Cluster::new(client, ns, locks, capacity);
    cluster.settled(&mut r).await;
    cluster.everyone_leaves(&mut r).await;
    cluster.registers(&mut r).await;
    r
}

/// The run's namespace, as the checker reads it.
struct Cluster {
    claims: Api<LockClaim>,
    leases: Api<Lease>,
    regs: Api<ConfigMap>,
    lease_names: Vec<String>,
}

impl Cluster {
    /// Every slot Lease of every lock.
    fn new(client: &Client, ns: &str, locks: usize, capacity: u32) -> Cluster {
        let lease_names = (0..locks)
            .flat_map(|l| (0..capacity.max(1)).map(move |s| slot_lease(&format!("lock-{l}"), s)))
            .collect();
        Cluster {
            claims: Api::namespaced(client.clone(), ns),
            leases: Api::namespaced(client.clone(), ns),
            regs: Api::namespaced(client.clone(), ns),
            lease_names,
        }
    }

    async fn list_claims(&self) -> Vec<LockClaim> {
        self.claims
            .list(&Default::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
    }

    async fn snapshot(&self) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
        let claims = self.list_claims().await;
        let mut leases = Vec::new();
        for name in &self.lease_names {
            leases.push((name.clone(), self.leases.get_opt(name).await.ok().flatten()));
        }
        (
            unsettled_claims(&claims),
            disagreeing_leases(&claims, &leases),
        )
    }

    /// (e) every live claim is Granted or Pending with a position, and (b) each Lease
    /// names its Granted claim or nobody. Only what holds still is judged: a state seen
    /// twice, 1.5 s apart, unchanged (same resourceVersions); a step in flight is not.
    async fn settled(&self, r: &mut Report) {
        let (c1, l1) = self.snapshot().await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (c2, l2) = self.snapshot().await;
        for (k, msg) in c2 {
            if c1.contains_key(&k) {
                r.flag(LOST, msg);
            }
        }
        for (k, msg) in l2 {
            if l1.contains_key(&k) {
                r.flag(DISAGREES, msg);
            }
        }
    }

    /// Then everyone leaves: every claim deleted, and every Lease must come to name
    /// nobody (or be collected).
    async fn everyone_leaves(&self, r: &mut Report) {
        for c in self.list_claims().await {
            let _ = self.claims.delete(&c.name_any(), &Default::default()).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && !self.list_claims().await.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        for name in &self.lease_names {
            let holder = self
                .leases
                .get_opt(name)
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec?.holder_identity)
                .filter(|h| !h.is_empty() && h != "intruder");
            if let Some(h) = holder {
                r.flag(
                    DISAGREES,
                    format!("{name} still names {h} after every claim was deleted"),
                );
            }
        }
        if !self.list_claims().await.is_empty() {
            r.flag(
                LOST,
                "claims still exist 30 s after they were deleted".into(),
            );
        }
    }

    /// (d) registers: tokens in each accepted log never go down.
    async fn registers(&self, r: &mut Report) {
        for lease in &self.lease_names {
            let name = format!("reg-{lease}");
            if let Ok(Some(cm)) = self.regs.get_opt(&name).await {
                register_log(&name, &cm.data.unwrap_or_default(), r);
            }
        }
    }
}
