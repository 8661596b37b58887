//! The reaper: a small process between `kubectl lock run` and its command, so that the
//! command (and every descendant) dies with the plugin, however the plugin dies.
//!
//! The plugin starts the reaper (this binary, `__reap`) with two pipes: a life line
//! (fd 3, read end; the plugin alone holds the write end, so it reads end-of-file the
//! moment the plugin's process is gone, SIGKILL included) and a report line (fd 4,
//! write end: "pid N" once the command runs, "exit CODE" when it is over). The reaper:
//! - is a child subreaper, so descendants orphaned by a dying parent become its own;
//! - starts the command in a process group of its own, with the default signal
//!   dispositions and a parent-death signal (SIGKILL), so the command dies even if the
//!   reaper is killed too (the command itself; its descendants then survive: docs/usage.md
//!   says so);
//! - when the life line ends: SIGKILL to the command's group and every descendant, waits
//!   until none is left, then deletes the claim (the lock is free only after that);
//! - when the command exits: SIGKILL to whatever it left running (nothing outlives the
//!   hold), then reports its exit status.
//!
//! Ctrl-C and other terminal signals are for the plugin, which forwards them: the
//! reaper ignores them.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use nix::sys::signal::{signal, SigHandler, Signal};

use crate::process;

/// The fds the reaper reads its life line from and writes its reports to.
pub const LIFE_FD: i32 = 3;
/// See [`LIFE_FD`].
pub const REPORT_FD: i32 = 4;

/// Signals a terminal or a supervisor sends; the command gets them from the plugin.
pub const FORWARDED: [Signal; 4] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGQUIT,
];

/// What the reaper needs to release the lock itself when the plugin is gone.
#[derive(clap::Args, Debug)]
pub struct ReapArgs {
    /// The claim to delete when the plugin dies.
    #[arg(long)]
    pub claim: String,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Runs as the reaper (single-threaded: the parent-death signal of the command follows
/// the thread that started it).
pub fn reap(client_args: &crate::KubeArgs, a: ReapArgs) -> ExitCode {
    for s in FORWARDED {
        // SAFETY: setting a disposition to SIG_IGN installs no handler code.
        let _ = unsafe { signal(s, SigHandler::SigIgn) };
    }
    let _ = nix::sys::prctl::set_child_subreaper(true);
    // SAFETY: fds 3 and 4 were set up by the plugin for this process alone.
    let mut life = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(LIFE_FD) });
    let mut report = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(REPORT_FD) });
    let child = match start(&a.command) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                crate::EXIT_NOT_FOUND
            } else {
                crate::EXIT_CANNOT_EXEC
            };
            let _ = writeln!(report, "error {code} {e}");
            return ExitCode::from(code);
        }
    };
    let pid = child.id() as i32;
    let _ = writeln!(report, "pid {pid}");
    let me = std::process::id() as i32;
    // The life line is read on a thread; the main thread waits for the command.
    let (tx, rx) = std::sync::mpsc::channel::<Event>();
    let t = tx.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while matches!(life.read(&mut buf), Ok(n) if n > 0) {}
        let _ = t.send(Event::PluginGone);
    });
    std::thread::spawn(move || {
        let _ = tx.send(Event::Exited(wait_for(pid)));
    });
    match rx.recv() {
        Ok(Event::Exited(code)) => {
            process::kill_tree(me, Some(pid));
            let _ = writeln!(report, "exit {code}");
            ExitCode::SUCCESS
        }
        _ => {
            process::kill_tree(me, Some(pid));
            release(client_args, &a.claim);
            ExitCode::SUCCESS
        }
    }
}

enum Event {
    PluginGone,
    Exited(i32),
}

/// The command in a process group of its own, with default signal dispositions and
/// SIGKILL when its parent (this reaper) dies.
fn start(command: &[String]) -> std::io::Result<std::process::Child> {
    let mut cmd = std::process::Command::new(&command[0]);
    cmd.args(&command[1..]).process_group(0);
    // SAFETY: only async-signal-safe calls (prctl, sigaction) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            for s in FORWARDED {
                signal(s, SigHandler::SigDfl).map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Waits for `pid`, reaping orphans handed to this subreaper meanwhile; its exit code
/// (128 + signal when a signal ended it).
fn wait_for(pid: i32) -> i32 {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::Pid;
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(p, code)) if p.as_raw() == pid => return code,
            Ok(WaitStatus::Signaled(p, sig, _)) if p.as_raw() == pid => return 128 + sig as i32,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return 1,
        }
    }
}

/// Deletes the claim: the plugin is gone and so is everything it ran.
fn release(client_args: &crate::KubeArgs, claim: &str) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        let Ok((client, ns)) = crate::client(client_args).await else {
            return;
        };
        let api: kube::Api<leasekeeper::api::LockClaim> = kube::Api::namespaced(client, &ns);
        let dp = kube::api::DeleteParams::default();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(10), api.delete(claim, &dp)).await;
    });
}
