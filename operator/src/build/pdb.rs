//! The PodDisruptionBudget `<name>-relay` of an endpoint with several relay pods.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::{owned_metadata, pdb_name, selector_labels};
use crate::crd::{MessagingEndpoint, StorageType};

/// One relay pod at a time may be evicted (a node drain, an upgrade), so the
/// others keep serving; `None` below two pods, where a budget would only
/// stop drains. A budget made for two or more pods stays when they are
/// scaled down: it still lets one pod go, so it never blocks a drain.
pub fn build_pdb(endpoint: &MessagingEndpoint) -> Option<PodDisruptionBudget> {
    let spec = &endpoint.spec;
    if spec.storage.type_ != StorageType::Nats || spec.replicas < 2 {
        return None;
    }
    let name = endpoint.name_any();
    Some(PodDisruptionBudget {
        metadata: owned_metadata(endpoint, pdb_name(&name)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::endpoint;
    use crate::crd::NatsSpec;

    #[test]
    fn a_budget_only_for_two_or_more_pods_on_the_shared_store() {
        let mut ep = endpoint();
        ep.spec.replicas = 3;
        assert!(build_pdb(&ep).is_none(), "embedded store: one pod");
        ep.spec.storage.type_ = StorageType::Nats;
        ep.spec.storage.nats = Some(NatsSpec {
            urls: vec!["nats://n:4222".into()],
            credentials_secret_ref: None,
            tls_ca_secret_ref: None,
            stream_replicas: None,
        });
        let pdb = build_pdb(&ep).unwrap();
        assert_eq!(pdb.name_any(), "support-relay");
        assert_eq!(pdb.owner_references()[0].name, "support");
        let spec = pdb.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(
            spec.selector.unwrap().match_labels.unwrap(),
            selector_labels("support")
        );
        ep.spec.replicas = 1;
        assert!(build_pdb(&ep).is_none());
    }
}
