//! The test API server refuses what kube-apiserver refuses, over HTTP as the
//! operator meets it: RBAC verbs (an apply that creates needs `create`),
//! stale resourceVersions, expired watches and list continuations, pages,
//! status-only writes, and pruning by an installed CRD's schema.

use std::time::Duration;

use botrelay_test_apiserver::{Key, Policy, TestApiServer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.0 request: (status code, body as JSON or as a string).
async fn request(
    server: &TestApiServer,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, Value) {
    let addr = server.url().trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer test-token\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let code = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1;
    let value = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
    (code, value)
}

async fn get(server: &TestApiServer, path: &str) -> (u16, Value) {
    request(server, "GET", path, "application/json", "").await
}

async fn apply(server: &TestApiServer, path: &str, body: Value) -> (u16, Value) {
    request(
        server,
        "PATCH",
        &format!("{path}?fieldManager=op&force=true"),
        "application/apply-patch+yaml",
        &body.to_string(),
    )
    .await
}

fn secret(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "shop"}, "data": {}})
}

fn patch_only_role() -> Policy {
    Policy::from_roles(
        "system:serviceaccount:botrelay:botrelay-operator",
        &[
            json!({"kind": "ClusterRole", "metadata": {"name": "op"}, "rules": [
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "patch"]},
            ]}),
        ],
    )
    .unwrap()
}

#[tokio::test]
async fn an_apply_that_creates_is_refused_under_a_patch_only_role() {
    let server = TestApiServer::start().await;
    server.enforce(patch_only_role());
    let path = "/api/v1/namespaces/shop/secrets/support-credentials";
    let (code, body) = apply(&server, path, secret("support-credentials")).await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(body["reason"], "Forbidden");
    assert_eq!(
        body["message"],
        "secrets \"support-credentials\" is forbidden: User \"system:serviceaccount:botrelay:botrelay-operator\" \
         cannot create resource \"secrets\" in API group \"\" in the namespace \"shop\""
    );
    assert!(
        server
            .get(&Key::new("", "secrets", "shop", "support-credentials"))
            .is_none()
    );
    assert_eq!(server.forbidden_count(), 1);

    // The same apply on an object that exists is a patch, which the role grants.
    server
        .create("", "secrets", secret("support-credentials"))
        .unwrap();
    let (code, body) = apply(&server, path, secret("support-credentials")).await;
    assert_eq!(code, 200, "{body}");
    // Listing was never granted.
    let (code, _) = get(&server, "/api/v1/secrets").await;
    assert_eq!(code, 403);
}

#[tokio::test]
async fn an_apply_that_creates_is_recorded_as_patch_and_create() {
    let server = TestApiServer::start().await;
    let path = "/api/v1/namespaces/shop/secrets/s";
    apply(&server, path, secret("s")).await;
    let verbs: Vec<String> = server.calls().into_iter().map(|c| c.verb).collect();
    assert_eq!(verbs, ["create", "patch"]);
    apply(&server, path, secret("s")).await;
    assert_eq!(server.call_count("patch", "", "secrets"), 2);
    assert_eq!(server.call_count("create", "", "secrets"), 1);
    let key = Key::new("", "secrets", "shop", "s");
    assert_eq!(server.object_requests()[&("apply".to_string(), key)], 2);
}

#[tokio::test]
async fn a_stale_resource_version_is_a_conflict() {
    let server = TestApiServer::start().await;
    let created = server.create("", "secrets", secret("s")).unwrap();
    let rv = created["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    server
        .merge_patch(
            &Key::new("", "secrets", "shop", "s"),
            json!({"data": {"a": "Yg=="}}),
            false,
        )
        .unwrap();
    let stale = json!({"metadata": {"resourceVersion": rv}, "data": {"b": "Yg=="}}).to_string();
    let path = "/api/v1/namespaces/shop/secrets/s";
    let (code, body) = request(
        &server,
        "PATCH",
        path,
        "application/merge-patch+json",
        &stale,
    )
    .await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (409, Some("Conflict")),
        "{body}"
    );
    let mut put = secret("s");
    put["metadata"]["resourceVersion"] = json!(rv);
    let (code, _) = request(&server, "PUT", path, "application/json", &put.to_string()).await;
    assert_eq!(code, 409);
}

#[tokio::test]
async fn a_watch_from_compacted_history_is_gone_and_open_watches_can_be_ended() {
    let server = TestApiServer::start().await;
    let first = server.create("", "secrets", secret("a")).unwrap();
    let old_rv = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    server.create("", "secrets", secret("b")).unwrap();
    server.compact();
    let (code, body) = get(
        &server,
        &format!("/api/v1/secrets?watch=true&resourceVersion={old_rv}"),
    )
    .await;
    assert_eq!(code, 200);
    let event = body;
    assert_eq!(event["type"], "ERROR");
    assert_eq!(
        (
            event["object"]["code"].as_u64(),
            event["object"]["reason"].as_str()
        ),
        (Some(410), Some("Expired"))
    );
    assert_eq!(server.expired_count(), 1);

    // A watch from now on works, and ends when the server ends every watch.
    let rv = server.resource_version();
    let watch = tokio::spawn({
        let url = server.url();
        async move {
            let addr = url.trim_start_matches("http://").to_string();
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "GET /api/v1/secrets?watch=true&resourceVersion={rv} HTTP/1.0\r\nHost: x\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut out = String::new();
            stream.read_to_string(&mut out).await.unwrap();
            out
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.create("", "secrets", secret("c")).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.close_watches();
    let out = tokio::time::timeout(Duration::from_secs(5), watch)
        .await
        .expect("watch ended")
        .unwrap();
    assert!(out.contains("\"name\":\"c\""), "{out}");
    assert!(!out.contains("\"name\":\"a\""), "{out}");
}

#[tokio::test]
async fn lists_are_paged_at_the_first_pages_resource_version() {
    let server = TestApiServer::start().await;
    for name in ["a", "b", "c", "d", "e"] {
        server.create("", "secrets", secret(name)).unwrap();
    }
    let (code, page1) = get(&server, "/api/v1/namespaces/shop/secrets?limit=2").await;
    assert_eq!(code, 200);
    let names = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&page1), ["a", "b"]);
    assert_eq!(page1["metadata"]["remainingItemCount"], 3);
    let token = page1["metadata"]["continue"].as_str().unwrap().to_string();
    // Changes after the first page do not show in the later pages.
    server
        .delete(&Key::new("", "secrets", "shop", "c"))
        .unwrap();
    server.create("", "secrets", secret("f")).unwrap();
    let (_, page2) = get(
        &server,
        &format!("/api/v1/namespaces/shop/secrets?limit=2&continue={token}"),
    )
    .await;
    assert_eq!(names(&page2), ["c", "d"]);
    assert_eq!(
        page2["metadata"]["resourceVersion"],
        page1["metadata"]["resourceVersion"]
    );
    let token = page2["metadata"]["continue"].as_str().unwrap().to_string();
    let (_, page3) = get(
        &server,
        &format!("/api/v1/namespaces/shop/secrets?limit=2&continue={token}"),
    )
    .await;
    assert_eq!(names(&page3), ["e"]);
    assert!(page3["metadata"].get("continue").is_none());
    // A continuation from compacted history is gone.
    server.compact();
    let (code, body) = get(
        &server,
        &format!("/api/v1/namespaces/shop/secrets?limit=2&continue={token}"),
    )
    .await;
    assert_eq!((code, body["reason"].as_str()), (410, Some("Expired")));
}

#[tokio::test]
async fn status_is_written_only_through_its_subresource_where_there_is_one() {
    let server = TestApiServer::start().await;
    server.create("", "secrets", secret("s")).unwrap();
    let (code, _) = request(
        &server,
        "PATCH",
        "/api/v1/namespaces/shop/secrets/s/status",
        "application/merge-patch+json",
        "{\"status\": {}}",
    )
    .await;
    assert_eq!(code, 404, "Secrets have no status subresource");
}

#[tokio::test]
async fn an_installed_crd_prunes_unknown_fields_and_fills_defaults() {
    let server = TestApiServer::start().await;
    let crd = json!({"spec": {"group": "example.dev", "names": {"plural": "widgets"}, "versions": [{
        "name": "v1", "storage": true, "subresources": {"status": {}},
        "schema": {"openAPIV3Schema": {"type": "object", "properties": {
            "spec": {"type": "object", "properties": {"size": {"type": "integer", "default": 3}}},
            "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
        }}},
    }]}});
    server.install_crd(&crd).unwrap();
    let path = "/apis/example.dev/v1/namespaces/shop/widgets/w";
    let body = json!({"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "w"},
                      "spec": {"colour": "red"}});
    let (code, stored) = apply(&server, path, body).await;
    assert_eq!(code, 201, "{stored}");
    assert_eq!(stored["spec"], json!({"size": 3}));
    let status = json!({"apiVersion": "example.dev/v1", "kind": "Widget", "metadata": {"name": "w"},
                        "status": {"ready": true, "readyReplicas": 1}});
    let (code, stored) = apply(&server, &format!("{path}/status"), status).await;
    assert_eq!(code, 200, "{stored}");
    assert_eq!(stored["status"], json!({"ready": true}));
}

#[tokio::test]
async fn only_the_kinds_that_have_one_carry_a_generation() {
    let server = TestApiServer::start().await;
    let secret = server.create("", "secrets", secret("s")).unwrap();
    assert!(secret["metadata"].get("generation").is_none(), "{secret}");
    let deployment = server
        .create(
            "apps",
            "deployments",
            json!({"metadata": {"name": "d", "namespace": "shop"}, "spec": {"replicas": 1}}),
        )
        .unwrap();
    assert_eq!(deployment["metadata"]["generation"], 1);
}

#[tokio::test]
async fn an_object_leaving_a_watched_selector_is_deleted_for_that_watch() {
    let server = TestApiServer::start().await;
    let mut labelled = secret("s");
    labelled["metadata"]["labels"] = json!({"app": "x"});
    server.create("", "secrets", labelled).unwrap();
    let rv = server.resource_version();
    let watch = tokio::spawn({
        let url = server.url();
        async move {
            let addr = url.trim_start_matches("http://").to_string();
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "GET /api/v1/secrets?watch=true&labelSelector=app%3Dx&resourceVersion={rv} HTTP/1.0\r\nHost: x\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            let mut out = String::new();
            stream.read_to_string(&mut out).await.unwrap();
            out
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let key = Key::new("", "secrets", "shop", "s");
    server
        .merge_patch(&key, json!({"metadata": {"labels": {"app": null}}}), false)
        .unwrap();
    server
        .merge_patch(&key, json!({"metadata": {"labels": {"app": "x"}}}), false)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.close_watches();
    let out = tokio::time::timeout(Duration::from_secs(5), watch)
        .await
        .unwrap()
        .unwrap();
    let types: Vec<String> = out
        .split("\r\n\r\n")
        .nth(1)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(types, ["DELETED", "ADDED"]);
}
