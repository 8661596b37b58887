//! lk-bench: leasekeeper against client-go leader election, side by side on one real
//! kube-apiserver, so machine noise cancels out in the ratios. Prints a markdown report
//! and writes it to `--out`. Measures; asserts nothing.
//!
//! One module per scenario under [`scenarios`]; [`measure`] holds what they measure with.

mod measure;
mod plot;
mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use kube::api::PostParams;
use kube::{Api, Client};
use leasekeeper::api::{LockClaim, Phase, Renewal};
use measure::{spec, Report, Seen};

#[derive(Parser, Debug)]
#[command(about = "leasekeeper benchmarks against client-go leader election")]
pub struct Args {
    /// Kubeconfig of the control plane to measure on.
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// Directory holding the leasekeeper and kubectl-lock binaries to run.
    #[arg(long)]
    pub bin: PathBuf,
    /// The client-go leader-election peer binary (bench/peers/client-go-le).
    #[arg(long)]
    pub peer: Option<PathBuf>,
    /// Small N everywhere: exercises every scenario in about two minutes.
    #[arg(long)]
    pub smoke: bool,
    /// Where to write the markdown report.
    #[arg(long)]
    pub out: PathBuf,
    /// Run only these scenarios (1 grant, 2 handoff, 3 failover, 4 scale, 5 idle,
    /// 6 noisy neighbours, 7 fencing; on a real node with the operator installed,
    /// `--node`: 8 Pods by scheduling gates, 9 routes to the holder).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 3, 4, 5, 6, 7])]
    pub only: Vec<u8>,
    /// On a real node where the operator runs in the cluster (Helm): measure that one,
    /// start none, and run the node scenarios (8 and 9) only.
    #[arg(long)]
    pub node: bool,
}

/// What every scenario runs against.
pub struct Bench {
    pub args: Args,
    pub client: Client,
    /// The operator's probe and metrics address.
    pub metrics_addr: String,
    /// The operator's pid (for RSS and CPU).
    pub op_pid: u32,
    /// Sample size of the latency scenarios.
    pub n: usize,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let mut args = args;
    let client = testkit::client_for(&args.kubeconfig).await;
    if args.node {
        args.only = vec![8, 9];
        return node_bench(args, client).await;
    }
    testkit::install_crd(client.clone(), "lk-bench", Duration::from_secs(60)).await;
    let (mut op, metrics_addr) = start_operator(&args).await;
    let bench = Bench {
        n: if args.smoke { 10 } else { 200 },
        op_pid: op.id().unwrap_or_default(),
        metrics_addr,
        client,
        args,
    };
    let mut r = Report::default();
    header(&bench, &mut r).await;
    warm_up(&bench.client).await;
    scenarios::run_selected(&bench, &mut r).await;
    let _ = op.kill().await;
    if let Some(dir) = bench.args.out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&bench.args.out, r.lines.join("\n") + "\n").expect("write report");
    eprintln!("report written to {}", bench.args.out.display());
    figures(&bench.args.out, &r);
}

/// The node scenarios against the operator installed in the cluster.
async fn node_bench(args: Args, client: Client) {
    let bench = Bench {
        n: if args.smoke { 3 } else { 50 },
        op_pid: 0,
        metrics_addr: String::new(),
        client,
        args,
    };
    let mut r = Report::default();
    header(&bench, &mut r).await;
    r.add("The operator: the chart's defaults (installed by `make bench-node`), the image built from the Dockerfile (release).".to_string());
    r.add(String::new());
    scenarios::run_selected(&bench, &mut r).await;
    std::fs::write(&bench.args.out, r.lines.join("\n") + "\n").expect("write report");
    eprintln!("report written to {}", bench.args.out.display());
}

/// The SVG figures beside the report: `<report stem>-latency-cdf.svg` and
/// `<report stem>-scale.svg`. A figure that cannot be drawn is reported, not fatal.
fn figures(out: &std::path::Path, r: &Report) {
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("bench");
    let cdf = out.with_file_name(format!("{stem}-latency-cdf.svg"));
    let title = "Grant and handoff latency: leasekeeper and client-go leader election";
    match plot::latency_cdf(&cdf, title, &r.cdfs) {
        Ok(()) => eprintln!("figure written to {}", cdf.display()),
        Err(e) => eprintln!("no latency figure: {e}"),
    }
    if let Some((curve, total, settled)) = &r.scale {
        let path = out.with_file_name(format!("{stem}-scale.svg"));
        let title = format!("Scale: {total} claims created at once, then drained");
        match plot::settle_curve(&path, &title, curve, *total, *settled) {
            Ok(()) => eprintln!("figure written to {}", path.display()),
            Err(e) => eprintln!("no scale figure: {e}"),
        }
    }
}

/// The flags of the operator under test that differ from its defaults (printed in the
/// report): no garbage collection during a run; twice the default reconciles at once.
const OPERATOR_FLAGS: [&str; 4] = ["--gc-grace", "1h", "--concurrency", "32"];

/// The operator under test, as its own process; returns once it is ready.
async fn start_operator(args: &Args) -> (tokio::process::Child, String) {
    let metrics_addr = format!("127.0.0.1:{}", testkit::free_port());
    let log = std::fs::File::create("target/bench-operator.log").expect("log");
    let mut op = tokio::process::Command::new(args.bin.join("leasekeeper"))
        .args(["run", "--metrics-addr", &metrics_addr])
        .args(OPERATOR_FLAGS)
        .env("KUBECONFIG", &args.kubeconfig)
        .env(
            "RUST_LOG",
            std::env::var("LK_BENCH_OPERATOR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("operator starts");
    for _ in 0..300 {
        if testkit::scrape(&metrics_addr, "/readyz").await == "ready" {
            return (op, metrics_addr);
        }
        if let Ok(Some(status)) = op.try_wait() {
            panic!("the operator exited ({status}); see target/bench-operator.log");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the operator did not become ready; see target/bench-operator.log");
}

async fn header(b: &Bench, r: &mut Report) {
    let version = b
        .client
        .apiserver_version()
        .await
        .map(|v| v.git_version)
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_string))
        .unwrap_or_default();
    let date = jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC");
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let smoke = if b.args.smoke {
        " (smoke: small N, numbers not meaningful)"
    } else {
        ""
    };
    r.add(format!("# leasekeeper benchmarks{smoke}"));
    r.add(String::new());
    r.add(format!(
        "{date}; {cpu}; {cores} cores; kube-apiserver {version} + etcd v3.6.16 on loopback; leasekeeper {} (binaries from {}); client-go v0.35.4.",
        env!("CARGO_PKG_VERSION"),
        b.args.bin.display()
    ));
    r.add(String::new());
    if b.args.node {
        r.add(format!("Commit {}.", testkit::commit()));
    } else {
        r.add(format!(
            "Commit {}. The operator runs with its defaults except `{}`.",
            testkit::commit(),
            OPERATOR_FLAGS.join(" ")
        ));
    }
    r.add(String::new());
}

/// The first requests to a freshly created CRD are slow in the API server (about 2 s
/// here); one claim granted and released keeps that out of the figures.
async fn warm_up(client: &Client) {
    let ns = "bench-warmup";
    testkit::create_namespace(client, ns, &[]).await;
    let (seen, _w) = Seen::start(client, ns).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), ns);
    api.create(
        &PostParams::default(),
        &LockClaim::new("warmup", spec("warmup", Renewal::Holder, 3600)),
    )
    .await
    .expect("warm-up claim");
    seen.wait(ns, "warmup", Phase::Granted, Duration::from_secs(30))
        .await
        .expect("warm-up granted");
    let _ = api.delete("warmup", &Default::default()).await;
}
