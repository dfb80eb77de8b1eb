//! The transactional outbox.
//!
//! A service that changes state writes the events describing the change into
//! its own `outbox` table in the same transaction ([`enqueue`]). The relay
//! ([`spawn_relay`]) publishes outbox rows in id order and deletes them once
//! the bus has acknowledged them. An event therefore exists exactly when its
//! change was committed; a crash between publish and delete publishes it
//! again, which consumers absorb because they deduplicate on the event id.
//!
//! One relay per schema is active at a time (a transaction-scoped advisory
//! lock), so events leave in the order they were written.

use std::sync::Arc;
use std::time::Duration;

use rapport_bus::{Record, SharedBus};
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Rows per publish: large enough that a round's fixed costs (the broker's
/// acknowledgement, the commit) stay small beside the rows, so one relay
/// keeps up with a service writing 15–20k events/s; a full round holds
/// about 20 MB of payloads in memory.
const BATCH: i64 = 20_000;
const IDLE_POLL: Duration = Duration::from_millis(200);

pub(crate) async fn create_table(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS outbox (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            topic TEXT NOT NULL,
            record_key TEXT NOT NULL,
            payload BYTEA NOT NULL,
            headers JSONB NOT NULL DEFAULT '[]',
            created_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Adds `record` to the outbox within `transaction`.
pub async fn enqueue(
    transaction: &mut Transaction<'_, Postgres>,
    record: &Record,
) -> Result<(), sqlx::Error> {
    let mut record = record.clone();
    rapport_bus::trace::inject_current(&mut record);
    let headers = serde_json::to_value(&record.headers).unwrap_or_default();
    sqlx::query("INSERT INTO outbox (topic, record_key, payload, headers) VALUES ($1, $2, $3, $4)")
        .bind(&record.topic)
        .bind(&record.key)
        .bind(&record.payload)
        .bind(headers)
        .execute(&mut **transaction)
        .await?;
    Ok(())
}

/// Adds `records` to the outbox within `transaction`, in one statement.
pub async fn enqueue_many(
    transaction: &mut Transaction<'_, Postgres>,
    records: Vec<Record>,
) -> Result<(), sqlx::Error> {
    if records.is_empty() {
        return Ok(());
    }
    let mut topics = Vec::with_capacity(records.len());
    let mut keys = Vec::with_capacity(records.len());
    let mut payloads = Vec::with_capacity(records.len());
    let mut headers = Vec::with_capacity(records.len());
    for mut record in records {
        rapport_bus::trace::inject_current(&mut record);
        headers.push(serde_json::to_value(&record.headers).unwrap_or_default());
        topics.push(record.topic);
        keys.push(record.key);
        payloads.push(record.payload);
    }
    sqlx::query(
        "INSERT INTO outbox (topic, record_key, payload, headers)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::jsonb[])",
    )
    .bind(&topics)
    .bind(&keys)
    .bind(&payloads)
    .bind(&headers)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// Rows waiting to be published (the outbox backlog).
pub async fn backlog(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await
}

/// Wakes the relay early after a commit, so events leave without waiting for
/// the next poll.
#[derive(Clone, Default)]
pub struct OutboxWaker(Arc<Notify>);

impl OutboxWaker {
    pub fn wake(&self) {
        self.0.notify_one();
    }
}

/// A running relay.
pub struct Relay {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Relay {
    /// Publishes what is left (bounded by the caller's grace period) and stops.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// Starts the relay for the schema `pool` works in.
pub fn spawn_relay(
    pool: PgPool,
    bus: SharedBus,
    schema: &'static str,
    waker: OutboxWaker,
) -> Relay {
    let cancel = CancellationToken::new();
    let task_cancel = cancel.clone();
    let lock_id = advisory_lock_id(schema);
    let task = tokio::spawn(async move {
        loop {
            match relay_once(&pool, bus.as_ref(), lock_id).await {
                // More may be waiting; on shutdown this drains the backlog.
                Ok(published) if published > 0 => continue,
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, schema, "outbox relay failed; retrying"),
            }
            if task_cancel.is_cancelled() {
                break;
            }
            tokio::select! {
                _ = task_cancel.cancelled() => {}
                _ = waker.0.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    });
    Relay { cancel, task }
}

fn advisory_lock_id(schema: &str) -> i64 {
    // Stable across processes and releases: FNV-1a of "rapport-outbox-<schema>".
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in format!("rapport-outbox-{schema}").bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    i64::from_ne_bytes(hash.to_ne_bytes())
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("bus: {0}")]
    Bus(#[from] rapport_bus::BusError),
}

/// Publishes one batch; returns how many rows it published.
#[tracing::instrument(
    name = "db",
    level = "debug",
    skip_all,
    fields(
        otel.kind = "client",
        otel.name = "relay outbox",
        db.system.name = "postgresql",
        db.collection.name = "outbox",
    )
)]
async fn relay_once(
    pool: &PgPool,
    bus: &dyn rapport_bus::EventBus,
    lock_id: i64,
) -> Result<usize, RelayError> {
    let mut transaction = pool.begin().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(lock_id)
        .fetch_one(&mut *transaction)
        .await?;
    if !locked {
        return Ok(0);
    }
    let rows = sqlx::query(
        "SELECT id, topic, record_key, payload, headers FROM outbox ORDER BY id LIMIT $1",
    )
    .bind(BATCH)
    .fetch_all(&mut *transaction)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut records = Vec::with_capacity(rows.len());
    for row in rows {
        ids.push(row.try_get::<i64, _>("id")?);
        let headers: serde_json::Value = row.try_get("headers")?;
        records.push(Record {
            topic: row.try_get("topic")?,
            key: row.try_get("record_key")?,
            payload: row.try_get("payload")?,
            headers: serde_json::from_value(headers).unwrap_or_default(),
        });
    }
    let published = records.len();
    bus.publish_batch(records).await?;
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&mut *transaction)
        .await?;
    transaction.commit().await?;
    Ok(published)
}
