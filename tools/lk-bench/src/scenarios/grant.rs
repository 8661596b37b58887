//! Scenario 1: Grant latency on a free Lease, against the floor: a bare Lease create and update.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use leasekeeper::api::{LockClaim, Phase, Renewal};
use tokio::time::Instant;

use crate::measure::{apiserver_requests, delta, spec, stats, Report, Seen};
use crate::Bench;

pub async fn run(b: &Bench, r: &mut Report) {
    let ns = "bench-grant";
    testkit::create_namespace(&b.client, ns, &[]).await;
    testkit::create_namespace(&b.client, "bench-floor", &[]).await;
    let (seen, _w) = Seen::start(&b.client, ns).await;
    let claims: Api<LockClaim> = Api::namespaced(b.client.clone(), ns);
    let before = apiserver_requests(&b.client).await;
    let mut grant = Vec::new();
    let (mut create, mut update) = (Vec::new(), Vec::new());
    for i in 0..b.n {
        // The floor interleaved with the grants (same run, same moments), not after.
        let (c, u) = floor_once(b, i).await;
        create.push(c);
        update.push(u);
        let name = format!("g{i}");
        let t0 = Instant::now();
        claims
            .create(
                &PostParams::default(),
                &LockClaim::new(&name, spec(&name, Renewal::Holder, 3600)),
            )
            .await
            .expect("create");
        if let Some(t) = seen
            .wait(ns, &name, Phase::Granted, Duration::from_secs(30))
            .await
        {
            grant.push(t - t0);
        }
    }
    let mut after = apiserver_requests(&b.client).await;
    // The floor's own requests (one Lease create and one update each) are left out.
    for k in ["POST leases", "PUT leases"] {
        if let Some(v) = after.get_mut(k) {
            *v -= b.n as f64;
        }
    }
    let grant_cost = delta(&before, &after, b.n);
    let (g, c, u) = (stats(grant), stats(create), stats(update));
    r.add("## 1. Grant latency on a free Lease (claim created -> creator's watch sees Granted)");
    r.add(String::new());
    r.header();
    r.row("leasekeeper grant", &g);
    r.cdf("leasekeeper grant (claim created -> Granted)", &g);
    r.row("floor: one Lease create", &c);
    r.row("floor: one Lease update", &u);
    r.add(String::new());
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    r.add(format!(
        "Grant p50 = {:.1}x one Lease create, p99 = {:.1}x (a grant is at least: claim create, watch delivery, Lease create, status write, watch delivery).",
        ratio(g.p50, c.p50),
        ratio(g.p99, c.p99)
    ));
    r.add(String::new());
    r.add(format!("API requests per grant (apiserver_request_total deltas, includes the benchmark's own claim create): {grant_cost}"));
    r.add(String::new());
}

/// One Lease create and one update: the latency floor of a grant, taken right before
/// the grant it is compared with.
async fn floor_once(b: &Bench, i: usize) -> (Duration, Duration) {
    let leases: Api<Lease> = Api::namespaced(b.client.clone(), "bench-floor");
    {
        let l = Lease {
            metadata: ObjectMeta {
                name: Some(format!("f{i}")),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some("x".into()),
                ..LeaseSpec::default()
            }),
        };
        let t0 = Instant::now();
        let mut created = leases
            .create(&PostParams::default(), &l)
            .await
            .expect("lease create");
        let create = t0.elapsed();
        if let Some(s) = created.spec.as_mut() {
            s.holder_identity = Some("y".into());
        }
        let t0 = Instant::now();
        leases
            .replace(&format!("f{i}"), &PostParams::default(), &created)
            .await
            .expect("lease update");
        (create, t0.elapsed())
    }
}
