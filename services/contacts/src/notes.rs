//! Interaction notes: support tickets, sales calls, objections.

use chrono::{DateTime, Utc};
use rapport_core::time::{from_timestamp, to_timestamp};
use rapport_core::{ApiError, FieldViolation, WorkspaceId};
use rapport_db::map_db_error;
use rapport_proto::contacts::v1::{Note, NoteType};
use sqlx::FromRow;
use uuid::Uuid;

use crate::store::Store;

const MAX_BODY_CHARS: usize = 10_000;
const MAX_AUTHOR_CHARS: usize = 200;

fn type_text(kind: NoteType) -> &'static str {
    match kind {
        NoteType::Unspecified => "unspecified",
        NoteType::SupportTicket => "support_ticket",
        NoteType::SalesCall => "sales_call",
        NoteType::Objection => "objection",
        NoteType::Meeting => "meeting",
        NoteType::Other => "other",
    }
}

fn type_from_text(text: &str) -> NoteType {
    match text {
        "support_ticket" => NoteType::SupportTicket,
        "sales_call" => NoteType::SalesCall,
        "objection" => NoteType::Objection,
        "meeting" => NoteType::Meeting,
        "other" => NoteType::Other,
        _ => NoteType::Unspecified,
    }
}

/// A note ready to store.
pub struct NewNote {
    pub contact_id: Uuid,
    pub kind: NoteType,
    pub body: String,
    pub author: String,
    pub occurred_at: Option<DateTime<Utc>>,
}

/// Checks a note from a client, collecting every bad field.
pub fn check(note: Option<&Note>) -> Result<NewNote, ApiError> {
    let Some(note) = note else {
        return Err(ApiError::invalid_field("note", "is required"));
    };
    let mut violations = Vec::new();
    let mut violation = |field: &str, description: &str| {
        violations.push(FieldViolation {
            field: field.into(),
            description: description.into(),
        })
    };
    let contact_id = note.contact_id.trim().parse::<Uuid>().ok();
    if contact_id.is_none() {
        violation("note.contact_id", "must be a contact id");
    }
    let kind = NoteType::try_from(note.r#type).unwrap_or(NoteType::Unspecified);
    if kind == NoteType::Unspecified {
        violation("note.type", "is required");
    }
    let body = note.body.trim();
    if body.is_empty() || body.chars().count() > MAX_BODY_CHARS {
        violation("note.body", "must be 1 to 10000 characters");
    }
    let author = note.author.trim();
    if author.is_empty() || author.chars().count() > MAX_AUTHOR_CHARS {
        violation("note.author", "must be 1 to 200 characters");
    }
    let occurred_at = match &note.occur_time {
        None => None,
        Some(time) => {
            let parsed = from_timestamp(time);
            if parsed.is_none() {
                violation("note.occur_time", "is not a valid time");
            }
            parsed
        }
    };
    match contact_id {
        Some(contact_id) if violations.is_empty() => Ok(NewNote {
            contact_id,
            kind,
            body: body.to_owned(),
            author: author.to_owned(),
            occurred_at,
        }),
        _ => Err(ApiError::invalid_fields(violations)),
    }
}

#[derive(FromRow)]
struct NoteRow {
    note_id: Uuid,
    contact_id: Uuid,
    note_type: String,
    body: String,
    author: String,
    occurred_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
}

impl NoteRow {
    fn to_proto(&self) -> Note {
        Note {
            note_id: self.note_id.to_string(),
            contact_id: self.contact_id.to_string(),
            r#type: type_from_text(&self.note_type).into(),
            body: self.body.clone(),
            author: self.author.clone(),
            occur_time: Some(to_timestamp(self.occurred_at)),
            create_time: Some(to_timestamp(self.created_at)),
        }
    }
}

const COLUMNS: &str = "note_id, contact_id, note_type, body, author, occurred_at, created_at";

impl Store {
    /// Adds a note to a contact of the workspace (NOT_FOUND otherwise). A
    /// repeated `request_id` returns the note it first added.
    pub async fn add_note(
        &self,
        workspace: WorkspaceId,
        request_id: Option<&str>,
        note: NewNote,
    ) -> Result<Note, ApiError> {
        let contact_id = self.get(workspace, note.contact_id).await?.contact_id;
        let mut transaction = self.pool().begin().await.map_err(map_db_error)?;
        let inserted = sqlx::query_as::<_, NoteRow>(sqlx::AssertSqlSafe(format!(
            "INSERT INTO notes (workspace_id, contact_id, note_id, note_type, body, author, occurred_at, request_id)
             VALUES ($1, $2, $3, $4, $5, $6, COALESCE($7, now()), $8)
             ON CONFLICT (workspace_id, request_id) DO NOTHING
             RETURNING {COLUMNS}"
        )))
        .bind(workspace.0)
        .bind(contact_id)
        .bind(rapport_core::ids::new_id())
        .bind(type_text(note.kind))
        .bind(&note.body)
        .bind(&note.author)
        .bind(note.occurred_at)
        .bind(request_id)
        .fetch_optional(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        if let Some(row) = inserted {
            crate::timeline::insert(
                &mut transaction,
                workspace,
                &[crate::timeline::Entry::note(
                    contact_id,
                    row.note_id,
                    type_text(note.kind),
                    &note.author,
                )
                .at(row.occurred_at)],
            )
            .await?;
            transaction.commit().await.map_err(map_db_error)?;
            return Ok(row.to_proto());
        }
        transaction.rollback().await.map_err(map_db_error)?;
        sqlx::query_as::<_, NoteRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM notes WHERE workspace_id = $1 AND request_id = $2"
        )))
        .bind(workspace.0)
        .bind(request_id)
        .fetch_one(self.pool())
        .await
        .map(|row| row.to_proto())
        .map_err(map_db_error)
    }

    /// A contact's notes, newest first (NOT_FOUND for another workspace's
    /// contact).
    pub async fn notes(
        &self,
        workspace: WorkspaceId,
        contact_id: Uuid,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<(Uuid, Note)>, ApiError> {
        let contact_id = self.get(workspace, contact_id).await?.contact_id;
        let rows = sqlx::query_as::<_, NoteRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM notes
             WHERE workspace_id = $1 AND contact_id = $2 AND ($3::uuid IS NULL OR note_id < $3)
             ORDER BY note_id DESC LIMIT $4"
        )))
        .bind(workspace.0)
        .bind(contact_id)
        .bind(before)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(map_db_error)?;
        Ok(rows
            .iter()
            .map(|row| (row.note_id, row.to_proto()))
            .collect())
    }
}
