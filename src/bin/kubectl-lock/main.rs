//! `kubectl lock`: take a leasekeeper lock from a shell, or hold one for a Pod.
//!
//! Installed on PATH as `kubectl-lock`, kubectl runs it as `kubectl lock ...`.
//! - [`run`]: run a command while holding a lock; the command never outlives it
//!   ([`reaper`], [`process`]).
//! - [`claims`]: acquire, release, status, list.
//! - [`sidecar`]: hold a lock for the Pod it runs in and say so over HTTP.
//! - [`fence_command`]: have the API server refuse stale holders' writes to guarded objects.

mod claims;
mod fence_command;
mod process;
mod reaper;
mod run_command;
mod sidecar;
mod signals;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use leasekeeper::api::Renewal;
use leasekeeper::client::{AcquireOptions, LockError};

/// Exit code: the lock was lost while the command ran (it was terminated).
pub const EXIT_LOST: u8 = 123;
/// Exit code: the wait for the lock ran out (the claim was deleted).
pub const EXIT_TIMEOUT: u8 = 124;
/// Exit code: bad usage, a rejected claim, or an API error.
pub const EXIT_ERROR: u8 = 125;
/// Exit code: the command could not be executed.
pub const EXIT_CANNOT_EXEC: u8 = 126;
/// Exit code: the command was not found.
pub const EXIT_NOT_FOUND: u8 = 127;

const AFTER_HELP: &str = "\
Examples:
  # Run a migration while holding the lock \"orders-db\" (wait at most 5 minutes):
  kubectl lock run orders-db --ttl 15s --wait 5m -- ./migrate.sh

  # Hold a lock across several script steps (the operator renews it):
  kubectl lock acquire maintenance --identity alice --wait 30s
  ... steps ...
  kubectl lock release maintenance --identity alice

  kubectl lock status orders-db
  kubectl lock list -o wide

  # In a Pod, as a native sidecar: GET localhost:8081/ is 200 while this Pod holds it.
  kubectl lock sidecar my-app-leader --port 8081 --token-file /var/run/lock/token

Exit codes:
  0     the command succeeded (run), or the action succeeded
  N     run: the command's own exit code (128+signal if it was killed by a signal)
  123   run: the lock was lost while the command ran; it was sent SIGTERM, then SIGKILL
  124   the wait for the lock timed out (the claim was deleted)
  125   usage error, rejected claim, or Kubernetes API error
  126   run: the command could not be executed
  127   run: the command was not found

While the command runs it sees LEASEKEEPER_LOCK, LEASEKEEPER_HOLDER,
LEASEKEEPER_CLAIM and LEASEKEEPER_FENCING_TOKEN in its environment. It never outlives
the plugin: if kubectl-lock dies in any way, the command and its descendants are
killed before the lock is released.";

/// Take a leasekeeper lock (a LockClaim) from a shell.
#[derive(Parser, Debug)]
#[command(name = "kubectl-lock", bin_name = "kubectl lock", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    kube: KubeArgs,
    #[command(subcommand)]
    command: Cmd,
}

/// Where the cluster is.
#[derive(Args, Debug, Clone)]
pub struct KubeArgs {
    /// Namespace of the claims and the Lease (default: the context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Path to the kubeconfig file.
    #[arg(long, global = true, env = "KUBECONFIG")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Acquire NAME, run a command while holding it, release when it exits.
    ///
    /// SIGINT, SIGTERM, SIGHUP or SIGQUIT while waiting withdraws the claim (deleted
    /// before exiting 128 + the signal: 130, 143, 129, 131); while the command runs they
    /// are forwarded to it. SIGKILL cannot be caught: the claim's --wait deadline or its
    /// TTL ends it then.
    Run(run_command::RunArgs),
    /// Acquire NAME with a claim the operator renews; it stays held after this exits.
    ///
    /// SIGINT, SIGTERM, SIGHUP or SIGQUIT while waiting withdraws the claim (deleted
    /// before exiting 128 + the signal: 130, 143, 129, 131).
    Acquire(claims::HoldArgs),
    /// Release what `acquire` took.
    Release(claims::ReleaseArgs),
    /// Show who holds NAME, the queue, the fencing token and the transitions.
    Status(claims::StatusArgs),
    /// List the Leases under leasekeeper's management in the namespace.
    List(claims::ListArgs),
    /// Hold NAME for the Pod this runs in (a native sidecar) and serve its state on a
    /// local port: 200 with the fencing token while held, 503 otherwise.
    Sidecar(sidecar::SidecarArgs),
    /// Guard objects labelled leasekeeper.io/fenced-by=NAME: the API server refuses a
    /// write without the annotation leasekeeper.io/fencing-token, or with a token lower
    /// than the stored object's (a ValidatingAdmissionPolicy and its binding, for this
    /// namespace).
    Fence(fence_command::FenceArgs),
    /// (internal) The reaper between `run` and its command.
    #[command(name = "__reap", hide = true)]
    Reap(reaper::ReapArgs),
}

/// What `run` and `acquire` have in common.
#[derive(Args, Debug)]
pub struct Common {
    /// The Lease to lock.
    pub name: String,
    /// Lease duration without renewal.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// How long to wait for the lock: a duration, or "forever".
    #[arg(long, default_value = "forever", value_parser = parse_wait)]
    pub wait: WaitFor,
    /// Queue priority (higher first).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Keep the Lease unassigned this long after this holder's grant expires.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub lock_delay: Duration,
    /// Identity written to the Lease (default: unique to this invocation: host, pid and
    /// a random suffix; in a Pod, the Pod's name).
    #[arg(long)]
    pub identity: Option<String>,
    /// Delete the claim this long after it finished, if this process cannot (it was
    /// killed, the API was unreachable): nothing accumulates.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub keep_finished: Duration,
}

/// A wait: a duration, or for ever.
#[derive(Clone, Copy, Debug)]
pub struct WaitFor(pub Option<Duration>);

fn parse_wait(s: &str) -> Result<WaitFor, String> {
    if s == "forever" {
        return Ok(WaitFor(None));
    }
    humantime::parse_duration(s)
        .map(|d| WaitFor(Some(d)))
        .map_err(|e| format!("{e} (or \"forever\")"))
}

/// The acquire options `c` asks for.
pub fn options(c: &Common, renewal: Renewal) -> AcquireOptions {
    AcquireOptions {
        identity: c.identity.clone(),
        lease_duration: Duration::from_secs(c.ttl.as_secs().max(1)),
        renewal,
        priority: c.priority,
        lock_delay: c.lock_delay,
        wait: c.wait.0,
        keep_finished: Some(c.keep_finished),
        ..AcquireOptions::default()
    }
}

/// A client for the cluster `k` names, and the namespace to use.
pub async fn client(k: &KubeArgs) -> Result<(Client, String), String> {
    let opts = KubeConfigOptions {
        context: k.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &k.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &opts)
                .await
                .map_err(|e| format!("invalid kubeconfig: {e}"))?
        }
        None if k.context.is_some() => Config::from_kubeconfig(&opts)
            .await
            .map_err(|e| format!("invalid kubeconfig: {e}"))?,
        None => Config::infer()
            .await
            .map_err(|e| format!("no Kubernetes configuration: {e}"))?,
    };
    let ns = k
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| format!("cannot build a client: {e}"))?;
    Ok((client, ns))
}

/// Prints the error and gives the usage/API error code.
pub fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("kubectl lock: {msg}");
    ExitCode::from(EXIT_ERROR)
}

/// The exit code of a failed acquire.
/// A signal came while waiting: the claim is already withdrawn (deleted).
pub fn withdrawn(sig: nix::sys::signal::Signal) -> ExitCode {
    eprintln!("kubectl lock: {sig} while waiting; withdrew the claim");
    signals::exit_code(sig)
}

pub fn lock_error(e: LockError) -> ExitCode {
    match e {
        LockError::TimedOut(d) => {
            eprintln!("kubectl lock: timed out after {d:?} waiting for the lock");
            ExitCode::from(EXIT_TIMEOUT)
        }
        other => fail(other),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Reap(a) = cli.command {
        // Single-threaded, no runtime: see the reaper's documentation.
        return reaper::reap(&cli.kube, a);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start: {e}")),
    };
    rt.block_on(async {
        let (client, ns) = match client(&cli.kube).await {
            Ok(c) => c,
            Err(e) => return fail(e),
        };
        match cli.command {
            Cmd::Run(a) => run_command::run(client, &ns, &cli.kube, a).await,
            Cmd::Acquire(a) => claims::acquire(client, &ns, a).await,
            Cmd::Release(a) => claims::release(client, &ns, a).await,
            Cmd::Status(a) => claims::status(client, &ns, a).await,
            Cmd::List(a) => claims::list(client, &ns, a).await,
            Cmd::Sidecar(a) => sidecar::sidecar(client, &ns, a).await,
            Cmd::Fence(a) => fence_command::fence(client, &ns, a).await,
            Cmd::Reap(_) => fail("__reap is started by `kubectl lock run`"),
        }
    })
}
