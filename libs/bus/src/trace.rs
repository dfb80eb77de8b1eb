//! W3C trace context in record headers, so one trace follows work across a
//! Kafka hop.

use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::{Record, headers};

struct HeaderInjector<'a>(&'a mut Record);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.set_header(key, value);
    }
}

struct HeaderExtractor<'a>(&'a Record);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.headers.iter().map(|(key, _)| key.as_str()).collect()
    }
}

/// Adds the current span's trace context unless the record carries one.
pub fn inject_current(record: &mut Record) {
    if record.header(headers::TRACEPARENT).is_some() {
        return;
    }
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut HeaderInjector(record));
    });
}

/// A span for handling `record`, whose parent is the producer's trace.
pub fn consume_span(record: &Record, group: &str, partition: i32, offset: i64) -> tracing::Span {
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(record))
    });
    let span = tracing::info_span!(
        "process",
        otel.kind = "consumer",
        otel.name = format!("process {}", record.topic),
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.destination.name = %record.topic,
        messaging.consumer.group.name = %group,
        messaging.destination.partition.id = partition,
        messaging.kafka.offset = offset,
        messaging.message.id = record.header(headers::EVENT_ID).unwrap_or_default(),
    );
    let _ = span.set_parent(parent);
    span
}
