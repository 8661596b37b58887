//! Scenario 2: Handoff after a clean release: the holder releases (delete or `release: true`),
//! the next claimant's watch sees Granted.

use std::time::Duration;

use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use leasekeeper::api::{LockClaim, Phase, Renewal};
use tokio::time::Instant;

use super::peer::PeerRows;
use crate::measure::{apiserver_requests, delta, spec, stats, Report, Seen, Stats};
use crate::Bench;

pub struct Handoffs {
    by_variant: Vec<(&'static str, Stats)>,
    cost: String,
}

pub async fn measure(b: &Bench) -> Handoffs {
    let ns = "bench-handoff";
    testkit::create_namespace(&b.client, ns, &[]).await;
    let (seen, _w) = Seen::start(&b.client, ns).await;
    let claims: Api<LockClaim> = Api::namespaced(b.client.clone(), ns);
    let before = apiserver_requests(&b.client).await;
    let mut by_variant = Vec::new();
    for variant in ["delete", "release"] {
        let mut v = Vec::new();
        for i in 0..b.n {
            if let Some(d) = once(&claims, &seen, ns, variant, i).await {
                v.push(d);
            }
        }
        by_variant.push((variant, stats(v)));
    }
    let after = apiserver_requests(&b.client).await;
    Handoffs {
        by_variant,
        cost: delta(&before, &after, 2 * b.n),
    }
}

/// One handoff: a holds, b waits, a releases; the time until b's watch sees Granted.
async fn once(
    claims: &Api<LockClaim>,
    seen: &Seen,
    ns: &str,
    variant: &str,
    i: usize,
) -> Option<Duration> {
    let (a, b, lease) = (
        format!("{variant}-a{i}"),
        format!("{variant}-b{i}"),
        format!("{variant}-{i}"),
    );
    let t = Duration::from_secs(30);
    for (name, phase) in [(&a, Phase::Granted), (&b, Phase::Pending)] {
        claims
            .create(
                &PostParams::default(),
                &LockClaim::new(name, spec(&lease, Renewal::Holder, 3600)),
            )
            .await
            .expect("create");
        seen.wait(ns, name, phase, t).await;
    }
    let t0 = Instant::now();
    if variant == "delete" {
        claims
            .delete(&a, &Default::default())
            .await
            .expect("delete");
    } else {
        let release = serde_json::json!({"spec": {"release": true}});
        claims
            .patch(&a, &PatchParams::default(), &Patch::Merge(release))
            .await
            .expect("release");
    }
    seen.wait(ns, &b, Phase::Granted, t).await.map(|t| t - t0)
}

pub fn report(r: &mut Report, h: &Handoffs, peer: &PeerRows) {
    r.add("## 2. Handoff after a clean release (holder releases -> next claimant's watch sees Granted)");
    r.add(String::new());
    r.header();
    for (variant, s) in &h.by_variant {
        let how = if *variant == "delete" {
            "claim deleted"
        } else {
            "`release: true`"
        };
        r.row(&format!("leasekeeper, holder {how}"), s);
        r.cdf(&format!("leasekeeper handoff, holder {how}"), s);
    }
    for (what, s) in peer.iter().filter(|(w, _)| w.contains("SIGTERM")) {
        r.row(what, s);
        r.cdf(what, s);
    }
    r.add(String::new());
    r.add(format!("API requests per handoff (includes the benchmark's own two creates and one delete/patch): {}", h.cost));
    r.add(String::new());
}
