//! Acting as a tenant: a user who may create LockClaims in a namespace and nothing else,
//! reached by impersonation from the admin credentials of the test plane.

use std::path::{Path, PathBuf};

use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::plane::{kubeconfig_path, root};

/// The verbs a tenant has on LockClaims (what issue reproductions used): no status, no
/// Leases, nothing else.
pub const TENANT_VERBS: [&str; 6] = ["get", "list", "watch", "create", "delete", "patch"];

/// Binds `user` to a Role in `ns` allowing only [`TENANT_VERBS`] on lockclaims.
pub async fn make_tenant(admin: &Client, ns: &str, user: &str) {
    let role = Role {
        metadata: ObjectMeta {
            name: Some("lockclaims-only".into()),
            ..ObjectMeta::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["leasekeeper.io".into()]),
            resources: Some(vec!["lockclaims".into()]),
            verbs: TENANT_VERBS.iter().map(|v| v.to_string()).collect(),
            ..PolicyRule::default()
        }]),
    };
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: format!("lockclaims-only-{user}").into(),
            ..ObjectMeta::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "lockclaims-only".into(),
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            name: user.into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            ..Subject::default()
        }]),
    };
    let pp = PostParams::default();
    let roles: Api<Role> = Api::namespaced(admin.clone(), ns);
    let _ = roles.create(&pp, &role).await;
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&pp, &binding)
        .await
        .expect("role binding");
}

/// A client that acts as `user` (the test plane's admin may impersonate anyone).
pub async fn client_as(user: &str) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig_path()).expect("kubeconfig readable");
    let mut cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig valid");
    cfg.auth_info.impersonate = Some(user.to_string());
    Client::try_from(cfg).expect("client")
}

/// A kubeconfig file (under target/) that acts as `user` (`as:`), for processes.
pub fn kubeconfig_as(user: &str) -> PathBuf {
    let out = crate::plane::kubectl()
        .args(["config", "view", "--raw", "-o", "json"])
        .output()
        .expect("kubectl config view");
    let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("kubeconfig as json");
    v["users"][0]["user"]["as"] = serde_json::Value::String(user.to_string());
    let path = root().join(format!("target/{user}-{}.kubeconfig", std::process::id()));
    std::fs::write(&path, serde_json::to_string(&v).expect("json")).expect("write kubeconfig");
    path
}

/// The path of a file in the test plane's directory (ports, pids), if it is there: a
/// plane of `hack/control-plane.sh` (the default one, or one named by
/// `LEASEKEEPER_TEST_KUBECONFIG`, as `make compat` does) keeps them beside its
/// kubeconfig; another cluster's kubeconfig has none.
pub fn plane_file(name: &str) -> Option<PathBuf> {
    let p = Path::new(kubeconfig_path()).parent()?.join(name);
    p.exists().then_some(p)
}
