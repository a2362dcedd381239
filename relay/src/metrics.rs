//! The relay's Prometheus metrics. Every metric carries the `endpoint` label
//! (`--endpoint-name`) as a constant label of the registry.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::collections::HashMap;

/// Latency buckets from 1 ms to 2 min: deliveries are fast or slow by orders of magnitude.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// End-to-end latency includes retries and outages, so it reaches hours.
const END_TO_END_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 14400.0, 86400.0,
];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub messages_received: IntCounterVec,
    pub delivery_attempts: IntCounterVec,
    pub delivery_retries: IntCounterVec,
    pub delivery_duration: HistogramVec,
    pub messages_delivered: IntCounterVec,
    pub messages_dead_lettered: IntCounterVec,
    pub end_to_end_latency: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub oldest_pending_age: prometheus::GaugeVec,
    pub dead_letters: IntGaugeVec,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub store_commit_duration: Histogram,
    pub store_batch_size: Histogram,
    pub store_file_bytes: prometheus::IntGauge,
    pub store_live_bytes: prometheus::IntGauge,
    pub store_disk_free_bytes: prometheus::IntGauge,
    pub conversations: prometheus::IntGauge,
    pub dedupe_entries: prometheus::IntGauge,
    pub dedupe_forgotten_early: prometheus::IntCounter,
    pub unreadable_bot_answers: prometheus::IntCounter,
    pub credential_reloads: IntCounterVec,
    /// Rate limits, breakers and probes ([`crate::delivery::control`]).
    pub control: crate::delivery::control::ControlMetrics,
}

/// `metric`, once registered with `registry`.
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl Metrics {
    pub fn new(endpoint: &str) -> Self {
        let labels = HashMap::from([("endpoint".to_string(), endpoint.to_string())]);
        let registry = Registry::new_custom(None, Some(labels)).expect("valid registry");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            registered(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str| {
            registered(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), &["target"]).expect("valid metric"),
            )
        };
        let plain_gauge = |name: &str, help: &str| {
            registered(
                &registry,
                prometheus::IntGauge::new(name, help).expect("valid metric"),
            )
        };
        let histogram = |name: &str, help: &str, buckets: &[f64], labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            registered(
                &registry,
                HistogramVec::new(opts, labels).expect("valid metric"),
            )
        };
        let oldest_pending_age = registered(
            &registry,
            prometheus::GaugeVec::new(
                Opts::new(
                    "botrelay_oldest_pending_age_seconds",
                    "Age of the oldest message waiting for delivery, by target.",
                ),
                &["target"],
            )
            .expect("valid metric"),
        );
        let build_info = registered(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "botrelay_build_info",
                    "Always 1; the relay's version as a label.",
                ),
                &["version"],
            )
            .expect("valid metric"),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let metrics = Self {
            messages_received: counter(
                "botrelay_messages_received_total",
                "Messages received from clients and bots, by source and outcome.",
                &["source", "outcome"],
            ),
            delivery_attempts: counter(
                "botrelay_delivery_attempts_total",
                "Delivery attempts, by target (bot, response) and outcome.",
                &["target", "outcome"],
            ),
            delivery_retries: counter(
                "botrelay_delivery_retries_total",
                "Delivery attempts after the first, by target.",
                &["target"],
            ),
            delivery_duration: histogram(
                "botrelay_delivery_duration_seconds",
                "Duration of one delivery attempt, by target.",
                LATENCY_BUCKETS,
                &["target"],
            ),
            messages_delivered: counter(
                "botrelay_messages_delivered_total",
                "Messages acknowledged by their target.",
                &["target"],
            ),
            messages_dead_lettered: counter(
                "botrelay_messages_dead_lettered_total",
                "Messages given up on after the last attempt or at the age limit.",
                &["target"],
            ),
            end_to_end_latency: histogram(
                "botrelay_end_to_end_latency_seconds",
                "From a message's acceptance by the relay to its acknowledgement by the target.",
                END_TO_END_BUCKETS,
                &["target"],
            ),
            queue_depth: gauge(
                "botrelay_queue_depth",
                "Messages waiting for delivery, by target.",
            ),
            oldest_pending_age,
            dead_letters: gauge(
                "botrelay_dead_letters",
                "Dead letters held (re-drivable), by target.",
            ),
            http_requests: counter(
                "botrelay_http_requests_total",
                "HTTP requests served on the API port, by route and status.",
                &["route", "status"],
            ),
            http_request_duration: histogram(
                "botrelay_http_request_duration_seconds",
                "Time to answer an API request, by route.",
                LATENCY_BUCKETS,
                &["route"],
            ),
            store_commit_duration: histogram(
                "botrelay_store_commit_duration_seconds",
                "From a store write to the sync that made it durable.",
                LATENCY_BUCKETS,
                &[],
            )
            .with_label_values(&[] as &[&str]),
            store_batch_size: histogram(
                "botrelay_store_batch_size",
                "Writes made durable by one store sync.",
                &[
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
                ],
                &[],
            )
            .with_label_values(&[] as &[&str]),
            store_file_bytes: plain_gauge(
                "botrelay_store_file_bytes",
                "Bytes of records in the embedded store's file, dead ones included (0 with --store memory).",
            ),
            store_live_bytes: plain_gauge(
                "botrelay_store_live_bytes",
                "Bytes of the embedded store's records still needed; compaction frees the rest once they are under half of a file over 64 MiB.",
            ),
            store_disk_free_bytes: plain_gauge(
                "botrelay_store_disk_free_bytes",
                "Free bytes of the embedded store's file system; under --disk-reserve-bytes plus the live bytes, new messages get 503.",
            ),
            conversations: plain_gauge(
                "botrelay_conversations",
                "Conversations remembered so that a bot can write to them; those quiet for --conversation-retention are forgotten.",
            ),
            dedupe_entries: plain_gauge(
                "botrelay_dedupe_entries",
                "messageIds remembered for dedupe (at most --dedupe-max-entries).",
            ),
            dedupe_forgotten_early: registered(
                &registry,
                prometheus::IntCounter::new(
                    "botrelay_dedupe_forgotten_early_total",
                    "messageIds forgotten before the end of --dedupe-window, to stay within --dedupe-max-entries.",
                )
                .expect("valid metric"),
            ),
            unreadable_bot_answers: registered(
                &registry,
                prometheus::IntCounter::new(
                    "botrelay_unreadable_bot_answers_total",
                    "2xx answers of the bot whose replies could not be read; the message counts as delivered and those replies are dropped.",
                )
                .expect("valid metric"),
            ),
            credential_reloads: counter(
                "botrelay_credential_reloads_total",
                "Changes of the credential files picked up, by outcome.",
                &["outcome"],
            ),
            control: crate::delivery::control::ControlMetrics::register(&registry),
            registry,
        };
        // Series that should exist from the start, so that rates and alerts have a baseline.
        for outcome in [
            "accepted",
            "duplicate",
            "invalid",
            "unauthorized",
            "too_large",
            "rejected",
        ] {
            metrics
                .messages_received
                .with_label_values(&["client", outcome]);
        }
        for outcome in [
            "accepted",
            "invalid",
            "unauthorized",
            "too_large",
            "rejected",
            "unknown_conversation",
        ] {
            metrics
                .messages_received
                .with_label_values(&["bot", outcome]);
        }
        for target in crate::store::Target::ALL {
            let t = target.as_str();
            metrics.queue_depth.with_label_values(&[t]).set(0);
            metrics.oldest_pending_age.with_label_values(&[t]).set(0.0);
            metrics.dead_letters.with_label_values(&[t]).set(0);
            metrics.messages_delivered.with_label_values(&[t]);
            metrics.messages_dead_lettered.with_label_values(&[t]);
            metrics.delivery_retries.with_label_values(&[t]);
            for outcome in ["success", "http_error", "timeout", "network_error"] {
                metrics.delivery_attempts.with_label_values(&[t, outcome]);
            }
        }
        metrics
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_carries_the_endpoint_label() {
        let m = Metrics::new("support");
        m.messages_received
            .with_label_values(&["client", "accepted"])
            .inc();
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            r#"botrelay_messages_received_total{outcome="accepted",source="client",endpoint="support"} 1"#
        ));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.contains(r#"endpoint="support""#), "{line}");
        }
    }
}
