//! The relay Service `<name>-relay`: the API port and the metrics port.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::{HTTP_PORT, METRICS_PORT, owned_metadata, selector_labels, service_name};
use crate::crd::MessagingEndpoint;

pub fn build_service(endpoint: &MessagingEndpoint) -> Service {
    let name = endpoint.name_any();
    let port = |name: &str, number: i32| ServicePort {
        name: Some(name.to_string()),
        port: number,
        target_port: Some(IntOrString::String(name.to_string())),
        protocol: Some("TCP".to_string()),
        ..ServicePort::default()
    };
    Service {
        metadata: owned_metadata(endpoint, service_name(&name)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_string()),
            selector: Some(selector_labels(&name)),
            ports: Some(vec![port("http", HTTP_PORT), port("metrics", METRICS_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{labels, tests::endpoint};

    #[test]
    fn service_exposes_http_and_metrics_and_selects_the_relay_pods() {
        let svc = build_service(&endpoint());
        assert_eq!(svc.metadata.name.as_deref(), Some("support-relay"));
        assert_eq!(svc.metadata.labels.as_ref(), Some(&labels("support")));
        assert_eq!(svc.owner_references()[0].kind, "MessagingEndpoint");
        let spec = svc.spec.unwrap();
        let ports: Vec<(String, i32, IntOrString)> = spec
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.name.unwrap(), p.port, p.target_port.unwrap()))
            .collect();
        assert_eq!(
            ports,
            [
                ("http".into(), 8080, IntOrString::String("http".into())),
                (
                    "metrics".into(),
                    9090,
                    IntOrString::String("metrics".into())
                )
            ]
        );
        // Every selector label is on the pods.
        let pod_labels = labels("support");
        for (k, v) in spec.selector.unwrap() {
            assert_eq!(pod_labels.get(&k), Some(&v));
        }
    }
}
