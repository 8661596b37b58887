//! A claim made by `leasekeeper::client` inside a Pod (`POD_NAME`, `POD_UID` set) is
//! owned by that Pod: when the Pod is deleted, Kubernetes' garbage collector deletes the
//! claim and the operator hands the Lease to the next claimant. The local plane runs no
//! kube-controller-manager, so this test starts one with only its garbage collector.
//!
//! One test in its own binary: it sets `POD_NAME`/`POD_UID` in the process environment
//! before any thread starts, as a Pod's downward API would.

use testkit as support;

use std::time::Duration;

use kube::Api;
use leasekeeper::api::{LockClaim, Phase};
use leasekeeper::client::{AcquireOptions, LockClient};
use support::{create_claim, spec, wait_phase, Operator};

#[test]
fn a_pod_owned_claim_goes_with_its_pod_and_the_next_claimant_is_granted() {
    // Before any runtime thread exists: a namespace and a Pod (it stays Pending: no
    // scheduler), created with kubectl, and the Pod's identity in the environment.
    let ns = format!("podgc-{}", std::process::id());
    let (ok, _, err) = support::kubectl_run(&["create", "namespace", &ns]);
    assert!(ok, "{err}");
    let (ok, _, err) = support::kubectl_run(&[
        "run",
        "worker",
        "-n",
        &ns,
        "--image=busybox",
        "--restart=Never",
    ]);
    assert!(ok, "{err}");
    let (ok, uid, err) = support::kubectl_run(&[
        "get",
        "pod",
        "worker",
        "-n",
        &ns,
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    assert!(ok && !uid.is_empty(), "{err}");
    std::env::set_var("POD_NAME", "worker");
    std::env::set_var("POD_UID", &uid);
    let _gc = support::GarbageCollector::start();

    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let client = support::client().await;
            let _op = Operator::start(&client, &ns, Duration::from_secs(300)).await;
            let locks = LockClient::new(client.clone(), &ns);
            let guard = locks
                .acquire("batch", AcquireOptions::default())
                .await
                .expect("acquire");
            let api: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
            let owned = api.get(guard.claim_name()).await.expect("the claim");
            let owner = owned.metadata.owner_references.clone().unwrap_or_default();
            assert!(
                owner.len() == 1
                    && owner[0].kind == "Pod"
                    && owner[0].name == "worker"
                    && owner[0].uid == uid,
                "owned by the Pod: {owner:?}"
            );
            create_claim(&api, "next", spec("batch")).await;
            wait_phase(&api, "next", Phase::Pending, Duration::from_secs(20)).await;

            let (ok, _, err) =
                support::kubectl_run(&["delete", "pod", "worker", "-n", &ns, "--wait=false"]);
            assert!(ok, "{err}");
            // The garbage collector deletes the claim; the operator releases the Lease.
            wait_phase(&api, "next", Phase::Granted, Duration::from_secs(60)).await;
            // Deleted by the garbage collector (claims carry no finalizer).
            let deleted = owned.metadata.uid.clone().unwrap_or_default();
            let gone = kube::runtime::wait::await_condition(
                api.clone(),
                guard.claim_name(),
                kube::runtime::wait::conditions::is_deleted(&deleted),
            );
            tokio::time::timeout(Duration::from_secs(20), gone)
                .await
                .expect("the Pod's claim is deleted")
                .expect("watch");
            let reason = tokio::time::timeout(Duration::from_secs(10), guard.lost())
                .await
                .expect("the holder learns it lost the lock");
            assert!(reason.granted_elsewhere(), "{reason:?}");
        });
}
