//! The single-Lease driver of the model API server ([`super::server`]): one Lease and its
//! claims, decided by `decide_lease` (the per-Lease entry point) and applied step by
//! step with the preconditions the executor sends, holders that renew on their own
//! clock, outsiders that write the Lease, Pods that ask for it; the invariants of
//! docs/design.md checked after every single write, which is every moment a watcher
//! could observe.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::ObjectMeta;

use super::server::{Conflict, Server, NS};
use crate::api::FINALIZER;
use crate::api::{LockClaim, LockClaimSpec, Phase};
use crate::arbiter::{decide_lease, Config, Input, Memory, Plan, Step};

pub const LEASE: &str = "lease";

/// A holder process that renews the Lease while it names it.
#[derive(Clone, Debug)]
pub struct HolderProc {
    pub identity: String,
    pub every: Duration,
    pub skew_secs: i64,
    pub next: Duration,
}

pub struct World {
    /// The model API server: claims, the Lease (named [`LEASE`]), revisions, clocks.
    pub server: Server,
    pub memory: Memory,
    pub config: Config,
    pub max_token: i64,
    pub notes: Vec<crate::arbiter::Note>,
    /// Holders that renew in time: none of them may ever be expired.
    pub healthy: BTreeMap<String, HolderProc>,
    /// Invariant violations seen while applying writes.
    pub violations: Vec<String>,
    pub writes: usize,
    pub grants: usize,
    /// An outsider wrote the Lease since the operator last completed a plan.
    pub outsider_dirty: bool,
    /// Whether the Lease that exists now was created by the operator (which stamps its
    /// proof of creation on it): garbage collection may delete no other.
    pub created_by_operator: bool,
    /// Pods that ask for the lock.
    pub pods: Vec<crate::arbiter::PodView>,
    /// Pods opened (gate removed), with the token written into them, in order.
    pub opened: Vec<(String, i64)>,
    /// The model's negative control: `false` drops the resourceVersion precondition
    /// from Lease writes (and the check before an expiry), as the operator's
    /// `no-precondition` sabotage does.
    pub lease_precondition: bool,
    /// `true` (unit tests): a write that breaks an invariant panics at once. `false`
    /// (property tests): it is recorded in `violations`, the plan stops there, and
    /// [`World::check`] reports it; no panic message is printed for a history that fails.
    pub panic_on_violation: bool,
}

impl Default for World {
    fn default() -> Self {
        World {
            server: Server::default(),
            memory: Memory::default(),
            config: Config {
                gc_grace: Duration::from_secs(60),
                // Small, so that histories reach past the exact positions.
                exact_positions: 3,
                position_delay: Duration::from_secs(1),
                pods: true,
            },
            max_token: 0,
            notes: Vec::new(),
            healthy: BTreeMap::new(),
            violations: Vec::new(),
            writes: 0,
            grants: 0,
            outsider_dirty: false,
            created_by_operator: false,
            pods: Vec::new(),
            opened: Vec::new(),
            lease_precondition: true,
            panic_on_violation: true,
        }
    }
}

impl std::ops::Deref for World {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

impl std::ops::DerefMut for World {
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.server
    }
}

pub fn spec(lease_duration: i32) -> LockClaimSpec {
    LockClaimSpec {
        lease_duration_seconds: lease_duration,
        ..LockClaimSpec::for_lease(LEASE)
    }
}

impl World {
    /// The Lease, if it exists.
    pub fn lease(&self) -> Option<&Lease> {
        self.server.leases.get(LEASE)
    }

    pub fn lease_mut(&mut self) -> Option<&mut Lease> {
        self.server.leases.get_mut(LEASE)
    }

    /// A holder renews: only while the Lease names it, with its resourceVersion.
    pub fn renew(&mut self, identity: &str, skew_secs: i64) -> bool {
        let names_it = self
            .lease()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.holder_identity.as_deref())
            == Some(identity);
        if !names_it {
            return false;
        }
        let t = self
            .wall
            .checked_add(jiff::SignedDuration::from_secs(skew_secs))
            .unwrap_or(self.server.wall);
        let rv = self.server.next_rv();
        if let Some(l) = self.server.leases.get_mut(LEASE) {
            if let Some(s) = l.spec.as_mut() {
                s.renew_time = Some(MicroTime(t));
            }
            l.metadata.resource_version = Some(rv);
        }
        true
    }

    /// Someone outside leasekeeper (with Lease write) writes the Lease: edits ours, or
    /// creates one of its own, labelled to allow a takeover if `allow_takeover`.
    pub fn outsider_write(&mut self, holder: Option<&str>, duration: i32, allow_takeover: bool) {
        let rv = self.server.next_rv();
        let wall = self.server.wall;
        if self.lease().is_none() {
            self.created_by_operator = false;
        }
        let l = self
            .server
            .leases
            .entry(LEASE.to_string())
            .or_insert_with(|| Lease {
                metadata: ObjectMeta {
                    name: Some(LEASE.into()),
                    namespace: Some(NS.into()),
                    labels: allow_takeover.then(|| {
                        [(
                            crate::api::TAKEOVER_LABEL.to_string(),
                            crate::api::TAKEOVER_ALLOWED.to_string(),
                        )]
                        .into()
                    }),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec::default()),
            });
        l.metadata.resource_version = Some(rv);
        self.outsider_dirty = true;
        let s = l.spec.get_or_insert_with(LeaseSpec::default);
        s.holder_identity = holder.map(str::to_string);
        s.renew_time = Some(MicroTime(wall));
        s.lease_duration_seconds = Some(duration);
    }

    /// The holder edits fields of its Lease the operator must not trust: the duration
    /// and the acquireTime (pushed a day ahead).
    pub fn holder_stretches_lease(&mut self) {
        let rv = self.server.next_rv();
        let later = self.server.wall + jiff::SignedDuration::from_hours(24);
        if let Some(s) = self.server.leases.get_mut(LEASE).and_then(|l| {
            l.metadata.resource_version = Some(rv);
            l.spec.as_mut()
        }) {
            s.lease_duration_seconds = Some(86_400);
            s.acquire_time = Some(MicroTime(later));
        }
    }

    /// Someone who may update (not delete) the Lease labels it as leasekeeper's.
    pub fn forge_managed_label(&mut self) {
        let rv = self.server.next_rv();
        if let Some(l) = self.server.leases.get_mut(LEASE) {
            l.metadata.resource_version = Some(rv);
            l.metadata
                .labels
                .get_or_insert_with(Default::default)
                .insert(
                    crate::api::MANAGED_BY_LABEL.to_string(),
                    crate::api::MANAGED_BY_VALUE.to_string(),
                );
            self.outsider_dirty = true;
        }
    }

    pub fn delete_lease(&mut self) {
        if self.server.leases.remove(LEASE).is_some() {
            self.server.rv += 1;
            self.outsider_dirty = true;
        }
    }

    /// Advances both clocks, letting healthy holders renew on their schedule.
    pub fn advance(&mut self, d: Duration) {
        let target = self.server.mono + d;
        loop {
            let next = self
                .healthy
                .values()
                .map(|h| h.next)
                .filter(|n| *n <= target)
                .min();
            let Some(at) = next else { break };
            self.step_clock(at.saturating_sub(self.server.mono));
            let due: Vec<HolderProc> = self
                .healthy
                .values()
                .filter(|h| h.next <= self.server.mono)
                .cloned()
                .collect();
            for h in due {
                self.renew(&h.identity, h.skew_secs);
                if let Some(p) = self.healthy.get_mut(&h.identity) {
                    p.next = self.server.mono + p.every;
                }
            }
        }
        self.step_clock(target.saturating_sub(self.server.mono));
    }

    fn step_clock(&mut self, d: Duration) {
        self.server.step_clock(d);
    }

    /// Forgets everything in memory, as a restarted (or newly elected) operator would.
    pub fn restart(&mut self) {
        self.memory = Memory::default();
    }

    pub fn plan(&self) -> Plan {
        let claims: Vec<&LockClaim> = self.server.claims.values().collect();
        let mut plan = decide_lease(&Input {
            lease_name: LEASE,
            slot: 0,
            claims: &claims,
            lease: self.lease(),
            lease_proven: self.created_by_operator,
            pods: &self.pods,
            memory: &self.memory,
            now: self.server.now(),
            config: self.config,
        });
        // As the lock-level decide does: a gated Pod without a claim gets one first.
        let created = crate::arbiter::pods::missing_claims(&self.pods, &claims, LEASE);
        plan.steps.splice(0..0, created);
        plan
    }

    /// Decides from a cache whose Lease is `lease` (perhaps older than the claims), as
    /// an operator whose Lease watch lags its claim watch would.
    pub fn plan_with_lease(&self, lease: Option<&Lease>) -> Plan {
        let claims: Vec<&LockClaim> = self.server.claims.values().collect();
        decide_lease(&Input {
            lease_name: LEASE,
            slot: 0,
            claims: &claims,
            lease,
            lease_proven: self.created_by_operator,
            pods: &self.pods,
            memory: &self.memory,
            now: self.server.now(),
            config: self.config,
        })
    }

    /// An invariant broke: panic, or record it (see `panic_on_violation`).
    fn violated(&mut self, msg: String) {
        assert!(!self.panic_on_violation, "{msg}");
        if self.violations.is_empty() {
            self.violations.push(msg);
        }
    }

    /// Decides and applies the whole plan; panics on an invariant violation.
    pub fn reconcile(&mut self) -> Plan {
        let plan = self.plan();
        let snapshot = self.server.rvs();
        self.apply(&plan, &snapshot, usize::MAX);
        plan
    }

    /// Reconciles until a plan makes no write (at most 10 rounds).
    pub fn settle(&mut self) {
        let mut last = Vec::new();
        for _ in 0..10 {
            let plan = self.reconcile();
            if !plan.steps.iter().any(|s| !matches!(s, Step::Event(_))) {
                return;
            }
            last = plan.steps;
        }
        panic!(
            "did not settle in 10 rounds; last plan: {last:#?}\nclaims: {:#?}\nlease: {:#?}",
            self.server.claims,
            self.lease()
        );
    }

    /// [`World::settle`], and past the delay of any deferred queue-position update,
    /// until none is pending.
    pub fn settle_fully(&mut self) {
        for _ in 0..10 {
            self.settle();
            if self.memory.positions_due.is_none() {
                return;
            }
            self.advance(self.config.position_delay);
        }
        panic!("queue positions still deferred after 10 rounds");
    }

    /// Applies up to `limit` steps of `plan`, decided when claims had the resourceVersions
    /// in `snapshot`; stops at the first precondition failure, as the executor does.
    /// The memory is kept only if every step was applied.
    pub fn apply(&mut self, plan: &Plan, snapshot: &HashMap<String, String>, limit: usize) -> bool {
        let mut rvs = snapshot.clone();
        let mut last_lease_rv: Option<i64> = None;
        for (i, step) in plan.steps.iter().enumerate() {
            if i >= limit {
                return false;
            }
            if self.apply_step(step, &mut rvs, &mut last_lease_rv).is_err() {
                return false;
            }
            if let Err(e) = self.check() {
                let msg = format!(
                    "invariant violated after step {i} {step:#?}: {e}\nclaims: {:#?}\nlease: {:#?}",
                    self.server.claims,
                    self.lease()
                );
                self.violated(msg);
                return false;
            }
        }
        self.memory = plan.memory.clone();
        if plan.steps.iter().any(|s| {
            matches!(
                s,
                Step::WriteLease {
                    kind: crate::arbiter::LeaseWriteKind::Create
                        | crate::arbiter::LeaseWriteKind::Grant,
                    ..
                }
            )
        }) {
            self.memory.rebase_grant(self.server.mono);
        }
        self.outsider_dirty = false;
        true
    }

    fn apply_step(
        &mut self,
        step: &Step,
        rvs: &mut HashMap<String, String>,
        last_lease_rv: &mut Option<i64>,
    ) -> Result<(), Conflict> {
        let next_rv = (self.server.rv + 1).to_string();
        match step {
            Step::Event(n) => {
                self.notes.push(n.clone());
                return Ok(());
            }
            Step::VerifyLease { .. } if !self.lease_precondition => return Ok(()),
            Step::VerifyLease { resource_version } => {
                let have = self
                    .lease()
                    .and_then(|l| l.metadata.resource_version.clone());
                return if &have == resource_version {
                    Ok(())
                } else {
                    Err(Conflict)
                };
            }
            Step::AddFinalizer { claim } => {
                let c = self.server.claim_precondition(claim, rvs)?;
                c.metadata
                    .finalizers
                    .get_or_insert_with(Vec::new)
                    .push(FINALIZER.into());
                c.metadata.resource_version = Some(next_rv.clone());
                rvs.insert(claim.clone(), next_rv);
            }
            Step::SetStatus {
                claim,
                status,
                fill_token,
            } => {
                let max_token = self.max_token;
                let c = self.server.claim_precondition(claim, rvs)?;
                let mut st = status.clone();
                if *fill_token {
                    st.fencing_token = *last_lease_rv;
                }
                truncate_to_seconds(&mut st);
                let was_granted = c.phase() == Some(Phase::Granted);
                let newly_granted = st.phase == Some(Phase::Granted) && !was_granted;
                let token = st.fencing_token.unwrap_or_default();
                let expired_by_heartbeat = st.phase == Some(Phase::Expired)
                    && was_granted
                    && st
                        .conditions
                        .iter()
                        .any(|x| x.reason == crate::arbiter::Reason::Expired.as_str());
                let identity = c.identity();
                let timed_out_holding = st.phase == Some(Phase::TimedOut) && was_granted;
                let try_lock_queued =
                    st.phase == Some(Phase::Pending) && c.spec.acquire_timeout_seconds == Some(0);
                let lost_lease = st.phase == Some(Phase::Expired)
                    && st
                        .conditions
                        .iter()
                        .any(|x| x.reason == crate::arbiter::Reason::LeaseLost.as_str());
                c.status = Some(st);
                c.metadata.resource_version = Some(next_rv.clone());
                rvs.insert(claim.clone(), next_rv);
                if newly_granted {
                    if token <= max_token {
                        self.violated(format!("fencing token {token} not above {max_token}"));
                    }
                    self.max_token = token;
                    self.grants += 1;
                }
                if timed_out_holding {
                    self.violations
                        .push(format!("{identity} timed out while Granted"));
                }
                if try_lock_queued {
                    self.violations
                        .push(format!("try-lock claim {identity} was queued"));
                }
                if lost_lease && self.grant_names(claim, &identity) {
                    self.violations.push(format!(
                        "{identity} marked LeaseLost while our grant on the Lease names it"
                    ));
                }
                if expired_by_heartbeat && self.healthy.contains_key(&identity) {
                    self.violations
                        .push(format!("healthy holder {identity} was expired"));
                }
            }
            Step::WriteLease { lease, .. } => {
                let want = lease.metadata.resource_version.clone();
                let have = self
                    .lease()
                    .and_then(|l| l.metadata.resource_version.clone());
                match (&want, &have) {
                    (None, None) => {}
                    (Some(w), Some(h)) if w == h => {}
                    _ if !self.lease_precondition => {}
                    _ => return Err(Conflict),
                }
                // The write lands: the Lease it replaces must have been ours to write.
                self.check_writable();
                if have.is_none() {
                    self.created_by_operator = true;
                }
                let mut l = (**lease).clone();
                l.metadata.resource_version = Some(next_rv.clone());
                *last_lease_rv = next_rv.parse().ok();
                self.server.leases.insert(LEASE.to_string(), l);
            }
            Step::DeleteLease { resource_version } => {
                let have = self
                    .lease()
                    .and_then(|l| l.metadata.resource_version.clone());
                if have.as_ref() != Some(resource_version) {
                    return Err(Conflict);
                }
                self.check_writable();
                if !self.created_by_operator {
                    self.violated(format!(
                        "deleted a Lease leasekeeper cannot prove it created: {:?}",
                        self.lease()
                    ));
                }
                self.server.leases.remove(LEASE);
            }
            Step::RemoveFinalizer { claim } => {
                let c = self.server.claim_precondition(claim, rvs)?;
                if let Some(f) = c.metadata.finalizers.as_mut() {
                    f.retain(|x| x != FINALIZER);
                }
                c.metadata.resource_version = Some(next_rv.clone());
                rvs.insert(claim.clone(), next_rv);
                if c.metadata.deletion_timestamp.is_some()
                    && c.metadata.finalizers.as_ref().is_none_or(|f| f.is_empty())
                {
                    self.server.claims.remove(claim);
                }
            }
            Step::DeleteClaim { claim } => {
                self.server.delete(claim);
                self.writes += 1;
                return Ok(());
            }
            Step::CreateClaim { claim } => {
                let name = claim.metadata.name.clone().unwrap_or_default();
                if self.server.claims.contains_key(&name) {
                    return Err(Conflict);
                }
                self.server.create(&name, claim.spec.clone());
                self.writes += 1;
                return Ok(());
            }
            Step::OpenPod {
                pod,
                resource_version,
                token,
                fill_token,
                ..
            } => {
                let token = if *fill_token { *last_lease_rv } else { *token };
                let p = self
                    .pods
                    .iter_mut()
                    .find(|p| p.name == *pod)
                    .ok_or(Conflict)?;
                if p.resource_version != *resource_version {
                    return Err(Conflict);
                }
                p.gated = false;
                p.resource_version = next_rv.clone();
                self.opened.push((pod.clone(), token.unwrap_or_default()));
                // A Pod opened without the lock its claim holds would run unlocked.
                let granted =
                    self.server.claims.values().any(|c| {
                        c.identity() == *pod && c.phase() == Some(crate::api::Phase::Granted)
                    });
                if !granted {
                    self.violated(format!("opened Pod {pod} whose claim is not Granted"));
                }
            }
            Step::VerifyNode { .. } => return Ok(()),
        }
        self.server.rv += 1;
        self.writes += 1;
        Ok(())
    }

    /// A claim never makes the operator write a Lease it did not create (unless its owner
    /// allowed a takeover).
    fn check_writable(&mut self) {
        if !crate::arbiter::writable(self.lease()) {
            self.violated(format!(
                "wrote a Lease leasekeeper did not create: {:?}",
                self.lease()
            ));
        }
    }

    /// The invariants that hold at every observable moment.
    pub fn check(&self) -> Result<(), String> {
        let granted: Vec<&LockClaim> = self
            .server
            .claims
            .values()
            .filter(|c| c.phase() == Some(Phase::Granted))
            .collect();
        if granted.len() > 1 {
            return Err(format!(
                "{} claims Granted at once: {:?}",
                granted.len(),
                granted
                    .iter()
                    .map(|c| c.metadata.name.clone())
                    .collect::<Vec<_>>()
            ));
        }
        let holder = self
            .lease()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.holder_identity.clone());
        if let Some(g) = granted.first().filter(|_| !self.outsider_dirty) {
            let annotated = self
                .lease()
                .and_then(|l| l.metadata.annotations.as_ref())
                .and_then(|a| a.get(crate::api::CLAIM_ANNOTATION));
            if annotated != g.metadata.name.as_ref() {
                return Err(format!(
                    "claim {:?} Granted but the Lease's grant names {annotated:?}: only our own write makes a holder",
                    g.metadata.name
                ));
            }
            if holder.as_deref() != Some(g.identity().as_str()) {
                // Only an outsider's write can make them disagree, and the arbiter
                // demotes the claim on its next look; a write of ours never does.
                return Err(format!(
                    "claim {} Granted but the Lease names {holder:?}",
                    g.identity()
                ));
            }
        }
        if let Some(v) = self.violations.first() {
            return Err(v.clone());
        }
        Ok(())
    }

    /// Once settled: the Lease names the one Granted claim or nobody, and every live
    /// claim is Granted or Pending with its true queue position.
    pub fn check_settled(&self) -> Result<(), String> {
        self.check()?;
        let holder = self
            .lease()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.holder_identity.clone())
            .filter(|h| !h.is_empty());
        let granted = self
            .server
            .claims
            .values()
            .find(|c| c.phase() == Some(Phase::Granted));
        let managed = self.lease().is_some_and(crate::arbiter::is_managed);
        if managed && granted.is_none() {
            if let Some(h) = &holder {
                // Our grant to a claim that is no longer Granted must have been cleared
                // or handed on (an outsider's write is another matter).
                if self
                    .server
                    .claims
                    .iter()
                    .any(|(n, c)| self.grant_names(n, &c.identity()))
                {
                    return Err(format!(
                        "managed Lease still grants {h} but no claim is Granted"
                    ));
                }
            }
        }
        let mut waiting: Vec<&LockClaim> = self
            .server
            .claims
            .values()
            .filter(|c| c.metadata.deletion_timestamp.is_none())
            .filter(|c| {
                !c.phase().is_some_and(Phase::is_terminal) && c.phase() != Some(Phase::Granted)
            })
            .collect();
        waiting.sort_by(|a, b| crate::arbiter::queue_cmp(a, b));
        let exact = i32::try_from(self.config.exact_positions).unwrap_or(i32::MAX);
        for (i, c) in waiting.iter().enumerate() {
            let st = c
                .status
                .as_ref()
                .ok_or_else(|| format!("{:?} has no status", c.metadata.name))?;
            let position = i32::try_from(i + 1).unwrap_or(i32::MAX);
            let want = (position <= exact).then_some(position);
            if st.phase != Some(Phase::Pending) || st.queue_position != want {
                return Err(format!(
                    "{:?} should be Pending at position {want:?}, is {:?} at {:?}",
                    c.metadata.name, st.phase, st.queue_position
                ));
            }
            let msg = c
                .condition(crate::api::CONDITION_GRANTED)
                .map(|x| x.message.clone())
                .unwrap_or_default();
            let says = match want {
                Some(p) => format!("position {p}"),
                None => format!("more than {exact} claims ahead"),
            };
            if !msg.contains(&says) {
                return Err(format!(
                    "{:?}'s condition says {msg:?}, not {says:?}",
                    c.metadata.name
                ));
            }
        }
        Ok(())
    }

    /// Whether the Lease is our grant to claim `name` (annotation) holding `identity`.
    pub fn grant_names(&self, name: &str, identity: &str) -> bool {
        let annotated = self
            .lease()
            .and_then(|l| l.metadata.annotations.as_ref())
            .and_then(|a| a.get(crate::api::CLAIM_ANNOTATION));
        self.holder().as_deref() == Some(identity) && annotated.map(String::as_str) == Some(name)
    }

    pub fn phase(&self, name: &str) -> Option<Phase> {
        self.server.claims.get(name).and_then(|c| c.phase())
    }

    /// The status ("True", "False") of claim `name`'s condition `type_`.
    pub fn condition_status(&self, name: &str, type_: &str) -> Option<String> {
        self.server
            .claims
            .get(name)
            .and_then(|c| c.condition(type_))
            .map(|c| c.status.clone())
    }

    /// The reason of claim `name`'s Granted condition.
    pub fn reason(&self, name: &str) -> Option<String> {
        self.server
            .claims
            .get(name)
            .and_then(|c| c.condition(crate::api::CONDITION_GRANTED))
            .map(|c| c.reason.clone())
    }

    pub fn holder(&self) -> Option<String> {
        self.lease()
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.holder_identity.clone())
    }

    pub fn status(&self, name: &str) -> crate::api::LockClaimStatus {
        self.server
            .claims
            .get(name)
            .and_then(|c| c.status.clone())
            .unwrap_or_default()
    }
}

/// metav1.Time is stored with one-second precision: the API server truncates.
fn truncate_to_seconds(st: &mut crate::api::LockClaimStatus) {
    let t = |x: &mut Time| {
        x.0 = Timestamp::from_second(x.0.as_second()).unwrap_or(x.0);
    };
    for c in &mut st.conditions {
        t(&mut c.last_transition_time);
    }
    for x in [
        &mut st.acquire_time,
        &mut st.renew_time,
        &mut st.expire_time,
    ]
    .into_iter()
    .flatten()
    {
        t(x);
    }
}
