//! `kubectl lock fence NAME --resource configmaps[,deployments.apps]`: write (or print)
//! the ValidatingAdmissionPolicy and binding that make the API server refuse stale
//! writes to objects labelled `leasekeeper.io/fenced-by: NAME` in this namespace
//! (`leasekeeper::fence`); `--delete` removes them.

use std::process::ExitCode;

use clap::{Args, ValueEnum};
use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client};
use leasekeeper::fence::{policy, policy_name, GuardedResource};

use crate::fail;

/// The field manager of what `fence` writes.
const MANAGER: &str = "kubectl-lock";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DryRun {
    /// Print, write nothing.
    Client,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FenceOutput {
    Yaml,
    Json,
}

#[derive(Args, Debug)]
pub struct FenceArgs {
    /// The lock whose fencing tokens guard the objects (their label
    /// leasekeeper.io/fenced-by).
    name: String,
    /// The resources to guard: plural names, with the API group after a dot for other
    /// groups (configmaps,deployments.apps). Repeat or separate with commas.
    #[arg(
        long = "resource",
        value_delimiter = ',',
        required_unless_present = "delete"
    )]
    resources: Vec<String>,
    /// Remove the policy and binding instead.
    #[arg(long, conflicts_with = "resources")]
    delete: bool,
    /// With `client`: print what would be written, write nothing.
    #[arg(long = "dry-run", value_enum)]
    dry_run: Option<DryRun>,
    /// Output format of --dry-run.
    #[arg(short = 'o', long, value_enum, default_value = "yaml")]
    output: FenceOutput,
}

pub async fn fence(client: Client, ns: &str, a: FenceArgs) -> ExitCode {
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client);
    if a.delete {
        return remove(&policies, &bindings, ns, &a.name).await;
    }
    let resources: Result<Vec<GuardedResource>, _> =
        a.resources.iter().map(|r| r.parse()).collect();
    let (p, b) = match resources.and_then(|r| policy(ns, &a.name, &r)) {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    if a.dry_run.is_some() {
        return print(a.output, &p, &b);
    }
    let name = p.metadata.name.clone().unwrap_or_default();
    let pp = PatchParams::apply(MANAGER).force();
    if let Err(e) = policies.patch(&name, &pp, &Patch::Apply(typed(&p))).await {
        return fail(format!(
            "cannot write ValidatingAdmissionPolicy {name}: {e}"
        ));
    }
    if let Err(e) = bindings.patch(&name, &pp, &Patch::Apply(typed(&b))).await {
        return fail(format!(
            "cannot write ValidatingAdmissionPolicyBinding {name}: {e}"
        ));
    }
    println!(
        "objects of {} labelled leasekeeper.io/fenced-by={} in namespace {ns} are guarded (policy {name})",
        a.resources.join(","),
        a.name
    );
    ExitCode::SUCCESS
}

/// An object with its apiVersion and kind, as server-side apply wants it.
fn typed<K: kube::Resource<DynamicType = ()> + serde::Serialize>(o: &K) -> serde_json::Value {
    let mut v = serde_json::to_value(o).unwrap_or_default();
    v["apiVersion"] = K::api_version(&()).into();
    v["kind"] = K::kind(&()).into();
    v
}

fn print(
    o: FenceOutput,
    p: &ValidatingAdmissionPolicy,
    b: &ValidatingAdmissionPolicyBinding,
) -> ExitCode {
    let docs = [typed(p), typed(b)];
    let text = match o {
        FenceOutput::Json => serde_json::to_string_pretty(&serde_json::json!({
            "apiVersion": "v1", "kind": "List", "items": docs,
        }))
        .map_err(|e| e.to_string()),
        FenceOutput::Yaml => serde_saphyr::to_string_multiple(&docs).map_err(|e| e.to_string()),
    };
    match text {
        Ok(t) => {
            println!("{}", t.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

async fn remove(
    policies: &Api<ValidatingAdmissionPolicy>,
    bindings: &Api<ValidatingAdmissionPolicyBinding>,
    ns: &str,
    lock: &str,
) -> ExitCode {
    let name = match policy_name(ns, lock) {
        Ok(n) => n,
        Err(e) => return fail(e),
    };
    let dp = DeleteParams::default();
    for r in [
        bindings.delete(&name, &dp).await.map(|_| ()),
        policies.delete(&name, &dp).await.map(|_| ()),
    ] {
        match r {
            Ok(()) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return fail(format!("cannot remove the fence of {lock}: {e}")),
        }
    }
    println!("the fence of lock {lock} in namespace {ns} is removed (policy {name})");
    ExitCode::SUCCESS
}
