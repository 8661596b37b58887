//! `kubectl lock run NAME -- COMMAND`: hold the lock while the command runs.
//!
//! The command runs under the [`crate::reaper`], in a process group of its own, and
//! never outlives the hold:
//! - if this process dies in any way (SIGKILL included), the reaper kills the command and
//!   every descendant, then releases the lock;
//! - SIGHUP, SIGINT, SIGTERM and SIGQUIT are forwarded to the command; a second request
//!   to stop (SIGINT or SIGTERM) sends SIGKILL at once;
//! - a lost lock is acted on at every moment (also after a forwarded signal): SIGTERM at
//!   once, SIGKILL before the Lease can be granted to anyone else;
//! - every exit path deletes the claim, or leaves it with ttlSecondsAfterFinished.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use kube::Client;
use leasekeeper::api::Renewal;
use leasekeeper::client::{Guard, LockClient, LockError, LostReason};
use nix::fcntl::OFlag;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

use crate::reaper::{LIFE_FD, REPORT_FD};
use crate::signals::{self, Signals};
use crate::{fail, lock_error, options, withdrawn, Common, KubeArgs, EXIT_LOST};

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub async fn run(client: Client, ns: &str, kube: &KubeArgs, a: RunArgs) -> ExitCode {
    let locks = LockClient::new(client, ns);
    // Listen before waiting: a signal while waiting withdraws the claim; one sent as
    // soon as the command runs is forwarded rather than ending this process.
    let mut signals = signals::listen();
    let mut stopped_by = None;
    let opts = options(&a.common, Renewal::Holder);
    let cancel = async { stopped_by = Some(signals.recv().await) };
    let acquired = locks.acquire_or_cancel(&a.common.name, opts, cancel).await;
    let guard = match (acquired, stopped_by) {
        (Ok(g), _) => g,
        (Err(LockError::Cancelled), Some(sig)) => return withdrawn(sig),
        (Err(e), _) => return lock_error(e),
    };
    let mut reaper = match Reaper::start(kube, ns, &guard, &a) {
        Ok(r) => r,
        Err(e) => {
            let _ = guard.release().await;
            return fail(format!("cannot start the reaper: {e}"));
        }
    };
    let group = match reaper.started().await {
        Ok(pid) => pid,
        Err(code) => {
            let _ = guard.release().await;
            return ExitCode::from(code);
        }
    };
    match supervise(&mut reaper, &guard, group, signals).await {
        Ending::Exited(code) => {
            if let Err(e) = guard.release().await {
                eprintln!("kubectl lock: releasing the lock failed: {e}");
            }
            ExitCode::from(code)
        }
        Ending::Lost => {
            // The claim ended (or the Lease moved): delete what is left of it.
            let _ = guard.release().await;
            ExitCode::from(EXIT_LOST)
        }
    }
}

enum Ending {
    Exited(u8),
    Lost,
}

/// Waits for the command to end, forwarding signals and acting on a lost lock.
async fn supervise(reaper: &mut Reaper, guard: &Guard, group: i32, mut signals: Signals) -> Ending {
    let send = |sig: Signal| {
        let _ = killpg(Pid::from_raw(group), sig);
    };
    let mut stops = 0;
    let mut lost: Option<Instant> = None;
    loop {
        tokio::select! {
            code = reaper.exited() => {
                return if lost.is_some() { Ending::Lost } else { Ending::Exited(code) };
            }
            reason = guard.lost(), if lost.is_none() => {
                let grace = kill_grace(guard, &reason);
                eprintln!("kubectl lock: lock lost ({reason}); terminating the command (SIGKILL in {grace:?})");
                send(Signal::SIGTERM);
                lost = Some(Instant::now() + grace);
            }
            _ = tokio::time::sleep_until(lost.unwrap_or_else(Instant::now)), if lost.is_some() => {
                send(Signal::SIGKILL);
                lost = Some(Instant::now() + Duration::from_secs(3600));
            }
            sig = signals.recv() => {
                if matches!(sig, Signal::SIGINT | Signal::SIGTERM) {
                    stops += 1;
                }
                if stops > 1 && matches!(sig, Signal::SIGINT | Signal::SIGTERM) {
                    eprintln!("kubectl lock: {sig} again: SIGKILL");
                    send(Signal::SIGKILL);
                } else {
                    send(sig);
                }
            }
        }
    }
}

/// How long the command may take to stop after a loss before it gets SIGKILL: 80% of
/// the time before the Lease can be granted elsewhere (none if it already may be).
fn kill_grace(guard: &Guard, reason: &LostReason) -> Duration {
    guard.safety_margin(reason).mul_f64(0.8)
}

/// The reaper process and its report line.
struct Reaper {
    child: std::process::Child,
    reports: tokio::io::Lines<BufReader<tokio::net::unix::pipe::Receiver>>,
    /// The write end of the life line: held here until this process ends.
    _life: OwnedFd,
}

impl Reaper {
    /// Starts `kubectl-lock __reap` with the life line on fd 3 and the report line on
    /// fd 4; the command and the lock's environment go with it.
    fn start(kube: &KubeArgs, ns: &str, guard: &Guard, a: &RunArgs) -> std::io::Result<Reaper> {
        let (life_r, life_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (report_r, report_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.args(["-n", ns]);
        if let Some(k) = &kube.kubeconfig {
            cmd.arg("--kubeconfig").arg(k);
        }
        if let Some(c) = &kube.context {
            cmd.args(["--context", c]);
        }
        cmd.args(["__reap", "--claim", guard.claim_name(), "--"])
            .args(&a.command)
            .env("LEASEKEEPER_LOCK", &a.common.name)
            .env("LEASEKEEPER_LEASE", guard.lease_name())
            .env("LEASEKEEPER_HOLDER", guard.identity())
            .env("LEASEKEEPER_CLAIM", guard.claim_name())
            .env(
                "LEASEKEEPER_FENCING_TOKEN",
                guard.fencing_token().to_string(),
            );
        let (life_fd, report_fd) = (life_r.as_raw_fd(), report_w.as_raw_fd());
        // SAFETY: dup2 is async-signal-safe; the duplicates lose O_CLOEXEC, the originals
        // (and the write end of the life line) do not reach the reaper.
        unsafe {
            cmd.pre_exec(move || {
                for (from, to) in [(life_fd, LIFE_FD), (report_fd, REPORT_FD)] {
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop((life_r, report_w));
        let receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(report_r)?;
        Ok(Reaper {
            child,
            reports: BufReader::new(receiver).lines(),
            _life: life_w,
        })
    }

    /// The command's pid (its process group), or the exit code if it could not start.
    async fn started(&mut self) -> Result<i32, u8> {
        match self.reports.next_line().await {
            Ok(Some(l)) if l.starts_with("pid ") => l[4..].trim().parse().map_err(|_| 1),
            Ok(Some(l)) if l.starts_with("error ") => {
                let mut parts = l.splitn(3, ' ');
                let code = parts.nth(1).and_then(|c| c.parse().ok()).unwrap_or(1);
                eprintln!(
                    "kubectl lock: cannot run the command: {}",
                    parts.next().unwrap_or("")
                );
                Err(code)
            }
            _ => Err(crate::EXIT_CANNOT_EXEC),
        }
    }

    /// The command's exit code, once it has ended and its descendants are gone.
    async fn exited(&mut self) -> u8 {
        let code = match self.reports.next_line().await {
            Ok(Some(l)) if l.starts_with("exit ") => l[5..].trim().parse::<i32>().unwrap_or(1),
            _ => 1,
        };
        let _ = self.child.wait();
        u8::try_from(code).unwrap_or(1)
    }
}
