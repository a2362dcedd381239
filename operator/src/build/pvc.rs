//! The PersistentVolumeClaim `<name>-data` of the embedded store.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt;

use super::{owned_metadata, pvc_name};
use crate::crd::{MessagingEndpoint, StorageType};

/// The claim, or `None` when the endpoint's store needs no volume.
pub fn build_pvc(endpoint: &MessagingEndpoint) -> Option<PersistentVolumeClaim> {
    let storage = &endpoint.spec.storage;
    if storage.type_ != StorageType::Embedded {
        return None;
    }
    Some(PersistentVolumeClaim {
        metadata: owned_metadata(endpoint, pvc_name(&endpoint.name_any())),
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(storage.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::endpoint;

    #[test]
    fn claim_takes_size_and_class_from_the_spec() {
        let mut ep = endpoint();
        ep.spec.storage.size = "5Gi".into();
        ep.spec.storage.storage_class_name = Some("fast".into());
        let pvc = build_pvc(&ep).expect("embedded store has a claim");
        assert_eq!(pvc.metadata.name.as_deref(), Some("support-data"));
        assert_eq!(pvc.owner_references()[0].name, "support");
        let spec = pvc.spec.unwrap();
        assert_eq!(spec.access_modes.unwrap(), ["ReadWriteOnce"]);
        assert_eq!(spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            spec.resources.unwrap().requests.unwrap()["storage"],
            Quantity("5Gi".into())
        );
    }

    #[test]
    fn memory_store_has_no_claim() {
        let mut ep = endpoint();
        ep.spec.storage.type_ = StorageType::Memory;
        assert!(build_pvc(&ep).is_none());
    }
}
