//! A small, stateful Kubernetes API server over plain HTTP, for running the
//! real `botrelay-operator` binary in tests (no real API server can be
//! installed on our CI machines).
//!
//! What it does:
//! - stores any resource under `/api/v1/...` and `/apis/{group}/{version}/...`,
//!   namespaced or cluster-wide; kinds and plurals are taken from the request;
//! - `get`, `list` (equality label selectors, `metadata.name`/`metadata.namespace`
//!   field selectors), `watch` (chunked JSON lines, replayed from any
//!   `resourceVersion` because the whole history is kept), `create`
//!   (`generateName` too), `update` (optimistic concurrency on
//!   `resourceVersion`), `patch` and `delete`;
//! - one global `resourceVersion` counter; `metadata.generation` starts at 1
//!   and is bumped when anything outside `metadata` and `status` changes; a
//!   write that changes nothing is not stored again (no new resourceVersion, no
//!   watch event), as on a real server;
//! - patches: server-side apply (`application/apply-patch+yaml`, JSON bodies
//!   only — kube sends JSON), JSON merge patch, and strategic merge patch
//!   treated as a JSON merge patch (no patch directives);
//! - server-side apply tracks, per field manager, the leaf fields it applied:
//!   fields a manager applied before and omits now are removed; without
//!   `force=true` a changed value of a field another manager owns is a 409
//!   Conflict. Lists are atomic (no list-map merging);
//! - `status` is a subresource for messagingendpoints, deployments, services
//!   and persistentvolumeclaims: writes to the main resource keep the stored
//!   status, writes to `/status` change only the status;
//! - deleting an object deletes every object whose `ownerReferences` names its
//!   uid, and an object created with owners that all no longer exist is
//!   deleted right away (like the garbage collector, but synchronously);
//! - optionally plays the Deployment controller: every Deployment write is
//!   followed by a status saying all replicas are up to date and ready;
//! - can fail chosen calls on purpose (`inject_failure`);
//! - answers metadata-only lists and watches (`Accept: ...;as=PartialObjectMetadata`);
//! - records every distinct (verb, API group, resource[/subresource]) called,
//!   as kube-apiserver's authorizer names it (`authz.rs`): a server-side apply
//!   that creates an object is a `patch` and a `create`; with a [`Policy`]
//!   (the rules of Roles and ClusterRoles) it refuses what RBAC would refuse,
//!   with a 403 worded as the real server words it. The policy's user is the
//!   one with the kubeconfig's bearer token; a request without a token is the
//!   test's own (a cluster admin's): neither checked nor recorded;
//! - counts requests per call and per object, and can charge each request a
//!   cost in time, served one at a time, so that a benchmark of many writes
//!   means something ([`TestApiServer::set_request_costs`]);
//! - `resourceVersion` preconditions: an update or patch naming a stale
//!   `metadata.resourceVersion` is a 409 Conflict;
//! - history compaction: after [`TestApiServer::compact`], a watch or a list
//!   continuation from an older resourceVersion gets `410 Gone` (`Expired`),
//!   and [`TestApiServer::close_watches`] ends every open watch, so clients
//!   must re-list as they must on a real server;
//! - paginated lists (`limit` and `continue`), every page read at the
//!   resourceVersion of the first one;
//! - with a CRD installed ([`TestApiServer::install_crd`]), its structural
//!   schema prunes unknown fields and fills `default` values on every write,
//!   and its status subresource is honoured (`schema.rs`).
//!
//! Limits (what a real server does and this one does not): no
//! authentication (one user, every request is theirs), no admission, no
//! schema validation (patterns, enums, bounds, CEL: a malformed object can be
//! stored and served on purpose), no validation of built-in kinds, no
//! discovery endpoints, no bookmarks, no protobuf, no finalizers, no
//! `deletecollection`, no JSON patch, no YAML bodies, no list-map merging in
//! server-side apply (lists are atomic), no defaulting of built-in kinds
//! (a Deployment is served back as it was applied), no `resourceNames` in
//! RBAC rules, HTTP/1.1 only.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

mod authz;
mod schema;
pub use authz::{Policy, Rule};

/// One distinct API call, as RBAC names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Call {
    pub verb: String,
    /// API group; `""` for the core group.
    pub group: String,
    /// Resource, with `/subresource` when one was addressed.
    pub resource: String,
}

impl Call {
    pub fn new(verb: &str, group: &str, resource: &str) -> Self {
        Call {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
        }
    }
}

/// Identifies a stored object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub group: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(group: &str, resource: &str, namespace: &str, name: &str) -> Self {
        Key {
            group: group.into(),
            resource: resource.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

#[derive(Debug, Clone)]
struct WatchEvent {
    rv: u64,
    key: Key,
    type_: &'static str,
    object: Arc<Value>,
    /// The object before a MODIFIED change: a watch with a selector sees the
    /// object leave (DELETED) or enter (ADDED) it.
    previous: Option<Arc<Value>>,
}

#[derive(Default)]
struct Entry {
    object: Arc<Value>,
    /// Field manager (with `/status` for status applies) → leaf paths it owns.
    owners: BTreeMap<String, BTreeSet<Vec<String>>>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Entry>,
    history: Vec<WatchEvent>,
    calls: BTreeSet<Call>,
    /// The same calls with the namespace they addressed (None: all namespaces / cluster scope).
    scoped_calls: BTreeSet<(Call, Option<String>)>,
    /// Calls made with a metadata-only `Accept` header.
    metadata_calls: BTreeSet<Call>,
    /// uids of stored objects, for the garbage collector's owner lookups.
    uids: std::collections::HashSet<String>,
    /// Requests served, per call.
    call_counts: BTreeMap<Call, u64>,
    /// Requests that named one object, per (request kind, object): `get`,
    /// `create`, `update`, `apply`, `merge-patch`, `delete`.
    object_requests: BTreeMap<(String, Key), u64>,
    /// History at or below this resourceVersion is gone: watching or
    /// continuing a list from there is `410 Gone`.
    compacted: u64,
    /// Watches and list continuations refused with 410.
    expired: u64,
    /// Requests refused by the policy.
    forbidden: u64,
    /// Installed CRDs' schemas, by (group, plural).
    schemas: BTreeMap<(String, String), Value>,
    /// Resources whose `status` is a subresource.
    status_subresources: BTreeSet<String>,
}

/// An injected failure: the next `times` calls matching (verb, group, resource) fail with `code`.
struct Fault {
    call: Call,
    code: u16,
    times: u32,
    served: u32,
}

/// What each request costs, in time, served one at a time.
#[derive(Default, Clone, Copy)]
struct Costs {
    write: Duration,
    read: Duration,
}

struct Shared {
    store: Mutex<Store>,
    faults: Mutex<Vec<Fault>>,
    events: broadcast::Sender<WatchEvent>,
    simulate_deployments: AtomicBool,
    /// How long the simulated Deployment controller takes to report a rollout ready.
    deployment_ready_delay: Mutex<Duration>,
    policy: Mutex<Option<Policy>>,
    costs: Mutex<Costs>,
    /// When the requests charged so far will have been served.
    free_at: Mutex<tokio::time::Instant>,
    /// Bumped to end every open watch.
    close_watches: tokio::sync::watch::Sender<u64>,
}

/// A running test API server; it stops when dropped.
pub struct TestApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Error of a direct (in-process) call, mirroring the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

fn err(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        code,
        reason,
        message: message.into(),
    }
}

/// Built-in resources whose `status` is a subresource (a CRD adds its own).
const STATUS_SUBRESOURCE: [&str; 4] = [
    "messagingendpoints",
    "deployments",
    "services",
    "persistentvolumeclaims",
];

impl Store {
    /// Whether objects of a resource carry `metadata.generation`: custom
    /// resources and the built-in kinds whose registries set it (workloads,
    /// disruption budgets, jobs, ingresses); not Services, Secrets, PVCs or
    /// ConfigMaps, whose spec changes leave no count.
    fn has_generation(&self, group: &str, resource: &str) -> bool {
        matches!(group, "apps" | "batch" | "policy" | "networking.k8s.io")
            || self
                .schemas
                .contains_key(&(group.to_string(), resource.to_string()))
            || resource == "messagingendpoints"
    }

    fn has_status_subresource(&self, resource: &str) -> bool {
        STATUS_SUBRESOURCE.contains(&resource) || self.status_subresources.contains(resource)
    }
}

impl TestApiServer {
    /// Starts on an ephemeral loopback port.
    pub async fn start() -> Self {
        Self::start_on_port(0).await.expect("bind loopback")
    }

    /// Starts on `127.0.0.1:port`; port 0 lets the kernel pick a free one
    /// (`url()` then says which).
    pub async fn start_on_port(port: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let (events, _) = broadcast::channel(1 << 16);
        let shared = Arc::new(Shared {
            store: Mutex::default(),
            faults: Mutex::default(),
            events,
            simulate_deployments: AtomicBool::new(true),
            deployment_ready_delay: Mutex::new(Duration::ZERO),
            policy: Mutex::default(),
            costs: Mutex::default(),
            free_at: Mutex::new(tokio::time::Instant::now()),
            close_watches: tokio::sync::watch::channel(0).0,
        });
        let server_shared = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = server_shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(TestApiServer { addr, shared, task })
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig that points at this server, with `namespace` as the default.
    pub fn write_kubeconfig(&self, path: &Path, namespace: &str) -> std::io::Result<()> {
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n\
             users:\n- name: test\n  user:\n    token: test-token\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n    namespace: {namespace}\n\
             current-context: test\n",
            url = self.url()
        );
        std::fs::write(path, config)
    }

    /// When on (the default), every Deployment write is followed by a status
    /// reporting all replicas updated, ready and available.
    pub fn simulate_deployments(&self, on: bool) {
        self.shared
            .simulate_deployments
            .store(on, Ordering::Relaxed);
    }

    /// With a delay, a Deployment write is first answered by a status saying
    /// the new pods are not ready yet, and the delay later by one saying they
    /// are (as the Deployment controller and kubelet would, in several writes).
    /// Zero (the default): ready at once.
    pub fn set_deployment_ready_delay(&self, delay: Duration) {
        *self.shared.deployment_ready_delay.lock().unwrap() = delay;
    }

    /// Makes the next `times` HTTP calls of (verb, group, resource) fail with
    /// `code` (a Status body with reason `InternalError` or `ServiceUnavailable`).
    pub fn inject_failure(&self, verb: &str, group: &str, resource: &str, code: u16, times: u32) {
        self.shared.faults.lock().unwrap().push(Fault {
            call: Call::new(verb, group, resource),
            code,
            times,
            served: 0,
        });
    }

    /// Makes every HTTP call of (verb, group, resource) fail with `code` until
    /// [`clear_failures`](Self::clear_failures).
    pub fn fail_until_cleared(&self, verb: &str, group: &str, resource: &str, code: u16) {
        self.inject_failure(verb, group, resource, code, u32::MAX);
    }

    /// Ends every injected failure; returns how many failures were served.
    pub fn clear_failures(&self) -> u32 {
        let mut faults = self.shared.faults.lock().unwrap();
        let served = faults.iter().map(|f| f.served).sum();
        faults.clear();
        served
    }

    /// Enforces RBAC: from now on a call the policy does not allow is refused
    /// with 403 Forbidden, as kube-apiserver refuses it.
    pub fn enforce(&self, policy: Policy) {
        *self.shared.policy.lock().unwrap() = Some(policy);
    }

    /// Requests refused by the policy so far.
    pub fn forbidden_count(&self) -> u64 {
        self.shared.store.lock().unwrap().forbidden
    }

    /// Charges every later request a cost, served one request at a time (as
    /// an API server and etcd sharing a small machine would): `write` for
    /// creates, updates, patches and deletes, `read` for gets and lists.
    /// Watches are free. Zero for both (the default) turns it off.
    pub fn set_request_costs(&self, write: Duration, read: Duration) {
        *self.shared.costs.lock().unwrap() = Costs { write, read };
    }

    /// Requests served per call (verb, group, resource) so far.
    pub fn call_count(&self, verb: &str, group: &str, resource: &str) -> u64 {
        let store = self.shared.store.lock().unwrap();
        store
            .call_counts
            .get(&Call::new(verb, group, resource))
            .copied()
            .unwrap_or(0)
    }

    /// Requests that named one object, per (kind, object): kind is `get`,
    /// `create`, `update`, `apply`, `merge-patch` or `delete`.
    pub fn object_requests(&self) -> BTreeMap<(String, Key), u64> {
        self.shared.store.lock().unwrap().object_requests.clone()
    }

    /// Forgets the history so far, as etcd's compaction does: a watch or a
    /// list continuation from an older resourceVersion gets `410 Gone`.
    pub fn compact(&self) {
        let mut store = self.shared.store.lock().unwrap();
        store.compacted = store.rv;
    }

    /// Ends every open watch (as a timeout or a restart of the API server does).
    pub fn close_watches(&self) {
        self.shared.close_watches.send_modify(|n| *n += 1);
    }

    /// Watches and list continuations refused with 410 Gone so far.
    pub fn expired_count(&self) -> u64 {
        self.shared.store.lock().unwrap().expired
    }

    /// Installs a CustomResourceDefinition: writes to its resource are pruned
    /// and defaulted by the storage version's structural schema, and its
    /// status subresource is honoured.
    pub fn install_crd(&self, crd: &Value) -> Result<(), String> {
        let group = crd["spec"]["group"]
            .as_str()
            .ok_or("CRD without spec.group")?;
        let plural = crd["spec"]["names"]["plural"]
            .as_str()
            .ok_or("CRD without spec.names.plural")?;
        let version = crd["spec"]["versions"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["storage"] == true))
            .ok_or("CRD without a storage version")?;
        let schema = version["schema"]["openAPIV3Schema"].clone();
        if !schema.is_object() {
            return Err("CRD storage version without openAPIV3Schema".into());
        }
        let mut store = self.shared.store.lock().unwrap();
        store
            .schemas
            .insert((group.to_string(), plural.to_string()), schema);
        if version["subresources"]["status"].is_object() {
            store.status_subresources.insert(plural.to_string());
        }
        Ok(())
    }

    /// Every distinct (verb, group, resource) called over HTTP so far.
    pub fn calls(&self) -> BTreeSet<Call> {
        self.shared.store.lock().unwrap().calls.clone()
    }

    /// The calls that asked for metadata only (`PartialObjectMetadata`).
    pub fn metadata_only_calls(&self) -> BTreeSet<Call> {
        self.shared.store.lock().unwrap().metadata_calls.clone()
    }

    /// Every distinct call with the namespace it addressed (`None` = all namespaces).
    pub fn scoped_calls(&self) -> BTreeSet<(Call, Option<String>)> {
        self.shared.store.lock().unwrap().scoped_calls.clone()
    }

    /// The current resourceVersion: it grows with every stored change.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().rv
    }

    /// Stored changes (watch events) so far, per `group/resource` (`resource` for core).
    pub fn changes_by_resource(&self) -> BTreeMap<String, usize> {
        let store = self.shared.store.lock().unwrap();
        let mut counts = BTreeMap::new();
        for e in &store.history {
            let name = if e.key.group.is_empty() {
                e.key.resource.clone()
            } else {
                format!("{}/{}", e.key.group, e.key.resource)
            };
            *counts.entry(format!("{name} {}", e.type_)).or_insert(0) += 1;
        }
        counts
    }

    /// The resourceVersion of the latest change to an object `filter` accepts
    /// (e.g. everything but Leases, which their holder renews).
    pub fn last_change(&self, filter: impl Fn(&Key) -> bool) -> u64 {
        let store = self.shared.store.lock().unwrap();
        store
            .history
            .iter()
            .rev()
            .find(|e| filter(&e.key))
            .map(|e| e.rv)
            .unwrap_or(0)
    }

    pub fn get(&self, key: &Key) -> Option<Value> {
        let store = self.shared.store.lock().unwrap();
        store.objects.get(key).map(|e| (*e.object).clone())
    }

    /// Objects of one resource, in one namespace or all.
    pub fn list(&self, group: &str, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        let store = self.shared.store.lock().unwrap();
        store
            .objects
            .iter()
            .filter(|(k, _)| {
                k.group == group
                    && k.resource == resource
                    && namespace.is_none_or(|ns| k.namespace == ns)
            })
            .map(|(_, e)| (*e.object).clone())
            .collect()
    }

    /// Stores a new object as is (no validation: malformed objects welcome).
    pub fn create(&self, group: &str, resource: &str, object: Value) -> Result<Value, ApiError> {
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let mut store = self.shared.store.lock().unwrap();
        create(
            &self.shared,
            &mut store,
            group,
            resource,
            &namespace,
            object,
        )
    }

    /// Applies a JSON merge patch to an object (or to its status with `status = true`).
    pub fn merge_patch(&self, key: &Key, patch: Value, status: bool) -> Result<Value, ApiError> {
        let mut store = self.shared.store.lock().unwrap();
        let sub = if status { Some("status") } else { None };
        patch_object(
            &self.shared,
            &mut store,
            key,
            sub,
            "merge",
            &patch,
            "test",
            false,
        )
    }

    /// Deletes an object and, like the garbage collector, everything it owns.
    pub fn delete(&self, key: &Key) -> Result<Value, ApiError> {
        let mut store = self.shared.store.lock().unwrap();
        delete(&self.shared, &mut store, key)
    }
}

// ---------------------------------------------------------------- storage

fn now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Everything but metadata and status: what `generation` tracks.
fn desired_part(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(map) = o.as_object_mut() {
        for k in ["metadata", "status", "apiVersion", "kind"] {
            map.remove(k);
        }
    }
    o
}

/// Stores `object` under `key` (new or changed), assigning resourceVersion and
/// generation, and publishes the watch event. Unchanged writes are skipped.
fn commit(shared: &Arc<Shared>, store: &mut Store, key: &Key, object: Value) -> Arc<Value> {
    let stored = store_object(shared, store, key, object);
    if key.group == "apps"
        && key.resource == "deployments"
        && shared.simulate_deployments.load(Ordering::Relaxed)
    {
        simulate_deployment_status(shared, store, key);
    }
    stored
}

fn store_object(
    shared: &Arc<Shared>,
    store: &mut Store,
    key: &Key,
    mut object: Value,
) -> Arc<Value> {
    if let Some(schema) = store
        .schemas
        .get(&(key.group.clone(), key.resource.clone()))
    {
        schema::prune_and_default(&mut object, schema);
    }
    let old = store.objects.get(key).map(|e| e.object.clone());
    if let Some(old) = &old {
        let mut a = (**old).clone();
        let mut b = object.clone();
        for v in [&mut a, &mut b] {
            if let Some(m) = v["metadata"].as_object_mut() {
                m.remove("resourceVersion");
                m.remove("managedFields");
            }
        }
        if a == b {
            return old.clone();
        }
        if store.has_generation(&key.group, &key.resource) {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
            let bumped = if desired_part(old) != desired_part(&object) {
                generation + 1
            } else {
                generation
            };
            object["metadata"]["generation"] = json!(bumped);
        } else if let Some(m) = object["metadata"].as_object_mut() {
            m.remove("generation");
        }
    }
    store.rv += 1;
    let rv = store.rv;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    let object = Arc::new(object);
    let type_ = if old.is_some() { "MODIFIED" } else { "ADDED" };
    let entry = store.objects.entry(key.clone()).or_default();
    entry.object = object.clone();
    let event = WatchEvent {
        rv,
        key: key.clone(),
        type_,
        object: object.clone(),
        previous: old,
    };
    store.history.push(event.clone());
    let _ = shared.events.send(event);
    object
}

/// What the Deployment controller and the kubelet would eventually report:
/// at once, or after the ready delay with a not-ready status meanwhile.
fn simulate_deployment_status(shared: &Arc<Shared>, store: &mut Store, key: &Key) {
    let Some(entry) = store.objects.get(key) else {
        return;
    };
    let generation = entry.object["metadata"]["generation"].clone();
    let delay = *shared.deployment_ready_delay.lock().unwrap();
    // A write that did not change the spec starts no rollout.
    if !delay.is_zero() && entry.object["status"]["observedGeneration"] == generation {
        return;
    }
    if delay.is_zero() {
        write_deployment_status(shared, store, key, true);
        return;
    }
    write_deployment_status(shared, store, key, false);
    let shared = shared.clone();
    let key = key.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let mut store = shared.store.lock().unwrap();
        // A newer write started its own rollout.
        let current = store
            .objects
            .get(&key)
            .map(|e| e.object["metadata"]["generation"].clone());
        if current == Some(generation) {
            write_deployment_status(&shared, &mut store, &key, true);
        }
    });
}

fn write_deployment_status(shared: &Arc<Shared>, store: &mut Store, key: &Key, ready: bool) {
    let Some(entry) = store.objects.get(key) else {
        return;
    };
    let object = &entry.object;
    let replicas = object["spec"]["replicas"].as_i64().unwrap_or(1);
    let generation = object["metadata"]["generation"].clone();
    let status = if ready {
        json!({
            "observedGeneration": generation,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
            "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}],
        })
    } else {
        json!({
            "observedGeneration": generation,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "unavailableReplicas": replicas,
            "conditions": [{"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"}],
        })
    };
    if object["status"] == status {
        return;
    }
    let mut updated = (**object).clone();
    updated["status"] = status;
    store_object(shared, store, key, updated);
}

fn create(
    shared: &Arc<Shared>,
    store: &mut Store,
    group: &str,
    resource: &str,
    namespace: &str,
    mut object: Value,
) -> Result<Value, ApiError> {
    if !object.is_object() {
        return Err(err(400, "BadRequest", "body is not a JSON object"));
    }
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    let name = match (
        object["metadata"]["name"].as_str(),
        object["metadata"]["generateName"].as_str(),
    ) {
        (Some(n), _) if !n.is_empty() => n.to_string(),
        (_, Some(prefix)) => format!("{prefix}{:05x}", store.uid + 1),
        _ => return Err(err(422, "Invalid", "metadata.name: Required value")),
    };
    let key = Key::new(group, resource, namespace, &name);
    if store.objects.contains_key(&key) {
        return Err(err(
            409,
            "AlreadyExists",
            format!("{resource} \"{name}\" already exists"),
        ));
    }
    store.uid += 1;
    let meta = object["metadata"].as_object_mut().unwrap();
    meta.insert("name".into(), json!(name));
    if !namespace.is_empty() {
        meta.insert("namespace".into(), json!(namespace));
    }
    meta.insert(
        "uid".into(),
        json!(format!("00000000-0000-4000-8000-{:012x}", store.uid)),
    );
    meta.insert("creationTimestamp".into(), json!(now()));
    let owner_uids: Vec<String> = meta
        .get("ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r["uid"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    meta.remove("resourceVersion");
    if store.has_generation(group, resource) {
        object["metadata"]["generation"] = json!(1);
    } else if let Some(m) = object["metadata"].as_object_mut() {
        m.remove("generation");
    }
    if store.has_status_subresource(resource)
        && let Some(map) = object.as_object_mut()
    {
        map.remove("status");
    }
    let uid = object["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    store.uids.insert(uid);
    let stored = (*commit(shared, store, &key, object)).clone();
    // Like the garbage collector: an object all of whose owners are gone is deleted.
    if !owner_uids.is_empty() && owner_uids.iter().all(|u| !store.uids.contains(u)) {
        let _ = delete(shared, store, &key);
    }
    Ok(stored)
}

fn delete(shared: &Arc<Shared>, store: &mut Store, key: &Key) -> Result<Value, ApiError> {
    let Some(entry) = store.objects.remove(key) else {
        return Err(not_found(key));
    };
    if let Some(uid) = entry.object["metadata"]["uid"].as_str() {
        store.uids.remove(uid);
    }
    store.rv += 1;
    let mut gone = (*entry.object).clone();
    gone["metadata"]["resourceVersion"] = json!(store.rv.to_string());
    let event = WatchEvent {
        rv: store.rv,
        key: key.clone(),
        type_: "DELETED",
        object: Arc::new(gone.clone()),
        previous: None,
    };
    store.history.push(event.clone());
    let _ = shared.events.send(event);
    // Background cascading deletion of dependents.
    let uid = gone["metadata"]["uid"].clone();
    let dependents: Vec<Key> = store
        .objects
        .iter()
        .filter(|(_, e)| {
            e.object["metadata"]["ownerReferences"]
                .as_array()
                .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
        })
        .map(|(k, _)| k.clone())
        .collect();
    for dependent in dependents {
        let _ = delete(shared, store, &dependent);
    }
    Ok(gone)
}

fn conflict(key: &Key) -> ApiError {
    err(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            key.resource, key.name
        ),
    )
}

fn not_found(key: &Key) -> ApiError {
    err(
        404,
        "NotFound",
        format!("{} \"{}\" not found", key.resource, key.name),
    )
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Leaf paths of a JSON object: arrays, scalars and empty objects are leaves.
fn leaf_paths(value: &Value, prefix: &mut Vec<String>, out: &mut BTreeSet<Vec<String>>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                prefix.push(k.clone());
                leaf_paths(v, prefix, out);
                prefix.pop();
            }
        }
        Value::Null => {}
        _ => {
            out.insert(prefix.clone());
        }
    }
}

/// Paths a merge patch sets to null (deletes).
fn null_paths(value: &Value, prefix: &mut Vec<String>, out: &mut BTreeSet<Vec<String>>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                prefix.push(k.clone());
                null_paths(v, prefix, out);
                prefix.pop();
            }
        }
        Value::Null => {
            out.insert(prefix.clone());
        }
        _ => {}
    }
}

fn value_at<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, k| v.get(k))
}

fn remove_at(value: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut v = value;
    for k in parents {
        match v.get_mut(k) {
            Some(next) => v = next,
            None => return,
        }
    }
    if let Some(map) = v.as_object_mut() {
        map.remove(last);
    }
}

/// Paths an apply body may own: not the identity of the object.
fn ownable(path: &[String]) -> bool {
    !matches!(
        path.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
        ["apiVersion"] | ["kind"] | ["metadata", "name"] | ["metadata", "namespace"]
    )
}

#[allow(clippy::too_many_arguments)]
fn patch_object(
    shared: &Arc<Shared>,
    store: &mut Store,
    key: &Key,
    subresource: Option<&str>,
    kind: &str,
    patch: &Value,
    manager: &str,
    force: bool,
) -> Result<Value, ApiError> {
    if !patch.is_object() {
        return Err(err(400, "BadRequest", "patch body is not a JSON object"));
    }
    let status_only = subresource == Some("status");
    let has_status = store.has_status_subresource(&key.resource);
    if status_only && !has_status {
        return Err(not_found(key));
    }
    let existing = store.objects.get(key).map(|e| (*e.object).clone());
    let manager_key = if status_only {
        format!("{manager}/status")
    } else {
        manager.to_string()
    };
    if kind == "apply" && (!patch["apiVersion"].is_string() || !patch["kind"].is_string()) {
        return Err(err(
            400,
            "BadRequest",
            "apply patches must set apiVersion and kind",
        ));
    }
    if let (Some(o), Some(rv)) = (&existing, patch["metadata"]["resourceVersion"].as_str())
        && o["metadata"]["resourceVersion"].as_str() != Some(rv)
    {
        return Err(conflict(key));
    }
    let current = match (&existing, kind) {
        (Some(o), _) => o.clone(),
        (None, "apply") if !status_only => Value::Null,
        (None, _) => return Err(not_found(key)),
    };

    let mut paths = BTreeSet::new();
    leaf_paths(patch, &mut vec![], &mut paths);
    paths.retain(|p| ownable(p) && (!status_only || p.first().is_some_and(|k| k == "status")));

    let mut updated = if current.is_null() {
        json!({"metadata": {}})
    } else {
        current.clone()
    };
    let mut owners = store
        .objects
        .get(key)
        .map(|e| e.owners.clone())
        .unwrap_or_default();

    if kind == "apply" {
        if !force {
            let conflicts: Vec<String> = owners
                .iter()
                .filter(|(m, _)| **m != manager_key)
                .flat_map(|(m, owned)| {
                    owned
                        .intersection(&paths)
                        .filter(|p| {
                            let now = value_at(&current, p);
                            now.is_some() && now != value_at(patch, p)
                        })
                        .map(move |p| format!("{m}: .{}", p.join(".")))
                })
                .collect();
            if !conflicts.is_empty() {
                return Err(err(
                    409,
                    "Conflict",
                    format!("Apply failed with conflicts: {}", conflicts.join(", ")),
                ));
            }
        }
        // Fields this manager applied before and dropped now go away, unless
        // someone else owns them too.
        let before = owners.get(&manager_key).cloned().unwrap_or_default();
        for gone in before.difference(&paths) {
            let shared_with_others = owners
                .iter()
                .any(|(m, owned)| *m != manager_key && owned.contains(gone));
            if !shared_with_others {
                remove_at(&mut updated, gone);
            }
        }
    }
    merge_patch(&mut updated, patch);
    // Fields a patch deleted (null) are owned by no one any more.
    let mut deleted = BTreeSet::new();
    null_paths(patch, &mut vec![], &mut deleted);
    for owned in owners.values_mut() {
        owned.retain(|p| !deleted.iter().any(|d| p.starts_with(d)));
    }

    // Ownership: the writer owns what it wrote; forced applies and plain
    // patches take fields over from others.
    let take_over = kind != "apply" || force;
    for (m, owned) in owners.iter_mut() {
        if *m != manager_key && take_over {
            owned.retain(|p| !paths.contains(p));
        }
    }
    if kind == "apply" {
        owners.insert(manager_key.clone(), paths);
    } else {
        owners.entry(manager_key.clone()).or_default().extend(paths);
    }

    // Subresource rules.
    if has_status {
        let old_status = current.get("status").cloned();
        if status_only {
            let mut restored = current.clone();
            match updated.get("status") {
                Some(s) => restored["status"] = s.clone(),
                None => {
                    restored.as_object_mut().map(|m| m.remove("status"));
                }
            }
            updated = restored;
        } else {
            match old_status {
                Some(s) => updated["status"] = s,
                None => {
                    updated.as_object_mut().map(|m| m.remove("status"));
                }
            }
        }
    }

    let result = if existing.is_none() {
        let namespace = key.namespace.clone();
        updated["metadata"]["name"] = json!(key.name);
        create(
            shared,
            store,
            &key.group,
            &key.resource,
            &namespace,
            updated,
        )?
    } else {
        (*commit(shared, store, key, updated)).clone()
    };
    if let Some(entry) = store.objects.get_mut(key) {
        entry.owners = owners;
    }
    Ok(result)
}

// ---------------------------------------------------------------- HTTP

/// What a metadata-only request gets instead of the object.
fn partial_metadata(object: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": object["metadata"],
    })
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(code: u16, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .unwrap()
}

fn status_response(e: &ApiError) -> Response<Body> {
    json_response(
        e.code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": e.message, "reason": e.reason, "code": e.code,
        }),
    )
}

struct Target {
    group: String,
    version: String,
    namespace: Option<String>,
    resource: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name, subresource) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(name.to_string()), None),
        [resource, name, sub] => (*resource, Some(name.to_string()), Some(sub.to_string())),
        _ => return None,
    };
    Some(Target {
        group: group.into(),
        version: version.into(),
        namespace,
        resource: resource.into(),
        name,
        subresource,
    })
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Equality-based label selector (`a=b`, `a==b`, `a!=b`, `a`, `!a`) and
/// `metadata.name` / `metadata.namespace` field selectors.
fn matches(object: &Value, labels: Option<&String>, fields: Option<&String>) -> bool {
    let object_labels = &object["metadata"]["labels"];
    let label_ok = labels.is_none_or(|sel| {
        sel.split(',').filter(|s| !s.is_empty()).all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                object_labels[k.trim()].as_str() != Some(v.trim())
            } else if let Some((k, v)) = term.split_once('=') {
                object_labels[k.trim()].as_str() == Some(v.trim_start_matches('=').trim())
            } else if let Some(k) = term.strip_prefix('!') {
                object_labels.get(k.trim()).is_none()
            } else {
                object_labels.get(term.trim()).is_some()
            }
        })
    });
    let field_ok = fields.is_none_or(|sel| {
        sel.split(',').filter(|s| !s.is_empty()).all(|term| {
            let (k, v) = term.split_once('=').unwrap_or((term, ""));
            let v = v.trim_start_matches('=');
            match k {
                "metadata.name" => object["metadata"]["name"].as_str() == Some(v),
                "metadata.namespace" => object["metadata"]["namespace"].as_str() == Some(v),
                _ => true,
            }
        })
    });
    label_ok && field_ok
}

fn verb(method: &Method, target: &Target, query: &BTreeMap<String, String>) -> &'static str {
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    match (method.as_str(), target.name.is_some()) {
        ("GET", true) => "get",
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let Some(target) = parse_path(req.uri().path()) else {
        return status_response(&err(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    };
    let query = query(&req);
    if std::env::var_os("BOTRELAY_TEST_APISERVER_TRACE").is_some() {
        eprintln!("test-apiserver: {} {}", req.method(), req.uri());
    }
    let verb = verb(req.method(), &target, &query);
    let resource_label = match &target.subresource {
        Some(sub) => format!("{}/{sub}", target.resource),
        None => target.resource.clone(),
    };
    let call = Call::new(verb, &target.group, &resource_label);
    // `Accept: application/json;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`
    let metadata_only = req
        .headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    // The kubeconfig's token is the user the policy is for; a request
    // without a token is the test's own, as a cluster admin's.
    let admin = req.headers().get("authorization").is_none();
    {
        let mut store = shared.store.lock().unwrap();
        if let Err(e) = authorize(&shared, &mut store, &call, &target, admin) {
            return status_response(&e);
        }
        if metadata_only {
            store.metadata_calls.insert(call.clone());
        }
    }
    {
        let mut faults = shared.faults.lock().unwrap();
        if let Some(fault) = faults.iter_mut().find(|f| f.call == call && f.times > 0) {
            fault.times -= 1;
            fault.served += 1;
            let reason = if fault.code == 503 {
                "ServiceUnavailable"
            } else {
                "InternalError"
            };
            return status_response(&err(fault.code, reason, "injected failure"));
        }
    }

    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return status_response(&err(400, "BadRequest", "could not read the body")),
    };
    let cost = {
        let costs = *shared.costs.lock().unwrap();
        match verb {
            "watch" => Duration::ZERO,
            "get" | "list" => costs.read,
            _ => costs.write,
        }
    };
    if !cost.is_zero() {
        // One request at a time: each is served when the previous ones are,
        // at its own cost. The schedule is kept exactly, so the timer's
        // coarseness delays a request's answer but never adds up.
        let done_at = {
            let mut free_at = shared.free_at.lock().unwrap();
            let start = (*free_at).max(tokio::time::Instant::now());
            *free_at = start + cost;
            *free_at
        };
        tokio::time::sleep_until(done_at).await;
    }
    let namespace = target.namespace.clone().unwrap_or_default();
    let key = |name: &str| Key::new(&target.group, &target.resource, &namespace, name);
    let parse_body = || -> Result<Value, ApiError> {
        serde_json::from_slice(&body)
            .map_err(|e| err(400, "BadRequest", format!("body is not JSON: {e}")))
    };
    let created = std::cell::Cell::new(verb == "create");
    let count = |store: &mut Store, kind: &str, key: Key| {
        *store
            .object_requests
            .entry((kind.to_string(), key))
            .or_insert(0) += 1;
    };

    let result: Result<Value, ApiError> = match verb {
        "get" => {
            let mut store = shared.store.lock().unwrap();
            let k = key(target.name.as_deref().unwrap());
            count(&mut store, "get", k.clone());
            store
                .objects
                .get(&k)
                .map(|e| (*e.object).clone())
                .ok_or_else(|| not_found(&k))
        }
        "list" => {
            let mut store = shared.store.lock().unwrap();
            list(&mut store, &target, &query, metadata_only)
        }
        "watch" => return watch(shared, target, query, metadata_only),
        "create" => parse_body().and_then(|object| {
            let mut store = shared.store.lock().unwrap();
            let created = create(
                &shared,
                &mut store,
                &target.group,
                &target.resource,
                &namespace,
                object,
            )?;
            let name = created["metadata"]["name"].as_str().unwrap_or_default();
            count(&mut store, "create", key(name));
            Ok(created)
        }),
        "update" => parse_body().and_then(|mut object| {
            let mut store = shared.store.lock().unwrap();
            let k = key(target.name.as_deref().unwrap());
            count(&mut store, "update", k.clone());
            let Some(current) = store.objects.get(&k).map(|e| (*e.object).clone()) else {
                return Err(not_found(&k));
            };
            if let Some(rv) = object["metadata"]["resourceVersion"].as_str()
                && Some(rv) != current["metadata"]["resourceVersion"].as_str()
            {
                return Err(conflict(&k));
            }
            for field in ["uid", "creationTimestamp", "generation"] {
                object["metadata"][field] = current["metadata"][field].clone();
            }
            let status_only = target.subresource.as_deref() == Some("status");
            if store.has_status_subresource(&target.resource) {
                let mut merged = current.clone();
                if status_only {
                    merged["status"] = object["status"].clone();
                } else {
                    let status = current["status"].clone();
                    merged = object;
                    merged["status"] = status;
                }
                object = merged;
            } else if status_only {
                return Err(not_found(&k));
            }
            Ok((*commit(&shared, &mut store, &k, object)).clone())
        }),
        "patch" => parse_body().and_then(|patch| {
            let kind = if content_type.starts_with("application/apply-patch") {
                "apply"
            } else if content_type.starts_with("application/merge-patch+json")
                || content_type.starts_with("application/strategic-merge-patch+json")
            {
                "merge"
            } else {
                return Err(err(
                    415,
                    "UnsupportedMediaType",
                    format!("unsupported patch type {content_type}"),
                ));
            };
            let manager = query
                .get("fieldManager")
                .cloned()
                .unwrap_or_else(|| "unknown".into());
            if kind == "apply" && !query.contains_key("fieldManager") {
                return Err(err(
                    422,
                    "Invalid",
                    "fieldManager is required for apply patches",
                ));
            }
            let force = query.get("force").map(String::as_str) == Some("true");
            let mut store = shared.store.lock().unwrap();
            let k = key(target.name.as_deref().unwrap());
            count(
                &mut store,
                if kind == "apply" {
                    "apply"
                } else {
                    "merge-patch"
                },
                k.clone(),
            );
            // An apply that makes the object is also authorized as a create.
            if kind == "apply" && target.subresource.is_none() && !store.objects.contains_key(&k) {
                let create_call = Call::new("create", &target.group, &target.resource);
                authorize(&shared, &mut store, &create_call, &target, admin)?;
                created.set(true);
            }
            patch_object(
                &shared,
                &mut store,
                &k,
                target.subresource.as_deref(),
                kind,
                &patch,
                &manager,
                force,
            )
        }),
        "delete" => {
            let mut store = shared.store.lock().unwrap();
            let k = key(target.name.as_deref().unwrap());
            count(&mut store, "delete", k.clone());
            delete(&shared, &mut store, &k)
        }
        _ => Err(err(
            405,
            "MethodNotAllowed",
            "not supported by the test API server",
        )),
    };
    match result {
        Ok(value) => json_response(if created.get() { 201 } else { 200 }, &value),
        Err(e) => status_response(&e),
    }
}

/// Records `call` and checks it against the policy, if one is enforced.
/// Calls of the test itself (`admin`) are neither recorded nor checked.
fn authorize(
    shared: &Shared,
    store: &mut Store,
    call: &Call,
    target: &Target,
    admin: bool,
) -> Result<(), ApiError> {
    if admin {
        return Ok(());
    }
    store.calls.insert(call.clone());
    store
        .scoped_calls
        .insert((call.clone(), target.namespace.clone()));
    *store.call_counts.entry(call.clone()).or_insert(0) += 1;
    let policy = shared.policy.lock().unwrap();
    match policy.as_ref() {
        Some(p) if !p.allows(call, target.namespace.as_deref()) => {
            store.forbidden += 1;
            Err(err(
                403,
                "Forbidden",
                p.refusal(call, target.namespace.as_deref(), target.name.as_deref()),
            ))
        }
        _ => Ok(()),
    }
}

/// A continue token: the resourceVersion of the first page and the last key served.
fn continue_token(rv: u64, last: &Key) -> String {
    let raw = json!([rv, last.namespace, last.name]).to_string();
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn parse_continue(token: &str) -> Option<(u64, String, String)> {
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    let value: Value = serde_json::from_slice(&bytes?).ok()?;
    Some((
        value[0].as_u64()?,
        value[1].as_str()?.to_string(),
        value[2].as_str()?.to_string(),
    ))
}

fn list(
    store: &mut Store,
    target: &Target,
    query: &BTreeMap<String, String>,
    metadata_only: bool,
) -> Result<Value, ApiError> {
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let (at, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let Some((rv, ns, name)) = parse_continue(token) else {
                return Err(err(400, "BadRequest", "invalid continue token"));
            };
            if rv < store.compacted {
                store.expired += 1;
                return Err(err(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter.",
                ));
            }
            (
                rv,
                Some(Key::new(&target.group, &target.resource, &ns, &name)),
            )
        }
        None => (store.rv, None),
    };
    let in_scope = |k: &Key| {
        k.group == target.group
            && k.resource == target.resource
            && target
                .namespace
                .as_ref()
                .is_none_or(|ns| &k.namespace == ns)
            && after.as_ref().is_none_or(|a| k > a)
    };
    // Every page shows the objects as they were at the first page's resourceVersion.
    let snapshot: Vec<(Key, Arc<Value>)> = if at == store.rv {
        store
            .objects
            .iter()
            .filter(|(k, _)| in_scope(k))
            .map(|(k, e)| (k.clone(), e.object.clone()))
            .collect()
    } else {
        let mut then: BTreeMap<Key, Arc<Value>> = BTreeMap::new();
        for e in store.history.iter().take_while(|e| e.rv <= at) {
            if !in_scope(&e.key) {
                continue;
            }
            if e.type_ == "DELETED" {
                then.remove(&e.key);
            } else {
                then.insert(e.key.clone(), e.object.clone());
            }
        }
        then.into_iter().collect()
    };
    let selected: Vec<&(Key, Arc<Value>)> = snapshot
        .iter()
        .filter(|(_, o)| matches(o, query.get("labelSelector"), query.get("fieldSelector")))
        .collect();
    let more = selected.len() > limit;
    let page = &selected[..selected.len().min(limit)];
    let items: Vec<Value> = page
        .iter()
        .map(|(_, o)| {
            if metadata_only {
                partial_metadata(o)
            } else {
                (**o).clone()
            }
        })
        .collect();
    let mut metadata = json!({"resourceVersion": at.to_string()});
    if more && let Some((last, _)) = page.last() {
        metadata["continue"] = json!(continue_token(at, last));
        metadata["remainingItemCount"] = json!(selected.len() - page.len());
    }
    let (kind, api_version) = if metadata_only {
        (
            "PartialObjectMetadataList".to_string(),
            "meta.k8s.io/v1".to_string(),
        )
    } else {
        let kind = items
            .first()
            .and_then(|i| i["kind"].as_str())
            .map(|k| format!("{k}List"))
            .unwrap_or_else(|| "List".into());
        let api_version = if target.group.is_empty() {
            target.version.clone()
        } else {
            format!("{}/{}", target.group, target.version)
        };
        (kind, api_version)
    };
    Ok(json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": items}))
}

fn watch(
    shared: Arc<Shared>,
    target: Target,
    query: BTreeMap<String, String>,
    metadata_only: bool,
) -> Response<Body> {
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    // What a watcher sees of an event: a change that takes an object out of
    // the selector is a DELETED, one that brings it in an ADDED.
    let seen = move |e: &WatchEvent| -> Option<WatchEvent> {
        let in_scope = e.key.group == target.group
            && e.key.resource == target.resource
            && target
                .namespace
                .as_ref()
                .is_none_or(|ns| &e.key.namespace == ns);
        if !in_scope {
            return None;
        }
        let selected =
            |o: &Value| matches(o, query.get("labelSelector"), query.get("fieldSelector"));
        let now = selected(&e.object);
        let before = e.previous.as_deref().map(selected);
        let type_ = match (e.type_, before, now) {
            ("MODIFIED", Some(false), true) => "ADDED",
            ("MODIFIED", Some(true), false) => "DELETED",
            (t, _, true) => t,
            _ => return None,
        };
        Some(WatchEvent { type_, ..e.clone() })
    };
    let (backlog, mut live) = {
        let mut store = shared.store.lock().unwrap();
        if from != 0 && from < store.compacted {
            // As the real server answers: a 200 whose one event is the error.
            store.expired += 1;
            let gone = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from} ({})", store.compacted),
                "reason": "Expired", "code": 410,
            }});
            return Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(format!("{gone}\n"))).boxed())
                .unwrap();
        }
        let backlog: Vec<WatchEvent> = if from == 0 {
            store
                .objects
                .iter()
                .filter_map(|(k, e)| {
                    seen(&WatchEvent {
                        rv: store.rv,
                        key: k.clone(),
                        type_: "ADDED",
                        object: e.object.clone(),
                        previous: None,
                    })
                })
                .collect()
        } else {
            let start = store.history.partition_point(|e| e.rv <= from);
            store.history[start..].iter().filter_map(&seen).collect()
        };
        // Subscribing under the lock: no event falls between backlog and live.
        (backlog, shared.events.subscribe())
    };
    let last = backlog.last().map(|e| e.rv).unwrap_or(from);
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let mut closed = shared.close_watches.subscribe();
    tokio::spawn(async move {
        let line = |e: &WatchEvent| {
            let object = if metadata_only {
                partial_metadata(&e.object)
            } else {
                (*e.object).clone()
            };
            let mut s = json!({"type": e.type_, "object": object}).to_string();
            s.push('\n');
            Bytes::from(s)
        };
        for e in &backlog {
            if tx.send(line(e)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                _ = closed.changed() => return,
                event = live.recv() => match event {
                    Ok(e) if e.rv > last => {
                        if let Some(e) = seen(&e)
                            && tx.send(line(&e)).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Fell behind: end the watch; the client re-lists.
                    Err(_) => return,
                },
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment_key() -> Key {
        Key::new("apps", "deployments", "ns", "d")
    }

    async fn server() -> TestApiServer {
        let s = TestApiServer::start().await;
        s.simulate_deployments(false);
        s
    }

    fn apply(
        s: &TestApiServer,
        key: &Key,
        mut body: Value,
        manager: &str,
        force: bool,
    ) -> Result<Value, ApiError> {
        body["apiVersion"] = json!("v1");
        body["kind"] = json!("Thing");
        let mut store = s.shared.store.lock().unwrap();
        patch_object(
            &s.shared, &mut store, key, None, "apply", &body, manager, force,
        )
    }

    #[tokio::test]
    async fn apply_creates_then_removes_fields_the_manager_dropped() {
        let s = server().await;
        let key = deployment_key();
        let first = apply(
            &s,
            &key,
            json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"replicas": 1}}),
            "op",
            true,
        )
        .unwrap();
        assert_eq!(first["metadata"]["generation"], 1);
        assert!(first["metadata"]["uid"].is_string());
        let second = apply(
            &s,
            &key,
            json!({"metadata": {"labels": {"a": "1"}}, "spec": {"replicas": 2}}),
            "op",
            true,
        )
        .unwrap();
        assert_eq!(second["metadata"]["labels"], json!({"a": "1"}));
        assert_eq!(second["metadata"]["generation"], 2);
    }

    #[tokio::test]
    async fn apply_needs_api_version_and_kind() {
        let s = server().await;
        let mut store = s.shared.store.lock().unwrap();
        let e = patch_object(
            &s.shared,
            &mut store,
            &deployment_key(),
            None,
            "apply",
            &json!({"spec": {}}),
            "op",
            true,
        )
        .unwrap_err();
        assert_eq!(e.code, 400);
    }

    #[tokio::test]
    async fn unchanged_writes_are_not_stored_again() {
        let s = server().await;
        let key = deployment_key();
        apply(&s, &key, json!({"spec": {"replicas": 1}}), "op", true).unwrap();
        let rv = s.resource_version();
        apply(&s, &key, json!({"spec": {"replicas": 1}}), "op", true).unwrap();
        assert_eq!(s.resource_version(), rv);
        // A metadata-only change bumps resourceVersion but not generation.
        let v = apply(
            &s,
            &key,
            json!({"metadata": {"labels": {"x": "y"}}, "spec": {"replicas": 1}}),
            "op",
            true,
        )
        .unwrap();
        assert_eq!(s.resource_version(), rv + 1);
        assert_eq!(v["metadata"]["generation"], 1);
    }

    #[tokio::test]
    async fn apply_without_force_conflicts_on_another_managers_value() {
        let s = server().await;
        let key = Key::new("coordination.k8s.io", "leases", "ns", "l");
        apply(
            &s,
            &key,
            json!({"spec": {"holderIdentity": "a"}}),
            "a",
            false,
        )
        .unwrap();
        let e = apply(
            &s,
            &key,
            json!({"spec": {"holderIdentity": "b"}}),
            "b",
            false,
        )
        .unwrap_err();
        assert_eq!((e.code, e.reason), (409, "Conflict"));
        // Same value: shared ownership, no conflict. Field removed: no conflict either.
        apply(
            &s,
            &key,
            json!({"spec": {"holderIdentity": "a"}}),
            "b",
            false,
        )
        .unwrap();
        s.merge_patch(&key, json!({"spec": {"holderIdentity": null}}), false)
            .unwrap();
        let v = apply(
            &s,
            &key,
            json!({"spec": {"holderIdentity": "c"}}),
            "c",
            false,
        )
        .unwrap();
        assert_eq!(v["spec"]["holderIdentity"], "c");
    }

    #[tokio::test]
    async fn status_is_a_subresource() {
        let s = server().await;
        let key = Key::new("botrelay.dev", "messagingendpoints", "ns", "e");
        s.create("botrelay.dev", "messagingendpoints", json!({"metadata": {"name": "e", "namespace": "ns"}, "spec": {"a": 1}, "status": {"x": 1}})).unwrap();
        assert!(
            s.get(&key).unwrap()["status"].is_null(),
            "create drops status"
        );
        s.merge_patch(&key, json!({"status": {"x": 2}, "spec": {"a": 5}}), true)
            .unwrap();
        let v = s.get(&key).unwrap();
        assert_eq!(
            (v["status"]["x"].clone(), v["spec"]["a"].clone()),
            (json!(2), json!(1))
        );
        s.merge_patch(&key, json!({"status": {"x": 3}, "spec": {"a": 2}}), false)
            .unwrap();
        let v = s.get(&key).unwrap();
        assert_eq!(
            (v["status"]["x"].clone(), v["spec"]["a"].clone()),
            (json!(2), json!(2))
        );
        assert_eq!(v["metadata"]["generation"], 2);
    }

    #[tokio::test]
    async fn deleting_an_owner_deletes_its_dependents() {
        let s = server().await;
        let owner = s
            .create(
                "botrelay.dev",
                "messagingendpoints",
                json!({"metadata": {"name": "e", "namespace": "ns"}}),
            )
            .unwrap();
        let uid = owner["metadata"]["uid"].clone();
        s.create("", "secrets", json!({"metadata": {"name": "owned", "namespace": "ns", "ownerReferences": [{"uid": uid}]}})).unwrap();
        s.create(
            "",
            "secrets",
            json!({"metadata": {"name": "free", "namespace": "ns"}}),
        )
        .unwrap();
        s.delete(&Key::new("botrelay.dev", "messagingendpoints", "ns", "e"))
            .unwrap();
        assert!(s.get(&Key::new("", "secrets", "ns", "owned")).is_none());
        assert!(s.get(&Key::new("", "secrets", "ns", "free")).is_some());
        // An object created for an owner that is gone is collected at once.
        s.create("", "secrets", json!({"metadata": {"name": "late", "namespace": "ns", "ownerReferences": [{"uid": uid}]}})).unwrap();
        assert!(s.get(&Key::new("", "secrets", "ns", "late")).is_none());
    }

    #[test]
    fn paths_selectors_and_queries_parse() {
        let t = parse_path("/apis/apps/v1/namespaces/shop/deployments/x/status").unwrap();
        assert_eq!(
            (
                t.group.as_str(),
                t.namespace.as_deref(),
                t.resource.as_str(),
                t.name.as_deref(),
                t.subresource.as_deref()
            ),
            (
                "apps",
                Some("shop"),
                "deployments",
                Some("x"),
                Some("status")
            )
        );
        let t = parse_path("/api/v1/secrets").unwrap();
        assert_eq!(
            (t.group.as_str(), t.namespace, t.resource.as_str()),
            ("", None, "secrets")
        );
        let obj = json!({"metadata": {"name": "n", "labels": {"a": "1", "b": "2"}}});
        assert!(matches(
            &obj,
            Some(&"a=1,b".to_string()),
            Some(&"metadata.name=n".to_string())
        ));
        assert!(!matches(&obj, Some(&"a!=1".to_string()), None));
        assert!(!matches(&obj, Some(&"c".to_string()), None));
        assert_eq!(
            decode("app.kubernetes.io%2Fmanaged-by%3Dx"),
            "app.kubernetes.io/managed-by=x"
        );
    }
}
