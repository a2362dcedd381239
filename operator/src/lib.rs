//! The botrelay operator: reconciles each `MessagingEndpoint` into a Secret, a
//! relay Deployment, a Service and a PersistentVolumeClaim, and reports status.
//!
//! Layout: `crd` (the resource type), `validate` (spec rules the schema cannot
//! express), `build` (pure builders: spec in, objects out), `status`
//! (conditions), `controller` (the reconcile loop: validate → build → apply →
//! status), `metrics`, `admin` (the `/metrics` `/healthz` `/readyz` server),
//! `lease` (leader election on a Lease), `targets` (the relays' view of their
//! targets, as conditions), `config` (flags), `telemetry` (logs).

pub mod admin;
pub mod applied;
pub mod build;
pub mod config;
pub mod controller;
pub mod crd;
pub mod lease;
pub mod metrics;
pub mod status;
pub mod targets;
pub mod telemetry;
pub mod validate;

/// The CRD as the API server takes it.
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    use kube::CustomResourceExt;
    crd::MessagingEndpoint::crd()
}

/// The CRD as YAML, exactly as `crds/` holds it.
pub fn crd_yaml() -> String {
    let yaml = serde_saphyr::to_string(&crd()).expect("the CRD serializes");
    format!("---\n{yaml}")
}
