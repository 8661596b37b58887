//! The lock driver of the model API server ([`super::server`]): a lock with capacity and
//! its slot Leases, decided by `decide` (the lock-level entry point) and applied step by
//! step with the executor's preconditions; the lock's invariants checked after every
//! single write.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;

use super::server::{Conflict, Server};
use crate::api::{parse_slot_lease, slot_lease, CLAIM_ANNOTATION};
use crate::api::{LockClaim, LockClaimSpec, Phase, Renewal};
use crate::arbiter::slots::{decide, LockInput, LockMemory, LockPlan, LockStep};
use crate::arbiter::{Config, LeaseWriteKind, Step};

pub const LOCK: &str = "pool";

pub struct LockWorld {
    /// The model API server: claims, the slot Leases (named by [`slot_lease`]),
    /// revisions, clocks.
    pub server: Server,
    pub capacity: u32,
    pub memory: LockMemory,
    pub config: Config,
    pub max_token: i64,
    pub grants: usize,
    pub violations: Vec<String>,
    /// The negative control: apply the plans of slots with a new grant before the
    /// others (the holders leaving), breaking the write order across slots.
    pub grants_first: bool,
}

impl Default for LockWorld {
    fn default() -> Self {
        LockWorld {
            server: Server::default(),
            capacity: 3,
            memory: LockMemory::default(),
            config: Config {
                gc_grace: Duration::from_secs(60),
                exact_positions: 3,
                position_delay: Duration::from_secs(1),
                pods: true,
            },
            max_token: 0,
            grants: 0,
            violations: Vec::new(),
            grants_first: false,
        }
    }
}

pub fn spec(duration: i32) -> LockClaimSpec {
    LockClaimSpec {
        lease_duration_seconds: duration,
        ..LockClaimSpec::for_lease(LOCK)
    }
}

impl std::ops::Deref for LockWorld {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

impl std::ops::DerefMut for LockWorld {
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.server
    }
}

impl LockWorld {
    /// The slot Leases by slot.
    pub fn slots(&self) -> BTreeMap<u32, &Lease> {
        let slot = |name: &str| match parse_slot_lease(name) {
            Some((LOCK, s)) => Some(s),
            _ => (name == LOCK).then_some(0),
        };
        self.server
            .leases
            .iter()
            .filter_map(|(name, l)| Some((slot(name)?, l)))
            .collect()
    }

    pub fn advance(&mut self, d: Duration) {
        self.server.step_clock(d);
    }

    pub fn restart(&mut self) {
        self.memory = LockMemory::default();
    }

    pub fn plan(&self) -> LockPlan {
        let claims: Vec<&LockClaim> = self.server.claims.values().collect();
        let leases = self.slots();
        // Every slot Lease in this model is the operator's own creation.
        let proven = leases.keys().copied().collect();
        decide(&LockInput {
            lock_name: LOCK,
            capacity: self.capacity,
            claims: &claims,
            leases: &leases,
            proven: &proven,
            pods: &[],
            memory: &self.memory,
            now: self.server.now(),
            config: self.config,
        })
    }

    pub fn reconcile(&mut self) -> LockPlan {
        let plan = self.plan();
        let snap = self.server.rvs();
        self.apply(&plan, &snap, usize::MAX, self.capacity);
        plan
    }

    /// Reconciles until a plan makes no write (at most 10 rounds); false if it did not.
    pub fn settle(&mut self) -> bool {
        for _ in 0..10 {
            let plan = self.reconcile();
            if !plan.steps.iter().any(|s| !matches!(s.step, Step::Event(_))) {
                return true;
            }
        }
        false
    }

    /// The plan's steps in the order they are applied (see `grants_first`).
    fn ordered(&self, plan: &LockPlan) -> Vec<LockStep> {
        if !self.grants_first {
            return plan.steps.clone();
        }
        let granting: Vec<u32> = plan
            .steps
            .iter()
            .filter(|s| {
                matches!(
                    s.step,
                    Step::SetStatus {
                        fill_token: true,
                        ..
                    }
                )
            })
            .map(|s| s.slot)
            .collect();
        let (first, rest): (Vec<LockStep>, Vec<LockStep>) = plan
            .steps
            .iter()
            .cloned()
            .partition(|s| granting.contains(&s.slot) && !is_lock_level(s));
        first.into_iter().chain(rest).collect()
    }

    /// Applies up to `limit` steps of `plan`, decided when claims had `snapshot`'s
    /// resourceVersions and the capacity was `capacity`; stops at the first refused
    /// write. Memory is kept only if every step landed.
    pub fn apply(
        &mut self,
        plan: &LockPlan,
        snapshot: &HashMap<String, String>,
        limit: usize,
        capacity: u32,
    ) -> bool {
        let mut rvs = snapshot.clone();
        let mut last_lease_rv = None;
        for (i, s) in self.ordered(plan).iter().enumerate() {
            if i >= limit
                || self
                    .step(s, &mut rvs, &mut last_lease_rv, capacity)
                    .is_err()
            {
                return false;
            }
            if let Err(e) = self.check() {
                self.violations.push(format!("after step {i} {s:?}: {e}"));
                return false;
            }
        }
        self.memory = plan.memory.clone();
        for m in self.memory.slots.values_mut() {
            m.rebase_grant(self.server.mono);
        }
        true
    }

    fn step(
        &mut self,
        s: &LockStep,
        rvs: &mut HashMap<String, String>,
        last_lease_rv: &mut Option<i64>,
        capacity: u32,
    ) -> Result<(), Conflict> {
        let next_rv = (self.server.rv + 1).to_string();
        match &s.step {
            Step::Event(_) => return Ok(()),
            Step::VerifyLease { resource_version } => {
                return self
                    .server
                    .verify_lease(&slot_lease(LOCK, s.slot), resource_version);
            }
            Step::AddFinalizer { .. } | Step::RemoveFinalizer { .. } => {}
            Step::SetStatus {
                claim,
                status,
                fill_token,
            } => {
                let c = self.server.claim_precondition(claim, rvs)?;
                let mut st = status.clone();
                if *fill_token {
                    st.fencing_token = *last_lease_rv;
                }
                let newly = st.phase == Some(Phase::Granted) && c.phase() != Some(Phase::Granted);
                c.status = Some(st.clone());
                c.metadata.resource_version = Some(next_rv.clone());
                rvs.insert(claim.clone(), next_rv);
                if newly {
                    self.on_grant(claim, st.fencing_token.unwrap_or_default());
                }
            }
            Step::WriteLease { lease, kind } => {
                let want = lease.metadata.resource_version.clone();
                let have = self.server.lease_rv(&slot_lease(LOCK, s.slot));
                if want != have {
                    return Err(Conflict);
                }
                let mut l = (**lease).clone();
                l.metadata.resource_version = Some(next_rv.clone());
                *last_lease_rv = next_rv.parse().ok();
                self.server.leases.insert(slot_lease(LOCK, s.slot), l);
                if matches!(kind, LeaseWriteKind::Create | LeaseWriteKind::Grant) {
                    self.on_slot_granted(s.slot, capacity);
                }
            }
            Step::DeleteLease { resource_version } => {
                let have = self.server.lease_rv(&slot_lease(LOCK, s.slot));
                if have.as_ref() != Some(resource_version) {
                    return Err(Conflict);
                }
                self.server.leases.remove(&slot_lease(LOCK, s.slot));
            }
            Step::DeleteClaim { claim } => {
                self.server.delete(claim);
                return Ok(());
            }
            // No Pods in this model.
            Step::CreateClaim { .. } | Step::OpenPod { .. } | Step::VerifyNode { .. } => {
                return Ok(());
            }
        }
        self.server.rv += 1;
        Ok(())
    }

    fn on_grant(&mut self, claim: &str, token: i64) {
        self.grants += 1;
        if token <= self.max_token {
            self.violations.push(format!(
                "{claim}: fencing token {token} not above {}",
                self.max_token
            ));
        }
        self.max_token = token;
    }

    /// A slot's Lease was just granted (the moment a claim holds it): no more live
    /// claims may hold slots than the capacity the grant was decided with. (A claim's
    /// Granted status may follow later, even after the capacity was lowered: lowering
    /// revokes nobody, including a holder whose status had not caught up.)
    fn on_slot_granted(&mut self, slot: u32, capacity: u32) {
        let holding = self.holding();
        if holding.len() > usize::try_from(capacity).unwrap_or(usize::MAX) {
            self.violations.push(format!(
                "slot {slot} granted while {holding:?} hold a lock of capacity {capacity}"
            ));
        }
    }

    /// Live claims that a slot Lease names (our grant annotation); one that asked to be
    /// released still holds until the operator has ended it.
    pub fn holding(&self) -> Vec<String> {
        self.server
            .leases
            .values()
            .filter_map(|l| {
                l.metadata
                    .annotations
                    .as_ref()?
                    .get(CLAIM_ANNOTATION)
                    .cloned()
            })
            .filter(|n| {
                self.server
                    .claims
                    .get(n)
                    .is_some_and(|c| !c.phase().is_some_and(Phase::is_terminal))
            })
            .collect()
    }

    pub fn granted(&self) -> Vec<&LockClaim> {
        self.server
            .claims
            .values()
            .filter(|c| c.phase() == Some(Phase::Granted))
            .collect()
    }

    /// At every observable moment: each Granted claim's status names a slot whose Lease
    /// is our grant to it, and no two share a slot.
    pub fn check(&self) -> Result<(), String> {
        let mut slots = BTreeMap::new();
        for c in self.granted() {
            let st = c.status.as_ref().ok_or("Granted without status")?;
            let slot = st
                .slot
                .and_then(|s| u32::try_from(s).ok())
                .ok_or("Granted without a slot")?;
            if let Some(other) = slots.insert(slot, c.metadata.name.clone()) {
                return Err(format!(
                    "{other:?} and {:?} both Granted slot {slot}",
                    c.metadata.name
                ));
            }
            let annotated = self
                .server
                .leases
                .get(&slot_lease(LOCK, slot))
                .and_then(|l| l.metadata.annotations.as_ref())
                .and_then(|a| a.get(CLAIM_ANNOTATION));
            if annotated != c.metadata.name.as_ref() {
                return Err(format!(
                    "{:?} Granted slot {slot} but its Lease names {annotated:?}",
                    c.metadata.name
                ));
            }
            let want = slot_lease(LOCK, slot);
            if st.lease.as_deref() != Some(want.as_str()) {
                return Err(format!(
                    "{:?} names Lease {:?}, not {want}",
                    c.metadata.name, st.lease
                ));
            }
        }
        match self.violations.first() {
            Some(v) => Err(v.clone()),
            None => Ok(()),
        }
    }

    /// Once settled: min(capacity, live claims) hold, unless holders above the capacity
    /// are still held over from a larger one; every other live claim waits.
    pub fn check_settled(&self) -> Result<(), String> {
        self.check()?;
        let live: Vec<&LockClaim> = self
            .server
            .claims
            .values()
            .filter(|c| !c.phase().is_some_and(Phase::is_terminal))
            .collect();
        let held = self.granted().len();
        let cap = usize::try_from(self.capacity).unwrap_or(usize::MAX);
        let should = live.len().min(cap);
        if held < should {
            return Err(format!("{held} hold, {} live, capacity {cap}", live.len()));
        }
        if let Some(c) = live
            .iter()
            .find(|c| c.phase() != Some(Phase::Granted) && c.phase() != Some(Phase::Pending))
        {
            return Err(format!("{:?} is {:?}", c.metadata.name, c.phase()));
        }
        Ok(())
    }
}

fn is_lock_level(s: &LockStep) -> bool {
    matches!(&s.step, Step::SetStatus { fill_token: false, status, .. } if status.phase != Some(Phase::Granted))
        && s.slot == 0
}

/// A claim renewed by its holder with this duration.
pub fn holder_spec(duration: i32) -> LockClaimSpec {
    LockClaimSpec {
        renewal: Renewal::Holder,
        ..spec(duration)
    }
}
