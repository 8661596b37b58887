//! The Helm chart: lint, render with default and custom values, reject bad values, and
//! install into the real control plane; then run the operator out of cluster as the
//! chart's ServiceAccount through the core lifecycle, proving its RBAC is enough (and
//! that it cannot read Secrets).

use testkit as support;

use std::time::Duration;

use kube::Api;
use leasekeeper::api::{LockClaim, Phase, Renewal};
use support::{create_claim, spec, wait_phase};

const CHART: &str = "charts/leasekeeper";
const KUBE_VERSION: &str = "--kube-version=1.35.4";

fn chart() -> String {
    support::root().join(CHART).to_string_lossy().into_owned()
}

fn kinds(yaml: &str) -> Vec<String> {
    yaml.lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn chart_crds_are_the_generated_crds() {
    for crd in leasekeeper::api::crds() {
        let file = format!(
            "crds/{}.yaml",
            crd.metadata.name.clone().unwrap_or_default()
        );
        let top = std::fs::read_to_string(support::root().join(&file)).expect("crd");
        let chart = std::fs::read_to_string(support::root().join(CHART).join(&file))
            .unwrap_or_else(|e| panic!("chart {file}: {e}"));
        assert!(
            top == chart,
            "charts/leasekeeper/{file} differs from {file}: run `make crd`"
        );
    }
}

#[test]
fn chart_app_version_is_the_crate_version() {
    let chart = std::fs::read_to_string(support::root().join(CHART).join("Chart.yaml"))
        .expect("Chart.yaml");
    assert!(
        chart.contains(&format!("appVersion: \"{}\"", env!("CARGO_PKG_VERSION"))),
        "{chart}"
    );
}

/// How Argo CD and Flux render charts: `helm template` without --kube-version, so Helm
/// assumes the Kubernetes of the client-go it was built with. The chart's kubeVersion
/// range admits that, and an older cluster gets a message naming the range.
#[test]
fn chart_renders_without_a_kube_version_and_refuses_an_older_cluster() {
    let (ok, out, err) = support::helm(&["template", "lk", &chart()]);
    assert!(ok, "helm template without --kube-version: {err}");
    assert!(kinds(&out).contains(&"Deployment".to_string()), "{out}");
    let (ok, _, err) = support::helm(&["template", "lk", &chart(), "--kube-version=1.32.9"]);
    assert!(!ok, "1.32 is below the supported range");
    assert!(err.contains(">=1.33.0-0"), "{err}");
    let (ok, _, err) = support::helm(&["template", "lk", &chart(), "--kube-version=1.33.0"]);
    assert!(ok, "1.33 is the floor of the supported range: {err}");
}

#[test]
fn chart_lints_and_renders_with_default_and_custom_values() {
    let (ok, out, err) = support::helm(&["lint", "--strict", &chart(), KUBE_VERSION]);
    assert!(ok, "helm lint: {out}{err}");
    let (ok, default, err) = support::helm(&["template", "lk", &chart(), KUBE_VERSION]);
    assert!(ok, "{err}");
    let k = kinds(&default);
    for want in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
    ] {
        assert!(
            k.iter().any(|x| x == want),
            "default render lacks {want}: {k:?}"
        );
    }
    assert!(
        !k.iter()
            .any(|x| x == "ServiceMonitor" || x == "PodDisruptionBudget"),
        "{k:?}"
    );
    for hardening in [
        "runAsNonRoot: true",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "drop: [\"ALL\"]",
        "type: RuntimeDefault",
        "replicas: 2",
        "- --leader-elect",
        "path: /readyz",
        "path: /healthz",
    ] {
        assert!(
            default.contains(hardening),
            "default render lacks {hardening:?}"
        );
    }
    assert!(
        !default.contains("'*'") && !default.contains("\"*\""),
        "no wildcard RBAC"
    );

    let (ok, custom, err) = support::helm(&[
        "template",
        "lk",
        &chart(),
        KUBE_VERSION,
        "--set",
        "watchNamespace=team-a",
        "--set",
        "replicas=3",
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "podDisruptionBudget.enabled=true",
        "--set",
        "leaderElection.enabled=false",
        "--set",
        "logFormat=text",
    ]);
    assert!(ok, "{err}");
    let k = kinds(&custom);
    assert!(
        k.iter().any(|x| x == "ServiceMonitor") && k.iter().any(|x| x == "PodDisruptionBudget"),
        "{k:?}"
    );
    assert_eq!(
        k.iter().filter(|x| *x == "ClusterRole").count(),
        1,
        "only the CRD reader is cluster-wide: {k:?}"
    );
    assert!(custom.contains("namespace: team-a") && custom.contains("--watch-namespace=team-a"));
    assert!(custom.contains("replicas: 3") && !custom.contains("--leader-elect"));
    assert!(custom.contains("value: \"text\""));
}

#[test]
fn chart_rejects_bad_values_with_a_message_naming_the_key() {
    for (set, expect) in [
        ("replicas=two", "/replicas"),
        ("logFormat=xml", "/logFormat"),
        (
            "leaderElection.leaseDuration=soon",
            "/leaderElection/leaseDuration",
        ),
        ("nosuchkey=1", "nosuchkey"),
    ] {
        let (ok, _, err) = support::helm(&["template", "lk", &chart(), KUBE_VERSION, "--set", set]);
        assert!(!ok, "{set} was accepted");
        assert!(err.contains(expect), "{set}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_installs_and_its_service_account_runs_the_lifecycle() {
    let client = support::client().await;
    let release_ns = support::namespace(&client, "chart-sys").await;
    let claims_ns = support::namespace(&client, "chart-work").await;
    let release = format!("lk{}", &release_ns[release_ns.len() - 8..]);
    let (ok, out, err) = support::helm(&["install", &release, &chart(), "-n", &release_ns]);
    assert!(ok, "helm install: {out}{err}");
    assert!(
        out.contains("kubectl wait"),
        "NOTES tell how to wait for a claim: {out}"
    );
    let (ok, out, _) = support::kubectl_run(&[
        "get",
        "deployment,serviceaccount,service",
        "-n",
        &release_ns,
        "-o",
        "name",
    ]);
    assert!(
        ok && out.contains("deployment.apps/") && out.contains("serviceaccount/"),
        "{out}"
    );

    let sa = format!("{release}-leasekeeper");
    let kc = support::root().join(format!("target/{release}.kubeconfig"));
    support::token_kubeconfig(&release_ns, &sa, &kc);
    let kc_s = kc.to_string_lossy().into_owned();

    // Least privilege: the chart's identity cannot read Secrets.
    let (ok, _, err) =
        support::kubectl_run(&["--kubeconfig", &kc_s, "get", "secrets", "-n", &claims_ns]);
    assert!(
        !ok && err.contains("Forbidden"),
        "the operator's identity can read Secrets: {err}"
    );
    let (_, can, _) = support::kubectl_run(&[
        "--kubeconfig",
        &kc_s,
        "auth",
        "can-i",
        "list",
        "secrets",
        "-A",
    ]);
    assert_eq!(can.trim(), "no");
    // It may read its proof key's Secret by name in its own namespace, and no other.
    let can_i = |what: &str| {
        let (_, out, _) = support::kubectl_run(&[
            "--kubeconfig",
            &kc_s,
            "auth",
            "can-i",
            "get",
            what,
            "-n",
            &release_ns,
        ]);
        out.trim().to_string()
    };
    assert_eq!(can_i("secrets/leasekeeper-proof-key"), "yes");
    assert_eq!(can_i("secrets/some-other-secret"), "no");

    let op_args = [
        "--leader-elect",
        "--leader-namespace",
        &release_ns,
        "--watch-namespace",
        &claims_ns,
        "--identity",
        "chart-op",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    let mut op = support::spawn_operator(
        testkit::bin!("leasekeeper"),
        &kc,
        &format!("chart-{release}"),
        &op_args,
    );
    let api: Api<LockClaim> = Api::namespaced(client.clone(), &claims_ns);
    create_claim(&api, "a", spec("db")).await;
    wait_phase(&api, "a", Phase::Granted, Duration::from_secs(30)).await;
    create_claim(&api, "b", spec("db")).await;
    let b = wait_phase(&api, "b", Phase::Pending, Duration::from_secs(20)).await;
    assert_eq!(b.status.and_then(|s| s.queue_position), Some(1));
    api.delete("a", &Default::default()).await.expect("delete");
    wait_phase(&api, "b", Phase::Granted, Duration::from_secs(20)).await;
    let mut c = spec("job");
    c.renewal = Renewal::Holder;
    c.lease_duration_seconds = 2;
    create_claim(&api, "c", c).await;
    wait_phase(&api, "c", Phase::Granted, Duration::from_secs(20)).await;
    wait_phase(&api, "c", Phase::Expired, Duration::from_secs(20)).await;
    let (ok, out, _) = support::kubectl_run(&[
        "get",
        "lease",
        "leasekeeper-leader",
        "-n",
        &release_ns,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert!(
        ok && support::is_replica(&out, "chart-op"),
        "leader election under the chart's Role: {out}"
    );
    let evs = support::events(&claims_ns);
    assert!(
        evs.iter().any(|(_, n, r)| n == "a" && r == "Granted"),
        "Events under the chart's RBAC: {evs:?}"
    );
    let _ = op.kill();
    let _ = op.wait();
    let log = std::fs::read_to_string(support::root().join(format!("target/chart-{release}.log")))
        .unwrap_or_default();
    assert!(
        !log.contains("Forbidden") && !log.contains("forbidden"),
        "RBAC denials in the operator log:\n{log}"
    );

    // helm upgrade: changed values roll into the same release.
    let (ok, out, err) = support::helm(&[
        "upgrade",
        &release,
        &chart(),
        "-n",
        &release_ns,
        "--set",
        "replicas=2",
        "--set",
        "logFormat=text",
    ]);
    assert!(ok, "helm upgrade: {out}{err}");
    let deployment = |path: &str| {
        let (ok, out, err) = support::kubectl_run(&[
            "get",
            "deployment",
            "-n",
            &release_ns,
            "-o",
            &format!("jsonpath={{.items[0]{path}}}"),
        ]);
        assert!(ok, "{err}");
        out
    };
    assert_eq!(deployment(".spec.replicas"), "2");
    assert_eq!(
        deployment(
            ".spec.template.spec.containers[0].env[?(@.name==\"LEASEKEEPER_LOG_FORMAT\")].value"
        ),
        "text"
    );
    // A bad value is refused, naming the key, and the release stays as it was.
    let (ok, _, err) = support::helm(&[
        "upgrade",
        &release,
        &chart(),
        "-n",
        &release_ns,
        "--reuse-values",
        "--set",
        "replicas=two",
    ]);
    assert!(!ok && err.contains("/replicas"), "bad upgrade: {err}");
    let (ok, status, err) = support::helm(&["status", &release, "-n", &release_ns, "-o", "json"]);
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&status).expect("helm status JSON");
    assert_eq!(
        status["version"], 2,
        "revision after one good and one bad upgrade"
    );
    assert_eq!(status["info"]["status"], "deployed");
    assert_eq!(deployment(".spec.replicas"), "2");
    // The upgraded release's RBAC still lets its ServiceAccount run the lifecycle.
    let mut op = support::spawn_operator(
        testkit::bin!("leasekeeper"),
        &kc,
        &format!("chart-{release}-upgraded"),
        &op_args,
    );
    create_claim(&api, "d", spec("after-upgrade")).await;
    wait_phase(&api, "d", Phase::Granted, Duration::from_secs(30)).await;
    // A claim an earlier version left with its finalizer loses it.
    let mut legacy = LockClaim::new("legacy", spec("old"));
    legacy.metadata.finalizers = Some(vec![leasekeeper::api::FINALIZER.into()]);
    api.create(&kube::api::PostParams::default(), &legacy)
        .await
        .expect("legacy claim");
    support::wait_for(
        &api,
        "legacy",
        Duration::from_secs(20),
        "legacy finalizer removed",
        |c: &LockClaim| c.metadata.finalizers.as_ref().is_none_or(|f| f.is_empty()),
    )
    .await;
    let _ = op.kill();
    let _ = op.wait();

    // helm uninstall leaves nothing stuck: no claim carries a finalizer, so with no
    // operator left, claims (and their namespace) delete at once.
    let (ok, out, err) = support::helm(&["uninstall", &release, "-n", &release_ns]);
    assert!(ok, "helm uninstall: {out}{err}");
    let left = api.list(&Default::default()).await.expect("list");
    assert!(!left.items.is_empty());
    for c in &left.items {
        assert!(
            c.metadata.finalizers.as_ref().is_none_or(|f| f.is_empty()),
            "{:?} carries {:?}",
            c.metadata.name,
            c.metadata.finalizers
        );
    }
    let (ok, _, err) = support::kubectl_run(&[
        "delete",
        "lockclaims",
        "--all",
        "-n",
        &claims_ns,
        "--timeout=10s",
    ]);
    assert!(ok, "claims deleted without an operator: {err}");
    assert!(api
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .is_empty());
}

/// A change to a claim's spec.
type Edit = fn(&mut leasekeeper::api::LockClaimSpec);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_claim_policy_refuses_claims_over_its_caps_in_selected_namespaces() {
    use kube::api::{Patch, PatchParams, PostParams};
    let admin = support::client().await;
    let inside = support::namespace(&admin, "policy-in").await;
    let outside = support::namespace(&admin, "policy-out").await;
    let label = serde_json::json!({"metadata": {"labels": {"leasekeeper.io/policy-test": inside}}});
    Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone())
        .patch(&inside, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .expect("label namespace");
    let release = format!("pol-{}", &inside[inside.len() - 8..]);
    let selector =
        format!("claimPolicy.namespaceSelector.matchLabels.leasekeeper\\.io/policy-test={inside}");
    let (ok, yaml, err) = support::helm(&[
        "template",
        &release,
        &chart(),
        KUBE_VERSION,
        "--set",
        "claimPolicy.enabled=true",
        "--set",
        &selector,
        "--show-only",
        "templates/claim-policy.yaml",
    ]);
    assert!(ok, "{err}");
    support::kubectl_stdin(&["apply", "-f", "-"], &yaml);
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let try_create = |ns: &str, edit: Edit| {
        let api: Api<LockClaim> = Api::namespaced(admin.clone(), ns);
        let mut s = spec("db");
        s.max_hold_seconds = Some(600);
        edit(&mut s);
        let claim = LockClaim::new("c", s);
        let dry = dry.clone();
        async move {
            api.create(&dry, &claim)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    // The API server picks a new policy up within a second or so.
    let mut refused = Ok(());
    for _ in 0..100 {
        refused = try_create(&inside, |s| s.priority = 1_000_000_000).await;
        if refused.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cases: [(Edit, &str); 5] = [
        (|s| s.priority = 1001, "spec.priority may be at most 1000"),
        (
            |s| s.lock_delay_seconds = 3600,
            "spec.lockDelaySeconds may be at most 60",
        ),
        (
            |s| s.lease_duration_seconds = 301,
            "spec.leaseDurationSeconds may be at most 300",
        ),
        (
            |s| s.max_hold_seconds = None,
            "spec.maxHoldSeconds is required",
        ),
        (
            |s| s.max_hold_seconds = Some(3601),
            "spec.maxHoldSeconds may be at most 3600",
        ),
    ];
    let mut results = vec![("priority 1e9".to_string(), refused)];
    for (edit, _) in &cases {
        results.push(("case".into(), try_create(&inside, *edit).await));
    }
    let within = try_create(&inside, |s| {
        s.priority = 1000;
        s.lock_delay_seconds = 60;
        s.lease_duration_seconds = 300;
        s.max_hold_seconds = Some(3600);
    })
    .await;
    let elsewhere = try_create(&outside, |s| {
        s.priority = 1_000_000_000;
        s.lock_delay_seconds = 3600;
        s.max_hold_seconds = None;
    })
    .await;
    support::kubectl_stdin(&["delete", "-f", "-"], &yaml);
    let first = results[0].1.as_ref().expect_err("priority 1e9 accepted");
    assert!(
        first.contains("spec.priority may be at most 1000"),
        "{first}"
    );
    for ((_, got), (_, expect)) in results[1..].iter().zip(cases.iter()) {
        let e = got.as_ref().expect_err(expect);
        assert!(e.contains(expect), "{expect}: {e}");
    }
    within.expect("a claim within every cap is accepted");
    elsewhere.expect("namespaces the selector does not pick are not capped");
}
