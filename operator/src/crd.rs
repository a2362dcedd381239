//! The `MessagingEndpoint` custom resource (`botrelay.dev/v1alpha1`).
//!
//! The CRD in `crds/` is generated from these types by the `crdgen` binary, so
//! the validation the API server enforces lives here, next to the fields. The
//! schema attributes keep the output a valid *structural* schema: every node is
//! typed and no `Option` of an enum turns into `enum: [..., null]`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A duration the relay understands and CEL's `duration()` parses alike:
/// one or more `<integer><unit>` groups, units `ms`, `s`, `m`, `h` (e.g. `10s`, `1h30m`).
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";

/// An absolute `http://` or `https://` URL with a host.
pub const URL_PATTERN: &str = r"^https?://[^\s/?#@]+(/[^\s]*)?$";

/// A DNS-1123 subdomain, as Kubernetes object names are.
pub const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// The desired state of one relay.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "botrelay.dev",
    version = "v1alpha1",
    kind = "MessagingEndpoint",
    plural = "messagingendpoints",
    singular = "messagingendpoint",
    shortname = "mep",
    category = "botrelay",
    namespaced,
    doc = "A relay between a back-end and its bot, run and watched by the botrelay operator.",
    status = "MessagingEndpointStatus",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Bot","type":"string","jsonPath":".status.conditions[?(@.type==\"BotReachable\")].status"}"#,
    printcolumn = r#"{"name":"Response Endpoint","type":"string","jsonPath":".status.conditions[?(@.type==\"ResponseEndpointReachable\")].status"}"#,
    printcolumn = r#"{"name":"Pods Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Pods","type":"integer","jsonPath":".status.replicas"}"#,
    printcolumn = r#"{"name":"Webhook URL","type":"string","jsonPath":".status.webhookUrl"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.replicas) || self.replicas <= 1 || (has(self.storage) && has(self.storage.type) && self.storage.type == 'nats')",
    "message": "replicas above 1 need storage.type nats; the embedded and memory stores serve one replica"
}]))]
pub struct MessagingEndpointSpec {
    /// Where the relay delivers user messages (the bot's webhook).
    pub bot: BotSpec,

    /// Where the relay delivers the bot's messages (the back-end's callback).
    pub response_endpoint: ResponseEndpointSpec,

    /// Relay pods to run. 0 stops the relay (its data is kept). The embedded
    /// and memory stores serve exactly one replica; `nats` serves 1 to 10.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 10))]
    pub replicas: i32,

    /// Delivery tuning passed to the relay as flags; unset fields keep the relay's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliverySpec>,

    /// Where accepted messages wait until delivered.
    #[serde(default)]
    pub storage: StorageSpec,

    /// Use your own Secret (same namespace) holding `client-token`, `bot-token`,
    /// `bot-signing-secret` and `response-signing-secret` instead of a generated one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,

    /// Relay image; defaults to the operator's `--relay-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,

    /// Compute resources of the relay container; defaults to small requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Node labels the relay pod must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Tolerations of the relay pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Affinity of the relay pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// PriorityClass of the relay pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

fn default_replicas() -> i32 {
    1
}

/// The bot side.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BotSpec {
    /// URL that receives user messages, e.g. `http://support-bot.shop.svc:8080/events`.
    #[schemars(regex(pattern = URL_PATTERN), length(max = 2048))]
    pub url: String,
    /// How requests to the bot are sent: rate limit, extra headers, client certificate.
    #[serde(flatten)]
    pub target: TargetOptions,
}

/// The back-end side.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResponseEndpointSpec {
    /// URL that receives the bot's messages, one per request.
    #[schemars(regex(pattern = URL_PATTERN), length(max = 2048))]
    pub url: String,
    /// How requests to the response endpoint are sent.
    #[serde(flatten)]
    pub target: TargetOptions,
}

/// How the relay sends to one target (the bot or the response endpoint).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetOptions {
    /// At most this many deliveries a second to the target; the others wait
    /// in the store, in order. Unset: as fast as the target answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Extra headers on every request to the target (at most 32). A value
    /// that is secret comes from a Secret (`valueFrom.secretKeyRef`), never in clear here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub headers: Vec<TargetHeader>,
    /// A Secret (same namespace, keys `tls.crt` and `tls.key`, e.g. of type
    /// `kubernetes.io/tls`) with the client certificate the relay presents to
    /// a target that demands mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_secret_ref: Option<SecretReference>,
}

/// A rate limit: `perSecond` on average, up to `burst` at once.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Deliveries a second, e.g. `50` or `0.5` (one every two seconds).
    #[schemars(range(min = 0.001, max = 100000.0))]
    pub per_second: f64,
    /// Deliveries that may go at once after a quiet spell; by default the
    /// rate rounded up (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub burst: Option<i32>,
}

/// Header names the relay sets itself, which a spec may not set.
pub const RESERVED_HEADERS: [&str; 8] = [
    "content-type",
    "content-length",
    "host",
    "connection",
    "transfer-encoding",
    "traceparent",
    "tracestate",
    "botrelay-probe",
];

/// The longest header value the relay takes (its own `MAX_HEADER_VALUE`).
pub const MAX_HEADER_VALUE: usize = 4096;

/// One extra header: a `value` in clear, or `valueFrom` a Secret's key.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.value) != has(self.valueFrom)",
    "message": "a header has either value or valueFrom"
}, {
    "rule": "!self.name.matches('(?i)^(content-type|content-length|host|connection|transfer-encoding|traceparent|tracestate|botrelay-probe|webhook-.*)$')",
    "message": "the relay sets this header itself (content-type, content-length, host, connection, transfer-encoding, traceparent, tracestate, botrelay-probe, webhook-*)"
}]))]
pub struct TargetHeader {
    /// Header name, e.g. `X-Api-Key`.
    #[schemars(
        regex(pattern = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"),
        length(min = 1, max = 128)
    )]
    pub name: String,
    /// The value, in clear (not for secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[\t\x20-\x7e]*$"), length(max = MAX_HEADER_VALUE))]
    pub value: Option<String>,
    /// Where a secret value is: a key of a Secret in the endpoint's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<HeaderValueSource>,
}

/// The source of a secret header value.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderValueSource {
    /// The Secret and key holding the value.
    pub secret_key_ref: SecretKeyReference,
}

/// A key of a Secret in the endpoint's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeyReference {
    /// Name of the Secret.
    #[schemars(regex(pattern = NAME_PATTERN), length(min = 1, max = 253))]
    pub name: String,
    /// The key in it.
    #[schemars(regex(pattern = r"^[-._a-zA-Z0-9]+$"), length(min = 1, max = 253))]
    pub key: String,
}

/// When the relay stops hammering a target that keeps failing.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.probeInterval) || !has(self.maxProbeInterval) || duration(self.probeInterval) <= duration(self.maxProbeInterval)",
    "message": "probeInterval must not exceed maxProbeInterval"
}, {
    "rule": "!has(self.probeInterval) || (duration(self.probeInterval) > duration('0s') && duration(self.probeInterval) <= duration('24h'))",
    "message": "probeInterval must be above 0s and at most 24h"
}, {
    "rule": "!has(self.maxProbeInterval) || (duration(self.maxProbeInterval) > duration('0s') && duration(self.maxProbeInterval) <= duration('24h'))",
    "message": "maxProbeInterval must be above 0s and at most 24h"
}]))]
pub struct CircuitBreakerSpec {
    /// Consecutive failed deliveries to one target that pause it (default 10;
    /// 0 never pauses). While paused, one delivery at a time probes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000))]
    pub failures: Option<i32>,
    /// Wait before the first probing delivery; doubles after each failed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub probe_interval: Option<String>,
    /// Longest wait between two probing deliveries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub max_probe_interval: Option<String>,
}

/// Timeouts, retries and limits of the relay. Durations are like `10s`, `5m`, `24h`, `1h30m`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.retryInitialBackoff) || !has(self.retryMaxBackoff) || duration(self.retryInitialBackoff) <= duration(self.retryMaxBackoff)",
    "message": "retryInitialBackoff must not exceed retryMaxBackoff"
}, {
    "rule": "!has(self.maxWait) || duration(self.maxWait) <= duration('5m')",
    "message": "maxWait must not exceed 5m"
}, {
    "rule": "!has(self.reachabilityProbeInterval) || duration(self.reachabilityProbeInterval) == duration('0s') || (duration(self.reachabilityProbeInterval) >= duration('1s') && duration(self.reachabilityProbeInterval) <= duration('24h'))",
    "message": "reachabilityProbeInterval must be 0s (no probes) or between 1s and 24h"
}]))]
pub struct DeliverySpec {
    /// Time limit of one delivery to the bot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub bot_timeout: Option<String>,
    /// Time limit of one delivery to the response endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub response_timeout: Option<String>,
    /// Time limit for opening a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub connect_timeout: Option<String>,
    /// Wait before the first retry; doubles (with jitter) up to retryMaxBackoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub retry_initial_backoff: Option<String>,
    /// Longest wait between two retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub retry_max_backoff: Option<String>,
    /// Attempts per message before it is dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_attempts: Option<i32>,
    /// Age after which an undelivered message is dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub max_message_age: Option<String>,
    /// How long a `messageId` is remembered for deduplication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub dedupe_window: Option<String>,
    /// Largest accepted request body, in bytes (1 KiB to 16 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024, max = 16777216))]
    pub max_body_bytes: Option<i64>,
    /// Most replies one answer of the bot may carry (default 100): an
    /// answer with more counts as delivered, and its replies are dropped
    /// and logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_replies_per_answer: Option<i32>,
    /// Pausing a target after consecutive failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    /// How often the relay checks that both targets answer (a probe request
    /// they can tell apart; default `30s`, `0s` never). The result shows in
    /// the `BotReachable` and `ResponseEndpointReachable` conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub reachability_probe_interval: Option<String>,
    /// The longest a client may ask (`?wait=`) to get the bot's replies in
    /// the answer (default `30s`, at most `5m`; `0s` refuses `wait`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    pub max_wait: Option<String>,
}

/// Which store the relay uses.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StorageType {
    /// A crash-safe file on a PersistentVolumeClaim: accepted messages survive restarts.
    #[default]
    Embedded,
    /// In memory: accepted messages are lost when the pod restarts.
    Memory,
    /// NATS JetStream: several relay replicas share it, and no volume is needed.
    Nats,
}

impl StorageType {
    /// The value of the relay's `--store` flag.
    pub fn as_flag(self) -> &'static str {
        match self {
            StorageType::Embedded => "embedded",
            StorageType::Memory => "memory",
            StorageType::Nats => "nats",
        }
    }
}

/// The relay's store.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.type) && self.type == 'nats') == has(self.nats)",
    "message": "storage.nats is set exactly when storage.type is nats"
}, {
    "rule": "has(self.storageClassName) == has(oldSelf.storageClassName) && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)",
    "message": "storage.storageClassName cannot change once the volume is made"
}]))]
pub struct StorageSpec {
    /// `embedded` (default, on a PersistentVolumeClaim), `memory`, or `nats`
    /// (NATS JetStream shared by several replicas; see `nats`).
    #[serde(default, rename = "type")]
    pub type_: StorageType,
    /// Size of the PersistentVolumeClaim, e.g. `1Gi`. It can only grow, and
    /// only where the StorageClass allows expansion.
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"))]
    pub size: String,
    /// StorageClass of the PersistentVolumeClaim; the cluster default when
    /// unset. Fixed once the endpoint is made (a claim's class cannot change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Where the `nats` store is: required with `type: nats`, refused otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsSpec>,
}

/// A NATS cluster with JetStream on (e.g. from the official NATS Helm chart).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NatsSpec {
    /// Its servers, e.g. `nats://nats.nats.svc:4222` (`nats://` or `tls://`).
    #[schemars(schema_with = "nats_urls_schema")]
    pub urls: Vec<String>,
    /// A Secret (same namespace) holding a NATS credentials file (`.creds`)
    /// under the key `nats.creds`, for servers that require one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,
    /// A Secret (same namespace) holding, under the key `ca.crt`, the CA
    /// that signed the servers' certificates, when it is a private one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_secret_ref: Option<SecretReference>,
    /// Copies JetStream keeps of the endpoint's data: 3 (default) survives
    /// the loss of one server of three; 1 for a single server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 5))]
    pub stream_replicas: Option<i32>,
}

/// The pattern of a NATS server URL.
pub const NATS_URL_PATTERN: &str = r"^(nats|tls)://[^\s/?#@]+$";

fn nats_urls_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": 16,
        "items": {"type": "string", "maxLength": 512, "pattern": NATS_URL_PATTERN},
    })
}

fn default_storage_size() -> String {
    "1Gi".to_string()
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            type_: StorageType::default(),
            size: default_storage_size(),
            storage_class_name: None,
            nats: None,
        }
    }
}

/// A Secret in the endpoint's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretReference {
    /// Name of the Secret.
    #[schemars(regex(pattern = NAME_PATTERN), length(min = 1, max = 253))]
    pub name: String,
}

/// What the operator observed and did.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagingEndpointStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// In-cluster URL that back-ends POST user messages to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// Secret holding the tokens and signing secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// Relay pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Relay pods asked for (`spec.replicas`): ready ones are `readyReplicas` of these.
    #[serde(default)]
    pub replicas: i32,
    /// `Ready`, `Progressing`, `Degraded`, and `BotReachable` and
    /// `ResponseEndpointReachable` as the relay last found its targets.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

impl MessagingEndpoint {
    /// The condition of the given type, if the status has one.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
    }
}
