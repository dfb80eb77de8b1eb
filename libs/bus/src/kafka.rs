//! The Kafka implementation, on rdkafka (librdkafka built from source).
//!
//! Producer: idempotent (`enable.idempotence=true`, which implies
//! `acks=all`), so a retried send never duplicates or reorders a partition.
//! Consumers: one per subscription, auto-commit off; the offset of a record is
//! committed only after its handler succeeded or it was dead-lettered.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::try_join_all;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use crate::retry::{Outcome, handle_with_retries};
use crate::{BusError, ConsumerHandle, EventBus, Handler, Record, Subscription, TopicSpec};

/// Settings for [`KafkaBus`].
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    /// How long a publish may wait for acknowledgement before it fails.
    pub delivery_timeout: Duration,
    /// `client.id` prefix, visible in broker logs.
    pub client_id: String,
    /// Prefix of every topic and consumer group name, so several deployments
    /// (or test runs) can share one cluster. Empty in a normal deployment.
    pub namespace: String,
}

impl KafkaSettings {
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            delivery_timeout: Duration::from_secs(30),
            client_id: "rapport".to_owned(),
            namespace: String::new(),
        }
    }
}

pub struct KafkaBus {
    settings: KafkaSettings,
    /// Replaced when librdkafka reports a fatal error (for example the
    /// broker lost the idempotent producer's state), since a producer in
    /// that state never sends again.
    producer: std::sync::RwLock<FutureProducer>,
}

impl KafkaBus {
    fn broker_name(&self, name: &str) -> String {
        format!("{}{name}", self.settings.namespace)
    }

    pub fn connect(settings: KafkaSettings) -> Result<Self, BusError> {
        let producer = Self::new_producer(&settings)?;
        Ok(KafkaBus {
            settings,
            producer: std::sync::RwLock::new(producer),
        })
    }

    fn producer(&self) -> FutureProducer {
        self.producer
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replaces `failed` with a new producer if it cannot send any more: a
    /// fatal error, or a broker that no longer knows its producer id (it
    /// lost its state, or fenced the producer). Does nothing when another
    /// caller replaced it already.
    fn recover_from_fatal(&self, failed: &FutureProducer, code: Option<RDKafkaErrorCode>) {
        let fenced = matches!(
            code,
            Some(
                RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
                    | RDKafkaErrorCode::InvalidProducerIdMapping
            )
        );
        let fatal = failed.client().fatal_error();
        if fatal.is_none() && !fenced {
            return;
        }
        let mut current = self
            .producer
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !std::ptr::eq(current.client().native_ptr(), failed.client().native_ptr()) {
            return; // already replaced
        }
        match Self::new_producer(&self.settings) {
            Ok(producer) => {
                tracing::warn!(fatal = ?fatal, code = ?code, "kafka producer cannot send any more; replaced it");
                *current = producer;
            }
            Err(error) => tracing::error!(%error, "cannot replace the failed kafka producer"),
        }
    }

    fn new_producer(settings: &KafkaSettings) -> Result<FutureProducer, BusError> {
        let timeout_ms = settings.delivery_timeout.as_millis().to_string();
        ClientConfig::new()
            .set("bootstrap.servers", &settings.brokers)
            .set("client.id", &settings.client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", &timeout_ms)
            .create()
            .map_err(|error| BusError::Invalid(format!("kafka producer: {error}")))
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>, BusError> {
        ClientConfig::new()
            .set("bootstrap.servers", &self.settings.brokers)
            .create()
            .map_err(|error| BusError::Invalid(format!("kafka admin client: {error}")))
    }

    async fn send(&self, record: Record) -> Result<(), BusError> {
        use tracing::Instrument;
        let span = tracing::info_span!(
            "publish",
            otel.kind = "producer",
            otel.name = format!("publish {}", record.topic),
            messaging.system = "kafka",
            messaging.operation.type = "publish",
            messaging.destination.name = %record.topic,
        );
        self.send_in_span(record).instrument(span).await
    }

    async fn send_in_span(&self, record: Record) -> Result<(), BusError> {
        let topic = record.topic.clone();
        let result = self.produce(record).await;
        count(&topic, 1, result.is_ok());
        result
    }

    /// Hands one record to the producer and waits for its acknowledgement.
    async fn produce(&self, mut record: Record) -> Result<(), BusError> {
        crate::trace::inject_current(&mut record);
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let topic = self.broker_name(&record.topic);
        let future_record = FutureRecord::to(&topic)
            .key(record.key.as_bytes())
            .payload(record.payload.as_slice())
            .headers(headers);
        let producer = self.producer();
        let result = producer
            .send(
                future_record,
                Timeout::After(self.settings.delivery_timeout),
            )
            .await
            .map(|_| ())
            .map_err(|(error, _)| error);
        if let Err(error) = &result {
            self.recover_from_fatal(&producer, error.rdkafka_error_code());
        }
        result.map_err(|error| classify(&error))
    }
}

/// Counts records produced (or refused) on `topic`.
fn count(topic: &str, records: u64, ok: bool) {
    let metrics = rapport_metrics::metrics();
    if ok {
        metrics
            .bus_produced
            .with_label_values(&[topic])
            .inc_by(records);
    } else {
        metrics
            .bus_produce_errors
            .with_label_values(&[topic])
            .inc_by(records);
    }
}

/// Publishes each partition's consumer lag from librdkafka's statistics.
struct LagReporter {
    group: String,
    namespace: String,
}

impl ClientContext for LagReporter {
    fn stats(&self, statistics: Statistics) {
        let lag = &rapport_metrics::metrics().consumer_lag;
        for (topic, stats) in &statistics.topics {
            let topic = topic.strip_prefix(self.namespace.as_str()).unwrap_or(topic);
            for (partition, stats) in &stats.partitions {
                // -1 is librdkafka's internal "unassigned" partition.
                if *partition < 0 || stats.consumer_lag < 0 {
                    continue;
                }
                lag.with_label_values(&[topic, &partition.to_string(), self.group.as_str()])
                    .set(stats.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for LagReporter {}

fn classify(error: &KafkaError) -> BusError {
    match error.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::TopicAuthorizationFailed,
        ) => BusError::Invalid(error.to_string()),
        _ => BusError::Unavailable(error.to_string()),
    }
}

#[async_trait]
impl EventBus for KafkaBus {
    async fn publish(&self, record: Record) -> Result<(), BusError> {
        self.send(record).await
    }

    async fn publish_batch(&self, records: Vec<Record>) -> Result<(), BusError> {
        use tracing::Instrument;
        if records.is_empty() {
            return Ok(());
        }
        // One producer span and one count per topic for the whole batch: per
        // record they cost more than the sends themselves.
        let mut per_topic: Vec<(String, u64)> = Vec::new();
        for record in &records {
            match per_topic
                .iter_mut()
                .find(|(topic, _)| *topic == record.topic)
            {
                Some((_, count)) => *count += 1,
                None => per_topic.push((record.topic.clone(), 1)),
            }
        }
        let span = tracing::info_span!(
            "publish",
            otel.kind = "producer",
            otel.name = format!("publish {}", per_topic[0].0),
            messaging.system = "kafka",
            messaging.operation.type = "publish",
            messaging.destination.name = %per_topic[0].0,
            messaging.batch.message_count = records.len(),
        );
        // Sends are queued in order per partition; the idempotent producer
        // keeps that order through retries.
        let result = try_join_all(records.into_iter().map(|record| self.produce(record)))
            .instrument(span)
            .await;
        for (topic, records) in &per_topic {
            count(topic, *records, result.is_ok());
        }
        result.map(|_| ())
    }

    async fn subscribe(
        &self,
        subscription: Subscription,
        handler: Arc<dyn Handler>,
    ) -> Result<ConsumerHandle, BusError> {
        if subscription.topics.is_empty() {
            return Err(BusError::Invalid("subscription names no topic".into()));
        }
        let group_id = self.broker_name(&subscription.group);
        let consumer: StreamConsumer<LagReporter> = ClientConfig::new()
            .set("bootstrap.servers", &self.settings.brokers)
            .set("group.id", &group_id)
            .set(
                "client.id",
                format!("{}-{}", self.settings.client_id, subscription.group),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", "10000")
            // Also the rebalance timeout: how long a rebalance waits for a
            // member that stopped without leaving (a crash) to rejoin.
            .set("max.poll.interval.ms", "30000")
            .set("heartbeat.interval.ms", "1000")
            .set("topic.metadata.refresh.interval.ms", "5000")
            .set("statistics.interval.ms", "5000")
            .create_with_context(LagReporter {
                group: subscription.group.clone(),
                namespace: self.settings.namespace.clone(),
            })
            .map_err(|error| BusError::Invalid(format!("kafka consumer: {error}")))?;
        let broker_topics: Vec<String> = subscription
            .topics
            .iter()
            .map(|t| self.broker_name(t))
            .collect();
        let topics: Vec<&str> = broker_topics.iter().map(String::as_str).collect();
        let namespace = self.settings.namespace.clone();
        consumer
            .subscribe(&topics)
            .map_err(|error| BusError::Unavailable(format!("subscribe: {error}")))?;

        let dead_letters = KafkaBus::connect(self.settings.clone())?;
        let cancel = CancellationToken::new();
        let task_cancel = cancel.clone();
        let task = tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = task_cancel.cancelled() => break,
                    message = consumer.recv() => message,
                };
                let message = match message {
                    Ok(message) => message,
                    Err(error) => {
                        tracing::warn!(%error, group = %subscription.group, "kafka consume error");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let record = Record {
                    topic: message
                        .topic()
                        .strip_prefix(namespace.as_str())
                        .unwrap_or(message.topic())
                        .to_owned(),
                    key: message
                        .key()
                        .map(|key| String::from_utf8_lossy(key).into_owned())
                        .unwrap_or_default(),
                    payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    headers: message
                        .headers()
                        .map(|headers| {
                            headers
                                .iter()
                                .map(|header| {
                                    (
                                        header.key.to_owned(),
                                        header
                                            .value
                                            .map(|v| String::from_utf8_lossy(v).into_owned())
                                            .unwrap_or_default(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                let outcome = handle_with_retries(
                    &handler,
                    &subscription,
                    record,
                    message.partition(),
                    message.offset(),
                    &task_cancel,
                )
                .await;
                match outcome {
                    Outcome::Handled => {}
                    Outcome::DeadLetter(dead) => {
                        // The record must be in the dead-letter topic before its
                        // offset is committed; keep trying until it is.
                        while let Err(error) = dead_letters.send(dead.clone()).await {
                            tracing::error!(%error, "cannot write dead letter; retrying");
                            tokio::select! {
                                _ = task_cancel.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                        }
                    }
                    Outcome::Interrupted => break,
                }
                if let Err(error) = consumer.commit_message(&message, CommitMode::Sync) {
                    tracing::warn!(%error, group = %subscription.group, "offset commit failed; record may be redelivered");
                }
            }
            consumer.unsubscribe();
        });
        Ok(ConsumerHandle::new(cancel, task))
    }

    async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<(), BusError> {
        let admin = self.admin()?;
        let names: Vec<String> = topics
            .iter()
            .map(|spec| self.broker_name(&spec.name))
            .collect();
        let retention: Vec<String> = topics
            .iter()
            .map(|spec| spec.retention.as_millis().to_string())
            .collect();
        let new_topics: Vec<NewTopic<'_>> = topics
            .iter()
            .zip(&retention)
            .zip(&names)
            .map(|((spec, retention_ms), name)| {
                NewTopic::new(
                    name,
                    spec.partitions,
                    TopicReplication::Fixed(spec.replication_factor),
                )
                .set("retention.ms", retention_ms)
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = admin
            .create_topics(&new_topics, &options)
            .await
            .map_err(|error| BusError::Unavailable(format!("create topics: {error}")))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(BusError::Unavailable(format!(
                        "create topic {topic}: {code}"
                    )));
                }
            }
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), BusError> {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Timeout::After(Duration::from_secs(5)))
                .map(|_| ())
                .map_err(|error| BusError::Unavailable(format!("metadata: {error}")))
        })
        .await
        .map_err(|error| BusError::Unavailable(error.to_string()))?
    }

    async fn flush(&self, timeout: Duration) -> Result<(), BusError> {
        let producer = self.producer();
        tokio::task::spawn_blocking(move || {
            producer
                .flush(Timeout::After(timeout))
                .map_err(|error| BusError::Unavailable(format!("flush: {error}")))
        })
        .await
        .map_err(|error| BusError::Unavailable(error.to_string()))?
    }

    fn kind(&self) -> &'static str {
        "kafka"
    }
}
