//! The one doorway for the operator's API writes. Every write the controller makes
//! (Lease create, patch and delete; claim status, metadata and delete; Lock status;
//! Events) is a method here, and each method does the same three things around the
//! request:
//!
//! 1. the leadership term: refused once the term has ended, and abandoned if the API
//!    server has not answered when it ends (so no write lands after a successor leads);
//! 2. the count: `leasekeeper_api_writes_total{kind}` by [`WriteKind`];
//! 3. the record: the chaos build logs each write with the resourceVersion it produced,
//!    for the checker to order against the leadership Lease (a no-op otherwise).
//!
//! Reads do not come through here. A unit test scans `src/` for API write calls outside
//! this file and fails on any it finds (the leadership Lease of [`crate::leader`] and the
//! metrics server's token reviews are the only exceptions, each for its stated reason).

use std::future::Future;
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{Event, Recorder, Reporter};
use kube::{Api, Client, ResourceExt};
use serde_json::Value;

use super::chaos;
use crate::api::{Lock, LockClaim, LockClaimStatus, LockStatus, GROUP, MANAGER, VERSION};
use crate::leader::Term;
use crate::telemetry::{Metrics, WriteKind};

/// Why a write was not made.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The leadership term had ended (or ended while the request waited).
    #[error("the leadership term has ended")]
    TermEnded,
    /// The API server refused it.
    #[error(transparent)]
    Api(#[from] kube::Error),
}

impl WriteError {
    /// Whether the API server answered with this HTTP status code.
    pub fn is_status(&self, code: u16) -> bool {
        matches!(self, WriteError::Api(kube::Error::Api(s)) if s.code == code)
    }
}

/// The writer: the client, the term writes are made under, and the counters.
#[derive(Clone)]
pub struct Writer {
    client: Client,
    term: Term,
    metrics: Arc<Metrics>,
    /// This replica's identity (recorded with each write in the chaos build).
    identity: Option<String>,
}

impl Writer {
    /// A writer for `client` that writes only while `term` is current.
    pub fn new(
        client: Client,
        term: Term,
        metrics: Arc<Metrics>,
        identity: Option<String>,
    ) -> Writer {
        Writer {
            client,
            term,
            metrics,
            identity,
        }
    }

    /// Whether a write started now would be made.
    pub fn in_term(&self) -> bool {
        self.term.is_current()
    }

    /// Creates a Lease (no precondition: it must not exist).
    pub async fn create_lease(&self, ns: &str, lease: &Lease) -> Result<Lease, WriteError> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), ns);
        let req = async {
            match api.create(&PostParams::default(), lease).await {
                Err(e) if is_conflict(&e) => chaos::create_over_existing(&api, lease)
                    .await
                    .unwrap_or(Err(e)),
                other => other,
            }
        };
        self.write(WriteKind::LeaseCreate, ns, req).await
    }

    /// A JSON merge patch of a Lease (the patch carries its resourceVersion precondition).
    pub async fn patch_lease(
        &self,
        kind: WriteKind,
        ns: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Lease, WriteError> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), ns);
        let req = async {
            api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
        };
        self.write(kind, ns, req).await
    }

    /// Deletes a Lease if it is still at `resource_version`.
    pub async fn delete_lease(
        &self,
        ns: &str,
        name: &str,
        resource_version: &str,
    ) -> Result<(), WriteError> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), ns);
        let dp = precondition(Some(resource_version.to_string()));
        let req = async { api.delete(name, &dp).await.map(|_| Deleted) };
        self.write(WriteKind::LeaseDelete, ns, req)
            .await
            .map(|_| ())
    }

    /// Server-side applies a claim's whole status if the claim is still at
    /// `resource_version` (the operator's field manager owns the whole status, so a
    /// partial apply would drop the rest).
    pub async fn claim_status(
        &self,
        ns: &str,
        name: &str,
        resource_version: Option<&str>,
        status: &LockClaimStatus,
    ) -> Result<LockClaim, WriteError> {
        let api: Api<LockClaim> = Api::namespaced(self.client.clone(), ns);
        let body = status_apply("LockClaim", name, resource_version, status);
        let pp = PatchParams::apply(MANAGER).force();
        let req = async { api.patch_status(name, &pp, &Patch::Apply(&body)).await };
        self.write(WriteKind::ClaimStatus, ns, req).await
    }

    /// Clears a claim's status (one that cannot be decoded), if the claim is still at
    /// `resource_version`.
    pub async fn clear_claim_status(
        &self,
        ns: &str,
        name: &str,
        resource_version: Option<&str>,
    ) -> Result<LockClaim, WriteError> {
        let api: Api<LockClaim> = Api::namespaced(self.client.clone(), ns);
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": resource_version},
            "status": null,
        });
        let req = async {
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        };
        self.write(WriteKind::ClaimStatusClear, ns, req).await
    }

    /// A JSON merge patch of a claim's metadata (its finalizers).
    pub async fn claim_metadata(
        &self,
        ns: &str,
        name: &str,
        patch: &Value,
    ) -> Result<LockClaim, WriteError> {
        let api: Api<LockClaim> = Api::namespaced(self.client.clone(), ns);
        let req = async {
            api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
        };
        self.write(WriteKind::ClaimFinalizer, ns, req).await
    }

    /// Creates a claim (the claim of a Pod that asks for a lock).
    pub async fn create_claim(&self, ns: &str, claim: &LockClaim) -> Result<LockClaim, WriteError> {
        let api: Api<LockClaim> = Api::namespaced(self.client.clone(), ns);
        let req = async { api.create(&PostParams::default(), claim).await };
        self.write(WriteKind::ClaimCreate, ns, req).await
    }

    /// A strategic merge patch of a Pod (the patch carries its resourceVersion
    /// precondition): the opening of a Pod granted its lock.
    pub async fn patch_pod(&self, ns: &str, name: &str, patch: &Value) -> Result<Pod, WriteError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let req = async {
            api.patch(name, &PatchParams::default(), &Patch::Strategic(patch))
                .await
        };
        self.write(WriteKind::PodOpen, ns, req).await
    }

    /// Creates an EndpointSlice, or replaces it if `slice` carries the resourceVersion
    /// it was read at (the precondition).
    pub async fn put_endpoint_slice(
        &self,
        ns: &str,
        slice: &EndpointSlice,
    ) -> Result<EndpointSlice, WriteError> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), ns);
        let name = slice.metadata.name.clone().unwrap_or_default();
        let req = async {
            match slice.metadata.resource_version {
                Some(_) => api.replace(&name, &PostParams::default(), slice).await,
                None => api.create(&PostParams::default(), slice).await,
            }
        };
        self.write(WriteKind::EndpointSlice, ns, req).await
    }

    /// Deletes an EndpointSlice.
    pub async fn delete_endpoint_slice(&self, ns: &str, name: &str) -> Result<(), WriteError> {
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), ns);
        let req = async {
            api.delete(name, &DeleteParams::default())
                .await
                .map(|_| Deleted)
        };
        self.write(WriteKind::EndpointSlice, ns, req)
            .await
            .map(|_| ())
    }

    /// Deletes a claim if it is still at `resource_version`.
    pub async fn delete_claim(
        &self,
        ns: &str,
        name: &str,
        resource_version: Option<String>,
    ) -> Result<(), WriteError> {
        let api: Api<LockClaim> = Api::namespaced(self.client.clone(), ns);
        let dp = precondition(resource_version);
        let req = async { api.delete(name, &dp).await.map(|_| Deleted) };
        self.write(WriteKind::ClaimDelete, ns, req)
            .await
            .map(|_| ())
    }

    /// Server-side applies a Lock's status.
    pub async fn lock_status(
        &self,
        ns: &str,
        name: &str,
        status: &LockStatus,
    ) -> Result<Lock, WriteError> {
        let api: Api<Lock> = Api::namespaced(self.client.clone(), ns);
        let body = status_apply("Lock", name, None, status);
        let pp = PatchParams::apply(MANAGER).force();
        let req = async { api.patch_status(name, &pp, &Patch::Apply(&body)).await };
        self.write(WriteKind::LockStatus, ns, req).await
    }

    /// Publishes an Event about `reference`, as `reporter`.
    pub async fn event(
        &self,
        reporter: &Reporter,
        event: &Event,
        reference: &ObjectReference,
    ) -> Result<(), WriteError> {
        let ns = reference.namespace.clone().unwrap_or_default();
        // A fresh Recorder per Event: kube's Recorder keeps every Event it published for
        // six minutes (to count repeats) and scans that cache on each publish. Ours never
        // repeat (each marks one transition of one claim), so the cache would only grow.
        let recorder = Recorder::new(self.client.clone(), reporter.clone());
        let req = async { recorder.publish(event, reference).await.map(|()| Deleted) };
        self.write(WriteKind::Event, &ns, req).await.map(|_| ())
    }

    /// The doorway proper: the term, the request, the count, the record.
    async fn write<T, F>(&self, kind: WriteKind, ns: &str, req: F) -> Result<T, WriteError>
    where
        T: Produced,
        F: Future<Output = Result<T, kube::Error>>,
    {
        let obj = if chaos::ignores_term() {
            req.await?
        } else {
            if !self.term.is_current() {
                return Err(WriteError::TermEnded);
            }
            self.term.within(req).await.ok_or(WriteError::TermEnded)??
        };
        self.metrics.write(kind);
        chaos::wrote(
            self.identity.as_deref(),
            kind,
            ns,
            obj.resource_version().as_deref(),
        );
        Ok(obj)
    }
}

/// What a write returns, and the resourceVersion it produced (if it says).
trait Produced {
    fn resource_version(&self) -> Option<String>;
}

impl Produced for Lease {
    fn resource_version(&self) -> Option<String> {
        ResourceExt::resource_version(self)
    }
}

impl Produced for LockClaim {
    fn resource_version(&self) -> Option<String> {
        ResourceExt::resource_version(self)
    }
}

impl Produced for EndpointSlice {
    fn resource_version(&self) -> Option<String> {
        ResourceExt::resource_version(self)
    }
}

impl Produced for Pod {
    fn resource_version(&self) -> Option<String> {
        ResourceExt::resource_version(self)
    }
}

impl Produced for Lock {
    fn resource_version(&self) -> Option<String> {
        ResourceExt::resource_version(self)
    }
}

/// A delete or an Event: no object to order the write by.
struct Deleted;

impl Produced for Deleted {
    fn resource_version(&self) -> Option<String> {
        None
    }
}

/// The body of a server-side apply of `status` to our `kind` named `name`, with the
/// resourceVersion as precondition when given.
fn status_apply(
    kind: &str,
    name: &str,
    resource_version: Option<&str>,
    status: &impl serde::Serialize,
) -> Value {
    let mut metadata = serde_json::json!({ "name": name });
    if let Some(rv) = resource_version {
        metadata["resourceVersion"] = rv.into();
    }
    serde_json::json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": kind,
        "metadata": metadata,
        "status": status,
    })
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn precondition(resource_version: Option<String>) -> DeleteParams {
    DeleteParams {
        preconditions: Some(Preconditions {
            resource_version,
            uid: None,
        }),
        ..DeleteParams::default()
    }
}
