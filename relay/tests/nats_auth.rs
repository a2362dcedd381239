//! `--nats-credentials` against a NATS server that demands them: a server in
//! operator (JWT) mode, whose only account is JetStream-enabled, built here
//! from fresh nkeys as `nsc` would. A relay with the user's `.creds` file
//! stores and delivers; one without it, or with a user of an account the
//! server does not trust, is refused and says so in its log and `/readyz`.
//! Needs `nats-server` (see `common/nats.rs`).

mod common;

use base64::Engine;
use common::nats::{Cluster, fresh_prefix};
use common::*;
use nkeys::KeyPair;
use serde_json::{Value, json};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A NATS JWT: `claims` signed by `issuer` (the format of nats-io/jwt v2).
fn jwt(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let header = json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let claims = json!({
        "jti": b64(botrelay::ids::message_id().as_bytes()),
        "iat": 1_700_000_000u64,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64(&signature))
}

/// An account JWT allowing everything, JetStream included.
fn account_jwt(operator: &KeyPair, account: &KeyPair) -> String {
    jwt(
        operator,
        &account.public_key(),
        "relay",
        json!({
            "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                       "wildcards": true, "conn": -1, "leaf": -1, "mem_storage": -1,
                       "disk_storage": -1, "streams": -1, "consumer": -1},
            "default_permissions": {"pub": {}, "sub": {}},
            "type": "account", "version": 2
        }),
    )
}

/// A `.creds` file for a new user of `account`.
fn creds(account: &KeyPair) -> String {
    let user = KeyPair::new_user();
    let token = jwt(
        account,
        &user.public_key(),
        "relay",
        json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
               "type": "user", "version": 2}),
    );
    format!(
        "-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    )
}

/// A one-server cluster in operator mode trusting `account` only.
fn server_trusting(account: &KeyPair, dir: &std::path::Path) -> Cluster {
    let operator = KeyPair::new_operator();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "test-operator",
        json!({"type": "operator", "version": 2}),
    );
    // JetStream needs the server's own (system) account.
    let system = KeyPair::new_account();
    let config = dir.join("auth.conf");
    std::fs::write(
        &config,
        format!(
            "operator: {operator_jwt}\nsystem_account: {}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {}: {}\n  {}: {}\n}}\n",
            system.public_key(),
            system.public_key(),
            jwt(
                &operator,
                &system.public_key(),
                "SYS",
                json!({"type": "account", "version": 2})
            ),
            account.public_key(),
            account_jwt(&operator, account)
        ),
    )
    .unwrap();
    Cluster::start_with(1, &["-c", config.to_str().unwrap()])
}

fn nats_flags(cluster: &Cluster) -> Vec<String> {
    vec![
        "--store=nats".into(),
        format!("--nats-url=nats://127.0.0.1:{}", cluster.port(0)),
        format!("--nats-prefix={}", fresh_prefix()),
        "--nats-stream-replicas=1".into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_the_users_creds_file_stores_and_delivers() {
    let dir = tempfile::tempdir().unwrap();
    let account = KeyPair::new_account();
    let cluster = server_trusting(&account, dir.path());
    let creds_file = dir.path().join("relay.creds");
    std::fs::write(&creds_file, creds(&account)).unwrap();

    let bot = Peer::start(echo).await;
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let mut flags = nats_flags(&cluster);
    flags.push(format!("--nats-credentials={}", creds_file.display()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let relay = Relay::start(&bot.url(), &endpoint.url(), &flags).await;
    let (status, first) = relay.send(&message("u", "c", "m1", "hello")).await;
    assert_eq!(status, 200);
    // The dedupe record went through the authenticated connection too.
    let (status, again) = relay.send(&message("u", "c", "m1", "hello")).await;
    assert_eq!((status, again), (200, first));
    endpoint
        .wait_until("the reply", Duration::from_secs(20), |r| r.len() == 1)
        .await;
    assert_eq!(bot.received().len(), 1);
}

/// Starts the relay binary on `extra` flags without waiting for it to be
/// ready; returns the child, its admin address and its log file.
fn spawn_relay(
    extra: &[String],
    dir: &std::path::Path,
) -> (std::process::Child, String, std::path::PathBuf) {
    let credentials = write_credentials(dir);
    let (api, admin) = (free_addr(), free_addr());
    let log = dir.join("relay.log");
    let child = Command::new(env!("CARGO_BIN_EXE_botrelay"))
        .args([
            format!("--listen={api}"),
            format!("--admin-listen={admin}"),
            "--bot-url=http://127.0.0.1:9/bot".into(),
            "--response-url=http://127.0.0.1:9/response".into(),
            format!("--credentials-dir={}", credentials.display()),
            format!("--data-dir={}", dir.join("data").display()),
            "--log-format=json".into(),
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (child, admin.to_string(), log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_valid_creds_the_relay_is_refused_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let account = KeyPair::new_account();
    let cluster = server_trusting(&account, dir.path());
    // A user of another account, which the server does not trust.
    let stranger = dir.path().join("stranger.creds");
    std::fs::write(&stranger, creds(&KeyPair::new_account())).unwrap();

    for (case, creds_flag) in [
        ("no-creds", None),
        (
            "untrusted-account",
            Some(format!("--nats-credentials={}", stranger.display())),
        ),
    ] {
        let case_dir = dir.path().join(case);
        std::fs::create_dir_all(&case_dir).unwrap();
        let mut flags = nats_flags(&cluster);
        flags.extend(creds_flag);
        let (mut child, admin, log) = spawn_relay(&flags, &case_dir);
        let deadline = Instant::now() + Duration::from_secs(20);
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let says = text.lines().any(|l| {
                l.contains("the NATS store is not usable yet")
                    && l.to_lowercase().contains("authorization")
            });
            let readyz = get(&format!("http://{admin}/readyz"))
                .await
                .ok()
                .map(|(s, _, body)| (s, String::from_utf8_lossy(&body).to_string()));
            // /readyz fails and says why, as the log does.
            if says
                && readyz
                    .as_ref()
                    .is_some_and(|(s, body)| *s == 503 && body.contains("refuse the connection"))
            {
                break text;
            }
            if let Some(status) = child.try_wait().unwrap() {
                // Exiting is an acceptable refusal too, if it says why.
                assert!(
                    says,
                    "{case}: the relay exited with {status} without saying why:\n{text}"
                );
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "{case}: no authorization error in the log, or /readyz not failing ({readyz:?}):\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let said = text
            .lines()
            .find(|l| l.contains("the NATS store is not usable yet"))
            .unwrap_or_default();
        println!("{case}: {said}");
        let _ = child.kill();
        let _ = child.wait();
    }
}
