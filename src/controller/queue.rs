//! A work queue keyed by Lease: each key is scheduled for an instant (the earliest one
//! asked for wins), handed out when due, and never to two workers at once; a key
//! scheduled while it is being worked on runs again right after.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::Notify;
use tokio::time::Instant;

struct State<K> {
    /// The instant each waiting key is due.
    due: HashMap<K, Instant>,
    /// The same instants, ordered; entries that no longer match `due` are skipped.
    heap: BinaryHeap<Reverse<(Instant, u64, K)>>,
    seq: u64,
    /// Keys being worked on.
    active: HashSet<K>,
    /// Active keys that fell due again while being worked on.
    again: HashSet<K>,
}

/// See the module documentation.
pub struct WorkQueue<K> {
    state: Mutex<State<K>>,
    notify: Notify,
}

impl<K: Clone + Eq + Hash + Ord> Default for WorkQueue<K> {
    fn default() -> Self {
        WorkQueue {
            state: Mutex::new(State {
                due: HashMap::new(),
                heap: BinaryHeap::new(),
                seq: 0,
                active: HashSet::new(),
                again: HashSet::new(),
            }),
            notify: Notify::new(),
        }
    }
}

impl<K: Clone + Eq + Hash + Ord> WorkQueue<K> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<K>> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Schedules `key` at `at`, unless it is already due earlier.
    pub fn schedule(&self, key: K, at: Instant) {
        let mut s = self.lock();
        if s.due.get(&key).is_some_and(|t| *t <= at) {
            return;
        }
        s.due.insert(key.clone(), at);
        s.seq += 1;
        let seq = s.seq;
        s.heap.push(Reverse((at, seq, key)));
        drop(s);
        self.notify.notify_one();
    }

    /// Schedules `key` now.
    pub fn now(&self, key: K) {
        self.schedule(key, Instant::now());
    }

    /// Waits for the next due key that nobody is working on, and marks it active.
    pub async fn next(&self) -> K {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake_at = {
                let mut s = self.lock();
                let now = Instant::now();
                let mut wake_at = None;
                while let Some(Reverse((at, _, key))) = s.heap.peek().cloned() {
                    if s.due.get(&key) != Some(&at) {
                        s.heap.pop();
                        continue;
                    }
                    if at > now {
                        wake_at = Some(at);
                        break;
                    }
                    s.heap.pop();
                    s.due.remove(&key);
                    if s.active.contains(&key) {
                        s.again.insert(key);
                        continue;
                    }
                    s.active.insert(key.clone());
                    return key;
                }
                wake_at
            };
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = &mut notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Marks `key` finished; if it fell due meanwhile it runs again at once.
    pub fn done(&self, key: &K) {
        let mut s = self.lock();
        s.active.remove(key);
        let again = s.again.remove(key);
        drop(s);
        if again {
            self.now(key.clone());
        } else {
            self.notify.notify_one();
        }
    }

    /// Keys waiting or active (for tests and metrics).
    pub fn len(&self) -> usize {
        let s = self.lock();
        s.due.len() + s.active.len()
    }

    /// Whether nothing waits and nothing runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn keys_come_out_in_due_order_and_the_earliest_schedule_wins() {
        let q = WorkQueue::default();
        let t0 = Instant::now();
        q.schedule("b", t0 + Duration::from_secs(2));
        q.schedule("a", t0 + Duration::from_secs(5));
        q.schedule("a", t0 + Duration::from_secs(1));
        q.schedule("a", t0 + Duration::from_secs(9));
        assert_eq!(q.next().await, "a");
        assert_eq!(Instant::now() - t0, Duration::from_secs(1));
        assert_eq!(q.next().await, "b");
        assert_eq!(Instant::now() - t0, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_active_key_is_not_handed_out_twice_and_reruns_after_done() {
        let q = std::sync::Arc::new(WorkQueue::default());
        q.now("k");
        assert_eq!(q.next().await, "k");
        q.now("k");
        q.now("other");
        assert_eq!(q.next().await, "other", "k is active, so it waits");
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.next().await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        q.done(&"k");
        assert_eq!(waiter.await.expect("joined"), "k");
    }
}
