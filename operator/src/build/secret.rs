//! The generated credentials Secret `<name>-credentials`.

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;

use super::{Credentials, owned_metadata, secret_name};
use crate::crd::MessagingEndpoint;

/// The Secret holding `credentials`. The caller passes the values already in
/// the cluster when there are any, so applying it never changes them.
pub fn build_secret(endpoint: &MessagingEndpoint, credentials: &Credentials) -> Secret {
    Secret {
        metadata: owned_metadata(endpoint, secret_name(&endpoint.name_any())),
        type_: Some("Opaque".to_string()),
        data: Some(credentials.to_data()),
        ..Secret::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::endpoint;

    #[test]
    fn secret_is_named_labelled_owned_and_holds_the_four_keys() {
        let creds = Credentials::generate();
        let secret = build_secret(&endpoint(), &creds);
        assert_eq!(secret.metadata.name.as_deref(), Some("support-credentials"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(secret.type_.as_deref(), Some("Opaque"));
        assert_eq!(secret.labels()["botrelay.dev/endpoint"], "support");
        assert_eq!(secret.owner_references()[0].name, "support");
        let keys: Vec<&String> = secret.data.as_ref().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "bot-signing-secret",
                "bot-token",
                "client-token",
                "response-signing-secret"
            ]
        );
        assert_eq!(Credentials::from_secret(&secret).unwrap(), creds);
    }
}
