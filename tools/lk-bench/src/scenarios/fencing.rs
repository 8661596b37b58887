//! Scenario 7: what fencing by the API server costs a write: a ConfigMap update
//! guarded by the ValidatingAdmissionPolicy of `leasekeeper::fence` against the same
//! update of an unguarded ConfigMap, alternating, in one run.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::Api;
use leasekeeper::api::{FENCED_BY_LABEL, FENCING_TOKEN_ANNOTATION};
use tokio::time::Instant;

use crate::measure::{stats, Report};
use crate::Bench;

const NS: &str = "bench-fence";

/// The fence of lock `bench` for ConfigMaps, applied; waits until it is enforced.
async fn fence(b: &Bench) {
    testkit::apply_fence(&b.client, NS, "bench", "lk-bench").await;
    let cms: Api<ConfigMap> = Api::namespaced(b.client.clone(), NS);
    for _ in 0..150 {
        let probe = cm("probe", true, None);
        match cms.create(&PostParams::default(), &probe).await {
            Err(kube::Error::Api(s)) if s.code == 403 => return,
            Ok(_) => {
                let _ = cms.delete("probe", &Default::default()).await;
            }
            Err(e) => panic!("probe: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the fence never took effect");
}

fn cm(name: &str, guarded: bool, token: Option<u64>) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: guarded
                .then(|| BTreeMap::from([(FENCED_BY_LABEL.to_string(), "bench".to_string())])),
            annotations: token
                .map(|t| BTreeMap::from([(FENCING_TOKEN_ANNOTATION.to_string(), t.to_string())])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("v".to_string(), "0".to_string())])),
        ..ConfigMap::default()
    }
}

pub async fn run(b: &Bench, r: &mut Report) {
    testkit::create_namespace(&b.client, NS, &[]).await;
    fence(b).await;
    let cms: Api<ConfigMap> = Api::namespaced(b.client.clone(), NS);
    let pp = PostParams::default();
    cms.create(&pp, &cm("guarded", true, Some(1)))
        .await
        .expect("guarded");
    cms.create(&pp, &cm("plain", false, None))
        .await
        .expect("plain");
    let (mut guarded, mut plain) = (Vec::new(), Vec::new());
    for i in 0..b.n as u64 {
        let write = |token: Option<u64>| {
            let mut ann = serde_json::Map::new();
            if let Some(t) = token {
                ann.insert(FENCING_TOKEN_ANNOTATION.into(), t.to_string().into());
            }
            serde_json::json!({"metadata": {"annotations": ann}, "data": {"v": i.to_string()}})
        };
        let t0 = Instant::now();
        cms.patch(
            "guarded",
            &PatchParams::default(),
            &Patch::Merge(&write(Some(i + 2))),
        )
        .await
        .expect("guarded update");
        guarded.push(t0.elapsed());
        let t0 = Instant::now();
        cms.patch(
            "plain",
            &PatchParams::default(),
            &Patch::Merge(&write(None)),
        )
        .await
        .expect("plain update");
        plain.push(t0.elapsed());
    }
    let (g, p) = (stats(guarded), stats(plain));
    r.add("## 7. Fencing by the API server: a guarded ConfigMap update against an unguarded one (alternating, same run)");
    r.add(String::new());
    r.header();
    r.row("guarded update (token checked by the policy)", &g);
    r.row("unguarded update", &p);
    r.add(String::new());
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    r.add(format!(
        "Added by the policy: p50 {:+.2} ms, p99 {:+.2} ms (target: at most 1 ms at p50).",
        ms(g.p50) - ms(p.p50),
        ms(g.p99) - ms(p.p99)
    ));
    r.add(String::new());
}
