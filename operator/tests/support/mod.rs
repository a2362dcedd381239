//! Runs the real `botrelay-operator` binary against the test API server.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use botrelay_test_apiserver::{Key, TestApiServer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const NS: &str = "shop";
pub const LEASE_NS: &str = "botrelay-system";

pub struct Operator {
    pub child: Child,
    pub admin: String,
    pub log: PathBuf,
    dir: PathBuf,
}

impl Operator {
    /// Starts the operator binary with leader election on, identity `identity`.
    pub fn start(server: &TestApiServer, identity: &str, extra_env: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "botrelay-operator-test-{}-{identity}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        server.write_kubeconfig(&kubeconfig, "default").unwrap();
        let log = dir.join("operator.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_botrelay-operator"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KUBECONFIG", &kubeconfig)
            // Port 0: the kernel picks a free port, which the log then names
            // (a port picked here could be taken by a client socket meanwhile).
            .env("BOTRELAY_ADMIN_LISTEN", "127.0.0.1:0")
            .env("BOTRELAY_LOG_LEVEL", "info,botrelay_operator=debug")
            .env("BOTRELAY_LEASE_DURATION_SECONDS", "3")
            .env("POD_NAMESPACE", LEASE_NS)
            .env("POD_NAME", identity)
            // No relay runs behind these endpoints: the reachability polls are
            // off unless a test serves the relays' admin pages and turns them on.
            .env("BOTRELAY_RELAY_POLL_INTERVAL", "0s");
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start botrelay-operator");
        let deadline = Instant::now() + Duration::from_secs(20);
        let admin = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let addr = text
                .lines()
                .filter(|l| l.contains("admin server listening"))
                .find_map(|l| {
                    serde_json::from_str::<Value>(l).ok()?["addr"]
                        .as_str()
                        .map(String::from)
                });
            if let Some(addr) = addr {
                break addr;
            }
            assert!(
                Instant::now() < deadline,
                "operator did not start its admin server:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Operator {
            child,
            admin,
            log,
            dir,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "operator did not stop within 20 s of SIGTERM:\n{}",
            self.logs()
        );
    }

    /// GET on the admin server: (status code, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let mut stream = match tokio::net::TcpStream::connect(&self.admin).await {
            Ok(s) => s,
            Err(e) => panic!(
                "admin server at {} unreachable ({e}); operator log:\n{}",
                self.admin,
                self.logs()
            ),
        };
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let code = response[9..12].parse().unwrap();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (code, body)
    }

    /// The value of one sample line of /metrics, e.g. `botrelay_operator_leader`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.admin_get("/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Keep the kubeconfig and log of a failed test for a look.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A test API server with the MessagingEndpoint CRD installed, so that its
/// schema prunes and defaults what is written, as a real server's does.
pub async fn start_server() -> TestApiServer {
    let server = TestApiServer::start().await;
    let crd = serde_json::to_value(botrelay_operator::crd()).expect("the CRD serializes");
    server.install_crd(&crd).expect("the CRD installs");
    server
}

/// Creates the endpoint `name` in namespace NS with `extra_spec` (as kubectl
/// would); returns it as stored.
pub fn create_endpoint(server: &TestApiServer, name: &str, extra_spec: Value) -> Value {
    server
        .create(
            "botrelay.dev",
            "messagingendpoints",
            endpoint(name, extra_spec),
        )
        .unwrap()
}

pub fn endpoint(name: &str, extra_spec: Value) -> Value {
    let mut spec = json!({
        "bot": {"url": "http://support-bot.shop.svc:8080/events"},
        "responseEndpoint": {"url": "https://backend.example/bot-responses"},
    });
    if let (Some(s), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        for (k, v) in extra {
            s.insert(k.clone(), v.clone());
        }
    }
    json!({
        "apiVersion": "botrelay.dev/v1alpha1",
        "kind": "MessagingEndpoint",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    })
}

pub fn ep_key(name: &str) -> Key {
    Key::new("botrelay.dev", "messagingendpoints", NS, name)
}
pub fn secret_key(name: &str) -> Key {
    Key::new("", "secrets", NS, name)
}
pub fn deployment_key(name: &str) -> Key {
    Key::new("apps", "deployments", NS, name)
}
pub fn service_key(name: &str) -> Key {
    Key::new("", "services", NS, name)
}
pub fn pvc_key(name: &str) -> Key {
    Key::new("", "persistentvolumeclaims", NS, name)
}

/// Standard base64, as a Secret's `data` holds its values.
pub fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Reports one relay pod of the Deployment `name` ready, at its
/// generation, as the Deployment controller would.
pub fn report_one_pod_ready(server: &TestApiServer, name: &str) {
    let key = deployment_key(name);
    let generation = server.get(&key).unwrap()["metadata"]["generation"].clone();
    server
        .merge_patch(
            &key,
            json!({"status": {"observedGeneration": generation, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1}}),
            true,
        )
        .unwrap();
}

/// The condition of `type_` in an object's status.
pub fn condition(object: &Value, type_: &str) -> Option<Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// Polls `check` until it returns Some, or fails after `secs` with the operator's log.
pub async fn eventually<T>(
    secs: u64,
    what: &str,
    operator: &Operator,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; operator log:\n{}",
                operator.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the endpoint's Ready condition has `reason`, returning the endpoint.
pub async fn wait_reason(
    server: &TestApiServer,
    operator: &Operator,
    name: &str,
    reason: &str,
) -> Value {
    eventually(
        30,
        &format!("{name} Ready reason {reason}"),
        operator,
        || {
            let ep = server.get(&ep_key(name))?;
            (condition(&ep, "Ready")?["reason"] == reason).then_some(ep)
        },
    )
    .await
}
