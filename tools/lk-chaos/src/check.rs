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

/// How long the cluster may take to settle after the last fault before what is still
/// unsettled is judged: longer than an etcd restart, a leadership term and the longest
/// watch backoff (30 s) together.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// Unsettled claims and disagreeing Leases, each keyed by name@resourceVersion.
type Snapshot = (BTreeMap<String, String>, BTreeMap<String, String>);

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

    /// The unsettled claims and disagreeing Leases now; `None` while the API server
    /// does not answer every read (an empty answer must not pass for a settled one).
    async fn snapshot(&self) -> Option<Snapshot> {
        let claims = self.claims.list(&Default::default()).await.ok()?.items;
        let mut leases = Vec::new();
        for name in &self.lease_names {
            leases.push((name.clone(), self.leases.get_opt(name).await.ok()?));
        }
        Some((
            unsettled_claims(&claims),
            disagreeing_leases(&claims, &leases),
        ))
    }

    /// The first snapshot with nothing unsettled, or the last one taken when
    /// [`SETTLE_LIMIT`] runs out (empty if the API server never answered).
    async fn settling(&self, r: &mut Report) -> Snapshot {
        let started = Instant::now();
        let mut last = None;
        while started.elapsed() < SETTLE_LIMIT {
            if let Some(s) = self.snapshot().await {
                let calm = s.0.is_empty() && s.1.is_empty();
                last = Some(s);
                if calm {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        r.count(
            "seconds the cluster took to settle after the run",
            started.elapsed().as_secs() as usize,
        );
        last.unwrap_or_default()
    }

    /// (e) every live claim is Granted or Pending with a position, and (b) each Lease
    /// names its Granted claim or nobody. A run can end inside a control-plane outage
    /// (an etcd restart has kept the API server from writing for 18 s on a 2-core
    /// machine) or a leadership change, so the cluster gets up to [`SETTLE_LIMIT`] to
    /// settle; then only what holds still is judged: a state seen twice, 1.5 s apart,
    /// unchanged (same resourceVersions); a step in flight is not.
    async fn settled(&self, r: &mut Report) {
        let (c1, l1) = self.settling(r).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let Some((c2, l2)) = self.snapshot().await else {
            r.flag(
                LOST,
                "the API server did not answer the checker's reads after the run".into(),
            );
            return;
        };
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
