//! A work queue keyed by Lease: each key is scheduled for an instant (the earliest one
//! asked for wins), handed out when due, and never to two workers at once; a key
//! scheduled while it is being worked on runs again right after.
//!
//! Fair across groups (namespaces): due keys wait in one line per group, and the lines
//! are served in turn, each with at most `group_limit` keys in flight. A namespace with
//! ten thousand due keys delays a key of a quiet namespace by at most one turn, not by
//! its whole backlog.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::Notify;
use tokio::time::Instant;

/// A key that belongs to a group served in turn with the others.
pub trait Grouped: Clone + Eq + Hash + Ord {
    /// The group (for a Lease key, its namespace).
    type Group: Clone + Eq + Hash;
    /// This key's group.
    fn group(&self) -> Self::Group;
}

struct State<K: Grouped> {
    /// The instant each scheduled, not yet due key is due.
    due: HashMap<K, Instant>,
    /// The same instants, ordered; entries that no longer match `due` are skipped.
    heap: BinaryHeap<Reverse<(Instant, u64, K)>>,
    seq: u64,
    /// Due keys, one line per group.
    ready: HashMap<K::Group, VecDeque<K>>,
    /// Keys in some line of `ready`.
    queued: HashSet<K>,
    /// Groups with due keys, in the order they are served.
    turns: VecDeque<K::Group>,
    /// Keys being worked on, and how many per group.
    active: HashSet<K>,
    in_flight: HashMap<K::Group, usize>,
    /// Active keys that fell due again while being worked on.
    again: HashSet<K>,
}

/// See the module documentation.
pub struct WorkQueue<K: Grouped> {
    state: Mutex<State<K>>,
    notify: Notify,
    group_limit: usize,
}

impl<K: Grouped> Default for WorkQueue<K> {
    fn default() -> Self {
        WorkQueue::with_group_limit(usize::MAX)
    }
}

impl<K: Grouped> WorkQueue<K> {
    /// A queue that lets at most `group_limit` keys of one group be in flight.
    pub fn with_group_limit(group_limit: usize) -> Self {
        WorkQueue {
            state: Mutex::new(State {
                due: HashMap::new(),
                heap: BinaryHeap::new(),
                seq: 0,
                ready: HashMap::new(),
                queued: HashSet::new(),
                turns: VecDeque::new(),
                active: HashSet::new(),
                in_flight: HashMap::new(),
                again: HashSet::new(),
            }),
            notify: Notify::new(),
            group_limit: group_limit.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K>> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Schedules `key` at `at`, unless it is already due earlier.
    pub fn schedule(&self, key: K, at: Instant) {
        let mut s = self.lock();
        if s.queued.contains(&key) || s.due.get(&key).is_some_and(|t| *t <= at) {
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

    /// Waits for the next due key that nobody is working on, taking the groups in
    /// turn, and marks it active.
    pub async fn next(&self) -> K {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake_at = {
                let mut s = self.lock();
                let wake_at = s.move_due(Instant::now());
                if let Some(key) = s.take_turn(self.group_limit) {
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
        if s.active.remove(key) {
            let g = key.group();
            if let Some(n) = s.in_flight.get_mut(&g) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    s.in_flight.remove(&g);
                }
            }
        }
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
        s.due.len() + s.queued.len() + s.active.len()
    }

    /// Whether nothing waits and nothing runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Grouped> State<K> {
    /// Moves the keys due by `now` into their group's line (an active one is marked to
    /// run again instead); returns when the next scheduled key falls due.
    fn move_due(&mut self, now: Instant) -> Option<Instant> {
        while let Some(Reverse((at, _, key))) = self.heap.peek().cloned() {
            if self.due.get(&key) != Some(&at) {
                self.heap.pop();
                continue;
            }
            if at > now {
                return Some(at);
            }
            self.heap.pop();
            self.due.remove(&key);
            if self.active.contains(&key) {
                self.again.insert(key);
            } else if self.queued.insert(key.clone()) {
                let line = self.ready.entry(key.group()).or_default();
                if line.is_empty() {
                    self.turns.push_back(key.group());
                }
                line.push_back(key);
            }
        }
        None
    }

    /// The first key of the next group in turn that is below its in-flight limit.
    fn take_turn(&mut self, limit: usize) -> Option<K> {
        for _ in 0..self.turns.len() {
            let g = self.turns.pop_front()?;
            if self.in_flight.get(&g).copied().unwrap_or(0) >= limit {
                self.turns.push_back(g);
                continue;
            }
            let line = self.ready.get_mut(&g)?;
            let key = line.pop_front()?;
            if line.is_empty() {
                self.ready.remove(&g);
            } else {
                self.turns.push_back(g.clone());
            }
            self.queued.remove(&key);
            self.active.insert(key.clone());
            *self.in_flight.entry(g).or_default() += 1;
            return Some(key);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Test keys: the group is the part before the slash.
    impl Grouped for &'static str {
        type Group = &'static str;
        fn group(&self) -> &'static str {
            self.split('/').next().unwrap_or_default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn groups_are_served_in_turn_whatever_their_backlog() {
        let q = WorkQueue::default();
        for k in ["busy/1", "busy/2", "busy/3", "busy/4"] {
            q.now(k);
        }
        tokio::time::advance(Duration::from_millis(1)).await;
        q.now("quiet/1");
        let mut order = Vec::new();
        for _ in 0..5 {
            let k = q.next().await;
            order.push(k);
            q.done(&k);
        }
        assert_eq!(order, ["busy/1", "quiet/1", "busy/2", "busy/3", "busy/4"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_at_its_in_flight_limit_waits_while_others_run() {
        let q = WorkQueue::with_group_limit(2);
        for k in ["busy/1", "busy/2", "busy/3"] {
            q.now(k);
        }
        q.now("quiet/1");
        let a = q.next().await;
        let b = q.next().await;
        let c = q.next().await;
        assert_eq!([a, b, c], ["busy/1", "quiet/1", "busy/2"]);
        let blocked = tokio::time::timeout(Duration::from_millis(10), q.next()).await;
        assert!(blocked.is_err(), "busy/3 ran beyond the limit of 2");
        q.done(&"busy/1");
        assert_eq!(q.next().await, "busy/3");
    }

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
        let q = WorkQueue::default();
        q.now("k");
        assert_eq!(q.next().await, "k");
        q.now("k");
        q.now("other");
        assert_eq!(q.next().await, "other", "k is active, so it waits");
        let blocked = tokio::time::timeout(Duration::from_millis(10), q.next()).await;
        assert!(blocked.is_err(), "k was handed out twice");
        q.done(&"k");
        assert_eq!(q.next().await, "k");
    }
}
