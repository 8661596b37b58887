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
mod holder;
mod register;
mod run;

use clap::{Parser, Subcommand};

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
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match Cli::parse().cmd {
        Cmd::Holder(a) => {
            holder::run(a).await;
            std::process::ExitCode::SUCCESS
        }
        Cmd::Run(a) => run::run(a).await,
    }
}
