//! Proof that leasekeeper created a Lease, for garbage collection. A label or an
//! annotation is no proof: anyone who may update a Lease can write them, and deleting
//! on them would let a user who may update but not delete a Lease have it deleted. So
//! right after it creates a Lease, the operator stamps it with
//! `leasekeeper.io/origin: HMAC-SHA256(key, "lease-origin/" + uid)`, with a key only the
//! operator holds (a Secret in its own namespace). The uid names one incarnation of the
//! object, so a proof copied onto another Lease (even one of the same name, created
//! later) proves nothing. Only a Lease whose proof checks out is ever deleted.
//!
//! The key is made by the first replica that finds none (32 random bytes) and read by
//! every other; it is made once, at start, before any leadership term, which is why its
//! Secret is written here and not through the writer (`tests/structure.rs` says so).

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::api::ORIGIN_ANNOTATION;

/// The key's entry in its Secret.
const KEY_ENTRY: &str = "key";

/// Why the key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ProofKeyError {
    /// Reading or creating the Secret failed.
    #[error("cannot read or create the proof key Secret {namespace}/{name} (the operator needs get and create on it in its own namespace): {source}")]
    Api {
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The Secret exists but holds no usable key.
    #[error("the proof key Secret {namespace}/{name} has no '{KEY_ENTRY}' of at least 32 bytes; delete it and the operator makes a new one (Leases stamped with the old key are then never collected)")]
    Unusable {
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
    },
    /// The system's random source failed.
    #[error("no randomness for a new proof key")]
    Random,
}

/// The operator's proof key.
#[derive(Clone)]
pub struct ProofKey(hmac::Key);

impl std::fmt::Debug for ProofKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProofKey(..)")
    }
}

impl ProofKey {
    /// A key from raw bytes (tests; the operator loads it with [`ProofKey::load`]).
    pub fn from_bytes(bytes: &[u8]) -> ProofKey {
        ProofKey(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// Reads the key from Secret `namespace/name`, making it first if it is absent.
    pub async fn load(
        client: Client,
        namespace: &str,
        name: &str,
    ) -> Result<ProofKey, ProofKeyError> {
        let api: Api<Secret> = Api::namespaced(client, namespace);
        let failed = |source| ProofKeyError::Api {
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        };
        let secret = match api.get_opt(name).await.map_err(failed)? {
            Some(s) => s,
            None => match api.create(&PostParams::default(), &new_secret(name)?).await {
                Ok(s) => s,
                // Another replica made it first: use theirs.
                Err(kube::Error::Api(e)) if e.code == 409 => api.get(name).await.map_err(failed)?,
                Err(e) => return Err(failed(e)),
            },
        };
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(KEY_ENTRY))
            .filter(|k| k.0.len() >= 32)
            .map(|k| ProofKey::from_bytes(&k.0))
            .ok_or_else(|| ProofKeyError::Unusable {
                namespace: namespace.to_string(),
                name: name.to_string(),
            })
    }

    /// The proof for the Lease with this uid.
    pub fn proof(&self, uid: &str) -> String {
        let tag = hmac::sign(&self.0, format!("lease-origin/{uid}").as_bytes());
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether `lease` carries a valid proof of its creation by this operator.
    pub fn proves(&self, lease: &Lease) -> bool {
        let (Some(uid), Some(claimed)) = (
            lease.uid(),
            lease.annotations().get(ORIGIN_ANNOTATION).cloned(),
        ) else {
            return false;
        };
        let Some(tag) = hex(&claimed) else {
            return false;
        };
        hmac::verify(&self.0, format!("lease-origin/{uid}").as_bytes(), &tag).is_ok()
    }
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn new_secret(name: &str) -> Result<Secret, ProofKeyError> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| ProofKeyError::Random)?;
    let mut s = Secret::default();
    s.metadata.name = Some(name.to_string());
    s.metadata.labels = Some(
        [(
            crate::api::MANAGED_BY_LABEL.to_string(),
            crate::api::MANAGED_BY_VALUE.to_string(),
        )]
        .into(),
    );
    s.data = Some([(KEY_ENTRY.to_string(), ByteString(bytes.to_vec()))].into());
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(uid: &str, origin: Option<String>) -> Lease {
        let mut l = Lease::default();
        l.metadata.uid = Some(uid.into());
        l.metadata.annotations = origin.map(|o| [(ORIGIN_ANNOTATION.to_string(), o)].into());
        l
    }

    #[test]
    fn only_the_proof_for_this_uid_under_this_key_proves_creation() {
        let key = ProofKey::from_bytes(&[7; 32]);
        let other = ProofKey::from_bytes(&[8; 32]);
        let proof = key.proof("uid-1");
        assert!(key.proves(&lease("uid-1", Some(proof.clone()))));
        assert!(
            !key.proves(&lease("uid-2", Some(proof.clone()))),
            "a proof copied onto another Lease proves nothing"
        );
        assert!(!other.proves(&lease("uid-1", Some(proof))), "another key's");
        assert!(!key.proves(&lease("uid-1", None)), "no proof");
        assert!(!key.proves(&lease("uid-1", Some("zz".into()))), "not hex");
        assert!(!key.proves(&lease("uid-1", Some(String::new()))), "empty");
    }
}
