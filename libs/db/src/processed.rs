//! Idempotent consumers: a service records the id of each event it handled
//! in its own `processed_events (workspace_id UUID, event_id TEXT, PRIMARY
//! KEY (workspace_id, event_id))` table, in the same transaction as the
//! effects of handling it, so a redelivered event changes nothing.

use sqlx::{Postgres, Transaction};

/// Records `event_id` as handled; false when it already was.
pub async fn mark_processed(
    transaction: &mut Transaction<'_, Postgres>,
    workspace: uuid::Uuid,
    event_id: &str,
) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query(
        "INSERT INTO processed_events (workspace_id, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(workspace)
    .bind(event_id)
    .execute(&mut **transaction)
    .await?
    .rows_affected()
        == 1)
}
