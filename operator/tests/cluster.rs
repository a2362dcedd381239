//! Against a real cluster (kind, k3d, …) reached through `KUBECONFIG`, with the
//! operator installed (e.g. by the chart). Ignored by default:
//!
//!     KUBECONFIG=~/.kube/config cargo test -p botrelay-operator --test cluster -- --ignored --test-threads=1
//!
//! Set `BOTRELAY_E2E_EXPECT_READY=1` when the relay image is available to the
//! cluster, to also wait for the relay pod to become Ready.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use botrelay_operator::crd::MessagingEndpoint;

async fn client() -> Client {
    Client::try_default()
        .await
        .expect("KUBECONFIG points at a reachable cluster")
}

async fn temp_namespace(client: &Client) -> String {
    let name = format!("botrelay-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    let _ = namespaces.create(&PostParams::default(), &ns).await;
    name
}

fn endpoint(name: &str, extra: serde_json::Value) -> MessagingEndpoint {
    let mut value = json!({
        "apiVersion": "botrelay.dev/v1alpha1", "kind": "MessagingEndpoint",
        "metadata": {"name": name},
        "spec": {
            "bot": {"url": "http://bot.example.svc:8080/events"},
            "responseEndpoint": {"url": "https://backend.example/bot-responses"},
        },
    });
    if let Some(extra) = extra.as_object() {
        for (k, v) in extra {
            value["spec"][k] = v.clone();
        }
    }
    serde_json::from_value(value).unwrap()
}

#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG"]
async fn the_api_server_accepts_the_generated_crd() {
    let client = client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    let crd = botrelay_operator::crd();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("botrelay-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("the API server takes the CRD (structural schema)");
}

#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG"]
async fn the_api_server_rejects_invalid_specs() {
    let client = client().await;
    let ns = temp_namespace(&client).await;
    let api: Api<MessagingEndpoint> = Api::namespaced(client.clone(), &ns);
    for (name, extra, field) in [
        (
            "bad-url",
            json!({"bot": {"url": "ftp://x"}}),
            "spec.bot.url",
        ),
        ("bad-replicas", json!({"replicas": 3}), "replicas"),
        (
            "bad-duration",
            json!({"delivery": {"botTimeout": "ten"}}),
            "spec.delivery.botTimeout",
        ),
        (
            "bad-backoff",
            json!({"delivery": {"retryInitialBackoff": "10m", "retryMaxBackoff": "1m"}}),
            "retryInitialBackoff",
        ),
    ] {
        let err = api
            .create(&PostParams::default(), &endpoint(name, extra))
            .await
            .expect_err(name);
        assert!(err.to_string().contains(field), "{name}: {err}");
    }
    let _ = Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await;
}

#[tokio::test]
#[ignore = "needs a cluster with the operator installed: KUBECONFIG"]
async fn an_endpoint_gets_its_objects_and_status() {
    let client = client().await;
    let ns = temp_namespace(&client).await;
    let api: Api<MessagingEndpoint> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &endpoint("support", json!({})))
        .await
        .unwrap();
    let expect_ready = std::env::var("BOTRELAY_E2E_EXPECT_READY").is_ok_and(|v| v == "1");
    let deadline = Instant::now() + Duration::from_secs(180);
    let ep = loop {
        let ep = api.get("support").await.unwrap();
        let status = ep.status.clone().unwrap_or_default();
        let ready = ep.condition("Ready").is_some_and(|c| c.status == "True");
        if status.webhook_url.is_some() && (!expect_ready || ready) {
            break ep;
        }
        assert!(
            Instant::now() < deadline,
            "no status after 180 s: {status:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let status = ep.status.unwrap();
    assert_eq!(
        status.webhook_url.as_deref(),
        Some(format!("http://support-relay.{ns}.svc:8080/v1/messages").as_str())
    );
    assert_eq!(
        status.credentials_secret.as_deref(),
        Some("support-credentials")
    );
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("support-credentials")
        .await
        .unwrap();
    assert_eq!(secret.data.unwrap().len(), 4);
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .get("support-relay")
        .await
        .unwrap();
    Api::<Service>::namespaced(client.clone(), &ns)
        .get("support-relay")
        .await
        .unwrap();
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .get("support-data")
        .await
        .unwrap();
    let _ = Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await;
}

/// Asks the real authorizer (SubjectAccessReview) what the chart's
/// ServiceAccount may do: every call the operator makes, create included,
/// and no listing or watching of Secrets.
#[tokio::test]
#[ignore = "needs a cluster with the chart installed: KUBECONFIG"]
async fn the_operator_service_account_may_do_what_it_needs_and_no_more() {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let client = client().await;
    let user = std::env::var("BOTRELAY_E2E_OPERATOR_USER")
        .unwrap_or_else(|_| "system:serviceaccount:botrelay:botrelay-operator".into());
    let reviews: Api<SubjectAccessReview> = Api::all(client);
    let allowed = |verb: &str, group: &str, resource: &str, namespace: Option<&str>| {
        let (resource, subresource) = match resource.split_once('/') {
            Some((r, s)) => (r.to_string(), Some(s.to_string())),
            None => (resource.to_string(), None),
        };
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.clone()),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.into()),
                    group: Some(group.into()),
                    resource: Some(resource),
                    subresource,
                    namespace: namespace.map(String::from),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let reviews = reviews.clone();
        async move {
            reviews
                .create(&PostParams::default(), &review)
                .await
                .expect("a SubjectAccessReview")
                .status
                .is_some_and(|s| s.allowed)
        }
    };
    for (verb, group, resource) in [
        ("create", "", "secrets"),
        ("patch", "", "secrets"),
        ("get", "", "secrets"),
        ("create", "apps", "deployments"),
        ("patch", "apps", "deployments"),
        ("create", "", "services"),
        ("create", "", "persistentvolumeclaims"),
        ("patch", "botrelay.dev", "messagingendpoints/status"),
        ("create", "events.k8s.io", "events"),
    ] {
        assert!(
            allowed(verb, group, resource, Some("shop")).await,
            "{user} may not {verb} {group}/{resource}"
        );
    }
    for (verb, resource) in [
        ("list", "secrets"),
        ("watch", "secrets"),
        ("delete", "secrets"),
    ] {
        assert!(
            !allowed(verb, "", resource, None).await,
            "{user} may {verb} {resource} across the cluster"
        );
    }
}
