//! The guarded object: beside its own register, every holder writes a ConfigMap
//! labelled `leasekeeper.io/fenced-by` (one per Lease it holds) with its fencing token,
//! as any client would. The API server's admission policy (`leasekeeper::fence`,
//! installed for each lock at setup) is the only check: a write below the stored token
//! is refused there. Each outcome is logged per holder for the checker, with whether
//! the holder already knew it had lost the lock.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use leasekeeper::api::{FENCED_BY_LABEL, FENCING_TOKEN_ANNOTATION};

/// The guarded object of held Lease `lease`.
pub fn name(lease: &str) -> String {
    format!("guard-{lease}")
}

/// The outcome log of holder `identity`.
pub fn log_path(identity: &str) -> std::path::PathBuf {
    crate::run_file(&format!("chaos-fence-{identity}.log"))
}

/// Writes the guarded object of `lease` (lock `lock`) with `token`; logs whether the API
/// server admitted it.
pub async fn write(
    api: &Api<ConfigMap>,
    lock: &str,
    lease: &str,
    token: i64,
    who: &str,
    after_loss: bool,
) {
    let patch = serde_json::json!({
        "metadata": {
            "labels": {FENCED_BY_LABEL: lock},
            "annotations": {FENCING_TOKEN_ANNOTATION: token.to_string()},
        },
        "data": {"writer": who},
    });
    let pp = PatchParams::default();
    let mut result = api.patch(&name(lease), &pp, &Patch::Merge(&patch)).await;
    if matches!(&result, Err(kube::Error::Api(s)) if s.code == 404) {
        let mut cm: ConfigMap = serde_json::from_value(patch.clone()).unwrap_or_default();
        cm.metadata.name = Some(name(lease));
        result = api.create(&PostParams::default(), &cm).await;
    }
    let outcome = match result {
        Ok(_) => "admitted",
        Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("is newer than") => {
            "refused"
        }
        Err(_) => return,
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(who))
    {
        let _ = writeln!(
            f,
            "{outcome} token={token} after_loss={after_loss} lease={lease}"
        );
    }
}

/// Installs the fence of each lock for ConfigMaps in `ns` and waits until enforced.
pub async fn install(client: &Client, ns: &str, locks: &[String]) {
    for lock in locks {
        testkit::apply_fence(client, ns, lock, "lk-chaos").await;
    }
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let Some(lock) = locks.first() else { return };
    for _ in 0..150 {
        let probe = ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some("fence-probe".into()),
                labels: Some(BTreeMap::from([(
                    FENCED_BY_LABEL.to_string(),
                    lock.clone(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        match cms.create(&PostParams::default(), &probe).await {
            Err(kube::Error::Api(s)) if s.code == 403 => return,
            Ok(_) => {
                let _ = cms.delete("fence-probe", &Default::default()).await;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the fence policies never took effect");
}

/// What the holders' logs say: (admitted, refused) writes, and those made after the
/// holder knew it had lost the lock: (admitted, refused).
pub fn outcomes(identities: &[String]) -> ((usize, usize), (usize, usize)) {
    let (mut all, mut after) = ((0, 0), (0, 0));
    for id in identities {
        let text = std::fs::read_to_string(log_path(id)).unwrap_or_default();
        for l in text.lines() {
            let admitted = l.starts_with("admitted");
            let bucket = if l.contains("after_loss=true") {
                &mut after
            } else {
                &mut all
            };
            if admitted {
                bucket.0 += 1;
            } else {
                bucket.1 += 1;
            }
        }
    }
    ((all.0 + after.0, all.1 + after.1), after)
}
