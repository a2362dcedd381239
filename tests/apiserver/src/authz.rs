//! RBAC as kube-apiserver applies it to the calls we make: a policy made of
//! the rules of Roles (one namespace) and ClusterRoles (every namespace and
//! cluster-scoped calls), all taken as bound to the one caller.
//!
//! What a request is authorized as follows the real server:
//! - `GET` of one object is `get`; of a collection `list`, or `watch` with
//!   `?watch=true`; `POST` is `create`; `PUT` is `update`; `PATCH` is `patch`;
//!   `DELETE` is `delete` (of a collection, `deletecollection`);
//! - a `PATCH` that creates the object (a server-side apply of an object that
//!   does not exist yet) needs `patch` at the door and `create` when the
//!   object is made, so a role with `patch` alone cannot create anything;
//! - a subresource is its own resource, `resource/subresource`.
//!
//! Not modelled: resourceNames, aggregated roles, bindings to other subjects,
//! non-resource URLs.

use serde_json::Value;

use crate::Call;

/// One rule of a Role or ClusterRole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// `None` for a ClusterRole's rule: it applies everywhere.
    pub namespace: Option<String>,
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
}

impl Rule {
    fn allows(&self, call: &Call, namespace: Option<&str>) -> bool {
        let any = |list: &[String], value: &str| list.iter().any(|v| v == "*" || v == value);
        let scope_ok = match (&self.namespace, namespace) {
            (None, _) => true,
            (Some(mine), Some(asked)) => mine == asked,
            // A Role never grants a call across all namespaces or a cluster-scoped one.
            (Some(_), None) => false,
        };
        scope_ok
            && any(&self.api_groups, &call.group)
            && any(&self.resources, &call.resource)
            && any(&self.verbs, &call.verb)
    }
}

/// The rights of the one user the server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The user named in a refusal, e.g. `system:serviceaccount:botrelay:botrelay-operator`.
    pub user: String,
    pub rules: Vec<Rule>,
}

impl Policy {
    /// A policy from Role and ClusterRole objects (as `helm template` renders
    /// them); other kinds are ignored.
    pub fn from_roles(user: &str, objects: &[Value]) -> Result<Policy, String> {
        let mut rules = vec![];
        for object in objects {
            let namespace = match object["kind"].as_str() {
                Some("ClusterRole") => None,
                Some("Role") => Some(
                    object["metadata"]["namespace"]
                        .as_str()
                        .ok_or("a Role without metadata.namespace")?
                        .to_string(),
                ),
                _ => continue,
            };
            for rule in object["rules"].as_array().into_iter().flatten() {
                let strings = |key: &str| -> Result<Vec<String>, String> {
                    rule[key]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|v| v.as_str().map(String::from))
                                .collect::<Option<Vec<_>>>()
                        })
                        .unwrap_or(Some(vec![]))
                        .ok_or_else(|| format!("rule field {key} holds a non-string"))
                };
                rules.push(Rule {
                    namespace: namespace.clone(),
                    api_groups: strings("apiGroups")?,
                    resources: strings("resources")?,
                    verbs: strings("verbs")?,
                });
            }
        }
        Ok(Policy {
            user: user.to_string(),
            rules,
        })
    }

    pub fn allows(&self, call: &Call, namespace: Option<&str>) -> bool {
        self.rules.iter().any(|r| r.allows(call, namespace))
    }

    /// kube-apiserver's words for a refusal.
    pub fn refusal(&self, call: &Call, namespace: Option<&str>, name: Option<&str>) -> String {
        let (resource, sub) = match call.resource.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (call.resource.as_str(), None),
        };
        let what = match name {
            Some(n) => format!("{resource} \"{n}\""),
            None => resource.to_string(),
        };
        let resource_phrase = match sub {
            Some(s) => format!("resource \"{resource}/{s}\""),
            None => format!("resource \"{resource}\""),
        };
        let scope = match namespace {
            Some(ns) => format!(" in the namespace \"{ns}\""),
            None => " at the cluster scope".to_string(),
        };
        format!(
            "{what} is forbidden: User \"{}\" cannot {} {resource_phrase} in API group \"{}\"{scope}",
            self.user, call.verb, call.group
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy() -> Policy {
        Policy::from_roles(
            "system:serviceaccount:botrelay:op",
            &[
                json!({"kind": "ClusterRole", "metadata": {"name": "c"}, "rules": [
                    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "patch"]},
                    {"apiGroups": ["apps"], "resources": ["deployments/status"], "verbs": ["patch"]},
                ]}),
                json!({"kind": "Role", "metadata": {"name": "r", "namespace": "lease-ns"}, "rules": [
                    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get"]},
                ]}),
                json!({"kind": "ServiceAccount", "metadata": {"name": "ignored"}}),
            ],
        )
        .unwrap()
    }

    #[test]
    fn cluster_roles_apply_everywhere_roles_in_their_namespace_only() {
        let p = policy();
        assert!(p.allows(&Call::new("get", "", "secrets"), Some("shop")));
        assert!(p.allows(&Call::new("get", "", "secrets"), None));
        assert!(!p.allows(&Call::new("create", "", "secrets"), Some("shop")));
        let lease = Call::new("get", "coordination.k8s.io", "leases");
        assert!(p.allows(&lease, Some("lease-ns")));
        assert!(!p.allows(&lease, Some("shop")));
        assert!(!p.allows(&lease, None));
        // A subresource is a resource of its own.
        assert!(p.allows(&Call::new("patch", "apps", "deployments/status"), Some("x")));
        assert!(!p.allows(&Call::new("patch", "apps", "deployments"), Some("x")));
    }

    #[test]
    fn refusals_read_like_the_real_servers() {
        let p = policy();
        assert_eq!(
            p.refusal(
                &Call::new("create", "", "secrets"),
                Some("shop"),
                Some("support-credentials")
            ),
            "secrets \"support-credentials\" is forbidden: User \"system:serviceaccount:botrelay:op\" \
             cannot create resource \"secrets\" in API group \"\" in the namespace \"shop\""
        );
        assert_eq!(
            p.refusal(&Call::new("list", "apps", "deployments"), None, None),
            "deployments is forbidden: User \"system:serviceaccount:botrelay:op\" \
             cannot list resource \"deployments\" in API group \"apps\" at the cluster scope"
        );
    }
}
