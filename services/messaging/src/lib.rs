//! The messaging service: templates and, as later work adds delivery, sends
//! over SMTP and SMS with suppressions and frequency caps.
//!
//! Owns the `messaging` Postgres schema.

use prost::Message;
use rapport_bus::SharedBus;
use rapport_core::paging::{Page, finish_page};
use rapport_core::time::to_timestamp;
use rapport_core::{ApiError, FieldViolation};
use rapport_db::definitions::{DefinitionRow, Definitions, check_name};
use rapport_grpc::auth::workspace_of;
use rapport_grpc::{GrpcService, ServiceParts};
use rapport_proto::messaging::v1::messaging_service_server::{
    MessagingService, MessagingServiceServer,
};
use rapport_proto::messaging::v1::*;
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

pub const SCHEMA: &str = "messaging";
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Largest template body accepted, in bytes.
const MAX_BODY_BYTES: usize = 512 * 1024;

pub async fn build(pool: PgPool, _bus: SharedBus) -> Result<ServiceParts, rapport_bus::BusError> {
    let api = MessagingApi {
        templates: Definitions::new(pool, "templates", "template"),
    };
    Ok(ServiceParts {
        grpc: GrpcService {
            name: rapport_proto::service_names::MESSAGING,
            routes: tonic::service::Routes::new(MessagingServiceServer::new(api)),
        },
        background: Vec::new(),
    })
}

struct MessagingApi {
    templates: Definitions,
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
}
