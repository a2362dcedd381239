//! `botrelay-operator`: runs the MessagingEndpoint controller, its admin server
//! and (by default) leader election on a Lease, and stops cleanly on SIGTERM.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use kube::{Api, Client};

use botrelay_operator::admin::{self, AdminState};
use botrelay_operator::build::BuildSettings;
use botrelay_operator::config::Config;
use botrelay_operator::controller::{self, Context};
use botrelay_operator::lease::{self, Elector, Leadership};
use botrelay_operator::metrics::Metrics;
use botrelay_operator::telemetry;

type Signal = Shared<BoxFuture<'static, ()>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    telemetry::init(&config.log_level);
    let identity = config.identity();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), %identity, relay_image = %config.relay_image,
        namespaces = ?config.namespaces(), leader_election = config.leader_election, "starting");

    let metrics = Metrics::default();
    let ready = Arc::new(AtomicBool::new(false));
    let stores = Arc::new(std::sync::Mutex::new(Vec::new()));
    let admin_state = AdminState {
        metrics: metrics.clone(),
        ready: ready.clone(),
        before_scrape: {
            let stores = stores.clone();
            let metrics = metrics.clone();
            Arc::new(move || {
                let counts = controller::count_endpoints(&stores.lock().unwrap());
                metrics.set_endpoints(&counts);
            })
        },
    };
    let admin_addr = config.admin_listen;
    let admin_listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("binding the admin server to {admin_addr}"))?;
    tokio::spawn(async move {
        if let Err(e) = admin::serve(admin_listener, admin_state).await {
            tracing::error!(error = %e, "admin server stopped");
        }
    });

    let shutdown: Signal = shutdown_signal().boxed().shared();
    let client = Client::try_default()
        .await
        .context("building a Kubernetes client (in-cluster or KUBECONFIG)")?;

    // Leader election: wait for the Lease before touching anything.
    let mut leadership: Option<Leadership> = None;
    if config.leader_election {
        let namespace = config
            .lease_namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| client.default_namespace().to_string());
        let elector = Arc::new(Elector::new(
            client.clone(),
            lease::Settings {
                name: config.lease_name.clone(),
                namespace: namespace.clone(),
                identity: identity.clone(),
                duration: Duration::from_secs(config.lease_duration_seconds.max(1)),
            },
        ));
        // A replica that stands by is healthy and ready: it can take over.
        ready.store(true, Ordering::Relaxed);
        tracing::info!(lease = %config.lease_name, %namespace, "waiting to lead");
        let Some(held) = elector.acquire(shutdown.clone()).await else {
            tracing::info!("stopped while standing by");
            return Ok(());
        };
        tracing::info!("leading");
        leadership = Some(Leadership::start(elector, held));
    }
    metrics.leader.set(1);

    // Stop the controllers on SIGTERM, or when leadership is lost.
    let lost_leadership = Arc::new(AtomicBool::new(false));
    let lost: Signal = match &leadership {
        Some(l) => l.lost().boxed().shared(),
        None => futures::future::pending().boxed().shared(),
    };
    let stop: Signal = {
        let shutdown = shutdown.clone();
        let lost = lost.clone();
        let lost_flag = lost_leadership.clone();
        let metrics = metrics.clone();
        async move {
            tokio::select! {
                _ = shutdown => {},
                _ = lost => {
                    // No longer leading, whatever the controllers still finish.
                    metrics.leader.set(0);
                    lost_flag.store(true, Ordering::Relaxed);
                    tracing::error!("lost the leader Lease; stopping");
                }
            }
        }
        .boxed()
        .shared()
    };

    let settings = BuildSettings {
        relay_image: config.relay_image.clone(),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        settings,
        metrics.clone(),
        &identity,
        botrelay_operator::targets::Settings {
            admin_url: config.relay_admin_url.clone(),
            interval: config.relay_poll_interval.into(),
        },
    ));
    let namespaces = config.namespaces();
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let mut runs = vec![];
    for scope in scopes {
        let api = match &scope {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let (store, run) = controller::controller(
            api,
            client.clone(),
            scope,
            ctx.clone(),
            kube::runtime::controller::Config::default()
                .concurrency(config.concurrency)
                .debounce(config.reconcile_debounce.into()),
            stop.clone(),
        );
        stores.lock().unwrap().push(store);
        runs.push(run);
    }
    ready.store(true, Ordering::Relaxed);
    tracing::info!("controller running");
    // Once the Lease is lost, another replica may take it a grace period
    // after the last renewal: the controllers get part of that to stop, then
    // the process ends regardless.
    let step_down = leadership
        .as_ref()
        .map(|l| l.grace() / 2)
        .unwrap_or_default();
    tokio::select! {
        _ = futures::future::join_all(runs) => {}
        _ = async { lost.await; tokio::time::sleep(step_down).await } => {
            tracing::error!("lost the leader Lease; the controllers did not stop in time, exiting");
            std::process::exit(1);
        }
    }
    metrics.leader.set(0);

    if let Some(leadership) = leadership {
        // Stop renewing; hand the Lease over only while it is still ours.
        if let Err(lost) = leadership.release().await {
            anyhow::bail!("lost the leader Lease: {lost}");
        }
    }
    if lost_leadership.load(Ordering::Relaxed) {
        anyhow::bail!("lost the leader Lease");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutting down");
}
