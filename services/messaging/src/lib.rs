//! The messaging service: templates, idempotent email sends over SMTP with
//! tracking and one-click unsubscribe, suppressions, and message lifecycle
//! events from opens, clicks and unsubscribes. SMS and frequency caps are
//! later work.
//!
//! Owns the `messaging` Postgres schema.

use std::sync::Arc;

use prost::Message;
use rapport_bus::{SharedBus, Subscription, topics};
use rapport_core::paging::{Page, finish_page};
use rapport_core::time::to_timestamp;
use rapport_core::{ApiError, FieldViolation};
use rapport_db::definitions::{DefinitionRow, Definitions, check_name};
use rapport_db::outbox::{self, OutboxWaker};
use rapport_grpc::auth::workspace_of;
use rapport_grpc::{BackgroundTask, GrpcService, ServiceParts};
use rapport_proto::messaging::v1::messaging_service_server::{
    MessagingService, MessagingServiceServer,
};
use rapport_proto::messaging::v1::*;
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use uuid::Uuid;

mod feedback;
mod render;
mod send;
mod smtp;

pub const SCHEMA: &str = "messaging";
pub const CONSUMER_GROUP: &str = "rapport-messaging";
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Largest template body accepted, in bytes.
const MAX_BODY_BYTES: usize = 512 * 1024;

pub async fn build(
    pool: PgPool,
    bus: SharedBus,
    config: &rapport_config::Config,
) -> Result<ServiceParts, rapport_bus::BusError> {
    let mailer = smtp::Mailer::new(&config.smtp).map_err(rapport_bus::BusError::Invalid)?;
    let waker = OutboxWaker::default();
    let relay = outbox::spawn_relay(pool.clone(), bus.clone(), SCHEMA, waker.clone());
    let templates = Definitions::new(pool.clone(), "templates", "template");
    let sender = Arc::new(send::Sender {
        pool: pool.clone(),
        templates: templates.clone(),
        mailer: Arc::new(mailer),
        signer: rapport_core::signing::Signer::new(
            &config.internal_secret(),
            rapport_core::signing::TRACKING_PURPOSE,
        ),
        public_url: config.public_url.clone(),
        waker: waker.clone(),
    });
    // Ingested events (opens, clicks, unsubscribes, confirmations) and
    // contact changes (double opt-in requests, erasures and merges).
    let consumer = bus
        .subscribe(
            Subscription::new(
                CONSUMER_GROUP,
                &[topics::INGESTED_EVENTS, topics::CONTACT_CHANGES],
            )
            .with_max_attempts(config.kafka.max_delivery_attempts),
            Arc::new(feedback::FeedbackHandler {
                pool,
                waker,
                sender: sender.clone(),
            }),
        )
        .await?;
    let api = MessagingApi { templates, sender };
    Ok(ServiceParts {
        grpc: GrpcService {
            name: rapport_proto::service_names::MESSAGING,
            routes: tonic::service::Routes::new(MessagingServiceServer::new(api)),
        },
        background: vec![
            BackgroundTask::new("messaging feedback consumer", move || consumer.shutdown()),
            BackgroundTask::flush("messaging outbox relay", move || relay.shutdown()),
        ],
    })
}

struct MessagingApi {
    templates: Definitions,
    sender: Arc<send::Sender>,
}

fn to_proto(row: &DefinitionRow) -> Result<Template, ApiError> {
    let mut template =
        Template::decode(row.definition.as_slice()).map_err(|error| ApiError::internal(&error))?;
    template.template_id = row.id.to_string();
    template.name = row.name.clone();
    template.create_time = Some(to_timestamp(row.created_at));
    template.update_time = Some(to_timestamp(row.updated_at));
    Ok(template)
}

fn check_template(template: &Template) -> Vec<FieldViolation> {
    let mut violations = Vec::new();
    let mut violation = |field: &str, description: String| {
        violations.push(FieldViolation {
            field: field.to_owned(),
            description,
        })
    };
    match Channel::try_from(template.channel) {
        Ok(Channel::Email) => {
            if template.subject.trim().is_empty() {
                violation("template.subject", "is required for email".into());
            }
            if template.html_body.trim().is_empty() && template.text_body.trim().is_empty() {
                violation(
                    "template.html_body",
                    "email needs an html_body or a text_body".into(),
                );
            }
        }
        Ok(Channel::Sms) => {
            if template.text_body.trim().is_empty() {
                violation("template.text_body", "is required for SMS".into());
            }
        }
        Ok(Channel::Unspecified) | Err(_) => violation(
            "template.channel",
            "must be CHANNEL_EMAIL or CHANNEL_SMS".into(),
        ),
    }
    for (field, body) in [
        ("template.subject", &template.subject),
        ("template.html_body", &template.html_body),
        ("template.text_body", &template.text_body),
    ] {
        if body.len() > MAX_BODY_BYTES {
            violation(field, format!("is larger than {MAX_BODY_BYTES} bytes"));
        } else if let Err(error) = render::check(field, body) {
            violation(
                field,
                error
                    .field_violations
                    .first()
                    .map(|v| v.description.clone())
                    .unwrap_or_default(),
            );
        }
    }
    violations
}

#[tonic::async_trait]
impl MessagingService for MessagingApi {
    async fn create_template(
        &self,
        request: Request<CreateTemplateRequest>,
    ) -> Result<Response<CreateTemplateResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let Some(template) = request.into_inner().template else {
            return Err(ApiError::invalid_field("template", "is required").into());
        };
        let name = check_name("template.name", &template.name)?;
        let violations = check_template(&template);
        if !violations.is_empty() {
            return Err(ApiError::invalid_fields(violations).into());
        }
        let stored = Template {
            channel: template.channel,
            subject: template.subject,
            html_body: template.html_body,
            text_body: template.text_body,
            ..Default::default()
        };
        let row = self
            .templates
            .create(workspace, &name, &stored.encode_to_vec())
            .await?;
        Ok(Response::new(CreateTemplateResponse {
            template: Some(to_proto(&row)?),
        }))
    }

    async fn get_template(
        &self,
        request: Request<GetTemplateRequest>,
    ) -> Result<Response<GetTemplateResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let id = rapport_core::ids::parse_id("template_id", &request.get_ref().template_id)?;
        let row = self.templates.get(workspace, id).await?;
        Ok(Response::new(GetTemplateResponse {
            template: Some(to_proto(&row)?),
        }))
    }

    async fn list_templates(
        &self,
        request: Request<ListTemplatesRequest>,
    ) -> Result<Response<ListTemplatesResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let page = Page::<Uuid>::parse(request.get_ref().page.as_ref())?;
        let rows = self
            .templates
            .list(workspace, page.after, page.fetch_limit())
            .await?;
        let (rows, page) = finish_page(rows, page.size, |row| row.id);
        Ok(Response::new(ListTemplatesResponse {
            templates: rows.iter().map(to_proto).collect::<Result<_, _>>()?,
            page: Some(page),
        }))
    }

    async fn send_message(
        &self,
        request: Request<SendMessageRequest>,
    ) -> Result<Response<SendMessageResponse>, Status> {
        let workspace = workspace_of(&request)?;
        // The send runs on its own task, so a caller that goes away (a
        // crashed journey runner, a cancelled call) cannot abandon it between
        // the mail server's acceptance and the commit that records it; the
        // caller's retry then finds the recorded send and delivers nothing.
        let sender = self.sender.clone();
        let request = request.into_inner();
        let send =
            tokio::spawn(async move { sender.send(workspace, request).await }.in_current_span());
        let response = send
            .await
            .map_err(|error| Status::from(ApiError::internal(&error)))??;
        Ok(Response::new(response))
    }
}
