//! Scenario 5: Idle cost: operator writes per minute while Leases sit held and nothing happens.

use std::time::Duration;

use futures::StreamExt;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use leasekeeper::api::{LockClaim, Phase, Renewal};

use crate::measure::{operator_metric, spec, Report};
use crate::Bench;

pub async fn run(b: &Bench, r: &mut Report) {
    let n = if b.args.smoke { 20 } else { 1000 };
    let window = Duration::from_secs(if b.args.smoke { 10 } else { 60 });
    r.add("## 5. Idle cost: operator writes while Leases sit held");
    r.add(String::new());
    r.add("| renewal | Leases | operator writes per minute (by kind) |");
    r.add("|---|---|---|");
    for (renewal, d) in [(Renewal::Holder, 3600), (Renewal::Controller, 15)] {
        let per_min = idle(&b.client, &b.metrics_addr, renewal, d, n, window).await;
        r.add(format!("| {renewal:?} (lease {d} s) | {n} | {per_min} |"));
    }
    r.add(String::new());
}

async fn idle(
    client: &Client,
    metrics_addr: &str,
    renewal: Renewal,
    d: i32,
    n: usize,
    window: Duration,
) -> String {
    let ns = format!("bench-idle-{}", format!("{renewal:?}").to_lowercase());
    testkit::create_namespace(client, &ns, &[]).await;
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let claim = LockClaim::new(&format!("i{i}"), spec(&format!("i{i}"), renewal, d));
            async move {
                let _ = api.create(&PostParams::default(), &claim).await;
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    while granted(&api).await < n {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Let the grant burst finish before counting, its Events included (they are
    // published at --event-qps, so 1,000 grants go on costing writes for a while).
    crate::measure::writes_settled(metrics_addr).await;
    let writes = || async {
        operator_metric(
            &testkit::scrape(metrics_addr, "/metrics").await,
            "leasekeeper_api_writes_total",
        )
    };
    let a = writes().await;
    tokio::time::sleep(window).await;
    let b = writes().await;
    let mut parts = Vec::new();
    let mut sum = 0.0;
    for (k, v) in &b {
        let dlt = (v - a.get(k).copied().unwrap_or(0.0)) * 60.0 / window.as_secs_f64();
        if dlt > 0.0 {
            let kind = k
                .split("kind=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or(k);
            parts.push(format!("{kind} {dlt:.0}"));
            sum += dlt;
        }
    }
    // Release them so they do not keep costing for the rest of the run.
    for i in 0..n {
        let _ = api.delete(&format!("i{i}"), &Default::default()).await;
    }
    if parts.is_empty() {
        "0".into()
    } else {
        format!("{sum:.0} ({})", parts.join(", "))
    }
}

async fn granted(api: &Api<LockClaim>) -> usize {
    api.list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|c| c.phase() == Some(Phase::Granted))
                .count()
        })
        .unwrap_or(0)
}
