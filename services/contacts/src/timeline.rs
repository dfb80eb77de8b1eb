//! The timeline: one stream per contact of everything known about them.
//! Entry ids are UUIDv7 made from the time the thing happened, so ordering
//! by id orders by time, and paging by id is stable.

use chrono::{DateTime, Utc};
use rapport_core::json::json_to_struct;
use rapport_core::time::to_timestamp;
use rapport_core::{ApiError, WorkspaceId};
use rapport_db::map_db_error;
use rapport_proto::contacts::v1::{TimelineEntry, TimelineKind};
use sqlx::{FromRow, Postgres, Transaction};
use uuid::Uuid;

use crate::store::Store;

/// An entry about to be written.
#[derive(Debug, Clone)]
pub struct Entry {
    pub contact_id: Uuid,
    pub kind: &'static str,
    pub summary: String,
    pub details: serde_json::Value,
    /// When it happened; the time of the write when None.
    pub occurred_at: Option<DateTime<Utc>>,
}

impl Entry {
    fn new(
        contact_id: Uuid,
        kind: &'static str,
        summary: String,
        details: serde_json::Value,
    ) -> Self {
        Entry {
            contact_id,
            kind,
            summary,
            details,
            occurred_at: None,
        }
    }

    pub fn at(mut self, occurred_at: DateTime<Utc>) -> Self {
        self.occurred_at = Some(occurred_at);
        self
    }

    /// A new contact, and the stage it starts in (empty when anonymous).
    pub fn created(contact_id: Uuid, source: &str, stage: &str) -> Self {
        let summary = if stage.is_empty() {
            format!("Created (source: {source})")
        } else {
            format!("Created as {stage} (source: {source})")
        };
        Entry::new(
            contact_id,
            "created",
            summary,
            serde_json::json!({ "source": source, "stage": stage }),
        )
    }

    pub fn fields(contact_id: Uuid, changed: &[String], source: &str) -> Self {
        Entry::new(
            contact_id,
            "fields_changed",
            format!("Changed {}", changed.join(", ")),
            serde_json::json!({ "fields": changed, "source": source }),
        )
    }

    pub fn stage(contact_id: Uuid, previous: &str, stage: &str, cause: &str) -> Self {
        let summary = if previous.is_empty() {
            format!("Stage {stage}")
        } else {
            format!("Stage {previous} → {stage}")
        };
        Entry::new(
            contact_id,
            "stage_changed",
            summary,
            serde_json::json!({ "stage": stage, "previous_stage": previous, "cause": cause }),
        )
    }

    pub fn consent(contact_id: Uuid, channel: &str, status: &str, reason: &str) -> Self {
        Entry::new(
            contact_id,
            "consent_changed",
            format!("{channel} consent {status} ({reason})"),
            serde_json::json!({ "channel": channel, "status": status, "reason": reason }),
        )
    }

    pub fn merged(contact_id: Uuid, merged: &[Uuid]) -> Self {
        let ids: Vec<String> = merged.iter().map(Uuid::to_string).collect();
        Entry::new(
            contact_id,
            "merged",
            format!("Merged {}", ids.join(", ")),
            serde_json::json!({ "merged_contact_ids": ids }),
        )
    }

    pub fn note(contact_id: Uuid, note_id: Uuid, kind: &str, author: &str) -> Self {
        Entry::new(
            contact_id,
            "note",
            format!("Note ({kind}) by {author}"),
            serde_json::json!({ "note_id": note_id.to_string(), "type": kind, "author": author }),
        )
    }

    pub fn order(contact_id: Uuid, order_id: &str, currency: &str, total_micros: i64) -> Self {
        Entry::new(
            contact_id,
            "order",
            format!(
                "Order {order_id}: {} {currency}",
                format_micros(total_micros)
            ),
            serde_json::json!({
                "order_id": order_id,
                "currency_code": currency,
                "total_micros": total_micros,
            }),
        )
    }

    pub fn score(contact_id: Uuid, delta: i64, score: i64, reason: &str) -> Self {
        Entry::new(
            contact_id,
            "score_changed",
            format!("Score {delta:+} → {score} ({reason})"),
            serde_json::json!({ "delta": delta, "score": score, "reason": reason }),
        )
    }

    pub fn event(contact_id: Uuid, summary: String, details: serde_json::Value) -> Self {
        Entry::new(contact_id, "event", summary, details)
    }

    pub fn message(contact_id: Uuid, summary: String, details: serde_json::Value) -> Self {
        Entry::new(contact_id, "message", summary, details)
    }
}

fn format_micros(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let micros = micros.unsigned_abs();
    format!(
        "{sign}{}.{:02}",
        micros / 1_000_000,
        (micros % 1_000_000) / 10_000
    )
}

/// An id that sorts by `at`.
fn entry_id(at: DateTime<Utc>) -> Uuid {
    let seconds = u64::try_from(at.timestamp()).unwrap_or(0);
    Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        seconds,
        at.timestamp_subsec_nanos(),
    ))
}

/// Writes `entries` in one statement.
pub async fn insert(
    transaction: &mut Transaction<'_, Postgres>,
    workspace: WorkspaceId,
    entries: &[Entry],
) -> Result<(), ApiError> {
    if entries.is_empty() {
        return Ok(());
    }
    let now = Utc::now();
    let mut contacts = Vec::with_capacity(entries.len());
    let mut ids = Vec::with_capacity(entries.len());
    let mut kinds = Vec::with_capacity(entries.len());
    let mut times = Vec::with_capacity(entries.len());
    let mut summaries = Vec::with_capacity(entries.len());
    let mut details = Vec::with_capacity(entries.len());
    for entry in entries {
        let at = entry.occurred_at.unwrap_or(now);
        contacts.push(entry.contact_id);
        ids.push(entry_id(at));
        kinds.push(entry.kind);
        times.push(at);
        summaries.push(entry.summary.as_str());
        details.push(entry.details.clone());
    }
    sqlx::query(
        "INSERT INTO timeline (workspace_id, contact_id, entry_id, kind, occurred_at, summary, details)
         SELECT $1, * FROM UNNEST($2::uuid[], $3::uuid[], $4::text[], $5::timestamptz[], $6::text[], $7::jsonb[])",
    )
    .bind(workspace.0)
    .bind(&contacts)
    .bind(&ids)
    .bind(&kinds)
    .bind(&times)
    .bind(&summaries)
    .bind(&details)
    .execute(&mut **transaction)
    .await
    .map_err(map_db_error)?;
    Ok(())
}

#[derive(Debug, Clone, FromRow)]
pub struct EntryRow {
    pub entry_id: Uuid,
    pub kind: String,
    pub occurred_at: DateTime<Utc>,
    pub summary: String,
    pub details: serde_json::Value,
}

impl EntryRow {
    pub fn to_proto(&self) -> TimelineEntry {
        TimelineEntry {
            entry_id: self.entry_id.to_string(),
            kind: kind_of(&self.kind).into(),
            occur_time: Some(to_timestamp(self.occurred_at)),
            summary: self.summary.clone(),
            details: Some(json_to_struct(&self.details)),
        }
    }
}

fn kind_of(kind: &str) -> TimelineKind {
    match kind {
        "created" => TimelineKind::Created,
        "fields_changed" => TimelineKind::FieldsChanged,
        "stage_changed" => TimelineKind::StageChanged,
        "consent_changed" => TimelineKind::ConsentChanged,
        "event" => TimelineKind::Event,
        "message" => TimelineKind::Message,
        "note" => TimelineKind::Note,
        "order" => TimelineKind::Order,
        "score_changed" => TimelineKind::ScoreChanged,
        "merged" => TimelineKind::Merged,
        _ => TimelineKind::Unspecified,
    }
}

impl Store {
    /// A contact's timeline, newest first.
    pub async fn timeline(
        &self,
        workspace: WorkspaceId,
        contact_id: Uuid,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<EntryRow>, ApiError> {
        let contact_id = self.get(workspace, contact_id).await?.contact_id;
        sqlx::query_as::<_, EntryRow>(
            "SELECT entry_id, kind, occurred_at, summary, details FROM timeline
             WHERE workspace_id = $1 AND contact_id = $2 AND ($3::uuid IS NULL OR entry_id < $3)
             ORDER BY entry_id DESC LIMIT $4",
        )
        .bind(workspace.0)
        .bind(contact_id)
        .bind(before)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(map_db_error)
    }

    /// Adds entries about contacts, outside any other write (events and
    /// messages as they arrive).
    pub async fn add_entries(
        &self,
        workspace: WorkspaceId,
        entries: &[Entry],
    ) -> Result<(), ApiError> {
        let mut transaction = self.pool().begin().await.map_err(map_db_error)?;
        insert(&mut transaction, workspace, entries).await?;
        transaction.commit().await.map_err(map_db_error)
    }
}
