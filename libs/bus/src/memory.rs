//! An in-process, partitioned, at-least-once log with consumer groups.
//!
//! It mirrors what services rely on from Kafka: records of one key stay in
//! order (one partition per key hash), each group has its own committed
//! offsets, a group's consumers share partitions (a partition is leased to one
//! consumer while it handles a record), and a consumer started again resumes
//! after the last committed record. Nothing survives the process, which is
//! why it is allowed only when one process runs every service.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::retry::{Outcome, handle_with_retries};
use crate::{BusError, ConsumerHandle, EventBus, Handler, Record, Subscription, TopicSpec};

const DEFAULT_PARTITIONS: usize = 4;

#[derive(Default)]
struct State {
    topics: HashMap<String, Vec<Vec<Record>>>,
    /// (group, topic, partition) -> next offset to deliver.
    committed: HashMap<(String, String, usize), usize>,
    /// (group, topic, partition) currently in a consumer's hands.
    leased: HashSet<(String, String, usize)>,
}

impl State {
    fn topic_mut(&mut self, name: &str, partitions: usize) -> &mut Vec<Vec<Record>> {
        self.topics
            .entry(name.to_owned())
            .or_insert_with(|| vec![Vec::new(); partitions.max(1)])
    }

    /// Leases the next unhandled record of `group` on `topics`, if any.
    fn lease_next(
        &mut self,
        group: &str,
        topics: &[String],
    ) -> Option<(String, usize, usize, Record)> {
        for topic in topics {
            let Some(partitions) = self.topics.get(topic) else {
                continue;
            };
            for (partition, log) in partitions.iter().enumerate() {
                let key = (group.to_owned(), topic.clone(), partition);
                if self.leased.contains(&key) {
                    continue;
                }
                let next = self.committed.get(&key).copied().unwrap_or(0);
                if let Some(record) = log.get(next) {
                    let record = record.clone();
                    self.leased.insert(key);
                    return Some((topic.clone(), partition, next, record));
                }
            }
        }
        None
    }
}

/// The in-process bus. Clones share the same log.
#[derive(Clone)]
pub struct MemoryBus {
    state: Arc<Mutex<State>>,
    /// Bumped on every publish and release, so idle consumers wake.
    changes: Arc<watch::Sender<u64>>,
}

impl Default for MemoryBus {
    fn default() -> Self {
        MemoryBus::new()
    }
}

impl MemoryBus {
    pub fn new() -> Self {
        let (changes, _) = watch::channel(0);
        MemoryBus {
            state: Arc::new(Mutex::new(State::default())),
            changes: Arc::new(changes),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; carry on.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn append(&self, record: Record) {
        let mut state = self.lock();
        let partitions = state.topic_mut(&record.topic, DEFAULT_PARTITIONS);
        let partition = partition_for(&record.key, partitions.len());
        partitions[partition].push(record);
        drop(state);
        self.changes.send_modify(|version| *version += 1);
    }

    /// Every record on `topic`, partition by partition (for tests and tools).
    pub fn records(&self, topic: &str) -> Vec<Record> {
        let state = self.lock();
        state
            .topics
            .get(topic)
            .map(|partitions| partitions.iter().flatten().cloned().collect())
            .unwrap_or_default()
    }

    fn finish(&self, group: &str, topic: &str, partition: usize, commit_to: Option<usize>) {
        let mut state = self.lock();
        let key = (group.to_owned(), topic.to_owned(), partition);
        if let Some(next) = commit_to {
            state.committed.insert(key.clone(), next);
        }
        state.leased.remove(&key);
        drop(state);
        self.changes.send_modify(|version| *version += 1);
    }
}

fn partition_for(key: &str, partitions: usize) -> usize {
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    usize::try_from(hasher.finish() % partitions.max(1) as u64).unwrap_or(0)
}

#[async_trait]
impl EventBus for MemoryBus {
    async fn publish(&self, mut record: Record) -> Result<(), BusError> {
        if record.topic.is_empty() {
            return Err(BusError::Invalid("topic name is empty".into()));
        }
        crate::trace::inject_current(&mut record);
        rapport_metrics::metrics()
            .bus_produced
            .with_label_values(&[record.topic.as_str()])
            .inc();
        self.append(record);
        Ok(())
    }

    async fn publish_batch(&self, records: Vec<Record>) -> Result<(), BusError> {
        for record in records {
            self.publish(record).await?;
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        subscription: Subscription,
        handler: Arc<dyn Handler>,
    ) -> Result<ConsumerHandle, BusError> {
        if subscription.topics.is_empty() {
            return Err(BusError::Invalid("subscription names no topic".into()));
        }
        {
            let mut state = self.lock();
            for topic in &subscription.topics {
                state.topic_mut(topic, DEFAULT_PARTITIONS);
            }
        }
        let cancel = CancellationToken::new();
        let bus = self.clone();
        let task_cancel = cancel.clone();
        let task = tokio::spawn(async move {
            let mut changes = bus.changes.subscribe();
            loop {
                if task_cancel.is_cancelled() {
                    break;
                }
                let leased = bus
                    .lock()
                    .lease_next(&subscription.group, &subscription.topics);
                let Some((topic, partition, offset, record)) = leased else {
                    tokio::select! {
                        _ = task_cancel.cancelled() => break,
                        changed = changes.changed() => if changed.is_err() { break },
                    }
                    continue;
                };
                let offset_i64 = i64::try_from(offset).unwrap_or(i64::MAX);
                let partition_i32 = i32::try_from(partition).unwrap_or(0);
                match handle_with_retries(
                    &handler,
                    &subscription,
                    record,
                    partition_i32,
                    offset_i64,
                    &task_cancel,
                )
                .await
                {
                    Outcome::Handled => {
                        bus.finish(&subscription.group, &topic, partition, Some(offset + 1))
                    }
                    Outcome::DeadLetter(dead) => {
                        bus.append(dead);
                        bus.finish(&subscription.group, &topic, partition, Some(offset + 1));
                    }
                    Outcome::Interrupted => {
                        bus.finish(&subscription.group, &topic, partition, None);
                        break;
                    }
                }
            }
        });
        Ok(ConsumerHandle::new(cancel, task))
    }

    async fn ensure_topics(&self, topics: &[TopicSpec]) -> Result<(), BusError> {
        let mut state = self.lock();
        for spec in topics {
            let partitions = usize::try_from(spec.partitions).unwrap_or(1);
            state.topic_mut(&spec.name, partitions);
            state.topic_mut(&crate::dead_letter_topic(&spec.name), 1);
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), BusError> {
        Ok(())
    }

    async fn flush(&self, _timeout: Duration) -> Result<(), BusError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
