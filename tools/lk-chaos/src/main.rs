//! lk-chaos: a reproducible fault-injection run with a mutual-exclusion checker.
//!
//! `lk-chaos run` starts operator replicas (leader election) and holder processes on a
//! real control plane, injects faults on a seeded schedule ([`faults`]), records every
//! LockClaim and Lease state it observes (`testkit::recorder`), and checks the history
//! and the fenced registers (`testkit::checker`, [`check`]): (a) two Granted claims for one Lease at any observed
//! moment; (b) a Lease naming someone other than its Granted claim once settled; (c) a
//! grant whose fencing token is not above every earlier one for that Lease; (d) a
//! register write accepted with a stale token; (e) a claim lost; (f) totals; (g) a
//! write by a replica that was not leading; (h) a healthy holder expired. Exits non-zero
//! on any violation.
//!
//! `lk-chaos holder` is one holder process ([`holder`]): acquire, write the fenced
//! register ([`register`]), hold, release, repeat.

mod check;
mod faults;
mod guarded;
mod holder;
mod register;
mod run;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clap::{Parser, Subcommand};

/// Where this run keeps its files (replica logs and kubeconfigs, holders' outcome
/// logs): the plane's directory, so that runs on two planes can go side by side.
static RUN_DIR: OnceLock<PathBuf> = OnceLock::new();

/// A file of this run: `<plane dir>/<name>`.
pub fn run_file(name: &str) -> PathBuf {
    RUN_DIR
        .get()
        .map(|d| d.join(name))
        .unwrap_or_else(|| Path::new("target").join(name))
}

#[derive(Parser, Debug)]
#[command(about = "leasekeeper chaos run")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The whole run.
    Run(run::RunArgs),
    /// One holder process.
    Holder(holder::HolderArgs),
    /// The audit view of a finished run again, from the log its plane kept.
    Audit(run::AuditArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match Cli::parse().cmd {
        Cmd::Holder(a) => {
            if let Some(dir) = a.kubeconfig.parent() {
                let _ = RUN_DIR.set(dir.to_path_buf());
            }
            holder::run(a).await;
            std::process::ExitCode::SUCCESS
        }
        Cmd::Run(a) => {
            let _ = RUN_DIR.set(a.plane.clone());
            run::run(a).await
        }
        Cmd::Audit(a) => {
            let _ = RUN_DIR.set(a.plane.clone());
            run::audit_again(&a)
        }
    }
}
