//! End-to-end tests of the LockClaim API against a real kube-apiserver: the CRD
//! installs, examples are accepted, bad input is rejected with a message naming the
//! field, immutability holds, and `kubectl explain` shows the doc text.

use testkit as support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use leasekeeper::api::{LockClaim, LockClaimSpec};

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(support::root().join(dir))
        .unwrap_or_else(|e| panic!("{dir} readable: {e}"))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn committed_crds_match_the_rust_types() {
    for crd in leasekeeper::api::crds() {
        let file = format!(
            "crds/{}.yaml",
            crd.metadata.name.clone().unwrap_or_default()
        );
        let generated = leasekeeper::api::crd_yaml_of(&crd).expect("CRD renders");
        let committed = std::fs::read_to_string(support::root().join(&file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(
            generated == committed,
            "{file} is stale: run `make crd` and commit the result"
        );
    }
}

#[tokio::test]
async fn crd_installs_and_is_established() {
    let client = support::client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    let crd = support::wait_for(
        &crds,
        "lockclaims.leasekeeper.io",
        Duration::from_secs(30),
        "Established=True",
        |c: &CustomResourceDefinition| {
            c.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        },
    )
    .await;
    assert_eq!(
        crd.spec.names.short_names,
        Some(vec!["lc".into(), "lockclaim".into()])
    );
    assert_eq!(crd.spec.names.categories, Some(vec!["leasekeeper".into()]));
    let version = &crd.spec.versions[0];
    assert!(version
        .subresources
        .as_ref()
        .is_some_and(|s| s.status.is_some()));
    let columns: Vec<String> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.to_uppercase())
        .collect();
    assert_eq!(
        columns,
        ["LOCK", "LEASE", "HOLDER", "PHASE", "POSITION", "TOKEN", "AGE"]
    );
}

#[tokio::test]
async fn every_example_is_accepted_by_kubectl_apply() {
    let client = support::client().await;
    let ns = support::namespace(&client, "api-examples").await;
    let files = yaml_files("examples");
    assert!(files.len() >= 3, "examples/ holds the documented manifests");
    let mut expected = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).expect("example");
        expected += text.lines().filter(|l| *l == "kind: LockClaim").count();
        let (ok, out, err) = support::kubectl_run(&["apply", "-n", &ns, "-f", path_str(&file)]);
        assert!(ok, "{} was rejected: {err}", file.display());
        assert!(out.contains("created"), "{}: {out}", file.display());
    }
    let (ok, out, _) = support::kubectl_run(&["get", "lc", "-n", &ns, "-o", "name"]);
    assert!(ok);
    assert!(expected >= 5, "the examples hold claims");
    assert_eq!(
        out.lines().count(),
        expected,
        "every claim of the examples exists: {out}"
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Each `tests/bad-input/*.yaml` starts with `# expect: TEXT`. A file with one document
/// must be rejected on create; a file with two documents creates the first and must
/// have the second (an update) rejected. The error must contain TEXT. All of it runs in
/// one namespace watched by an operator, which must still grant a normal claim after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_rejected_with_its_message_and_the_operator_carries_on() {
    let client = support::client().await;
    let files = yaml_files("tests/bad-input");
    assert!(files.len() >= 40, "at least 40 bad-input manifests");
    let ns = support::namespace(&client, "api-bad").await;
    let _op = support::Operator::start(&client, &ns, Duration::from_secs(300)).await;
    let scratch = tempdir();
    for (i, file) in files.iter().enumerate() {
        let text = std::fs::read_to_string(file).expect("readable");
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no '# expect:' line", file.display()))
            .to_string();
        // One namespace for the whole corpus: give each file's object its own name.
        let text = text.replace("name: bad}", &format!("name: bad-{i:02}}}"));
        let docs: Vec<&str> = text.split("\n---\n").collect();
        let (setup, bad) = match docs.as_slice() {
            [bad] => (None, *bad),
            [setup, bad] => (Some(*setup), *bad),
            _ => panic!("{}: one or two documents expected", file.display()),
        };
        if let Some(setup) = setup {
            let p = scratch.join("setup.yaml");
            std::fs::write(&p, setup).expect("write");
            let (ok, _, err) = support::kubectl_run(&["apply", "-n", &ns, "-f", path_str(&p)]);
            assert!(
                ok,
                "{}: the setup document was rejected: {err}",
                file.display()
            );
        }
        let p = scratch.join("bad.yaml");
        std::fs::write(&p, bad).expect("write");
        let (ok, out, err) = support::kubectl_run(&["apply", "-n", &ns, "-f", path_str(&p)]);
        assert!(!ok, "{} was accepted: {out}", file.display());
        assert!(
            err.contains(&expect),
            "{}: expected the error to contain {expect:?}, got: {err}",
            file.display()
        );
    }
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    support::create_claim(&api, "normal", support::spec("after-corpus")).await;
    support::wait_phase(
        &api,
        "normal",
        leasekeeper::api::Phase::Granted,
        Duration::from_secs(20),
    )
    .await;
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("lk-api-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

#[tokio::test]
async fn changing_an_immutable_field_is_rejected_and_release_is_one_way() {
    let client = support::client().await;
    let ns = support::namespace(&client, "api-immutable").await;
    let claims: Api<LockClaim> = Api::namespaced(client, &ns);
    let claim = LockClaim::new(
        "c1",
        LockClaimSpec {
            lease_name: "orders-db".into(),
            holder_identity: None,
            lease_duration_seconds: 15,
            priority: 0,
            renewal: Default::default(),
            lock_delay_seconds: 0,
            release: false,
            max_hold_seconds: None,
            ttl_seconds_after_finished: None,
            acquire_timeout_seconds: Some(3600),
        },
    );
    claims
        .create(&PostParams::default(), &claim)
        .await
        .expect("created");
    let pp = PatchParams::default();
    for (patch, field) in [
        (
            serde_json::json!({"spec": {"leaseName": "other"}}),
            "spec.leaseName",
        ),
        (
            serde_json::json!({"spec": {"priority": 5}}),
            "spec.priority",
        ),
        (
            serde_json::json!({"spec": {"lockDelaySeconds": 5}}),
            "spec.lockDelaySeconds",
        ),
        (
            serde_json::json!({"spec": {"ttlSecondsAfterFinished": 5}}),
            "spec.ttlSecondsAfterFinished",
        ),
        (
            serde_json::json!({"spec": {"acquireTimeoutSeconds": 5}}),
            "spec.acquireTimeoutSeconds",
        ),
    ] {
        let err = claims
            .patch("c1", &pp, &Patch::Merge(&patch))
            .await
            .expect_err("an immutable field changed");
        let text = err.to_string();
        assert!(
            text.contains(&format!("{field} is immutable")),
            "{field}: {text}"
        );
    }
    // release may go false -> true, and not back.
    claims
        .patch(
            "c1",
            &pp,
            &Patch::Merge(serde_json::json!({"spec": {"release": true}})),
        )
        .await
        .expect("release may be set");
    let err = claims
        .patch(
            "c1",
            &pp,
            &Patch::Merge(serde_json::json!({"spec": {"release": false}})),
        )
        .await
        .expect_err("release went back to false");
    assert!(
        err.to_string()
            .contains("spec.release cannot be set back to false"),
        "{err}"
    );
}

#[tokio::test]
async fn kubectl_explain_shows_the_doc_text() {
    let _ = support::client().await;
    // The apiserver publishes a new CRD's OpenAPI a few seconds after it is Established.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (out, err) = loop {
        let (ok, out, err) = support::kubectl_run(&["explain", "lockclaim.spec.leaseName"]);
        if ok || std::time::Instant::now() > deadline {
            break (out, err);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(!out.is_empty(), "{err}");
    let flat = out.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains(
            "Name of the coordination.k8s.io/v1 Lease, in this claim's namespace, to contend for."
        ),
        "{out}"
    );
    let (ok, out, _) = support::kubectl_run(&["explain", "lockclaim.spec.renewal"]);
    assert!(ok);
    assert!(out.contains("Holder"), "{out}");
}
