//! Fencing enforced by the API server, end to end: the ValidatingAdmissionPolicy of
//! `leasekeeper::fence` (what `kubectl lock fence` writes) refuses a stale holder's write
//! to a guarded object, for any client, with a message naming the lock and both tokens.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use leasekeeper::api::{LockClaim, Phase, Renewal, FENCED_BY_LABEL, FENCING_TOKEN_ANNOTATION};
use testkit as support;
use testkit::{create_claim, spec, wait_phase, Operator};

const T: Duration = Duration::from_secs(20);

/// Applies the fence of `lock` in `ns` for ConfigMaps and waits until the API server
/// enforces it (policies reach admission through an informer, a moment after they are
/// written).
async fn fence(client: &Client, ns: &str, lock: &str) {
    support::apply_fence(client, ns, lock, "fence-test").await;
    wait_enforced(client, ns, lock).await;
}

/// Until a guarded ConfigMap without a token is refused.
async fn wait_enforced(client: &Client, ns: &str, lock: &str) {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let t0 = std::time::Instant::now();
    loop {
        let probe = cm("probe", lock, None, "probe");
        match cms.create(&PostParams::default(), &probe).await {
            Err(kube::Error::Api(s)) if s.code == 403 => return,
            Ok(_) => {
                cms.delete("probe", &Default::default())
                    .await
                    .expect("delete probe");
            }
            Err(e) => panic!("probe: {e}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the policy never took effect"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A ConfigMap guarded by `lock`, carrying `token`, with `owner` in its data.
fn cm(name: &str, lock: &str, token: Option<&str>, owner: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([(
                FENCED_BY_LABEL.to_string(),
                lock.to_string(),
            )])),
            annotations: token
                .map(|t| BTreeMap::from([(FENCING_TOKEN_ANNOTATION.to_string(), t.to_string())])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("owner".to_string(), owner.to_string())])),
        ..ConfigMap::default()
    }
}

/// A merge patch of the ConfigMap's data and token (no resourceVersion: the API server
/// applies it to whatever is stored, retrying on conflicts).
async fn write(cms: &Api<ConfigMap>, name: &str, token: &str, owner: &str) -> Result<(), String> {
    let p = serde_json::json!({
        "metadata": {"annotations": {FENCING_TOKEN_ANNOTATION: token}},
        "data": {"owner": owner},
    });
    cms.patch(name, &PatchParams::default(), &Patch::Merge(&p))
        .await
        .map(|_| ())
        .map_err(|e| match e {
            kube::Error::Api(s) => format!("{} {}", s.code, s.message),
            other => other.to_string(),
        })
}

fn token_of(c: &LockClaim) -> String {
    c.status
        .as_ref()
        .and_then(|s| s.fencing_token)
        .expect("a granted claim carries a token")
        .to_string()
}

fn stored(cm: &ConfigMap) -> (String, String) {
    let token = cm
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(FENCING_TOKEN_ANNOTATION).cloned())
        .unwrap_or_default();
    let owner = cm
        .data
        .as_ref()
        .and_then(|d| d.get("owner").cloned())
        .unwrap_or_default();
    (token, owner)
}

/// Holder A (renewal Holder, a 2 s Lease) is granted, stops renewing (paused), expires;
/// B is granted a higher token and the next grant's writes come from it.
async fn a_pauses_and_b_takes_over(claims: &Api<LockClaim>, lock: &str) -> (String, String) {
    let mut a = spec(lock);
    a.renewal = Renewal::Holder;
    a.lease_duration_seconds = 2;
    create_claim(claims, "holder-a", a).await;
    let ta = token_of(&wait_phase(claims, "holder-a", Phase::Granted, T).await);
    create_claim(claims, "holder-b", spec(lock)).await;
    // A never renews: the operator expires it after its 2 s and grants B.
    let tb = token_of(&wait_phase(claims, "holder-b", Phase::Granted, T).await);
    (ta, tb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_01_a_holder_that_lost_the_lock_is_refused_by_the_api_server() {
    let client = support::client().await;
    let ns = support::namespace(&client, "fence-kleppmann").await;
    let _op = Operator::start(&client, &ns, Duration::from_secs(300)).await;
    fence(&client, &ns, "store").await;
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let (ta, tb) = a_pauses_and_b_takes_over(&claims, "store").await;
    assert!(
        tb.len() > ta.len() || (tb.len() == ta.len() && tb > ta),
        "B's token {tb} is above A's {ta}"
    );
    cms.create(
        &PostParams::default(),
        &cm("state", "store", Some(&tb), "B"),
    )
    .await
    .expect("B writes with its token");
    // A wakes up and writes with its old token: refused by the API server.
    let refused = write(&cms, "state", &ta, "A")
        .await
        .expect_err("A's stale write");
    let want = format!(
        "object is guarded by lock store; its fencing token {tb} is newer than this write's {ta} (a holder that lost the lock is writing)"
    );
    assert!(
        refused.starts_with("403 ") && refused.contains(&want),
        "{refused}"
    );
    assert_eq!(
        stored(&cms.get("state").await.expect("cm")),
        (tb.clone(), "B".into()),
        "the object holds B's data"
    );
    // B goes on writing with its own token (equal tokens are admitted).
    write(&cms, "state", &tb, "B again").await.expect("B again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_02_a_stale_write_before_the_new_holders_first_write_is_admitted_then_overwritten() {
    // The honest limit of every token scheme: the object only knows the tokens written
    // to it. A, paused, writes after B's grant but before B has written: admitted.
    let client = support::client().await;
    let ns = support::namespace(&client, "fence-limit").await;
    let _op = Operator::start(&client, &ns, Duration::from_secs(300)).await;
    fence(&client, &ns, "store").await;
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let (ta, tb) = a_pauses_and_b_takes_over(&claims, "store").await;
    cms.create(
        &PostParams::default(),
        &cm("state", "store", Some(&ta), "A"),
    )
    .await
    .expect("A's late write is admitted: nothing newer was written yet");
    write(&cms, "state", &tb, "B")
        .await
        .expect("B's write wins");
    write(&cms, "state", &ta, "A")
        .await
        .expect_err("and A is refused from then on");
    assert_eq!(
        stored(&cms.get("state").await.expect("cm")),
        (tb, "B".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fence_03_concurrent_writers_never_lower_the_stored_token() {
    let client = support::client().await;
    let ns = support::namespace(&client, "fence-race").await;
    fence(&client, &ns, "race").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    cms.create(
        &PostParams::default(),
        &cm("shared", "race", Some("1"), "init"),
    )
    .await
    .expect("create");
    // Every token the object is stored with, from a watch over the whole run.
    let seen = Arc::new(Mutex::new(Vec::<u64>::new()));
    let watch = {
        let (cms, seen) = (cms.clone(), seen.clone());
        tokio::spawn(async move {
            let cfg = watcher::Config::default().fields("metadata.name=shared");
            let mut s = watcher(cms, cfg).boxed();
            while let Some(Ok(ev)) = s.next().await {
                if let watcher::Event::Apply(o) | watcher::Event::InitApply(o) = ev {
                    if let Ok(t) = stored(&o).0.parse() {
                        seen.lock().expect("seen").push(t);
                    }
                }
            }
        })
    };
    // Four clients, 40 writes each, tokens rising with random noise: merge patches and unconditional
    // updates (both are applied by the API server to the object it actually stores).
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let cms = cms.clone();
        writers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut x = 0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(w + 1);
            for i in 0..40 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Rising with noise: the writers overtake each other, so many writes
                // are admitted and many come in below the stored token.
                let token = 1 + i * 25 + x % 100;
                let owner = format!("w{w}-{i}");
                let r = if i % 2 == 0 {
                    write(&cms, "shared", &token.to_string(), &owner).await
                } else {
                    let obj = cm("shared", "race", Some(&token.to_string()), &owner);
                    cms.replace("shared", &PostParams::default(), &obj)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                };
                out.push((token, r));
            }
            out
        }));
    }
    let mut results = Vec::new();
    for w in writers {
        results.extend(w.await.expect("writer"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    watch.abort();
    let (last, _) = stored(&cms.get("shared").await.expect("cm"));
    let last: u64 = last.parse().expect("token");
    let seen = seen.lock().expect("seen").clone();
    assert!(seen.len() > 5, "the watch saw the writes: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "the stored token went down: {seen:?}"
    );
    let accepted: Vec<u64> = results
        .iter()
        .filter(|r| r.1.is_ok())
        .map(|r| r.0)
        .collect();
    let refused: Vec<&(u64, Result<(), String>)> =
        results.iter().filter(|r| r.1.is_err()).collect();
    println!(
        "{} writes: {} admitted, {} refused; the watch saw {} stored tokens, ending at {last}",
        results.len(),
        accepted.len(),
        refused.len(),
        seen.len()
    );
    assert!(!refused.is_empty() && !accepted.is_empty(), "both happened");
    assert_eq!(
        Some(&last),
        accepted.iter().max(),
        "the highest admitted token is stored"
    );
    for (token, r) in refused {
        let e = r.as_ref().expect_err("refused");
        assert!(
            *token < last && e.contains("is newer than this write's"),
            "refused {token} (stored {last}): {e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_04_bad_tokens_unguarding_and_unguarded_kinds_get_clear_answers() {
    let client = support::client().await;
    let ns = support::namespace(&client, "fence-bad").await;
    fence(&client, &ns, "store").await;
    // Installed twice: the same objects, no error.
    fence(&client, &ns, "store").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let long = "9".repeat(200);
    for (bad, shown) in [
        ("abc", "\"abc\""),
        ("-5", "\"-5\""),
        ("", "none"),
        ("0012", "\"0012\""),
        (long.as_str(), "..."),
    ] {
        let token = (!bad.is_empty()).then_some(bad);
        let e = cms
            .create(&PostParams::default(), &cm("bad", "store", token, "x"))
            .await
            .expect_err("a bad token is refused");
        let kube::Error::Api(s) = e else {
            panic!("{e}")
        };
        assert_eq!(s.code, 403, "{}", s.message);
        assert!(
            s.message.contains("object is guarded by lock store; a write must carry the annotation leasekeeper.io/fencing-token")
                && s.message.contains(shown),
            "{bad:?}: {}",
            s.message
        );
    }
    cms.create(
        &PostParams::default(),
        &cm("state", "store", Some("500"), "a"),
    )
    .await
    .expect("a good token");
    // Unguarding takes a token at least the stored one: removing the label or the
    // annotation with less is refused.
    let unlabel = |token: Option<&str>| {
        let mut ann = serde_json::Map::new();
        ann.insert(
            FENCING_TOKEN_ANNOTATION.into(),
            token.map_or(serde_json::Value::Null, Into::into),
        );
        serde_json::json!({"metadata": {"labels": {FENCED_BY_LABEL: null}, "annotations": ann}})
    };
    let pp = PatchParams::default();
    for (patch, why) in [
        (unlabel(Some("499")), "label removed with a lower token"),
        (unlabel(None), "label and token removed"),
        (
            serde_json::json!({"metadata": {"annotations": {FENCING_TOKEN_ANNOTATION: null}}}),
            "token removed",
        ),
    ] {
        let e = cms
            .patch("state", &pp, &Patch::Merge(&patch))
            .await
            .expect_err(why);
        assert!(
            matches!(e, kube::Error::Api(ref s) if s.code == 403),
            "{why}: {e}"
        );
    }
    cms.patch("state", &pp, &Patch::Merge(&unlabel(Some("500"))))
        .await
        .expect("the holder of token 500 may unguard it");
    write(&cms, "state", "1", "anyone")
        .await
        .expect("no longer guarded");
    // A kind the policy does not cover is not guarded, label or not.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut s = Secret::default();
    s.metadata.name = Some("not-covered".into());
    s.metadata.labels = Some(BTreeMap::from([(
        FENCED_BY_LABEL.to_string(),
        "store".to_string(),
    )]));
    secrets
        .create(&PostParams::default(), &s)
        .await
        .expect("Secrets are not in this fence's resources");
}

fn kubectl_lock(ns: &str, args: &[&str]) -> (bool, String, String) {
    let out = support::kubectl_lock(Path::new(env!("CARGO_BIN_EXE_kubectl-lock")), ns, args)
        .output()
        .expect("kubectl lock");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_05_kubectl_lock_fence_prints_writes_and_removes_the_policy_and_the_chart_agrees() {
    let client = support::client().await;
    let ns = support::namespace(&client, "fence-cli").await;
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let name = format!("leasekeeper-fence-{ns}.nightly");
    let (ok, yaml, err) = kubectl_lock(
        &ns,
        &[
            "fence",
            "nightly",
            "--resource",
            "configmaps,deployments.apps",
            "--dry-run=client",
            "-o",
            "yaml",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        yaml.contains("kind: ValidatingAdmissionPolicy\n")
            && yaml.contains("kind: ValidatingAdmissionPolicyBinding"),
        "{yaml}"
    );
    assert!(
        policies.get_opt(&name).await.expect("read").is_none(),
        "dry run writes nothing"
    );
    let (ok, _, err) = kubectl_lock(&ns, &["fence", "nightly", "--resource", "configmaps"]);
    assert!(ok, "{err}");
    wait_enforced(&client, &ns, "nightly").await;
    let (ok, _, err) = kubectl_lock(&ns, &["fence", "nightly", "--resource", "configmaps"]);
    assert!(ok, "written twice: {err}");
    let (ok, _, err) = kubectl_lock(&ns, &["fence", "nightly", "--resource", "Config Maps"]);
    assert!(!ok && err.contains("give the plural"), "{err}");
    // The chart's cluster-wide policy says exactly what this one says.
    let mine = policies
        .get(&name)
        .await
        .expect("policy")
        .spec
        .expect("spec");
    let (ok, out, err) = support::helm(&[
        "template",
        "lk",
        &support::root().join("charts/leasekeeper").to_string_lossy(),
        "--set",
        "fencing.resources={configmaps}",
    ]);
    assert!(ok, "{err}");
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&out).expect("yaml");
    let chart = docs
        .iter()
        .find(|d| {
            d["kind"] == "ValidatingAdmissionPolicy"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("-fencing"))
        })
        .expect("the chart's fencing policy");
    for part in ["variables", "validations"] {
        assert_eq!(
            chart["spec"][part],
            serde_json::to_value(match part {
                "variables" => serde_json::to_value(&mine.variables).expect("json"),
                _ => serde_json::to_value(&mine.validations).expect("json"),
            })
            .expect("json"),
            "the chart's {part} differ from kubectl lock fence's"
        );
    }
    let (ok, _, err) = kubectl_lock(&ns, &["fence", "nightly", "--delete"]);
    assert!(ok, "{err}");
    assert!(policies.get_opt(&name).await.expect("read").is_none());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
    assert!(bindings.get_opt(&name).await.expect("read").is_none());
}
