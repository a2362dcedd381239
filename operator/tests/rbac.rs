//! Records every (verb, API group, resource) the real operator calls while it
//! goes through every code path, as kube-apiserver's authorizer names them
//! (an apply that creates an object is a `patch` and a `create`), checks it
//! is exactly the expected set, and writes it to
//! `<workspace>/target/rbac-observed.json`, where the chart's test compares it
//! with the rendered ClusterRole and Role. The server enforces the expected
//! set as RBAC rules meanwhile, so the operator is shown to work with no more.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use botrelay_test_apiserver::{Call, Policy, Rule};
use serde_json::json;
use support::*;

fn expected() -> BTreeSet<Call> {
    let mut set = BTreeSet::new();
    let mut add = |group: &str, resource: &str, verbs: &[&str]| {
        for verb in verbs {
            set.insert(Call::new(verb, group, resource));
        }
    };
    // get: only to read an object that does not decode (to avoid rewriting its condition).
    add(
        "botrelay.dev",
        "messagingendpoints",
        &["get", "list", "watch"],
    );
    add("botrelay.dev", "messagingendpoints/status", &["patch"]);
    // Secrets: read by name (the one an endpoint uses), never listed or
    // watched; create for the generated one (an apply that makes it), patch to
    // fill a deleted key.
    add("", "secrets", &["get", "create", "patch"]);
    add("", "services", &["list", "watch", "create", "patch"]);
    add(
        "",
        "persistentvolumeclaims",
        &["list", "watch", "create", "patch"],
    );
    add("apps", "deployments", &["list", "watch", "create", "patch"]);
    // For endpoints with several relay pods (the nats store).
    add(
        "policy",
        "poddisruptionbudgets",
        &["list", "watch", "create", "patch"],
    );
    // patch: the event recorder turns a repeated event into a series.
    add("events.k8s.io", "events", &["create", "patch"]);
    add("coordination.k8s.io", "leases", &["get", "create", "patch"]);
    set
}

/// The expected calls as RBAC rules: cluster-wide, but the Lease only in its namespace.
fn expected_policy() -> Policy {
    let rules = expected()
        .into_iter()
        .map(|call| Rule {
            namespace: (call.resource == "leases").then(|| LEASE_NS.to_string()),
            api_groups: vec![call.group],
            resources: vec![call.resource],
            verbs: vec![call.verb],
        })
        .collect();
    Policy {
        user: "system:serviceaccount:botrelay:botrelay-operator".into(),
        rules,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_calls_exactly_the_expected_verbs_and_resources() {
    let server = start_server().await;
    server.enforce(expected_policy());
    create_endpoint(&server, "broken", json!({"bot": 42}));
    let mut operator = Operator::start(&server, "op-rbac", &[]);

    // A generated Secret, the full relay, and a spec update.
    create_endpoint(&server, "gen", json!({}));
    wait_reason(&server, &operator, "gen", "RelayReady").await;
    server
        .merge_patch(&ep_key("gen"), json!({"spec": {"replicas": 0}}), false)
        .unwrap();
    wait_reason(&server, &operator, "gen", "ScaledToZero").await;

    // A user's Secret, missing first.
    create_endpoint(
        &server,
        "byo",
        json!({"credentialsSecretRef": {"name": "mine"}}),
    );
    wait_reason(&server, &operator, "byo", "SecretNotFound").await;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    server
        .create(
            "",
            "secrets",
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mine", "namespace": NS},
                   "data": {"client-token": b64("a"), "bot-token": b64("b"),
                            "bot-signing-secret": b64("whsec_c"), "response-signing-secret": b64("whsec_d")}}),
        )
        .unwrap();
    wait_reason(&server, &operator, "byo", "RelayReady").await;

    // Several relay pods on the shared store: a PodDisruptionBudget.
    create_endpoint(
        &server,
        "ha",
        json!({"replicas": 2, "storage": {"type": "nats", "nats": {"urls": ["nats://nats.nats.svc:4222"]}}}),
    );
    wait_reason(&server, &operator, "ha", "RelayReady").await;

    // An invalid spec, fixed, then broken the same way again (a repeated event).
    create_endpoint(&server, "flappy", json!({"replicas": 3}));
    wait_reason(&server, &operator, "flappy", "InvalidSpec").await;
    server
        .merge_patch(&ep_key("flappy"), json!({"spec": {"replicas": 1}}), false)
        .unwrap();
    wait_reason(&server, &operator, "flappy", "RelayReady").await;
    server
        .merge_patch(&ep_key("flappy"), json!({"spec": {"replicas": 3}}), false)
        .unwrap();
    wait_reason(&server, &operator, "flappy", "InvalidSpec").await;

    // The undecodable object got its condition.
    wait_reason(&server, &operator, "broken", "InvalidObject").await;

    // Deletion, then a clean stop (which releases the Lease).
    server.delete(&ep_key("gen")).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(operator.terminate(), Some(0));

    assert_eq!(
        server.forbidden_count(),
        0,
        "the operator was refused a call:\n{}",
        operator.logs()
    );
    let observed = server.calls();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/rbac-observed.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let sorted: Vec<&Call> = observed.iter().collect();
    std::fs::write(&path, serde_json::to_string_pretty(&sorted).unwrap() + "\n").unwrap();

    let missing: Vec<_> = expected().difference(&observed).cloned().collect();
    let unexpected: Vec<_> = observed.difference(&expected()).cloned().collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "RBAC drift (written to {}):\n  not called: {missing:?}\n  not expected: {unexpected:?}\noperator log:\n{}",
        path.display(),
        operator.logs()
    );
}
