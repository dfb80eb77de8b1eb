//! GDPR: erasure (everything this service holds about a person is deleted,
//! and an erasure event tells every other service to do the same) and
//! access (everything this service holds, in one answer).

use rapport_core::time::to_timestamp;
use rapport_core::{ApiError, WorkspaceId};
use rapport_db::map_db_error;
use rapport_db::outbox;
use rapport_proto::contacts::v1::{ConsentChange, ExportContactResponse, StageChange};
use rapport_proto::events::v1::ContactChanged;
use rapport_proto::events::v1::contact_changed::ChangeType;
use uuid::Uuid;

use crate::consent::status_from_text;
use crate::store::{Store, event_record};

/// More than any one person has; an export holds at most this many of each.
const EXPORT_LIMIT: i64 = 100_000;

impl Store {
    /// Erases a contact and the contacts merged into it. Erasing an id
    /// already erased succeeds and changes nothing.
    pub async fn erase(&self, workspace: WorkspaceId, contact_id: Uuid) -> Result<(), ApiError> {
        let mut transaction = self.pool().begin().await.map_err(map_db_error)?;
        let already: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM erased_contacts WHERE workspace_id = $1 AND contact_id = $2)",
        )
        .bind(workspace.0)
        .bind(contact_id)
        .fetch_one(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        if already {
            return Ok(());
        }
        let contact_id = Store::resolve_id(&mut *transaction, workspace, contact_id).await?;
        let exists: Option<Uuid> = sqlx::query_scalar(
            "SELECT contact_id FROM contacts WHERE workspace_id = $1 AND contact_id = $2 FOR UPDATE",
        )
        .bind(workspace.0)
        .bind(contact_id)
        .fetch_optional(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        if exists.is_none() {
            // Erased by a concurrent call a moment ago: done as well.
            let erased: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM erased_contacts WHERE workspace_id = $1 AND contact_id = $2)",
            )
            .bind(workspace.0)
            .bind(contact_id)
            .fetch_one(&mut *transaction)
            .await
            .map_err(map_db_error)?;
            if erased {
                return Ok(());
            }
            return Err(ApiError::not_found(format!("contact {contact_id}")));
        }
        let merged: Vec<Uuid> = sqlx::query_scalar(
            "DELETE FROM merged_contacts WHERE workspace_id = $1 AND survivor_id = $2 RETURNING merged_id",
        )
        .bind(workspace.0)
        .bind(contact_id)
        .fetch_all(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        // The merged-away ids too: a row written for one of them while the
        // merge committed would otherwise stay behind.
        let mut erased = merged.clone();
        erased.push(contact_id);
        for table in [
            "identities",
            "notes",
            "stage_changes",
            "consent_changes",
            "score_changes",
            "orders",
            "timeline",
            "field_times",
            "contacts",
        ] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE workspace_id = $1 AND contact_id = ANY($2)"
            )))
            .bind(workspace.0)
            .bind(&erased)
            .execute(&mut *transaction)
            .await
            .map_err(map_db_error)?;
        }
        sqlx::query(
            "UPDATE deals SET contact_id = NULL WHERE workspace_id = $1 AND contact_id = ANY($2)",
        )
        .bind(workspace.0)
        .bind(&erased)
        .execute(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        sqlx::query(
            "INSERT INTO erased_contacts (workspace_id, contact_id) SELECT $1, * FROM UNNEST($2::uuid[])
             ON CONFLICT DO NOTHING",
        )
        .bind(workspace.0)
        .bind(&erased)
        .execute(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        outbox::enqueue_many(
            &mut transaction,
            vec![event_record(
                workspace,
                ContactChanged {
                    contact_id: contact_id.to_string(),
                    change_type: ChangeType::Erased.into(),
                    merged_contact_ids: merged.iter().map(Uuid::to_string).collect(),
                    source: "api".into(),
                    ..Default::default()
                },
            )],
        )
        .await
        .map_err(map_db_error)?;
        transaction.commit().await.map_err(map_db_error)?;
        self.waker.wake();
        Ok(())
    }

    /// Everything held about one contact.
    pub async fn export(
        &self,
        workspace: WorkspaceId,
        contact_id: Uuid,
    ) -> Result<ExportContactResponse, ApiError> {
        let profile = self.profile(workspace, contact_id).await?;
        let id = profile.row.contact_id;
        let stage_changes = self
            .stage_changes(workspace, id, None, EXPORT_LIMIT)
            .await?
            .into_iter()
            .map(|row| StageChange {
                stage: row.stage,
                previous_stage: row.previous_stage,
                cause: row.cause,
                change_time: Some(to_timestamp(row.changed_at)),
            })
            .collect();
        let consent_rows: Vec<(
            String,
            String,
            String,
            String,
            chrono::DateTime<chrono::Utc>,
        )> = sqlx::query_as(
            "SELECT channel, status, previous_status, reason, changed_at FROM consent_changes
                 WHERE workspace_id = $1 AND contact_id = $2 ORDER BY changed_at DESC LIMIT $3",
        )
        .bind(workspace.0)
        .bind(id)
        .bind(EXPORT_LIMIT)
        .fetch_all(self.pool())
        .await
        .map_err(map_db_error)?;
        let score_changes = self
            .score_changes(workspace, id, None, EXPORT_LIMIT)
            .await?
            .iter()
            .map(|row| row.to_proto())
            .collect();
        let notes = self
            .notes(workspace, id, None, EXPORT_LIMIT)
            .await?
            .into_iter()
            .map(|(_, note)| note)
            .collect();
        let orders = self
            .orders(workspace, id, 0, EXPORT_LIMIT)
            .await?
            .iter()
            .map(|row| row.to_proto())
            .collect();
        let timeline = self
            .timeline(workspace, id, None, EXPORT_LIMIT)
            .await?
            .iter()
            .map(|row| row.to_proto())
            .collect();
        let merged: Vec<Uuid> = sqlx::query_scalar(
            "SELECT merged_id FROM merged_contacts WHERE workspace_id = $1 AND survivor_id = $2 ORDER BY merged_at",
        )
        .bind(workspace.0)
        .bind(id)
        .fetch_all(self.pool())
        .await
        .map_err(map_db_error)?;
        Ok(ExportContactResponse {
            contact: Some(profile.to_proto()),
            stage_changes,
            consent_changes: consent_rows
                .into_iter()
                .map(|(channel, status, previous, reason, at)| ConsentChange {
                    channel,
                    status: status_from_text(&status).into(),
                    previous_status: status_from_text(&previous).into(),
                    reason,
                    change_time: Some(to_timestamp(at)),
                })
                .collect(),
            score_changes,
            notes,
            orders,
            timeline,
            merged_contact_ids: merged.iter().map(Uuid::to_string).collect(),
        })
    }
}
