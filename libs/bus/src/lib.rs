//! Rapport's event bus.
//!
//! Two implementations of one [`EventBus`] trait:
//! - [`kafka::KafkaBus`]: an idempotent rdkafka producer with `acks=all`, and
//!   consumer groups that commit an offset only after its record was handled;
//! - [`memory::MemoryBus`]: an in-process partitioned log with the same
//!   semantics, for a single process that runs every service, and for tests.
//!
//! Both deliver at least once and keep records of one key in order. A
//! handler that keeps failing has its record retried a bounded number of
//! times, then written to the topic's dead-letter topic (`<topic>.dlq`) with the
//! reason, and the partition moves on. [`contract`] holds the test suite both
//! implementations pass.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub mod contract;
pub mod envelope;
pub mod kafka;
pub mod memory;
mod retry;
pub mod topics;
pub mod trace;

pub use topics::TopicSpec;

/// Header names every Rapport record carries.
pub mod headers {
    pub const EVENT_ID: &str = "rapport-event-id";
    pub const WORKSPACE_ID: &str = "rapport-workspace-id";
    pub const OCCURRED_AT: &str = "rapport-occurred-at";
    pub const CONTENT_TYPE: &str = "content-type";
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
    /// Set on dead-lettered records.
    pub const DLQ_REASON: &str = "rapport-dlq-reason";
    pub const DLQ_SOURCE_TOPIC: &str = "rapport-dlq-source-topic";
    pub const DLQ_SOURCE_PARTITION: &str = "rapport-dlq-source-partition";
    pub const DLQ_SOURCE_OFFSET: &str = "rapport-dlq-source-offset";
    pub const DLQ_GROUP: &str = "rapport-dlq-group";
    pub const DLQ_ATTEMPTS: &str = "rapport-dlq-attempts";
}

/// The dead-letter topic of `topic`.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// One record to publish, or as delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    /// Partitioning key: the contact id (or anonymous id) the event is about.
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    pub fn set_header(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self.headers.iter_mut().find(|(key, _)| key == name) {
            Some(existing) => existing.1 = value,
            None => self.headers.push((name.to_owned(), value)),
        }
    }
}

/// A record handed to a [`Handler`], with where it came from.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub record: Record,
    pub partition: i32,
    pub offset: i64,
    /// 1 on first delivery to this handler, then 2, 3, ... on retries.
    pub attempt: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The broker could not take or give records; the caller may retry.
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
    /// A request the bus refuses (bad topic name, bad configuration).
    #[error("event bus refused the request: {0}")]
    Invalid(String),
}

/// Why a handler did not handle a record.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// May succeed later (a database blip): the record is retried.
    #[error("retryable: {0}")]
    Retryable(String),
    /// Will never succeed (a malformed record): dead-lettered at once.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// A failure of the service's own logic, handling a record: what may pass
/// (an unavailable or aborted database, a deadline, an internal error, or a
/// concurrent writer's ALREADY_EXISTS, which the retry finds) is retried;
/// everything else is the record's fault and is dead-lettered with the
/// reason and its field violations.
impl From<rapport_core::ApiError> for HandlerError {
    fn from(error: rapport_core::ApiError) -> Self {
        use rapport_core::ErrorCode;
        let mut reason = error.message;
        if !error.field_violations.is_empty() {
            let details: Vec<String> = error
                .field_violations
                .iter()
                .map(|v| format!("{}: {}", v.field, v.description))
                .collect();
            reason = format!("{reason} ({})", details.join("; "));
        }
        if error.code.is_retryable()
            || matches!(error.code, ErrorCode::Internal | ErrorCode::AlreadyExists)
        {
            HandlerError::Retryable(reason)
        } else {
            HandlerError::Permanent(reason)
        }
    }
}

/// Processes one record. It must be idempotent: a record can arrive again
/// after a crash between handling and commit.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError>;
}

/// What to consume and how hard to try.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Consumer group; offsets are committed per group.
    pub group: String,
    pub topics: Vec<String>,
    /// Attempts per record before it is dead-lettered (at least 1).
    pub max_attempts: u32,
    /// Delay before the first retry; doubles each attempt, capped at 5 s.
    pub retry_backoff: Duration,
}

impl Subscription {
    pub fn new(group: impl Into<String>, topics: &[&str]) -> Self {
        Subscription {
            group: group.into(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            max_attempts: 5,
            retry_backoff: Duration::from_millis(100),
        }
    }

    /// Sets the attempts per record before it is dead-lettered.
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }
}

/// A running consumer. Dropping it does not stop it; call [`ConsumerHandle::shutdown`].
pub struct ConsumerHandle {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl ConsumerHandle {
    pub(crate) fn new(cancel: CancellationToken, task: JoinHandle<()>) -> Self {
        ConsumerHandle { cancel, task }
    }

    /// Stops taking records, lets the record in hand finish and commit, and
    /// waits for the consumer to leave its group.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        if let Err(error) = self.task.await {
            tracing::warn!(%error, "consumer task ended abnormally");
        }
    }
}

/// The bus every service publishes to and consumes from.
#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Returns once the record is durably accepted (Kafka: acknowledged by all
    /// in-sync replicas). Trace context of the current span is added to the
    /// headers when the record carries none.
    async fn publish(&self, record: Record) -> Result<(), BusError>;

    /// Publishes many records; returns once all are accepted, or the first error.
    async fn publish_batch(&self, records: Vec<Record>) -> Result<(), BusError>;

    /// Starts a consumer that feeds `handler`, committing after each record.
    async fn subscribe(
        &self,
        subscription: Subscription,
        handler: Arc<dyn Handler>,
    ) -> Result<ConsumerHandle, BusError>;

    /// Creates the topics that do not exist yet; existing ones are left as they are.
    async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<(), BusError>;

    /// Checks the broker answers (readiness).
    async fn ping(&self) -> Result<(), BusError>;

    /// Flushes what is buffered, waiting at most `timeout`.
    async fn flush(&self, timeout: Duration) -> Result<(), BusError>;

    /// A short name for logs ("kafka", "memory").
    fn kind(&self) -> &'static str;
}

pub type SharedBus = Arc<dyn EventBus>;
