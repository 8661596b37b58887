//! Every LockClaim state a watcher sees in a namespace, in order, and the check that no
//! watcher ever saw two claims Granted on one Lease.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use leasekeeper::api::{LockClaim, Phase};
use tokio::time::Instant;

/// (when seen, the state, whether it was a deletion).
type Seen = Arc<Mutex<Vec<(Instant, LockClaim, bool)>>>;

/// Records every LockClaim state a watcher sees in a namespace, in order.
pub struct History {
    task: tokio::task::JoinHandle<()>,
    seen: Seen,
}

impl History {
    /// Starts watching `ns`; returns once the initial list is in.
    pub async fn record(client: &Client, ns: &str) -> History {
        let api: Api<LockClaim> = Api::namespaced(client.clone(), ns);
        let seen: Seen = Arc::default();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                let mut ready_tx = Some(ready_tx);
                let mut stream = watcher(api, watcher::Config::default())
                    .default_backoff()
                    .boxed();
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                            seen.lock().expect("lock").push((Instant::now(), o, false));
                        }
                        Ok(watcher::Event::Delete(o)) => {
                            seen.lock().expect("lock").push((Instant::now(), o, true));
                        }
                        Ok(watcher::Event::InitDone) => {
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        _ => {}
                    }
                }
            }
        });
        let _ = ready_rx.await;
        History { task, seen }
    }

    /// Every state seen so far, in order (deletions left out).
    pub fn states(&self) -> Vec<(Instant, LockClaim)> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, _, deleted)| !deleted)
            .map(|(t, c, _)| (*t, c.clone()))
            .collect()
    }

    /// Replays the stream: after every observed change, at most one claim per Lease is
    /// Granted. Returns how many states were checked.
    pub fn assert_never_two_granted(&self) -> usize {
        let mut latest: BTreeMap<String, LockClaim> = BTreeMap::new();
        let states = self.seen.lock().expect("lock").clone();
        for (_, c, deleted) in &states {
            let name = c.metadata.name.clone().unwrap_or_default();
            if *deleted {
                latest.remove(&name);
                continue;
            }
            latest.insert(name, c.clone());
            let mut per_lease: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for c in latest
                .values()
                .filter(|c| c.phase() == Some(Phase::Granted))
            {
                per_lease
                    .entry(c.spec.lease_name.as_str())
                    .or_default()
                    .push(c.metadata.name.clone().unwrap_or_default());
            }
            for (lease, holders) in per_lease {
                assert!(
                    holders.len() <= 1,
                    "a watcher saw {holders:?} Granted at once on Lease {lease}"
                );
            }
        }
        states.len()
    }

    /// Replays the stream: after every observed change, the claims Granted then.
    pub fn granted_states(&self) -> Vec<(Instant, Vec<LockClaim>)> {
        let mut latest: BTreeMap<String, LockClaim> = BTreeMap::new();
        let states = self.seen.lock().expect("lock").clone();
        let mut out = Vec::with_capacity(states.len());
        for (t, c, deleted) in states {
            let name = c.metadata.name.clone().unwrap_or_default();
            if deleted {
                latest.remove(&name);
            } else {
                latest.insert(name, c);
            }
            let granted = latest
                .values()
                .filter(|c| c.phase() == Some(Phase::Granted))
                .cloned()
                .collect();
            out.push((t, granted));
        }
        out
    }

    /// Whether `name` was ever seen in `phase`.
    pub fn ever(&self, name: &str, phase: Phase) -> bool {
        self.states()
            .iter()
            .any(|(_, c)| c.metadata.name.as_deref() == Some(name) && c.phase() == Some(phase))
    }

    /// When `name` was first seen in `phase`; waits up to 5 s for the recorder's own
    /// watch to catch up with whatever the caller already observed.
    pub async fn first(&self, name: &str, phase: Phase) -> Option<Instant> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found = self
                .states()
                .iter()
                .find(|(_, c)| c.metadata.name.as_deref() == Some(name) && c.phase() == Some(phase))
                .map(|(t, _)| *t);
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.task.abort();
    }
}
