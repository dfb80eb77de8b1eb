//! Turns what recipients did (opens, clicks, unsubscribes, as ingestion
//! recorded them) into message lifecycle events, and unsubscribes into
//! suppressions. Each ingestion event is handled once (`processed_events`,
//! keyed by the ingestion message id).

use async_trait::async_trait;
use rapport_bus::{Delivery, Handler, HandlerError, envelope, topics};
use rapport_core::json::struct_to_json;
use rapport_core::{ErrorCode, WorkspaceId};
use rapport_db::outbox::{self, OutboxWaker};
use rapport_proto::events::v1::ConsentRequested;
use rapport_proto::events::v1::MessageEvent;
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
            _ => return Ok(()),
        };
        let status = match event.kind() {
            Kind::EmailOpened => Status::Opened,
            // Following a confirmation link is a click on that message.
            Kind::LinkClicked | Kind::OptInConfirmed => Status::Clicked,
            Kind::Unsubscribed => Status::Unsubscribed,
            _ => return Ok(()),
        };
        let workspace: uuid::Uuid = incoming
            .workspace_id
            .parse()
            .map_err(|_| HandlerError::Permanent("workspace_id is not a UUID".into()))?;
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
    async fn confirm(
        &self,
        workspace: &str,
        requested: &ConsentRequested,
    ) -> Result<(), HandlerError> {
        let workspace: WorkspaceId = workspace
            .parse()
            .map_err(|_| HandlerError::Permanent("workspace_id is not a UUID".into()))?;
        match self.sender.send_confirmation(workspace, requested).await {
            Ok(_) => Ok(()),
            Err(error) if error.code.is_retryable() || error.code == ErrorCode::Internal => {
                Err(HandlerError::Retryable(error.message))
            }
            // No such template, or nothing to send to: the dead-letter topic
            // keeps the request and its reason.
            Err(error) => Err(HandlerError::Permanent(error.message)),
        }
    }
}
