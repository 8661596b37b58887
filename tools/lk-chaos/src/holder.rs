//! One holder process: acquire, write the fenced register, hold, release, repeat.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::Api;
use leasekeeper::api::{LockClaim, Phase};
use leasekeeper::client::{AcquireOptions, LockClient};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{guarded, register};

/// Every holder's claim asks for this lock delay after an expiry.
pub const LOCK_DELAY: Duration = Duration::from_secs(1);

#[derive(clap::Args, Debug, Clone)]
pub struct HolderArgs {
    #[arg(long)]
    pub kubeconfig: PathBuf,
    #[arg(long)]
    pub namespace: String,
    #[arg(long)]
    pub lease: String,
    #[arg(long)]
    pub identity: String,
    #[arg(long)]
    pub seed: u64,
    /// Lease duration (seconds).
    #[arg(long, default_value_t = 2)]
    pub ttl: u64,
    /// Seconds the holder's renewTime is shifted by (clock skew).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub skew: i64,
    /// Negative control: keep writing after lost(), without the fence check.
    #[arg(long)]
    pub ignore_lost: bool,
}

pub async fn run(a: HolderArgs) {
    let client = testkit::client_for(&a.kubeconfig).await;
    let locks = LockClient::new(client.clone(), &a.namespace);
    let regs: Api<ConfigMap> = Api::namespaced(client.clone(), &a.namespace);
    let claims: Api<LockClaim> = Api::namespaced(client, &a.namespace);
    let mut rng = StdRng::seed_from_u64(a.seed);
    loop {
        let opts = AcquireOptions {
            identity: Some(a.identity.clone()),
            lease_duration: Duration::from_secs(a.ttl),
            wait: Some(Duration::from_secs(30)),
            renew_time_skew: jiff::SignedDuration::from_secs(a.skew),
            lock_delay: LOCK_DELAY,
            owner_pod: false,
            ..AcquireOptions::default()
        };
        let guard = match locks.acquire(&a.lease, opts).await {
            Ok(g) => g,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let token = guard.fencing_token();
        // One register per Lease held: a lock with capacity fences each slot.
        let reg = format!("reg-{}", guard.lease_name());
        // The work: a number of register writes. An honest holder checks the guard
        // before each one; the negative control ignores it and, once it has lost the
        // lock, goes on writing without the fence check.
        let (writes, gap) = workload(&mut rng, a.ignore_lost);
        for _ in 0..writes {
            if guard.is_lost().is_some() && !a.ignore_lost {
                break;
            }
            let lost = guard.is_lost().is_some();
            let fenced = !(a.ignore_lost && lost);
            register::write(&regs, &reg, token, &a.identity, fenced).await;
            guarded::write(
                &regs,
                &a.lease,
                guard.lease_name(),
                token,
                &a.identity,
                lost,
            )
            .await;
            tokio::time::sleep(Duration::from_millis(gap)).await;
        }
        if a.ignore_lost && guard.is_lost().is_some() {
            for _ in 0..40 {
                register::write(&regs, &reg, token, &a.identity, false).await;
                guarded::write(
                    &regs,
                    &a.lease,
                    guard.lease_name(),
                    token,
                    &a.identity,
                    true,
                )
                .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if rng.random_bool(0.3) {
            release_in_place(&claims, guard.claim_name()).await;
        }
        let _ = guard.release().await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
    }
}

/// Ends a hold with `spec.release: true` before the claim is deleted, as a workload that
/// keeps its claim would: the next grant then comes in the plan that marks this claim
/// Released (a handoff by status write, not only by deletion).
async fn release_in_place(claims: &Api<LockClaim>, name: &str) {
    let patch = serde_json::json!({"spec": {"release": true}});
    let _ = claims
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await;
    let ended =
        kube::runtime::wait::await_condition(claims.clone(), name, |c: Option<&LockClaim>| {
            c.is_none_or(|c| c.phase() != Some(Phase::Granted))
        });
    let _ = tokio::time::timeout(Duration::from_secs(3), ended).await;
}

/// (register writes, milliseconds between them) of one hold. Most holds are short; some
/// span several renewals (2.4-4.8 s against a 2 s TTL renewed every 0.67 s), so that
/// expiry is judged on holders that renew. The control works longer, so that it is
/// still working when its loss shows.
fn workload(rng: &mut StdRng, ignore_lost: bool) -> (u32, u64) {
    if ignore_lost {
        (rng.random_range(20..40), 60)
    } else if rng.random_bool(0.15) {
        (rng.random_range(8..16), 300)
    } else {
        (rng.random_range(1..10), 60)
    }
}
