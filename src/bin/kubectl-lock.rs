//! `kubectl lock`: take a leasekeeper lock from a shell.
//!
//! Installed on PATH as `kubectl-lock`, kubectl runs it as `kubectl lock ...`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{DeleteParams, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use leasekeeper::api::{LockClaim, Phase, Renewal};
use leasekeeper::client::{AcquireOptions, LockClient, LockError};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Exit code: the lock was lost while the command ran (it was terminated).
const EXIT_LOST: u8 = 123;
/// Exit code: the wait for the lock ran out (the claim was deleted).
const EXIT_TIMEOUT: u8 = 124;
/// Exit code: bad usage, a rejected claim, or an API error.
const EXIT_ERROR: u8 = 125;
/// Exit code: the command could not be executed.
const EXIT_CANNOT_EXEC: u8 = 126;
/// Exit code: the command was not found.
const EXIT_NOT_FOUND: u8 = 127;

const AFTER_HELP: &str = "\
Examples:
  # Run a migration while holding the lock \"orders-db\" (wait at most 5 minutes):
  kubectl lock run orders-db --ttl 15s --wait 5m -- ./migrate.sh

  # Hold a lock across several script steps (the operator renews it):
  kubectl lock acquire maintenance --wait 30s
  ... steps ...
  kubectl lock release maintenance

  kubectl lock status orders-db
  kubectl lock list -o wide

Exit codes:
  0     the command succeeded (run), or the action succeeded
  N     run: the command's own exit code (128+signal if it was killed by a signal)
  123   run: the lock was lost while the command ran; it was sent SIGTERM, then SIGKILL
  124   the wait for the lock timed out (the claim was deleted)
  125   usage error, rejected claim, or Kubernetes API error
  126   run: the command could not be executed
  127   run: the command was not found

While the command runs it sees LEASEKEEPER_LOCK, LEASEKEEPER_HOLDER,
LEASEKEEPER_CLAIM and LEASEKEEPER_FENCING_TOKEN in its environment.";

/// Take a leasekeeper lock (a LockClaim) from a shell.
#[derive(Parser, Debug)]
#[command(name = "kubectl-lock", bin_name = "kubectl lock", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    kube: KubeArgs,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args, Debug)]
struct KubeArgs {
    /// Namespace of the claims and the Lease (default: the context's).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// Path to the kubeconfig file.
    #[arg(long, global = true, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Acquire NAME, run a command while holding it, release when it exits.
    Run(RunArgs),
    /// Acquire NAME with a claim the operator renews; it stays held after this exits.
    Acquire(HoldArgs),
    /// Release what `acquire` took.
    Release(ReleaseArgs),
    /// Show who holds NAME, the queue, the fencing token and the transitions.
    Status(StatusArgs),
    /// List the Leases under leasekeeper's management in the namespace.
    List(ListArgs),
}

#[derive(Args, Debug)]
struct Common {
    /// The Lease to lock.
    name: String,
    /// Lease duration without renewal.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// How long to wait for the lock: a duration, or "forever".
    #[arg(long, default_value = "forever", value_parser = parse_wait)]
    wait: WaitFor,
    /// Queue priority (higher first).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Keep the Lease unassigned this long after this holder's grant expires.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    lock_delay: Duration,
    /// Identity written to the Lease (default: run: a generated name; acquire: $USER).
    #[arg(long)]
    identity: Option<String>,
}

#[derive(Clone, Copy, Debug)]
struct WaitFor(Option<Duration>);

fn parse_wait(s: &str) -> Result<WaitFor, String> {
    if s == "forever" {
        return Ok(WaitFor(None));
    }
    humantime::parse_duration(s)
        .map(|d| WaitFor(Some(d)))
        .map_err(|e| format!("{e} (or \"forever\")"))
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Args, Debug)]
struct HoldArgs {
    #[command(flatten)]
    common: Common,
    /// The claim's name (default: NAME-IDENTITY).
    #[arg(long)]
    claim: Option<String>,
}

#[derive(Args, Debug)]
struct ReleaseArgs {
    /// The Lease.
    name: String,
    /// Identity used by `acquire` (default: $USER).
    #[arg(long)]
    identity: Option<String>,
    /// The claim's name (default: NAME-IDENTITY).
    #[arg(long)]
    claim: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Json,
    Yaml,
    Wide,
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// The Lease.
    name: String,
    /// Output format.
    #[arg(short = 'o', long)]
    output: Option<Output>,
}

#[derive(Args, Debug)]
struct ListArgs {
    /// Output format.
    #[arg(short = 'o', long)]
    output: Option<Output>,
}

async fn client(k: &KubeArgs) -> Result<(Client, String), String> {
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

fn default_identity() -> String {
    sanitize(&std::env::var("USER").unwrap_or_else(|_| "user".into()))
}

/// Lower-case letters, digits, '-' and '.', as a claim name needs.
fn sanitize(s: &str) -> String {
    let out: String = s
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let out = out.trim_matches(|c| c == '-' || c == '.');
    if out.is_empty() {
        "user".into()
    } else {
        out.chars().take(60).collect()
    }
}

fn claim_name(lease: &str, identity: &str, explicit: Option<&str>) -> String {
    explicit
        .map(str::to_string)
        .unwrap_or_else(|| format!("{lease}-{}", sanitize(identity)))
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("kubectl lock: {msg}");
    ExitCode::from(EXIT_ERROR)
}

fn lock_error(e: LockError) -> ExitCode {
    match e {
        LockError::TimedOut(d) => {
            eprintln!("kubectl lock: timed out after {d:?} waiting for the lock");
            ExitCode::from(EXIT_TIMEOUT)
        }
        other => fail(other),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let (client, ns) = match client(&cli.kube).await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match cli.command {
        Cmd::Run(a) => run(client, &ns, a).await,
        Cmd::Acquire(a) => acquire(client, &ns, a).await,
        Cmd::Release(a) => release(client, &ns, a).await,
        Cmd::Status(a) => status(client, &ns, a).await,
        Cmd::List(a) => list(client, &ns, a).await,
    }
}

fn options(c: &Common, renewal: Renewal) -> AcquireOptions {
    AcquireOptions {
        identity: c.identity.clone(),
        lease_duration: Duration::from_secs(c.ttl.as_secs().max(1)),
        renewal,
        priority: c.priority,
        lock_delay: c.lock_delay,
        wait: c.wait.0,
        ..AcquireOptions::default()
    }
}

async fn run(client: Client, ns: &str, a: RunArgs) -> ExitCode {
    let locks = LockClient::new(client, ns);
    let guard = match locks
        .acquire(&a.common.name, options(&a.common, Renewal::Holder))
        .await
    {
        Ok(g) => g,
        Err(e) => return lock_error(e),
    };
    let mut cmd = tokio::process::Command::new(&a.command[0]);
    cmd.args(&a.command[1..])
        .env("LEASEKEEPER_LOCK", &a.common.name)
        .env("LEASEKEEPER_HOLDER", guard.identity())
        .env("LEASEKEEPER_CLAIM", guard.claim_name())
        .env(
            "LEASEKEEPER_FENCING_TOKEN",
            guard.fencing_token().to_string(),
        )
        // Its own process group: a lost lock stops the whole job, grandchildren too.
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_EXEC
            };
            eprintln!("kubectl lock: cannot run {:?}: {e}", a.command[0]);
            let _ = guard.release().await;
            return ExitCode::from(code);
        }
    };
    let group = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .map(Pid::from_raw);
    let signal_group = |sig: Signal| {
        if let Some(g) = group {
            let _ = killpg(g, sig);
        }
    };
    // SIGINT and SIGTERM sent to us are passed on (the command is not in the
    // terminal's foreground group any more, so Ctrl-C reaches only us).
    let forwarded = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => tokio::select! {
                _ = int.recv() => Signal::SIGINT,
                _ = term.recv() => Signal::SIGTERM,
            },
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        status = child.wait() => {
            let code = exit_code(status);
            if let Err(e) = guard.release().await {
                eprintln!("kubectl lock: releasing the lock failed: {e}");
            }
            code
        }
        reason = guard.lost() => {
            // Stop the command before the Lease can be granted to anyone else:
            // SIGTERM now, SIGKILL when 80% of the safety margin is gone.
            let grace = guard.safety_margin(&reason).mul_f64(0.8);
            eprintln!("kubectl lock: lock lost ({reason}); terminating the command (SIGKILL in {grace:?})");
            signal_group(Signal::SIGTERM);
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                signal_group(Signal::SIGKILL);
                let _ = child.wait().await;
            }
            // Whatever else the job left running gets SIGKILL too.
            signal_group(Signal::SIGKILL);
            drop(guard);
            ExitCode::from(EXIT_LOST)
        }
        sig = forwarded => {
            signal_group(sig);
            let code = exit_code(child.wait().await);
            let _ = guard.release().await;
            code
        }
    }
}

fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
            (None, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(255)),
            _ => ExitCode::from(1),
        },
        Err(e) => fail(format!("waiting for the command failed: {e}")),
    }
}

async fn acquire(client: Client, ns: &str, a: HoldArgs) -> ExitCode {
    let identity = a.common.identity.clone().unwrap_or_else(default_identity);
    let name = claim_name(&a.common.name, &identity, a.claim.as_deref());
    let api: Api<LockClaim> = Api::namespaced(client.clone(), ns);
    if let Ok(Some(existing)) = api.get_opt(&name).await {
        if existing.phase() == Some(Phase::Granted) {
            println!(
                "{} already held by {identity} (claim {name})",
                a.common.name
            );
            return ExitCode::SUCCESS;
        }
    }
    let mut opts = options(&a.common, Renewal::Controller);
    opts.identity = Some(identity.clone());
    opts.claim_name = Some(name.clone());
    opts.owner_pod = false;
    match LockClient::new(client, ns)
        .acquire(&a.common.name, opts)
        .await
    {
        Ok(guard) => {
            println!(
                "acquired {} as {identity} (claim {name}, fencing token {})",
                a.common.name,
                guard.fencing_token()
            );
            // The operator renews a Controller claim: it stays held after we exit.
            guard.keep();
            ExitCode::SUCCESS
        }
        Err(e) => lock_error(e),
    }
}

async fn release(client: Client, ns: &str, a: ReleaseArgs) -> ExitCode {
    let identity = a.identity.clone().unwrap_or_else(default_identity);
    let name = claim_name(&a.name, &identity, a.claim.as_deref());
    let api: Api<LockClaim> = Api::namespaced(client, ns);
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {
            return fail(format!("no claim {name} in namespace {ns}"));
        }
        Err(e) => return fail(e),
    }
    let gone =
        kube::runtime::wait::await_condition(api, &name, |c: Option<&LockClaim>| c.is_none());
    match tokio::time::timeout(Duration::from_secs(30), gone).await {
        Ok(Ok(_)) => {
            println!("released {} (claim {name})", a.name);
            ExitCode::SUCCESS
        }
        _ => fail(format!(
            "claim {name} is still being deleted; is the operator running?"
        )),
    }
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusOut {
    lease: String,
    namespace: String,
    holder: Option<String>,
    lease_transitions: Option<i32>,
    fencing_token: Option<i64>,
    claims: Vec<ClaimOut>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ClaimOut {
    name: String,
    identity: String,
    phase: Option<Phase>,
    queue_position: Option<i32>,
    priority: i32,
    fencing_token: Option<i64>,
    reason: Option<String>,
}

fn emit<T: serde::Serialize>(o: Output, v: &T) -> ExitCode {
    let text = match o {
        Output::Json => serde_json::to_string_pretty(v).map_err(|e| e.to_string()),
        _ => serde_yaml::to_string(v).map_err(|e| e.to_string()),
    };
    match text {
        Ok(t) => {
            println!("{}", t.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

async fn status(client: Client, ns: &str, a: StatusArgs) -> ExitCode {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let claims: Api<LockClaim> = Api::namespaced(client, ns);
    let lease = match leases.get_opt(&a.name).await {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let list = match claims.list(&ListParams::default()).await {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let mut mine: Vec<&LockClaim> = list
        .items
        .iter()
        .filter(|c| c.spec.lease_name == a.name)
        .collect();
    mine.sort_by_key(|c| {
        let granted = c.phase() == Some(Phase::Granted);
        let pos = c
            .status
            .as_ref()
            .and_then(|s| s.queue_position)
            .unwrap_or(i32::MAX);
        (!granted, pos, c.metadata.name.clone())
    });
    let spec = lease.as_ref().and_then(|l| l.spec.clone());
    let out = StatusOut {
        lease: a.name.clone(),
        namespace: ns.to_string(),
        holder: spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .filter(|h| !h.is_empty()),
        lease_transitions: spec.as_ref().and_then(|s| s.lease_transitions),
        fencing_token: mine
            .iter()
            .find(|c| c.phase() == Some(Phase::Granted))
            .and_then(|c| c.status.as_ref().and_then(|s| s.fencing_token)),
        claims: mine
            .iter()
            .map(|c| ClaimOut {
                name: c.metadata.name.clone().unwrap_or_default(),
                identity: c.identity(),
                phase: c.phase(),
                queue_position: c.status.as_ref().and_then(|s| s.queue_position),
                priority: c.spec.priority,
                fencing_token: c.status.as_ref().and_then(|s| s.fencing_token),
                reason: c.condition("Granted").map(|x| x.reason.clone()),
            })
            .collect(),
    };
    if let Some(o @ (Output::Json | Output::Yaml)) = a.output {
        return emit(o, &out);
    }
    match lease {
        None => println!("Lease {ns}/{}: does not exist", a.name),
        Some(_) => println!(
            "Lease {ns}/{}: holder {}, transitions {}, fencing token {}",
            a.name,
            out.holder.as_deref().unwrap_or("<none>"),
            out.lease_transitions.map_or("-".into(), |t| t.to_string()),
            out.fencing_token.map_or("-".into(), |t| t.to_string()),
        ),
    }
    let wide = a.output == Some(Output::Wide);
    let extra = if wide { "  PRIORITY  REASON" } else { "" };
    println!(
        "{:<32} {:<24} {:<9} {:>8} {:>10}{extra}",
        "CLAIM", "IDENTITY", "PHASE", "POSITION", "TOKEN"
    );
    for c in &out.claims {
        let phase = c.phase.map_or("-".to_string(), |p| format!("{p:?}"));
        let pos = c.queue_position.map_or(String::new(), |p| p.to_string());
        let token = c.fencing_token.map_or(String::new(), |t| t.to_string());
        print!(
            "{:<32} {:<24} {:<9} {:>8} {:>10}",
            c.name, c.identity, phase, pos, token
        );
        if wide {
            print!("  {:>8}  {}", c.priority, c.reason.as_deref().unwrap_or(""));
        }
        println!();
    }
    ExitCode::SUCCESS
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct LeaseOut {
    name: String,
    holder: Option<String>,
    lease_transitions: Option<i32>,
    lease_duration_seconds: Option<i32>,
    waiting: usize,
}

async fn list(client: Client, ns: &str, a: ListArgs) -> ExitCode {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let claims: Api<LockClaim> = Api::namespaced(client, ns);
    let selector = format!(
        "{}={}",
        leasekeeper::MANAGED_BY_LABEL,
        leasekeeper::MANAGED_BY_VALUE
    );
    let (l, c) = match (
        leases.list(&ListParams::default().labels(&selector)).await,
        claims.list(&ListParams::default()).await,
    ) {
        (Ok(l), Ok(c)) => (l, c),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    let rows: Vec<LeaseOut> = l
        .items
        .iter()
        .map(|lease| {
            let name = lease.metadata.name.clone().unwrap_or_default();
            let spec = lease.spec.clone().unwrap_or_default();
            let waiting = c
                .items
                .iter()
                .filter(|x| x.spec.lease_name == name && x.phase() == Some(Phase::Pending))
                .count();
            LeaseOut {
                waiting,
                holder: spec.holder_identity.filter(|h| !h.is_empty()),
                lease_transitions: spec.lease_transitions,
                lease_duration_seconds: spec.lease_duration_seconds,
                name,
            }
        })
        .collect();
    if let Some(o @ (Output::Json | Output::Yaml)) = a.output {
        return emit(o, &rows);
    }
    let wide = a.output == Some(Output::Wide);
    let extra = if wide { "  TRANSITIONS  DURATION" } else { "" };
    println!("{:<40} {:<32} {:>7}{extra}", "LEASE", "HOLDER", "WAITING");
    for r in &rows {
        print!(
            "{:<40} {:<32} {:>7}",
            r.name,
            r.holder.as_deref().unwrap_or("<none>"),
            r.waiting
        );
        if wide {
            let t = r.lease_transitions.unwrap_or(0);
            print!("  {t:>11}  {:>7}s", r.lease_duration_seconds.unwrap_or(0));
        }
        println!();
    }
    ExitCode::SUCCESS
}
