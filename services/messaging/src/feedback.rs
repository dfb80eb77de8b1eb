//! Turns what recipients did (opens, clicks, unsubscribes, as ingestion
//! recorded them) into message lifecycle events, and unsubscribes into
//! suppressions. Each ingestion event is handled once (`processed_events`,
//! keyed by the ingestion message id).
//!
//! From contact changes it takes double opt-in requests (it sends the
//! confirmation), erasures (it blanks the contact's address in `sends`) and
//! merges (it moves the merged ids' suppressions and sends to the survivor);
//! see `FeedbackHandler::contact_changed`.

use async_trait::async_trait;
use rapport_bus::{Delivery, Handler, HandlerError, envelope, topics};
use rapport_core::json::struct_to_json;
use rapport_db::outbox::{self, OutboxWaker};
use rapport_proto::events::v1::ConsentRequested;
use rapport_proto::events::v1::ContactChanged;
use rapport_proto::events::v1::MessageEvent;
use rapport_proto::events::v1::contact_changed::ChangeType;
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::ingested_event::Kind;
use rapport_proto::events::v1::message_event::{Channel, Status};
use sqlx::PgPool;
use std::sync::Arc;

use crate::send::Sender;

pub struct FeedbackHandler {
    pub pool: PgPool,
    pub waker: OutboxWaker,
    pub sender: Arc<Sender>,
}

#[async_trait]
impl Handler for FeedbackHandler {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let incoming = envelope::decode(&delivery.record)?;
        let event = match &incoming.payload {
            Some(Payload::IngestedEvent(event)) => event,
            Some(Payload::ConsentRequested(requested)) => {
                return self.confirm(&incoming.workspace_id, requested).await;
            }
            Some(Payload::ContactChanged(change)) => {
                return self
                    .contact_changed(&incoming.workspace_id, &incoming.event_id, change)
                    .await;
            }
            _ => return Ok(()),
        };
        let status = match event.kind() {
            Kind::EmailOpened => Status::Opened,
            // Following a confirmation link is a click on that message.
            Kind::LinkClicked | Kind::OptInConfirmed => Status::Clicked,
            Kind::Unsubscribed => Status::Unsubscribed,
            _ => return Ok(()),
        };
        let workspace = envelope::workspace(&incoming)?.0;
        let properties = event
            .properties
            .as_ref()
            .map(struct_to_json)
            .unwrap_or_default();
        let Some(message_id) = properties
            .get("message_id")
            .and_then(|v| v.as_str())
            .and_then(|v| v.parse::<uuid::Uuid>().ok())
        else {
            return Err(HandlerError::Permanent(
                "tracking event without a message_id".into(),
            ));
        };
        let url = properties
            .get("url")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();

        let retryable = |error: sqlx::Error| HandlerError::Retryable(error.to_string());
        let mut transaction = self.pool.begin().await.map_err(retryable)?;
        // The ingestion message id: a republished event has a new envelope
        // event id but the same message id.
        let event_id = if event.message_id.is_empty() {
            &incoming.event_id
        } else {
            &event.message_id
        };
        let first_time =
            rapport_db::processed::mark_processed(&mut transaction, workspace, event_id)
                .await
                .map_err(retryable)?;
        if !first_time {
            return Ok(());
        }
        let send: Option<(String, uuid::Uuid, String)> = sqlx::query_as(
            "SELECT contact_id, template_id, journey_id FROM sends WHERE workspace_id = $1 AND message_id = $2",
        )
        .bind(workspace)
        .bind(message_id)
        .fetch_optional(&mut *transaction)
        .await
        .map_err(retryable)?;
        let Some((contact_id, template_id, journey_id)) = send else {
            return Err(HandlerError::Permanent(format!(
                "no message {message_id} in this workspace"
            )));
        };
        if status == Status::Unsubscribed {
            sqlx::query(
                "INSERT INTO suppressions (workspace_id, contact_id, channel, reason) VALUES ($1, $2, 'email', 'unsubscribed')
                 ON CONFLICT DO NOTHING",
            )
            .bind(workspace)
            .bind(&contact_id)
            .execute(&mut *transaction)
            .await
            .map_err(retryable)?;
        }
        if event.kind() == Kind::OptInConfirmed {
            // They asked to come back and proved it is them.
            sqlx::query(
                "DELETE FROM suppressions WHERE workspace_id = $1 AND contact_id = $2 AND channel = 'email' AND reason = 'unsubscribed'",
            )
            .bind(workspace)
            .bind(&contact_id)
            .execute(&mut *transaction)
            .await
            .map_err(retryable)?;
        }
        let lifecycle = MessageEvent {
            message_id: message_id.to_string(),
            contact_id: contact_id.clone(),
            channel: Channel::Email.into(),
            status: status.into(),
            template_id: template_id.to_string(),
            journey_id,
            url,
            reason: String::new(),
        };
        let outgoing = envelope::new_envelope(
            &incoming.workspace_id,
            "messaging",
            Payload::MessageEvent(lifecycle),
        );
        outbox::enqueue(
            &mut transaction,
            &envelope::to_record(topics::MESSAGE_LIFECYCLE, &contact_id, &outgoing),
        )
        .await
        .map_err(retryable)?;
        transaction.commit().await.map_err(retryable)?;
        self.waker.wake();
        Ok(())
    }
}

impl FeedbackHandler {
    /// Applies an erasure or a merge, in one transaction, once per event
    /// (`processed_events`, keyed by the envelope's event id; both changes
    /// are idempotent anyway). Other contact changes are ignored.
    ///
    /// - `CHANGE_TYPE_ERASED`: the recipient address of every message sent
    ///   to the contact is blanked in `sends` (`recipient = ''`): that column
    ///   is the only place messaging keeps a person's address, and it keeps
    ///   no names. The rows stay, holding only ids, so late opens and clicks
    ///   still resolve. The contact's suppressions stay as well: they hold
    ///   only the contact id, and go on stopping sends to it.
    /// - `CHANGE_TYPE_MERGED`: each merged id's suppressions move to the
    ///   survivor (a row the survivor already has for the channel wins, then
    ///   the oldest), so an unsubscribe survives the merge; and its `sends`
    ///   rows are re-pointed to the survivor, so an unsubscribe through the
    ///   link of a message sent before the merge suppresses the survivor, and
    ///   a later erasure of the survivor blanks those addresses too.
    async fn contact_changed(
        &self,
        workspace: &str,
        event_id: &str,
        change: &ContactChanged,
    ) -> Result<(), HandlerError> {
        let change_type = change.change_type();
        if !matches!(change_type, ChangeType::Erased | ChangeType::Merged) {
            return Ok(());
        }
        if change.contact_id.is_empty() {
            return Err(HandlerError::Permanent(
                "contact change without a contact_id".into(),
            ));
        }
        let workspace = envelope::parse_workspace(workspace)?.0;
        let merged: Vec<String> = change
            .merged_contact_ids
            .iter()
            .filter(|id| !id.is_empty() && **id != change.contact_id)
            .cloned()
            .collect();
        let retryable = |error: sqlx::Error| HandlerError::Retryable(error.to_string());
        let mut transaction = self.pool.begin().await.map_err(retryable)?;
        let first_time =
            rapport_db::processed::mark_processed(&mut transaction, workspace, event_id)
                .await
                .map_err(retryable)?;
        if !first_time {
            return Ok(());
        }
        if change_type == ChangeType::Erased {
            sqlx::query(
                "UPDATE sends SET recipient = '' WHERE workspace_id = $1 AND contact_id = $2 AND recipient <> ''",
            )
            .bind(workspace)
            .bind(&change.contact_id)
            .execute(&mut *transaction)
            .await
            .map_err(retryable)?;
        } else if !merged.is_empty() {
            sqlx::query(
                "INSERT INTO suppressions (workspace_id, contact_id, channel, reason, created_at)
                 SELECT workspace_id, $2::text, channel, reason, created_at FROM suppressions
                 WHERE workspace_id = $1 AND contact_id = ANY($3)
                 ORDER BY created_at
                 ON CONFLICT DO NOTHING",
            )
            .bind(workspace)
            .bind(&change.contact_id)
            .bind(&merged)
            .execute(&mut *transaction)
            .await
            .map_err(retryable)?;
            sqlx::query(
                "DELETE FROM suppressions WHERE workspace_id = $1 AND contact_id = ANY($2)",
            )
            .bind(workspace)
            .bind(&merged)
            .execute(&mut *transaction)
            .await
            .map_err(retryable)?;
            sqlx::query(
                "UPDATE sends SET contact_id = $2 WHERE workspace_id = $1 AND contact_id = ANY($3)",
            )
            .bind(workspace)
            .bind(&change.contact_id)
            .bind(&merged)
            .execute(&mut *transaction)
            .await
            .map_err(retryable)?;
        }
        transaction.commit().await.map_err(retryable)
    }

    async fn confirm(
        &self,
        workspace: &str,
        requested: &ConsentRequested,
    ) -> Result<(), HandlerError> {
        let workspace = envelope::parse_workspace(workspace)?;
        // No such template, or nothing to send to, is dead-lettered: the
        // dead-letter topic keeps the request and its reason.
        self.sender
            .send_confirmation(workspace, requested)
            .await
            .map(|_| ())
            .map_err(HandlerError::from)
    }
}
