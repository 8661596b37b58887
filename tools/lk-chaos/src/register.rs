//! The fenced register: a ConfigMap per Lease with the highest token accepted and an
//! append-only log. A write is a conditional update (resourceVersion) that is refused
//! when its token is below the stored one.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;

pub use testkit::checker::{LOG_KEY, MAX_KEY, REFUSED_KEY};

#[derive(Debug, PartialEq)]
pub enum Write {
    Accepted,
    Refused,
}

/// `fenced == false` is the negative control: write without checking the token.
pub async fn write(
    api: &Api<ConfigMap>,
    name: &str,
    token: i64,
    who: &str,
    fenced: bool,
) -> Option<Write> {
    for _ in 0..20 {
        let mut cm = match api.get_opt(name).await {
            Ok(Some(cm)) => cm,
            Ok(None) => {
                let _ = api.create(&PostParams::default(), &empty(name)).await;
                continue;
            }
            Err(_) => return None,
        };
        let result = apply(
            cm.data.get_or_insert_with(Default::default),
            token,
            who,
            fenced,
        );
        match api.replace(name, &PostParams::default(), &cm).await {
            Ok(_) => return Some(result),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(_) => return None,
        }
    }
    None
}

fn empty(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some([(MAX_KEY.to_string(), "0".to_string())].into()),
        ..ConfigMap::default()
    }
}

/// One write into the register's data: refused (and noted) when fenced and stale.
pub fn apply(data: &mut BTreeMap<String, String>, token: i64, who: &str, fenced: bool) -> Write {
    let max: i64 = data.get(MAX_KEY).and_then(|v| v.parse().ok()).unwrap_or(0);
    if fenced && token < max {
        let refused = data.entry(REFUSED_KEY.into()).or_default();
        refused.push_str(&format!("{token} {who} (max {max})\n"));
        return Write::Refused;
    }
    data.insert(MAX_KEY.into(), max.max(token).to_string());
    let log = data.entry(LOG_KEY.into()).or_default();
    log.push_str(&format!("{token} {who}\n"));
    Write::Accepted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fenced_write_below_the_highest_token_is_refused_and_noted() {
        let mut data = BTreeMap::new();
        assert_eq!(apply(&mut data, 10, "a", true), Write::Accepted);
        assert_eq!(apply(&mut data, 9, "b", true), Write::Refused);
        assert_eq!(apply(&mut data, 9, "b", false), Write::Accepted);
        assert_eq!(data[LOG_KEY], "10 a\n9 b\n");
        assert_eq!(data[REFUSED_KEY], "9 b (max 10)\n");
        assert_eq!(data[MAX_KEY], "10");
    }
}
