//! `acquire`, `release`, `status` and `list`: claims a person or a script handles by
//! name.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client};
use leasekeeper::api::{slot_lease, Lock, LockClaim, Phase, Renewal};
use leasekeeper::client::{LockClient, LockError};

use crate::{fail, lock_error, options, Common};

#[derive(Args, Debug)]
pub struct HoldArgs {
    #[command(flatten)]
    common: Common,
    /// The claim's name (default: NAME-IDENTITY).
    #[arg(long)]
    claim: Option<String>,
}

#[derive(Args, Debug)]
pub struct ReleaseArgs {
    /// The Lease.
    name: String,
    /// The identity `acquire` used (it printed it); only that identity's claim is
    /// released.
    #[arg(long)]
    identity: Option<String>,
    /// The claim's name (default: NAME-IDENTITY).
    #[arg(long)]
    claim: Option<String>,
    /// Release the claim named by --claim whoever created it.
    #[arg(long)]
    force: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Json,
    Yaml,
    Wide,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The Lease.
    name: String,
    /// Output format.
    #[arg(short = 'o', long)]
    output: Option<Output>,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Output format.
    #[arg(short = 'o', long)]
    output: Option<Output>,
}

/// An identity unique to this invocation: host, pid and a random suffix (two CI runners
/// with the same $USER never share a claim).
pub fn unique_identity() -> String {
    use std::hash::{BuildHasher, Hasher};
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    format!(
        "{}-{}-{:06x}",
        sanitize(&host),
        std::process::id(),
        h.finish() & 0xff_ffff
    )
}

/// Lower-case letters, digits, '-' and '.', as a claim name needs.
pub fn sanitize(s: &str) -> String {
    let out: String = s
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let out = out.trim_matches(|c| c == '-' || c == '.');
    if out.is_empty() {
        "user".into()
    } else {
        out.chars().take(60).collect()
    }
}

fn claim_name(lease: &str, identity: &str, explicit: Option<&str>) -> String {
    explicit
        .map(str::to_string)
        .unwrap_or_else(|| format!("{lease}-{}", sanitize(identity)))
}

/// A claim the operator renews, left in place: held until `release`.
pub async fn acquire(client: Client, ns: &str, a: HoldArgs) -> ExitCode {
    let identity = a.common.identity.clone().unwrap_or_else(unique_identity);
    let name = claim_name(&a.common.name, &identity, a.claim.as_deref());
    let api: Api<LockClaim> = Api::namespaced(client.clone(), ns);
    if let Ok(Some(existing)) = api.get_opt(&name).await {
        // Only a claim with this very identity is "ours" (an explicit --identity that an
        // earlier acquire used): anything else is someone else's, never "already held".
        if existing.identity() != identity {
            return fail(format!(
                "claim {name} exists and belongs to {:?}, not {identity:?}",
                existing.identity()
            ));
        }
        if existing.phase() == Some(Phase::Granted) {
            println!(
                "{} already held by {identity} (claim {name})",
                a.common.name
            );
            return ExitCode::SUCCESS;
        }
    }
    let mut opts = options(&a.common, Renewal::Controller);
    opts.identity = Some(identity.clone());
    opts.claim_name = Some(name.clone());
    opts.owner_pod = false;
    // Held until released: a finished claim (released, expired) is cleaned up later.
    // A signal while waiting withdraws the claim.
    let mut signals = crate::signals::listen();
    let mut stopped_by = None;
    let cancel = async { stopped_by = Some(signals.recv().await) };
    let acquired = LockClient::new(client, ns)
        .acquire_or_cancel(&a.common.name, opts, cancel)
        .await;
    if let (Err(LockError::Cancelled), Some(sig)) = (&acquired, stopped_by) {
        return crate::withdrawn(sig);
    }
    match acquired {
        Ok(guard) => {
            println!(
                "acquired {} as {identity} (claim {name}, fencing token {}); release with: kubectl lock release {} --identity {identity}",
                a.common.name,
                guard.fencing_token(),
                a.common.name,
            );
            // The operator renews a Controller claim: it stays held after we exit.
            guard.keep();
            ExitCode::SUCCESS
        }
        Err(e) => lock_error(e),
    }
}

/// Releases a claim `acquire` made: by identity, or by name with --force.
pub async fn release(client: Client, ns: &str, a: ReleaseArgs) -> ExitCode {
    let name = match (&a.identity, &a.claim) {
        (Some(id), claim) => claim_name(&a.name, id, claim.as_deref()),
        (None, Some(claim)) if a.force => claim.clone(),
        (None, _) => return fail(
            "say whose claim to release: --identity (as acquire printed), or --claim NAME --force",
        ),
    };
    let api: Api<LockClaim> = Api::namespaced(client, ns);
    match api.get_opt(&name).await {
        Ok(Some(c)) => {
            if let Some(id) = a.identity.as_deref().filter(|id| c.identity() != *id) {
                if !a.force {
                    return fail(format!(
                        "claim {name} belongs to {:?}, not {id:?} (--force releases it anyway)",
                        c.identity()
                    ));
                }
            }
        }
        Ok(None) => return fail(format!("no claim {name} in namespace {ns}")),
        Err(e) => return fail(e),
    }
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return fail(e),
    }
    let gone =
        kube::runtime::wait::await_condition(api, &name, |c: Option<&LockClaim>| c.is_none());
    match tokio::time::timeout(Duration::from_secs(30), gone).await {
        Ok(Ok(_)) => {
            println!("released {} (claim {name})", a.name);
            ExitCode::SUCCESS
        }
        _ => fail(format!(
            "claim {name} is still being deleted; is the operator running?"
        )),
    }
}

/// What `status` reports. `holder`, `leaseTransitions` and `fencingToken` are slot 0's
/// (the whole lock when its capacity is 1); `slots` has every slot.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusOut {
    lease: String,
    namespace: String,
    capacity: i32,
    holder: Option<String>,
    lease_transitions: Option<i32>,
    fencing_token: Option<i64>,
    slots: Vec<SlotOut>,
    claims: Vec<ClaimOut>,
}

/// One slot of the lock: its Lease and the claim Granted on it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct SlotOut {
    slot: u32,
    lease: String,
    exists: bool,
    holder: Option<String>,
    lease_transitions: Option<i32>,
    claim: Option<String>,
    fencing_token: Option<i64>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ClaimOut {
    name: String,
    identity: String,
    phase: Option<Phase>,
    slot: Option<i32>,
    queue_position: Option<i32>,
    priority: i32,
    fencing_token: Option<i64>,
    reason: Option<String>,
}

fn emit<T: serde::Serialize>(o: Output, v: &T) -> ExitCode {
    let text = match o {
        Output::Json => serde_json::to_string_pretty(v).map_err(|e| e.to_string()),
        _ => serde_saphyr::to_string(v).map_err(|e| e.to_string()),
    };
    match text {
        Ok(t) => {
            println!("{}", t.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

pub async fn status(client: Client, ns: &str, a: StatusArgs) -> ExitCode {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), ns);
    let locks: Api<Lock> = Api::namespaced(client, ns);
    let list = match claims.list(&ListParams::default()).await {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let mut mine: Vec<&LockClaim> = list
        .items
        .iter()
        .filter(|c| c.spec.lease_name == a.name)
        .collect();
    mine.sort_by_key(|c| {
        let granted = c.phase() == Some(Phase::Granted);
        let pos = c
            .status
            .as_ref()
            .and_then(|s| s.queue_position)
            .unwrap_or(i32::MAX);
        (!granted, pos, c.metadata.name.clone())
    });
    // A Lock object sets the capacity (1 without one; a tenant may not read Locks).
    let capacity = locks
        .get_opt(&a.name)
        .await
        .ok()
        .flatten()
        .map_or(1, |l| l.spec.capacity);
    let mut slots = Vec::new();
    for slot in slots_to_show(capacity, &mine) {
        let name = slot_lease(&a.name, slot);
        let lease = match leases.get_opt(&name).await {
            Ok(l) => l,
            Err(e) if slot == 0 => return fail(e),
            Err(_) => None,
        };
        slots.push(slot_out(slot, name, lease.as_ref(), &mine));
    }
    let first = slots.first();
    let out = StatusOut {
        lease: a.name.clone(),
        namespace: ns.to_string(),
        capacity,
        holder: first.and_then(|s| s.holder.clone()),
        lease_transitions: first.and_then(|s| s.lease_transitions),
        fencing_token: first.and_then(|s| s.fencing_token),
        claims: mine.iter().map(|c| claim_out(c)).collect(),
        slots,
    };
    if let Some(o @ (Output::Json | Output::Yaml)) = a.output {
        return emit(o, &out);
    }
    print_status(&out, a.output == Some(Output::Wide));
    ExitCode::SUCCESS
}

/// Slots 0 to capacity - 1, and any slot above that a claim still holds (a capacity
/// lowered under holders).
fn slots_to_show(capacity: i32, claims: &[&LockClaim]) -> Vec<u32> {
    let held = claims
        .iter()
        .filter(|c| c.phase() == Some(Phase::Granted))
        .filter_map(|c| c.status.as_ref().and_then(|s| s.slot))
        .filter_map(|s| u32::try_from(s).ok());
    let upto = u32::try_from(capacity.max(1)).unwrap_or(1);
    let mut all: Vec<u32> = (0..upto).chain(held).collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// One slot: its Lease as read, and the claim Granted on it with that claim's token.
fn slot_out(slot: u32, lease: String, l: Option<&Lease>, claims: &[&LockClaim]) -> SlotOut {
    let spec = l.and_then(|l| l.spec.as_ref());
    let holder_claim = claims.iter().find(|c| {
        c.phase() == Some(Phase::Granted)
            && c.status.as_ref().and_then(|s| s.slot).unwrap_or(0)
                == i32::try_from(slot).unwrap_or(-1)
    });
    SlotOut {
        slot,
        exists: l.is_some(),
        holder: spec
            .and_then(|s| s.holder_identity.clone())
            .filter(|h| !h.is_empty()),
        lease_transitions: spec.and_then(|s| s.lease_transitions),
        claim: holder_claim.and_then(|c| c.metadata.name.clone()),
        fencing_token: holder_claim.and_then(|c| c.status.as_ref().and_then(|s| s.fencing_token)),
        lease,
    }
}

fn claim_out(c: &LockClaim) -> ClaimOut {
    let st = c.status.as_ref();
    ClaimOut {
        name: c.metadata.name.clone().unwrap_or_default(),
        identity: c.identity(),
        phase: c.phase(),
        slot: st
            .and_then(|s| s.slot)
            .filter(|_| c.phase() == Some(Phase::Granted)),
        queue_position: st.and_then(|s| s.queue_position),
        priority: c.spec.priority,
        fencing_token: st.and_then(|s| s.fencing_token),
        reason: c.condition("Granted").map(|x| x.reason.clone()),
    }
}

fn print_status(out: &StatusOut, wide: bool) {
    println!(
        "Lock {}/{}: capacity {}, held {}, waiting {}",
        out.namespace,
        out.lease,
        out.capacity,
        out.slots.iter().filter(|s| s.claim.is_some()).count(),
        out.claims
            .iter()
            .filter(|c| c.queue_position.is_some() || c.phase == Some(Phase::Pending))
            .count(),
    );
    println!(
        "{:<5} {:<32} {:<24} {:>11} {:>10}  CLAIM",
        "SLOT", "LEASE", "HOLDER", "TRANSITIONS", "TOKEN"
    );
    for s in &out.slots {
        let lease = if s.exists {
            s.lease.clone()
        } else {
            format!("{} (absent)", s.lease)
        };
        println!(
            "{:<5} {:<32} {:<24} {:>11} {:>10}  {}",
            s.slot,
            lease,
            s.holder.as_deref().unwrap_or("<none>"),
            s.lease_transitions.map_or("-".into(), |t| t.to_string()),
            s.fencing_token.map_or("-".into(), |t| t.to_string()),
            s.claim.as_deref().unwrap_or(""),
        );
    }
    let extra = if wide { "  PRIORITY  REASON" } else { "" };
    println!(
        "{:<32} {:<24} {:<9} {:>4} {:>8} {:>10}{extra}",
        "CLAIM", "IDENTITY", "PHASE", "SLOT", "POSITION", "TOKEN"
    );
    for c in &out.claims {
        let phase = c.phase.map_or("-".to_string(), |p| format!("{p:?}"));
        let slot = c.slot.map_or(String::new(), |p| p.to_string());
        let pos = c.queue_position.map_or(String::new(), |p| p.to_string());
        let token = c.fencing_token.map_or(String::new(), |t| t.to_string());
        print!(
            "{:<32} {:<24} {:<9} {:>4} {:>8} {:>10}",
            c.name, c.identity, phase, slot, pos, token
        );
        if wide {
            print!("  {:>8}  {}", c.priority, c.reason.as_deref().unwrap_or(""));
        }
        println!();
    }
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct LeaseOut {
    name: String,
    holder: Option<String>,
    lease_transitions: Option<i32>,
    lease_duration_seconds: Option<i32>,
    waiting: usize,
}

pub async fn list(client: Client, ns: &str, a: ListArgs) -> ExitCode {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let claims: Api<LockClaim> = Api::namespaced(client, ns);
    let selector = format!(
        "{}={}",
        leasekeeper::api::MANAGED_BY_LABEL,
        leasekeeper::api::MANAGED_BY_VALUE
    );
    let (l, c) = match (
        leases.list(&ListParams::default().labels(&selector)).await,
        claims.list(&ListParams::default()).await,
    ) {
        (Ok(l), Ok(c)) => (l, c),
        (Err(e), _) | (_, Err(e)) => return fail(e),
    };
    let rows: Vec<LeaseOut> = l
        .items
        .iter()
        .map(|lease| {
            let name = lease.metadata.name.clone().unwrap_or_default();
            let spec = lease.spec.clone().unwrap_or_default();
            let waiting = c
                .items
                .iter()
                .filter(|x| x.spec.lease_name == name && x.phase() == Some(Phase::Pending))
                .count();
            LeaseOut {
                waiting,
                holder: spec.holder_identity.filter(|h| !h.is_empty()),
                lease_transitions: spec.lease_transitions,
                lease_duration_seconds: spec.lease_duration_seconds,
                name,
            }
        })
        .collect();
    if let Some(o @ (Output::Json | Output::Yaml)) = a.output {
        return emit(o, &rows);
    }
    let wide = a.output == Some(Output::Wide);
    let extra = if wide { "  TRANSITIONS  DURATION" } else { "" };
    println!("{:<40} {:<32} {:>7}{extra}", "LEASE", "HOLDER", "WAITING");
    for r in &rows {
        print!(
            "{:<40} {:<32} {:>7}",
            r.name,
            r.holder.as_deref().unwrap_or("<none>"),
            r.waiting
        );
        if wide {
            let t = r.lease_transitions.unwrap_or(0);
            print!("  {t:>11}  {:>7}s", r.lease_duration_seconds.unwrap_or(0));
        }
        println!();
    }
    ExitCode::SUCCESS
}
