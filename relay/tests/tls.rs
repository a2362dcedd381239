//! Delivery over https: the back-end's response endpoint is usually behind TLS.
//! A private CA is trusted through `SSL_CERT_FILE`, as in a container whose
//! CA bundle is mounted; without it the endpoint's certificate is refused.

mod common;

use common::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

/// A CA and a certificate for `localhost` signed by it.
fn private_ca() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "botrelay test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (
        ca_cert.pem(),
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

/// An https response endpoint that answers 200 and keeps the bodies it got.
async fn https_endpoint(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> (SocketAddr, Arc<Mutex<Vec<Value>>>) {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let got = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, got) = (acceptor.clone(), got.clone());
            tokio::spawn(async move {
                // An untrusting client gives up in the handshake: nothing to serve.
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let got = got.clone();
                        async move {
                            use http_body_util::BodyExt;
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            got.lock()
                                .unwrap()
                                .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::new()),
                            ))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, received)
}

#[tokio::test]
async fn replies_reach_an_https_endpoint_whose_ca_is_trusted() {
    let (ca_pem, cert, key) = private_ca();
    let (addr, received) = https_endpoint(cert, key).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let bot = Peer::start(echo).await;
    let url = format!("https://localhost:{}/bot-responses", addr.port());
    let relay = Relay::start_with_env(
        &bot.url(),
        &url,
        &[],
        &[("SSL_CERT_FILE", ca_file.to_str().unwrap())],
    )
    .await;
    assert_eq!(
        relay.send(&message("u", "c-tls", "m1", "over tls")).await.0,
        200
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while received.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no delivery over https:\n{}",
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = received.lock().unwrap()[0].clone();
    assert_eq!(got["conversationId"], "c-tls");
    assert_eq!(got["payload"]["text"], "echo: over tls");
}

#[tokio::test]
async fn an_endpoint_with_an_untrusted_certificate_is_not_sent_anything() {
    let (_, cert, key) = private_ca();
    let (addr, received) = https_endpoint(cert, key).await;
    let bot = Peer::start(echo).await;
    let url = format!("https://localhost:{}/bot-responses", addr.port());
    // Trust a different CA: the endpoint's certificate does not chain to it.
    let (other_ca, _, _) = private_ca();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("other-ca.pem");
    std::fs::write(&ca_file, other_ca).unwrap();
    let relay = Relay::start_with_env(
        &bot.url(),
        &url,
        &[],
        &[("SSL_CERT_FILE", ca_file.to_str().unwrap())],
    )
    .await;
    assert_eq!(relay.send(&message("u", "c", "m1", "secret")).await.0, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while relay
        .metric(
            "botrelay_delivery_attempts_total",
            &[("target", "response"), ("outcome", "network_error")],
        )
        .await
        < 2.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no failed attempts:\n{}",
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        received.lock().unwrap().is_empty(),
        "nothing crosses an untrusted connection"
    );
    assert_eq!(
        relay
            .metric(
                "botrelay_messages_delivered_total",
                &[("target", "response")]
            )
            .await,
        0.0
    );
}
