//! The relay accepts the arguments the operator gives it: the relay
//! container's args of a Deployment built by the operator's pure builders,
//! parsed and checked by the relay's own flag parser. A flag renamed or
//! dropped on one side, or a value one side writes and the other cannot read,
//! fails here rather than as a crash-looping pod.

use std::path::Path;
use std::time::Duration;

use botrelay::config::{Config, StoreKind};
use botrelay_operator::build::{BuildSettings, build_deployment};
use botrelay_operator::crd::MessagingEndpoint;
use botrelay_operator::validate::validate_spec;
use clap::Parser;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use kube::ResourceExt;
use serde_json::{Value, json};

/// An endpoint as a user writes it, decoded as the operator decodes it.
fn endpoint(name: &str, spec: Value) -> MessagingEndpoint {
    serde_json::from_value(json!({
        "apiVersion": "botrelay.dev/v1alpha1",
        "kind": "MessagingEndpoint",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": spec,
    }))
    .expect("the endpoint decodes")
}

/// The relay pod the operator builds for `endpoint`.
fn relay_pod(endpoint: &MessagingEndpoint) -> PodSpec {
    validate_spec(&endpoint.spec).expect("the operator accepts the spec");
    let settings = BuildSettings {
        relay_image: "botrelay/relay:test".into(),
    };
    let deployment = build_deployment(endpoint, &settings, "credentials");
    deployment.spec.unwrap().template.spec.unwrap()
}

fn relay_container(pod: &PodSpec) -> &Container {
    pod.containers
        .iter()
        .find(|c| c.name == "relay")
        .expect("a relay container")
}

/// What the relay makes of the container's arguments, as its `main` does.
fn relay_config(container: &Container) -> Config {
    // The image's entrypoint is the relay and the args are its whole
    // configuration: a command or environment variables would need parsing too.
    assert_eq!(container.command, None);
    assert_eq!(container.env, None);
    let args = container.args.clone().expect("the relay gets args");
    let config =
        Config::try_parse_from(std::iter::once("botrelay".to_string()).chain(args.clone()))
            .unwrap_or_else(|e| panic!("the relay refuses {args:?}:\n{e}"));
    config
        .validate()
        .unwrap_or_else(|e| panic!("the relay refuses {args:?}: {e}"));
    config
}

fn mount_path<'a>(container: &'a Container, volume: &str) -> &'a Path {
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    let mount = mounts
        .iter()
        .find(|m| m.name == volume)
        .unwrap_or_else(|| panic!("volume {volume} is mounted"));
    Path::new(&mount.mount_path)
}

fn container_port(container: &Container, name: &str) -> u16 {
    let ports = container.ports.as_deref().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("port {name} is declared"));
    port.container_port as u16
}

/// Where the relay listens, reads its credentials and keeps its store is where
/// the pod declares its ports and mounts its volumes.
fn assert_matches_the_pod(config: &Config, container: &Container) {
    assert_eq!(config.listen.port(), container_port(container, "http"));
    assert_eq!(
        config.admin_listen.port(),
        container_port(container, "metrics")
    );
    assert!(config.listen.ip().is_unspecified() && config.admin_listen.ip().is_unspecified());
    assert_eq!(config.credentials_dir, mount_path(container, "credentials"));
    assert_eq!(config.data_dir, mount_path(container, "data"));
}

/// What the relay makes of the pod the operator builds for `endpoint`, after
/// checking what every spec has: the URLs, the endpoint's name, ports and mounts.
fn relay_config_for(endpoint: &MessagingEndpoint) -> Config {
    let pod = relay_pod(endpoint);
    let container = relay_container(&pod);
    let config = relay_config(container);
    assert_eq!(config.bot_url.to_string(), endpoint.spec.bot.url);
    assert_eq!(
        config.response_url.to_string(),
        endpoint.spec.response_endpoint.url
    );
    assert_eq!(config.endpoint_name, endpoint.name_any());
    assert_matches_the_pod(&config, container);
    config
}

#[test]
fn a_minimal_spec_leaves_delivery_to_the_relays_defaults() {
    let ep = endpoint(
        "support",
        json!({
            "bot": {"url": "http://support-bot.shop.svc:8080/events"},
            "responseEndpoint": {"url": "https://backend.example/bot-responses"},
        }),
    );
    let config = relay_config_for(&ep);
    assert_eq!(config.store, StoreKind::Embedded);

    // Nothing about delivery in the spec: the relay's own defaults, as if run by hand.
    let defaults = Config::try_parse_from([
        "botrelay",
        "--bot-url=http://bot/",
        "--response-url=http://response/",
        "--credentials-dir=/c",
    ])
    .unwrap();
    assert_eq!(
        (
            config.bot_timeout,
            config.response_timeout,
            config.connect_timeout,
            config.retry_initial_backoff,
            config.retry_max_backoff,
            config.max_attempts,
            config.max_message_age,
            config.dedupe_window,
            config.max_body_bytes,
            config.max_replies_per_answer,
        ),
        (
            defaults.bot_timeout,
            defaults.response_timeout,
            defaults.connect_timeout,
            defaults.retry_initial_backoff,
            defaults.retry_max_backoff,
            defaults.max_attempts,
            defaults.max_message_age,
            defaults.dedupe_window,
            defaults.max_body_bytes,
            defaults.max_replies_per_answer,
        )
    );
}

#[test]
fn every_delivery_field_reaches_the_relay_with_its_value() {
    // Values unlike the relay's defaults, in every duration form the CRD allows
    // (milliseconds, compound units), and URLs with a port, path and query.
    let ep = endpoint(
        "orders",
        json!({
            "bot": {"url": "https://bot.example:8443/hooks/orders?team=shop"},
            "responseEndpoint": {"url": "http://backend.shop.svc/bot/responses"},
            "storage": {"type": "memory"},
            "delivery": {
                "botTimeout": "45s",
                "responseTimeout": "1m30s",
                "connectTimeout": "2500ms",
                "retryInitialBackoff": "250ms",
                "retryMaxBackoff": "10m",
                "maxAttempts": 7,
                "maxMessageAge": "1h30m",
                "dedupeWindow": "48h",
                "maxBodyBytes": 1048576,
                "maxRepliesPerAnswer": 2500,
            },
        }),
    );
    let config = relay_config_for(&ep);
    assert_eq!(config.store, StoreKind::Memory);
    assert_eq!(config.bot_timeout, Duration::from_secs(45));
    assert_eq!(config.response_timeout, Duration::from_secs(90));
    assert_eq!(config.connect_timeout, Duration::from_millis(2500));
    assert_eq!(config.retry_initial_backoff, Duration::from_millis(250));
    assert_eq!(config.retry_max_backoff, Duration::from_secs(600));
    assert_eq!(config.max_attempts, 7);
    assert_eq!(config.max_message_age, Duration::from_secs(5400));
    assert_eq!(config.dedupe_window, Duration::from_secs(48 * 3600));
    assert_eq!(config.max_body_bytes, 1024 * 1024);
    assert_eq!(config.max_replies_per_answer, 2500);
}

#[test]
fn a_nats_endpoint_reaches_the_relay_with_its_servers_prefix_and_mounted_files() {
    let ep = endpoint(
        "support.eu",
        json!({
            "bot": {"url": "http://support-bot.shop.svc:8080/events"},
            "responseEndpoint": {"url": "https://backend.example/bot-responses"},
            "replicas": 3,
            "storage": {"type": "nats", "nats": {
                "urls": ["nats://nats-0.nats.svc:4222", "tls://nats-1.nats.svc:4222"],
                "credentialsSecretRef": {"name": "nats-user"},
                "tlsCaSecretRef": {"name": "nats-ca"},
                "streamReplicas": 5,
            }},
        }),
    );
    let pod = relay_pod(&ep);
    let container = relay_container(&pod);
    let config = relay_config_for(&ep);
    assert_eq!(config.store, StoreKind::Nats);
    assert_eq!(
        config.nats.servers(),
        ["nats://nats-0.nats.svc:4222", "tls://nats-1.nats.svc:4222"]
    );
    assert_eq!(config.nats.nats_stream_replicas, 5);
    // Two endpoints never share a prefix: the namespace comes first.
    assert_eq!(config.nats.prefix(&config.endpoint_name), "shop_support_eu");
    let credentials = config.nats.nats_credentials.as_deref().unwrap();
    assert!(credentials.starts_with(mount_path(container, "nats-credentials")));
    let ca = config.nats.nats_tls_ca.as_deref().unwrap();
    assert!(ca.starts_with(mount_path(container, "nats-ca")));
}

#[test]
fn delivery_controls_reach_the_relay_with_their_values() {
    let ep = endpoint(
        "support",
        json!({
            "bot": {"url": "http://support-bot.shop.svc:8080/events",
                    "rateLimit": {"perSecond": 50, "burst": 10}},
            "responseEndpoint": {"url": "https://backend.example/bot-responses",
                                 "rateLimit": {"perSecond": 0.5}},
            "delivery": {
                "circuitBreaker": {"failures": 3, "probeInterval": "2s", "maxProbeInterval": "90s"},
                "reachabilityProbeInterval": "20s",
            },
        }),
    );
    let config = relay_config_for(&ep);
    let c = &config.control;
    assert_eq!((c.bot_rate_limit, c.bot_rate_burst), (Some(50.0), Some(10)));
    assert_eq!(
        (c.response_rate_limit, c.response_rate_burst),
        (Some(0.5), None)
    );
    assert_eq!(c.breaker_failures, 3);
    assert_eq!(c.breaker_probe_interval, Duration::from_secs(2));
    assert_eq!(c.breaker_max_probe_interval, Duration::from_secs(90));
    assert_eq!(c.probe_interval, Duration::from_secs(20));

    // Nothing said: the relay's defaults (no limit, 10 failures, probes every 30 s).
    let plain = relay_config_for(&endpoint(
        "plain",
        json!({"bot": {"url": "http://b/"}, "responseEndpoint": {"url": "http://r/"}}),
    ));
    assert_eq!(plain.control.bot_rate_limit, None);
    assert_eq!(plain.control.breaker_failures, 10);
    assert_eq!(plain.control.probe_interval, Duration::from_secs(30));
}

#[test]
fn several_relay_pods_share_the_endpoints_rate_limit() {
    let ep = endpoint(
        "busy",
        json!({
            "bot": {"url": "http://bot.shop.svc/events",
                    "rateLimit": {"perSecond": 90, "burst": 10}},
            "responseEndpoint": {"url": "https://backend.example/r",
                                 "rateLimit": {"perSecond": 1}},
            "replicas": 3,
            "storage": {"type": "nats", "nats": {"urls": ["nats://nats.nats.svc:4222"]}},
        }),
    );
    let c = relay_config_for(&ep).control;
    // Three pods, each a third of the rate and of the burst (rounded up).
    assert_eq!((c.bot_rate_limit, c.bot_rate_burst), (Some(30.0), Some(4)));
    let (rate, burst) = (c.response_rate_limit.unwrap(), c.response_rate_burst);
    assert!((rate - 1.0 / 3.0).abs() < 1e-9, "{rate}");
    assert_eq!(burst, Some(1));
}

#[test]
fn headers_client_certificates_and_max_wait_reach_the_relay_as_mounted_files() {
    let ep = endpoint(
        "support",
        json!({
            "bot": {"url": "https://bot.shop.svc/events",
                    "headers": [{"name": "X-Tenant", "value": "shop: eu"},
                                {"name": "X-Api-Key",
                                 "valueFrom": {"secretKeyRef": {"name": "bot-api", "key": "api-key"}}}],
                    "clientCertificateSecretRef": {"name": "bot-client"}},
            "responseEndpoint": {"url": "https://backend.example/r",
                                 "headers": [{"name": "Authorization",
                                              "valueFrom": {"secretKeyRef": {"name": "backend", "key": "auth"}}}]},
            "delivery": {"maxWait": "10s"},
        }),
    );
    let pod = relay_pod(&ep);
    let container = relay_container(&pod);
    let config = relay_config_for(&ep);
    let out = &config.outgoing;
    assert_eq!(out.bot_header, ["X-Tenant: shop: eu"]);
    let file = |flag: &str, name: &str| {
        let path = flag
            .strip_prefix(&format!("{name}="))
            .unwrap_or_else(|| panic!("{flag} names {name}"));
        std::path::PathBuf::from(path)
    };
    let (bot_key, response_auth) = (
        file(&out.bot_header_file[0], "X-Api-Key"),
        file(&out.response_header_file[0], "Authorization"),
    );
    assert!(bot_key.starts_with(mount_path(container, "bot-header-1")));
    assert!(response_auth.starts_with(mount_path(container, "response-header-0")));
    let tls = mount_path(container, "bot-client-tls");
    assert!(out.bot_client_cert.as_deref().unwrap().starts_with(tls));
    assert!(out.bot_client_key.as_deref().unwrap().starts_with(tls));
    assert_eq!(out.response_client_cert, None);
    assert_eq!(config.max_wait, Duration::from_secs(10));
    // The mounted Secret key lands where the flag says: the item's path is the file name.
    let volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "bot-header-1")
        .unwrap();
    let item = &volume.secret.as_ref().unwrap().items.as_ref().unwrap()[0];
    assert_eq!(
        bot_key,
        mount_path(container, "bot-header-1").join(&item.path)
    );
    assert_eq!(item.key, "api-key");
}

#[test]
fn the_operator_refuses_the_same_headers_and_lengths_as_the_relay() {
    // A header spec the operator takes must never stop a relay at start.
    assert_eq!(
        botrelay_operator::crd::RESERVED_HEADERS,
        botrelay::outgoing::RESERVED_HEADERS
    );
    assert_eq!(
        botrelay_operator::crd::MAX_HEADER_VALUE,
        botrelay::outgoing::MAX_HEADER_VALUE
    );
}
