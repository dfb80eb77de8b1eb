//! The behaviour every [`EventBus`] implementation must show. Each function is
//! one test; `bus_contract_suite!` turns them into `#[tokio::test]`s for an
//! implementation (see `tests/contract_memory.rs` and `tests/contract_kafka.rs`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::{
    Delivery, EventBus, Handler, HandlerError, Record, SharedBus, Subscription, TopicSpec,
    dead_letter_topic, headers,
};

/// How long a contract test waits for records to arrive.
const WAIT: Duration = Duration::from_secs(90);

/// A topic name no other test run uses.
pub fn unique_topic(name: &str) -> String {
    format!("rapport.contract.{name}.{}", uuid::Uuid::new_v4().simple())
}

fn unique_group(name: &str) -> String {
    format!("contract-{name}-{}", uuid::Uuid::new_v4().simple())
}

async fn topics(bus: &dyn EventBus, names: &[&str]) {
    let specs: Vec<TopicSpec> = names
        .iter()
        .flat_map(|name| {
            [
                TopicSpec::new(*name, 3),
                TopicSpec::new(dead_letter_topic(name), 1),
            ]
        })
        .collect();
    bus.ensure_topics(&specs).await.expect("topics are created");
}

fn record(topic: &str, key: &str, body: &str) -> Record {
    Record {
        topic: topic.to_owned(),
        key: key.to_owned(),
        payload: body.as_bytes().to_vec(),
        headers: vec![(headers::EVENT_ID.to_owned(), format!("{key}:{body}"))],
    }
}

/// Collects what it is handed; fails records whose body starts with "fail"
/// (retryably) or "poison" (permanently), and records whose body starts with
/// "flaky" on their first two attempts.
#[derive(Default)]
struct Collector {
    handled: Mutex<Vec<Delivery>>,
    attempts: Mutex<BTreeMap<String, u32>>,
}

impl Collector {
    fn handled(&self) -> Vec<Delivery> {
        self.handled.lock().expect("lock").clone()
    }

    fn bodies(&self) -> Vec<String> {
        self.handled()
            .iter()
            .map(|d| String::from_utf8_lossy(&d.record.payload).into_owned())
            .collect()
    }

    fn attempts(&self, body: &str) -> u32 {
        self.attempts
            .lock()
            .expect("lock")
            .get(body)
            .copied()
            .unwrap_or(0)
    }

    async fn wait_for(&self, count: usize) {
        let start = Instant::now();
        while self.handled().len() < count {
            assert!(
                start.elapsed() < WAIT,
                "waited {WAIT:?} for {count} records, got {}",
                self.handled().len()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

#[async_trait]
impl Handler for Collector {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let body = String::from_utf8_lossy(&delivery.record.payload).into_owned();
        let attempt = {
            let mut attempts = self.attempts.lock().expect("lock");
            let count = attempts.entry(body.clone()).or_insert(0);
            *count += 1;
            *count
        };
        if body.starts_with("fail") {
            return Err(HandlerError::Retryable(format!("{body} always fails")));
        }
        if body.starts_with("poison") {
            return Err(HandlerError::Permanent(format!("{body} is malformed")));
        }
        if body.starts_with("flaky") && attempt <= 2 {
            return Err(HandlerError::Retryable(format!(
                "{body} failed attempt {attempt}"
            )));
        }
        self.handled.lock().expect("lock").push(delivery.clone());
        Ok(())
    }
}

fn fast_subscription(group: &str, topics: &[&str]) -> Subscription {
    let mut subscription = Subscription::new(group, topics);
    subscription.max_attempts = 3;
    subscription.retry_backoff = Duration::from_millis(10);
    subscription
}

/// Records come out as they went in (key, payload, headers) and records of
/// one key arrive in the order they were published.
pub async fn delivers_records_in_key_order(bus: SharedBus) {
    let topic = unique_topic("order");
    topics(bus.as_ref(), &[&topic]).await;
    let mut published = Vec::new();
    for sequence in 0..30 {
        for key in ["alice", "bob", "carol"] {
            let mut record = record(&topic, key, &format!("{key}-{sequence:03}"));
            record.set_header(
                headers::TRACEPARENT,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            );
            published.push(record);
        }
    }
    bus.publish_batch(published.clone()).await.expect("publish");

    let collector = Arc::new(Collector::default());
    let consumer = bus
        .subscribe(
            fast_subscription(&unique_group("order"), &[&topic]),
            collector.clone(),
        )
        .await
        .expect("subscribe");
    collector.wait_for(published.len()).await;
    consumer.shutdown().await;

    let handled = collector.handled();
    assert_eq!(handled.len(), published.len(), "no record twice");
    for key in ["alice", "bob", "carol"] {
        let got: Vec<String> = handled
            .iter()
            .filter(|d| d.record.key == key)
            .map(|d| String::from_utf8_lossy(&d.record.payload).into_owned())
            .collect();
        let expected: Vec<String> = (0..30).map(|s| format!("{key}-{s:03}")).collect();
        assert_eq!(got, expected, "records of {key} in publish order");
    }
    let first = &handled[0].record;
    assert_eq!(
        first.header(headers::TRACEPARENT),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        "trace context travels in headers"
    );
    assert!(
        first
            .header(headers::EVENT_ID)
            .is_some_and(|id| id.starts_with(&format!("{}:", first.key))),
        "headers arrive unchanged"
    );
}

/// Every consumer group sees every record.
pub async fn each_group_receives_every_record(bus: SharedBus) {
    let topic = unique_topic("groups");
    topics(bus.as_ref(), &[&topic]).await;
    let records: Vec<Record> = (0..20)
        .map(|i| record(&topic, &format!("k{i}"), &format!("r{i}")))
        .collect();
    bus.publish_batch(records).await.expect("publish");

    let first = Arc::new(Collector::default());
    let second = Arc::new(Collector::default());
    let a = bus
        .subscribe(
            fast_subscription(&unique_group("a"), &[&topic]),
            first.clone(),
        )
        .await
        .expect("subscribe a");
    let b = bus
        .subscribe(
            fast_subscription(&unique_group("b"), &[&topic]),
            second.clone(),
        )
        .await
        .expect("subscribe b");
    first.wait_for(20).await;
    second.wait_for(20).await;
    a.shutdown().await;
    b.shutdown().await;
    let mut got_a = first.bodies();
    let mut got_b = second.bodies();
    got_a.sort();
    got_b.sort();
    assert_eq!(got_a.len(), 20);
    assert_eq!(got_a, got_b);
}

/// A consumer that stops and starts again in the same group resumes after
/// the last record it handled: nothing is lost and nothing handled is
/// delivered again.
pub async fn restart_resumes_after_committed_records(bus: SharedBus) {
    let topic = unique_topic("restart");
    topics(bus.as_ref(), &[&topic]).await;
    let group = unique_group("restart");
    let first_batch: Vec<Record> = (0..10)
        .map(|i| record(&topic, "same-key", &format!("before-{i:02}")))
        .collect();
    bus.publish_batch(first_batch).await.expect("publish");

    let before = Arc::new(Collector::default());
    let consumer = bus
        .subscribe(fast_subscription(&group, &[&topic]), before.clone())
        .await
        .expect("subscribe");
    before.wait_for(10).await;
    consumer.shutdown().await;

    let second_batch: Vec<Record> = (0..10)
        .map(|i| record(&topic, "same-key", &format!("after-{i:02}")))
        .collect();
    bus.publish_batch(second_batch).await.expect("publish");
    let after = Arc::new(Collector::default());
    let consumer = bus
        .subscribe(fast_subscription(&group, &[&topic]), after.clone())
        .await
        .expect("subscribe again");
    after.wait_for(10).await;
    // Give a redelivery of old records the chance to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    consumer.shutdown().await;
    let expected: Vec<String> = (0..10).map(|i| format!("after-{i:02}")).collect();
    assert_eq!(after.bodies(), expected, "only the new records, in order");
}

/// A record that keeps failing is retried up to the limit, then lands in the
/// dead-letter topic with its reason; the records behind it on the same
/// partition are still handled. A permanent failure is not retried.
pub async fn failing_records_are_dead_lettered_and_the_partition_moves_on(bus: SharedBus) {
    let topic = unique_topic("dlq");
    topics(bus.as_ref(), &[&topic]).await;
    let records = vec![
        record(&topic, "k", "ok-1"),
        record(&topic, "k", "fail-1"),
        record(&topic, "k", "poison-1"),
        record(&topic, "k", "flaky-1"),
        record(&topic, "k", "ok-2"),
    ];
    bus.publish_batch(records).await.expect("publish");

    let collector = Arc::new(Collector::default());
    let consumer = bus
        .subscribe(
            fast_subscription(&unique_group("dlq"), &[&topic]),
            collector.clone(),
        )
        .await
        .expect("subscribe");
    collector.wait_for(3).await;
    consumer.shutdown().await;
    assert_eq!(collector.bodies(), vec!["ok-1", "flaky-1", "ok-2"]);
    assert_eq!(
        collector.attempts("fail-1"),
        3,
        "retried up to max_attempts"
    );
    assert_eq!(
        collector.attempts("poison-1"),
        1,
        "permanent failures are not retried"
    );
    assert_eq!(
        collector.attempts("flaky-1"),
        3,
        "succeeded on the third attempt"
    );

    let dlq = dead_letter_topic(&topic);
    let start = Instant::now();
    let reader = Arc::new(AcceptAll::default());
    let consumer = bus
        .subscribe(
            fast_subscription(&unique_group("dlq-all"), &[&dlq]),
            reader.clone(),
        )
        .await
        .expect("subscribe to dead letters");
    while reader.records().len() < 2 {
        assert!(start.elapsed() < WAIT, "dead letters did not arrive");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    consumer.shutdown().await;
    let dead_letters = reader.records();
    assert_eq!(dead_letters.len(), 2);
    let fail = dead_letters
        .iter()
        .find(|r| r.payload == b"fail-1")
        .expect("fail-1 dead-lettered");
    assert_eq!(
        fail.header(headers::DLQ_REASON),
        Some("fail-1 always fails")
    );
    assert_eq!(fail.header(headers::DLQ_SOURCE_TOPIC), Some(topic.as_str()));
    assert_eq!(fail.header(headers::DLQ_ATTEMPTS), Some("3"));
    let poison = dead_letters
        .iter()
        .find(|r| r.payload == b"poison-1")
        .expect("poison-1 dead-lettered");
    assert_eq!(
        poison.header(headers::DLQ_REASON),
        Some("poison-1 is malformed")
    );
    assert_eq!(poison.header(headers::DLQ_ATTEMPTS), Some("1"));
}

#[derive(Default)]
struct AcceptAll {
    records: Mutex<Vec<Record>>,
}

impl AcceptAll {
    fn records(&self) -> Vec<Record> {
        self.records.lock().expect("lock").clone()
    }
}

#[async_trait]
impl Handler for AcceptAll {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        self.records
            .lock()
            .expect("lock")
            .push(delivery.record.clone());
        Ok(())
    }
}

/// Generates one `#[tokio::test]` per contract function for the bus that
/// `$factory().await` returns.
#[macro_export]
macro_rules! bus_contract_suite {
    ($factory:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn delivers_records_in_key_order() {
            $crate::contract::delivers_records_in_key_order($factory().await).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn each_group_receives_every_record() {
            $crate::contract::each_group_receives_every_record($factory().await).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn restart_resumes_after_committed_records() {
            $crate::contract::restart_resumes_after_committed_records($factory().await).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn failing_records_are_dead_lettered_and_the_partition_moves_on() {
            $crate::contract::failing_records_are_dead_lettered_and_the_partition_moves_on(
                $factory().await,
            )
            .await;
        }
    };
}
