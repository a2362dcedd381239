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
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;

use botrelay_operator::admin::{self, AdminState};
use botrelay_operator::build::BuildSettings;
use botrelay_operator::config::Config;
use botrelay_operator::controller::{self, Context};
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
                let (up, down) = controller::count_endpoints(&stores.lock().unwrap());
                metrics.set_endpoints(up, down);
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
    let mut leadership: Option<(watch::Receiver<bool>, tokio::task::JoinHandle<_>)> = None;
    if config.leader_election {
        let namespace = config
            .lease_namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| client.default_namespace().to_string());
        let manager = LeaseManagerBuilder::new(client.clone(), &config.lease_name)
            .with_namespace(&namespace)
            .with_identity(&identity)
            .with_field_manager(format!("botrelay-operator-lease-{identity}"))
            .with_duration(config.lease_duration_seconds)
            .with_grace(config.lease_duration_seconds.div_ceil(3).max(1))
            .build()
            .await
            .context("setting up leader election")?;
        let (mut rx, task) = manager.watch().await;
        // A replica that stands by is healthy and ready: it can take over.
        ready.store(true, Ordering::Relaxed);
        tracing::info!(lease = %config.lease_name, %namespace, "waiting to lead");
        loop {
            if *rx.borrow_and_update() {
                break;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() {
                    anyhow::bail!("leader election stopped before this replica led");
                },
                _ = shutdown.clone() => {
                    drop(rx);
                    let _ = task.await;
                    tracing::info!("stopped while standing by");
                    return Ok(());
                }
            }
        }
        tracing::info!("leading");
        leadership = Some((rx, task));
    }
    metrics.leader.set(1);

    // Stop the controllers on SIGTERM, or when leadership is lost.
    let lost_leadership = Arc::new(AtomicBool::new(false));
    let stop: Signal = {
        let shutdown = shutdown.clone();
        let mut rx = leadership.as_ref().map(|(rx, _)| rx.clone());
        let lost = lost_leadership.clone();
        async move {
            let lost_lease = async {
                match rx.as_mut() {
                    Some(rx) => {
                        while *rx.borrow_and_update() {
                            if rx.changed().await.is_err() {
                                break;
                            }
                        }
                        lost.store(true, Ordering::Relaxed);
                    }
                    None => futures::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = shutdown => {},
                _ = lost_lease => tracing::error!("lost the leader Lease; stopping"),
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
    futures::future::join_all(runs).await;
    metrics.leader.set(0);

    if let Some((rx, task)) = leadership {
        // Closing the channel ends the lease task; then hand the Lease over.
        drop(rx);
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(manager))) => {
                if let Err(e) = manager.release().await {
                    tracing::warn!(error = %e, "could not release the Lease");
                }
            }
            other => tracing::warn!(?other, "lease task did not end cleanly"),
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
