//! Shared end-to-end test support: a real kube-apiserver + etcd (started or reused),
//! the CRD installed once, a fresh namespace per test, and wait helpers.
//!
//! The control plane is `hack/control-plane.sh up target/e2e-plane` unless
//! `LEASEKEEPER_TEST_KUBECONFIG` names another cluster to use.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, Resource};
use serde::de::DeserializeOwned;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Plane {
    kubeconfig: PathBuf,
    bin: PathBuf,
}

fn plane() -> &'static Plane {
    static PLANE: OnceLock<Plane> = OnceLock::new();
    PLANE.get_or_init(|| {
        let script = root().join("hack/control-plane.sh");
        let bin = String::from_utf8(run_ok(Command::new(&script).arg("bin")).stdout)
            .expect("utf-8 path")
            .trim()
            .into();
        let kubeconfig = match std::env::var_os("LEASEKEEPER_TEST_KUBECONFIG") {
            Some(k) => PathBuf::from(k),
            None => {
                let dir = root().join("target/e2e-plane");
                run_ok(Command::new(&script).arg("up").arg(&dir));
                dir.join("kubeconfig")
            }
        };
        let plane = Plane { kubeconfig, bin };
        install_crd(&plane);
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

fn install_crd(plane: &Plane) {
    let crd = root().join("crds/lockclaims.leasekeeper.io.yaml");
    let mut apply = kubectl_cmd(plane);
    apply
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(&crd);
    run_ok(&mut apply);
    let mut wait = kubectl_cmd(plane);
    wait.args([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/lockclaims.leasekeeper.io",
    ]);
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

/// A client for the test control plane (one per test: clients are tied to a runtime).
pub async fn client() -> Client {
    let path = kubeconfig_path().to_path_buf();
    let kc = Kubeconfig::read_from(&path).expect("kubeconfig readable");
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig valid");
    Client::try_from(cfg).expect("client")
}

/// Creates a fresh namespace named after the test, with a random suffix.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let suffix: u32 = rand_u32();
    let name = format!("{}-{:08x}", prefix.replace('_', "-"), suffix);
    let name = name.chars().take(63).collect::<String>();
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some([("leasekeeper.io/e2e".to_string(), "true".to_string())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
    name
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish() as u32
}

/// Watches `name` until `cond` holds, for at most `timeout`; returns the object.
/// Panics with the last seen object when the time runs out.
pub async fn wait_for<K, F>(api: &Api<K>, name: &str, timeout: Duration, what: &str, cond: F) -> K
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(&K) -> bool,
{
    let watched = kube::runtime::wait::await_condition(api.clone(), name, |o: Option<&K>| {
        o.is_some_and(&cond)
    });
    match tokio::time::timeout(timeout, watched).await {
        Ok(Ok(Some(obj))) => obj,
        Ok(other) => panic!("watch on {name} ended while waiting for {what}: {other:?}"),
        Err(_) => {
            let last = api.get_opt(name).await;
            panic!("timed out after {timeout:?} waiting for {name}: {what}; last seen: {last:#?}")
        }
    }
}
