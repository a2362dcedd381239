//! Pure builders: a `MessagingEndpoint` (and the operator's settings) in,
//! Kubernetes objects out. No I/O here, so every object is unit-tested as is.

mod credentials;
pub(crate) use credentials::hex;
mod deployment;
mod pdb;
mod pvc;
mod secret;
mod service;

pub use credentials::{CREDENTIAL_KEYS, Credentials, MissingKeys};
pub use deployment::{CHECKSUM_ANNOTATION, build_deployment, nats_prefix, relay_args};
pub use pdb::build_pdb;
pub use pvc::build_pvc;
pub use secret::build_secret;
pub use service::build_service;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::{MessagingEndpoint, MessagingEndpointSpec, StorageType, TargetOptions};

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "botrelay-operator";

/// Relay API port (`--listen`).
pub const HTTP_PORT: i32 = 8080;
/// Relay admin port (`--admin-listen`): `/metrics`, `/healthz`, `/readyz`.
pub const METRICS_PORT: i32 = 9090;

/// Where the credentials Secret is mounted in the relay container.
pub const CREDENTIALS_DIR: &str = "/var/run/botrelay/credentials";
/// Where the store's volume is mounted in the relay container.
pub const DATA_DIR: &str = "/var/lib/botrelay";
/// Where the NATS credentials file is mounted, and its key in the Secret.
pub const NATS_CREDENTIALS_DIR: &str = "/var/run/botrelay/nats-credentials";
pub const NATS_CREDENTIALS_KEY: &str = "nats.creds";
/// Where the NATS servers' CA is mounted, and its key in the Secret.
pub const NATS_CA_DIR: &str = "/var/run/botrelay/nats-ca";
pub const NATS_CA_KEY: &str = "ca.crt";

/// Where secret header values are mounted: `<dir>/<target>-<index>/value`.
pub const HEADERS_DIR: &str = "/var/run/botrelay/headers";
/// Where a target's client certificate and key are mounted: `<dir>/<target>/`.
pub const CLIENT_TLS_DIR: &str = "/var/run/botrelay/client-tls";
/// The keys of a client certificate Secret (those of a `kubernetes.io/tls` Secret).
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";

/// A key of a Secret that the spec names besides the credentials, and the
/// field that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretKeyUse {
    pub field: String,
    pub secret: String,
    pub key: String,
}

/// The two targets, as the relay's flags and the CRD's fields name them.
pub fn targets(spec: &MessagingEndpointSpec) -> [(&'static str, &'static str, &TargetOptions); 2] {
    [
        ("bot", "spec.bot", &spec.bot.target),
        (
            "response",
            "spec.responseEndpoint",
            &spec.response_endpoint.target,
        ),
    ]
}

/// Every Secret key the relay pods mount besides the credentials: the NATS
/// credentials file and CA, secret header values, client certificates.
pub fn referenced_secret_keys(spec: &MessagingEndpointSpec) -> Vec<SecretKeyUse> {
    let mut uses = Vec::new();
    let mut add = |field: String, secret: &str, key: &str| {
        uses.push(SecretKeyUse {
            field,
            secret: secret.to_string(),
            key: key.to_string(),
        })
    };
    if let Some(nats) = spec
        .storage
        .nats
        .as_ref()
        .filter(|_| spec.storage.type_ == StorageType::Nats)
    {
        if let Some(r) = &nats.credentials_secret_ref {
            add(
                "spec.storage.nats.credentialsSecretRef".into(),
                &r.name,
                NATS_CREDENTIALS_KEY,
            );
        }
        if let Some(r) = &nats.tls_ca_secret_ref {
            add(
                "spec.storage.nats.tlsCaSecretRef".into(),
                &r.name,
                NATS_CA_KEY,
            );
        }
    }
    for (_, path, target) in targets(spec) {
        for (i, header) in target.headers.iter().enumerate() {
            if let Some(from) = &header.value_from {
                add(
                    format!("{path}.headers[{i}].valueFrom"),
                    &from.secret_key_ref.name,
                    &from.secret_key_ref.key,
                );
            }
        }
        if let Some(r) = &target.client_certificate_secret_ref {
            for key in [TLS_CERT_KEY, TLS_KEY_KEY] {
                add(format!("{path}.clientCertificateSecretRef"), &r.name, key);
            }
        }
    }
    uses
}

/// Settings that come from the operator, not from the endpoint.
#[derive(Debug, Clone)]
pub struct BuildSettings {
    /// Relay image used when the endpoint does not name one.
    pub relay_image: String,
}

/// Names of the objects owned by endpoint `name`.
pub fn secret_name(endpoint: &str) -> String {
    format!("{endpoint}-credentials")
}
pub fn deployment_name(endpoint: &str) -> String {
    format!("{endpoint}-relay")
}
pub fn service_name(endpoint: &str) -> String {
    format!("{endpoint}-relay")
}
pub fn pdb_name(endpoint: &str) -> String {
    format!("{endpoint}-relay")
}
pub fn pvc_name(endpoint: &str) -> String {
    format!("{endpoint}-data")
}

/// The in-cluster URL back-ends POST user messages to.
pub fn webhook_url(endpoint: &str, namespace: &str) -> String {
    format!(
        "http://{}.{namespace}.svc:{HTTP_PORT}/v1/messages",
        service_name(endpoint)
    )
}

/// Labels of every object the operator makes; the chart's PodMonitor selects on them.
pub fn labels(endpoint: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "botrelay-relay"),
        ("app.kubernetes.io/instance", endpoint),
        ("app.kubernetes.io/component", "relay"),
        ("app.kubernetes.io/part-of", "botrelay"),
        ("app.kubernetes.io/managed-by", "botrelay-operator"),
        ("botrelay.dev/endpoint", endpoint),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The label selector of the operator's own objects (its owned-object watches use it).
pub const MANAGED_BY_SELECTOR: &str = "app.kubernetes.io/managed-by=botrelay-operator";

/// The labels a Deployment selects its pods by. A selector is immutable, so it
/// holds only what never changes for an endpoint.
pub fn selector_labels(endpoint: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "botrelay-relay"),
        ("app.kubernetes.io/instance", endpoint),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Owner reference that makes the endpoint the controller of an object, so
/// that deleting the endpoint deletes the object. `blockOwnerDeletion` stays
/// unset: setting it would need update rights on `messagingendpoints/finalizers`.
pub fn owner_reference(endpoint: &MessagingEndpoint) -> OwnerReference {
    OwnerReference {
        api_version: MessagingEndpoint::api_version(&()).into_owned(),
        kind: MessagingEndpoint::kind(&()).into_owned(),
        name: endpoint.name_any(),
        uid: endpoint.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }
}

/// Metadata of an owned object named `name`.
fn owned_metadata(endpoint: &MessagingEndpoint, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: endpoint.namespace(),
        labels: Some(labels(&endpoint.name_any())),
        owner_references: Some(vec![owner_reference(endpoint)]),
        ..ObjectMeta::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn endpoint() -> MessagingEndpoint {
        let mut ep = MessagingEndpoint::new("support", crate::validate::tests::spec());
        ep.metadata.namespace = Some("shop".into());
        ep.metadata.uid = Some("0b4e6f1c-uid".into());
        ep.metadata.generation = Some(1);
        ep
    }

    pub(crate) fn settings() -> BuildSettings {
        BuildSettings {
            relay_image: "botrelay/relay:0.1.0".into(),
        }
    }

    #[test]
    fn names_and_webhook_url_follow_the_contract() {
        assert_eq!(secret_name("support"), "support-credentials");
        assert_eq!(deployment_name("support"), "support-relay");
        assert_eq!(service_name("support"), "support-relay");
        assert_eq!(pvc_name("support"), "support-data");
        assert_eq!(
            webhook_url("support", "shop"),
            "http://support-relay.shop.svc:8080/v1/messages"
        );
    }

    #[test]
    fn owner_reference_points_at_the_endpoint_as_controller() {
        let r = owner_reference(&endpoint());
        assert_eq!(r.api_version, "botrelay.dev/v1alpha1");
        assert_eq!(r.kind, "MessagingEndpoint");
        assert_eq!(r.name, "support");
        assert_eq!(r.uid, "0b4e6f1c-uid");
        assert_eq!(r.controller, Some(true));
    }
}
