//! What the relays say of their targets (the bot and the response endpoint),
//! as the `BotReachable` and `ResponseEndpointReachable` conditions.
//!
//! Each relay probes both of its targets and tells, on its admin port at
//! `GET /targets`, how the last probe went and whether deliveries to each are
//! paused (circuit open, or by hand). The operator reads that page of every
//! endpoint with a ready relay pod every `--relay-poll-interval`, turns it
//! into a verdict per target, and reconciles the endpoint only when a verdict
//! changed, so the status is written on news and not on every poll.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::ResourceExt;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{ObjectRef, Store};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::crd::MessagingEndpoint;
use crate::metrics::Metrics;

pub const BOT_REACHABLE: &str = "BotReachable";
pub const RESPONSE_ENDPOINT_REACHABLE: &str = "ResponseEndpointReachable";

/// How the operator reaches the relays' admin ports.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Base URL of a relay's admin port, with `{name}` and `{namespace}` in it.
    pub admin_url: String,
    /// Time between two reads of every relay's `/targets`; zero turns the
    /// reachability conditions off.
    pub interval: Duration,
}

impl Settings {
    /// The URL of the `/targets` page of endpoint `name` in `namespace`.
    pub fn targets_url(&self, namespace: &str, name: &str) -> String {
        let base = self
            .admin_url
            .replace("{namespace}", namespace)
            .replace("{name}", name);
        format!("{}/targets", base.trim_end_matches('/'))
    }

    pub fn enabled(&self) -> bool {
        !self.interval.is_zero()
    }
}

/// One target as `GET /targets` describes it (fields the operator uses).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TargetReport {
    /// `closed`, `open`, `half_open` or `paused`.
    pub state: String,
    #[serde(default)]
    pub paused_by_admin: bool,
    #[serde(default)]
    pub last_probe: Option<ProbeReport>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ProbeReport {
    pub ok: bool,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub error: Option<String>,
}

/// The whole `GET /targets` page.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TargetsPage {
    pub bot: TargetReport,
    pub response: TargetReport,
}

/// What one poll found for an endpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// The relay answered with its targets.
    Page(TargetsPage),
    /// The admin port could not be read, or did not hold a targets page.
    Unreadable(String),
}

/// A condition's status, reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reach {
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

fn reach(status: &'static str, reason: &'static str, message: impl Into<String>) -> Reach {
    Reach {
        status,
        reason,
        message: message.into(),
    }
}

/// The verdict on one target (`what` names it in messages, `url` is where it is).
pub fn verdict(
    found: Option<&Found>,
    pick: fn(&TargetsPage) -> &TargetReport,
    what: &str,
    url: &str,
    admin_path: &str,
    probes_off: bool,
) -> Reach {
    let page = match found {
        None => {
            return reach("Unknown", "NotChecked", "no relay pod is ready to tell yet");
        }
        Some(Found::Unreadable(problem)) => {
            return reach(
                "Unknown",
                "RelayNotReporting",
                format!("could not read the relay's targets: {problem}"),
            );
        }
        Some(Found::Page(page)) => page,
    };
    let target = pick(page);
    let last_probe = target
        .last_probe
        .as_ref()
        .map(|p| match (&p.error, p.status) {
            (Some(error), _) => error.clone(),
            (None, Some(status)) => format!("answered {status}"),
            (None, None) => "failed".to_string(),
        });
    if target.paused_by_admin || target.state == "paused" {
        return reach(
            "False",
            "PausedByHand",
            format!(
                "deliveries to the {what} are paused by hand; resume them with POST {admin_path}/resume on the relay's admin port"
            ),
        );
    }
    if target.state == "open" || target.state == "half_open" {
        let mut message = format!(
            "deliveries to the {what} at {url} keep failing: the relay sends one at a time until one goes through"
        );
        if let Some(probe) =
            last_probe.filter(|_| target.last_probe.as_ref().is_some_and(|p| !p.ok))
        {
            message.push_str(&format!("; last probe: {probe}"));
        }
        return reach("False", "CircuitOpen", message);
    }
    match &target.last_probe {
        None if probes_off => reach(
            "Unknown",
            "ProbesOff",
            format!(
                "reachability probes are off (spec.delivery.reachabilityProbeInterval: 0s); deliveries to {url} go as usual"
            ),
        ),
        None => reach(
            "Unknown",
            "NotProbedYet",
            format!("the relay has not probed {url} yet"),
        ),
        Some(probe) if probe.ok => reach("True", "ProbeSucceeded", format!("{url} answers")),
        Some(_) => reach(
            "False",
            "ProbeFailed",
            format!(
                "probe of {url}: {}",
                last_probe.unwrap_or_else(|| "failed".to_string())
            ),
        ),
    }
}

/// What the verdicts depend on besides the relay's page: the targets' URLs,
/// and whether the relay probes them at all.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub bot_url: String,
    pub response_url: String,
    pub probes_off: bool,
}

impl Checked {
    pub fn of(spec: &crate::crd::MessagingEndpointSpec) -> Self {
        let probes_off = spec
            .delivery
            .as_ref()
            .and_then(|d| d.reachability_probe_interval.as_deref())
            .and_then(|v| crate::validate::parse_duration(v).ok())
            .is_some_and(|v| v.is_zero());
        Checked {
            bot_url: spec.bot.url.clone(),
            response_url: spec.response_endpoint.url.clone(),
            probes_off,
        }
    }
}

/// The verdicts on both targets of an endpoint.
pub fn verdicts(found: Option<&Found>, checked: &Checked) -> [(&'static str, Reach); 2] {
    let (bot_url, response_url) = (checked.bot_url.as_str(), checked.response_url.as_str());
    [
        (
            BOT_REACHABLE,
            verdict(
                found,
                |p| &p.bot,
                "bot",
                bot_url,
                "/targets/bot",
                checked.probes_off,
            ),
        ),
        (
            RESPONSE_ENDPOINT_REACHABLE,
            verdict(
                found,
                |p| &p.response,
                "response endpoint",
                response_url,
                "/targets/response",
                checked.probes_off,
            ),
        ),
    ]
}

type Guarded = DeserializeGuard<MessagingEndpoint>;
type Key = (String, String);

/// The last poll's findings per endpoint, shared with the reconciler.
pub struct TargetsWatch {
    pub settings: Settings,
    found: Mutex<HashMap<Key, Found>>,
}

impl TargetsWatch {
    pub fn new(settings: Settings) -> Self {
        TargetsWatch {
            settings,
            found: Mutex::default(),
        }
    }

    /// What the last poll found for an endpoint, if it was read.
    pub fn found(&self, namespace: &str, name: &str) -> Option<Found> {
        self.found
            .lock()
            .unwrap()
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Records a finding; says whether it is news (a verdict changed).
    fn record(&self, key: Key, found: Option<Found>, urls: &Checked) -> bool {
        let mut map = self.found.lock().unwrap();
        let before = verdicts(map.get(&key), urls);
        match found {
            Some(found) => map.insert(key.clone(), found),
            None => map.remove(&key),
        };
        before != verdicts(map.get(&key), urls)
    }

    /// Forgets endpoints that are gone.
    fn retain(&self, keep: impl Fn(&Key) -> bool) {
        self.found.lock().unwrap().retain(|k, _| keep(k));
    }
}

/// Longest wait for one relay's answer.
const POLL_TIMEOUT: Duration = Duration::from_secs(3);
/// Relays read at once.
const POLL_CONCURRENCY: usize = 16;
/// Largest targets page read.
const MAX_PAGE_BYTES: usize = 64 * 1024;

/// Reads every ready relay's targets every interval, and names the endpoints
/// whose verdicts changed on `changed`. Runs until the receiver is dropped.
pub async fn poll(
    endpoints: Store<Guarded>,
    watch: std::sync::Arc<TargetsWatch>,
    metrics: Metrics,
    changed: mpsc::Sender<ObjectRef<Guarded>>,
) {
    if !watch.settings.enabled() {
        return;
    }
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(POLL_TIMEOUT));
    let http: HttpClient<HttpConnector, Empty<Bytes>> =
        HttpClient::builder(TokioExecutor::new()).build(connector);
    let mut ticks = tokio::time::interval(watch.settings.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let listed: Vec<_> = endpoints
            .state()
            .into_iter()
            .filter_map(|guarded| {
                let endpoint = guarded.0.as_ref().ok()?;
                let namespace = endpoint.namespace()?;
                let name = endpoint.name_any();
                let ready = endpoint
                    .status
                    .as_ref()
                    .is_some_and(|s| s.ready_replicas > 0);
                Some((namespace, name, ready, Checked::of(&endpoint.spec)))
            })
            .collect();
        let keys: std::collections::HashSet<Key> = listed
            .iter()
            .map(|(ns, name, ..)| (ns.clone(), name.clone()))
            .collect();
        watch.retain(|k| keys.contains(k));
        let results: Vec<_> = futures::stream::iter(listed)
            .map(|(namespace, name, ready, checked)| {
                let http = http.clone();
                let url = watch.settings.targets_url(&namespace, &name);
                async move {
                    let found = if ready {
                        Some(read_targets(&http, &url).await)
                    } else {
                        None
                    };
                    (namespace, name, checked, found)
                }
            })
            .buffer_unordered(POLL_CONCURRENCY)
            .collect()
            .await;
        for (namespace, name, checked, found) in results {
            if let Some(found) = &found {
                let outcome = match found {
                    Found::Page(_) => "ok",
                    Found::Unreadable(_) => "failed",
                };
                metrics.relay_polls.with_label_values(&[outcome]).inc();
            }
            let news = watch.record((namespace.clone(), name.clone()), found, &checked);
            if news {
                tracing::info!(%namespace, %name, "the relay's view of its targets changed");
                let key = ObjectRef::<Guarded>::new(&name).within(&namespace);
                if changed.send(key).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One relay's targets page, or why it could not be read.
async fn read_targets(http: &HttpClient<HttpConnector, Empty<Bytes>>, url: &str) -> Found {
    let request = match http::Request::get(url).body(Empty::new()) {
        Ok(request) => request,
        Err(e) => return Found::Unreadable(format!("bad URL {url}: {e}")),
    };
    let answer = match tokio::time::timeout(POLL_TIMEOUT, http.request(request)).await {
        Err(_) => return Found::Unreadable(format!("{url} did not answer in time")),
        Ok(Err(e)) => {
            return Found::Unreadable(format!("{url}: {}", error_chain(&e)));
        }
        Ok(Ok(answer)) => answer,
    };
    let status = answer.status();
    let body = match tokio::time::timeout(
        POLL_TIMEOUT,
        http_body_util::Limited::new(answer.into_body(), MAX_PAGE_BYTES).collect(),
    )
    .await
    {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(e)) => return Found::Unreadable(format!("{url}: {e}")),
        Err(_) => return Found::Unreadable(format!("{url} did not answer in time")),
    };
    if !status.is_success() {
        return Found::Unreadable(format!(
            "{url} answered {status} (a relay image without /targets?)"
        ));
    }
    match serde_json::from_slice::<TargetsPage>(&body) {
        Ok(page) => Found::Page(page),
        Err(e) => Found::Unreadable(format!("{url} is not a targets page: {e}")),
    }
}

/// An error with its causes, as one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(bot: serde_json::Value, response: serde_json::Value) -> Found {
        Found::Page(
            serde_json::from_value(serde_json::json!({"bot": bot, "response": response})).unwrap(),
        )
    }

    fn closed_ok() -> serde_json::Value {
        serde_json::json!({"state": "closed", "consecutiveFailures": 0, "pausedByAdmin": false,
                           "lastProbe": {"at": "2026-12-04T10:00:00Z", "ok": true, "status": 200, "error": null, "durationMs": 2},
                           "rateLimit": null})
    }

    #[test]
    fn template_names_each_endpoint_admin_port() {
        let s = Settings {
            admin_url: "http://{name}-relay.{namespace}.svc:9090".into(),
            interval: Duration::from_secs(15),
        };
        assert_eq!(
            s.targets_url("shop", "support"),
            "http://support-relay.shop.svc:9090/targets"
        );
        let proxy = Settings {
            admin_url: "http://127.0.0.1:8001/api/v1/namespaces/{namespace}/services/{name}-relay:metrics/proxy/".into(),
            interval: Duration::from_secs(15),
        };
        assert_eq!(
            proxy.targets_url("shop", "support"),
            "http://127.0.0.1:8001/api/v1/namespaces/shop/services/support-relay:metrics/proxy/targets"
        );
    }

    #[test]
    fn verdicts_follow_the_relay_report() {
        let urls = Checked {
            bot_url: "http://bot/e".into(),
            response_url: "https://be/r".into(),
            probes_off: false,
        };
        let [(_, bot), (_, response)] = verdicts(Some(&page(closed_ok(), closed_ok())), &urls);
        assert_eq!((bot.status, bot.reason), ("True", "ProbeSucceeded"));
        assert_eq!(response.message, "https://be/r answers");

        let wrong = serde_json::json!({"state": "closed", "lastProbe": {"ok": false, "status": 404, "error": "answered 404 Not Found"}});
        let [(_, bot), _] = verdicts(Some(&page(wrong, closed_ok())), &urls);
        assert_eq!((bot.status, bot.reason), ("False", "ProbeFailed"));
        assert_eq!(bot.message, "probe of http://bot/e: answered 404 Not Found");

        let refused = serde_json::json!({"state": "open", "consecutiveFailures": 12,
                                         "lastProbe": {"ok": false, "status": null, "error": "connection refused"}});
        let [_, (_, response)] = verdicts(Some(&page(closed_ok(), refused)), &urls);
        assert_eq!((response.status, response.reason), ("False", "CircuitOpen"));
        assert!(
            response.message.ends_with("last probe: connection refused"),
            "{}",
            response.message
        );

        let paused =
            serde_json::json!({"state": "paused", "pausedByAdmin": true, "lastProbe": null});
        let [(_, bot), _] = verdicts(Some(&page(paused, closed_ok())), &urls);
        assert_eq!((bot.status, bot.reason), ("False", "PausedByHand"));
        assert!(bot.message.contains("POST /targets/bot/resume"));

        let fresh = serde_json::json!({"state": "closed", "lastProbe": null});
        let [(_, bot), _] = verdicts(Some(&page(fresh.clone(), closed_ok())), &urls);
        assert_eq!((bot.status, bot.reason), ("Unknown", "NotProbedYet"));
        let off = Checked {
            probes_off: true,
            ..urls.clone()
        };
        let [(_, bot), _] = verdicts(Some(&page(fresh, closed_ok())), &off);
        assert_eq!((bot.status, bot.reason), ("Unknown", "ProbesOff"));

        let [(_, bot), _] = verdicts(None, &urls);
        assert_eq!((bot.status, bot.reason), ("Unknown", "NotChecked"));
        let [(_, bot), _] = verdicts(
            Some(&Found::Unreadable("x: connection refused".into())),
            &urls,
        );
        assert_eq!((bot.status, bot.reason), ("Unknown", "RelayNotReporting"));
    }

    #[test]
    fn only_a_changed_verdict_is_news() {
        let watch = TargetsWatch::new(Settings {
            admin_url: "http://x".into(),
            interval: Duration::from_secs(1),
        });
        let key = ("shop".to_string(), "support".to_string());
        let urls = Checked {
            bot_url: "http://bot/e".into(),
            response_url: "https://be/r".into(),
            probes_off: false,
        };
        assert!(watch.record(key.clone(), Some(page(closed_ok(), closed_ok())), &urls));
        // Same verdicts with other counters and times: not news.
        let mut later = closed_ok();
        later["lastProbe"]["at"] = serde_json::json!("2026-12-04T10:00:30Z");
        later["lastProbe"]["durationMs"] = serde_json::json!(7);
        assert!(!watch.record(key.clone(), Some(page(later.clone(), closed_ok())), &urls));
        let down = serde_json::json!({"state": "closed", "lastProbe": {"ok": false, "error": "timed out"}});
        assert!(watch.record(key.clone(), Some(page(down, closed_ok())), &urls));
        assert!(watch.record(key.clone(), None, &urls));
        assert_eq!(watch.found("shop", "support"), None);
    }
}
