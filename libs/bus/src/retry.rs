//! The retry and dead-letter policy both bus implementations share.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Delivery, Handler, HandlerError, Record, Subscription, dead_letter_topic, headers};

const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub(crate) enum Outcome {
    /// Handled: commit.
    Handled,
    /// Gave up: write this record to the dead-letter topic, then commit.
    DeadLetter(Record),
    /// Shutdown interrupted a retry: do not commit; the record comes again.
    Interrupted,
}

/// Runs `handler` on one record until it succeeds, fails permanently, runs
/// out of attempts, or the consumer is shut down.
pub(crate) async fn handle_with_retries(
    handler: &Arc<dyn Handler>,
    subscription: &Subscription,
    record: Record,
    partition: i32,
    offset: i64,
    cancel: &CancellationToken,
) -> Outcome {
    let max_attempts = subscription.max_attempts.max(1);
    let mut backoff = subscription.retry_backoff;
    let mut attempt = 1;
    let span = crate::trace::consume_span(&record, &subscription.group, partition, offset);
    let mut delivery = Delivery {
        record,
        partition,
        offset,
        attempt,
    };
    loop {
        delivery.attempt = attempt;
        let result = handler.handle(&delivery).instrument(span.clone()).await;
        let reason = match result {
            Ok(()) => {
                consumed(&delivery.record.topic, &subscription.group, "handled");
                return Outcome::Handled;
            }
            Err(HandlerError::Permanent(reason)) => {
                tracing::warn!(parent: &span, %reason, attempt, "record cannot be handled; dead-lettering");
                reason
            }
            Err(HandlerError::Retryable(reason)) if attempt >= max_attempts => {
                tracing::warn!(parent: &span, %reason, attempt, "record failed on every attempt; dead-lettering");
                reason
            }
            Err(HandlerError::Retryable(reason)) => {
                tracing::info!(parent: &span, %reason, attempt, "record failed; retrying");
                rapport_metrics::metrics()
                    .bus_retries
                    .with_label_values(&[
                        delivery.record.topic.as_str(),
                        subscription.group.as_str(),
                    ])
                    .inc();
                tokio::select! {
                    _ = cancel.cancelled() => return Outcome::Interrupted,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                attempt += 1;
                continue;
            }
        };
        let mut dead = delivery.record.clone();
        dead.topic = dead_letter_topic(&delivery.record.topic);
        dead.set_header(headers::DLQ_REASON, reason);
        dead.set_header(headers::DLQ_SOURCE_TOPIC, delivery.record.topic.clone());
        dead.set_header(headers::DLQ_SOURCE_PARTITION, partition.to_string());
        dead.set_header(headers::DLQ_SOURCE_OFFSET, offset.to_string());
        dead.set_header(headers::DLQ_GROUP, subscription.group.clone());
        dead.set_header(headers::DLQ_ATTEMPTS, attempt.to_string());
        consumed(&delivery.record.topic, &subscription.group, "dead_lettered");
        return Outcome::DeadLetter(dead);
    }
}

fn consumed(topic: &str, group: &str, outcome: &str) {
    rapport_metrics::metrics()
        .bus_consumed
        .with_label_values(&[topic, group, outcome])
        .inc();
}
