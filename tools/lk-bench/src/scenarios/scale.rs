//! Scenario 4: Scale: 10,000 claims over 1,000 Leases in 20 namespaces, created as fast as the
//! API server takes them; then every holder releases until every queue is drained. The
//! harness watches its claims (label bench=scale) into a local cache instead of polling
//! lists, so that it does not load the API server it measures.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use leasekeeper::api::{LockClaim, Phase, Renewal};
use tokio::time::Instant;

use crate::measure::{proc_stats, spec, Report};
use crate::plot::ScalePoint;
use crate::Bench;

pub async fn run(b: &Bench, r: &mut Report) {
    let (nss, per_ns, per_lease) = if b.args.smoke {
        (2, 5, 10)
    } else {
        (20, 50, 10)
    };
    let names: Vec<String> = (0..nss).map(|i| format!("bench-scale-{i:02}")).collect();
    let plane = PlaneCpu::start(b);
    let run = scale(&b.client, &names, per_ns, per_lease, "scale").await;
    let (t_settle, t_drain, total) = (run.settle, run.drain, run.total);
    r.scale = Some((run.curve, total, t_settle.as_secs_f64()));
    let plane = plane.cores(t_settle + t_drain);
    let (hwm_kb, cpu_s) = proc_stats(b.op_pid);
    r.add("## 4. Scale");
    r.add(String::new());
    r.add(format!("{total} claims over {} Leases in {nss} namespaces, created as fast as the API server takes them (64 in flight):", nss * per_ns));
    r.add(String::new());
    r.add("| measure | value |");
    r.add("|---|---|");
    r.add(format!(
        "| creation start -> every claim Granted or Pending at its true position | {:.1} s |",
        t_settle.as_secs_f64()
    ));
    r.add(format!(
        "| first release -> every queue drained ({total} grants and releases) | {:.1} s |",
        t_drain.as_secs_f64()
    ));
    r.add(format!(
        "| operator peak RSS (VmHWM, whole run so far) | {:.1} MiB |",
        hwm_kb as f64 / 1024.0
    ));
    r.add(format!(
        "| operator CPU (user+system, whole run so far) | {cpu_s:.1} s |"
    ));
    r.add(format!(
        "| kube-apiserver / etcd CPU during this scenario, in cores (of {}) | {:.2} / {:.2} |",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        plane.0,
        plane.1
    ));
    r.add(String::new());
}

/// CPU of the control plane's kube-apiserver and etcd (pids from the plane directory
/// beside the kubeconfig), to tell what bounds a scenario.
pub(super) struct PlaneCpu {
    pids: [u32; 2],
    start: [f64; 2],
}

impl PlaneCpu {
    pub(super) fn start(b: &Bench) -> PlaneCpu {
        let dir = b
            .args
            .kubeconfig
            .parent()
            .map(|d| d.to_path_buf())
            .unwrap_or_default();
        let pid = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        let pids = [pid("apiserver.pid"), pid("etcd.pid")];
        PlaneCpu {
            pids,
            start: pids.map(|p| proc_stats(p).1),
        }
    }

    /// Average cores used by (kube-apiserver, etcd) since `start`, over `wall`.
    pub(super) fn cores(&self, wall: Duration) -> (f64, f64) {
        let w = wall.as_secs_f64().max(1e-9);
        let used = |i: usize| (proc_stats(self.pids[i]).1 - self.start[i]) / w;
        (used(0), used(1))
    }
}

/// What one scale run measured.
pub(super) struct ScaleRun {
    /// Creation start -> settled.
    pub settle: Duration,
    /// Release start -> drained.
    pub drain: Duration,
    /// Claims.
    pub total: usize,
    /// Created, arbitrated and released claims over time, sampled every 250 ms.
    pub curve: Vec<ScalePoint>,
}

/// `per_lease` claims on each of `per_ns` Leases in each of `names` (labelled
/// bench=`label`), created at once, then released as they are granted.
pub(super) async fn scale(
    client: &Client,
    names: &[String],
    per_ns: usize,
    per_lease: usize,
    label: &str,
) -> ScaleRun {
    for ns in names {
        testkit::create_namespace(client, ns, &[]).await;
    }
    let (store, writer) = reflector::store::<LockClaim>();
    let cfg = watcher::Config::default().labels(&format!("bench={label}"));
    let watch = reflector::reflector(writer, watcher(Api::<LockClaim>::all(client.clone()), cfg))
        .modify(|c| c.metadata.managed_fields = None)
        .default_backoff()
        .for_each(|_| futures::future::ready(()));
    let watch = tokio::spawn(watch);
    let _ = store.wait_until_ready().await;
    let mut jobs = Vec::new();
    for ns in names {
        for l in 0..per_ns {
            for c in 0..per_lease {
                jobs.push((ns.clone(), format!("l{l}"), format!("l{l}-c{c}")));
            }
        }
    }
    let total = jobs.len();
    let t0 = Instant::now();
    let curve = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sampler = tokio::spawn(sample_curve(store.clone(), t0, curve.clone()));
    create_all(client, jobs, label).await;
    let settle = loop {
        let claims = store.state();
        if claims.len() == total && settled(&claims) {
            break t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let t1 = Instant::now();
    drain(client, &store, total).await;
    let drain = t1.elapsed();
    sampler.abort();
    let mut curve = curve.lock().map(|c| c.clone()).unwrap_or_default();
    curve.push(point(&store, t0));
    watch.abort();
    ScaleRun {
        settle,
        drain,
        total,
        curve,
    }
}

/// Samples the run's curve into `into` every 250 ms until aborted.
async fn sample_curve(
    store: Store<LockClaim>,
    t0: Instant,
    into: Arc<std::sync::Mutex<Vec<ScalePoint>>>,
) {
    loop {
        let p = point(&store, t0);
        if let Ok(mut v) = into.lock() {
            v.push(p);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn point(store: &Store<LockClaim>, t0: Instant) -> ScalePoint {
    let claims = store.state();
    let phase_is = |ps: &[Phase]| {
        claims
            .iter()
            .filter(|c| c.phase().is_some_and(|p| ps.contains(&p)))
            .count()
    };
    ScalePoint {
        t: t0.elapsed().as_secs_f64(),
        created: claims.len(),
        arbitrated: phase_is(&[Phase::Granted, Phase::Pending]),
        released: phase_is(&[Phase::Released]),
    }
}

async fn create_all(client: &Client, jobs: Vec<(String, String, String)>, label: &str) {
    futures::stream::iter(jobs)
        .map(|(ns, lease, name)| {
            let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
            let mut claim = LockClaim::new(&name, spec(&lease, Renewal::Controller, 3600));
            claim.metadata.labels = Some([("bench".to_string(), label.to_string())].into());
            async move { api.create(&PostParams::default(), &claim).await }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await
        .expect("creates");
}

/// Releases every claim as soon as it is Granted, until all `total` are Released.
async fn drain(client: &Client, store: &Store<LockClaim>, total: usize) {
    let mut asked: HashSet<(String, String)> = HashSet::new();
    loop {
        let claims = store.state();
        let released = claims
            .iter()
            .filter(|c| c.phase() == Some(Phase::Released))
            .count();
        if released == total {
            return;
        }
        let granted: Vec<(String, String)> = claims
            .iter()
            .filter(|c| c.phase() == Some(Phase::Granted))
            .map(|c| {
                (
                    c.metadata.namespace.clone().unwrap_or_default(),
                    c.metadata.name.clone().unwrap_or_default(),
                )
            })
            .filter(|k| !asked.contains(k))
            .collect();
        asked.extend(granted.iter().cloned());
        futures::stream::iter(granted)
            .map(|(ns, name)| {
                let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
                async move {
                    let release = serde_json::json!({"spec": {"release": true}});
                    let _ = api
                        .patch(&name, &PatchParams::default(), &Patch::Merge(release))
                        .await;
                }
            })
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every Lease has one Granted claim and its waiting claims hold their true positions.
fn settled(claims: &[Arc<LockClaim>]) -> bool {
    let mut by_lease: BTreeMap<(String, String), Vec<&LockClaim>> = BTreeMap::new();
    for c in claims {
        let key = (
            c.metadata.namespace.clone().unwrap_or_default(),
            c.spec.lease_name.clone(),
        );
        by_lease.entry(key).or_default().push(c);
    }
    by_lease.values().all(|claims| {
        let granted = claims
            .iter()
            .filter(|c| c.phase() == Some(Phase::Granted))
            .count();
        let mut waiting: Vec<&&LockClaim> = claims
            .iter()
            .filter(|c| c.phase() != Some(Phase::Granted))
            .collect();
        waiting.sort_by_key(|c| {
            (
                c.metadata.creation_timestamp.clone().map(|t| t.0),
                c.metadata.name.clone(),
            )
        });
        granted == 1
            && waiting.iter().enumerate().all(|(i, c)| {
                // The operator's default --queue-positions: exact places for the first 10.
                c.phase() == Some(Phase::Pending)
                    && if i < 10 {
                        c.status.as_ref().and_then(|s| s.queue_position) == Some(i as i32 + 1)
                    } else {
                        testkit::checker::has_position(c)
                    }
            })
    })
}
