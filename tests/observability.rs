//! The chart's observability objects with the real tools: `helm template` renders the
//! Grafana dashboard ConfigMap and the PrometheusRule when their values are on (and not
//! otherwise); `promtool` (built from the Prometheus Go module by hack/promtool.sh)
//! checks the rules and runs their unit tests (tests/alerts/), and checks that every
//! query of the dashboard parses and returns data on the series the operator exports.

use testkit as support;

use std::path::{Path, PathBuf};
use std::process::Command;

use leasekeeper::telemetry::{
    KindLabel, LockLabel, Metrics, NamespaceLabel, ReasonLabel, WriteKind,
};
use support::plane::root;

const KUBE_VERSION: &str = "--kube-version=1.35.0";

fn chart() -> String {
    root().join("charts/leasekeeper").display().to_string()
}

fn promtool() -> PathBuf {
    let out = Command::new(root().join("hack/promtool.sh"))
        .output()
        .expect("hack/promtool.sh runs");
    assert!(
        out.status.success(),
        "hack/promtool.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A fresh working directory under target/ for one test's files.
fn workdir(name: &str) -> PathBuf {
    let d = root().join("target/observability").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("workdir");
    d
}

fn run_promtool(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(promtool())
        .current_dir(dir)
        .args(args)
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// The objects `helm template` renders with `sets`, as YAML documents.
fn render(sets: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec![
        "template",
        "lk",
        &chart(),
        KUBE_VERSION,
        "--namespace",
        "default",
    ]
    .into_iter()
    .map(str::to_string)
    .collect::<Vec<_>>();
    for s in sets {
        args.push("--set".into());
        args.push((*s).into());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = support::helm(&refs);
    assert!(ok, "helm template: {err}");
    serde_saphyr::from_multiple::<serde_json::Value>(&out)
        .expect("helm template renders YAML")
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn dashboard_json() -> serde_json::Value {
    let docs = render(&["grafanaDashboard.enabled=true"]);
    let cm = of_kind(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"].as_str() == Some("lk-leasekeeper-dashboard"))
        .cloned()
        .expect("the dashboard ConfigMap");
    let text = cm["data"]["leasekeeper.json"]
        .as_str()
        .expect("dashboard JSON");
    serde_json::from_str(text).expect("the dashboard is JSON")
}

/// Every query of the dashboard with Grafana's variables filled in as Grafana would
/// for a ServiceMonitor scrape of job "leasekeeper": (panel title, expression).
fn dashboard_queries(d: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        let title = p["title"].as_str().unwrap_or_default().to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("expr");
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$claim_namespace_label", "exported_namespace")
                .replace("$job", "leasekeeper");
            out.push((title.clone(), expr));
        }
    }
    out
}

#[test]
fn dashboard_and_rules_render_only_when_their_values_are_on() {
    let default = render(&[]);
    assert!(of_kind(&default, "PrometheusRule").is_empty());
    assert!(!default
        .iter()
        .any(|d| d["metadata"]["labels"]["grafana_dashboard"].is_string()));
    let on = render(&[
        "grafanaDashboard.enabled=true",
        "grafanaDashboard.namespace=monitoring",
        "prometheusRule.enabled=true",
        "prometheusRule.labels.release=prom",
    ]);
    let rules = of_kind(&on, "PrometheusRule");
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0]["metadata"]["labels"]["release"].as_str(),
        Some("prom")
    );
    let alerts: Vec<&str> = rules[0]["spec"]["groups"][0]["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    assert_eq!(
        alerts,
        [
            "LeasekeeperNoLeader",
            "LeasekeeperClaimsStuck",
            "LeasekeeperReconcileErrors",
            "LeasekeeperExpirySpike",
            "LeasekeeperInvalidObjects"
        ]
    );
    let cm = of_kind(&on, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["labels"]["grafana_dashboard"].as_str() == Some("1"))
        .expect("a ConfigMap with the sidecar's label");
    assert_eq!(cm["metadata"]["namespace"].as_str(), Some("monitoring"));
    // Every alert has a runbook section in docs/operations.md, under the anchor it links to.
    let runbooks =
        std::fs::read_to_string(root().join("docs/operations.md")).expect("docs/operations.md");
    for a in alerts {
        assert!(
            runbooks.contains(&format!("#### {a}")),
            "no runbook section `#### {a}` in docs/operations.md"
        );
    }
}

#[test]
fn the_dashboard_covers_what_operators_look_at() {
    let d = dashboard_json();
    let queries = dashboard_queries(&d);
    for metric in [
        "leasekeeper_grants_total",
        "leasekeeper_releases_total",
        "leasekeeper_queue_depth",
        "leasekeeper_grant_latency_seconds_bucket",
        "leasekeeper_handoff_latency_seconds_bucket",
        "leasekeeper_expiries_total",
        "leasekeeper_reconcile_errors_total",
        "leasekeeper_api_writes_total",
        "leasekeeper_leader",
        "leasekeeper_lock_held",
        "leasekeeper_lock_waiting",
        "leasekeeper_stalled_waiters",
    ] {
        assert!(
            queries.iter().any(|(_, q)| q.contains(metric)),
            "no panel queries {metric}"
        );
    }
    let ids: std::collections::HashSet<i64> = d["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter_map(|p| p["id"].as_i64())
        .collect();
    assert_eq!(
        ids.len(),
        d["panels"].as_array().map_or(0, Vec::len),
        "panel ids repeat"
    );
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let docs = render(&["prometheusRule.enabled=true"]);
    let rule = of_kind(&docs, "PrometheusRule")[0].clone();
    let dir = workdir("alerts");
    let groups = serde_saphyr::to_string(&serde_json::json!({"groups": rule["spec"]["groups"]}))
        .expect("yaml");
    std::fs::write(dir.as_path().join("rules.yaml"), groups).expect("write rules");
    std::fs::copy(
        root().join("tests/alerts/leasekeeper.test.yaml"),
        dir.as_path().join("leasekeeper.test.yaml"),
    )
    .expect("copy tests");
    let checked = run_promtool(dir.as_path(), &["check", "rules", "rules.yaml"]);
    assert!(checked.contains("SUCCESS: 5 rules found"), "{checked}");
    let tested = run_promtool(dir.as_path(), &["test", "rules", "leasekeeper.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Synthetic series for every sample the operator exports once each family has a child:
/// names and labels come from the real encoder, so a panel that queries a misspelt
/// metric or label finds nothing. The metric's own `namespace` label becomes
/// `exported_namespace`, as a ServiceMonitor scrape keeps it.
fn exported_series() -> Vec<(String, String)> {
    let m = Metrics::new();
    let ns = || NamespaceLabel {
        namespace: "team-a".into(),
    };
    m.queue_depth.get_or_create(&ns()).set(3);
    m.stalled_waiters.get_or_create(&ns()).set(1);
    for family in [&m.expiries, &m.reconcile_errors, &m.step_downs] {
        family
            .get_or_create(&ReasonLabel {
                reason: "Expired".into(),
            })
            .inc();
    }
    m.invalid_objects
        .get_or_create(&KindLabel {
            kind: "LockClaim".into(),
        })
        .set(1);
    m.watch_events
        .get_or_create(&KindLabel {
            kind: "Lease".into(),
        })
        .inc();
    let lock = LockLabel {
        namespace: "team-a".into(),
        lock: "pool".into(),
    };
    m.lock_held.get_or_create(&lock).set(2);
    m.lock_waiting.get_or_create(&lock).set(5);
    m.write(WriteKind::LeaseGrant);
    m.leader.set(1);
    let mut out = vec![(
        "up{job=\"leasekeeper\",pod=\"lk-0\"}".to_string(),
        "1x30".to_string(),
    )];
    for line in m
        .encode()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, _) = line.rsplit_once(' ').expect("sample");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (
                n,
                l.trim_end_matches('}')
                    .replace("namespace=", "exported_namespace="),
            ),
            None => (series, String::new()),
        };
        let sep = if labels.is_empty() { "" } else { "," };
        let sel =
            format!("{name}{{{labels}{sep}job=\"leasekeeper\",namespace=\"ops\",pod=\"lk-0\"}}");
        // Counters and buckets rise, so every rate and quantile has data; gauges stay 1.
        let values =
            if name.ends_with("_total") || name.ends_with("_bucket") || name.ends_with("_count") {
                "0+1x30"
            } else {
                "1x30"
            };
        out.push((sel, values.to_string()));
    }
    out
}

#[test]
fn every_dashboard_query_parses_and_returns_data_on_the_exported_series() {
    let d = dashboard_json();
    let queries = dashboard_queries(&d);
    let dir = workdir("dashboard");
    // Each query as an alert that fires when the query returns anything at all.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut tests = String::from(
        "rule_files: [dashboard.yaml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n",
    );
    for (sel, values) in exported_series() {
        tests.push_str(&format!(
            "      - series: '{sel}'\n        values: '{values}'\n"
        ));
    }
    tests.push_str("    alert_rule_test:\n");
    for (i, (title, q)) in queries.iter().enumerate() {
        let name = format!("Query{i}");
        rules.push_str(&format!(
            "      - alert: {name}\n        # {title}\n        expr: 'count({}) > 0'\n",
            q.replace('\'', "''")
        ));
        tests.push_str(&format!(
            "      - eval_time: 20m\n        alertname: {name}\n        exp_alerts: [{{exp_labels: {{}}}}]\n"
        ));
    }
    std::fs::write(dir.as_path().join("dashboard.yaml"), &rules).expect("write");
    std::fs::write(dir.as_path().join("dashboard.test.yaml"), &tests).expect("write");
    let checked = run_promtool(dir.as_path(), &["check", "rules", "dashboard.yaml"]);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{checked}"
    );
    let out = Command::new(promtool())
        .current_dir(dir.as_path())
        .args(["test", "rules", "dashboard.test.yaml"])
        .output()
        .expect("promtool");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "dashboard queries that return nothing on the operator's series (QueryN is the Nth of {queries:#?}):\n{text}"
    );
}
