//! The `botrelay-test-apiserver` binary, as tests/dashboard uses it: it prints
//! its URL once the kubeconfig is written, serves objects over HTTP, and ends
//! cleanly on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One HTTP/1.0 request: (status code, body).
fn request(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let code = response[9..12].parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_string();
    (code, body)
}

#[test]
fn prints_its_url_serves_the_kubeconfig_s_cluster_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!(
        "botrelay-test-apiserver-bin-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_botrelay-test-apiserver"))
        .args([
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--namespace",
            "shop",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut url = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut url)
        .unwrap();
    let url = url.trim();
    let addr = url
        .strip_prefix("http://127.0.0.1:")
        .map(|port| format!("127.0.0.1:{port}"))
        .unwrap_or_else(|| panic!("not a loopback URL: {url:?}"));

    let config = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(config.contains(&format!("server: {url}\n")), "{config}");
    assert!(config.contains("namespace: shop\n"), "{config}");

    let path = "/apis/botrelay.dev/v1alpha1/namespaces/shop/messagingendpoints";
    let (code, body) = request(
        &addr,
        "POST",
        path,
        r#"{"apiVersion": "botrelay.dev/v1alpha1", "kind": "MessagingEndpoint", "metadata": {"name": "support"}, "spec": {}}"#,
    );
    assert_eq!(code, 201, "{body}");
    let (code, body) = request(&addr, "GET", &format!("{path}/support"), "");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""resourceVersion":"1""#), "{body}");

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}
