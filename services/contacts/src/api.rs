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
    check_text("stage_cause", &request.stage_cause, &mut violations);
    if !violations.is_empty() {
        return Err(ApiError::invalid_fields(violations));
    }
    let mut input = ContactInput::from_proto(contact, attributes, email, phone);
    input.stage_cause = request.stage_cause.trim().to_owned();
    Ok((request_id, input))
}

/// 1 to 20 distinct stage keys of lower-case letters, digits and underscores.
fn check_stages(stages: &[String]) -> Result<Vec<String>, ApiError> {
    let mut violations = Vec::new();
    if stages.is_empty() || stages.len() > 20 {
        violations.push(FieldViolation {
            field: "stages".into(),
            description: "must hold 1 to 20 stages".into(),
        });
    }
    let mut seen = std::collections::HashSet::new();
    for (index, stage) in stages.iter().enumerate() {
        let valid = !stage.is_empty()
            && stage.len() <= 64
            && stage
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            violations.push(FieldViolation {
                field: format!("stages[{index}]"),
                description: "must be 1 to 64 lower-case letters, digits or underscores".into(),
            });
        } else if !seen.insert(stage.as_str()) {
            violations.push(FieldViolation {
                field: format!("stages[{index}]"),
                description: "is listed twice".into(),
            });
        }
    }
    if violations.is_empty() {
        Ok(stages.to_vec())
    } else {
        Err(ApiError::invalid_fields(violations))
    }
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

    async fn list_lifecycle_stages(
        &self,
        request: Request<ListLifecycleStagesRequest>,
    ) -> Result<Response<ListLifecycleStagesResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let stages = self.store.stages(workspace).await?;
        Ok(Response::new(ListLifecycleStagesResponse { stages }))
    }

    async fn set_lifecycle_stages(
        &self,
        request: Request<SetLifecycleStagesRequest>,
    ) -> Result<Response<SetLifecycleStagesResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let stages = check_stages(&request.get_ref().stages)?;
        let stages = self.store.set_stages(workspace, stages).await?;
        Ok(Response::new(SetLifecycleStagesResponse { stages }))
    }

    async fn list_stage_changes(
        &self,
        request: Request<ListStageChangesRequest>,
    ) -> Result<Response<ListStageChangesResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let contact_id = rapport_core::ids::parse_id("contact_id", &request.get_ref().contact_id)?;
        let page = Page::<Uuid>::parse(request.get_ref().page.as_ref())?;
        let rows = self
            .store
            .stage_changes(workspace, contact_id, page.after, page.fetch_limit())
            .await?;
        let (rows, page) = finish_page(rows, page.size, |row| row.change_id);
        Ok(Response::new(ListStageChangesResponse {
            changes: rows
                .into_iter()
                .map(|row| StageChange {
                    stage: row.stage,
                    previous_stage: row.previous_stage,
                    cause: row.cause,
                    change_time: Some(rapport_core::time::to_timestamp(row.changed_at)),
                })
                .collect(),
            page: Some(page),
        }))
    }

    async fn add_note(
        &self,
        request: Request<AddNoteRequest>,
    ) -> Result<Response<AddNoteResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let request = request.get_ref();
        let request_id = request.request_id.trim();
        if request_id.len() > 128 {
            return Err(
                ApiError::invalid_field("request_id", "is longer than 128 characters").into(),
            );
        }
        let note = crate::notes::check(request.note.as_ref())?;
        let note = self
            .store
            .add_note(
                workspace,
                Some(request_id).filter(|id| !id.is_empty()),
                note,
            )
            .await?;
        Ok(Response::new(AddNoteResponse { note: Some(note) }))
    }

    async fn list_notes(
        &self,
        request: Request<ListNotesRequest>,
    ) -> Result<Response<ListNotesResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let contact_id = rapport_core::ids::parse_id("contact_id", &request.get_ref().contact_id)?;
        let page = Page::<Uuid>::parse(request.get_ref().page.as_ref())?;
        let rows = self
            .store
            .notes(workspace, contact_id, page.after, page.fetch_limit())
            .await?;
        let (rows, page) = finish_page(rows, page.size, |(id, _)| *id);
        Ok(Response::new(ListNotesResponse {
            notes: rows.into_iter().map(|(_, note)| note).collect(),
            page: Some(page),
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
