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

use std::pin::Pin;

use futures::{Stream, StreamExt};
use rapport_core::WorkspaceId;

use crate::store::{Filter, Store};
use crate::validate::{check_contact, check_text};
use crate::write::ContactInput;

pub struct ContactsApi {
    store: Arc<Store>,
}

impl ContactsApi {
    pub fn new(store: Arc<Store>) -> Self {
        ContactsApi { store }
    }

    /// A company a write links contacts to must be one of the workspace's.
    async fn check_company(
        &self,
        workspace: WorkspaceId,
        inputs: &[&ContactInput],
    ) -> Result<(), ApiError> {
        let mut checked = Vec::new();
        for input in inputs {
            let Some(company_id) = input.company_id else {
                continue;
            };
            if checked.contains(&company_id) {
                continue;
            }
            if !self.store.company_exists(workspace, company_id).await? {
                return Err(ApiError::invalid_field(
                    format!("{}.company_id", input.path),
                    format!("company {company_id} does not exist in this workspace"),
                ));
            }
            checked.push(company_id);
        }
        Ok(())
    }

    /// A checked List / Export filter.
    async fn filter(
        &self,
        workspace: WorkspaceId,
        filter: Option<&ContactFilter>,
        legacy_stage: &str,
    ) -> Result<Filter, ApiError> {
        let (mut filter, custom) = Filter::from_proto(filter, legacy_stage)?;
        if let Some(custom) = custom {
            let definitions = crate::fields::definitions(self.store.pool(), workspace).await?;
            filter.custom_fields = Some(crate::fields::filter_value(&definitions, &custom)?);
        }
        Ok(filter)
    }
}

fn request_id(raw: &str) -> Result<Option<String>, ApiError> {
    match raw.trim() {
        "" => Ok(None),
        id if id.len() > 128 => Err(ApiError::invalid_field(
            "request_id",
            "is longer than 128 characters",
        )),
        id => Ok(Some(id.to_owned())),
    }
}

fn validate_upsert(
    request: &UpsertContactRequest,
) -> Result<(Option<String>, ContactInput), ApiError> {
    let request_id = request_id(&request.request_id)?;
    let Some(contact) = &request.contact else {
        return Err(ApiError::invalid_field("contact", "is required"));
    };
    let mut violations = Vec::new();
    let mut input = check_contact(contact, "contact", &mut violations);
    check_text("stage_cause", &request.stage_cause, &mut violations);
    if !violations.is_empty() {
        return Err(ApiError::invalid_fields(violations));
    }
    input.stage_cause = request.stage_cause.trim().to_owned();
    Ok((request_id, input))
}

/// Most contacts one batch call takes.
const MAX_BATCH: usize = 1_000;

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
        let profile = self.store.profile(workspace, contact_id).await?;
        Ok(Response::new(GetContactResponse {
            contact: Some(profile.to_proto()),
        }))
    }

    async fn upsert_contact(
        &self,
        request: Request<UpsertContactRequest>,
    ) -> Result<Response<UpsertContactResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let (request_id, input) = validate_upsert(request.get_ref())?;
        self.check_company(workspace, &[&input]).await?;
        let outcome = self
            .store
            .upsert(workspace, request_id.as_deref(), input)
            .await?;
        Ok(Response::new(UpsertContactResponse {
            contact: Some(outcome.profile.to_proto()),
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
        let filter = self
            .filter(
                workspace,
                request.get_ref().filter.as_ref(),
                &request.get_ref().lifecycle_stage,
            )
            .await?;
        let rows = self
            .store
            .list(workspace, &filter, page.after, page.fetch_limit())
            .await?;
        let (rows, page) = finish_page(rows, page.size, |profile| profile.row.contact_id);
        Ok(Response::new(ListContactsResponse {
            contacts: rows.iter().map(|profile| profile.to_proto()).collect(),
            page: Some(page),
        }))
    }

    async fn batch_get_contacts(
        &self,
        request: Request<BatchGetContactsRequest>,
    ) -> Result<Response<BatchGetContactsResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let asked = &request.get_ref().contact_ids;
        if asked.is_empty() || asked.len() > MAX_BATCH {
            return Err(ApiError::invalid_field(
                "contact_ids",
                format!("must hold 1 to {MAX_BATCH} ids"),
            )
            .into());
        }
        let mut ids = Vec::with_capacity(asked.len());
        let mut violations = Vec::new();
        for (index, id) in asked.iter().enumerate() {
            match Uuid::parse_str(id.trim()) {
                Ok(id) => ids.push(id),
                Err(_) => violations.push(FieldViolation {
                    field: format!("contact_ids[{index}]"),
                    description: "is not a contact id".into(),
                }),
            }
        }
        if !violations.is_empty() {
            return Err(ApiError::invalid_fields(violations).into());
        }
        let found = self.store.get_many(workspace, &ids).await?;
        let mut response = BatchGetContactsResponse::default();
        for (id, raw) in ids.iter().zip(asked) {
            match found.get(id) {
                Some(profile) => response.contacts.push(profile.to_proto()),
                None => response.not_found_ids.push(raw.trim().to_owned()),
            }
        }
        Ok(Response::new(response))
    }

    async fn batch_upsert_contacts(
        &self,
        request: Request<BatchUpsertContactsRequest>,
    ) -> Result<Response<BatchUpsertContactsResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let body = request.get_ref();
        let request_id = request_id(&body.request_id)?;
        if body.contacts.is_empty() || body.contacts.len() > MAX_BATCH {
            return Err(ApiError::invalid_field(
                "contacts",
                format!("must hold 1 to {MAX_BATCH} contacts"),
            )
            .into());
        }
        let mut violations = Vec::new();
        check_text("stage_cause", &body.stage_cause, &mut violations);
        let inputs: Vec<ContactInput> = body
            .contacts
            .iter()
            .enumerate()
            .map(|(index, contact)| {
                let mut input =
                    check_contact(contact, &format!("contacts[{index}]"), &mut violations);
                input.stage_cause = body.stage_cause.trim().to_owned();
                input
            })
            .collect();
        if !violations.is_empty() {
            return Err(ApiError::invalid_fields(violations).into());
        }
        let refs: Vec<&ContactInput> = inputs.iter().collect();
        self.check_company(workspace, &refs).await?;
        let results = self
            .store
            .write(
                workspace,
                request_id.map(|id| format!("batch:{id}")).as_deref(),
                inputs,
                false,
            )
            .await?;
        let results = results
            .into_iter()
            .map(|result| {
                result.map(|outcome| UpsertContactResponse {
                    contact: Some(outcome.profile.to_proto()),
                    created: outcome.created,
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok(Response::new(BatchUpsertContactsResponse { results }))
    }

    async fn merge_contacts(
        &self,
        request: Request<MergeContactsRequest>,
    ) -> Result<Response<MergeContactsResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let body = request.get_ref();
        let survivor = rapport_core::ids::parse_id("survivor_id", &body.survivor_id)?;
        if body.merged_ids.is_empty() || body.merged_ids.len() > 20 {
            return Err(ApiError::invalid_field("merged_ids", "must hold 1 to 20 ids").into());
        }
        let mut merged = Vec::new();
        for (index, id) in body.merged_ids.iter().enumerate() {
            merged.push(rapport_core::ids::parse_id(
                &format!("merged_ids[{index}]"),
                id,
            )?);
        }
        let profile = self.store.merge(workspace, survivor, &merged).await?;
        Ok(Response::new(MergeContactsResponse {
            contact: Some(profile.to_proto()),
        }))
    }

    async fn delete_contact(
        &self,
        request: Request<DeleteContactRequest>,
    ) -> Result<Response<DeleteContactResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let contact_id = rapport_core::ids::parse_id("contact_id", &request.get_ref().contact_id)?;
        self.store.erase(workspace, contact_id).await?;
        Ok(Response::new(DeleteContactResponse {}))
    }

    async fn export_contact(
        &self,
        request: Request<ExportContactRequest>,
    ) -> Result<Response<ExportContactResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let contact_id = rapport_core::ids::parse_id("contact_id", &request.get_ref().contact_id)?;
        Ok(Response::new(
            self.store.export(workspace, contact_id).await?,
        ))
    }

    async fn import_contacts(
        &self,
        request: Request<tonic::Streaming<ImportContactsRequest>>,
    ) -> Result<Response<ImportContactsResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let chunks = request.into_inner().map(|message| {
            message.map(|m| (m.chunk, m.stage_cause)).map_err(|status| {
                ApiError::new(
                    rapport_core::ErrorCode::Aborted,
                    format!("the import stream broke: {}", status.message()),
                )
            })
        });
        let response = self.store.import(workspace, chunks).await?;
        Ok(Response::new(response))
    }

    type ExportContactsStream =
        Pin<Box<dyn Stream<Item = Result<ExportContactsResponse, Status>> + Send>>;

    async fn export_contacts(
        &self,
        request: Request<ExportContactsRequest>,
    ) -> Result<Response<Self::ExportContactsStream>, Status> {
        let workspace = workspace_of(&request)?;
        let filter = self
            .filter(workspace, request.get_ref().filter.as_ref(), "")
            .await?;
        let store = self.store.clone();
        // Pages of 500, newest first; the state is None once the last page
        // is sent.
        let pages = futures::stream::unfold(Some(None::<Uuid>), move |cursor| {
            let store = store.clone();
            let filter = filter.clone();
            async move {
                let after = cursor?;
                match store.list(workspace, &filter, after, 500).await {
                    Ok(rows) if rows.is_empty() && after.is_some() => None,
                    Ok(rows) => {
                        let next =
                            (rows.len() == 500).then(|| rows.last().map(|p| p.row.contact_id));
                        let page = ExportContactsResponse {
                            contacts: rows.iter().map(|p| p.to_proto()).collect(),
                        };
                        Some((Ok(page), next))
                    }
                    Err(error) => Some((Err(Status::from(error)), None)),
                }
            }
        });
        Ok(Response::new(Box::pin(pages)))
    }

    async fn define_custom_field(
        &self,
        request: Request<DefineCustomFieldRequest>,
    ) -> Result<Response<DefineCustomFieldResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let field = self
            .store
            .define_field(workspace, request.get_ref().field.as_ref())
            .await?;
        Ok(Response::new(DefineCustomFieldResponse {
            field: Some(field),
        }))
    }

    async fn list_custom_fields(
        &self,
        request: Request<ListCustomFieldsRequest>,
    ) -> Result<Response<ListCustomFieldsResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let fields = self.store.fields(workspace).await?;
        Ok(Response::new(ListCustomFieldsResponse { fields }))
    }

    async fn adjust_score(
        &self,
        request: Request<AdjustScoreRequest>,
    ) -> Result<Response<AdjustScoreResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let body = request.get_ref();
        let request_id = request_id(&body.request_id)?;
        let contact_id = rapport_core::ids::parse_id("contact_id", &body.contact_id)?;
        let mut violations = Vec::new();
        if body.delta == 0 || body.delta.unsigned_abs() > 1_000_000 {
            violations.push(FieldViolation {
                field: "delta".into(),
                description: "must be between -1000000 and 1000000, not zero".into(),
            });
        }
        if body.reason.trim().is_empty() {
            violations.push(FieldViolation {
                field: "reason".into(),
                description: "is required".into(),
            });
        }
        check_text("reason", &body.reason, &mut violations);
        if !violations.is_empty() {
            return Err(ApiError::invalid_fields(violations).into());
        }
        let profile = self
            .store
            .adjust_score(
                workspace,
                request_id.as_deref(),
                contact_id,
                body.delta,
                body.reason.trim(),
            )
            .await?;
        Ok(Response::new(AdjustScoreResponse {
            contact: Some(profile.to_proto()),
        }))
    }

    async fn list_score_changes(
        &self,
        request: Request<ListScoreChangesRequest>,
    ) -> Result<Response<ListScoreChangesResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let contact_id = rapport_core::ids::parse_id("contact_id", &request.get_ref().contact_id)?;
        let page = Page::<Uuid>::parse(request.get_ref().page.as_ref())?;
        let rows = self
            .store
            .score_changes(workspace, contact_id, page.after, page.fetch_limit())
            .await?;
        let (rows, page) = finish_page(rows, page.size, |row| row.change_id);
        Ok(Response::new(ListScoreChangesResponse {
            changes: rows.iter().map(|row| row.to_proto()).collect(),
            page: Some(page),
        }))
    }

    async fn upsert_company(
        &self,
        request: Request<UpsertCompanyRequest>,
    ) -> Result<Response<UpsertCompanyResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let company = crate::commerce::check_company(request.get_ref().company.as_ref())?;
        let (row, created) = self.store.upsert_company(workspace, company).await?;
        Ok(Response::new(UpsertCompanyResponse {
            company: Some(row.to_proto()),
            created,
        }))
    }

    async fn get_company(
        &self,
        request: Request<GetCompanyRequest>,
    ) -> Result<Response<GetCompanyResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let company_id = rapport_core::ids::parse_id("company_id", &request.get_ref().company_id)?;
        let (row, contact_count) = self.store.company(workspace, company_id).await?;
        Ok(Response::new(GetCompanyResponse {
            company: Some(row.to_proto()),
            contact_count,
        }))
    }

    async fn record_order(
        &self,
        request: Request<RecordOrderRequest>,
    ) -> Result<Response<RecordOrderResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let order = crate::commerce::check_order(request.get_ref().order.as_ref())?;
        let (order, contact) = self.store.record_order(workspace, order).await?;
        Ok(Response::new(RecordOrderResponse {
            order: Some(order.to_proto()),
            aggregates: Some(contact.aggregates()),
        }))
    }

    async fn list_orders(
        &self,
        request: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let contact_id = rapport_core::ids::parse_id("contact_id", &request.get_ref().contact_id)?;
        let page = Page::<i64>::parse(request.get_ref().page.as_ref())?;
        let offset = page.after.unwrap_or(0);
        let rows = self
            .store
            .orders(workspace, contact_id, offset, page.fetch_limit())
            .await?;
        let mut position = offset;
        let numbered: Vec<(i64, _)> = rows
            .into_iter()
            .map(|row| {
                position += 1;
                (position, row)
            })
            .collect();
        let (rows, page) = finish_page(numbered, page.size, |(position, _)| *position);
        Ok(Response::new(ListOrdersResponse {
            orders: rows.iter().map(|(_, row)| row.to_proto()).collect(),
            page: Some(page),
        }))
    }

    async fn get_timeline(
        &self,
        request: Request<GetTimelineRequest>,
    ) -> Result<Response<GetTimelineResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let contact_id = rapport_core::ids::parse_id("contact_id", &request.get_ref().contact_id)?;
        let page = Page::<Uuid>::parse(request.get_ref().page.as_ref())?;
        let rows = self
            .store
            .timeline(workspace, contact_id, page.after, page.fetch_limit())
            .await?;
        let (rows, page) = finish_page(rows, page.size, |row| row.entry_id);
        Ok(Response::new(GetTimelineResponse {
            entries: rows.iter().map(|row| row.to_proto()).collect(),
            page: Some(page),
        }))
    }
}
