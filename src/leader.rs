//! Leader election for the operator's own replicas, on a Lease (`leasekeeper-leader`).
//!
//! Like client-go's LeaseLock, with three differences that matter for failover:
//! followers *watch* the Lease, so a leader that releases on SIGTERM is replaced in
//! milliseconds rather than at the next retry; expiry is judged on this process's
//! monotonic clock from the moment it last saw the Lease change, never by comparing
//! the holder's renewTime with the local wall clock; and every write carries the
//! resourceVersion it was decided from.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;

/// Timings and names of an election.
#[derive(Clone, Debug)]
pub struct ElectionConfig {
    /// Namespace of the leadership Lease.
    pub namespace: String,
    /// Name of the leadership Lease.
    pub name: String,
    /// This candidate's identity.
    pub identity: String,
    /// How long a leader's term lasts without renewal.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long gives up (must be < lease_duration).
    pub renew_deadline: Duration,
    /// How often the leader renews, and how often a write is retried.
    pub retry_period: Duration,
}

/// Errors of the election.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// Reading or writing the leadership Lease failed.
    #[error("leader election on Lease {namespace}/{name}: {source}")]
    Api {
        /// Namespace.
        namespace: String,
        /// Lease name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Two writes of the leadership Lease did not return integer resourceVersions that
    /// rise: fencing tokens (resourceVersions) would not order grants here.
    #[error("fencing tokens are Lease resourceVersions and need integers that rise with every write, but two writes of Lease {namespace}/{name} returned {first:?} then {second:?}; leasekeeper refuses to run: use an etcd-backed kube-apiserver (resourceVersions are comparable since Kubernetes 1.35, KEP-5504), and restore etcd snapshots with a revision bump (etcdutl snapshot restore --bump-revision=<more than the writes since the snapshot> --mark-compacted)")]
    TokensNotRising {
        /// Namespace.
        namespace: String,
        /// Lease name.
        name: String,
        /// The first write's resourceVersion.
        first: Option<String>,
        /// The second write's resourceVersion.
        second: Option<String>,
    },
    /// retry_period < renew_deadline < lease_duration must hold.
    #[error("leader election timings must satisfy retry period ({retry:?}) < renew deadline ({renew:?}) < lease duration ({lease:?}, written to the Lease in whole seconds, rounded up)")]
    BadTimings {
        /// Renew deadline.
        renew: Duration,
        /// Lease duration.
        lease: Duration,
        /// Retry period.
        retry: Duration,
    },
}

/// How long this replica may still act as leader, on its own monotonic clock.
///
/// A leader's term runs until `renew_deadline` after it *sent* its last successful
/// renewal; a follower counts the full lease duration from when it *saw* that renewal,
/// which is later. So while [`Term::is_current`] holds, no follower can have taken over.
/// The controller checks it right before every write: a leader frozen mid-plan (SIGSTOP,
/// a paused VM) that wakes after its term stops before its next write instead of
/// finishing the plan.
#[derive(Clone, Debug)]
pub struct Term {
    state: Arc<Mutex<TermState>>,
}

#[derive(Debug)]
struct TermState {
    /// None: no end (a replica without leader election).
    until: Option<Instant>,
    /// Ended on purpose (shutdown, step-down): no renewal extends it again.
    ended: bool,
}

impl Term {
    fn new(until: Option<Instant>) -> Term {
        Term {
            state: Arc::new(Mutex::new(TermState {
                until,
                ended: false,
            })),
        }
    }

    /// A term that never ends by itself: a replica running without leader election.
    pub fn unbounded() -> Term {
        Term::new(None)
    }

    /// A term that ends at `until` (extended by [`Term::extend`]).
    pub fn until(until: Instant) -> Term {
        Term::new(Some(until))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TermState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the end of the term to `until` (never earlier than it was, never after the
    /// term was ended).
    pub fn extend(&self, until: Instant) {
        let mut s = self.state();
        if let (Some(u), false) = (s.until, s.ended) {
            s.until = Some(u.max(until));
        }
    }

    /// Ends the term now, for good (every clone sees it): the first step of a shutdown
    /// or a step-down, before in-flight work is drained and the leadership Lease is
    /// released.
    pub fn end(&self) {
        self.state().ended = true;
    }

    /// Whether the term still runs now.
    pub fn is_current(&self) -> bool {
        let s = self.state();
        !s.ended && s.until.is_none_or(|u| Instant::now() < u)
    }

    /// How long the term still runs as things stand (None: no end; zero once ended).
    pub fn remaining(&self) -> Option<Duration> {
        let s = self.state();
        if s.ended {
            return Some(Duration::ZERO);
        }
        s.until.map(|u| u.saturating_duration_since(Instant::now()))
    }

    /// Runs `work` only as long as the term runs as things stand when it starts: a
    /// request still waiting for a connection when the term ends (the API server down,
    /// say) is abandoned instead of being sent later. None if it was abandoned.
    pub async fn within<F: std::future::Future>(&self, work: F) -> Option<F::Output> {
        match self.remaining() {
            None => Some(work.await),
            Some(d) => tokio::time::timeout(d, work).await.ok(),
        }
    }
}

/// Leadership held. Renews in the background; [`Leadership::lost`] resolves when a
/// renewal could not be made before the renew deadline (or someone else took the Lease).
pub struct Leadership {
    lost_rx: watch::Receiver<bool>,
    term: Term,
    task: tokio::task::JoinHandle<()>,
    api: Api<Lease>,
    cfg: ElectionConfig,
}

/// The lease duration as written into the Lease: whole seconds, rounded *up*, so that a
/// follower (which counts what the Lease says) never waits less than the leader's term.
fn secs(d: Duration) -> i32 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(s.max(1)).unwrap_or(i32::MAX)
}

/// Whether two resourceVersions, in write order, work as fencing tokens: both are
/// positive integers and the second is greater.
pub fn tokens_rise(first: Option<&str>, second: Option<&str>) -> bool {
    let parse = |rv: Option<&str>| rv.and_then(|v| v.parse::<u64>().ok()).filter(|n| *n > 0);
    matches!((parse(first), parse(second)), (Some(a), Some(b)) if b > a)
}

fn holder(l: &Lease) -> Option<&str> {
    l.spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

impl ElectionConfig {
    /// The renew deadline (a leader's term after its last renewal) must be shorter than
    /// the lease duration as followers read it from the Lease, and longer than the
    /// retry period (or a leader could not renew even once in its term).
    pub fn check_timings(&self) -> Result<(), ElectionError> {
        let written = Duration::from_secs(u64::try_from(secs(self.lease_duration)).unwrap_or(1));
        if self.renew_deadline >= self.lease_duration.min(written)
            || self.retry_period >= self.renew_deadline
        {
            return Err(ElectionError::BadTimings {
                renew: self.renew_deadline,
                lease: self.lease_duration,
                retry: self.retry_period,
            });
        }
        Ok(())
    }

    fn err(&self, source: kube::Error) -> ElectionError {
        ElectionError::Api {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }

    /// Blocks until this candidate leads.
    pub async fn acquire(self, client: Client) -> Result<Leadership, ElectionError> {
        self.check_timings()?;
        let api: Api<Lease> = Api::namespaced(client, &self.namespace);
        // Observations: (holder, renewTime) and when we first saw that pair.
        let mut seen: Option<(Option<String>, Option<Timestamp>, Instant)> = None;
        let cfg = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut changes = watcher(api.clone(), cfg).default_backoff().boxed();
        loop {
            // A follower rides out API errors (an API server restart, say): it retries
            // every retry period instead of exiting.
            let current = match api.get_opt(&self.name).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %self.err(e), "leader election: cannot read the Lease; retrying");
                    tokio::time::sleep(self.retry_period).await;
                    continue;
                }
            };
            // The write below is sent after this instant: a term won by it counts from here.
            let now = Instant::now();
            let won = match current {
                None => self.try_write(&api, None).await,
                Some(lease) => {
                    let h = holder(&lease).map(str::to_string);
                    let r = lease
                        .spec
                        .as_ref()
                        .and_then(|s| s.renew_time.as_ref())
                        .map(|t| t.0);
                    let duration = lease
                        .spec
                        .as_ref()
                        .and_then(|s| s.lease_duration_seconds)
                        .map_or(self.lease_duration, |s| {
                            Duration::from_secs(u64::try_from(s.max(1)).unwrap_or(1))
                        });
                    match &seen {
                        Some((sh, sr, _)) if *sh == h && *sr == r => {}
                        _ => seen = Some((h.clone(), r, now)),
                    }
                    let since = seen.as_ref().map_or(now, |s| s.2);
                    let free = h.is_none()
                        || h.as_deref() == Some(self.identity.as_str())
                        || now >= since + duration;
                    if free {
                        self.try_write(&api, Some(lease)).await
                    } else {
                        // Wait for the Lease to change (release, renewal) or to run out.
                        let wake = since + duration;
                        let _ = tokio::time::timeout_at(wake, changes.next()).await;
                        Ok(None)
                    }
                }
            };
            let won = match won {
                Ok(Some(l)) => self.check_tokens(&api, l).await,
                other => other.map(|_| false),
            };
            let won = match won {
                Ok(w) => w,
                Err(e @ ElectionError::TokensNotRising { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "leader election: cannot write the Lease; retrying");
                    tokio::time::sleep(self.retry_period).await;
                    false
                }
            };
            if won {
                tracing::info!(identity = %self.identity, lease = %self.name, "became leader");
                let (lost_tx, lost_rx) = watch::channel(false);
                let term = Term::until(now + self.renew_deadline);
                let task = tokio::spawn(renew_loop(
                    api.clone(),
                    self.clone(),
                    lost_tx,
                    term.clone(),
                    now,
                ));
                return Ok(Leadership {
                    lost_rx,
                    term,
                    task,
                    api,
                    cfg: self,
                });
            }
        }
    }

    /// Takes the Lease (create, or update with the resourceVersion read): the Lease as
    /// written, or `None` on a lost race.
    async fn try_write(
        &self,
        api: &Api<Lease>,
        current: Option<Lease>,
    ) -> Result<Option<Lease>, ElectionError> {
        let now = MicroTime(Timestamp::now());
        let result = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(secs(self.lease_duration)),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                let same = holder(&lease) == Some(self.identity.as_str());
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if !same {
                    spec.lease_transitions =
                        Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
                    spec.acquire_time = Some(now.clone());
                }
                spec.holder_identity = Some(self.identity.clone());
                spec.lease_duration_seconds = Some(secs(self.lease_duration));
                spec.renew_time = Some(now);
                api.replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(l) => Ok(Some(l)),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Writes the Lease just won once more and compares the two resourceVersions (see
    /// [`tokens_rise`]). An API error is retried like a lost write; tokens that do not
    /// rise are fatal.
    async fn check_tokens(&self, api: &Api<Lease>, won: Lease) -> Result<bool, ElectionError> {
        let mut again = won.clone();
        if let Some(s) = again.spec.as_mut() {
            s.renew_time = Some(MicroTime(Timestamp::now()));
        }
        let second = match api
            .replace(&self.name, &PostParams::default(), &again)
            .await
        {
            Ok(l) => l,
            Err(kube::Error::Api(s)) if s.code == 409 => return Ok(false),
            Err(e) => return Err(self.err(e)),
        };
        let (first, second) = (won.resource_version(), second.resource_version());
        if tokens_rise(first.as_deref(), second.as_deref()) {
            return Ok(true);
        }
        Err(ElectionError::TokensNotRising {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            first,
            second,
        })
    }
}

async fn renew_loop(
    api: Api<Lease>,
    cfg: ElectionConfig,
    lost: watch::Sender<bool>,
    term: Term,
    won_at: Instant,
) {
    // When the last successful renewal was sent (not when its answer came).
    let mut last_ok = won_at;
    let mut current: Option<Lease> = None;
    loop {
        tokio::time::sleep(cfg.retry_period).await;
        let sent = Instant::now();
        let attempt = async {
            // One request per renewal: the Lease from our last write carries the
            // resourceVersion precondition; re-read only after a conflict or an error.
            let mut lease = match current.take() {
                Some(l) => l,
                None => match api.get_opt(&cfg.name).await {
                    Ok(Some(l)) => l,
                    _ => return Renewal::Failed,
                },
            };
            if holder(&lease) != Some(cfg.identity.as_str()) {
                return Renewal::Taken(holder(&lease).map(str::to_string));
            }
            if let Some(s) = lease.spec.as_mut() {
                s.renew_time = Some(MicroTime(Timestamp::now()));
            }
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(l) => Renewal::Renewed(Box::new(l)),
                Err(_) => Renewal::Failed,
            }
        };
        let remaining = cfg.renew_deadline.saturating_sub(last_ok.elapsed());
        match tokio::time::timeout(remaining, attempt).await {
            Ok(Renewal::Renewed(l)) => {
                last_ok = sent;
                term.extend(sent + cfg.renew_deadline);
                current = Some(*l);
            }
            Ok(Renewal::Taken(by)) => {
                tracing::error!(identity = %cfg.identity, holder = ?by, "leadership taken by another replica");
                let _ = lost.send(true);
                return;
            }
            _ if last_ok.elapsed() >= cfg.renew_deadline => {
                tracing::error!(identity = %cfg.identity, "could not renew leadership before the renew deadline");
                let _ = lost.send(true);
                return;
            }
            _ => tracing::warn!(identity = %cfg.identity, "leadership renewal failed; retrying"),
        }
    }
}

enum Renewal {
    Renewed(Box<Lease>),
    Taken(Option<String>),
    Failed,
}

impl Leadership {
    /// This leadership's term: check [`Term::is_current`] before acting as leader.
    pub fn term(&self) -> Term {
        self.term.clone()
    }

    /// Resolves when leadership is lost.
    pub async fn lost(&mut self) {
        while !*self.lost_rx.borrow() {
            if self.lost_rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Gives leadership up at once (on graceful shutdown), so a follower takes over
    /// without waiting for the term to run out.
    pub async fn release(self) {
        self.task.abort();
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await {
            if holder(&lease) == Some(self.cfg.identity.as_str()) {
                if let Some(s) = lease.spec.as_mut() {
                    s.holder_identity = None;
                    s.renew_time = Some(MicroTime(Timestamp::now()));
                }
                match self
                    .api
                    .replace(&lease.name_any(), &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => tracing::info!(identity = %self.cfg.identity, "released leadership"),
                    Err(e) => tracing::warn!(error = %e, "could not release leadership"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn work_is_abandoned_when_the_term_ends_and_runs_to_its_end_without_one() {
        let term = Term::until(Instant::now() + Duration::from_secs(2));
        let slow = tokio::time::sleep(Duration::from_secs(5));
        assert!(term.within(slow).await.is_none(), "outlived the term");
        let quick = async { 7 };
        let term = Term::until(Instant::now() + Duration::from_secs(2));
        assert_eq!(term.within(quick).await, Some(7));
        term.end();
        assert_eq!(term.remaining(), Some(Duration::ZERO));
        assert!(term
            .within(tokio::time::sleep(Duration::from_millis(1)))
            .await
            .is_none());
        let free = Term::unbounded();
        assert_eq!(
            free.within(tokio::time::sleep(Duration::from_secs(60)))
                .await,
            Some(())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_term_is_current_until_its_end_and_extending_never_shortens_it() {
        let t0 = Instant::now();
        let term = Term::until(t0 + Duration::from_secs(2));
        let seen_by_executor = term.clone();
        assert!(seen_by_executor.is_current());
        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(seen_by_executor.is_current());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!seen_by_executor.is_current(), "over at its end");
        // A renewal on the original handle reaches every clone.
        term.extend(Instant::now() + Duration::from_secs(2));
        assert!(seen_by_executor.is_current());
        // A late answer to an older renewal does not pull the end back.
        term.extend(t0);
        assert!(seen_by_executor.is_current());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!seen_by_executor.is_current());
    }

    #[tokio::test(start_paused = true)]
    async fn an_ended_term_stays_ended_whatever_renewals_come_later() {
        let term = Term::until(Instant::now() + Duration::from_secs(10));
        let seen_by_executor = term.clone();
        term.end();
        assert!(!seen_by_executor.is_current());
        term.extend(Instant::now() + Duration::from_secs(10));
        assert!(
            !seen_by_executor.is_current(),
            "a late renewal does not revive it"
        );
        let unbounded = Term::unbounded();
        unbounded.end();
        assert!(!unbounded.is_current());
    }

    #[test]
    fn only_integer_resource_versions_that_rise_pass_as_fencing_tokens() {
        assert!(tokens_rise(Some("41"), Some("42")));
        assert!(
            tokens_rise(Some("9"), Some("1000000000009")),
            "a revision bump"
        );
        assert!(!tokens_rise(Some("42"), Some("42")), "not rising");
        assert!(
            !tokens_rise(Some("42"), Some("17")),
            "backwards (a restore without a bump)"
        );
        assert!(!tokens_rise(Some("0"), Some("1")), "not positive");
        assert!(!tokens_rise(Some("a1"), Some("b2")), "not integers");
        assert!(!tokens_rise(Some("1"), None));
    }

    #[test]
    fn the_written_lease_duration_rounds_up_so_terms_cannot_overlap() {
        assert_eq!(secs(Duration::from_millis(1900)), 2);
        assert_eq!(secs(Duration::from_secs(15)), 15);
        assert_eq!(secs(Duration::from_millis(1)), 1);
        let cfg = |lease: u64, renew: u64, retry: u64| ElectionConfig {
            namespace: "ns".into(),
            name: "l".into(),
            identity: "me".into(),
            lease_duration: Duration::from_millis(lease),
            renew_deadline: Duration::from_millis(renew),
            retry_period: Duration::from_millis(retry),
        };
        assert!(
            cfg(1900, 1500, 500).check_timings().is_ok(),
            "1.9 s is written as 2 s"
        );
        assert!(cfg(15_000, 10_000, 2_000).check_timings().is_ok());
        assert!(
            cfg(2_000, 2_000, 500).check_timings().is_err(),
            "deadline = duration"
        );
        assert!(
            cfg(2_000, 1_500, 1_500).check_timings().is_err(),
            "retry = deadline"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_unbounded_term_never_ends() {
        let term = Term::unbounded();
        term.extend(Instant::now());
        tokio::time::advance(Duration::from_secs(86_400)).await;
        assert!(term.is_current());
    }
}
