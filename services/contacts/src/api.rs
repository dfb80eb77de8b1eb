//! The gRPC surface of the contacts service.

use std::sync::Arc;

use rapport_core::paging::{Page, finish_page};
use rapport_core::{ApiError, FieldViolation};
use rapport_grpc::auth::{workspace_details, workspace_of};
use rapport_proto::common::v1::WorkspaceRef;
use rapport_proto::contacts::v1::contacts_service_server::ContactsService;
use rapport_proto::contacts::v1::*;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::store::{ContactInput, Store, attributes_json};
use crate::validate::{MAX_ATTRIBUTES_BYTES, check_text, normalise_email, normalise_phone};

pub struct ContactsApi {
    store: Arc<Store>,
}

impl ContactsApi {
    pub fn new(store: Arc<Store>) -> Self {
        ContactsApi { store }
    }
}

fn validate_upsert(
    request: &UpsertContactRequest,
) -> Result<(Option<String>, ContactInput), ApiError> {
    let mut violations = Vec::new();
    let request_id = match request.request_id.trim() {
        "" => None,
        id if id.len() > 128 => {
            violations.push(FieldViolation {
                field: "request_id".into(),
                description: "is longer than 128 characters".into(),
            });
            None
        }
        id => Some(id.to_owned()),
    };
    let Some(contact) = &request.contact else {
        return Err(ApiError::invalid_field("contact", "is required"));
    };
    let email = normalise_email(&contact.email).unwrap_or_else(|reason| {
        violations.push(FieldViolation {
            field: "contact.email".into(),
            description: reason.into(),
        });
        String::new()
    });
    let phone = normalise_phone(&contact.phone).unwrap_or_else(|reason| {
        violations.push(FieldViolation {
            field: "contact.phone".into(),
            description: reason.into(),
        });
        String::new()
    });
    for (field, value) in [
        ("contact.first_name", &contact.first_name),
        ("contact.last_name", &contact.last_name),
        ("contact.company", &contact.company),
        ("contact.lifecycle_stage", &contact.lifecycle_stage),
        ("contact.source", &contact.source),
    ] {
        check_text(field, value, &mut violations);
    }
    for (index, tag) in contact.tags.iter().enumerate() {
        check_text(&format!("contact.tags[{index}]"), tag, &mut violations);
    }
    let attributes = attributes_json(contact);
    if attributes.to_string().len() > MAX_ATTRIBUTES_BYTES {
        violations.push(FieldViolation {
            field: "contact.attributes".into(),
            description: format!("is larger than {MAX_ATTRIBUTES_BYTES} bytes"),
        });
    }
    if !violations.is_empty() {
        return Err(ApiError::invalid_fields(violations));
    }
    Ok((
        request_id,
        ContactInput::from_proto(contact, attributes, email, phone),
    ))
}

#[tonic::async_trait]
impl ContactsService for ContactsApi {
    async fn who_am_i(
        &self,
        request: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let workspace = workspace_details(&request)?;
        Ok(Response::new(WhoAmIResponse {
            workspace: Some(WorkspaceRef {
                workspace_id: workspace.id.to_string(),
                name: workspace.name,
            }),
        }))
    }

    async fn get_contact(
        &self,
        request: Request<GetContactRequest>,
    ) -> Result<Response<GetContactResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let contact_id = rapport_core::ids::parse_id("contact_id", &request.get_ref().contact_id)?;
        let contact = self.store.get(workspace, contact_id).await?;
        Ok(Response::new(GetContactResponse {
            contact: Some(contact.to_proto()),
        }))
    }

    async fn upsert_contact(
        &self,
        request: Request<UpsertContactRequest>,
    ) -> Result<Response<UpsertContactResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let (request_id, input) = validate_upsert(request.get_ref())?;
        let outcome = self
            .store
            .upsert(workspace, request_id.as_deref(), input)
            .await?;
        Ok(Response::new(UpsertContactResponse {
            contact: Some(outcome.contact.to_proto()),
            created: outcome.created,
        }))
    }

    async fn list_contacts(
        &self,
        request: Request<ListContactsRequest>,
    ) -> Result<Response<ListContactsResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let page = Page::<Uuid>::parse(request.get_ref().page.as_ref())?;
        let stage =
            Some(request.get_ref().lifecycle_stage.trim().to_lowercase()).filter(|s| !s.is_empty());
        let rows = self
            .store
            .list(workspace, stage.as_deref(), page.after, page.fetch_limit())
            .await?;
        let (rows, page) = finish_page(rows, page.size, |row| row.contact_id);
        Ok(Response::new(ListContactsResponse {
            contacts: rows.iter().map(|row| row.to_proto()).collect(),
            page: Some(page),
        }))
    }
}
