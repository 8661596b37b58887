//! The test control plane: `hack/control-plane.sh up target/e2e-plane` (kube-apiserver +
//! etcd on loopback), started once per test binary, unless `LEASEKEEPER_TEST_KUBECONFIG`
//! names another cluster to use. The CRDs are installed once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, Config};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")))
}

struct Plane {
    kubeconfig: PathBuf,
    bin: PathBuf,
}

/// The directory `hack/control-plane.sh` keeps its binaries in.
pub fn plane_bin_dir() -> PathBuf {
    let script = root().join("hack/control-plane.sh");
    String::from_utf8(run_ok(Command::new(&script).arg("bin")).stdout)
        .expect("utf-8 path")
        .trim()
        .into()
}

fn plane() -> &'static Plane {
    static PLANE: OnceLock<Plane> = OnceLock::new();
    PLANE.get_or_init(|| {
        let kubeconfig = match std::env::var_os("LEASEKEEPER_TEST_KUBECONFIG") {
            Some(k) => PathBuf::from(k),
            None => {
                let dir = root().join("target/e2e-plane");
                run_ok(
                    Command::new(root().join("hack/control-plane.sh"))
                        .arg("up")
                        .arg(&dir),
                );
                dir.join("kubeconfig")
            }
        };
        let plane = Plane {
            kubeconfig,
            bin: plane_bin_dir(),
        };
        install_crd_files(&plane);
        plane
    })
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every CRD file under `crds/`, applied and Established.
fn install_crd_files(plane: &Plane) {
    let dir = root().join("crds");
    let mut apply = kubectl_cmd(plane);
    apply
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(&dir);
    run_ok(&mut apply);
    let mut wait = kubectl_cmd(plane);
    wait.args(["wait", "--for=condition=Established", "--timeout=60s", "-f"])
        .arg(&dir);
    run_ok(&mut wait);
}

fn kubectl_cmd(plane: &Plane) -> Command {
    let mut c = Command::new(plane.bin.join("kubectl"));
    c.env("KUBECONFIG", &plane.kubeconfig);
    c
}

/// The kubeconfig file of the test control plane.
pub fn kubeconfig_path() -> &'static Path {
    &plane().kubeconfig
}

/// The directory holding kubectl, helm, kube-apiserver and etcd.
pub fn bin_dir() -> &'static Path {
    &plane().bin
}

/// A `kubectl` command pointed at the test control plane.
pub fn kubectl() -> Command {
    kubectl_cmd(plane())
}

/// Runs kubectl with `args` and returns (success, stdout, stderr).
pub fn kubectl_run(args: &[&str]) -> (bool, String, String) {
    let out = kubectl().args(args).output().expect("kubectl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs kubectl with `args`, feeding `input` on stdin (`-f -`); asserts it succeeded.
pub fn kubectl_stdin(args: &[&str], input: &str) {
    use std::io::Write;
    let mut child = kubectl()
        .args(args)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    assert!(child.wait().expect("kubectl").success(), "kubectl {args:?}");
}

/// Runs `helm` against the test control plane.
pub fn helm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin_dir().join("helm"))
        .args(args)
        .env("KUBECONFIG", kubeconfig_path())
        .env("HELM_CACHE_HOME", root().join("target/helm/cache"))
        .env("HELM_CONFIG_HOME", root().join("target/helm/config"))
        .env("HELM_DATA_HOME", root().join("target/helm/data"))
        .output()
        .expect("helm runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A client for the cluster of kubeconfig `path`.
pub async fn client_for(path: &Path) -> Client {
    let kc = Kubeconfig::read_from(path).expect("kubeconfig readable");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig valid");
    Client::try_from(cfg).expect("client")
}

/// A client for the test control plane (one per test: clients are tied to a runtime).
pub async fn client() -> Client {
    client_for(kubeconfig_path()).await
}

/// Applies leasekeeper's CRDs (server-side, as `manager`) and waits until they are
/// Established: how the benchmark and the chaos run prepare a fresh control plane.
pub async fn install_crd(client: Client, manager: &str, timeout: Duration) {
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    for crd in leasekeeper::api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(
            &name,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot apply CRD {name}: {e}"));
        let established = await_condition(crds.clone(), &name, conditions::is_crd_established());
        match tokio::time::timeout(timeout, established).await {
            Ok(Ok(_)) => {}
            other => panic!("CRD {name} not established after {timeout:?}: {other:?}"),
        }
    }
}

/// Writes a kubeconfig at `path` that authenticates as ServiceAccount `sa` of `ns` (a
/// one-hour token from the TokenRequest API) against the test control plane.
pub fn token_kubeconfig(ns: &str, sa: &str, path: &std::path::Path) {
    let (ok, token, err) = kubectl_run(&["create", "token", sa, "-n", ns, "--duration=1h"]);
    assert!(ok, "kubectl create token: {err}");
    let admin = std::fs::read_to_string(kubeconfig_path()).expect("kubeconfig");
    let server = admin
        .split("server: \"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("server");
    let ca = admin
        .split("certificate-authority-data: ")
        .nth(1)
        .and_then(|s| s.split(['}', ',', '\n']).next())
        .expect("ca")
        .trim();
    let kc = format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"{server}\", certificate-authority-data: {ca}}}}}]\nusers: [{{name: sa, user: {{token: {}}}}}]\ncontexts: [{{name: sa, context: {{cluster: c, user: sa, namespace: {ns}}}}}]\ncurrent-context: sa\n",
        token.trim()
    );
    std::fs::write(path, kc).expect("write kubeconfig");
}

/// (HTTP status, body) of a GET by curl, with `token` as bearer token. `-k`: protected
/// metrics serve a self-signed certificate unless given one.
pub fn curl(url: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sk", "--max-time", "10", "-w", "\n%{http_code}", url]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd.output().expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Two ServiceAccounts in `ns`, `allowed` bound to the ClusterRole `role` (a
/// ClusterRoleBinding named as the role) and `other` bound to nothing: the scrapers of
/// the protected-metrics tests.
pub fn scrapers(ns: &str, role: &str, allowed: &str, other: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: {allowed}, namespace: {ns}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {other}, namespace: {ns}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {role}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {role}}}
subjects:
- {{kind: ServiceAccount, name: {allowed}, namespace: {ns}}}
"#
    )
}

/// Waits (up to 20 s) until RBAC lets ServiceAccount `sa` of `ns` get /metrics, as the
/// API server's authorizer sees it: a binding just created takes a moment to count, and
/// the operator caches a verdict for a minute.
pub fn wait_can_get_metrics(ns: &str, sa: &str) {
    let who = format!("--as=system:serviceaccount:{ns}:{sa}");
    let t0 = std::time::Instant::now();
    loop {
        let (_, out, _) = kubectl_run(&["auth", "can-i", "get", "/metrics", &who]);
        if out.trim() == "yes" {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "RBAC never allowed {sa} to get /metrics"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The commit checked out now (short hash), and whether tracked files differ from it:
/// what a benchmark or chaos report names as the code it ran (read it when the run
/// starts).
pub fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root())
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let dirty = if git(&["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        ""
    } else {
        " (with uncommitted changes)"
    };
    format!("{}{dirty}", git(&["rev-parse", "--short", "HEAD"]))
}

/// `kubectl lock ARGS` in namespace `ns` against the test plane, with the plugin binary
/// `plugin` (a test's `env!("CARGO_BIN_EXE_kubectl-lock")`) on PATH.
pub fn kubectl_lock(plugin: &Path, ns: &str, args: &[&str]) -> std::process::Command {
    let plugin_dir = plugin.parent().expect("the plugin's directory");
    let path = format!(
        "{}:{}:{}",
        plugin_dir.display(),
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = std::process::Command::new(bin_dir().join("kubectl"));
    c.arg("lock").args(["-n", ns]).args(args);
    c.env("PATH", path).env("KUBECONFIG", kubeconfig_path());
    c
}
