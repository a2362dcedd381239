//! What the operator costs the API server: a cold start writes each owned
//! object about once, and watches that expire (410 Gone after compaction) are
//! re-listed without losing an endpoint.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use botrelay_test_apiserver::Key;
use serde_json::json;
use support::*;

fn ready_at_generation(ep: &serde_json::Value) -> bool {
    ep["status"]["observedGeneration"] == ep["metadata"]["generation"]
        && condition(ep, "Ready").is_some_and(|c| c["status"] == "True")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_applies_each_owned_object_about_once() {
    const ENDPOINTS: usize = 200;
    let server = start_server().await;
    // Relays come up a while after their Deployment is written, in two status
    // writes, as on a real cluster: each is an event the operator sees.
    server.set_deployment_ready_delay(Duration::from_millis(300));
    for i in 0..ENDPOINTS {
        let mut ep = endpoint(&format!("ep-{i:03}"), json!({}));
        ep["metadata"]["namespace"] = json!(format!("team-{}", i % 10));
        server
            .create("botrelay.dev", "messagingendpoints", ep)
            .unwrap();
    }
    let started = Instant::now();
    let operator = Operator::start(&server, "op-cold", &[]);
    eventually(
        120,
        "every endpoint Ready at its generation",
        &operator,
        || {
            let eps = server.list("botrelay.dev", "messagingendpoints", None);
            (eps.len() == ENDPOINTS && eps.iter().all(ready_at_generation)).then_some(())
        },
    )
    .await;
    let took = started.elapsed();
    // Let the events of the last writes come back, then count.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut per_kind: BTreeMap<String, (u64, usize)> = BTreeMap::new();
    let mut status_writes = 0;
    for ((kind, key), n) in server.object_requests() {
        if kind == "apply"
            && matches!(
                key.resource.as_str(),
                "secrets" | "services" | "persistentvolumeclaims" | "deployments"
            )
        {
            let e = per_kind.entry(key.resource.clone()).or_default();
            e.0 += n;
            e.1 += 1;
        }
        if key.resource == "messagingendpoints" && kind == "apply" {
            status_writes += n;
        }
    }
    let applies: u64 = per_kind.values().map(|(n, _)| n).sum();
    let objects: usize = per_kind.values().map(|(_, o)| o).sum();
    let events = server.call_count("create", "events.k8s.io", "events")
        + server.call_count("patch", "events.k8s.io", "events");
    eprintln!(
        "cold start of {ENDPOINTS} endpoints: {took:?}; applies per owned object {:.2} \
         ({applies} for {objects}: {per_kind:?}); status writes per endpoint {:.2}; \
         event writes per endpoint {:.2}",
        applies as f64 / objects as f64,
        status_writes as f64 / ENDPOINTS as f64,
        events as f64 / ENDPOINTS as f64,
    );
    assert_eq!(objects, 4 * ENDPOINTS, "{per_kind:?}");
    assert!(
        applies as f64 <= 1.2 * objects as f64,
        "{applies} applies for {objects} owned objects: {per_kind:?}"
    );
    // Not ready, then ready: two status writes, and a little slack.
    assert!(
        status_writes as f64 <= 2.2 * ENDPOINTS as f64,
        "{status_writes} status writes for {ENDPOINTS} endpoints"
    );
    // CredentialsGenerated and RelayReady.
    assert!(
        events as f64 <= 2.2 * ENDPOINTS as f64,
        "{events} event writes for {ENDPOINTS} endpoints"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_that_expire_are_listed_again() {
    let server = start_server().await;
    let operator = Operator::start(&server, "op-relist", &[]);
    create_endpoint(&server, "first", json!({}));
    wait_reason(&server, &operator, "first", "RelayReady").await;

    // Changes the operator does not watch move the resourceVersion on; then
    // the history goes and every watch ends, as after a compaction and an
    // API server restart: resuming from where they were is 410 Gone.
    for i in 0..3 {
        server
            .create(
                "",
                "configmaps",
                json!({"metadata": {"name": format!("cm-{i}"), "namespace": NS}}),
            )
            .unwrap();
    }
    server.compact();
    server.close_watches();
    create_endpoint(&server, "second", json!({}));
    wait_reason(&server, &operator, "second", "RelayReady").await;
    assert!(
        server.expired_count() >= 1,
        "no watch resumed from compacted history"
    );
    // And the first endpoint's objects are still its own, unchanged.
    assert!(
        server
            .get(&Key::new("apps", "deployments", NS, "first-relay"))
            .is_some()
    );
    assert_eq!(
        server
            .get(&ep_key("first"))
            .and_then(|ep| condition(&ep, "Ready"))
            .unwrap()["reason"],
        "RelayReady"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_edit_of_the_relay_deployment_is_undone_and_nothing_else_is_rewritten() {
    let server = start_server().await;
    let operator = Operator::start(&server, "op-edit", &[]);
    create_endpoint(&server, "support", json!({}));
    wait_reason(&server, &operator, "support", "RelayReady").await;
    let applies = |resource: &str| -> u64 {
        server
            .object_requests()
            .iter()
            .filter(|((kind, key), _)| kind == "apply" && key.resource == resource)
            .map(|(_, n)| n)
            .sum()
    };
    let before = (
        applies("deployments"),
        applies("services"),
        applies("secrets"),
    );

    // `kubectl scale`: another field manager, a new generation.
    let key = Key::new("apps", "deployments", NS, "support-relay");
    server
        .merge_patch(&key, json!({"spec": {"replicas": 3}}), false)
        .unwrap();
    eventually(20, "the operator's replicas back", &operator, || {
        (server.get(&key)?["spec"]["replicas"] == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        (
            applies("deployments"),
            applies("services"),
            applies("secrets")
        ),
        (before.0 + 1, before.1, before.2),
        "one apply of the Deployment undoes the edit; nothing else is written"
    );

    // Deleted: it is made again.
    server.delete(&key).unwrap();
    eventually(20, "the Deployment made again", &operator, || {
        server.get(&key)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_operator_process_still_undoes_hand_edits_and_restores_a_tampered_status() {
    let server = start_server().await;
    let mut first = Operator::start(&server, "op-a", &[]);
    create_endpoint(&server, "support", json!({}));
    wait_reason(&server, &first, "support", "RelayReady").await;
    assert_eq!(first.terminate(), Some(0));

    // A new process (an upgrade, a failover) has written nothing itself yet.
    let operator = Operator::start(&server, "op-b", &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let key = Key::new("apps", "deployments", NS, "support-relay");
    server
        .merge_patch(
            &key,
            json!({"spec": {"replicas": 0, "template": {"spec": {"containers": [{"name": "relay", "image": "evil/image:1"}]}}}}),
            false,
        )
        .unwrap();
    let restored = eventually(
        20,
        "the relay Deployment as the operator writes it",
        &operator,
        || {
            let d = server.get(&key)?;
            (d["spec"]["replicas"] == 1
                && d["spec"]["template"]["spec"]["containers"][0]["image"]
                    == "botrelay/relay:0.1.0")
                .then_some(d)
        },
    )
    .await;
    assert_eq!(restored["spec"]["replicas"], 1);

    // Someone else's status is not the endpoint's status: it is written again.
    server
        .merge_patch(
            &ep_key("support"),
            json!({"status": {"webhookUrl": "http://evil/", "conditions": [{"type": "Ready", "status": "False",
                "reason": "Tampered", "message": "x", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}),
            true,
        )
        .unwrap();
    let ep = wait_reason(&server, &operator, "support", "RelayReady").await;
    assert_eq!(
        ep["status"]["webhookUrl"],
        format!("http://support-relay.{NS}.svc:8080/v1/messages")
    );
}
