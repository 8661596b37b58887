//! The operator under test: in-process (one namespace, one test) or as a process, its
//! probes and metrics, and kube-controller-manager's garbage collector beside it.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kube::Client;
use leasekeeper::controller::RunConfig;
use leasekeeper::leader::Term;
use leasekeeper::telemetry::{Metrics, Readiness};

use crate::plane::{bin_dir, kubeconfig_path, root};

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    run: RunConfig,
}

/// `leasekeeper run`'s configuration with its real defaults and these flags.
pub fn run_config(args: &[&str]) -> RunConfig {
    Flags::try_parse_from(std::iter::once("leasekeeper").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("flags {args:?}: {e}"))
        .run
}

/// An in-process operator watching one namespace; stopped (aborted) on drop.
pub struct Operator {
    task: tokio::task::JoinHandle<()>,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
}

impl Operator {
    /// Starts the controller for `ns` with the given GC grace and waits for its caches.
    pub async fn start(client: &Client, ns: &str, gc_grace: Duration) -> Operator {
        Operator::start_in_term(client, ns, gc_grace, Term::unbounded()).await
    }

    /// An operator watching every namespace (only for a test binary of its own: it
    /// reconciles whatever other tests leave behind).
    pub async fn start_cluster_wide(client: &Client) -> Operator {
        let cfg = run_config(&[
            "--identity",
            "e2e-cluster-wide",
            "--metrics-addr",
            "127.0.0.1:0",
        ]);
        Operator::spawn(client, cfg, Term::unbounded()).await
    }

    /// Like [`Operator::start`], writing only while `term` is current.
    pub async fn start_in_term(
        client: &Client,
        ns: &str,
        gc_grace: Duration,
        term: Term,
    ) -> Operator {
        let gc = format!("{}ms", gc_grace.as_millis());
        let identity = format!("e2e-{ns}");
        let cfg = run_config(&[
            "--watch-namespace",
            ns,
            "--gc-grace",
            &gc,
            "--identity",
            &identity,
            "--metrics-addr",
            "127.0.0.1:0",
        ]);
        Operator::spawn(client, cfg, term).await
    }

    async fn spawn(client: &Client, cfg: RunConfig, term: Term) -> Operator {
        let metrics = Arc::new(Metrics::new());
        let ready = Arc::new(Readiness::default());
        let task = tokio::spawn({
            let (client, metrics, ready) = (client.clone(), metrics.clone(), ready.clone());
            async move {
                if let Err(e) =
                    leasekeeper::controller::controller(client, cfg, metrics, ready, term).await
                {
                    eprintln!("operator stopped: {e}");
                }
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !ready.get() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "operator caches did not sync"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Operator { task, metrics }
    }

    /// Stops the operator (like a crash: nothing is cleaned up).
    pub async fn stop(mut self) {
        self.task.abort();
        let task = std::mem::replace(&mut self.task, tokio::spawn(async {}));
        let _ = task.await;
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Starts `BIN run ARGS` as a process with `kubeconfig`; logs to target/NAME.log.
pub fn spawn_operator(bin: &Path, kubeconfig: &Path, name: &str, args: &[&str]) -> Child {
    let log = root().join(format!("target/{name}.log"));
    let out = std::fs::File::create(&log).expect("log file");
    Command::new(bin)
        .arg("run")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .expect("leasekeeper starts")
}

/// Fetches `path` from a probe server at `addr` (plain HTTP/1.0). Empty on error.
pub async fn scrape(addr: &str, path: &str) -> String {
    scrape_full(addr, path)
        .await
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// The whole HTTP/1.0 response (status line, headers, body) to `GET path`. Empty on
/// error.
pub async fn scrape_full(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if s.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut response = String::new();
    let _ = s.read_to_string(&mut response).await;
    response
}

/// The sum of the samples of metric `name` (with its labels, if given) in Prometheus
/// text `text`.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// kube-controller-manager running only its garbage collector against the test plane,
/// killed on drop. The local plane has no controller manager of its own; a cluster
/// given by `LEASEKEEPER_TEST_KUBECONFIG` has one, so there this is `None`.
pub struct GarbageCollector(Child);

impl GarbageCollector {
    /// Starts it (log in `target/kcm-<pid>.log`).
    pub fn start() -> Option<GarbageCollector> {
        if std::env::var_os("LEASEKEEPER_TEST_KUBECONFIG").is_some() {
            return None;
        }
        let log = root().join(format!("target/kcm-{}.log", std::process::id()));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin_dir().join("kube-controller-manager"))
            .arg(format!("--kubeconfig={}", kubeconfig_path().display()))
            .args([
                "--controllers=garbagecollector",
                "--leader-elect=false",
                "--secure-port=0",
                "--use-service-account-credentials=false",
            ])
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("kube-controller-manager starts (hack/control-plane.sh build): {e}")
            });
        Some(GarbageCollector(child))
    }
}

impl Drop for GarbageCollector {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The operator as a process running as the chart's ServiceAccount, with exactly the
/// chart's RBAC for one watched namespace (what `helm install --set
/// watchNamespace=NS` grants): tenant tests judge what that identity does, not an
/// admin's. Stopped (SIGKILL) on drop.
pub struct ChartOperator {
    child: Child,
    /// Its /metrics and probes address.
    pub metrics_addr: String,
}

impl ChartOperator {
    /// Applies the chart's ServiceAccount and RBAC for `ns` (release namespace
    /// `<ns>-sys`) and starts the operator with a token of that ServiceAccount.
    /// `bin` is the leasekeeper binary (`testkit::bin!("leasekeeper")` in a test).
    pub async fn start(bin: &Path, client: &Client, ns: &str, gc_grace: Duration) -> ChartOperator {
        Self::start_with(bin, client, ns, gc_grace, false).await
    }

    /// As [`ChartOperator::start`], but installed in `ns` itself (as a cluster-wide
    /// install watches its own namespace) with leader election: its leadership Lease
    /// `leasekeeper-leader` is in the namespace it watches.
    pub async fn start_leading(
        bin: &Path,
        client: &Client,
        ns: &str,
        gc_grace: Duration,
    ) -> ChartOperator {
        Self::start_with(bin, client, ns, gc_grace, true).await
    }

    async fn start_with(
        bin: &Path,
        client: &Client,
        ns: &str,
        gc_grace: Duration,
        leading: bool,
    ) -> ChartOperator {
        let sys = if leading {
            ns.to_string()
        } else {
            format!("{ns}-sys")
        };
        crate::create_namespace(client, &sys, &[]).await;
        crate::kubectl_stdin(&["apply", "-f", "-"], &chart_rbac(ns, &sys, leading));
        let kc = root().join(format!("target/chart-sa-{ns}.kubeconfig"));
        crate::token_kubeconfig(&sys, "lk-leasekeeper", &kc);
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let gc = format!("{}ms", gc_grace.as_millis());
        let identity = format!("chart-sa-{ns}");
        let mut args = vec![
            "--watch-namespace",
            ns,
            "--leader-namespace",
            &sys,
            "--gc-grace",
            &gc,
            "--identity",
            &identity,
            "--metrics-addr",
            &metrics_addr,
        ];
        if leading {
            args.push("--leader-elect");
        }
        let child = spawn_operator(bin, &kc, &identity, &args);
        let op = ChartOperator {
            child,
            metrics_addr,
        };
        let t0 = std::time::Instant::now();
        while scrape(&op.metrics_addr, "/readyz").await != "ready" {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the operator as the chart's ServiceAccount did not become ready; see target/chart-sa-{ns}.log"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        op
    }

    /// The sum of metric `name`'s samples now.
    pub async fn metric(&self, name: &str) -> f64 {
        metric(&scrape(&self.metrics_addr, "/metrics").await, name)
    }
}

/// The chart's ServiceAccount and RBAC (`helm template`) for watching `ns`, released in
/// `sys`, with the leader-election Role if `leading`. Objects outside the release
/// namespace have one name in every test, so they get the watched namespace's.
fn chart_rbac(ns: &str, sys: &str, leading: bool) -> String {
    let chart = root().join("charts/leasekeeper");
    let mut args = vec![
        "template".to_string(),
        "lk".to_string(),
        chart.to_string_lossy().to_string(),
        "-n".to_string(),
        sys.to_string(),
        "--set".to_string(),
        format!("watchNamespace={ns}"),
    ];
    let mut templates = vec![
        "serviceaccount.yaml",
        "role-claims.yaml",
        "rolebinding-claims.yaml",
        "role-proof-key.yaml",
        "clusterrole-crd.yaml",
        "clusterrolebinding-crd.yaml",
        "role-node-heartbeats.yaml",
    ];
    if leading {
        templates.extend(["role-leader.yaml", "rolebinding-leader.yaml"]);
    }
    for t in templates {
        args.extend(["--show-only".to_string(), format!("templates/{t}")]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, rbac, err) = crate::helm(&refs);
    assert!(ok, "helm template: {err}");
    rbac.replace(
        "name: lk-leasekeeper-crd",
        &format!("name: lk-leasekeeper-crd-{ns}"),
    )
    .replace(
        "name: lk-leasekeeper-node-heartbeats",
        &format!("name: lk-leasekeeper-node-heartbeats-{ns}"),
    )
}

impl Drop for ChartOperator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
