//! Sending one message: idempotent on the caller's key, suppressed contacts
//! skipped, rendered with Liquid, tracked, delivered over SMTP, and recorded
//! with its `sent` event in one transaction.
//!
//! A transaction-scoped advisory lock on (workspace, idempotency key) is held
//! while the mail server is talked to, so two calls with one key never both
//! deliver. The API runs each send on a task of its own, so a caller that
//! disconnects mid-send does not abandon it before the commit. If the
//! messaging process itself dies after the mail server accepted the message
//! but before the commit, a retry delivers it again: that window is the time
//! of one SMTP acknowledgement.

use std::sync::Arc;

use prost::Message as _;
use rapport_bus::{envelope, topics};
use rapport_core::json::struct_to_json;
use rapport_core::signing::{Signer, TrackingKind, TrackingToken};
use rapport_core::{ApiError, ErrorCode, FieldViolation, WorkspaceId};
use rapport_db::definitions::Definitions;
use rapport_db::map_db_error;
use rapport_db::outbox::{self, OutboxWaker};
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::message_event::{Channel as EventChannel, Status as EventStatus};
use rapport_proto::events::v1::{ConsentRequested, MessageEvent};
use rapport_proto::messaging::v1::send_message_response::Status as SendStatus;
use rapport_proto::messaging::v1::{Channel, SendMessageRequest, SendMessageResponse, Template};
use sqlx::PgPool;

use crate::render;
use crate::smtp::{Email, Mailer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// Journeys and API sends: never to suppressed contacts.
    Marketing,
    /// A double opt-in confirmation.
    Confirmation,
}

pub struct Sender {
    pub pool: PgPool,
    pub templates: Definitions,
    pub mailer: Arc<Mailer>,
    pub signer: Signer,
    pub public_url: String,
    pub waker: OutboxWaker,
}

fn validate(request: &SendMessageRequest) -> Result<(), ApiError> {
    let mut violations = Vec::new();
    let mut check = |field: &str, value: &str, max: usize| {
        if value.trim().is_empty() {
            violations.push(FieldViolation {
                field: field.into(),
                description: "is required".into(),
            });
        } else if value.len() > max {
            violations.push(FieldViolation {
                field: field.into(),
                description: format!("is longer than {max} characters"),
            });
        }
    };
    check("idempotency_key", &request.idempotency_key, 200);
    check("template", &request.template, 200);
    check("contact_id", &request.contact_id, 200);
    check("to_email", &request.to_email, 254);
    if !request.to_email.contains('@') && !request.to_email.trim().is_empty() {
        violations.push(FieldViolation {
            field: "to_email".into(),
            description: "is not an email address".into(),
        });
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid_fields(violations))
    }
}

impl Sender {
    fn link(&self, path: &str, token: &TrackingToken) -> String {
        format!(
            "{}/{path}/{}",
            self.public_url.trim_end_matches('/'),
            self.signer.sign(token)
        )
    }

    pub async fn send(
        &self,
        workspace: WorkspaceId,
        request: SendMessageRequest,
    ) -> Result<SendMessageResponse, ApiError> {
        self.send_as(workspace, request, Purpose::Marketing).await
    }

    /// Sends the confirmation a double opt-in form asked for, once per
    /// submission. It goes to people who unsubscribed before (they are asking
    /// to come back) but never to addresses that bounced or complained.
    pub async fn send_confirmation(
        &self,
        workspace: WorkspaceId,
        requested: &ConsentRequested,
    ) -> Result<SendMessageResponse, ApiError> {
        let request = SendMessageRequest {
            idempotency_key: format!("opt-in:{}", requested.request_id),
            template: requested.template.clone(),
            contact_id: requested.contact_id.clone(),
            to_email: requested.email.clone(),
            variables: Some(rapport_core::json::json_to_struct(&serde_json::json!({
                "contact": { "contact_id": requested.contact_id, "email": requested.email },
            }))),
            ..Default::default()
        };
        self.send_as(workspace, request, Purpose::Confirmation)
            .await
    }

    async fn send_as(
        &self,
        workspace: WorkspaceId,
        request: SendMessageRequest,
        purpose: Purpose,
    ) -> Result<SendMessageResponse, ApiError> {
        validate(&request)?;
        let Some(template_row) = self
            .templates
            .get_by_name(workspace, request.template.trim())
            .await?
        else {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("template `{}` not found", request.template.trim()),
            ));
        };
        let template = Template::decode(template_row.definition.as_slice())
            .map_err(|error| ApiError::internal(&error))?;
        if template.channel() != Channel::Email {
            return Err(ApiError::new(
                ErrorCode::FailedPrecondition,
                "only email templates can be sent so far",
            ));
        }
        let key = request.idempotency_key.trim().to_owned();
        let mut transaction = self.pool.begin().await.map_err(map_db_error)?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || ':' || $2, 0))")
            .bind(workspace.0.to_string())
            .bind(&key)
            .execute(&mut *transaction)
            .await
            .map_err(map_db_error)?;
        let previous: Option<(uuid::Uuid, String)> = sqlx::query_as(
            "SELECT message_id, status FROM sends WHERE workspace_id = $1 AND idempotency_key = $2",
        )
        .bind(workspace.0)
        .bind(&key)
        .fetch_optional(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        if let Some((message_id, status)) = previous {
            record_outcome("duplicate");
            return Ok(SendMessageResponse {
                message_id: message_id.to_string(),
                status: if status == "sent" {
                    SendStatus::Sent
                } else {
                    SendStatus::Suppressed
                }
                .into(),
                duplicate: true,
            });
        }

        let message_id = rapport_core::ids::new_id();
        let suppressed: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM suppressions WHERE workspace_id = $1 AND contact_id = $2 AND channel = 'email'
                 AND ($3 OR reason <> 'unsubscribed'))",
        )
        .bind(workspace.0)
        .bind(request.contact_id.trim())
        .bind(purpose == Purpose::Marketing)
        .fetch_one(&mut *transaction)
        .await
        .map_err(map_db_error)?;

        let status = if suppressed {
            SendStatus::Suppressed
        } else {
            let token = |kind: TrackingKind, url: &str| TrackingToken {
                kind,
                workspace_id: workspace.to_string(),
                message_id: message_id.to_string(),
                contact_id: request.contact_id.trim().to_owned(),
                url: url.to_owned(),
            };
            let unsubscribe_url = self.link("u", &token(TrackingKind::Unsubscribe, ""));
            let pixel_url = self.link("o", &token(TrackingKind::Open, ""));
            let mut variables = request
                .variables
                .as_ref()
                .map(struct_to_json)
                .unwrap_or_else(|| serde_json::json!({}));
            if let Some(object) = variables.as_object_mut() {
                object.insert(
                    "unsubscribe_url".into(),
                    serde_json::Value::String(unsubscribe_url.clone()),
                );
                if purpose == Purpose::Confirmation {
                    object.insert(
                        "confirm_url".into(),
                        serde_json::Value::String(
                            self.link("confirm", &token(TrackingKind::ConfirmOptIn, "")),
                        ),
                    );
                }
            }
            let subject = render::render("subject", &template.subject, &variables)?;
            let text = render::render("text_body", &template.text_body, &variables)?;
            let html = render::render("html_body", &template.html_body, &variables)?;
            let own_prefix = format!("{}/", self.public_url.trim_end_matches('/'));
            let html = render::instrument(&html, &own_prefix, &pixel_url, |url| {
                self.link("c", &token(TrackingKind::Click, url))
            });
            let text = if text.trim().is_empty() {
                format!("To unsubscribe: {unsubscribe_url}\n")
            } else {
                format!("{text}\n\nTo unsubscribe: {unsubscribe_url}\n")
            };
            self.mailer
                .send(Email {
                    message_id: message_id.to_string(),
                    to: request.to_email.trim().to_owned(),
                    subject,
                    html,
                    text,
                    unsubscribe_url,
                })
                .await
                .inspect_err(|_| record_outcome("failed"))?;
            SendStatus::Sent
        };

        sqlx::query(
            "INSERT INTO sends (workspace_id, message_id, idempotency_key, contact_id, template_id, journey_id, channel, recipient, status)
             VALUES ($1, $2, $3, $4, $5, $6, 'email', $7, $8)",
        )
        .bind(workspace.0)
        .bind(message_id)
        .bind(&key)
        .bind(request.contact_id.trim())
        .bind(template_row.id)
        .bind(request.journey_id.trim())
        .bind(request.to_email.trim())
        .bind(if status == SendStatus::Sent { "sent" } else { "suppressed" })
        .execute(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        let event = MessageEvent {
            message_id: message_id.to_string(),
            contact_id: request.contact_id.trim().to_owned(),
            channel: EventChannel::Email.into(),
            status: if status == SendStatus::Sent {
                EventStatus::Sent
            } else {
                EventStatus::Suppressed
            }
            .into(),
            template_id: template_row.id.to_string(),
            journey_id: request.journey_id.trim().to_owned(),
            ..Default::default()
        };
        let envelope = envelope::new_envelope(
            &workspace.to_string(),
            "messaging",
            Payload::MessageEvent(event),
        );
        outbox::enqueue(
            &mut transaction,
            &envelope::to_record(
                topics::MESSAGE_LIFECYCLE,
                request.contact_id.trim(),
                &envelope,
            ),
        )
        .await
        .map_err(map_db_error)?;
        transaction.commit().await.map_err(map_db_error)?;
        self.waker.wake();
        record_outcome(if status == SendStatus::Sent {
            "sent"
        } else {
            "suppressed"
        });
        Ok(SendMessageResponse {
            message_id: message_id.to_string(),
            status: status.into(),
            duplicate: false,
        })
    }
}

fn record_outcome(outcome: &str) {
    rapport_metrics::metrics()
        .messages
        .with_label_values(&["email", outcome])
        .inc();
}
