//! `kubectl lock sidecar NAME`: a lock held for the Pod this runs in, for programs in any
//! language. Meant as a native sidecar (an init container with `restartPolicy: Always`):
//! - it queues a claim owned by its Pod (POD_NAME and POD_UID from the downward API), so
//!   the garbage collector releases the lock when the Pod goes;
//! - `GET /` on its port answers 200 with the fencing token (body, and the header
//!   `X-Fencing-Token`) while the lock is held, 503 otherwise; a readinessProbe on the
//!   main container against it makes only the holder Ready, so a Service sends traffic
//!   to the holder alone (active/passive);
//! - the token is also written to `--token-file` (and the file removed when the lock is
//!   lost), for programs that read files;
//! - a lost lock is queued for again; SIGTERM releases it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::routing::get;
use axum::Router;
use clap::Args;
use kube::Client;
use leasekeeper::api::Renewal;
use leasekeeper::client::{AcquireOptions, LockClient};

use crate::fail;

#[derive(Args, Debug)]
pub struct SidecarArgs {
    /// The Lease to hold.
    name: String,
    /// Where to serve `GET /` (localhost: only the Pod's own containers reach it).
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// A file that holds the fencing token while the lock is held (absent otherwise).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Lease duration without renewal: how long a Pod that stops renewing keeps it.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Queue priority (higher first).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
}

/// The fencing token while the lock is held.
type Held = Arc<Mutex<Option<i64>>>;

pub async fn sidecar(client: Client, ns: &str, a: SidecarArgs) -> ExitCode {
    let held: Held = Arc::default();
    let listener = match tokio::net::TcpListener::bind(a.listen).await {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {}: {e}", a.listen)),
    };
    let app = Router::new()
        .route("/", get(state))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(held.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    eprintln!(
        "kubectl lock sidecar: serving {} for lock {}",
        a.listen, a.name
    );
    hold(client, ns, &a, held).await
}

/// Holds the lock for ever: queue, hold, and queue again after a loss.
async fn hold(client: Client, ns: &str, a: &SidecarArgs, held: Held) -> ExitCode {
    let locks = LockClient::new(client, ns);
    let stop = leasekeeper::controller::shutdown_signal();
    tokio::pin!(stop);
    loop {
        let opts = AcquireOptions {
            lease_duration: Duration::from_secs(a.ttl.as_secs().max(1)),
            renewal: Renewal::Holder,
            priority: a.priority,
            owner_pod: true,
            keep_finished: Some(Duration::from_secs(300)),
            ..AcquireOptions::default()
        };
        // Waiting is cancelled by SIGTERM too (the acquire deletes its claim then).
        let acquired = tokio::select! {
            r = locks.acquire(&a.name, opts) => r,
            _ = &mut stop => return ExitCode::SUCCESS,
        };
        let guard = match acquired {
            Ok(g) => g,
            Err(e) => {
                eprintln!("kubectl lock sidecar: {e}; queueing again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        set(&held, a, Some(guard.fencing_token()));
        eprintln!(
            "kubectl lock sidecar: holding {} (fencing token {})",
            a.name,
            guard.fencing_token()
        );
        // Release on SIGTERM: the Pod is going; the next Pod's sidecar takes over now.
        tokio::select! {
            reason = guard.lost() => {
                set(&held, a, None);
                eprintln!("kubectl lock sidecar: lost {} ({reason}); queueing again", a.name);
                drop(guard);
            }
            _ = &mut stop => {
                set(&held, a, None);
                eprintln!("kubectl lock sidecar: stopping; releasing {}", a.name);
                if let Err(e) = guard.release().await {
                    eprintln!("kubectl lock sidecar: releasing {} failed: {e}", a.name);
                }
                return ExitCode::SUCCESS;
            }
        }
    }
}

fn set(held: &Held, a: &SidecarArgs, token: Option<i64>) {
    *held.lock().unwrap_or_else(|e| e.into_inner()) = token;
    if let Some(path) = &a.token_file {
        let result = match token {
            Some(t) => std::fs::write(path, format!("{t}\n")),
            None => std::fs::remove_file(path).or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            }),
        };
        if let Err(e) = result {
            eprintln!("kubectl lock sidecar: token file {}: {e}", path.display());
        }
    }
}

async fn state(State(held): State<Held>) -> (StatusCode, HeaderMap, String) {
    let token = *held.lock().unwrap_or_else(|e| e.into_inner());
    let mut headers = HeaderMap::new();
    match token {
        Some(t) => {
            if let Ok(v) = HeaderValue::from_str(&t.to_string()) {
                headers.insert("x-fencing-token", v);
            }
            (StatusCode::OK, headers, format!("{t}\n"))
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            headers,
            "not held\n".into(),
        ),
    }
}
