//! The reconcile loop: validate → credentials → build → apply → status.
//!
//! Every object is written with server-side apply under one field manager
//! (`botrelay-operator`), and only when what it would write is not already
//! there (`applied.rs`): a reconcile that changes nothing sends no write at
//! all. Status is patched only when it differs, and Events mark real changes,
//! so the events that our own writes cause do not feed back into more writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::{DeserializeGuard, PartialObjectMeta, error_boundary::InvalidObject};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::applied::{self, ObjectKey, Record, Records};
use crate::build::{
    self, BuildSettings, Credentials, FIELD_MANAGER, MANAGED_BY_SELECTOR, MissingKeys,
};
use crate::crd::{MAX_HEADER_VALUE, MessagingEndpoint, MessagingEndpointStatus};
use crate::metrics::Metrics;
use crate::status::{self, Observation, desired_status};
use crate::targets::{self, TargetsWatch};
use crate::validate::validate;

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
    /// Whether the API server said the endpoint itself is gone.
    fn endpoint_gone(&self) -> bool {
        matches!(
            self,
            Error::Kube { action: "patch_status" | "get_endpoint", source: kube::Error::Api(status) }
                if status.code == 404
        )
    }

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
    /// The status last written, per endpoint uid, with the resourceVersion
    /// the write made: while the cache shows an older version, it is the
    /// status now.
    written_status: Mutex<HashMap<String, (MessagingEndpointStatus, u64)>>,
    /// Checks in a row that found an endpoint's own Secret missing or
    /// incomplete: they come back sooner at first (no Secret is watched).
    secret_waits: Mutex<HashMap<ObjectRef<Guarded>, u32>>,
    /// The Secret each endpoint uses, per endpoint uid, as last found usable:
    /// (endpoint generation, Secret name, when). Reconciles that follow within
    /// a minute for the same generation do not read it again.
    secret_checked: Mutex<HashMap<String, SecretCheck>>,
    /// What this process applied to each owned object.
    applied: Records,
    /// The Deployments as our last apply returned them, until the watch
    /// cache shows them: a reconcile that runs before the cache caught up
    /// reads the relay's state from here instead of applying again.
    written_deployments: Mutex<HashMap<(String, String), Arc<Deployment>>>,
    /// What the relays last said of their targets.
    targets: Arc<TargetsWatch>,
}

/// The owned objects as one controller's watches last saw them: the
/// Deployments whole (their status makes the endpoint's), the others as
/// metadata.
pub struct OwnedCache {
    deployments: Store<Deployment>,
    services: Store<PartialObjectMeta<Service>>,
    pvcs: Store<PartialObjectMeta<PersistentVolumeClaim>>,
    pdbs: Store<PartialObjectMeta<PodDisruptionBudget>>,
}

/// What one controller's reconciliations share.
pub struct Scope {
    ctx: Arc<Context>,
    owned: OwnedCache,
}

/// A Secret found usable: for which endpoint generation, its name, when.
type SecretCheck = (Option<i64>, String, Instant);

/// How long a Secret found usable is trusted without reading it again (the
/// resyncs come later than this, so each of them reads it).
const SECRET_CHECK_TTL: Duration = Duration::from_secs(50);

/// Forgets entries of per-endpoint memos past this many: deleted endpoints
/// leave entries behind, and forgetting costs at most one repeated write.
const MEMO_LIMIT: usize = 10_000;

impl Context {
    pub fn new(
        client: Client,
        settings: BuildSettings,
        metrics: Metrics,
        identity: &str,
        targets: targets::Settings,
    ) -> Self {
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
            written_status: Mutex::default(),
            secret_waits: Mutex::default(),
            secret_checked: Mutex::default(),
            applied: Records::default(),
            written_deployments: Mutex::default(),
            targets: Arc::new(TargetsWatch::new(targets)),
        }
    }
}

type Guarded = DeserializeGuard<MessagingEndpoint>;

/// Entry point of the controller: times and counts each reconciliation.
async fn reconcile(object: Arc<Guarded>, scope: Arc<Scope>) -> Result<Action, Error> {
    let started = Instant::now();
    let ctx = &scope.ctx;
    let result = match &object.0 {
        Ok(endpoint) => reconcile_endpoint(endpoint, &scope).await,
        Err(invalid) => report_undecodable(invalid, ctx).await,
    };
    // The endpoint was deleted while we worked on it: nothing is left to do,
    // and nothing failed.
    let result = match result {
        Err(e) if e.endpoint_gone() => Ok(Action::await_change()),
        other => other,
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
fn error_policy(object: Arc<Guarded>, error: &Error, scope: Arc<Scope>) -> Action {
    let ctx = &scope.ctx;
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

async fn reconcile_endpoint(endpoint: &MessagingEndpoint, scope: &Scope) -> Result<Action, Error> {
    let ctx = &scope.ctx;
    if endpoint.meta().deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove what we made.
        return Ok(Action::await_change());
    }
    let namespace = endpoint.namespace().ok_or(Error::MissingNamespace)?;
    let name = endpoint.name_any();
    tracing::debug!(%namespace, %name, "reconciling");

    // 1. Validate.
    if let Err(invalid) = validate(&name, &endpoint.spec) {
        let message = invalid.to_string();
        let status = desired_status(endpoint, &Observation::InvalidSpec(message), None, now());
        update_status(endpoint, status, ctx).await?;
        return Ok(Action::await_change());
    }

    // 2. Credentials: the user's Secret, or ours (generated once). No Secret
    // is watched (that would take the right to read every Secret of the
    // cluster): each reconcile reads the one Secret the endpoint uses.
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let key = ObjectRef::<Guarded>::new(&name).within(&namespace);
    let uid = endpoint.uid().unwrap_or_default();
    let wanted_secret = endpoint
        .spec
        .credentials_secret_ref
        .as_ref()
        .map(|r| r.name.clone())
        .unwrap_or_else(|| build::secret_name(&name));
    let checked_lately =
        ctx.secret_checked
            .lock()
            .unwrap()
            .get(&uid)
            .is_some_and(|(generation, secret, at)| {
                *generation == endpoint.metadata.generation
                    && *secret == wanted_secret
                    && at.elapsed() < SECRET_CHECK_TTL
            });
    let secret_name = match &endpoint.spec.credentials_secret_ref {
        _ if checked_lately => wanted_secret,
        Some(reference) => {
            let found = match secrets.get_opt(&reference.name).await {
                Ok(found) => found,
                Err(e) => {
                    return Err(report_failure(endpoint, ctx, kube_err("get_secret")(e)).await);
                }
            };
            let problem = match found.as_ref().map(Credentials::from_secret) {
                Some(Ok(_)) => None,
                Some(Err(MissingKeys(keys))) => Some((
                    "MissingSecretKey",
                    format!("Secret {} lacks {}", reference.name, keys.join(", ")),
                )),
                None => Some((
                    "SecretNotFound",
                    format!(
                        "Secret {} not found in namespace {namespace}",
                        reference.name
                    ),
                )),
            };
            if let Some((reason, message)) = problem {
                let observation = Observation::CredentialsUnusable { reason, message };
                let status =
                    desired_status(endpoint, &observation, Some(reference.name.clone()), now());
                update_status(endpoint, status, ctx).await?;
                return Ok(Action::requeue(secret_recheck_delay(ctx, key)));
            }
            reference.name.clone()
        }
        None => {
            let secret_name = build::secret_name(&name);
            let existing = match secrets.get_opt(&secret_name).await {
                Ok(existing) => existing,
                Err(e) => {
                    return Err(report_failure(endpoint, ctx, kube_err("get_secret")(e)).await);
                }
            };
            let credentials = generated_credentials(existing.as_ref());
            let secret = build::build_secret(endpoint, &credentials);
            let cached = existing.as_ref().map(|s| &s.metadata);
            let written =
                match ensure(ctx, &secrets, "Secret", cached, secret, "apply_secret").await {
                    Ok(written) => written,
                    Err(e) => return Err(report_failure(endpoint, ctx, e).await),
                };
            if existing.is_none() && written.is_some() {
                publish(
                    ctx,
                    endpoint,
                    EventType::Normal,
                    "CredentialsGenerated",
                    format!("generated tokens and signing secrets in Secret {secret_name}"),
                )
                .await;
            }
            secret_name
        }
    };
    if !checked_lately {
        let problem = match referenced_secret_problem(endpoint, &secrets).await {
            Ok(problem) => problem,
            Err(e) => return Err(report_failure(endpoint, ctx, e).await),
        };
        if let Some((reason, message)) = problem {
            let observation = Observation::CredentialsUnusable { reason, message };
            let status = desired_status(endpoint, &observation, Some(secret_name), now());
            update_status(endpoint, status, ctx).await?;
            return Ok(Action::requeue(secret_recheck_delay(ctx, key)));
        }
    }
    ctx.secret_waits.lock().unwrap().remove(&key);
    if !checked_lately {
        let mut checked = ctx.secret_checked.lock().unwrap();
        if checked.len() > MEMO_LIMIT {
            checked.clear();
        }
        checked.insert(
            uid,
            (
                endpoint.metadata.generation,
                secret_name.clone(),
                Instant::now(),
            ),
        );
    }

    // 3. Build and apply the relay.
    let result = apply_relay(endpoint, &namespace, &secret_name, scope).await;
    let observation = match &result {
        Ok(deployment) => Observation::Applied(Box::new(deployment.clone())),
        Err(e) => Observation::ApplyFailed(e.condition_message()),
    };

    // 4. Status.
    let status = desired_status(endpoint, &observation, Some(secret_name), now());
    update_status(endpoint, status, ctx).await?;
    result?;
    // A user's Secret is not watched: look at it again now and then, so that
    // a key removed from it shows in the status.
    let resync = if endpoint.spec.credentials_secret_ref.is_some() {
        60
    } else {
        300
    };
    Ok(Action::requeue(Duration::from_secs(resync)))
}

/// What is wrong with the Secrets the spec names besides the credentials (the
/// NATS credentials file and CA, secret header values, client certificates),
/// if anything: a missing Secret or key would leave the relay pods unable to
/// start, so it is said in the status instead. Each Secret is read once.
async fn referenced_secret_problem(
    endpoint: &MessagingEndpoint,
    secrets: &Api<Secret>,
) -> Result<Option<(&'static str, String)>, Error> {
    let mut read: BTreeMap<String, Option<Secret>> = BTreeMap::new();
    for reference in build::referenced_secret_keys(&endpoint.spec) {
        if !read.contains_key(&reference.secret) {
            let found = secrets
                .get_opt(&reference.secret)
                .await
                .map_err(kube_err("get_secret"))?;
            read.insert(reference.secret.clone(), found);
        }
        let found = &read[&reference.secret];
        let has_key = found.as_ref().is_some_and(|s| {
            s.data
                .as_ref()
                .and_then(|d| d.get(&reference.key))
                .is_some_and(|v| !v.0.is_empty())
        });
        let too_long = reference.field.contains(".headers[")
            && found.as_ref().is_some_and(|s| {
                s.data
                    .as_ref()
                    .and_then(|d| d.get(&reference.key))
                    .is_some_and(|v| String::from_utf8_lossy(&v.0).trim().len() > MAX_HEADER_VALUE)
            });
        if too_long {
            return Ok(Some((
                "InvalidSecretValue",
                format!(
                    "Secret {} ({}): the value of {} is over {MAX_HEADER_VALUE} bytes, too long for a header",
                    reference.secret, reference.field, reference.key
                ),
            )));
        }
        match (found, has_key) {
            (None, _) => {
                return Ok(Some((
                    "SecretNotFound",
                    format!(
                        "Secret {} ({}) not found in namespace {}",
                        reference.secret,
                        reference.field,
                        endpoint.namespace().unwrap_or_default()
                    ),
                )));
            }
            (Some(_), false) => {
                return Ok(Some((
                    "MissingSecretKey",
                    format!(
                        "Secret {} ({}) lacks {}",
                        reference.secret, reference.field, reference.key
                    ),
                )));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Says in the endpoint's status that a step failed (a refusal by RBAC
/// included, in the API server's words), then hands the error on for the
/// retry with backoff.
async fn report_failure(endpoint: &MessagingEndpoint, ctx: &Context, error: Error) -> Error {
    let observation = Observation::ApplyFailed(error.condition_message());
    let secret = endpoint
        .spec
        .credentials_secret_ref
        .as_ref()
        .map(|r| r.name.clone())
        .unwrap_or_else(|| build::secret_name(&endpoint.name_any()));
    let status = desired_status(endpoint, &observation, Some(secret), now());
    if let Err(e) = update_status(endpoint, status, ctx).await {
        tracing::warn!(name = %endpoint.name_any(), error = %e, "could not report a failure in status");
    }
    error
}

/// When to look again for an endpoint's missing or incomplete Secret: 5 s,
/// 10 s, 20 s, … then every minute.
fn secret_recheck_delay(ctx: &Context, key: ObjectRef<Guarded>) -> Duration {
    let mut waits = ctx.secret_waits.lock().unwrap();
    if waits.len() > MEMO_LIMIT {
        waits.clear();
    }
    let n = waits.entry(key).or_insert(0);
    *n = n.saturating_add(1);
    Duration::from_secs((5u64 << (*n - 1).min(4)).min(60))
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
    scope: &Scope,
) -> Result<Deployment, Error> {
    let ctx = &scope.ctx;
    let name = endpoint.name_any();
    fn cached_meta<K: Resource<DynamicType = ()> + Clone>(
        store: &Store<PartialObjectMeta<K>>,
        name: &str,
        namespace: &str,
    ) -> Option<ObjectMeta> {
        store
            .get(&ObjectRef::new(name).within(namespace))
            .map(|o| o.metadata.clone())
    }
    if let Some(pdb) = build::build_pdb(endpoint) {
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), namespace);
        let cached = cached_meta(&scope.owned.pdbs, &build::pdb_name(&name), namespace);
        ensure(
            ctx,
            &pdbs,
            "PodDisruptionBudget",
            cached.as_ref(),
            pdb,
            "apply_pdb",
        )
        .await?;
    }
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
    let cached = cached_meta(
        &scope.owned.services,
        &build::service_name(&name),
        namespace,
    );
    let service = build::build_service(endpoint);
    ensure(
        ctx,
        &services,
        "Service",
        cached.as_ref(),
        service,
        "apply_service",
    )
    .await?;

    let deployment = apply_deployment(endpoint, namespace, secret_name, scope).await?;

    // The claim last: a real API server refuses most changes to a claim's
    // spec (a smaller size, another class), and such a refusal must not hold
    // back the relay's other changes. Its pods wait for it when it is new.
    if let Some(pvc) = build::build_pvc(endpoint) {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
        let cached = cached_meta(&scope.owned.pvcs, &build::pvc_name(&name), namespace);
        ensure(
            ctx,
            &pvcs,
            "PersistentVolumeClaim",
            cached.as_ref(),
            pvc,
            "apply_pvc",
        )
        .await?;
    }
    Ok(deployment)
}

/// Applies the relay Deployment unless it is as we would write it; returns
/// it with the newest status known.
async fn apply_deployment(
    endpoint: &MessagingEndpoint,
    namespace: &str,
    secret_name: &str,
    scope: &Scope,
) -> Result<Deployment, Error> {
    let ctx = &scope.ctx;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let deployment = build::build_deployment(endpoint, &ctx.settings, secret_name);
    let key = owned_key("Deployment", &deployment);
    let hash = applied::digest(&deployment);
    // Its status makes the endpoint's: without an apply, the object we read
    // it from must be the one we would write, from the cache or, while the
    // cache has not caught up with our last write, as that write returned it.
    let stamped =
        |d: &Arc<Deployment>| d.annotations().get(applied::APPLIED_HASH_ANNOTATION) == Some(&hash);
    let object_key = (key.1.clone(), key.2.clone());
    let cached = scope
        .owned
        .deployments
        .get(&ObjectRef::new(&key.2).within(namespace))
        .filter(stamped);
    let current = {
        let mut memo = ctx.written_deployments.lock().unwrap();
        let written = memo.get(&object_key).filter(|d| stamped(d)).cloned();
        match (cached, written) {
            (Some(c), Some(w)) if newer(&w, &c) => Some(w),
            // The cache has caught up: the memo has served its turn.
            (Some(c), _) => {
                memo.remove(&object_key);
                Some(c)
            }
            (None, w) => w,
        }
    };
    match current {
        Some(current) if unchanged(ctx, &key, Some(&current.metadata), &hash) => {
            Ok((*current).clone())
        }
        _ => {
            let written =
                write(ctx, &deployments, key, hash, deployment, "apply_deployment").await?;
            let mut memo = ctx.written_deployments.lock().unwrap();
            if memo.len() > MEMO_LIMIT {
                memo.clear();
            }
            memo.insert(object_key, Arc::new(written.clone()));
            Ok(written)
        }
    }
}

/// Whether `a` is a later version than `b` of the same object.
fn newer(a: &Deployment, b: &Deployment) -> bool {
    resource_version(&a.metadata) > resource_version(&b.metadata)
}

/// An object's resourceVersion as a number: etcd's revision, which real
/// servers (and ours) number in order, so later versions compare greater.
fn resource_version(meta: &ObjectMeta) -> Option<u64> {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
}

fn owned_key<K: Resource>(kind: &'static str, object: &K) -> ObjectKey {
    (
        kind,
        object.namespace().unwrap_or_default(),
        object.name_any(),
    )
}

/// Applies `object` unless what it would write is already there (see
/// `applied.rs`); returns the object as written, or None when unchanged.
async fn ensure<K>(
    ctx: &Context,
    api: &Api<K>,
    kind: &'static str,
    cached: Option<&ObjectMeta>,
    object: K,
    action: &'static str,
) -> Result<Option<K>, Error>
where
    K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
    K::DynamicType: Default,
{
    let key = owned_key(kind, &object);
    let hash = applied::digest(&object);
    if unchanged(ctx, &key, cached, &hash) {
        return Ok(None);
    }
    write(ctx, api, key, hash, object, action).await.map(Some)
}

/// Whether the object needs no apply (and counts it so).
fn unchanged(ctx: &Context, key: &ObjectKey, cached: Option<&ObjectMeta>, hash: &str) -> bool {
    let up_to_date = applied::up_to_date(ctx.applied.get(key).as_ref(), cached, hash);
    if up_to_date {
        ctx.metrics
            .owned_objects
            .with_label_values(&[key.0, "unchanged"])
            .inc();
    }
    up_to_date
}

/// Server-side applies `object`, stamped with `hash`, and records the write.
async fn write<K>(
    ctx: &Context,
    api: &Api<K>,
    key: ObjectKey,
    hash: String,
    mut object: K,
    action: &'static str,
) -> Result<K, Error>
where
    K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
    K::DynamicType: Default,
{
    applied::stamp(object.meta_mut(), &hash);
    // Apply needs apiVersion and kind in the body; k8s-openapi adds them when serializing.
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let written = api
        .patch(&key.2, &params, &Patch::Apply(&object))
        .await
        .map_err(kube_err(action))?;
    ctx.metrics
        .owned_objects
        .with_label_values(&[key.0, "applied"])
        .inc();
    ctx.applied.insert(
        key,
        Record {
            hash,
            generation: written.meta().generation,
        },
    );
    Ok(written)
}

/// Writes status when (and only when) it differs from what the object has, and
/// records an Event when readiness flips.
async fn update_status(
    endpoint: &MessagingEndpoint,
    status: MessagingEndpointStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let mut status = status;
    if ctx.targets.settings.enabled() {
        let namespace = endpoint.namespace().unwrap_or_default();
        let found = ctx.targets.found(&namespace, &endpoint.name_any());
        let verdicts = targets::verdicts(found.as_ref(), &targets::Checked::of(&endpoint.spec));
        status::add_reachability(endpoint, &mut status, verdicts, now());
    }
    if endpoint.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let uid = endpoint.uid().unwrap_or_default();
    // The cache may not show our last write yet: what we wrote then is the
    // status now (only a new transition time would differ). Once it shows
    // that version or a later one (a status someone else changed), the cache
    // is what the status is.
    let cached_version = resource_version(endpoint.meta());
    if ctx
        .written_status
        .lock()
        .unwrap()
        .get(&uid)
        .is_some_and(|(written, version)| {
            cached_version.is_none_or(|cached| cached < *version)
                && status::same_but_times(written, &status)
        })
    {
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
    let updated = api
        .patch_status(
            &endpoint.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(kube_err("patch_status"))?;
    if let Some(version) = resource_version(updated.meta()) {
        let mut written = ctx.written_status.lock().unwrap();
        if written.len() > MEMO_LIMIT {
            written.clear();
        }
        written.insert(uid.clone(), (status.clone(), version));
    }

    if let Some(after) = after {
        let now = (after.status.clone(), after.reason.clone());
        let cached_differs = before
            .as_ref()
            .is_none_or(|b| (&b.status, &b.reason) != (&now.0, &now.1));
        let newly_announced = {
            let mut announced = ctx.announced.lock().unwrap();
            if announced.len() > MEMO_LIMIT {
                announced.clear();
            }
            announced.insert(uid, now.clone()) != Some(now)
        };
        // Pods not ready yet is news only when they were ready before: a new
        // or changed endpoint goes through it on every rollout.
        let worth_an_event = after.reason != "RelayNotReady"
            || before.as_ref().is_some_and(|b| b.reason == "RelayReady");
        if cached_differs && newly_announced && worth_an_event {
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
    config: kube::runtime::controller::Config,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> (Store<Guarded>, impl Future<Output = ()>) {
    // Only our own objects (by label); Secrets are not watched at all.
    let owned_config = watcher::Config::default().labels(MANAGED_BY_SELECTOR);
    let (deployments, deployments_writer) = reflector::store();
    let (services, services_writer) = reflector::store();
    let (pvcs, pvcs_writer) = reflector::store();
    let (pdbs, pdbs_writer) = reflector::store();
    let deployment_events = owned_stream::<Deployment>(
        watcher(
            scoped_api(&client, namespace.as_ref()),
            owned_config.clone(),
        ),
        deployments_writer,
        deployments.clone(),
        "Deployment",
        ctx.clone(),
    );
    // An Api of PartialObjectMeta makes metadata-only list and watch requests.
    let service_events = owned_stream::<PartialObjectMeta<Service>>(
        watcher(
            scoped_api(&client, namespace.as_ref()),
            owned_config.clone(),
        ),
        services_writer,
        services.clone(),
        "Service",
        ctx.clone(),
    );
    let pvc_events = owned_stream::<PartialObjectMeta<PersistentVolumeClaim>>(
        watcher(
            scoped_api(&client, namespace.as_ref()),
            owned_config.clone(),
        ),
        pvcs_writer,
        pvcs.clone(),
        "PersistentVolumeClaim",
        ctx.clone(),
    );
    let pdb_events = owned_stream::<PartialObjectMeta<PodDisruptionBudget>>(
        watcher(scoped_api(&client, namespace.as_ref()), owned_config),
        pdbs_writer,
        pdbs.clone(),
        "PodDisruptionBudget",
        ctx.clone(),
    );
    let controller = Controller::new(endpoints, watcher::Config::default());
    let store = controller.store();
    let scope = Arc::new(Scope {
        ctx,
        owned: OwnedCache {
            deployments,
            services,
            pvcs,
            pdbs,
        },
    });
    // The relays' view of their targets: an endpoint whose verdicts changed
    // is reconciled, to write the conditions.
    let (changed, targets_changed) = tokio::sync::mpsc::channel(256);
    let poller = targets::poll(
        store.clone(),
        scope.ctx.targets.clone(),
        scope.ctx.metrics.clone(),
        changed,
    );
    let controller = controller
        .reconcile_on(futures::stream::unfold(
            targets_changed,
            |mut rx| async move { rx.recv().await.map(|key| (key, rx)) },
        ))
        .owns_stream(deployment_events)
        .owns_stream(service_events)
        .owns_stream(pvc_events)
        .owns_stream(pdb_events)
        .with_config(config)
        .graceful_shutdown_on(shutdown);
    let run = controller
        .run(reconcile, error_policy, scope)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(name = %object.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "controller event"),
            }
        });
    // The poller lives as long as the controller (it ends at the shutdown).
    let run = async move {
        tokio::pin!(poller);
        let poller = async {
            (&mut poller).await;
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = run => {}
            _ = poller => {}
        }
    };
    (store, run)
}

/// An Api over one namespace, or all.
fn scoped_api<K>(client: &Client, namespace: Option<&String>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The watch of one kind of owned object, cached in `writer`: deletions (and
/// objects a re-list no longer shows) are forgotten from the records of our
/// applies, so that a deleted object is made again.
fn owned_stream<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    writer: reflector::store::Writer<K>,
    reader: Store<K>,
    kind: &'static str,
    ctx: Arc<Context>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    events
        .default_backoff()
        .reflect(writer)
        .inspect(move |event| match event {
            Ok(watcher::Event::Delete(object)) => {
                let (ns, name) = (object.namespace().unwrap_or_default(), object.name_any());
                ctx.written_deployments
                    .lock()
                    .unwrap()
                    .remove(&(ns.clone(), name.clone()));
                ctx.applied.forget(&(kind, ns, name));
            }
            Ok(watcher::Event::InitDone) => {
                let present =
                    |ns: &str, name: &str| reader.get(&ObjectRef::new(name).within(ns)).is_some();
                if kind == "Deployment" {
                    ctx.written_deployments
                        .lock()
                        .unwrap()
                        .retain(|(ns, name), _| present(ns, name));
                }
                ctx.applied.retain(kind, present);
            }
            _ => {}
        })
        .touched_objects()
        // This stream backs off on its own errors (a 410 Gone makes it list
        // again); passed on, each error would also pause every other watch
        // feeding the controller, so they stop here.
        .filter_map(move |result| async move {
            match result {
                Ok(object) => Some(Ok(object)),
                Err(e) => {
                    tracing::debug!(kind, error = %e, "watch of owned objects: retrying");
                    None
                }
            }
        })
}

/// What the controllers' caches say of the endpoints, for the gauges.
#[derive(Debug, Default, PartialEq)]
pub struct EndpointCounts {
    pub ready: usize,
    pub not_ready: usize,
    /// Per endpoint that decodes: (namespace, name, pods asked for, pods ready).
    pub pods: Vec<(String, String, i32, i32)>,
}

/// Counts ready and not-ready endpoints, and their relay pods, in the controllers' caches.
pub fn count_endpoints(stores: &[Store<Guarded>]) -> EndpointCounts {
    let mut counts = EndpointCounts::default();
    for store in stores {
        for object in store.state() {
            match &object.0 {
                Ok(endpoint) => {
                    if status::is_ready(endpoint) {
                        counts.ready += 1;
                    } else {
                        counts.not_ready += 1;
                    }
                    let ready_pods = endpoint.status.as_ref().map_or(0, |s| s.ready_replicas);
                    counts.pods.push((
                        endpoint.namespace().unwrap_or_default(),
                        endpoint.name_any(),
                        endpoint.spec.replicas,
                        ready_pods,
                    ));
                }
                Err(_) => counts.not_ready += 1,
            }
        }
    }
    counts
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
