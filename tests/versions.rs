//! What differs by API server configuration: `Lease.spec.strategy` exists only where
//! coordinated leader election is on (the API server drops the field otherwise), so
//! this test brings up a control plane of its own with that feature gate.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use kube::Api;
use leasekeeper::api::{LockClaim, CONDITION_GRANTED};
use leasekeeper::api::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use support::{create_claim, spec, Operator};
use testkit as support;

const STRATEGY: &str = "OldestEmulationVersion";

/// A control plane in `target/<name>` with extra kube-apiserver flags; stopped on drop.
struct Plane {
    dir: PathBuf,
}

impl Plane {
    fn up(name: &str, apiserver_args: &str) -> Plane {
        let dir = support::root().join("target").join(name);
        let st = Command::new(support::root().join("hack/control-plane.sh"))
            .arg("up")
            .arg(&dir)
            .env("LK_APISERVER_EXTRA_ARGS", apiserver_args)
            .status()
            .expect("control-plane.sh runs");
        assert!(st.success(), "control plane {name} starts");
        Plane { dir }
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        let _ = Command::new(support::root().join("hack/control-plane.sh"))
            .arg("down")
            .arg(&self.dir)
            .status();
    }
}

fn coordinated_lease(name: &str) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(name.into()),
            // Even with leasekeeper's own label: the strategy wins.
            labels: Some([(MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            strategy: Some(STRATEGY.into()),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_01_a_lease_run_by_coordinated_leader_election_is_never_written_or_collected() {
    let plane = Plane::up(
        "versions-cle-plane",
        "--feature-gates=CoordinatedLeaderElection=true --runtime-config=coordination.k8s.io/v1beta1=true",
    );
    let client = support::client_for(&plane.dir.join("kubeconfig")).await;
    support::install_crd(client.clone(), "e2e-versions", Duration::from_secs(60)).await;
    let ns = support::namespace(&client, "cle").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let created = leases
        .create(&PostParams::default(), &coordinated_lease("elected"))
        .await
        .expect("Lease created");
    assert_eq!(
        created.spec.as_ref().and_then(|s| s.strategy.as_deref()),
        Some(STRATEGY),
        "with the gate on, the API server keeps spec.strategy"
    );
    let rv = created.metadata.resource_version.clone();

    let gc = Duration::from_millis(500);
    let op = Operator::start(&client, &ns, gc).await;
    let claims: Api<LockClaim> = Api::namespaced(client.clone(), &ns);
    create_claim(&claims, "want", spec("elected")).await;
    let c = support::wait_for(
        &claims,
        "want",
        Duration::from_secs(30),
        "waiting with reason LeaseNotManaged",
        |c| {
            c.condition(CONDITION_GRANTED)
                .is_some_and(|x| x.reason == "LeaseNotManaged")
        },
    )
    .await;
    let msg = c
        .condition(CONDITION_GRANTED)
        .map(|x| x.message.clone())
        .unwrap_or_default();
    assert!(
        msg.contains("coordinated leader election") && msg.contains(STRATEGY),
        "{msg}"
    );
    claims
        .delete("want", &DeleteParams::default())
        .await
        .expect("claim deleted");
    support::wait_gone(&claims, "want", Duration::from_secs(10)).await;
    // Several GC graces with no live claim: an unused Lease of ours would be collected.
    tokio::time::sleep(gc * 8).await;
    let after = leases
        .get_opt("elected")
        .await
        .expect("read")
        .expect("never collected");
    assert_eq!(after.metadata.resource_version, rv, "never written");
    op.stop().await;
}
