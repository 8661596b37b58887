//! Namespaces, claims, Leases and Events on the test cluster, and waiting for them.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client, Resource};
use leasekeeper::api::{Lock, LockClaim, LockClaimSpec, LockSpec, Phase};
use serde::de::DeserializeOwned;

use crate::plane::kubectl_run;

/// Creates a fresh namespace named after the test, with a random suffix.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let name = format!("{}-{:08x}", prefix.replace('_', "-"), rand_u32());
    let name = name.chars().take(63).collect::<String>();
    create_namespace(client, &name, &[("leasekeeper.io/e2e", "true")]).await;
    name
}

/// Creates namespace `name` with `labels` (an existing one is left as it is).
pub async fn create_namespace(client: &Client, name: &str, labels: &[(&str, &str)]) {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("namespace {name}: {e}"),
    }
}

/// A pseudo-random number (no dependency: the hasher's random keys and the clock).
pub fn rand_u32() -> u32 {
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

/// Waits (watching) until `name` no longer exists.
pub async fn wait_gone<K>(api: &Api<K>, name: &str, timeout: Duration)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let gone = kube::runtime::wait::await_condition(api.clone(), name, |o: Option<&K>| o.is_none());
    match tokio::time::timeout(timeout, gone).await {
        Ok(Ok(_)) => {}
        other => panic!("{name} still exists after {timeout:?}: {other:?}"),
    }
}

/// A LockClaim spec with defaults, for `lease`.
pub fn spec(lease: &str) -> LockClaimSpec {
    LockClaimSpec::for_lease(lease)
}

/// Creates a claim.
pub async fn create_claim(api: &Api<LockClaim>, name: &str, spec: LockClaimSpec) -> LockClaim {
    api.create(&PostParams::default(), &LockClaim::new(name, spec))
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"))
}

/// Waits for a claim to reach `phase`.
pub async fn wait_phase(
    api: &Api<LockClaim>,
    name: &str,
    phase: Phase,
    timeout: Duration,
) -> LockClaim {
    wait_for(
        api,
        name,
        timeout,
        &format!("phase {phase:?}"),
        |c: &LockClaim| c.phase() == Some(phase),
    )
    .await
}

/// The Lease in `ns`, if it exists.
pub async fn lease(client: &Client, ns: &str, name: &str) -> Option<Lease> {
    Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .expect("lease read")
}

/// Who holds the election Lease `name` in `leases`' namespace now: None when nobody
/// does, or when it cannot be read.
pub async fn current_leader(leases: &Api<Lease>, name: &str) -> Option<String> {
    let lease = leases.get_opt(name).await.ok().flatten()?;
    lease.spec?.holder_identity.filter(|h| !h.is_empty())
}

/// Whether leadership holder `holder` is replica `identity` (the operator elects under
/// `{identity}_{random}`, one per process).
pub fn is_replica(holder: &str, identity: &str) -> bool {
    holder
        .strip_prefix(identity)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('_'))
}

/// Renews a Lease as a holder would (spec.renewTime, with the resourceVersion
/// precondition), every `every`, writing renewTime shifted by `skew`, until dropped.
pub struct Renewer {
    task: tokio::task::JoinHandle<()>,
}

impl Renewer {
    /// Starts renewing `lease` in `ns` while it names `identity`.
    pub fn start(
        client: &Client,
        ns: &str,
        lease: &str,
        identity: &str,
        every: Duration,
        skew: jiff::SignedDuration,
    ) -> Renewer {
        let api: Api<Lease> = Api::namespaced(client.clone(), ns);
        let (lease, identity) = (lease.to_string(), identity.to_string());
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Ok(Some(mut l)) = api.get_opt(&lease).await else {
                    continue;
                };
                let Some(spec) = l.spec.as_mut() else {
                    continue;
                };
                if spec.holder_identity.as_deref() != Some(identity.as_str()) {
                    continue;
                }
                let t = jiff::Timestamp::now()
                    .checked_add(skew)
                    .unwrap_or_else(|_| jiff::Timestamp::now());
                spec.renew_time = Some(MicroTime(t));
                let _ = api.replace(&lease, &PostParams::default(), &l).await;
            }
        });
        Renewer { task }
    }

    /// Stops renewing.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Events recorded in `ns`: (involved kind, involved name, reason).
pub fn events(ns: &str) -> Vec<(String, String, String)> {
    let (ok, out, err) = kubectl_run(&["get", "events", "-n", ns, "-o", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|e| {
                    let field = |k: &str| e["involvedObject"][k].as_str().unwrap_or_default();
                    (
                        field("kind").to_string(),
                        field("name").to_string(),
                        e["reason"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits up to 10 s for an Event (kind, name, reason) in `ns`: Events are published
/// after the writes they describe. Returns every Event seen.
pub async fn wait_event(
    ns: &str,
    kind: &str,
    name: Option<&str>,
    reason: &str,
) -> Vec<(String, String, String)> {
    let mut evs = events(ns);
    for _ in 0..100 {
        if evs
            .iter()
            .any(|(k, n, r)| k == kind && name.is_none_or(|x| x == n) && r == reason)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        evs = events(ns);
    }
    evs
}

/// Applies the fence of `lock` in `ns` for ConfigMaps (the admission policy and its
/// binding, as `kubectl lock fence` writes them) by server-side apply as `manager`. The
/// API server enforces it a moment later (policies reach admission through an informer):
/// callers probe until it does.
pub async fn apply_fence(client: &Client, ns: &str, lock: &str, manager: &str) {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    use kube::api::{Patch, PatchParams};
    let resources = ["configmaps".parse().expect("resource")];
    let (policy, binding) = leasekeeper::fence::policy(ns, lock, &resources).expect("policy");
    let name = policy.metadata.name.clone().expect("name");
    let pp = PatchParams::apply(manager).force();
    let typed = |mut v: serde_json::Value, kind: &str| {
        v["apiVersion"] = "admissionregistration.k8s.io/v1".into();
        v["kind"] = kind.into();
        v
    };
    let policy = typed(
        serde_json::to_value(&policy).expect("json"),
        "ValidatingAdmissionPolicy",
    );
    Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .patch(&name, &pp, &Patch::Apply(policy))
        .await
        .expect("fence policy");
    let binding = typed(
        serde_json::to_value(&binding).expect("json"),
        "ValidatingAdmissionPolicyBinding",
    );
    Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .patch(&name, &pp, &Patch::Apply(binding))
        .await
        .expect("fence binding");
}

/// Creates Lock `name` of `capacity` in `ns`; returns the namespace's Lock API.
pub async fn create_lock(client: &Client, ns: &str, name: &str, capacity: i32) -> Api<Lock> {
    let api: Api<Lock> = Api::namespaced(client.clone(), ns);
    api.create(
        &PostParams::default(),
        &Lock::new(name, LockSpec { capacity }),
    )
    .await
    .expect("Lock");
    api
}
