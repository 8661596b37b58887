//! Traffic to the holder: a Service without a selector, annotated
//! `leasekeeper.io/route-to-holder: LOCK`, gets one EndpointSlice that the operator keeps
//! equal to the holder Pod(s) of LOCK (every holder, for a lock with capacity) and the
//! Service's ports, and nothing else. The holder's Pod is its claim's: the Pod named
//! by a Pod claim's identity, or the Pod that owns the claim (the sidecar and `kubectl
//! lock run` in a Pod record it from the downward API). A handoff is one write of the
//! slice, after the grant is published. The Pods' readiness stays theirs (health); the
//! route follows the lock.

use std::collections::BTreeMap;
use std::future::ready;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodStatus, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use kube::runtime::reflector::{self, store::Writer, ObjectRef};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, ResourceExt};

use super::{Context, LeaseKey};
use crate::api::{LockClaim, Renewal, ROUTE_ANNOTATION};
use crate::arbiter::LockPlan;

/// The label kube-proxy selects a Service's slices by.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Whose slice it is (the EndpointSlice controller leaves others' alone).
const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// leasekeeper's value of [`MANAGED_BY_LABEL`].
pub const SLICE_MANAGER: &str = "leasekeeper.io";
/// How often a routed lock is looked at again (a holder's address and readiness).
const REFRESH: Duration = Duration::from_secs(2);
/// How soon it is looked at again while a holder's Pod is not listed as ready yet (it
/// has no address, or is not Ready): traffic waits for that, so it is not left to
/// [`REFRESH`].
const AWAIT_HOLDER: Duration = Duration::from_millis(250);

/// The label selector of the EndpointSlice watch: only leasekeeper's slices.
pub(super) fn slice_selector() -> String {
    format!("{MANAGED_BY_LABEL}={SLICE_MANAGER}")
}

/// The slice of Service `svc`.
fn slice_name(svc: &str) -> String {
    format!("{svc}-leasekeeper")
}

/// Watches Services; an annotated one (or one that lost the annotation) routes its lock
/// again. Kept slim: name, uid, our annotation, ports, whether it has a selector.
pub(super) async fn watch_services(ctx: Arc<Context>, api: Api<Service>, writer: Writer<Service>) {
    let events = watcher(api, watcher::Config::default())
        .modify(slim_service)
        .default_backoff();
    reflector::reflector(writer, events)
        .for_each(|ev| {
            match ev {
                Ok(Event::Apply(s) | Event::InitApply(s) | Event::Delete(s)) => {
                    service_seen(&ctx, &s)
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "Service watch error; retrying"),
            }
            ready(())
        })
        .await
}

/// Watches leasekeeper's EndpointSlices (label-selected) into `writer`.
pub(super) async fn watch_slices(api: Api<EndpointSlice>, writer: Writer<EndpointSlice>) {
    let events =
        watcher(api, watcher::Config::default().labels(&slice_selector())).default_backoff();
    reflector::reflector(writer, events)
        .for_each(|ev| {
            if let Err(e) = ev {
                tracing::warn!(error = %e, "EndpointSlice watch error; retrying");
            }
            ready(())
        })
        .await
}

fn slim_service(s: &mut Service) {
    s.metadata.managed_fields = None;
    s.metadata.labels = None;
    if let Some(a) = s.metadata.annotations.as_mut() {
        a.retain(|k, _| k == ROUTE_ANNOTATION);
    }
    s.status = None;
}

fn service_seen(ctx: &Context, s: &Service) {
    let (Some(ns), Some(lock)) = (s.namespace(), s.annotations().get(ROUTE_ANNOTATION)) else {
        // Annotation removed (or never there): a slice of ours for it is removed.
        if let (Some(ns), true) = (s.namespace(), has_slice(ctx, s)) {
            ctx.queue.now(LeaseKey {
                namespace: ns,
                name: orphan_key(&s.name_any()),
            });
        }
        return;
    };
    ctx.queue.now(LeaseKey {
        namespace: ns,
        name: lock.clone(),
    });
}

/// A key no lock can have (`/` is not in names): routes of Service `svc` to clean up.
fn orphan_key(svc: &str) -> String {
    format!("route/{svc}")
}

fn has_slice(ctx: &Context, s: &Service) -> bool {
    let Some(slices) = ctx.slices.as_ref() else {
        return false;
    };
    let r = ObjectRef::new(&slice_name(&s.name_any())).within(&s.namespace().unwrap_or_default());
    slices.get(&r).is_some()
}

/// The Services of `key`'s namespace that route to its lock.
fn routed(ctx: &Context, key: &LeaseKey) -> Vec<Arc<Service>> {
    let Some(services) = ctx.services.as_ref() else {
        return Vec::new();
    };
    services
        .state()
        .into_iter()
        .filter(|s| s.namespace().as_deref() == Some(key.namespace.as_str()))
        .filter(|s| s.annotations().get(ROUTE_ANNOTATION) == Some(&key.name))
        .collect()
}

/// The Pod that stands behind holder claim `c`.
fn holder_pod(c: &LockClaim) -> Option<String> {
    if c.spec.renewal == Renewal::Pod {
        return Some(c.identity());
    }
    c.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.kind == "Pod" && o.api_version == "v1")
        .map(|o| o.name.clone())
}

/// Makes every Service routing to `key`'s lock list the holders after `plan`; returns
/// when to look again (while routes exist: a holder's address can appear or change).
pub(super) async fn publish(
    ctx: &Context,
    key: &LeaseKey,
    plan: &LockPlan,
    claims: &[Arc<LockClaim>],
) -> Option<Duration> {
    let services = routed(ctx, key);
    if services.is_empty() {
        return None;
    }
    let (pods, named) = holder_pods(ctx, key, plan, claims).await;
    for s in services {
        let desired = desired_slice(&s, &pods);
        write_if_changed(ctx, &key.namespace, desired).await;
    }
    Some(look_again(named, &pods))
}

/// When to read the holders again: soon while any of the `named` holder Pods is not yet
/// a ready endpoint (missing, no address, not Ready), else at the steady pace.
fn look_again(named: usize, pods: &[Pod]) -> Duration {
    let serving = pods.iter().filter(|p| ready_address(p)).count();
    if serving < named {
        AWAIT_HOLDER
    } else {
        REFRESH
    }
}

/// The Pod has an address and is Ready, and is not terminating.
fn ready_address(p: &Pod) -> bool {
    let Some(st) = p.status.as_ref() else {
        return false;
    };
    st.pod_ip.as_ref().is_some_and(|ip| !ip.is_empty())
        && is_ready(st)
        && p.metadata.deletion_timestamp.is_none()
}

/// The Pod's Ready condition is True.
fn is_ready(st: &PodStatus) -> bool {
    st.conditions
        .as_ref()
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The holders' Pods, as read now (their addresses and readiness), and how many holders
/// name a Pod.
async fn holder_pods(
    ctx: &Context,
    key: &LeaseKey,
    plan: &LockPlan,
    claims: &[Arc<LockClaim>],
) -> (Vec<Pod>, usize) {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let (mut out, mut named) = (Vec::new(), 0);
    for claim in plan.holders.values() {
        let Some(c) = claims.iter().find(|c| c.name_any() == *claim) else {
            continue;
        };
        if let Some(pod) = holder_pod(c) {
            named += 1;
            if let Ok(Some(p)) = api.get_opt(&pod).await {
                out.push(p);
            }
        }
    }
    (out, named)
}

/// The slice Service `s` should have with holder Pods `pods` (those with an address).
pub fn desired_slice(s: &Service, pods: &[Pod]) -> EndpointSlice {
    let svc = s.name_any();
    let endpoints = pods
        .iter()
        .filter_map(|p| {
            let st = p.status.as_ref()?;
            let ip = st.pod_ip.clone().filter(|ip| !ip.is_empty())?;
            let ready = is_ready(st);
            let terminating = p.metadata.deletion_timestamp.is_some();
            Some(Endpoint {
                addresses: vec![ip],
                conditions: Some(EndpointConditions {
                    ready: Some(ready && !terminating),
                    serving: Some(ready),
                    terminating: Some(terminating),
                }),
                node_name: p.spec.as_ref().and_then(|s| s.node_name.clone()),
                target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some(p.name_any()),
                    namespace: p.namespace(),
                    uid: p.uid(),
                    ..Default::default()
                }),
                ..Endpoint::default()
            })
        })
        .collect::<Vec<_>>();
    let ports = s
        .spec
        .as_ref()
        .and_then(|sp| sp.ports.as_ref())
        .map(|ps| ps.iter().map(|p| endpoint_port(p, pods)).collect())
        .unwrap_or_default();
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice_name(&svc)),
            namespace: s.namespace(),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.to_string(), svc.clone()),
                (MANAGED_BY_LABEL.to_string(), SLICE_MANAGER.to_string()),
            ])),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Service".into(),
                name: svc,
                uid: s.uid().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(ports),
    }
}

/// A Service port as the slice lists it: the target port (a name is looked up in the
/// holders' containers), under the Service port's name.
fn endpoint_port(p: &ServicePort, pods: &[Pod]) -> EndpointPort {
    let port = match &p.target_port {
        None => Some(p.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => pods.iter().find_map(|pod| {
            pod.spec.as_ref()?.containers.iter().find_map(|c| {
                c.ports
                    .as_ref()?
                    .iter()
                    .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                    .map(|cp| cp.container_port)
            })
        }),
    };
    EndpointPort {
        name: p.name.clone(),
        port,
        protocol: p.protocol.clone(),
        app_protocol: p.app_protocol.clone(),
    }
}

/// What a slice says that matters to a Service's clients.
fn same(a: &EndpointSlice, b: &EndpointSlice) -> bool {
    a.endpoints == b.endpoints && a.ports == b.ports && a.metadata.labels == b.metadata.labels
}

/// One write, if the slice differs from what the cache holds.
async fn write_if_changed(ctx: &Context, ns: &str, mut desired: EndpointSlice) {
    let current = ctx
        .slices
        .as_ref()
        .and_then(|s| s.get(&ObjectRef::new(&desired.name_any()).within(ns)));
    if current.as_deref().is_some_and(|c| same(c, &desired)) {
        return;
    }
    desired.metadata.resource_version = current.and_then(|c| c.resource_version());
    if let Err(e) = ctx.writer.put_endpoint_slice(ns, &desired).await {
        tracing::debug!(namespace = ns, slice = %desired.name_any(), error = %e, "cannot write the holder's EndpointSlice");
    }
}

/// Whether `key` is not a lock but a Service whose route is to be removed.
pub(super) fn is_orphan(key: &LeaseKey) -> bool {
    key.name.starts_with("route/")
}

/// The route of `key` (see [`is_orphan`]) removed, if its Service routes no longer.
pub(super) async fn remove_orphan(ctx: &Context, key: &LeaseKey) {
    if let Some(svc) = key.name.strip_prefix("route/") {
        remove(ctx, &key.namespace, svc).await;
    }
}

/// Service `svc` routes no longer: its slice goes.
async fn remove(ctx: &Context, ns: &str, svc: &str) {
    let still = ctx
        .services
        .as_ref()
        .and_then(|s| s.get(&ObjectRef::new(svc).within(ns)));
    if still.is_some_and(|s| s.annotations().contains_key(ROUTE_ANNOTATION)) {
        return;
    }
    if let Err(e) = ctx.writer.delete_endpoint_slice(ns, &slice_name(svc)).await {
        if !e.is_status(404) {
            tracing::debug!(namespace = ns, service = svc, error = %e, "cannot delete a holder EndpointSlice");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, ContainerPort, PodCondition, PodSpec, PodStatus, ServiceSpec,
    };

    fn pod(name: &str, ip: Option<&str>, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                uid: Some(format!("uid-{name}")),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: 8080,
                        ..ContainerPort::default()
                    }]),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: ip.map(String::from),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    fn service() -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("ns".into()),
                uid: Some("svc-uid".into()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: Some(IntOrString::String("http".into())),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: None,
        }
    }

    #[test]
    fn a_holder_not_yet_a_ready_endpoint_is_looked_at_again_soon() {
        let up = pod("a", Some("10.244.0.7"), true);
        assert_eq!(look_again(1, std::slice::from_ref(&up)), REFRESH);
        assert_eq!(look_again(0, &[]), REFRESH, "no holder Pod to wait for");
        assert_eq!(look_again(1, &[]), AWAIT_HOLDER, "the Pod is not there yet");
        assert_eq!(
            look_again(1, &[pod("a", None, false)]),
            AWAIT_HOLDER,
            "no address"
        );
        assert_eq!(
            look_again(1, &[pod("a", Some("10.244.0.7"), false)]),
            AWAIT_HOLDER,
            "not Ready"
        );
        let mut leaving = up.clone();
        leaving.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
        );
        assert_eq!(look_again(1, &[leaving]), AWAIT_HOLDER, "terminating");
        assert_eq!(
            look_again(2, &[up.clone(), pod("b", None, false)]),
            AWAIT_HOLDER,
            "one of two holders waits"
        );
    }

    #[test]
    fn the_slice_lists_the_holders_with_an_address_and_the_services_ports() {
        let s = desired_slice(
            &service(),
            &[pod("a", Some("10.244.0.7"), true), pod("b", None, true)],
        );
        assert_eq!(s.metadata.name.as_deref(), Some("web-leasekeeper"));
        assert_eq!(s.endpoints.len(), 1, "a Pod without an address is left out");
        assert_eq!(s.endpoints[0].addresses, ["10.244.0.7"]);
        assert_eq!(
            s.endpoints[0].conditions.as_ref().and_then(|c| c.ready),
            Some(true)
        );
        let ports = s.ports.expect("ports");
        assert_eq!(
            (ports[0].name.as_deref(), ports[0].port),
            (Some("http"), Some(8080)),
            "a named target port is looked up"
        );
        let labels = s.metadata.labels.expect("labels");
        assert_eq!(labels[SERVICE_NAME_LABEL], "web");
        assert_eq!(labels[MANAGED_BY_LABEL], SLICE_MANAGER);
        let empty = desired_slice(&service(), &[]);
        assert!(empty.endpoints.is_empty(), "no holder, no endpoint");
    }
}
