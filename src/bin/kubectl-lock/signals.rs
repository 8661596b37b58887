//! The signals `kubectl lock` acts on: while it waits for the lock, any of them
//! withdraws the claim (deleted before the process exits with 128 + the signal's
//! number); while `run` holds it, they are forwarded to the command.

use std::process::ExitCode;

use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};

/// SIGHUP, SIGINT, SIGTERM and SIGQUIT, listened for.
pub struct Signals(Vec<(Signal, tokio::signal::unix::Signal)>);

impl Signals {
    pub fn new() -> std::io::Result<Signals> {
        let kinds = [
            (Signal::SIGHUP, SignalKind::hangup()),
            (Signal::SIGINT, SignalKind::interrupt()),
            (Signal::SIGTERM, SignalKind::terminate()),
            (Signal::SIGQUIT, SignalKind::quit()),
        ];
        let mut out = Vec::new();
        for (s, k) in kinds {
            out.push((s, signal(k)?));
        }
        Ok(Signals(out))
    }

    pub fn none() -> Signals {
        Signals(Vec::new())
    }

    pub async fn recv(&mut self) -> Signal {
        if self.0.is_empty() {
            return std::future::pending().await;
        }
        let futs = self.0.iter_mut().map(|(s, stream)| {
            let s = *s;
            Box::pin(async move {
                stream.recv().await;
                s
            })
        });
        futures::future::select_all(futs).await.0
    }
}

/// Listens for the signals, or for none if that fails (said on stderr).
pub fn listen() -> Signals {
    Signals::new().unwrap_or_else(|e| {
        eprintln!("kubectl lock: cannot listen for signals: {e}");
        Signals::none()
    })
}

/// The exit code of a process that stopped on `sig`: 128 + its number (130 for SIGINT,
/// 143 for SIGTERM, 129 for SIGHUP).
pub fn exit_code(sig: Signal) -> ExitCode {
    ExitCode::from(u8::try_from(128 + sig as i32).unwrap_or(1))
}
