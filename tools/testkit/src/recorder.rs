//! The recorder: every LockClaim and Lease state the run's watches see, with the
//! recorder's own wall-clock time of each observation, and markers around re-lists.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use leasekeeper::api::{LockClaim, Phase};

/// What an observation is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Claim,
    Lease,
    /// A (re-)list of the claims starts / is complete.
    ClaimsInit,
    ClaimsInitDone,
    /// A (re-)list of the Leases starts / is complete.
    LeasesInit,
    LeasesInitDone,
}

/// One observed state.
#[derive(Clone, Debug)]
pub struct Obs {
    /// Part of a re-list (after a watch restart): a snapshot, not an event in time.
    pub init: bool,
    /// A claim's Granted condition reason.
    pub reason: Option<String>,
    pub kind: Kind,
    pub name: String,
    pub rv: u64,
    /// The Lease a claim holds or last held (status.lease; else the one it names); a
    /// Lease: its own name.
    pub lease: String,
    /// The lock: a claim's spec.leaseName; a Lease's lock (its name, without a
    /// `-slot-<i>` suffix).
    pub lock: String,
    pub phase: Option<Phase>,
    pub token: Option<i64>,
    /// A claim's identity; a Lease's holderIdentity.
    pub holder: Option<String>,
    pub deleted: bool,
    /// When the recorder saw it (wall clock: the same clock the holders and the
    /// operator use on this machine).
    pub wall: jiff::Timestamp,
    /// A Lease's renewTime and leaseDurationSeconds.
    pub renew: Option<jiff::Timestamp>,
    pub duration: Option<i32>,
    /// A claim's status.expireTime.
    pub expire: Option<jiff::Timestamp>,
}

impl Obs {
    /// An observation of `kind` with nothing else set.
    pub fn empty(kind: Kind) -> Obs {
        Obs {
            init: false,
            reason: None,
            kind,
            name: String::new(),
            rv: 0,
            lease: String::new(),
            lock: String::new(),
            phase: None,
            token: None,
            holder: None,
            deleted: false,
            wall: jiff::Timestamp::now(),
            renew: None,
            duration: None,
            expire: None,
        }
    }

    fn marker(kind: Kind) -> Obs {
        Obs {
            init: true,
            ..Obs::empty(kind)
        }
    }

    fn of_claim(c: &LockClaim, deleted: bool, init: bool) -> Obs {
        Obs {
            init,
            deleted,
            reason: c.condition("Granted").map(|x| x.reason.clone()),
            name: c.name_any(),
            rv: rv_of(c),
            lease: c
                .status
                .as_ref()
                .and_then(|s| s.lease.clone())
                .unwrap_or_else(|| c.spec.lease_name.clone()),
            lock: c.spec.lease_name.clone(),
            phase: c.phase(),
            token: c.status.as_ref().and_then(|s| s.fencing_token),
            holder: Some(c.identity()),
            expire: c
                .status
                .as_ref()
                .and_then(|s| s.expire_time.as_ref())
                .map(|t| t.0),
            ..Obs::empty(Kind::Claim)
        }
    }

    fn of_lease(l: &Lease, deleted: bool, init: bool) -> Obs {
        let spec = l.spec.as_ref();
        Obs {
            init,
            deleted,
            name: l.name_any(),
            rv: rv_of(l),
            lease: l.name_any(),
            lock: leasekeeper::api::parse_slot_lease(&l.name_any())
                .map_or_else(|| l.name_any(), |(lock, _)| lock.to_string()),
            holder: spec
                .and_then(|s| s.holder_identity.clone())
                .filter(|h| !h.is_empty()),
            renew: spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0),
            duration: spec.and_then(|s| s.lease_duration_seconds),
            ..Obs::empty(Kind::Lease)
        }
    }
}

pub type History = Arc<Mutex<Vec<Obs>>>;

fn rv_of(o: &impl kube::Resource) -> u64 {
    o.resource_version()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Records every event of one watch into `history`, with markers around each (re-)list.
async fn watch_into<K>(
    api: Api<K>,
    history: History,
    markers: [Kind; 2],
    to_obs: impl Fn(&K, bool, bool) -> Obs,
) where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .for_each(|ev| {
            let obs = match ev {
                Ok(watcher::Event::Apply(o)) => to_obs(&o, false, false),
                Ok(watcher::Event::InitApply(o)) => to_obs(&o, false, true),
                Ok(watcher::Event::Delete(o)) => to_obs(&o, true, false),
                Ok(watcher::Event::Init) => Obs::marker(markers[0]),
                Ok(watcher::Event::InitDone) => Obs::marker(markers[1]),
                Err(_) => return futures::future::ready(()),
            };
            history.lock().expect("lock").push(obs);
            futures::future::ready(())
        })
        .await;
}

/// Records claims and Leases in `ns` until dropped.
pub async fn record(client: Client, ns: String, history: History) {
    let claims = watch_into(
        Api::<LockClaim>::namespaced(client.clone(), &ns),
        history.clone(),
        [Kind::ClaimsInit, Kind::ClaimsInitDone],
        Obs::of_claim,
    );
    let leases = watch_into(
        Api::<Lease>::namespaced(client, &ns),
        history,
        [Kind::LeasesInit, Kind::LeasesInitDone],
        Obs::of_lease,
    );
    tokio::join!(claims, leases);
}
