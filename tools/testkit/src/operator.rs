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
