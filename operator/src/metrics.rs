//! The operator's Prometheus metrics. The chart's dashboard and alerts use
//! these exact names.

use crate::controller::EndpointCounts;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `botrelay_operator_reconciliations_total{result="success"|"error"}`
    pub reconciliations: IntCounterVec,
    /// `botrelay_operator_reconcile_errors_total{reason}` (reason = `Error::metric_label()`)
    pub reconcile_errors: IntCounterVec,
    /// `botrelay_operator_reconcile_duration_seconds`
    pub reconcile_duration: Histogram,
    /// `botrelay_operator_endpoints{ready="true"|"false"}`
    pub endpoints: IntGaugeVec,
    /// `botrelay_operator_leader` (1 while this replica leads)
    pub leader: IntGauge,
    /// `botrelay_operator_owned_objects_total{resource, outcome="applied"|"unchanged"}`
    pub owned_objects: IntCounterVec,
    /// `botrelay_operator_relay_pods{namespace, endpoint, state="desired"|"ready"}`
    pub relay_pods: IntGaugeVec,
    /// `botrelay_operator_relay_target_polls_total{outcome="ok"|"failed"}`
    pub relay_polls: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let reconciliations = IntCounterVec::new(
            Opts::new(
                "botrelay_operator_reconciliations_total",
                "Reconciliations of MessagingEndpoints, by result.",
            ),
            &["result"],
        )
        .unwrap();
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "botrelay_operator_reconcile_errors_total",
                "Failed reconciliations, by reason.",
            ),
            &["reason"],
        )
        .unwrap();
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "botrelay_operator_reconcile_duration_seconds",
                "Time one reconciliation takes.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .unwrap();
        let endpoints = IntGaugeVec::new(
            Opts::new(
                "botrelay_operator_endpoints",
                "MessagingEndpoints known to the operator, by readiness.",
            ),
            &["ready"],
        )
        .unwrap();
        let leader = IntGauge::new(
            "botrelay_operator_leader",
            "1 while this operator replica holds the leader Lease.",
        )
        .unwrap();
        let owned_objects = IntCounterVec::new(
            Opts::new(
                "botrelay_operator_owned_objects_total",
                "Owned objects a reconciliation went through, by resource and by outcome: \
                 applied (written) or unchanged (what it would write is already there).",
            ),
            &["resource", "outcome"],
        )
        .unwrap();
        let relay_pods = IntGaugeVec::new(
            Opts::new(
                "botrelay_operator_relay_pods",
                "Relay pods of each MessagingEndpoint: asked for (spec.replicas) and ready.",
            ),
            &["namespace", "endpoint", "state"],
        )
        .unwrap();
        let relay_polls = IntCounterVec::new(
            Opts::new(
                "botrelay_operator_relay_target_polls_total",
                "Reads of the relays' /targets pages (for the reachability conditions), by outcome.",
            ),
            &["outcome"],
        )
        .unwrap();
        for outcome in ["ok", "failed"] {
            relay_polls.with_label_values(&[outcome]);
        }
        registry.register(Box::new(relay_polls.clone())).unwrap();
        for result in ["success", "error"] {
            reconciliations.with_label_values(&[result]);
        }
        for ready in ["true", "false"] {
            endpoints.with_label_values(&[ready]);
        }
        registry
            .register(Box::new(reconciliations.clone()))
            .unwrap();
        registry.register(Box::new(owned_objects.clone())).unwrap();
        registry.register(Box::new(relay_pods.clone())).unwrap();
        registry
            .register(Box::new(reconcile_errors.clone()))
            .unwrap();
        registry
            .register(Box::new(reconcile_duration.clone()))
            .unwrap();
        registry.register(Box::new(endpoints.clone())).unwrap();
        registry.register(Box::new(leader.clone())).unwrap();
        Metrics {
            registry,
            reconciliations,
            reconcile_errors,
            reconcile_duration,
            endpoints,
            leader,
            owned_objects,
            relay_pods,
            relay_polls,
        }
    }
}

impl Metrics {
    /// Sets the endpoint gauges from a count taken at scrape time; an
    /// endpoint gone since the last scrape leaves no series behind.
    pub fn set_endpoints(&self, counts: &EndpointCounts) {
        self.endpoints
            .with_label_values(&["true"])
            .set(counts.ready as i64);
        self.endpoints
            .with_label_values(&["false"])
            .set(counts.not_ready as i64);
        self.relay_pods.reset();
        for (namespace, endpoint, desired, ready) in &counts.pods {
            self.relay_pods
                .with_label_values(&[namespace.as_str(), endpoint.as_str(), "desired"])
                .set(i64::from(*desired));
            self.relay_pods
                .with_label_values(&[namespace.as_str(), endpoint.as_str(), "ready"])
                .set(i64::from(*ready));
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = vec![];
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("exposition is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_names_the_chart_uses() {
        let m = Metrics::default();
        m.reconciliations.with_label_values(&["success"]).inc();
        m.reconcile_errors
            .with_label_values(&["apply_deployment"])
            .inc();
        m.reconcile_duration.observe(0.02);
        m.set_endpoints(&EndpointCounts {
            ready: 3,
            not_ready: 1,
            pods: vec![("shop".into(), "support".into(), 3, 2)],
        });
        m.leader.set(1);
        let text = m.render();
        for line in [
            "botrelay_operator_reconciliations_total{result=\"success\"} 1",
            "botrelay_operator_reconciliations_total{result=\"error\"} 0",
            "botrelay_operator_reconcile_errors_total{reason=\"apply_deployment\"} 1",
            "botrelay_operator_reconcile_duration_seconds_count 1",
            "botrelay_operator_endpoints{ready=\"true\"} 3",
            "botrelay_operator_endpoints{ready=\"false\"} 1",
            "botrelay_operator_leader 1",
            "botrelay_operator_relay_pods{endpoint=\"support\",namespace=\"shop\",state=\"desired\"} 3",
            "botrelay_operator_relay_pods{endpoint=\"support\",namespace=\"shop\",state=\"ready\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
