//! `botrelay-test-apiserver`: the test API server as a process of its own, for
//! tests that are not written in Rust (`tests/dashboard` runs the real
//! operator against it). It listens on loopback, writes a kubeconfig that
//! points at itself, prints its URL on stdout once both are ready, and serves
//! until SIGTERM or SIGINT. Tests create and read objects through its HTTP API,
//! as kubectl would; what that API implements is listed at the top of `lib.rs`.

use std::path::PathBuf;

use botrelay_test_apiserver::{Policy, TestApiServer};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

/// A small stateful Kubernetes API server over plain HTTP on 127.0.0.1, for tests.
#[derive(Parser)]
#[command(name = "botrelay-test-apiserver")]
struct Args {
    /// Port on 127.0.0.1; 0 lets the kernel pick a free one (the printed URL names it).
    #[arg(long, default_value_t = 0)]
    port: u16,

    /// Where to write a kubeconfig that points at this server.
    #[arg(long)]
    kubeconfig: PathBuf,

    /// Default namespace of the kubeconfig's context.
    #[arg(long, default_value = "default")]
    namespace: String,

    /// Enforce RBAC: a JSON array of Role and ClusterRole objects (as `helm
    /// template` renders them), all taken as bound to the one caller.
    /// Without it every call is allowed.
    #[arg(long)]
    rbac: Option<PathBuf>,

    /// The user named in a refusal.
    #[arg(
        long,
        default_value = "system:serviceaccount:botrelay:botrelay-operator"
    )]
    user: String,

    /// CustomResourceDefinitions (JSON files) whose schemas prune and default writes.
    #[arg(long)]
    crd: Vec<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let server = TestApiServer::start_on_port(args.port)
        .await
        .map_err(|e| format!("listening on 127.0.0.1:{}: {e}", args.port))?;
    let read_json = |path: &PathBuf| -> Result<serde_json::Value, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))
    };
    if let Some(path) = &args.rbac {
        let roles = read_json(path)?;
        let roles = roles
            .as_array()
            .ok_or_else(|| format!("{} is not a JSON array of roles", path.display()))?;
        let policy = Policy::from_roles(&args.user, roles)?;
        server.enforce(policy);
    }
    for path in &args.crd {
        server.install_crd(&read_json(path)?)?;
    }
    server
        .write_kubeconfig(&args.kubeconfig, &args.namespace)
        .map_err(|e| format!("writing {}: {e}", args.kubeconfig.display()))?;
    // Signal handlers first: a SIGTERM sent as soon as the URL is read must
    // end the process cleanly, not by the default action.
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    println!("{}", server.url());
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}
