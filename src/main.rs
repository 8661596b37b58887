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
    /// Print the LockClaim CustomResourceDefinition as YAML.
    Crd,
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

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match leasekeeper::api::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot render the CRD: {e}");
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
