//! What every scenario measures with: latency statistics, a watch that notes when each
//! claim first reached each phase, the API server's request counters, process stats,
//! and the markdown report.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use leasekeeper::api::{LockClaim, LockClaimSpec, Phase, Renewal};
use tokio::time::Instant;

/// Latency quantiles of one sample.
pub struct Stats {
    pub n: usize,
    /// The samples, sorted (for the figures).
    pub samples: Vec<Duration>,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// Quantiles (nearest rank) of `v`.
pub fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let n = v.len();
    let q = |p: f64| {
        if n == 0 {
            Duration::ZERO
        } else {
            v[((n as f64 * p).ceil() as usize).clamp(1, n) - 1]
        }
    };
    Stats {
        n,
        p50: q(0.50),
        p90: q(0.90),
        p99: q(0.99),
        max: v.last().copied().unwrap_or_default(),
        samples: v,
    }
}

/// Milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// (namespace, claim) -> (Lease name, first time seen in each phase).
type SeenMap = HashMap<(String, String), (String, HashMap<Phase, Instant>)>;

/// First time each claim was seen in each phase, from one namespace-wide watch.
#[derive(Clone, Default)]
pub struct Seen {
    map: Arc<Mutex<SeenMap>>,
    notify: Arc<tokio::sync::Notify>,
}

impl Seen {
    /// Starts watching `ns`; returns once the initial list is in.
    pub async fn start(client: &Client, ns: &str) -> (Seen, tokio::task::JoinHandle<()>) {
        let seen = Seen::default();
        let api: Api<LockClaim> = Api::namespaced(client.clone(), ns);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c)) => s.note(&c),
                    Ok(watcher::Event::InitDone) => {
                        if let Some(t) = tx.take() {
                            let _ = t.send(());
                        }
                    }
                    _ => {}
                }
            }
        });
        let _ = rx.await;
        (seen, task)
    }

    fn note(&self, c: &LockClaim) {
        let now = Instant::now();
        if let Some(p) = c.phase() {
            let key = (
                c.metadata.namespace.clone().unwrap_or_default(),
                c.metadata.name.clone().unwrap_or_default(),
            );
            let mut m = self.map.lock().expect("lock");
            let e = m
                .entry(key)
                .or_insert_with(|| (c.spec.lease_name.clone(), HashMap::new()));
            e.1.entry(p).or_insert(now);
        }
        self.notify.notify_waiters();
    }

    /// When claim `name` was first seen in `phase` (waits up to `timeout`).
    pub async fn wait(
        &self,
        ns: &str,
        name: &str,
        phase: Phase,
        timeout: Duration,
    ) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.notify.notified();
            if let Some(t) = self
                .map
                .lock()
                .expect("lock")
                .get(&(ns.to_string(), name.to_string()))
                .and_then(|e| e.1.get(&phase).copied())
            {
                return Some(t);
            }
            if tokio::time::timeout_at(deadline, n).await.is_err() {
                return None;
            }
        }
    }

    /// The claim (any name) on `lease` first seen in `phase`.
    pub async fn wait_lease(
        &self,
        ns: &str,
        lease: &str,
        phase: Phase,
        timeout: Duration,
    ) -> Option<(String, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.notify.notified();
            let found = self
                .map
                .lock()
                .expect("lock")
                .iter()
                .find_map(|((cns, name), (l, ph))| {
                    (cns == ns && l == lease)
                        .then(|| ph.get(&phase).map(|t| (name.clone(), *t)))
                        .flatten()
                });
            if found.is_some() {
                return found;
            }
            if tokio::time::timeout_at(deadline, n).await.is_err() {
                return None;
            }
        }
    }
}

/// A claim spec for `lease`.
pub fn spec(lease: &str, renewal: Renewal, duration: i32) -> LockClaimSpec {
    LockClaimSpec {
        lease_duration_seconds: duration,
        renewal,
        ..testkit::spec(lease)
    }
}

/// Sums of `apiserver_request_total` by (verb, resource[/subresource]) for our resources.
pub async fn apiserver_requests(client: &Client) -> BTreeMap<String, f64> {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("request");
    let text = client.request_text(req).await.unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let label = |k: &str| {
            line.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
        };
        let resource = label("resource");
        if !["leases", "lockclaims", "events", "locks"].contains(&resource) {
            continue;
        }
        let sub = label("subresource");
        let sub = if sub.is_empty() {
            String::new()
        } else {
            format!("/{sub}")
        };
        let key = format!("{} {resource}{sub}", label("verb"));
        let v: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry(key).or_insert(0.0) += v;
    }
    out
}

/// The requests between two counter snapshots, per `per` operations.
pub fn delta(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>, per: usize) -> String {
    let mut parts = Vec::new();
    for (k, v) in b {
        let d = v - a.get(k).copied().unwrap_or(0.0);
        if d > 0.0 && !k.starts_with("WATCH") {
            parts.push(format!("{k}: {:.2}", d / per.max(1) as f64));
        }
    }
    parts.join(", ")
}

/// The samples of every operator metric starting with `prefix`, by full series name.
pub fn operator_metric(text: &str, prefix: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Waits until the operator's writes stop (no change of `leasekeeper_api_writes_total`
/// over 3 s, at most 5 minutes): Events are published at `--event-qps`, so a burst of
/// grants goes on costing writes for a while after the grants themselves.
pub async fn writes_settled(metrics_addr: &str) {
    let total = || async {
        operator_metric(
            &testkit::scrape(metrics_addr, "/metrics").await,
            "leasekeeper_api_writes_total",
        )
        .values()
        .sum::<f64>()
    };
    let t0 = std::time::Instant::now();
    let mut last = total().await;
    while t0.elapsed() < std::time::Duration::from_secs(300) {
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        let now = total().await;
        if now == last {
            return;
        }
        last = now;
    }
}

/// (peak RSS in kB, user+system CPU seconds) of process `pid`.
pub fn proc_stats(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|u| u.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (hwm_kb, (field(11) + field(12)) / 100.0)
}

/// The markdown report, echoed to stdout line by line.
#[derive(Default)]
pub struct Report {
    pub lines: Vec<String>,
    /// Latency distributions for the CDF figure, in legend order.
    pub cdfs: Vec<crate::plot::Cdf>,
    /// The scale run's curve, its claim count and when it settled (s), for the figure.
    pub scale: Option<(Vec<crate::plot::ScalePoint>, usize, f64)>,
}

impl Report {
    /// Keeps `s`'s samples for the latency figure under `label`.
    pub fn cdf(&mut self, label: &str, s: &Stats) {
        if !s.samples.is_empty() {
            self.cdfs.push(crate::plot::Cdf {
                label: label.to_string(),
                samples: s.samples.clone(),
            });
        }
    }

    /// One line.
    pub fn add(&mut self, s: impl Into<String>) {
        let s = s.into();
        println!("{s}");
        self.lines.push(s);
    }

    /// A latency row.
    pub fn row(&mut self, what: &str, s: &Stats) {
        self.add(format!(
            "| {what} | {} | {} | {} | {} | {} |",
            ms(s.p50),
            ms(s.p90),
            ms(s.p99),
            ms(s.max),
            s.n
        ));
    }

    /// The header of a latency table.
    pub fn header(&mut self) {
        self.add("| scenario | p50 ms | p90 ms | p99 ms | max ms | N |");
        self.add("|---|---|---|---|---|---|");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let s = stats((1..=100).map(Duration::from_millis).collect());
        assert_eq!(s.n, 100);
        assert_eq!(s.p50, Duration::from_millis(50));
        assert_eq!(s.p99, Duration::from_millis(99));
        assert_eq!(s.max, Duration::from_millis(100));
        assert_eq!(stats(Vec::new()).p99, Duration::ZERO);
    }

    #[test]
    fn request_deltas_are_per_operation_and_leave_out_watches() {
        let a: BTreeMap<String, f64> = [("POST leases".to_string(), 10.0)].into();
        let b: BTreeMap<String, f64> = [
            ("POST leases".to_string(), 30.0),
            ("WATCH leases".to_string(), 5.0),
        ]
        .into();
        assert_eq!(delta(&a, &b, 10), "POST leases: 2.00");
    }
}
