//! The relay Deployment `<name>-relay`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, HTTPGetAction, KeyToPath,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext,
    TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use super::credentials::hex;
use super::{
    BuildSettings, CLIENT_TLS_DIR, CREDENTIALS_DIR, DATA_DIR, HEADERS_DIR, HTTP_PORT, METRICS_PORT,
    NATS_CA_DIR, NATS_CA_KEY, NATS_CREDENTIALS_DIR, NATS_CREDENTIALS_KEY, TLS_CERT_KEY,
    TLS_KEY_KEY, deployment_name, labels, owned_metadata, pvc_name, selector_labels,
};
use crate::crd::{MessagingEndpoint, StorageType};

/// Pod-template annotation holding a digest of everything that must roll the
/// pods when it changes: image, flags, mounts and pod settings.
pub const CHECKSUM_ANNOTATION: &str = "botrelay.dev/checksum";

/// The uid/gid the relay runs as (distroless `nonroot`).
const RELAY_UID: i64 = 65532;

/// The relay's command-line flags for this endpoint (DESIGN.md, "Flags").
pub fn relay_args(endpoint: &MessagingEndpoint) -> Vec<String> {
    let spec = &endpoint.spec;
    let mut args: Vec<String> = vec![
        "--listen".into(),
        format!("0.0.0.0:{HTTP_PORT}"),
        "--admin-listen".into(),
        format!("0.0.0.0:{METRICS_PORT}"),
        "--bot-url".into(),
        spec.bot.url.clone(),
        "--response-url".into(),
        spec.response_endpoint.url.clone(),
        "--credentials-dir".into(),
        CREDENTIALS_DIR.into(),
        "--store".into(),
        spec.storage.type_.as_flag().into(),
        "--data-dir".into(),
        DATA_DIR.into(),
        "--endpoint-name".into(),
        endpoint.name_any(),
    ];
    if let Some(nats) = spec
        .storage
        .nats
        .as_ref()
        .filter(|_| spec.storage.type_ == StorageType::Nats)
    {
        args.extend([
            "--nats-url".into(),
            nats.urls.join(","),
            "--nats-prefix".into(),
            nats_prefix(endpoint),
            "--nats-stream-replicas".into(),
            nats.stream_replicas.unwrap_or(3).to_string(),
        ]);
        if nats.credentials_secret_ref.is_some() {
            args.extend([
                "--nats-credentials".into(),
                format!("{NATS_CREDENTIALS_DIR}/{NATS_CREDENTIALS_KEY}"),
            ]);
        }
        if nats.tls_ca_secret_ref.is_some() {
            args.extend([
                "--nats-tls-ca".into(),
                format!("{NATS_CA_DIR}/{NATS_CA_KEY}"),
            ]);
        }
    }
    // Each relay pod limits its own deliveries: with several (the nats store),
    // each takes its share of the endpoint's limit.
    let pods = if spec.storage.type_ == StorageType::Nats {
        spec.replicas.max(1)
    } else {
        1
    };
    for (target, _, options) in super::targets(spec) {
        if let Some(limit) = &options.rate_limit {
            let (rate, burst) = pod_share(limit.per_second, limit.burst, pods);
            args.extend([format!("--{target}-rate-limit"), rate.to_string()]);
            if let Some(burst) = burst {
                args.extend([format!("--{target}-rate-burst"), burst.to_string()]);
            }
        }
        for (i, header) in options.headers.iter().enumerate() {
            match (&header.value, &header.value_from) {
                (Some(value), _) => {
                    args.extend([
                        format!("--{target}-header"),
                        format!("{}: {value}", header.name),
                    ]);
                }
                (None, Some(_)) => args.extend([
                    format!("--{target}-header-file"),
                    format!("{}={}", header.name, header_file(target, i)),
                ]),
                (None, None) => {}
            }
        }
        if options.client_certificate_secret_ref.is_some() {
            args.extend([
                format!("--{target}-client-cert"),
                format!("{CLIENT_TLS_DIR}/{target}/{TLS_CERT_KEY}"),
                format!("--{target}-client-key"),
                format!("{CLIENT_TLS_DIR}/{target}/{TLS_KEY_KEY}"),
            ]);
        }
    }
    if let Some(d) = &spec.delivery {
        let breaker = d.circuit_breaker.clone().unwrap_or_default();
        let optional = [
            (
                "--breaker-failures",
                breaker.failures.map(|n| n.to_string()),
            ),
            ("--breaker-probe-interval", breaker.probe_interval),
            ("--breaker-max-probe-interval", breaker.max_probe_interval),
            ("--probe-interval", d.reachability_probe_interval.clone()),
            ("--max-wait", d.max_wait.clone()),
            ("--bot-timeout", d.bot_timeout.clone()),
            ("--response-timeout", d.response_timeout.clone()),
            ("--connect-timeout", d.connect_timeout.clone()),
            ("--retry-initial-backoff", d.retry_initial_backoff.clone()),
            ("--retry-max-backoff", d.retry_max_backoff.clone()),
            ("--max-attempts", d.max_attempts.map(|n| n.to_string())),
            ("--max-message-age", d.max_message_age.clone()),
            ("--dedupe-window", d.dedupe_window.clone()),
            ("--max-body-bytes", d.max_body_bytes.map(|n| n.to_string())),
            (
                "--max-replies-per-answer",
                d.max_replies_per_answer.map(|n| n.to_string()),
            ),
        ];
        for (flag, value) in optional {
            if let Some(value) = value {
                args.push(flag.into());
                args.push(value);
            }
        }
    }
    args
}

/// One pod's share of an endpoint's rate limit when `pods` relay pods
/// deliver: the rate divided among them, and the burst too (at least 1).
pub fn pod_share(per_second: f64, burst: Option<i32>, pods: i32) -> (f64, Option<i32>) {
    if pods <= 1 {
        return (per_second, burst);
    }
    let rate = per_second / f64::from(pods);
    // The relay's default burst is its own rate rounded up: give the share of
    // the endpoint's default (the endpoint's rate rounded up) instead.
    let burst = burst.unwrap_or(per_second.ceil() as i32);
    let share = (burst + pods - 1) / pods;
    (rate, Some(share.max(1)))
}

/// Where the relay reads the secret value of header `index` of `target`.
fn header_file(target: &str, index: usize) -> String {
    format!("{HEADERS_DIR}/{target}-{index}/value")
}

/// One writer at a time for the embedded and memory stores (a single file on
/// a ReadWriteOnce volume, or the pod's memory): the old pod must stop before
/// the new starts. With a shared store, a rolling update that adds a new pod
/// before it takes an old one away, so the endpoint never has fewer.
fn strategy(shared_store: bool) -> DeploymentStrategy {
    if !shared_store {
        return DeploymentStrategy {
            type_: Some("Recreate".to_string()),
            ..DeploymentStrategy::default()
        };
    }
    DeploymentStrategy {
        type_: Some("RollingUpdate".to_string()),
        rolling_update: Some(RollingUpdateDeployment {
            max_surge: Some(IntOrString::Int(1)),
            max_unavailable: Some(IntOrString::Int(0)),
        }),
    }
}

/// Relay pods of one endpoint on different nodes, and zones, where the
/// cluster has room: a node or zone lost takes down as few as it can.
fn spread(endpoint: &str) -> Vec<TopologySpreadConstraint> {
    ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
        .into_iter()
        .map(|key| TopologySpreadConstraint {
            max_skew: 1,
            topology_key: key.to_string(),
            when_unsatisfiable: "ScheduleAnyway".to_string(),
            label_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(endpoint)),
                ..LabelSelector::default()
            }),
            ..TopologySpreadConstraint::default()
        })
        .collect()
}

/// What names the endpoint's streams and buckets in NATS: `<namespace>_<name>`,
/// with the dots a name may hold made `_`. Neither a namespace nor a name may
/// hold `_`, so two endpoints never share one, whatever their names. The
/// relay takes at most 64 characters: a longer one keeps its first 47 and
/// ends with `-` and a digest of the whole.
pub fn nats_prefix(endpoint: &MessagingEndpoint) -> String {
    let full = format!(
        "{}_{}",
        endpoint.namespace().unwrap_or_default(),
        endpoint.name_any().replace('.', "_")
    );
    if full.len() <= 64 {
        return full;
    }
    let digest = hex(&Sha256::digest(full.as_bytes())[..8]);
    format!("{}-{digest}", &full[..47])
}

fn default_resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_string());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), q("50m")),
            ("memory".to_string(), q("64Mi")),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), q("256Mi"))])),
        ..ResourceRequirements::default()
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("metrics".to_string()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(2),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// The relay Deployment, mounting the Secret `credentials_secret`.
pub fn build_deployment(
    endpoint: &MessagingEndpoint,
    settings: &BuildSettings,
    credentials_secret: &str,
) -> Deployment {
    let name = endpoint.name_any();
    let spec = &endpoint.spec;
    let image = spec
        .image
        .clone()
        .unwrap_or_else(|| settings.relay_image.clone());
    let args = relay_args(endpoint);

    let data_volume = match spec.storage.type_ {
        StorageType::Embedded => Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc_name(&name),
                read_only: Some(false),
            }),
            ..Volume::default()
        },
        // No state on the pod: an emptyDir keeps the mount the relay expects.
        StorageType::Memory | StorageType::Nats => Volume {
            name: "data".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    };
    let shared_store = spec.storage.type_ == StorageType::Nats;
    let mut volumes = vec![
        Volume {
            name: "credentials".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(credentials_secret.to_string()),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        data_volume,
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mount = |name: &str, path: &str, read_only: bool| VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    };
    let port = |name: &str, number: i32| ContainerPort {
        name: Some(name.to_string()),
        container_port: number,
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    };

    let mut mounts = vec![
        mount("credentials", CREDENTIALS_DIR, true),
        mount("data", DATA_DIR, false),
        mount("tmp", "/tmp", false),
    ];
    // The NATS credentials file and CA, each from the Secret the spec names.
    let nats = spec
        .storage
        .nats
        .as_ref()
        .filter(|_| spec.storage.type_ == StorageType::Nats);
    for (volume, reference, dir, key) in [
        (
            "nats-credentials",
            nats.and_then(|n| n.credentials_secret_ref.as_ref()),
            NATS_CREDENTIALS_DIR,
            NATS_CREDENTIALS_KEY,
        ),
        (
            "nats-ca",
            nats.and_then(|n| n.tls_ca_secret_ref.as_ref()),
            NATS_CA_DIR,
            NATS_CA_KEY,
        ),
    ] {
        let Some(reference) = reference else { continue };
        volumes.push(Volume {
            name: volume.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(reference.name.clone()),
                items: Some(vec![KeyToPath {
                    key: key.into(),
                    path: key.into(),
                    ..KeyToPath::default()
                }]),
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(mount(volume, dir, true));
    }

    // Secret header values and client certificates, each Secret key mounted
    // alone where the relay's flags say.
    let secret_volume = |name: String, secret: &str, items: Vec<(&str, &str)>| Volume {
        name,
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_string()),
            items: Some(
                items
                    .into_iter()
                    .map(|(key, path)| KeyToPath {
                        key: key.into(),
                        path: path.into(),
                        ..KeyToPath::default()
                    })
                    .collect(),
            ),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    };
    for (target, _, options) in super::targets(spec) {
        for (i, header) in options.headers.iter().enumerate() {
            let Some(from) = &header.value_from else {
                continue;
            };
            let volume = format!("{target}-header-{i}");
            volumes.push(secret_volume(
                volume.clone(),
                &from.secret_key_ref.name,
                vec![(&from.secret_key_ref.key, "value")],
            ));
            mounts.push(mount(&volume, &format!("{HEADERS_DIR}/{target}-{i}"), true));
        }
        if let Some(reference) = &options.client_certificate_secret_ref {
            let volume = format!("{target}-client-tls");
            volumes.push(secret_volume(
                volume.clone(),
                &reference.name,
                vec![(TLS_CERT_KEY, TLS_CERT_KEY), (TLS_KEY_KEY, TLS_KEY_KEY)],
            ));
            mounts.push(mount(&volume, &format!("{CLIENT_TLS_DIR}/{target}"), true));
        }
    }

    let container = Container {
        name: "relay".into(),
        image: Some(image),
        args: Some(args),
        ports: Some(vec![port("http", HTTP_PORT), port("metrics", METRICS_PORT)]),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        readiness_probe: Some(probe("/readyz", 5, 2)),
        resources: Some(spec.resources.clone().unwrap_or_else(default_resources)),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(RELAY_UID),
            run_as_group: Some(RELAY_UID),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };

    let pod_spec = PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        termination_grace_period_seconds: Some(30),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RELAY_UID),
            run_as_group: Some(RELAY_UID),
            fs_group: Some(RELAY_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        node_selector: spec.node_selector.clone(),
        tolerations: spec.tolerations.clone(),
        affinity: spec.affinity.clone(),
        priority_class_name: spec.priority_class_name.clone(),
        topology_spread_constraints: shared_store.then(|| spread(&name)),
        ..PodSpec::default()
    };

    // The digest covers the pod spec as built (image, flags, mounts, scheduling),
    // so any of them changing rolls the pods. Credential values are not in it:
    // the relay re-reads its mounted files when the Secret changes, so a token
    // rotation needs no restart (and the operator need not read Secrets to roll).
    let mut hasher = Sha256::new();
    hasher.update(serde_json::to_vec(&pod_spec).expect("a PodSpec serializes"));
    let checksum = hex(&hasher.finalize());

    Deployment {
        metadata: owned_metadata(endpoint, deployment_name(&name)),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..LabelSelector::default()
            },
            strategy: Some(strategy(shared_store)),
            revision_history_limit: Some(3),
            progress_deadline_seconds: Some(600),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&name)),
                    annotations: Some(BTreeMap::from([(
                        CHECKSUM_ANNOTATION.to_string(),
                        checksum,
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod_spec),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::tests::{endpoint, settings};
    use crate::crd::DeliverySpec;

    fn build(ep: &MessagingEndpoint) -> Deployment {
        build_deployment(ep, &settings(), "support-credentials")
    }

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    fn checksum(d: &Deployment) -> String {
        d.spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()[CHECKSUM_ANNOTATION]
            .clone()
    }

    #[test]
    fn relay_runs_with_the_contract_flags() {
        let d = build(&endpoint());
        let c = &pod(&d).containers[0];
        assert_eq!(c.image.as_deref(), Some("botrelay/relay:0.1.0"));
        assert_eq!(
            c.args.as_ref().unwrap().join(" "),
            "--listen 0.0.0.0:8080 --admin-listen 0.0.0.0:9090 \
             --bot-url http://support-bot.shop.svc:8080/events \
             --response-url https://backend.example/bot-responses \
             --credentials-dir /var/run/botrelay/credentials --store embedded \
             --data-dir /var/lib/botrelay --endpoint-name support"
        );
    }

    #[test]
    fn delivery_settings_become_flags_and_image_can_be_overridden() {
        let mut ep = endpoint();
        ep.spec.image = Some("registry.example/relay:dev".into());
        ep.spec.delivery = Some(DeliverySpec {
            bot_timeout: Some("10s".into()),
            response_timeout: Some("15s".into()),
            connect_timeout: Some("2s".into()),
            retry_initial_backoff: Some("1s".into()),
            retry_max_backoff: Some("5m".into()),
            max_attempts: Some(20),
            max_message_age: Some("24h".into()),
            dedupe_window: Some("48h".into()),
            max_body_bytes: Some(65536),
            max_replies_per_answer: Some(500),
            ..DeliverySpec::default()
        });
        let d = build(&ep);
        let c = &pod(&d).containers[0];
        assert_eq!(c.image.as_deref(), Some("registry.example/relay:dev"));
        let args = c.args.as_ref().unwrap().join(" ");
        assert!(
            args.ends_with(
                "--endpoint-name support --bot-timeout 10s --response-timeout 15s \
                 --connect-timeout 2s --retry-initial-backoff 1s --retry-max-backoff 5m \
                 --max-attempts 20 --max-message-age 24h --dedupe-window 48h --max-body-bytes 65536 \
                 --max-replies-per-answer 500"
            ),
            "{args}"
        );
    }

    #[test]
    fn delivery_controls_become_flags_and_secrets_become_files() {
        use crate::crd::{
            CircuitBreakerSpec, HeaderValueSource, RateLimit, SecretKeyReference, SecretReference,
            TargetHeader,
        };
        let mut ep = endpoint();
        ep.spec.bot.target.rate_limit = Some(RateLimit {
            per_second: 50.0,
            burst: Some(10),
        });
        ep.spec.bot.target.headers = vec![
            TargetHeader {
                name: "X-Tenant".into(),
                value: Some("shop".into()),
                value_from: None,
            },
            TargetHeader {
                name: "X-Api-Key".into(),
                value: None,
                value_from: Some(HeaderValueSource {
                    secret_key_ref: SecretKeyReference {
                        name: "bot-api".into(),
                        key: "key".into(),
                    },
                }),
            },
        ];
        ep.spec.response_endpoint.target.rate_limit = Some(RateLimit {
            per_second: 0.5,
            burst: None,
        });
        ep.spec
            .response_endpoint
            .target
            .client_certificate_secret_ref = Some(SecretReference {
            name: "backend-client".into(),
        });
        ep.spec.delivery = Some(DeliverySpec {
            circuit_breaker: Some(CircuitBreakerSpec {
                failures: Some(5),
                probe_interval: Some("2s".into()),
                max_probe_interval: Some("1m".into()),
            }),
            reachability_probe_interval: Some("20s".into()),
            max_wait: Some("10s".into()),
            ..DeliverySpec::default()
        });
        let d = build(&ep);
        let pod = pod(&d);
        let args = pod.containers[0].args.as_ref().unwrap().join(" ");
        assert!(
            args.ends_with(
                "--endpoint-name support --bot-rate-limit 50 --bot-rate-burst 10 \
                 --bot-header X-Tenant: shop \
                 --bot-header-file X-Api-Key=/var/run/botrelay/headers/bot-1/value \
                 --response-rate-limit 0.5 \
                 --response-client-cert /var/run/botrelay/client-tls/response/tls.crt \
                 --response-client-key /var/run/botrelay/client-tls/response/tls.key \
                 --breaker-failures 5 --breaker-probe-interval 2s --breaker-max-probe-interval 1m \
                 --probe-interval 20s --max-wait 10s"
            ),
            "{args}"
        );
        // The secret value is never in the pod spec: only the mounted key.
        let spec_json = serde_json::to_string(pod).unwrap();
        let volume = |name: &str| {
            pod.volumes
                .as_ref()
                .unwrap()
                .iter()
                .find(|v| v.name == name)
                .unwrap_or_else(|| panic!("volume {name} in {spec_json}"))
                .secret
                .clone()
                .unwrap()
        };
        let header = volume("bot-header-1");
        assert_eq!(header.secret_name.as_deref(), Some("bot-api"));
        let items = header.items.unwrap();
        assert_eq!(
            (items[0].key.as_str(), items[0].path.as_str()),
            ("key", "value")
        );
        let tls = volume("response-client-tls");
        assert_eq!(tls.secret_name.as_deref(), Some("backend-client"));
        let keys: Vec<_> = tls.items.unwrap().into_iter().map(|i| i.key).collect();
        assert_eq!(keys, ["tls.crt", "tls.key"]);
        let mounts = pod.containers[0].volume_mounts.as_ref().unwrap();
        for (name, path) in [
            ("bot-header-1", "/var/run/botrelay/headers/bot-1"),
            (
                "response-client-tls",
                "/var/run/botrelay/client-tls/response",
            ),
        ] {
            let m = mounts.iter().find(|m| m.name == name).unwrap();
            assert_eq!((m.mount_path.as_str(), m.read_only), (path, Some(true)));
        }
        // Every key the pod mounts is one the operator checks exists.
        let uses = crate::build::referenced_secret_keys(&ep.spec);
        let named: Vec<_> = uses
            .iter()
            .map(|u| (u.secret.as_str(), u.key.as_str()))
            .collect();
        assert_eq!(
            named,
            [
                ("bot-api", "key"),
                ("backend-client", "tls.crt"),
                ("backend-client", "tls.key")
            ]
        );
        assert_eq!(uses[0].field, "spec.bot.headers[1].valueFrom");
    }

    #[test]
    fn pod_is_locked_down_and_probed_on_the_admin_port() {
        let d = build(&endpoint());
        let pod = pod(&d);
        let psc = pod.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
            &["ALL"]
        );
        let live = c
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        let ready = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(live.path.as_deref(), Some("/healthz"));
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        assert_eq!(live.port, IntOrString::String("metrics".into()));
        let ports: Vec<(&str, i32)> = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.as_deref().unwrap(), p.container_port))
            .collect();
        assert_eq!(ports, [("http", 8080), ("metrics", 9090)]);
        let res = c.resources.as_ref().unwrap();
        assert!(res.requests.as_ref().unwrap().contains_key("memory"));
        assert!(res.limits.as_ref().unwrap().contains_key("memory"));
    }

    #[test]
    fn credentials_and_data_are_mounted_and_the_store_gets_recreate() {
        let d = build(&endpoint());
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(
            spec.strategy.as_ref().unwrap().type_.as_deref(),
            Some("Recreate")
        );
        assert_eq!(spec.replicas, Some(1));
        let pod = pod(&d);
        let volumes = pod.volumes.as_ref().unwrap();
        let creds = volumes.iter().find(|v| v.name == "credentials").unwrap();
        assert_eq!(
            creds.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("support-credentials")
        );
        let data = volumes.iter().find(|v| v.name == "data").unwrap();
        assert_eq!(
            data.persistent_volume_claim.as_ref().unwrap().claim_name,
            "support-data"
        );
        let mounts: Vec<(&str, &str, Option<bool>)> = pod.containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| (m.name.as_str(), m.mount_path.as_str(), m.read_only))
            .collect();
        assert!(mounts.contains(&("credentials", "/var/run/botrelay/credentials", Some(true))));
        assert!(mounts.contains(&("data", "/var/lib/botrelay", Some(false))));
    }

    #[test]
    fn pods_carry_the_monitoring_labels_and_the_selector_matches_them() {
        let d = build(&endpoint());
        let spec = d.spec.as_ref().unwrap();
        let pod_labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert_eq!(pod_labels["app.kubernetes.io/name"], "botrelay-relay");
        assert_eq!(pod_labels["app.kubernetes.io/instance"], "support");
        assert_eq!(pod_labels["app.kubernetes.io/component"], "relay");
        assert_eq!(pod_labels["app.kubernetes.io/part-of"], "botrelay");
        assert_eq!(
            pod_labels["app.kubernetes.io/managed-by"],
            "botrelay-operator"
        );
        assert_eq!(pod_labels["botrelay.dev/endpoint"], "support");
        for (k, v) in spec.selector.match_labels.as_ref().unwrap() {
            assert_eq!(pod_labels.get(k), Some(v));
        }
        assert_eq!(d.owner_references()[0].name, "support");
    }

    #[test]
    fn checksum_changes_with_config_and_only_then() {
        let base = checksum(&build(&endpoint()));
        assert_eq!(base, checksum(&build(&endpoint())), "stable");

        let mut ep = endpoint();
        ep.spec.bot.url = "http://other-bot.shop.svc/events".into();
        assert_ne!(base, checksum(&build(&ep)), "config change rolls");

        let other_secret = build_deployment(&endpoint(), &settings(), "mine");
        assert_ne!(base, checksum(&other_secret), "another Secret rolls");

        let mut ep = endpoint();
        ep.spec.replicas = 0;
        assert_eq!(base, checksum(&build(&ep)), "scaling does not roll");
    }

    #[test]
    fn nats_prefixes_never_collide_and_fit_the_relays_limit() {
        let prefix = |ns: &str, name: &str| {
            let mut ep = endpoint();
            ep.metadata.namespace = Some(ns.into());
            ep.metadata.name = Some(name.into());
            nats_prefix(&ep)
        };
        assert_eq!(prefix("shop", "support"), "shop_support");
        assert_eq!(prefix("shop", "support.eu"), "shop_support_eu");
        assert_ne!(prefix("a-b", "c"), prefix("a", "b-c"));
        let long = "x".repeat(200);
        let (p1, p2) = (prefix("shop", &long), prefix("shop", &format!("{long}y")));
        assert_eq!((p1.len(), p2.len()), (64, 64));
        assert_ne!(p1, p2);
        assert!(
            p1.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }

    #[test]
    fn memory_store_uses_an_empty_dir() {
        let mut ep = endpoint();
        ep.spec.storage.type_ = StorageType::Memory;
        let d = build(&ep);
        let args = pod(&d).containers[0].args.as_ref().unwrap().join(" ");
        assert!(args.contains("--store memory"));
        let data = pod(&d)
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "data")
            .unwrap();
        assert!(data.empty_dir.is_some());
    }
}
