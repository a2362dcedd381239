//! The reconcile loop: validate → credentials → build → apply → status.
//!
//! Every object is written with server-side apply under one field manager
//! (`botrelay-operator`), so a re-run that changes nothing writes nothing, and
//! status is patched only when it differs, so there are no reconcile storms.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::{DeserializeGuard, PartialObjectMeta, error_boundary::InvalidObject};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::build::{
    self, BuildSettings, Credentials, FIELD_MANAGER, MANAGED_BY_SELECTOR, MissingKeys,
};
use crate::crd::MessagingEndpoint;
use crate::metrics::Metrics;
use crate::status::{self, Observation, desired_status};
use crate::validate::validate_spec;

/// What can make a reconciliation fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed; `action` says which.
    #[error("{action}: {source}")]
    Kube {
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    /// The stored object does not decode as a MessagingEndpoint.
    #[error("object cannot be decoded: {0}")]
    UndecodableObject(String),
    /// The object has no namespace (MessagingEndpoint is namespaced, so the API server broke a rule).
    #[error("object has no namespace")]
    MissingNamespace,
}

impl Error {
    /// The `reason` label of `botrelay_operator_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { action, .. } => action,
            Error::UndecodableObject(_) => "undecodable_object",
            Error::MissingNamespace => "missing_namespace",
        }
    }
}

impl Error {
    /// A one-line message for a condition: the API server's own words when it answered.
    pub fn condition_message(&self) -> String {
        match self {
            Error::Kube {
                action,
                source: kube::Error::Api(status),
            } => format!(
                "{action}: {} ({}, HTTP {})",
                status.message, status.reason, status.code
            ),
            other => other.to_string(),
        }
    }
}

fn kube_err(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { action, source }
}

/// Shared by every reconciliation.
pub struct Context {
    pub client: Client,
    pub settings: BuildSettings,
    pub metrics: Metrics,
    pub recorder: Recorder,
    /// Consecutive failures per endpoint, for per-object backoff.
    failures: Mutex<HashMap<ObjectRef<DeserializeGuard<MessagingEndpoint>>, u32>>,
    /// The Ready (status, reason) last announced by an Event, per endpoint uid:
    /// the cached object can lag behind our own status write, and must not
    /// make us announce the same transition twice.
    announced: Mutex<HashMap<String, (String, String)>>,
}

impl Context {
    pub fn new(client: Client, settings: BuildSettings, metrics: Metrics, identity: &str) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "botrelay-operator".into(),
                instance: Some(identity.to_string()),
            },
        );
        Context {
            client,
            settings,
            metrics,
            recorder,
            failures: Mutex::default(),
            announced: Mutex::default(),
        }
    }
}

type Guarded = DeserializeGuard<MessagingEndpoint>;

/// Entry point of the controller: times and counts each reconciliation.
async fn reconcile(object: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = match &object.0 {
        Ok(endpoint) => reconcile_endpoint(endpoint, &ctx).await,
        Err(invalid) => report_undecodable(invalid, &ctx).await,
    };
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    let key = ObjectRef::from_obj(object.as_ref());
    match &result {
        Ok(_) => {
            ctx.metrics
                .reconciliations
                .with_label_values(&["success"])
                .inc();
            ctx.failures.lock().unwrap().remove(&key);
        }
        Err(e) => {
            ctx.metrics
                .reconciliations
                .with_label_values(&["error"])
                .inc();
            ctx.metrics
                .reconcile_errors
                .with_label_values(&[e.metric_label()])
                .inc();
        }
    }
    result
}

/// Per-object exponential backoff: 2 s, 4 s, … up to 5 min.
fn error_policy(object: Arc<Guarded>, error: &Error, ctx: Arc<Context>) -> Action {
    let name = object.name_any();
    let namespace = object.namespace().unwrap_or_default();
    if let Error::UndecodableObject(_) = error {
        // Retrying cannot help; the next change to the object triggers a new try.
        return Action::await_change();
    }
    let key = ObjectRef::from_obj(object.as_ref());
    let attempts = {
        let mut failures = ctx.failures.lock().unwrap();
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = Duration::from_secs(2u64.saturating_pow(attempts.min(9)).min(300));
    tracing::warn!(%namespace, %name, error = %error, attempts, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

async fn reconcile_endpoint(endpoint: &MessagingEndpoint, ctx: &Context) -> Result<Action, Error> {
    if endpoint.meta().deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove what we made.
        return Ok(Action::await_change());
    }
    let namespace = endpoint.namespace().ok_or(Error::MissingNamespace)?;
    let name = endpoint.name_any();
    tracing::debug!(%namespace, %name, "reconciling");

    // 1. Validate.
    if let Err(invalid) = validate_spec(&endpoint.spec) {
        let message = invalid.to_string();
        let status = desired_status(endpoint, &Observation::InvalidSpec(message), None, now());
        update_status(endpoint, status, ctx).await?;
        return Ok(Action::await_change());
    }

    // 2. Credentials: the user's Secret, or ours (generated once).
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let (secret_name, credentials) = match &endpoint.spec.credentials_secret_ref {
        Some(reference) => {
            let found = secrets
                .get_opt(&reference.name)
                .await
                .map_err(kube_err("get_secret"))?;
            let problem = match found.as_ref().map(Credentials::from_secret) {
                Some(Ok(credentials)) => Ok(credentials),
                Some(Err(MissingKeys(keys))) => Err((
                    "MissingSecretKey",
                    format!("Secret {} lacks {}", reference.name, keys.join(", ")),
                )),
                None => Err((
                    "SecretNotFound",
                    format!(
                        "Secret {} not found in namespace {namespace}",
                        reference.name
                    ),
                )),
            };
            match problem {
                Ok(credentials) => (reference.name.clone(), credentials),
                Err((reason, message)) => {
                    let observation = Observation::CredentialsUnusable { reason, message };
                    let status =
                        desired_status(endpoint, &observation, Some(reference.name.clone()), now());
                    update_status(endpoint, status, ctx).await?;
                    // The Secret watch brings us back when it is created or fixed.
                    return Ok(Action::requeue(Duration::from_secs(300)));
                }
            }
        }
        None => {
            let secret_name = build::secret_name(&name);
            let existing = secrets
                .get_opt(&secret_name)
                .await
                .map_err(kube_err("get_secret"))?;
            let credentials = generated_credentials(existing.as_ref());
            if existing.is_none() {
                publish(
                    ctx,
                    endpoint,
                    EventType::Normal,
                    "CredentialsGenerated",
                    format!("generated tokens and signing secrets in Secret {secret_name}"),
                )
                .await;
            }
            let secret = build::build_secret(endpoint, &credentials);
            apply(&secrets, &secret_name, &secret, "apply_secret").await?;
            (secret_name, credentials)
        }
    };

    // 3. Build and apply the relay.
    let result = apply_relay(endpoint, &namespace, &secret_name, &credentials, ctx).await;
    let observation = match &result {
        Ok(deployment) => Observation::Applied(Box::new(deployment.clone())),
        Err(e) => Observation::ApplyFailed(e.condition_message()),
    };

    // 4. Status.
    let status = desired_status(endpoint, &observation, Some(secret_name), now());
    update_status(endpoint, status, ctx).await?;
    result?;
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// The values of our generated Secret: the ones already there, never replaced;
/// only keys that are missing (a new Secret, or a key someone deleted) are generated.
fn generated_credentials(existing: Option<&Secret>) -> Credentials {
    let fresh = Credentials::generate();
    let Some(existing) = existing else {
        return fresh;
    };
    let mut data = fresh.to_data();
    for (k, v) in existing.data.clone().unwrap_or_default() {
        if data.contains_key(&k) && !v.0.iter().all(u8::is_ascii_whitespace) {
            data.insert(k, v);
        }
    }
    let merged = Secret {
        data: Some(data),
        ..Secret::default()
    };
    Credentials::from_secret(&merged).expect("every key is filled")
}

async fn apply_relay(
    endpoint: &MessagingEndpoint,
    namespace: &str,
    secret_name: &str,
    credentials: &Credentials,
    ctx: &Context,
) -> Result<Deployment, Error> {
    let name = endpoint.name_any();
    if let Some(pvc) = build::build_pvc(endpoint) {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
        apply(&pvcs, &build::pvc_name(&name), &pvc, "apply_pvc").await?;
    }
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
    let service = build::build_service(endpoint);
    apply(
        &services,
        &build::service_name(&name),
        &service,
        "apply_service",
    )
    .await?;

    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let deployment = build::build_deployment(endpoint, &ctx.settings, secret_name, credentials);
    apply(
        &deployments,
        &build::deployment_name(&name),
        &deployment,
        "apply_deployment",
    )
    .await
}

async fn apply<K>(api: &Api<K>, name: &str, object: &K, action: &'static str) -> Result<K, Error>
where
    K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
    K::DynamicType: Default,
{
    // Apply needs apiVersion and kind in the body; k8s-openapi adds them when serializing.
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(name, &params, &Patch::Apply(object))
        .await
        .map_err(kube_err(action))
}

/// Writes status when (and only when) it differs from what the object has, and
/// records an Event when readiness flips.
async fn update_status(
    endpoint: &MessagingEndpoint,
    status: crate::crd::MessagingEndpointStatus,
    ctx: &Context,
) -> Result<(), Error> {
    if endpoint.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let before = endpoint.condition(status::READY).cloned();
    let after = status
        .conditions
        .iter()
        .find(|c| c.type_ == status::READY)
        .cloned();
    let namespace = endpoint.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<MessagingEndpoint> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({
        "apiVersion": MessagingEndpoint::api_version(&()),
        "kind": MessagingEndpoint::kind(&()),
        "status": status,
    });
    api.patch_status(
        &endpoint.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(kube_err("patch_status"))?;

    if let Some(after) = after {
        let now = (after.status.clone(), after.reason.clone());
        let cached_differs = before
            .as_ref()
            .is_none_or(|b| (&b.status, &b.reason) != (&now.0, &now.1));
        let uid = endpoint.uid().unwrap_or_default();
        let newly_announced = {
            let mut announced = ctx.announced.lock().unwrap();
            // Deleted endpoints leave entries behind; forgetting all is cheap
            // (at worst one repeated Event).
            if announced.len() > 10_000 {
                announced.clear();
            }
            announced.insert(uid, now.clone()) != Some(now)
        };
        if cached_differs && newly_announced {
            let type_ = if after.status == "True" {
                EventType::Normal
            } else {
                EventType::Warning
            };
            publish(ctx, endpoint, type_, &after.reason, after.message.clone()).await;
        }
    }
    Ok(())
}

async fn publish(
    ctx: &Context,
    endpoint: &MessagingEndpoint,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx
        .recorder
        .publish(&event, &endpoint.object_ref(&()))
        .await
    {
        tracing::warn!(name = %endpoint.name_any(), error = %e, "could not publish event");
    }
}

/// An object the operator cannot decode still gets a condition saying why,
/// written through the untyped API; the watch of the others goes on.
async fn report_undecodable(invalid: &InvalidObject, ctx: &Context) -> Result<Action, Error> {
    let name = invalid.metadata.name.clone().unwrap_or_default();
    let namespace = invalid
        .metadata
        .namespace
        .clone()
        .ok_or(Error::MissingNamespace)?;
    tracing::warn!(%namespace, %name, error = %invalid.error, "MessagingEndpoint cannot be decoded");
    let resource = ApiResource::erase::<MessagingEndpoint>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &namespace, &resource);
    let message = format!(
        "the object does not match the MessagingEndpoint schema: {}",
        invalid.error
    );
    let current = api.get(&name).await.map_err(kube_err("get_endpoint"))?;
    let already = current.data["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["reason"] == "InvalidObject" && c["message"] == message);
    if !already {
        let condition = |type_: &str, status: &str| {
            json!({
                "type": type_, "status": status, "reason": "InvalidObject", "message": message,
                "observedGeneration": invalid.metadata.generation,
                "lastTransitionTime": now(),
            })
        };
        let patch = json!({"status": {
            "observedGeneration": invalid.metadata.generation,
            "conditions": [condition("Ready", "False"), condition("Progressing", "False"), condition("Degraded", "True")],
        }});
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(kube_err("patch_status"))?;
        let reference = current.object_ref(&resource);
        let event = Event {
            type_: EventType::Warning,
            reason: "InvalidObject".into(),
            note: Some(message.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(%name, error = %e, "could not publish event");
        }
    }
    Err(Error::UndecodableObject(invalid.error.clone()))
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Runs one controller over `endpoints` (one namespace, or all) until `shutdown`
/// resolves. Returns the store of endpoints, for the readiness gauge.
pub fn controller(
    endpoints: Api<Guarded>,
    client: Client,
    namespace: Option<String>,
    ctx: Arc<Context>,
    concurrency: u16,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> (Store<Guarded>, impl Future<Output = ()>) {
    fn meta_stream<K>(
        client: &Client,
        namespace: Option<&String>,
        config: watcher::Config,
    ) -> impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        // An Api of PartialObjectMeta makes metadata-only list and watch requests.
        let api: Api<PartialObjectMeta<K>> = match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        watcher(api, config).touched_objects()
    }
    // Owned objects and Secrets are watched as metadata only: the controller
    // needs names and owner references, never their specs or Secret values.
    let owned_config = watcher::Config::default().labels(MANAGED_BY_SELECTOR);
    let controller = Controller::new(endpoints, watcher::Config::default());
    let store = controller.store();
    let endpoints_by_secret = store.clone();
    let ns = namespace.as_ref();
    let controller = controller
        .owns_stream(meta_stream::<Deployment>(&client, ns, owned_config.clone()))
        .owns_stream(meta_stream::<Service>(&client, ns, owned_config.clone()))
        .owns_stream(meta_stream::<PersistentVolumeClaim>(
            &client,
            ns,
            owned_config,
        ))
        // Every Secret, not only ours: a user's Secret named by credentialsSecretRef
        // being created or fixed must reconcile the endpoints that use it.
        .watches_stream(
            meta_stream::<Secret>(&client, ns, watcher::Config::default()),
            move |secret| endpoints_for_secret(&secret.metadata, &endpoints_by_secret),
        )
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
        .graceful_shutdown_on(shutdown);
    let run = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(name = %object.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "controller event"),
            }
        });
    (store, run)
}

/// The endpoints a Secret matters to: its controller (our generated Secret)
/// and every endpoint in its namespace whose credentialsSecretRef names it.
fn endpoints_for_secret(secret: &ObjectMeta, store: &Store<Guarded>) -> Vec<ObjectRef<Guarded>> {
    let (Some(namespace), Some(name)) = (secret.namespace.clone(), secret.name.clone()) else {
        return vec![];
    };
    let mut refs: Vec<ObjectRef<Guarded>> = secret
        .owner_references
        .iter()
        .flatten()
        .filter(|r| r.controller == Some(true) && r.kind == "MessagingEndpoint")
        .map(|r| ObjectRef::new(&r.name).within(&namespace))
        .collect();
    for object in store.state() {
        if let Ok(endpoint) = &object.0
            && endpoint.namespace().as_deref() == Some(namespace.as_str())
            && endpoint
                .spec
                .credentials_secret_ref
                .as_ref()
                .is_some_and(|r| r.name == name)
        {
            refs.push(ObjectRef::from_obj(object.as_ref()));
        }
    }
    refs
}

/// Counts ready and not-ready endpoints in the controllers' caches.
pub fn count_endpoints(stores: &[Store<Guarded>]) -> (usize, usize) {
    let mut ready = 0;
    let mut not_ready = 0;
    for store in stores {
        for object in store.state() {
            match &object.0 {
                Ok(endpoint) if status::is_ready(endpoint) => ready += 1,
                _ => not_ready += 1,
            }
        }
    }
    (ready, not_ready)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    #[test]
    fn generated_credentials_keep_existing_values_and_fill_missing_ones() {
        let secret = Secret {
            data: Some(BTreeMap::from([
                ("client-token".to_string(), ByteString(b"keep-me".to_vec())),
                ("bot-token".to_string(), ByteString(b"".to_vec())),
            ])),
            ..Secret::default()
        };
        let creds = generated_credentials(Some(&secret)).to_data();
        assert_eq!(creds["client-token"].0, b"keep-me");
        assert!(!creds["bot-token"].0.is_empty());
        assert!(creds["bot-signing-secret"].0.starts_with(b"whsec_"));
        assert_eq!(creds.len(), 4);
    }

    #[test]
    fn error_labels_name_the_failed_step() {
        let e = Error::Kube {
            action: "apply_deployment",
            source: kube::Error::LinesCodecMaxLineLengthExceeded,
        };
        assert_eq!(e.metric_label(), "apply_deployment");
        assert_eq!(
            Error::UndecodableObject("x".into()).metric_label(),
            "undecodable_object"
        );
        let api = Error::Kube {
            action: "apply_pvc",
            source: kube::Error::Api(Box::new(kube::core::Status {
                message: "spec is immutable after creation".into(),
                reason: "Invalid".into(),
                code: 422,
                ..Default::default()
            })),
        };
        assert_eq!(
            api.condition_message(),
            "apply_pvc: spec is immutable after creation (Invalid, HTTP 422)"
        );
    }
}
