//! Fencing enforced by the API server. An object labelled `leasekeeper.io/fenced-by: L`
//! is guarded by lock L: a ValidatingAdmissionPolicy refuses a write to it that does
//! not carry the annotation `leasekeeper.io/fencing-token`, and an update whose token is
//! lower than the stored object's (Kleppmann's rule: the storage remembers the highest
//! token it has seen). Removing the label or the annotation is refused the same way.
//! The API server evaluates the policy against the object it actually updates, for any
//! client; nothing of leasekeeper's is in the request path.
//!
//! Tokens are unbounded decimals (fencing tokens are resourceVersions, opaque decimal
//! strings that may outgrow 64 bits): they compare by length, then digit by digit, in
//! CEL as in [`token_at_least`]. A token is 1 to [`MAX_TOKEN_DIGITS`] digits without a
//! leading zero (or `0`).
//!
//! [`policy`] builds the policy and binding for one lock in one namespace (what `kubectl
//! lock fence` writes); the chart's `fencing.resources` installs the same rules for every
//! lock at once (`charts/leasekeeper/templates/fencing-policy.yaml`; a test checks that
//! both say the same).

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::{
    MatchResources, NamedRuleWithOperations, ValidatingAdmissionPolicy,
    ValidatingAdmissionPolicyBinding, ValidatingAdmissionPolicyBindingSpec,
    ValidatingAdmissionPolicySpec, Validation, Variable,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use crate::api::{FENCED_BY_LABEL, FENCING_TOKEN_ANNOTATION};

/// The most digits a fencing token may have (etcd's revisions are 64-bit: 19 digits).
pub const MAX_TOKEN_DIGITS: usize = 40;

/// Why a fence cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// A `--resource` that is not `plural` or `plural.group`.
    #[error("resource {0:?}: give the plural, and the API group after a dot for other groups (configmaps, deployments.apps)")]
    Resource(String),
    /// The policy's name would be too long.
    #[error(
        "the policy name {0:?} is longer than 253 characters: use a shorter lock or namespace name"
    )]
    Name(String),
}

/// Whether `token` is a well-formed fencing token.
pub fn valid_token(token: &str) -> bool {
    let digits = token.bytes().all(|b| b.is_ascii_digit());
    digits
        && !token.is_empty()
        && token.len() <= MAX_TOKEN_DIGITS
        && (token == "0" || !token.starts_with('0'))
}

/// Whether token `new` is at least `old`, as unbounded decimals (both well-formed).
pub fn token_at_least(new: &str, old: &str) -> bool {
    new.len() > old.len() || (new.len() == old.len() && new >= old)
}

/// A resource the policy guards: `configmaps`, or `deployments.apps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardedResource {
    /// The API group ("" for the core group).
    pub group: String,
    /// The plural resource name.
    pub resource: String,
}

impl std::str::FromStr for GuardedResource {
    type Err = FenceError;
    fn from_str(s: &str) -> Result<Self, FenceError> {
        let (resource, group) = s.split_once('.').unwrap_or((s, ""));
        let ok = |x: &str| {
            !x.is_empty()
                && x.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        let group_ok = if s.contains('.') {
            group.split('.').all(ok)
        } else {
            group.is_empty()
        };
        if !ok(resource) || !group_ok {
            return Err(FenceError::Resource(s.to_string()));
        }
        Ok(GuardedResource {
            group: group.to_string(),
            resource: resource.to_string(),
        })
    }
}

/// The CEL variables of the policy: each object's token (well-formed, else empty) and
/// the lock that guards it.
fn variables() -> Vec<Variable> {
    let token = |o: &str| {
        format!(
            "{o} != null && has({o}.metadata.annotations) && '{a}' in {o}.metadata.annotations && {o}.metadata.annotations['{a}'].matches('{re}') ? {o}.metadata.annotations['{a}'] : ''",
            a = FENCING_TOKEN_ANNOTATION,
            re = TOKEN_PATTERN,
        )
    };
    let raw = |o: &str| {
        format!(
            "{o} != null && has({o}.metadata.annotations) && '{a}' in {o}.metadata.annotations ? {o}.metadata.annotations['{a}'] : ''",
            a = FENCING_TOKEN_ANNOTATION,
        )
    };
    let lock = |o: &str| {
        format!(
            "{o} != null && has({o}.metadata.labels) && '{l}' in {o}.metadata.labels ? {o}.metadata.labels['{l}'] : ''",
            l = FENCED_BY_LABEL,
        )
    };
    [
        ("newToken", token("object")),
        ("newRaw", raw("object")),
        ("oldToken", token("oldObject")),
        ("oldLock", lock("oldObject")),
        ("newLock", lock("object")),
        (
            "lock",
            "variables.oldLock != '' ? variables.oldLock : variables.newLock".into(),
        ),
    ]
    .into_iter()
    .map(|(name, expression)| Variable {
        name: name.into(),
        expression,
    })
    .collect()
}

/// A token in CEL's RE2: 0, or 1 to 40 digits without a leading zero.
const TOKEN_PATTERN: &str = "^(0|[1-9][0-9]{0,39})$";

/// The two rules: a write carries a well-formed token; an update's token is at least
/// the stored object's.
fn validations() -> Vec<Validation> {
    vec![
        Validation {
            expression: "variables.newToken != ''".into(),
            message_expression: Some(format!(
                "'denied: object is guarded by lock ' + variables.lock + '; a write must carry the annotation {FENCING_TOKEN_ANNOTATION} with the fencing token of the lock\\'s holder (a decimal number of at most {MAX_TOKEN_DIGITS} digits), not ' + (variables.newRaw == '' ? 'none' : '\"' + (size(variables.newRaw) > 60 ? variables.newRaw.substring(0, 60) + '...' : variables.newRaw) + '\"')"
            )),
            reason: Some("Forbidden".into()),
            ..Validation::default()
        },
        Validation {
            expression: "variables.oldToken == '' || size(variables.newToken) > size(variables.oldToken) || (size(variables.newToken) == size(variables.oldToken) && variables.newToken >= variables.oldToken)".into(),
            message_expression: Some("'denied: object is guarded by lock ' + variables.lock + '; its fencing token ' + variables.oldToken + ' is newer than this write\\'s ' + variables.newToken + ' (a holder that lost the lock is writing)'".into()),
            reason: Some("Forbidden".into()),
            ..Validation::default()
        },
    ]
}

/// The name of the policy (and binding) guarding lock `lock` of namespace `ns`.
pub fn policy_name(ns: &str, lock: &str) -> Result<String, FenceError> {
    let name = format!("leasekeeper-fence-{ns}.{lock}");
    if name.len() > 253 {
        return Err(FenceError::Name(name));
    }
    Ok(name)
}

fn meta(name: &str, ns: &str, lock: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        labels: Some(BTreeMap::from([
            (
                "app.kubernetes.io/managed-by".to_string(),
                "kubectl-lock".to_string(),
            ),
            ("leasekeeper.io/fence-namespace".to_string(), ns.to_string()),
        ])),
        annotations: Some(BTreeMap::from([(
            FENCED_BY_LABEL.to_string(),
            lock.to_string(),
        )])),
        ..ObjectMeta::default()
    }
}

/// The policy that guards objects of `resources` labelled `leasekeeper.io/fenced-by:
/// lock`, and its binding limited to namespace `ns`.
pub fn policy(
    ns: &str,
    lock: &str,
    resources: &[GuardedResource],
) -> Result<(ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding), FenceError> {
    let name = policy_name(ns, lock)?;
    let selector = LabelSelector {
        match_labels: Some(BTreeMap::from([(
            FENCED_BY_LABEL.to_string(),
            lock.to_string(),
        )])),
        ..LabelSelector::default()
    };
    let policy = ValidatingAdmissionPolicy {
        metadata: meta(&name, ns, lock),
        spec: Some(spec(resources, selector)),
        status: None,
    };
    let binding = ValidatingAdmissionPolicyBinding {
        metadata: meta(&name, ns, lock),
        spec: Some(ValidatingAdmissionPolicyBindingSpec {
            policy_name: Some(name.clone()),
            validation_actions: Some(vec!["Deny".into()]),
            match_resources: Some(MatchResources {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        "kubernetes.io/metadata.name".to_string(),
                        ns.to_string(),
                    )])),
                    ..LabelSelector::default()
                }),
                ..MatchResources::default()
            }),
            ..ValidatingAdmissionPolicyBindingSpec::default()
        }),
    };
    Ok((policy, binding))
}

/// The policy's spec: creates and updates of `resources` whose old or new object
/// `selector` matches (the API server applies it if either does, so removing the label
/// is checked too), the variables and the two rules.
pub fn spec(
    resources: &[GuardedResource],
    selector: LabelSelector,
) -> ValidatingAdmissionPolicySpec {
    let rules = resources
        .iter()
        .map(|r| NamedRuleWithOperations {
            api_groups: Some(vec![r.group.clone()]),
            api_versions: Some(vec!["*".into()]),
            resources: Some(vec![r.resource.clone()]),
            operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
            ..NamedRuleWithOperations::default()
        })
        .collect();
    ValidatingAdmissionPolicySpec {
        failure_policy: Some("Fail".into()),
        match_constraints: Some(MatchResources {
            resource_rules: Some(rules),
            object_selector: Some(selector),
            ..MatchResources::default()
        }),
        variables: Some(variables()),
        validations: Some(validations()),
        ..ValidatingAdmissionPolicySpec::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn well_formed_tokens_are_decimals_without_a_leading_zero_up_to_forty_digits() {
        for ok in ["0", "7", "4107", &"9".repeat(40)] {
            assert!(valid_token(ok), "{ok}");
        }
        for bad in [
            "",
            "-1",
            "01",
            "12a",
            " 12",
            "1.5",
            &"1".repeat(41),
            &"9".repeat(200),
        ] {
            assert!(!valid_token(bad), "{bad}");
        }
    }

    #[test]
    fn resources_parse_as_plural_and_group() {
        let r: GuardedResource = "deployments.apps".parse().expect("parses");
        assert_eq!(
            (r.group.as_str(), r.resource.as_str()),
            ("apps", "deployments")
        );
        let r: GuardedResource = "configmaps".parse().expect("parses");
        assert_eq!((r.group.as_str(), r.resource.as_str()), ("", "configmaps"));
        for bad in ["", "ConfigMaps", ".apps", "configmaps.", "con figmaps"] {
            assert!(bad.parse::<GuardedResource>().is_err(), "{bad:?}");
        }
    }

    proptest! {
        #![proptest_config(crate::arbiter::model::proptests::config())]
        /// The CEL rule's comparison (length, then digits) is the numeric order.
        #[test]
        fn tokens_compare_as_numbers(a in 0u128..u128::MAX, b in 0u128..u128::MAX) {
            let (sa, sb) = (a.to_string(), b.to_string());
            prop_assert!(valid_token(&sa) && valid_token(&sb));
            prop_assert_eq!(token_at_least(&sa, &sb), a >= b);
        }
    }
}
