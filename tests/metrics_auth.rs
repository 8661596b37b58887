//! Protected metrics on the real API server: with `--metrics-auth rbac` the operator
//! serves /metrics over HTTPS only to callers whose ServiceAccount token the API server
//! authenticates and whom RBAC allows `get` on /metrics; the probes answer on their own
//! plain-HTTP port without a token.

use testkit as support;

use std::net::SocketAddr;
use std::sync::Arc;

use leasekeeper::telemetry::{self, Metrics, MetricsAuth, Readiness, ServeConfig};

use support::curl as get;

fn token(ns: &str, sa: &str) -> String {
    let (ok, out, err) = support::kubectl_run(&["create", "token", sa, "-n", ns, "--duration=1h"]);
    assert!(ok, "kubectl create token {sa}: {err}");
    out.trim().to_string()
}

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", support::free_port())
        .parse()
        .expect("address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_metrics_answer_only_callers_rbac_allows() {
    let client = support::client().await;
    let ns = support::namespace(&client, "e2e-metrics-auth").await;
    let reader = format!("{ns}-metrics-reader");
    support::kubectl_stdin(
        &["apply", "-f", "-"],
        &format!(
            r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: {reader}}}
rules:
- nonResourceURLs: ["/metrics"]
  verbs: ["get"]
"#
        ),
    );
    support::kubectl_stdin(
        &["apply", "-f", "-"],
        &support::scrapers(&ns, &reader, "scraper", "nobody"),
    );
    support::wait_can_get_metrics(&ns, "scraper");
    let metrics = Arc::new(Metrics::new());
    metrics.grants.inc();
    let readiness = Arc::new(Readiness::default());
    readiness.set(true);
    let cfg = ServeConfig {
        metrics_addr: addr(),
        probe_addr: Some(addr()),
        auth: MetricsAuth::Rbac,
        cert_dir: None,
    };
    let _servers = telemetry::serve(&cfg, metrics, readiness, Some(client.clone()))
        .await
        .expect("servers start");
    let url = format!("https://{}/metrics", cfg.metrics_addr);

    let (code, body) = get(&url, Some(&token(&ns, "scraper")));
    assert_eq!(code, 200, "the scraper RBAC allows: {body}");
    assert!(body.contains("leasekeeper_grants_total 1"), "{body}");
    let (code, body) = get(&url, Some(&token(&ns, "nobody")));
    assert_eq!(
        code, 403,
        "an authenticated caller without the RBAC: {body}"
    );
    assert_eq!(get(&url, None).0, 401, "no token");
    assert_eq!(
        get(&url, Some("not-a-token")).0,
        401,
        "a token the API server does not know"
    );
    // Plain HTTP to the HTTPS port gets no metrics.
    let (code, body) = get(&format!("http://{}/metrics", cfg.metrics_addr), None);
    assert!(
        !body.contains("leasekeeper_"),
        "metrics over plain HTTP ({code})"
    );
    // Probes: plain HTTP on their own port, no token; /metrics is not there.
    let probes = cfg.probe_addr.expect("probe address");
    assert_eq!(
        get(&format!("http://{probes}/healthz"), None),
        (200, "ok".into())
    );
    assert_eq!(
        get(&format!("http://{probes}/readyz"), None),
        (200, "ready".into())
    );
    assert_eq!(get(&format!("http://{probes}/metrics"), None).0, 404);
    // Without a probe port, protected metrics refuse to start (kubelet has no token).
    let bad = ServeConfig {
        probe_addr: None,
        metrics_addr: addr(),
        ..cfg.clone()
    };
    let err = telemetry::serve(
        &bad,
        Arc::new(Metrics::new()),
        Arc::new(Readiness::default()),
        Some(client),
    )
    .await
    .expect_err("refused");
    assert!(err.to_string().contains("--probe-addr"), "{err}");
    let (ok, _, _) = support::kubectl_run(&[
        "delete",
        "clusterrole,clusterrolebinding",
        &format!("{ns}-metrics-reader"),
    ]);
    assert!(ok);
}

/// The chart with `metrics.auth=true`: its ServiceAccount may review tokens (the
/// operator started under that identity answers), and a ServiceAccount bound to the
/// chart's metrics-reader ClusterRole may scrape while another may not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_rbac_lets_the_operator_review_and_its_reader_role_scrape() {
    let client = support::client().await;
    let ns = support::namespace(&client, "chart-metrics-auth").await;
    let release = format!("ma{}", &ns[ns.len() - 8..]);
    let chart = support::root().join("charts/leasekeeper");
    let (ok, out, err) = support::helm(&[
        "install",
        &release,
        &chart.to_string_lossy(),
        "-n",
        &ns,
        "--set",
        "metrics.auth=true",
    ]);
    assert!(ok, "helm install: {out}{err}");
    let reader = format!("{release}-leasekeeper-metrics-reader");
    support::kubectl_stdin(
        &["apply", "-f", "-"],
        &support::scrapers(&ns, &reader, "prometheus", "other"),
    );
    support::wait_can_get_metrics(&ns, "prometheus");
    let kc = support::root().join(format!("target/{release}.kubeconfig"));
    support::token_kubeconfig(&ns, &format!("{release}-leasekeeper"), &kc);
    let operator_identity = support::client_for(&kc).await;
    let cfg = ServeConfig {
        metrics_addr: addr(),
        probe_addr: Some(addr()),
        auth: MetricsAuth::Rbac,
        cert_dir: None,
    };
    let _servers = telemetry::serve(
        &cfg,
        Arc::new(Metrics::new()),
        Arc::new(Readiness::default()),
        Some(operator_identity),
    )
    .await
    .expect("servers start");
    let url = format!("https://{}/metrics", cfg.metrics_addr);
    let (code, body) = get(&url, Some(&token(&ns, "prometheus")));
    assert_eq!(code, 200, "bound to the chart's reader role: {body}");
    assert_eq!(get(&url, Some(&token(&ns, "other"))).0, 403);
    let (ok, _, err) = support::kubectl_run(&["delete", "clusterrolebinding", &reader]);
    assert!(ok, "{err}");
    let (ok, out, err) = support::helm(&["uninstall", &release, "-n", &ns]);
    assert!(ok, "helm uninstall: {out}{err}");
}

#[test]
fn with_auth_on_the_chart_moves_the_probes_and_scrapes_over_https() {
    let chart = support::root().join("charts/leasekeeper");
    let chart = chart.to_string_lossy();
    let render = |sets: &[&str], only: &str| {
        let mut args = vec![
            "template",
            "lk",
            &chart,
            "--kube-version=1.35.0",
            "--show-only",
            only,
        ];
        for s in sets {
            args.extend(["--set", s]);
        }
        let (ok, out, err) = support::helm(&args);
        assert!(ok, "helm template: {err}");
        out
    };
    let plain = render(&[], "templates/deployment.yaml");
    assert!(!plain.contains("--metrics-auth") && !plain.contains("name: probes"));
    let on = render(&["metrics.auth=true"], "templates/deployment.yaml");
    for want in [
        "--metrics-auth=rbac",
        "--probe-addr=0.0.0.0:8081",
        "name: probes",
        "port: probes",
    ] {
        assert!(on.contains(want), "no {want:?} in\n{on}");
    }
    assert!(
        !on.contains("port: metrics\n"),
        "a probe still on the metrics port:\n{on}"
    );
    let sm = render(
        &["metrics.auth=true", "serviceMonitor.enabled=true"],
        "templates/servicemonitor.yaml",
    );
    for want in [
        "scheme: https",
        "bearerTokenFile:",
        "insecureSkipVerify: true",
    ] {
        assert!(sm.contains(want), "no {want:?} in\n{sm}");
    }
    let tls = render(
        &["metrics.auth=true", "metrics.certSecret=lk-tls"],
        "templates/deployment.yaml",
    );
    assert!(
        tls.contains("--metrics-cert-dir=") && tls.contains("secretName: lk-tls"),
        "{tls}"
    );
}
