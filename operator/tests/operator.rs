//! The real operator binary against the test API server, over HTTP, with a
//! kubeconfig — what a user would check with kubectl.

mod support;

use std::time::Duration;

use botrelay_test_apiserver::{Call, Key, TestApiServer};
use serde_json::{Value, json};
use support::*;

fn args(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn checksum(deployment: &Value) -> String {
    deployment["spec"]["template"]["metadata"]["annotations"]["botrelay.dev/checksum"]
        .as_str()
        .unwrap()
        .to_string()
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .map(|i| args[i + 1].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_becomes_a_ready_relay_with_owned_objects_and_status() {
    let server = start_server().await;
    let operator = Operator::start(&server, "op-1", &[]);
    let created = create_endpoint(
        &server,
        "support",
        json!({"delivery": {"botTimeout": "10s", "maxAttempts": 5}}),
    );
    let uid = created["metadata"]["uid"].clone();

    let ep = wait_reason(&server, &operator, "support", "RelayReady").await;
    let status = &ep["status"];
    assert_eq!(
        status["webhookUrl"],
        "http://support-relay.shop.svc:8080/v1/messages"
    );
    assert_eq!(status["credentialsSecret"], "support-credentials");
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["readyReplicas"], 1);
    assert_eq!(condition(&ep, "Ready").unwrap()["status"], "True");
    assert_eq!(condition(&ep, "Progressing").unwrap()["status"], "False");
    assert_eq!(condition(&ep, "Degraded").unwrap()["status"], "False");

    // The four objects exist, are controlled by the endpoint, and carry the labels.
    for key in [
        secret_key("support-credentials"),
        deployment_key("support-relay"),
        service_key("support-relay"),
        pvc_key("support-data"),
    ] {
        let object = server.get(&key).unwrap_or_else(|| panic!("{key:?} exists"));
        let owner = &object["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "MessagingEndpoint", "{key:?}");
        assert_eq!(owner["uid"], uid, "{key:?}");
        assert_eq!(owner["controller"], true, "{key:?}");
        assert_eq!(
            object["metadata"]["labels"]["app.kubernetes.io/instance"],
            "support"
        );
        assert_eq!(
            object["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "botrelay-operator"
        );
    }
    let secret = server.get(&secret_key("support-credentials")).unwrap();
    let mut keys: Vec<&String> = secret["data"].as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "bot-signing-secret",
            "bot-token",
            "client-token",
            "response-signing-secret"
        ]
    );
    let deployment = server.get(&deployment_key("support-relay")).unwrap();
    let a = args(&deployment);
    assert_eq!(
        flag(&a, "--bot-url").unwrap(),
        "http://support-bot.shop.svc:8080/events"
    );
    assert_eq!(flag(&a, "--bot-timeout").unwrap(), "10s");
    assert_eq!(flag(&a, "--max-attempts").unwrap(), "5");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "botrelay/relay:0.1.0"
    );
    let service = server.get(&service_key("support-relay")).unwrap();
    let ports: Vec<(&str, i64)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["port"].as_i64().unwrap()))
        .collect();
    assert_eq!(ports, [("http", 8080), ("metrics", 9090)]);

    // Events tell the story (published right after the status write).
    eventually(
        10,
        "CredentialsGenerated and RelayReady events",
        &operator,
        || {
            let events = server.list("events.k8s.io", "events", Some(NS));
            let reasons: Vec<&str> = events.iter().filter_map(|e| e["reason"].as_str()).collect();
            (reasons.contains(&"CredentialsGenerated") && reasons.contains(&"RelayReady"))
                .then_some(())
        },
    )
    .await;

    // Steady state: nothing but the Lease renewal is written again (no reconcile storm).
    let not_lease = |k: &Key| k.resource != "leases";
    let rv = server.last_change(not_lease);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        server.last_change(not_lease),
        rv,
        "the operator keeps writing in steady state"
    );

    // No Secret is listed or watched (that would need the right to read every
    // Secret of the cluster); Services and PVCs are watched as metadata only,
    // Deployments whole (their status makes the endpoint's).
    let metadata_only = server.metadata_only_calls();
    for call in server.calls() {
        assert!(
            !(call.resource == "secrets" && matches!(call.verb.as_str(), "list" | "watch")),
            "{call:?}: Secrets must not be listed or watched"
        );
        if matches!(
            call.resource.as_str(),
            "services" | "persistentvolumeclaims"
        ) && matches!(call.verb.as_str(), "list" | "watch")
        {
            assert!(
                metadata_only.contains(&call),
                "{call:?} fetched whole objects"
            );
        }
    }
    assert!(metadata_only.contains(&Call::new("watch", "", "services")));
    assert!(
        server
            .calls()
            .contains(&Call::new("watch", "apps", "deployments"))
    );

    // Admin server: health, readiness and the metrics the chart relies on.
    assert_eq!(operator.admin_get("/healthz").await.0, 200);
    assert_eq!(operator.admin_get("/readyz").await.0, 200);
    assert_eq!(operator.metric("botrelay_operator_leader").await, Some(1.0));
    assert_eq!(
        operator
            .metric("botrelay_operator_endpoints{ready=\"true\"}")
            .await,
        Some(1.0)
    );
    assert!(
        operator
            .metric("botrelay_operator_reconciliations_total{result=\"success\"}")
            .await
            .unwrap()
            >= 1.0
    );
    assert!(
        operator
            .metric("botrelay_operator_reconcile_duration_seconds_count")
            .await
            .unwrap()
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_change_rolls_the_deployment_but_never_regenerates_the_secret() {
    let server = start_server().await;
    let operator = Operator::start(&server, "op-1", &[]);
    create_endpoint(&server, "support", json!({}));
    wait_reason(&server, &operator, "support", "RelayReady").await;
    let secret_before = server.get(&secret_key("support-credentials")).unwrap()["data"].clone();
    let checksum_before = checksum(&server.get(&deployment_key("support-relay")).unwrap());

    server
        .merge_patch(
            &ep_key("support"),
            json!({"spec": {"bot": {"url": "http://new-bot.shop.svc/events"}, "delivery": {"dedupeWindow": "48h"}}}),
            false,
        )
        .unwrap();
    let deployment = eventually(20, "Deployment with the new bot URL", &operator, || {
        let d = server.get(&deployment_key("support-relay"))?;
        (flag(&args(&d), "--bot-url")? == "http://new-bot.shop.svc/events").then_some(d)
    })
    .await;
    assert_eq!(flag(&args(&deployment), "--dedupe-window").unwrap(), "48h");
    assert_ne!(
        checksum(&deployment),
        checksum_before,
        "config change must roll the pods"
    );
    let ep = eventually(20, "status of generation 2", &operator, || {
        let ep = server.get(&ep_key("support"))?;
        (ep["status"]["observedGeneration"] == 2 && condition(&ep, "Ready")?["status"] == "True")
            .then_some(ep)
    })
    .await;
    assert_eq!(ep["metadata"]["generation"], 2);
    assert_eq!(
        server.get(&secret_key("support-credentials")).unwrap()["data"],
        secret_before,
        "the generated Secret must never be regenerated"
    );

    // Someone deletes the Service: it comes back.
    server.delete(&service_key("support-relay")).unwrap();
    eventually(20, "Service re-created", &operator, || {
        server.get(&service_key("support-relay"))
    })
    .await;

    // Someone deletes one key: at the next reconcile (Secrets are not
    // watched; here a change of the endpoint's spec brings it at once) only
    // that key is generated again, the others stay.
    server
        .merge_patch(
            &secret_key("support-credentials"),
            json!({"data": {"bot-token": null}}),
            false,
        )
        .unwrap();
    server
        .merge_patch(
            &ep_key("support"),
            json!({"spec": {"delivery": {"maxAttempts": 7}}}),
            false,
        )
        .unwrap();
    let repaired = eventually(20, "bot-token regenerated", &operator, || {
        let s = server.get(&secret_key("support-credentials"))?;
        s["data"]["bot-token"].is_string().then_some(s)
    })
    .await;
    assert_ne!(repaired["data"]["bot-token"], secret_before["bot-token"]);
    assert_eq!(
        repaired["data"]["client-token"],
        secret_before["client-token"]
    );
    assert_eq!(
        repaired["data"]["bot-signing-secret"],
        secret_before["bot-signing-secret"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_secret_missing_a_key_gets_a_condition_until_fixed() {
    let server = start_server().await;
    let operator = Operator::start(&server, "op-1", &[]);
    create_endpoint(
        &server,
        "byo",
        json!({"credentialsSecretRef": {"name": "my-tokens"}}),
    );
    let ep = wait_reason(&server, &operator, "byo", "SecretNotFound").await;
    assert!(
        condition(&ep, "Ready").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("my-tokens")
    );
    assert_eq!(condition(&ep, "Degraded").unwrap()["status"], "True");

    server
        .create(
            "",
            "secrets",
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "my-tokens", "namespace": NS},
                   "data": {"client-token": b64("c"), "bot-token": b64("b"), "bot-signing-secret": b64("whsec_x")}}),
        )
        .unwrap();
    let ep = wait_reason(&server, &operator, "byo", "MissingSecretKey").await;
    assert_eq!(
        condition(&ep, "Ready").unwrap()["message"],
        "Secret my-tokens lacks response-signing-secret"
    );
    assert!(
        server.get(&deployment_key("byo-relay")).is_none(),
        "no relay without credentials"
    );
    assert!(
        server.get(&secret_key("byo-credentials")).is_none(),
        "no generated Secret"
    );

    server
        .merge_patch(
            &secret_key("my-tokens"),
            json!({"data": {"response-signing-secret": b64("whsec_y")}}),
            false,
        )
        .unwrap();
    let ep = wait_reason(&server, &operator, "byo", "RelayReady").await;
    assert_eq!(ep["status"]["credentialsSecret"], "my-tokens");
    let deployment = server.get(&deployment_key("byo-relay")).unwrap();
    assert_eq!(
        deployment["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"],
        "my-tokens"
    );
    // The user's Secret is left as the user wrote it.
    let secret = server.get(&secret_key("my-tokens")).unwrap();
    assert!(secret["metadata"]["ownerReferences"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_secret_is_checked_and_mounted_never_written_into_the_deployment() {
    let server = start_server().await;
    let operator = Operator::start(&server, "op-1", &[]);
    create_endpoint(
        &server,
        "hdr",
        json!({"bot": {"url": "http://support-bot.shop.svc:8080/events",
                       "headers": [{"name": "X-Api-Key",
                                    "valueFrom": {"secretKeyRef": {"name": "bot-api", "key": "key"}}}]}}),
    );
    let ep = wait_reason(&server, &operator, "hdr", "SecretNotFound").await;
    assert_eq!(
        condition(&ep, "Ready").unwrap()["message"],
        "Secret bot-api (spec.bot.headers[0].valueFrom) not found in namespace shop"
    );
    // A value too long for a header would stop the relay at start: said here instead.
    server
        .create(
            "",
            "secrets",
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "bot-api", "namespace": NS},
                   "data": {"key": b64(&"k".repeat(5000))}}),
        )
        .unwrap();
    let ep = wait_reason(&server, &operator, "hdr", "InvalidSecretValue").await;
    assert!(
        condition(&ep, "Ready").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("over 4096 bytes")
    );
    assert!(server.get(&deployment_key("hdr-relay")).is_none());
    server
        .merge_patch(
            &secret_key("bot-api"),
            json!({"data": {"key": b64("s3cret-value")}}),
            false,
        )
        .unwrap();
    wait_reason(&server, &operator, "hdr", "RelayReady").await;
    let deployment = server.get(&deployment_key("hdr-relay")).unwrap();
    let text = deployment.to_string();
    assert!(!text.contains("s3cret-value") && !text.contains(&b64("s3cret-value")));
    assert!(
        args(&deployment)
            .iter()
            .any(|a| a == "X-Api-Key=/var/run/botrelay/headers/bot-0/value"),
        "{:?}",
        args(&deployment)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_get_a_condition_naming_the_field_and_nothing_is_applied() {
    let server = start_server().await;
    let operator = Operator::start(&server, "op-1", &[]);
    create_endpoint(
        &server,
        "bad-url",
        json!({"bot": {"url": "ftp://bot.example/x"}}),
    );
    create_endpoint(&server, "too-many", json!({"replicas": 3}));
    let ep = wait_reason(&server, &operator, "bad-url", "InvalidSpec").await;
    let message = condition(&ep, "Ready").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.starts_with("spec.bot.url: \"ftp://bot.example/x\" has scheme \"ftp\""),
        "{message}"
    );
    let ep = wait_reason(&server, &operator, "too-many", "InvalidSpec").await;
    assert!(
        condition(&ep, "Degraded").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("spec.replicas: 3 replicas need storage.type nats")
    );
    for name in ["bad-url", "too-many"] {
        assert!(
            server
                .get(&deployment_key(&format!("{name}-relay")))
                .is_none()
        );
    }
    // Fixing the spec brings the relay up.
    server
        .merge_patch(&ep_key("too-many"), json!({"spec": {"replicas": 1}}), false)
        .unwrap();
    wait_reason(&server, &operator, "too-many", "RelayReady").await;
    // The operator never crashed.
    assert_eq!(operator.admin_get("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_endpoint_gets_a_condition_and_the_others_still_reconcile() {
    let server = start_server().await;
    // The malformed object is there before the operator's first list.
    create_endpoint(
        &server,
        "broken",
        json!({"bot": "not-an-object", "replicas": "many"}),
    );
    let operator = Operator::start(&server, "op-1", &[]);
    create_endpoint(&server, "fine", json!({}));
    wait_reason(&server, &operator, "fine", "RelayReady").await;
    let broken = wait_reason(&server, &operator, "broken", "InvalidObject").await;
    assert!(
        condition(&broken, "Ready").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("does not match the MessagingEndpoint schema")
    );
    // And endpoints created later are still seen.
    create_endpoint(&server, "later", json!({}));
    wait_reason(&server, &operator, "later", "RelayReady").await;
    assert!(
        operator
            .metric("botrelay_operator_reconcile_errors_total{reason=\"undecodable_object\"}")
            .await
            .unwrap()
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_not_ready_is_reported_then_ready_when_pods_come_up() {
    let server = start_server().await;
    server.simulate_deployments(false);
    let operator = Operator::start(&server, "op-1", &[]);
    create_endpoint(&server, "slow", json!({}));
    let ep = wait_reason(&server, &operator, "slow", "RelayNotReady").await;
    assert_eq!(condition(&ep, "Progressing").unwrap()["status"], "True");
    let not_ready_since = condition(&ep, "Ready").unwrap()["lastTransitionTime"].clone();
    // Times have one-second precision: let the clock move on.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // The Deployment controller reports the pod ready.
    report_one_pod_ready(&server, "slow-relay");
    let key = deployment_key("slow-relay");
    let ep = wait_reason(&server, &operator, "slow", "RelayReady").await;
    assert_ne!(
        condition(&ep, "Ready").unwrap()["lastTransitionTime"],
        not_ready_since
    );

    // A rollout that exceeds its deadline is Degraded with the reason.
    server
        .merge_patch(
            &key,
            json!({"status": {"readyReplicas": 0, "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet has timed out progressing."}]}}),
            true,
        )
        .unwrap();
    let ep = eventually(20, "RolloutStuck", &operator, || {
        let ep = server.get(&ep_key("slow"))?;
        (condition(&ep, "Degraded")?["reason"] == "RolloutStuck").then_some(ep)
    })
    .await;
    assert_eq!(condition(&ep, "Ready").unwrap()["status"], "False");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_endpoint_deletes_everything_it_owns() {
    let server = start_server().await;
    let operator = Operator::start(&server, "op-1", &[]);
    create_endpoint(&server, "gone", json!({}));
    wait_reason(&server, &operator, "gone", "RelayReady").await;
    server.delete(&ep_key("gone")).unwrap();
    // The test server's garbage collector follows ownerReferences, as the real one does.
    for key in [
        secret_key("gone-credentials"),
        deployment_key("gone-relay"),
        service_key("gone-relay"),
        pvc_key("gone-data"),
    ] {
        assert!(server.get(&key).is_none(), "{key:?} still exists");
    }
    // And the operator does not bring them back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(server.get(&deployment_key("gone-relay")).is_none());
    assert_eq!(operator.admin_get("/healthz").await.0, 200);
}

/// Who holds the operator's Lease now.
fn lease_holder(server: &TestApiServer) -> Option<String> {
    let lease = server.get(&Key::new(
        "coordination.k8s.io",
        "leases",
        LEASE_NS,
        "botrelay-operator",
    ))?;
    lease["spec"]["holderIdentity"].as_str().map(String::from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_leader_and_a_clean_handover_on_sigterm() {
    let server = start_server().await;
    let mut first = Operator::start(&server, "op-a", &[]);
    eventually(20, "op-a leading", &first, || {
        (lease_holder(&server)? == "op-a").then_some(())
    })
    .await;
    let second = Operator::start(&server, "op-b", &[]);
    create_endpoint(&server, "one", json!({}));
    wait_reason(&server, &first, "one", "RelayReady").await;
    // The standby is healthy and ready, but not leading and not reconciling.
    eventually(10, "op-b admin up", &second, || Some(())).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(second.admin_get("/readyz").await.0, 200);
    assert_eq!(second.metric("botrelay_operator_leader").await, Some(0.0));
    assert_eq!(
        second
            .metric("botrelay_operator_reconciliations_total{result=\"success\"}")
            .await,
        Some(0.0)
    );

    assert_eq!(
        first.terminate(),
        Some(0),
        "SIGTERM ends the operator cleanly"
    );
    eventually(20, "op-b leading", &second, || {
        (lease_holder(&server)? == "op-b").then_some(())
    })
    .await;
    create_endpoint(&server, "two", json!({}));
    wait_reason(&server, &second, "two", "RelayReady").await;
    assert_eq!(second.metric("botrelay_operator_leader").await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_applies_are_reported_retried_with_backoff_and_recover() {
    let server = start_server().await;
    // Every Deployment apply fails until the test has seen the condition: the
    // transient state cannot slip by between two polls.
    server.fail_until_cleared("patch", "apps", "deployments", 500);
    let operator = Operator::start(&server, "op-1", &[]);
    create_endpoint(&server, "flaky", json!({}));
    let ep = wait_reason(&server, &operator, "flaky", "ApplyFailed").await;
    assert_eq!(
        condition(&ep, "Degraded").unwrap()["message"],
        "apply_deployment: injected failure (InternalError, HTTP 500)"
    );
    let served = server.clear_failures();
    assert!(served >= 1);
    wait_reason(&server, &operator, "flaky", "RelayReady").await;
    // Each failed apply was one failed reconcile, counted by its step.
    assert_eq!(
        operator
            .metric("botrelay_operator_reconcile_errors_total{reason=\"apply_deployment\"}")
            .await,
        Some(f64::from(served))
    );
    assert!(
        operator
            .metric("botrelay_operator_reconciliations_total{result=\"error\"}")
            .await
            .unwrap()
            >= f64::from(served)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_watched_namespaces_are_reconciled() {
    let server = start_server().await;
    let operator = Operator::start(
        &server,
        "op-1",
        &[("BOTRELAY_WATCH_NAMESPACES", "shop,other")],
    );
    let mut elsewhere = endpoint("ignored", json!({}));
    elsewhere["metadata"]["namespace"] = json!("not-watched");
    server
        .create("botrelay.dev", "messagingendpoints", elsewhere)
        .unwrap();
    create_endpoint(&server, "seen", json!({}));
    wait_reason(&server, &operator, "seen", "RelayReady").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ignored = server
        .get(&Key::new(
            "botrelay.dev",
            "messagingendpoints",
            "not-watched",
            "ignored",
        ))
        .unwrap();
    assert!(ignored["status"].is_null());
    assert!(
        server
            .get(&Key::new(
                "apps",
                "deployments",
                "not-watched",
                "ignored-relay"
            ))
            .is_none()
    );
    // Namespaced lists and watches only (a Role per namespace suffices), in both namespaces.
    let scopes: std::collections::BTreeSet<Option<String>> = server
        .scoped_calls()
        .into_iter()
        .filter(|(c, _)| c.verb == "list" || c.verb == "watch")
        .map(|(_, ns)| ns)
        .collect();
    assert_eq!(
        scopes,
        [Some("other".to_string()), Some("shop".to_string())].into()
    );
    assert_eq!(
        operator
            .metric("botrelay_operator_endpoints{ready=\"true\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_once_its_lease_expires() {
    let server = start_server().await;
    let mut first = Operator::start(&server, "op-a", &[]);
    eventually(20, "op-a leading", &first, || {
        (lease_holder(&server)? == "op-a").then_some(())
    })
    .await;
    let second = Operator::start(&server, "op-b", &[]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        lease_holder(&server).as_deref(),
        Some("op-a"),
        "the leader keeps its Lease"
    );

    // SIGKILL: no release; the Lease (3 s in these tests) must expire first.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let killed_at = std::time::Instant::now();
    eventually(30, "op-b leading", &second, || {
        (lease_holder(&server)? == "op-b").then_some(())
    })
    .await;
    assert!(
        killed_at.elapsed() >= Duration::from_secs(1),
        "op-b took over before the dead leader's Lease could expire"
    );
    create_endpoint(&server, "after", json!({}));
    wait_reason(&server, &second, "after", "RelayReady").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_leader_election_it_reconciles_at_once_and_never_touches_a_lease() {
    let server = start_server().await;
    let mut operator = Operator::start(&server, "solo", &[("BOTRELAY_LEADER_ELECTION", "false")]);
    create_endpoint(&server, "solo", json!({}));
    wait_reason(&server, &operator, "solo", "RelayReady").await;
    assert_eq!(operator.metric("botrelay_operator_leader").await, Some(1.0));
    assert_eq!(operator.terminate(), Some(0));
    assert!(
        server.calls().iter().all(|c| c.resource != "leases"),
        "{:?}",
        server.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_endpoint_runs_several_relay_pods_without_a_volume() {
    let server = start_server().await;
    let operator = Operator::start(&server, "op-1", &[]);
    create_endpoint(
        &server,
        "ha",
        json!({"replicas": 3, "storage": {"type": "nats", "nats": {
            "urls": ["nats://nats-0.nats.svc:4222", "nats://nats-1.nats.svc:4222"],
            "credentialsSecretRef": {"name": "nats-user"},
            "streamReplicas": 3,
        }}}),
    );
    // The credentials file's Secret is missing: said in the status, no relay yet.
    let ep = wait_reason(&server, &operator, "ha", "SecretNotFound").await;
    assert!(
        condition(&ep, "Ready").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("Secret nats-user (spec.storage.nats.credentialsSecretRef) not found"),
        "{ep}"
    );
    assert!(server.get(&deployment_key("ha-relay")).is_none());
    server
        .create(
            "",
            "secrets",
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "nats-user", "namespace": NS},
                   "data": {"nats.creds": b64("-----BEGIN NATS USER JWT-----")}}),
        )
        .unwrap();
    let ep = wait_reason(&server, &operator, "ha", "RelayReady").await;
    assert_eq!(ep["status"]["replicas"], 3);
    assert_eq!(ep["status"]["readyReplicas"], 3);

    let deployment = server.get(&deployment_key("ha-relay")).unwrap();
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], 3);
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let a = args(&deployment);
    assert_eq!(flag(&a, "--store").unwrap(), "nats");
    assert_eq!(
        flag(&a, "--nats-url").unwrap(),
        "nats://nats-0.nats.svc:4222,nats://nats-1.nats.svc:4222"
    );
    assert_eq!(flag(&a, "--nats-prefix").unwrap(), format!("{NS}_ha"));
    assert_eq!(
        flag(&a, "--nats-credentials").unwrap(),
        "/var/run/botrelay/nats-credentials/nats.creds"
    );
    let pod = &spec["template"]["spec"];
    let spread: Vec<&str> = pod["topologySpreadConstraints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["topologyKey"].as_str().unwrap())
        .collect();
    assert_eq!(
        spread,
        ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
    );
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "nats-user")
    );
    assert!(
        server.get(&pvc_key("ha-data")).is_none(),
        "no volume for the nats store"
    );
    let pdb = server
        .get(&Key::new("policy", "poddisruptionbudgets", NS, "ha-relay"))
        .expect("a PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert_eq!(
        pdb["metadata"]["ownerReferences"][0]["name"], "ha",
        "deleted with the endpoint"
    );
}
