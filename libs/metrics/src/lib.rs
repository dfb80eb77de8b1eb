//! Prometheus metrics of a `rapport` process.
//!
//! One registry per process holds every metric family; crates record into
//! [`metrics()`] and the binary serves [`encode`] on `/metrics` in the
//! Prometheus text format. Names follow Prometheus conventions: a `rapport_`
//! prefix, base units in the name (`_seconds`, `_bytes`), `_total` on
//! counters. Labels are bounded sets (service, method, code, topic, group,
//! kind, outcome), never ids.

use std::sync::OnceLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// gRPC calls handled, by service, method and status code.
    pub grpc_requests: IntCounterVec,
    /// gRPC handling time until the response headers, by service and method.
    pub grpc_duration: HistogramVec,
    /// Records the bus acknowledged, by topic.
    pub bus_produced: IntCounterVec,
    /// Records the bus refused or could not take, by topic.
    pub bus_produce_errors: IntCounterVec,
    /// Records consumed, by topic, group and outcome (handled, dead_lettered).
    pub bus_consumed: IntCounterVec,
    /// Handler attempts that failed and will be retried, by topic and group.
    pub bus_retries: IntCounterVec,
    /// Records behind the partition end, by topic, partition and group (Kafka only).
    pub consumer_lag: IntGaugeVec,
    /// Outbox rows not yet published, by service.
    pub outbox_backlog: IntGaugeVec,
    /// Database connections by service and state (idle, in_use).
    pub db_connections: IntGaugeVec,
    /// Events accepted by ingestion, by kind.
    pub events_ingested: IntCounterVec,
    /// Segment entries and exits, by change.
    pub membership_changes: IntCounterVec,
    /// Journey steps run, by action and outcome.
    pub journey_steps: IntCounterVec,
    /// Messages handled by messaging, by channel and outcome.
    pub messages: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let counter = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|error| panic!("metric {name} is well-formed: {error}"));
    registry
        .register(Box::new(counter.clone()))
        .unwrap_or_else(|error| panic!("metric {name} registers once: {error}"));
    counter
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let gauge = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|error| panic!("metric {name} is well-formed: {error}"));
    registry
        .register(Box::new(gauge.clone()))
        .unwrap_or_else(|error| panic!("metric {name} registers once: {error}"));
    gauge
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let collector = prometheus::process_collector::ProcessCollector::for_self();
            let _ = registry.register(Box::new(collector));
        }
        let grpc_duration = HistogramVec::new(
            HistogramOpts::new(
                "rapport_grpc_server_handling_seconds",
                "Time to handle a gRPC call, until the response headers, by service and method.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["grpc_service", "grpc_method"],
        )
        .unwrap_or_else(|error| panic!("histogram is well-formed: {error}"));
        registry
            .register(Box::new(grpc_duration.clone()))
            .unwrap_or_else(|error| panic!("histogram registers once: {error}"));
        Metrics {
            grpc_requests: counter(
                &registry,
                "rapport_grpc_server_handled_total",
                "gRPC calls completed, by service, method and status code.",
                &["grpc_service", "grpc_method", "grpc_code"],
            ),
            grpc_duration,
            bus_produced: counter(
                &registry,
                "rapport_bus_produced_records_total",
                "Records the event bus acknowledged, by topic.",
                &["topic"],
            ),
            bus_produce_errors: counter(
                &registry,
                "rapport_bus_produce_errors_total",
                "Records the event bus refused or could not take, by topic.",
                &["topic"],
            ),
            bus_consumed: counter(
                &registry,
                "rapport_bus_consumed_records_total",
                "Records consumed and committed, by topic, consumer group and outcome.",
                &["topic", "group", "outcome"],
            ),
            bus_retries: counter(
                &registry,
                "rapport_bus_handler_retries_total",
                "Failed handler attempts that were retried, by topic and consumer group.",
                &["topic", "group"],
            ),
            consumer_lag: gauge(
                &registry,
                "rapport_kafka_consumer_lag_records",
                "Records between a consumer group's position and the partition end.",
                &["topic", "partition", "group"],
            ),
            outbox_backlog: gauge(
                &registry,
                "rapport_outbox_backlog_records",
                "Outbox rows written but not yet published, by service.",
                &["service"],
            ),
            db_connections: gauge(
                &registry,
                "rapport_db_pool_connections",
                "Database pool connections by service and state (idle, in_use).",
                &["service", "state"],
            ),
            events_ingested: counter(
                &registry,
                "rapport_ingestion_events_total",
                "Events accepted by ingestion, by kind; duplicates are counted as kind=duplicate.",
                &["kind"],
            ),
            membership_changes: counter(
                &registry,
                "rapport_segmentation_membership_changes_total",
                "Contacts entering or leaving segments, by change.",
                &["change"],
            ),
            journey_steps: counter(
                &registry,
                "rapport_automation_journey_steps_total",
                "Journey steps run, by action and outcome.",
                &["action", "outcome"],
            ),
            messages: counter(
                &registry,
                "rapport_messaging_messages_total",
                "Messages handled by messaging, by channel and outcome.",
                &["channel", "outcome"],
            ),
            registry,
        }
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric in the Prometheus text exposition format.
pub fn encode() -> String {
    let families = metrics().registry.gather();
    let mut buffer = Vec::new();
    if let Err(error) = TextEncoder::new().encode(&families, &mut buffer) {
        return format!("# encoding failed: {error}\n");
    }
    String::from_utf8(buffer).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_appear_in_the_exposition() {
        metrics()
            .events_ingested
            .with_label_values(&["track"])
            .inc_by(3);
        let text = encode();
        assert!(
            text.contains("# TYPE rapport_ingestion_events_total counter"),
            "{text}"
        );
        assert!(
            text.contains("rapport_ingestion_events_total{kind=\"track\"} 3"),
            "{text}"
        );
    }
}
