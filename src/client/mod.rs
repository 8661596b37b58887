//! The workload side: acquire a lock by creating a LockClaim, hold it (renewing the
//! Lease), learn when it is lost, and release it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), leasekeeper::client::LockError> {
//! use leasekeeper::client::{AcquireOptions, LockClient};
//! let client = kube::Client::try_default().await?;
//! let locks = LockClient::new(client, "default");
//! let guard = locks.acquire("nightly-report", AcquireOptions::default()).await?;
//! println!("holding with fencing token {}", guard.fencing_token());
//! tokio::select! {
//!     _ = do_the_work(guard.fencing_token()) => {}
//!     reason = guard.lost() => eprintln!("lock lost: {reason}"),
//! }
//! guard.release().await?;
//! # Ok(()) }
//! # async fn do_the_work(_token: i64) {}
//! ```
//!
//! Timing: with `Holder` renewal the guard renews every `lease_duration / 3` and
//! declares the lock lost when it has not renewed for `renew_deadline` (default two
//! thirds of the duration). The operator expires a holder only a full duration after
//! it last *observed* a renewal, which is never earlier than the guard's last success,
//! so the guard learns of the loss at least `lease_duration / 3` (plus the claim's
//! lockDelaySeconds) before the Lease can be granted to anyone else.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference};
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::api::{LockClaim, LockClaimSpec, Phase, Renewal, CONDITION_GRANTED};

/// Why a lock could not be had or was lost.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The wait ran out; the claim was deleted.
    #[error("timed out after {0:?} waiting for the lock")]
    TimedOut(Duration),
    /// The operator rejected the claim (reason from its Granted condition).
    #[error("the claim was rejected: {reason}: {message}")]
    Rejected {
        /// Condition reason, e.g. DuplicateIdentity.
        reason: String,
        /// Condition message.
        message: String,
    },
    /// The claim ended (released, expired or deleted) before it was granted.
    #[error("the claim ended before it was granted: {0}")]
    Ended(String),
    /// The lock was lost while held.
    #[error("the lock was lost: {0}")]
    Lost(LostReason),
    /// An API call failed.
    #[error("Kubernetes API error: {0}")]
    Api(#[from] kube::Error),
    /// The claim's watch failed.
    #[error("watching the claim failed: {0}")]
    Watch(String),
    /// The wait was cancelled (see [`LockClient::acquire_or_cancel`]); the claim was
    /// deleted.
    #[error("cancelled while waiting for the lock; the claim was withdrawn")]
    Cancelled,
    /// The claim says Granted but carries no fencing token: a token is never assumed
    /// (0 would pass any downstream check); the claim was released.
    #[error("the claim {0} is Granted without a fencing token; released it")]
    NoToken(String),
}

/// Why a held lock was lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// The claim left Granted (expired, released or deleted by someone else).
    ClaimEnded(String),
    /// The Lease names someone else.
    LeaseTaken(Option<String>),
    /// Renewals kept failing past the renew deadline.
    RenewFailed,
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LostReason::ClaimEnded(why) => write!(f, "the claim is no longer granted ({why})"),
            LostReason::LeaseTaken(by) => write!(
                f,
                "the Lease now names {}",
                by.as_deref().unwrap_or("nobody")
            ),
            LostReason::RenewFailed => write!(f, "renewals failed past the renew deadline"),
        }
    }
}

impl LostReason {
    /// Whether the Lease may already be granted to someone else (the claim was taken
    /// away), as opposed to a renewal problem that leaves a safety margin.
    pub fn granted_elsewhere(&self) -> bool {
        !matches!(self, LostReason::RenewFailed)
    }
}

/// How to acquire.
#[derive(Clone, Debug)]
pub struct AcquireOptions {
    /// Written to the Lease; default: `$POD_NAME`, else the claim's generated name.
    pub identity: Option<String>,
    /// The claim's name; default: generated from the Lease name.
    pub claim_name: Option<String>,
    /// Lease duration (whole seconds, 1..=86400).
    pub lease_duration: Duration,
    /// Who renews: `Holder` (this process; the default) or `Controller` (the operator).
    pub renewal: Renewal,
    /// Queue priority.
    pub priority: i32,
    /// Lock delay after an expiry.
    pub lock_delay: Duration,
    /// Give up after this long (None: wait for ever). Written to the claim as
    /// `acquireTimeoutSeconds` (rounded up; zero is try-lock), so a claim whose creator
    /// dies while waiting times out by itself; this process also stops waiting a few
    /// seconds later should the operator not answer.
    pub wait: Option<Duration>,
    /// Declare the lock lost when renewals have failed this long (default: 2/3 of the
    /// lease duration; must be shorter than it).
    pub renew_deadline: Option<Duration>,
    /// Shift the renewTime this guard writes (only for testing clock skew: the
    /// operator must not care what the holder's clock says).
    pub renew_time_skew: jiff::SignedDuration,
    /// Own the claim by the current Pod (`POD_NAME` and `POD_UID` set), so the garbage
    /// collector releases the lock when the Pod goes.
    pub owner_pod: bool,
    /// The claim's `ttlSecondsAfterFinished`: a claim this process could not delete
    /// (it died, the API was unreachable) is deleted this long after it finished.
    pub keep_finished: Option<Duration>,
}

impl Default for AcquireOptions {
    fn default() -> Self {
        AcquireOptions {
            identity: None,
            claim_name: None,
            lease_duration: Duration::from_secs(15),
            renewal: Renewal::Holder,
            priority: 0,
            lock_delay: Duration::ZERO,
            wait: None,
            renew_deadline: None,
            renew_time_skew: jiff::SignedDuration::ZERO,
            owner_pod: true,
            keep_finished: None,
        }
    }
}

/// Creates claims in one namespace.
#[derive(Clone)]
pub struct LockClient {
    client: Client,
    namespace: String,
}

impl LockClient {
    /// A client for locks in `namespace`.
    pub fn new(client: Client, namespace: impl Into<String>) -> Self {
        LockClient {
            client,
            namespace: namespace.into(),
        }
    }

    fn claims(&self) -> Api<LockClaim> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Creates a claim for `lease_name` and waits (watching) until it is granted.
    /// Dropping the future or timing out deletes the claim.
    pub async fn acquire(
        &self,
        lease_name: &str,
        opts: AcquireOptions,
    ) -> Result<Guard, LockError> {
        self.acquire_or_cancel(lease_name, opts, std::future::pending())
            .await
    }

    /// [`LockClient::acquire`], given up when `cancel` completes first: the claim is
    /// deleted (and the deletion awaited) before [`LockError::Cancelled`] returns, so
    /// a process that exits right after leaves nothing behind.
    pub async fn acquire_or_cancel(
        &self,
        lease_name: &str,
        opts: AcquireOptions,
        cancel: impl std::future::Future<Output = ()>,
    ) -> Result<Guard, LockError> {
        let claims = self.claims();
        let secs = |d: Duration| i32::try_from(d.as_secs()).unwrap_or(i32::MAX);
        let spec = LockClaimSpec {
            holder_identity: opts
                .identity
                .clone()
                .or_else(|| std::env::var("POD_NAME").ok()),
            lease_duration_seconds: secs(opts.lease_duration).max(1),
            priority: opts.priority,
            renewal: opts.renewal,
            lock_delay_seconds: secs(opts.lock_delay),
            ttl_seconds_after_finished: opts
                .keep_finished
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            acquire_timeout_seconds: opts.wait.map(ceil_secs),
            ..LockClaimSpec::for_lease(lease_name)
        };
        let owner = if opts.owner_pod {
            match (std::env::var("POD_NAME"), std::env::var("POD_UID")) {
                (Ok(name), Ok(uid)) => Some(vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Pod".into(),
                    name,
                    uid,
                    ..OwnerReference::default()
                }]),
                _ => None,
            }
        } else {
            None
        };
        let claim = LockClaim {
            metadata: ObjectMeta {
                name: opts.claim_name.clone(),
                generate_name: opts
                    .claim_name
                    .is_none()
                    .then(|| format!("{}-", truncate(lease_name, 50))),
                owner_references: owner,
                ..ObjectMeta::default()
            },
            spec,
            status: None,
        };
        let created = claims.create(&PostParams::default(), &claim).await?;
        let name = created.metadata.name.clone().unwrap_or_default();
        let cleanup = DeleteOnDrop {
            api: Some(claims.clone()),
            name: name.clone(),
        };

        let granted = async {
            let cond = |c: Option<&LockClaim>| {
                c.is_none_or(|c| c.phase().is_some_and(|p| p != Phase::Pending))
            };
            let c = kube::runtime::wait::await_condition(claims.clone(), &name, cond)
                .await
                .map_err(|e| LockError::Watch(e.to_string()))?;
            let Some(c) = c else {
                return Err(LockError::Ended("deleted".into()));
            };
            match c.phase() {
                Some(Phase::Granted) => Ok(c),
                Some(Phase::Rejected) => {
                    let (reason, message) = c
                        .condition(CONDITION_GRANTED)
                        .map(|x| (x.reason.clone(), x.message.clone()))
                        .unwrap_or_default();
                    Err(LockError::Rejected { reason, message })
                }
                Some(Phase::TimedOut) => Err(LockError::TimedOut(opts.wait.unwrap_or_default())),
                other => Err(LockError::Ended(format!("{other:?}"))),
            }
        };
        // The operator times the claim out (its deadline rounds up to whole seconds);
        // this is the backstop should it not answer.
        let waited = async {
            match opts.wait {
                Some(w) => tokio::time::timeout(w + OPERATOR_TIMEOUT_MARGIN, granted)
                    .await
                    .unwrap_or(Err(LockError::TimedOut(w))),
                None => granted.await,
            }
        };
        let result = tokio::select! {
            r = waited => r,
            () = cancel => Err(LockError::Cancelled),
        };
        cleanup.disarm();
        let c = match result {
            Ok(c) => c,
            Err(e) => {
                // Leave nothing behind: delete the claim before returning (a Drop-spawned
                // task might never run if the process exits right after).
                match claims.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(st)) if st.code == 404 => {}
                    Err(d) => {
                        tracing::warn!(claim = %name, error = %d, "could not delete the claim")
                    }
                }
                return Err(e);
            }
        };
        let identity = c.identity();
        let Some(token) = c.status.as_ref().and_then(|s| s.fencing_token) else {
            let _ = claims.delete(&name, &DeleteParams::default()).await;
            return Err(LockError::NoToken(name));
        };
        // For a lock with capacity the grant is one of its slot Leases: renew that one.
        let held = c
            .status
            .as_ref()
            .and_then(|s| s.lease.clone())
            .unwrap_or_else(|| lease_name.to_string());
        let renew_deadline = opts
            .renew_deadline
            .unwrap_or(opts.lease_duration * 2 / 3)
            .min(opts.lease_duration.saturating_sub(Duration::from_millis(1)));
        let (lost_tx, lost_rx) = watch::channel(None);
        let lost_tx = Arc::new(lost_tx);
        let mut tasks = vec![tokio::spawn(watch_claim(
            claims.clone(),
            name.clone(),
            lost_tx.clone(),
        ))];
        if opts.renewal == Renewal::Holder {
            let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
            tasks.push(tokio::spawn(renew(
                leases,
                held.clone(),
                identity.clone(),
                opts.lease_duration / 3,
                renew_deadline,
                opts.renew_time_skew,
                lost_tx.clone(),
            )));
        }
        Ok(Guard {
            claims,
            claim_name: name,
            lease_name: held,
            identity,
            token,
            lease_duration: opts.lease_duration,
            renew_deadline,
            lock_delay: opts.lock_delay,
            lost_rx,
            tasks,
            released: false,
        })
    }
}

/// How much longer than `wait` a client waits for the operator's own timeout.
const OPERATOR_TIMEOUT_MARGIN: Duration = Duration::from_secs(3);

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> i64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i64::try_from(s).unwrap_or(i64::MAX)
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => s[..i].trim_end_matches(['-', '.']),
        None => s,
    }
}

/// Deletes the claim unless disarmed (an abandoned or timed-out acquire leaves nothing).
struct DeleteOnDrop {
    api: Option<Api<LockClaim>>,
    name: String,
}

impl DeleteOnDrop {
    fn disarm(mut self) {
        self.api = None;
    }
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        if let Some(api) = self.api.take() {
            let name = std::mem::take(&mut self.name);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = api.delete(&name, &DeleteParams::default()).await;
                });
            }
        }
    }
}

async fn watch_claim(
    api: Api<LockClaim>,
    name: String,
    lost: Arc<watch::Sender<Option<LostReason>>>,
) {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        let reason = match ev {
            Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c)) => match c.phase() {
                Some(Phase::Granted) => None,
                other => Some(format!("{other:?}")),
            },
            Ok(watcher::Event::Delete(_)) => Some("deleted".to_string()),
            _ => None,
        };
        if let Some(r) = reason {
            let _ = lost.send(Some(LostReason::ClaimEnded(r)));
            return;
        }
    }
}

async fn renew(
    api: Api<Lease>,
    lease: String,
    identity: String,
    every: Duration,
    deadline: Duration,
    skew: jiff::SignedDuration,
    lost: Arc<watch::Sender<Option<LostReason>>>,
) {
    let mut last_ok = tokio::time::Instant::now();
    let every = every.max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        // Renew only while the Lease names us, with the resourceVersion we read.
        let attempt = async {
            let mut l = api.get_opt(&lease).await.ok()??;
            let holder = l.spec.as_ref().and_then(|s| s.holder_identity.clone());
            if holder.as_deref() != Some(identity.as_str()) {
                return Some(Err(holder));
            }
            if let Some(s) = l.spec.as_mut() {
                let now = Timestamp::now();
                s.renew_time = Some(MicroTime(now.checked_add(skew).unwrap_or(now)));
            }
            api.replace(&lease, &PostParams::default(), &l)
                .await
                .ok()
                .map(|_| Ok(()))
        };
        let remaining = deadline.saturating_sub(last_ok.elapsed());
        match tokio::time::timeout(remaining, attempt).await {
            Ok(Some(Ok(()))) => last_ok = tokio::time::Instant::now(),
            Ok(Some(Err(holder))) => {
                let _ = lost.send(Some(LostReason::LeaseTaken(holder)));
                return;
            }
            _ if last_ok.elapsed() >= deadline => {
                let _ = lost.send(Some(LostReason::RenewFailed));
                return;
            }
            _ => {}
        }
    }
}

/// A held lock. Renews (Holder renewal) in the background; releases on [`Guard::release`]
/// or, as best effort, on drop.
pub struct Guard {
    claims: Api<LockClaim>,
    claim_name: String,
    lease_name: String,
    identity: String,
    token: i64,
    lease_duration: Duration,
    renew_deadline: Duration,
    lock_delay: Duration,
    lost_rx: watch::Receiver<Option<LostReason>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    released: bool,
}

impl Guard {
    /// The fencing token of this grant: strictly larger than any earlier grant's for
    /// the same Lease name. Pass it to downstream systems.
    pub fn fencing_token(&self) -> i64 {
        self.token
    }

    /// Stamps `obj` for a write under this grant: the annotation
    /// `leasekeeper.io/fencing-token` with this grant's token. Write it with any client;
    /// if the object is guarded (label `leasekeeper.io/fenced-by`, with the policy of
    /// `kubectl lock fence` or the chart's `fencing.resources`), the API server refuses
    /// the write once a later holder has written the object with a higher token.
    pub fn fence<K: kube::Resource>(&self, obj: &mut K) {
        obj.meta_mut()
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                crate::api::FENCING_TOKEN_ANNOTATION.to_string(),
                self.token.to_string(),
            );
    }

    /// The identity written to the Lease.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The LockClaim's name.
    pub fn claim_name(&self) -> &str {
        &self.claim_name
    }

    /// The Lease held: the one named like the lock, or for a lock with capacity one of
    /// its slot Leases (`<lock>-slot-<i>`). A Holder-renewal guard renews this one.
    pub fn lease_name(&self) -> &str {
        &self.lease_name
    }

    /// How long after a loss is detected the Lease can, at the earliest, be granted to
    /// someone else: zero when it was taken away (the claim ended or the Lease names
    /// someone else), else `lease_duration - renew_deadline + lock_delay`.
    pub fn safety_margin(&self, reason: &LostReason) -> Duration {
        if reason.granted_elsewhere() {
            Duration::ZERO
        } else {
            self.lease_duration.saturating_sub(self.renew_deadline) + self.lock_delay
        }
    }

    /// Whether the lock is known to be lost, without waiting.
    pub fn is_lost(&self) -> Option<LostReason> {
        self.lost_rx.borrow().clone()
    }

    /// Resolves when the lock is lost (never, while it is held).
    pub async fn lost(&self) -> LostReason {
        let mut rx = self.lost_rx.clone();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Stops this process's part (watching, renewing) and leaves the claim in place: for
    /// `Controller`-renewal claims that the operator keeps renewing after this exits.
    pub fn keep(mut self) {
        self.released = true;
        for t in &self.tasks {
            t.abort();
        }
    }

    /// Releases the lock: deletes the claim and waits until it is gone.
    pub async fn release(mut self) -> Result<(), LockError> {
        self.released = true;
        for t in &self.tasks {
            t.abort();
        }
        match self
            .claims
            .delete(&self.claim_name, &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let gone = kube::runtime::wait::await_condition(
            self.claims.clone(),
            &self.claim_name,
            |c: Option<&LockClaim>| c.is_none(),
        );
        gone.await.map_err(|e| LockError::Watch(e.to_string()))?;
        Ok(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if !self.released {
            let (api, name) = (self.claims.clone(), self.claim_name.clone());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = api.delete(&name, &DeleteParams::default()).await;
                });
            }
        }
    }
}

/// Leader election for workloads, the common "one active replica of my Deployment"
/// case: waits until this process holds `lease_name`, then runs `on_started(token)`.
/// If leadership is lost first, that future is dropped (cancelled), as client-go
/// cancels OnStartedLeading's context. Either way `on_stopped` runs with the reason
/// the term ended (`None`: the task finished), and the lock is released so the next
/// contender takes over at once.
pub async fn run_as_leader<F, Fut>(
    locks: &LockClient,
    lease_name: &str,
    identity: &str,
    on_started: F,
    on_stopped: impl FnOnce(Option<LostReason>),
) -> Result<(), LockError>
where
    F: FnOnce(i64) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let opts = AcquireOptions {
        identity: Some(identity.to_string()),
        ..AcquireOptions::default()
    };
    let guard = locks.acquire(lease_name, opts).await?;
    let task = on_started(guard.fencing_token());
    let lost = tokio::select! {
        _ = task => None,
        reason = guard.lost() => Some(reason),
    };
    on_stopped(lost.clone());
    guard.release().await?;
    match lost {
        Some(r) => Err(LockError::Lost(r)),
        None => Ok(()),
    }
}
