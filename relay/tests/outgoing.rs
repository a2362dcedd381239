//! What the relay adds to its requests for targets that demand more than the
//! signature: extra headers (static, or from files that rotate) and a client
//! certificate for mutual TLS; and the flags of both refused at start when
//! they are wrong. The time to deliver over mTLS is printed:
//! `cargo test -p botrelay --test outgoing -- --nocapture`.

mod common;

use base64::Engine;
use common::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// A CA that signs certificates.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A certificate for `name` and its key, as PEM.
    fn sign(&self, name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap()
    }
}

use rustls::pki_types::pem::PemObject;

/// An https bot that demands a client certificate signed by `client_ca`,
/// and answers each request it gets over such a connection with an echo.
/// Returns its address and the bodies it got.
async fn mtls_bot(
    server_ca: &Ca,
    client_ca: &Ca,
) -> (
    SocketAddr,
    Arc<Mutex<Vec<serde_json::Value>>>,
    Arc<Mutex<u32>>,
) {
    let (cert_pem, key_pem) = server_ca.sign("localhost");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(client_ca.der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(Mutex::new(0));
    let (got, no) = (received.clone(), refused.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, got, no) = (acceptor.clone(), got.clone(), no.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    *no.lock().unwrap() += 1;
                    return;
                };
                // The client certificate of this connection, noted on each request.
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| base64::engine::general_purpose::STANDARD.encode(c.as_ref()))
                    .unwrap_or_default();
                let service = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let (got, peer) = (got.clone(), peer.clone());
                        async move {
                            use http_body_util::BodyExt;
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let mut body: serde_json::Value =
                                serde_json::from_slice(&body).unwrap_or_default();
                            if body.is_object() {
                                body["_clientCertificate"] = serde_json::json!(peer);
                            }
                            let text = body["text"].as_str().unwrap_or_default().to_owned();
                            got.lock().unwrap().push(body);
                            let answer = serde_json::json!({"responses": [{"type": "text", "payload": {"text": format!("echo: {text}")}}]});
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(answer.to_string())),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, received, refused)
}

fn write_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn a_bot_that_demands_a_client_certificate_gets_messages_only_with_the_right_one() {
    let (server_ca, client_ca, other_ca) = (
        Ca::new("server CA"),
        Ca::new("client CA"),
        Ca::new("other CA"),
    );
    let (addr, received, refused) = mtls_bot(&server_ca, &client_ca).await;
    let dir = tempfile::tempdir().unwrap();
    let trust = write_file(dir.path(), "ca.pem", &server_ca.pem);
    let (cert, key) = client_ca.sign("relay");
    let (cert, key) = (
        write_file(dir.path(), "cert.pem", &cert),
        write_file(dir.path(), "key.pem", &key),
    );
    let (wrong_cert, wrong_key) = other_ca.sign("relay");
    let (wrong_cert, wrong_key) = (
        write_file(dir.path(), "wrong-cert.pem", &wrong_cert),
        write_file(dir.path(), "wrong-key.pem", &wrong_key),
    );
    let bot_url = format!("https://localhost:{}/events", addr.port());
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let env = [("SSL_CERT_FILE", trust.as_str())];

    // Without a certificate, and with one the bot does not trust: refused.
    for extra in [
        vec![],
        vec![
            format!("--bot-client-cert={wrong_cert}"),
            format!("--bot-client-key={wrong_key}"),
        ],
    ] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let relay = Relay::start_with_env(&bot_url, &endpoint.url(), &extra, &env).await;
        assert_eq!(relay.send(&message("u", "c", "m1", "hi")).await.0, 200);
        let failed = relay
            .wait_for_metric(
                "botrelay_delivery_attempts_total",
                &[("target", "bot"), ("outcome", "network_error")],
                |v| v >= 2.0,
            )
            .await;
        assert!(failed >= 2.0, "{extra:?}: attempts fail:\n{}", relay.logs());
        assert!(received.lock().unwrap().is_empty(), "{extra:?}");
    }
    assert!(
        *refused.lock().unwrap() >= 4,
        "the bot refused the handshakes"
    );

    // With the right one: delivered, and the bot's answer read.
    let relay = Relay::start_with_env(
        &bot_url,
        &endpoint.url(),
        &[
            &format!("--bot-client-cert={cert}"),
            &format!("--bot-client-key={key}"),
        ],
        &env,
    )
    .await;
    let started = Instant::now();
    assert_eq!(
        relay
            .send(&message("u", "c-mtls", "m1", "over mtls"))
            .await
            .0,
        200
    );
    let replies = endpoint
        .wait_until("the reply", Duration::from_secs(15), |r| !r.is_empty())
        .await;
    println!(
        "mTLS: a message reached the bot over mutual TLS and its reply the response endpoint {} ms after the client's request",
        started.elapsed().as_millis()
    );
    assert_eq!(
        received.lock().unwrap()[0]["tags"]["conversationId"],
        "c-mtls"
    );
    assert_eq!(replies[0].body["payload"]["text"], "echo: over mtls");
}

#[tokio::test]
async fn a_rotated_client_certificate_is_used_for_new_connections() {
    let (server_ca, client_ca, other_ca) = (
        Ca::new("server CA"),
        Ca::new("client CA"),
        Ca::new("other CA"),
    );
    let (addr, received, _) = mtls_bot(&server_ca, &client_ca).await;
    let dir = tempfile::tempdir().unwrap();
    let trust = write_file(dir.path(), "ca.pem", &server_ca.pem);
    // Starts with a certificate the bot does not trust.
    let (cert, key) = other_ca.sign("relay");
    let (cert_path, key_path) = (
        write_file(dir.path(), "cert.pem", &cert),
        write_file(dir.path(), "key.pem", &key),
    );
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start_with_env(
        &format!("https://localhost:{}/", addr.port()),
        &endpoint.url(),
        &[
            &format!("--bot-client-cert={cert_path}"),
            &format!("--bot-client-key={key_path}"),
        ],
        &[("SSL_CERT_FILE", trust.as_str())],
    )
    .await;
    assert_eq!(relay.send(&message("u", "c", "m1", "hi")).await.0, 200);
    relay
        .wait_for_metric(
            "botrelay_delivery_attempts_total",
            &[("target", "bot"), ("outcome", "network_error")],
            |v| v >= 1.0,
        )
        .await;
    // A half-written pair (new key, old certificate) keeps the old pair in force.
    let (cert, key) = client_ca.sign("relay");
    std::fs::write(&key_path, &key).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    std::fs::write(&cert_path, &cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while received.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "not delivered after the rotation:\n{}",
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        relay.logs().contains("could not re-read"),
        "the mismatch was logged:\n{}",
        relay.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_certificate_reaches_a_target_that_is_never_idle() {
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("client CA"));
    let (addr, received, _) = mtls_bot(&server_ca, &client_ca).await;
    let dir = tempfile::tempdir().unwrap();
    let trust = write_file(dir.path(), "ca.pem", &server_ca.pem);
    let (old_cert, old_key) = client_ca.sign("relay-old");
    let (new_cert, new_key) = client_ca.sign("relay-new");
    let (cert_path, key_path) = (
        write_file(dir.path(), "cert.pem", &old_cert),
        write_file(dir.path(), "key.pem", &old_key),
    );
    let endpoint = Peer::start(|_| Answer::ok()).await;
    let relay = Relay::start_with_env(
        &format!("https://localhost:{}/", addr.port()),
        &endpoint.url(),
        &[
            &format!("--bot-client-cert={cert_path}"),
            &format!("--bot-client-key={key_path}"),
        ],
        &[("SSL_CERT_FILE", trust.as_str())],
    )
    .await;
    let der = |pem: &str| {
        base64::engine::general_purpose::STANDARD.encode(
            CertificateDer::from_pem_slice(pem.as_bytes())
                .unwrap()
                .as_ref(),
        )
    };
    let (old, new) = (der(&old_cert), der(&new_cert));
    // A message every 100 ms: the kept-alive connection is never idle.
    let mut rotated_at = None;
    for i in 0..40 {
        let id = format!("m{i}");
        assert_eq!(relay.send(&message("u", "c", &id, &id)).await.0, 200);
        if i == 10 {
            std::fs::write(&key_path, &new_key).unwrap();
            std::fs::write(&cert_path, &new_cert).unwrap();
            rotated_at = Some(i);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rotated_at.is_some());
    let deadline = Instant::now() + Duration::from_secs(15);
    while received.lock().unwrap().len() < 40 {
        assert!(
            Instant::now() < deadline,
            "not all delivered:\n{}",
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let presented: Vec<String> = received
        .lock()
        .unwrap()
        .iter()
        .map(|b| {
            b["_clientCertificate"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(presented[0], old);
    // Polled every 200 ms: the last ten went well after the change.
    for (i, cert) in presented.iter().enumerate().skip(30) {
        assert_eq!(cert, &new, "delivery {i} presented the old certificate");
    }
}

#[tokio::test]
async fn a_bot_that_demands_a_header_gets_it_and_its_file_rotates() {
    let expected = Arc::new(Mutex::new("key-1".to_string()));
    let want = expected.clone();
    let bot = Peer::start(move |r| {
        if r.header("x-api-key") == *want.lock().unwrap() && r.header("x-team") == "support" {
            echo(r)
        } else {
            Answer::status(401)
        }
    })
    .await;
    let endpoint = Peer::start(|r| {
        if r.header("authorization") == "Basic cmVsYXk6cHc=" {
            Answer::ok()
        } else {
            Answer::status(403)
        }
    })
    .await;

    // Without the header, the bot refuses every attempt.
    let relay = Relay::start(&bot.url(), &endpoint.url(), &[]).await;
    assert_eq!(relay.send(&message("u", "c", "m0", "hi")).await.0, 200);
    bot.wait_until("refused attempts", Duration::from_secs(10), |r| {
        r.len() >= 2
    })
    .await;
    assert_eq!(
        relay
            .metric("botrelay_messages_delivered_total", &[("target", "bot")])
            .await,
        0.0
    );
    drop(relay);

    let dir = tempfile::tempdir().unwrap();
    let key_file = write_file(dir.path(), "api-key", "key-1\n");
    let relay = Relay::start(
        &bot.url(),
        &endpoint.url(),
        &[
            "--bot-header=X-Team: support",
            "--bot-header=User-Agent: tenant-relay/1",
            // A probe at start, to see that probes carry the headers too.
            "--probe-interval=1m",
            &format!("--bot-header-file=X-Api-Key={key_file}"),
            "--response-header=Authorization: Basic cmVsYXk6cHc=",
        ],
    )
    .await;
    assert_eq!(relay.send(&message("u", "c", "m1", "one")).await.0, 200);
    // The probe at start carries them too.
    let got = bot
        .wait_until("the probe", Duration::from_secs(10), |r| {
            r.iter().any(|r| r.header("botrelay-probe") == "1")
        })
        .await;
    let probe = got
        .iter()
        .rev()
        .find(|r| r.header("botrelay-probe") == "1")
        .unwrap();
    assert_eq!(
        (probe.header("x-team"), probe.header("x-api-key")),
        ("support", "key-1")
    );
    let delivered = |n: f64| {
        let relay = &relay;
        async move {
            relay
                .wait_for_metric(
                    "botrelay_messages_delivered_total",
                    &[("target", "response")],
                    |v| v >= n,
                )
                .await
        }
    };
    assert_eq!(delivered(1.0).await, 1.0, "{}", relay.logs());

    // The secret rotates: the bot wants the new key, the file gets it.
    *expected.lock().unwrap() = "key-2".into();
    std::fs::write(&key_file, "key-2\n").unwrap();
    assert_eq!(relay.send(&message("u", "c", "m2", "two")).await.0, 200);
    assert_eq!(delivered(2.0).await, 2.0, "{}", relay.logs());
    let last = bot.received().last().unwrap().clone();
    assert_eq!(last.header("x-api-key"), "key-2");
    // A user agent given replaces the relay's.
    assert_eq!(last.headers.get_all("user-agent").iter().count(), 1);
    assert_eq!(last.header("user-agent"), "tenant-relay/1");

    // The file goes away: the last good value stays, with a warning.
    std::fs::remove_file(&key_file).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(relay.send(&message("u", "c", "m3", "three")).await.0, 200);
    assert_eq!(delivered(3.0).await, 3.0, "{}", relay.logs());
    assert!(
        relay.logs().lines().any(|l| l.contains("WARN")
            && l.contains("could not re-read")
            && l.contains("--bot-header-file")),
        "{}",
        relay.logs()
    );
}

/// Runs the relay binary with `extra` flags and returns its exit code and
/// standard error, expecting it to stop at start.
fn refused_at_start(extra: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let creds = write_credentials(dir.path());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_botrelay"))
        .args([
            "--bot-url=http://127.0.0.1:1/",
            "--response-url=http://127.0.0.1:1/",
            &format!("--credentials-dir={}", creds.display()),
            "--store=memory",
            &format!("--listen={}", free_addr()),
            &format!("--admin-listen={}", free_addr()),
            "--log-format=text",
        ])
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn bad_header_and_certificate_flags_are_refused_at_start_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("CA");
    let (cert, key) = ca.sign("relay");
    let (_, other_key) = ca.sign("other");
    let cert = write_file(dir.path(), "cert.pem", &cert);
    let key = write_file(dir.path(), "key.pem", &key);
    let other_key = write_file(dir.path(), "other-key.pem", &other_key);
    let missing = dir.path().join("missing").display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--bot-header=X-Api-Key".into()], "--bot-header"),
        (vec!["--bot-header=Bad Name: 1".into()], "--bot-header"),
        (
            vec!["--response-header=Content-Type: text/plain".into()],
            "--response-header: content-type",
        ),
        (
            vec!["--bot-header=webhook-signature: v1,x".into()],
            "--bot-header: webhook-signature",
        ),
        (
            vec!["--bot-header=traceparent: x".into()],
            "--bot-header: traceparent",
        ),
        (
            vec!["--bot-header=botrelay-probe: 1".into()],
            "--bot-header: botrelay-probe",
        ),
        (
            vec![format!("--bot-header-file=X-Api-Key={missing}")],
            "--bot-header-file",
        ),
        (
            vec![format!("--response-header-file=Host={cert}")],
            "--response-header-file: host",
        ),
        (
            vec![format!("--bot-client-cert={cert}")],
            "--bot-client-cert needs --bot-client-key",
        ),
        (
            vec![format!("--response-client-key={key}")],
            "--response-client-key needs --response-client-cert",
        ),
        (
            vec![
                format!("--bot-client-cert={cert}"),
                format!("--bot-client-key={other_key}"),
            ],
            "--bot-client-key",
        ),
        (
            vec![
                format!("--response-client-cert={missing}"),
                format!("--response-client-key={key}"),
            ],
            "--response-client-cert",
        ),
        (vec!["--max-wait=soon".into()], "--max-wait"),
    ];
    for (flags, needle) in cases {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let (code, stderr) = refused_at_start(&flags, &[]);
        assert!(
            matches!(code, Some(c) if c != 0),
            "{flags:?} started: {stderr}"
        );
        assert!(
            stderr.contains(needle),
            "{flags:?}: {needle:?} not in:\n{stderr}"
        );
    }
    // The environment takes one header per line.
    let (code, stderr) =
        refused_at_start(&[], &[("BOTRELAY_BOT_HEADER", "X-A: 1\nContent-Length: 2")]);
    assert!(matches!(code, Some(c) if c != 0), "started: {stderr}");
    assert!(stderr.contains("--bot-header: content-length"), "{stderr}");
}
