//! The workers: due keys of the work queue handed to reconciles, a bounded number at
//! once; a panic in one contained; on stop, in-flight work drained before returning.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use super::workqueue::{Grouped, WorkQueue};

/// Serves `queue` until `stop` turns true: each due key goes to `work`, at most
/// `concurrency` at once and never one key twice at once. A panic in `work` is
/// contained: `on_panic(key)` is told (it counts and reschedules), and the key is
/// released either way, so that one bad reconcile never wedges its key or the loop.
/// Once stopped, waits up to `drain` for started work to finish; returns whether all did.
pub(super) async fn serve<K, W, Fut, P>(
    queue: Arc<WorkQueue<K>>,
    concurrency: usize,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
    work: W,
    on_panic: P,
) -> bool
where
    K: Grouped + Send + Sync + 'static,
    K::Group: Send,
    W: Fn(K) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
    P: Fn(&K) + Send + Sync + 'static,
{
    let concurrency = concurrency.max(1);
    let permits = Arc::new(Semaphore::new(concurrency));
    let on_panic = Arc::new(on_panic);
    loop {
        // A free slot first, then the key: the queue chooses whose turn it is when the
        // work can start, not before.
        let permit = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let key = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            key = queue.next() => key,
        };
        let running = tokio::spawn(work(key.clone()));
        let (queue, on_panic) = (queue.clone(), on_panic.clone());
        tokio::spawn(async move {
            if let Err(e) = running.await {
                if e.is_panic() {
                    on_panic(&key);
                }
            }
            queue.done(&key);
            drop(permit);
        });
    }
    let all = u32::try_from(concurrency).unwrap_or(u32::MAX);
    tokio::time::timeout(drain, permits.acquire_many(all))
        .await
        .is_ok_and(|p| p.is_ok())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use tokio::time::Instant;

    use super::*;

    impl Grouped for u32 {
        type Group = ();
        fn group(&self) {}
    }

    #[tokio::test]
    async fn a_panicking_reconcile_is_contained_counted_and_its_key_runs_again() {
        let queue = Arc::new(WorkQueue::default());
        let (stop_tx, stop) = watch::channel(false);
        let done: Arc<Mutex<Vec<&'static str>>> = Arc::default();
        let boom_runs = Arc::new(AtomicUsize::new(0));
        let panics = Arc::new(AtomicUsize::new(0));
        let work = {
            let (done, boom_runs) = (done.clone(), boom_runs.clone());
            move |key: &'static str| {
                let (done, boom_runs) = (done.clone(), boom_runs.clone());
                async move {
                    if key == "boom" && boom_runs.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("injected panic in the reconcile of {key}");
                    }
                    done.lock().expect("lock").push(key);
                }
            }
        };
        let on_panic = {
            let (queue, panics) = (queue.clone(), panics.clone());
            move |key: &&'static str| {
                panics.fetch_add(1, Ordering::SeqCst);
                queue.schedule(*key, Instant::now() + Duration::from_millis(20));
            }
        };
        let server = tokio::spawn(serve(
            queue.clone(),
            2,
            stop,
            Duration::from_secs(1),
            work,
            on_panic,
        ));
        queue.now("boom");
        queue.now("a");
        queue.now("b");
        let deadline = Instant::now() + Duration::from_secs(5);
        while done.lock().expect("lock").len() < 3 {
            assert!(Instant::now() < deadline, "work stalled: {:?}", done.lock());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(panics.load(Ordering::SeqCst), 1, "the panic was counted");
        assert_eq!(
            boom_runs.load(Ordering::SeqCst),
            2,
            "the key ran again after its panic"
        );
        let mut seen = done.lock().expect("lock").clone();
        seen.sort();
        assert_eq!(seen, ["a", "b", "boom"]);
        // The key is not wedged: it can be scheduled and run once more.
        queue.now("boom");
        while done.lock().expect("lock").len() < 4 {
            assert!(Instant::now() < deadline, "boom wedged");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop_tx.send(true).expect("stop");
        assert!(server.await.expect("server"), "drained");
    }

    #[tokio::test]
    async fn stop_waits_for_work_in_flight_and_starts_nothing_new() {
        let queue = Arc::new(WorkQueue::default());
        let (stop_tx, stop) = watch::channel(false);
        let finished = Arc::new(AtomicUsize::new(0));
        let work = {
            let finished = finished.clone();
            move |_key: u32| {
                let finished = finished.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                }
            }
        };
        let server = tokio::spawn(serve(
            queue.clone(),
            4,
            stop,
            Duration::from_secs(2),
            work,
            |_: &u32| {},
        ));
        queue.now(1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop_tx.send(true).expect("stop");
        queue.now(2);
        assert!(server.await.expect("server"), "drained in time");
        assert_eq!(
            finished.load(Ordering::SeqCst),
            1,
            "in-flight work finished; key 2 never started"
        );
    }
}
