use clap::{Parser, Subcommand};
use leasekeeper::controller::{self, RunConfig};
use leasekeeper::telemetry::{self, LogFormat};

/// leasekeeper: declarative Lease lifecycle for Kubernetes.
#[derive(Parser, Debug)]
#[command(name = "leasekeeper", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller against the cluster in KUBECONFIG (or in-cluster config).
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinitions (LockClaim, Lock) as YAML documents.
    Crd {
        /// Write each to DIR/<crd name>.yaml instead (what `make crd` commits).
        #[arg(long, value_name = "DIR")]
        write_dir: Option<std::path::PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    run: RunConfig,
    /// Log format: text or json.
    #[arg(long, env = "LEASEKEEPER_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// Log filter in tracing's EnvFilter syntax (RUST_LOG is also honoured).
    #[arg(long, env = "LEASEKEEPER_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(run(Cli::parse())),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// glibc's malloc keeps what large, short-lived buffers leave behind: a claim may carry
/// up to the API server's object size limit in annotations, decoded and then dropped
/// from the cache, and with the default (self-raising) mmap threshold and one arena per
/// thread, 1,000 such claims kept about 28 MiB resident. Buffers from 64 KiB are mapped
/// and unmapped on their own, two arenas, and the heap trimmed from 128 KiB free: then
/// 200 claims of 250 KB cost about as much as 200 plain ones (measured in docs/benchmarks.md).
/// Called before any thread exists.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it runs before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
    }
}

/// Prints every CRD (documents separated by `---`), or writes each to its own file.
fn print_crds(dir: Option<&std::path::Path>) -> Result<(), String> {
    let mut docs = Vec::new();
    for crd in leasekeeper::api::crds() {
        let yaml =
            leasekeeper::api::crd_yaml_of(&crd).map_err(|e| format!("cannot render a CRD: {e}"))?;
        match dir {
            Some(d) => {
                let path = d.join(format!("{}.yaml", crd.metadata.name.unwrap_or_default()));
                std::fs::write(&path, yaml)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            }
            None => docs.push(yaml),
        }
    }
    if !docs.is_empty() {
        print!("{}", docs.join("---\n"));
    }
    Ok(())
}

async fn run(cli: Cli) -> std::process::ExitCode {
    match cli.command {
        Command::Crd { write_dir } => match print_crds(write_dir.as_deref()) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            if let Err(e) = telemetry::init_logging(args.log_format, &args.log_level) {
                eprintln!("error: {e}");
                return std::process::ExitCode::from(2);
            }
            match controller::run(args.run).await {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "leasekeeper stopped");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}
