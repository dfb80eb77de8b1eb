//! Erasures and merges of contacts, consumed from
//! `rapport.contacts.changes.v1` as group `rapport-automation-contacts`.
//! Other changes are ignored.
//!
//! - `CHANGE_TYPE_ERASED`: every run of the contact, whatever its status, is
//!   deleted (a run holds the contact id, the journey it is in and the trace
//!   of its enrolment), so nothing more is sent to them.
//! - `CHANGE_TYPE_MERGED`: the active runs of each merged id are set to
//!   `cancelled` and are never due again, so a merged-away contact receives
//!   nothing further. The rows stay, so the merged id is never enrolled in
//!   those journeys again. The survivor's runs are left as they are.
//!
//! Each active run stopped this way gets a `JourneyStepEvent` `STATUS_EXITED`
//! in the same transaction. Both changes are idempotent without a dedupe
//! table: a redelivered record finds no run left to delete and no active run
//! left to cancel, and so writes nothing. A run whose step is executing holds
//! its row lock, so the change waits for that step to commit and the run
//! stops before its next step.

use async_trait::async_trait;
use rapport_bus::{Delivery, Handler, HandlerError, envelope};
use rapport_db::outbox::OutboxWaker;
use rapport_proto::events::v1::JourneyStepEvent;
use rapport_proto::events::v1::contact_changed::ChangeType;
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::journey_step_event::Status as StepStatus;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::runner::step_event;

/// Stops the runs of erased and merged-away contacts.
pub struct ContactChangeHandler {
    pub pool: PgPool,
    pub waker: OutboxWaker,
}

/// A run deleted or cancelled, as it was before.
#[derive(sqlx::FromRow)]
struct StoppedRun {
    run_id: Uuid,
    journey_id: Uuid,
    journey_version: i32,
    contact_id: String,
    /// Whether it was still active (only those get an exit event).
    was_active: bool,
}

/// Deletes every run of `contact_id`.
async fn delete_runs(
    transaction: &mut Transaction<'_, Postgres>,
    workspace: Uuid,
    contact_id: &str,
) -> Result<Vec<StoppedRun>, sqlx::Error> {
    sqlx::query_as::<_, StoppedRun>(
        "DELETE FROM runs WHERE workspace_id = $1 AND contact_id = $2
         RETURNING run_id, journey_id, journey_version, contact_id, status = 'active' AS was_active",
    )
    .bind(workspace)
    .bind(contact_id)
    .fetch_all(&mut **transaction)
    .await
}

/// Cancels the active runs of `contact_ids`.
async fn cancel_runs(
    transaction: &mut Transaction<'_, Postgres>,
    workspace: Uuid,
    contact_ids: &[String],
) -> Result<Vec<StoppedRun>, sqlx::Error> {
    if contact_ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_as::<_, StoppedRun>(
        "UPDATE runs SET status = 'cancelled', due_at = NULL, updated_at = now()
         WHERE workspace_id = $1 AND contact_id = ANY($2) AND status = 'active'
         RETURNING run_id, journey_id, journey_version, contact_id, true AS was_active",
    )
    .bind(workspace)
    .bind(contact_ids)
    .fetch_all(&mut **transaction)
    .await
}

#[async_trait]
impl Handler for ContactChangeHandler {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let incoming = envelope::decode(&delivery.record)?;
        let Some(Payload::ContactChanged(change)) = &incoming.payload else {
            return Ok(());
        };
        let change_type = change.change_type();
        if !matches!(change_type, ChangeType::Erased | ChangeType::Merged) {
            return Ok(());
        }
        if change.contact_id.is_empty() {
            return Err(HandlerError::Permanent(
                "contact change without a contact_id".into(),
            ));
        }
        let workspace = envelope::workspace(&incoming)?.0;
        let retryable = |error: sqlx::Error| HandlerError::Retryable(error.to_string());
        let mut transaction = self.pool.begin().await.map_err(retryable)?;
        let (stopped, detail) = if change_type == ChangeType::Erased {
            let stopped = delete_runs(&mut transaction, workspace, &change.contact_id)
                .await
                .map_err(retryable)?;
            (stopped, "contact erased".to_owned())
        } else {
            let merged: Vec<String> = change
                .merged_contact_ids
                .iter()
                .filter(|id| !id.is_empty() && **id != change.contact_id)
                .cloned()
                .collect();
            let stopped = cancel_runs(&mut transaction, workspace, &merged)
                .await
                .map_err(retryable)?;
            (
                stopped,
                format!("contact merged into {}", change.contact_id),
            )
        };
        let mut exited = 0;
        for run in stopped.into_iter().filter(|run| run.was_active) {
            exited += 1;
            step_event(
                &mut transaction,
                workspace,
                JourneyStepEvent {
                    journey_id: run.journey_id.to_string(),
                    journey_version: run.journey_version,
                    run_id: run.run_id.to_string(),
                    contact_id: run.contact_id,
                    status: StepStatus::Exited.into(),
                    detail: detail.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(retryable)?;
        }
        transaction.commit().await.map_err(retryable)?;
        if exited > 0 {
            self.waker.wake();
        }
        Ok(())
    }
}
