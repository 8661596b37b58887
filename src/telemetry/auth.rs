//! Protected metrics (`--metrics-auth rbac`): a scrape of `/metrics` must carry a bearer
//! token that the API server authenticates (TokenReview) and authorizes for `get` on
//! the non-resource URL `/metrics` (SubjectAccessReview), as kube-rbac-proxy and the
//! kubebuilder scaffold do. Verdicts are cached for a minute per token, so a scrape
//! every 30 s costs the API server two reviews a minute at most.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::PostParams;
use kube::{Api, Client};

/// What a scrape is answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The token's user may get /metrics: 200.
    Allowed,
    /// No bearer token, or one the API server does not authenticate: 401.
    Unauthenticated,
    /// An authenticated user RBAC does not allow: 403.
    Forbidden,
}

/// The path reviewed; the verb is `get`.
pub const METRICS_PATH: &str = "/metrics";
const CACHE_TTL: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 1024;

/// The bearer token of an `Authorization` header value, if it is one.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let (scheme, token) = header?.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Reviews scrapers' tokens with the API server.
pub struct Authorizer {
    client: Client,
    cache: Mutex<HashMap<String, (Verdict, Instant)>>,
}

impl Authorizer {
    /// An authorizer that asks the API server `client` talks to.
    pub fn new(client: Client) -> Authorizer {
        Authorizer {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The verdict on a request with this `Authorization` header. Err if the API server
    /// could not be asked (the scrape gets 503 and nothing is cached).
    pub async fn check(&self, header: Option<&str>) -> Result<Verdict, kube::Error> {
        let Some(token) = bearer(header) else {
            return Ok(Verdict::Unauthenticated);
        };
        if let Some(v) = self.cached(token) {
            return Ok(v);
        }
        let v = self.review(token).await?;
        self.remember(token, v);
        Ok(v)
    }

    fn cached(&self, token: &str) -> Option<Verdict> {
        let cache = self.cache.lock().ok()?;
        cache
            .get(token)
            .filter(|(_, at)| at.elapsed() < CACHE_TTL)
            .map(|(v, _)| *v)
    }

    fn remember(&self, token: &str, v: Verdict) {
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_MAX {
                cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(token.to_string(), (v, Instant::now()));
        }
    }

    async fn review(&self, token: &str) -> Result<Verdict, kube::Error> {
        let tr = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let pp = PostParams::default();
        let tr = Api::<TokenReview>::all(self.client.clone())
            .create(&pp, &tr)
            .await?;
        let status = tr.status.unwrap_or_default();
        let Some(user) = status.user.filter(|_| status.authenticated == Some(true)) else {
            return Ok(Verdict::Unauthenticated);
        };
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                uid: user.uid,
                groups: user.groups,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(METRICS_PATH.to_string()),
                    verb: Some("get".to_string()),
                }),
                resource_attributes: None,
            },
            ..SubjectAccessReview::default()
        };
        let sar = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&pp, &sar)
            .await?;
        Ok(if sar.status.is_some_and(|s| s.allowed) {
            Verdict::Allowed
        } else {
            Verdict::Forbidden
        })
    }
}

#[cfg(test)]
mod tests {
    use super::bearer;

    #[test]
    fn only_a_bearer_header_with_a_token_yields_one() {
        assert_eq!(bearer(Some("Bearer abc.def")), Some("abc.def"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic dXNlcjpwYXNz")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(Some("Bearer")), None);
        assert_eq!(bearer(None), None);
    }
}
