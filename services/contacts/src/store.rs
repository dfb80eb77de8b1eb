//! Contacts storage. Every query is scoped by workspace id.

use chrono::{DateTime, Utc};
use rapport_bus::{envelope, topics};
use rapport_core::json::{json_to_struct, struct_to_json};
use rapport_core::time::to_timestamp;
use rapport_core::{ApiError, WorkspaceId};
use rapport_db::map_db_error;
use rapport_db::outbox::{self, OutboxWaker};
use rapport_proto::common::v1::{Consent, ConsentStatus};
use rapport_proto::contacts::v1::Contact;
use rapport_proto::events::v1::contact_changed::ChangeType;
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::{ConsentRequested, ContactChanged, ContactSnapshot};
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

use crate::consent::{self, Channel, ConsentChange, ConsentState, status_text};

#[derive(Debug, Clone, FromRow, PartialEq)]
pub struct ContactRow {
    pub contact_id: Uuid,
    pub email: String,
    pub phone: String,
    pub first_name: String,
    pub last_name: String,
    pub company: String,
    pub lifecycle_stage: String,
    pub tags: Vec<String>,
    pub attributes: serde_json::Value,
    pub source: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub email_consent: String,
    pub email_consent_reason: String,
    pub email_consent_at: Option<DateTime<Utc>>,
    pub sms_consent: String,
    pub sms_consent_reason: String,
    pub sms_consent_at: Option<DateTime<Utc>>,
}

impl ContactRow {
    pub fn consent(&self, channel: Channel) -> ConsentState {
        match channel {
            Channel::Email => ConsentState {
                status: self.email_consent.clone(),
                reason: self.email_consent_reason.clone(),
                changed_at: self.email_consent_at,
            },
            Channel::Sms => ConsentState {
                status: self.sms_consent.clone(),
                reason: self.sms_consent_reason.clone(),
                changed_at: self.sms_consent_at,
            },
        }
    }

    pub fn to_proto(&self) -> Contact {
        Contact {
            contact_id: self.contact_id.to_string(),
            email: self.email.clone(),
            phone: self.phone.clone(),
            first_name: self.first_name.clone(),
            last_name: self.last_name.clone(),
            company: self.company.clone(),
            lifecycle_stage: self.lifecycle_stage.clone(),
            tags: self.tags.clone(),
            attributes: Some(json_to_struct(&self.attributes)),
            create_time: Some(to_timestamp(self.created_at)),
            update_time: Some(to_timestamp(self.updated_at)),
            source: self.source.clone(),
            email_consent: Some(self.consent(Channel::Email).to_proto()),
            sms_consent: Some(self.consent(Channel::Sms).to_proto()),
        }
    }

    fn snapshot(&self) -> ContactSnapshot {
        ContactSnapshot {
            contact_id: self.contact_id.to_string(),
            email: self.email.clone(),
            phone: self.phone.clone(),
            first_name: self.first_name.clone(),
            last_name: self.last_name.clone(),
            company: self.company.clone(),
            lifecycle_stage: self.lifecycle_stage.clone(),
            tags: self.tags.clone(),
            attributes: Some(json_to_struct(&self.attributes)),
            create_time: Some(to_timestamp(self.created_at)),
            update_time: Some(to_timestamp(self.updated_at)),
            source: self.source.clone(),
            email_consent: Some(self.consent(Channel::Email).to_proto()),
            sms_consent: Some(self.consent(Channel::Sms).to_proto()),
        }
    }
}

/// A validated upsert.
#[derive(Debug, Clone)]
pub struct ContactInput {
    pub email: String,
    pub phone: String,
    pub first_name: String,
    pub last_name: String,
    pub company: String,
    pub lifecycle_stage: String,
    pub tags: Vec<String>,
    pub attributes: serde_json::Value,
    pub source: String,
    pub email_consent: Option<ConsentChange>,
    pub sms_consent: Option<ConsentChange>,
    /// A double opt-in form asked for email consent: when it is pending
    /// after this write, the confirmation is requested.
    pub confirmation: Option<ConfirmationRequest>,
    /// Why the stage changes, when it does; the source otherwise.
    pub stage_cause: String,
}

#[derive(Debug, Clone)]
pub struct ConfirmationRequest {
    pub template: String,
    pub form_id: String,
    pub request_id: String,
}

impl ContactInput {
    pub fn from_proto(
        contact: &Contact,
        attributes: serde_json::Value,
        email: String,
        phone: String,
    ) -> Self {
        let mut tags = contact
            .tags
            .iter()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>();
        tags.sort();
        tags.dedup();
        ContactInput {
            email,
            phone,
            first_name: contact.first_name.trim().to_owned(),
            last_name: contact.last_name.trim().to_owned(),
            company: contact.company.trim().to_owned(),
            lifecycle_stage: contact.lifecycle_stage.trim().to_lowercase(),
            tags,
            attributes,
            source: contact.source.trim().to_owned(),
            email_consent: consent_from_proto(contact.email_consent.as_ref()),
            sms_consent: consent_from_proto(contact.sms_consent.as_ref()),
            confirmation: None,
            stage_cause: String::new(),
        }
    }
}

/// A consent an API caller set: a status other than unspecified.
fn consent_from_proto(consent: Option<&Consent>) -> Option<ConsentChange> {
    let consent = consent?;
    let status = consent.status();
    if status == ConsentStatus::Unspecified {
        return None;
    }
    let reason = match consent.reason.trim() {
        "" => "api",
        reason => reason,
    };
    Some(ConsentChange::new(status, reason))
}

impl ContactInput {
    /// An update leaves what the caller left empty as it was: empty fields
    /// keep their value, tags are added to, attributes are merged key by key.
    fn merged_onto(mut self, before: &ContactRow) -> Self {
        for (new, old) in [
            (&mut self.phone, &before.phone),
            (&mut self.first_name, &before.first_name),
            (&mut self.last_name, &before.last_name),
            (&mut self.company, &before.company),
            (&mut self.lifecycle_stage, &before.lifecycle_stage),
        ] {
            if new.is_empty() {
                new.clone_from(old);
            }
        }
        let mut tags = before.tags.clone();
        tags.extend(self.tags);
        tags.sort();
        tags.dedup();
        self.tags = tags;
        let mut attributes = before.attributes.as_object().cloned().unwrap_or_default();
        if let Some(new) = self.attributes.as_object() {
            for (key, value) in new {
                attributes.insert(key.clone(), value.clone());
            }
        }
        self.attributes = serde_json::Value::Object(attributes);
        self
    }
}

pub struct UpsertOutcome {
    pub contact: ContactRow,
    pub created: bool,
}

pub struct Store {
    pool: PgPool,
    waker: OutboxWaker,
}

const COLUMNS: &str = "contact_id, email, phone, first_name, last_name, company, lifecycle_stage, tags, attributes, source, created_at, updated_at, \
    email_consent, email_consent_reason, email_consent_at, sms_consent, sms_consent_reason, sms_consent_at";

impl Store {
    pub fn new(pool: PgPool, waker: OutboxWaker) -> Self {
        Store { pool, waker }
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    #[tracing::instrument(
        name = "db",
        skip_all,
        fields(
            otel.kind = "client",
            otel.name = "SELECT contacts",
            db.system.name = "postgresql",
            db.operation.name = "SELECT",
            db.collection.name = "contacts",
        )
    )]
    pub async fn get(
        &self,
        workspace: WorkspaceId,
        contact_id: Uuid,
    ) -> Result<ContactRow, ApiError> {
        sqlx::query_as::<_, ContactRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM contacts WHERE workspace_id = $1 AND contact_id = $2"
        )))
        .bind(workspace.0)
        .bind(contact_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_db_error)?
        .ok_or_else(|| ApiError::not_found(format!("contact {contact_id}")))
    }

    #[tracing::instrument(
        name = "db",
        skip_all,
        fields(
            otel.kind = "client",
            otel.name = "SELECT contacts",
            db.system.name = "postgresql",
            db.operation.name = "SELECT",
            db.collection.name = "contacts",
        )
    )]
    pub async fn list(
        &self,
        workspace: WorkspaceId,
        stage: Option<&str>,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<ContactRow>, ApiError> {
        sqlx::query_as::<_, ContactRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM contacts
             WHERE workspace_id = $1
               AND ($2::text IS NULL OR lifecycle_stage = $2)
               AND ($3::uuid IS NULL OR contact_id < $3)
             ORDER BY contact_id DESC LIMIT $4"
        )))
        .bind(workspace.0)
        .bind(stage)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(map_db_error)
    }

    /// Creates or updates the contact with `input.email`, writing its event in
    /// the same transaction. A repeated `request_id` returns the first outcome.
    #[tracing::instrument(
        name = "db",
        skip_all,
        fields(
            otel.kind = "client",
            otel.name = "UPSERT contacts",
            db.system.name = "postgresql",
            db.operation.name = "UPSERT",
            db.collection.name = "contacts",
        )
    )]
    pub async fn upsert(
        &self,
        workspace: WorkspaceId,
        request_id: Option<&str>,
        mut input: ContactInput,
    ) -> Result<UpsertOutcome, ApiError> {
        let mut transaction = self.pool.begin().await.map_err(map_db_error)?;
        if let Some(request_id) = request_id {
            // Serialise concurrent retries of one request id.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || $2, 0))")
                .bind(workspace.0.to_string())
                .bind(request_id)
                .execute(&mut *transaction)
                .await
                .map_err(map_db_error)?;
            let previous: Option<(Uuid, bool)> = sqlx::query_as(
                "SELECT contact_id, created FROM upsert_requests WHERE workspace_id = $1 AND request_id = $2",
            )
            .bind(workspace.0)
            .bind(request_id)
            .fetch_optional(&mut *transaction)
            .await
            .map_err(map_db_error)?;
            if let Some((contact_id, created)) = previous {
                transaction.rollback().await.map_err(map_db_error)?;
                let contact = self.get(workspace, contact_id).await?;
                return Ok(UpsertOutcome { contact, created });
            }
        }

        let consent_changes: Vec<(Channel, ConsentChange)> = [
            (Channel::Email, input.email_consent.take()),
            (Channel::Sms, input.sms_consent.take()),
        ]
        .into_iter()
        .filter_map(|(channel, change)| change.map(|change| (channel, change)))
        .collect();
        let confirmation = input.confirmation.take();
        let cause = [&input.stage_cause, &input.source]
            .into_iter()
            .find(|c| !c.is_empty())
            .cloned()
            .unwrap_or_else(|| "api".to_owned());
        let existing = sqlx::query_as::<_, ContactRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM contacts WHERE workspace_id = $1 AND email = $2 FOR UPDATE"
        )))
        .bind(workspace.0)
        .bind(&input.email)
        .fetch_optional(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        // The workspace's stages matter only to a stage being set and to a
        // new contact, which starts in the first; an update that leaves the
        // stage alone (most identify events) skips the read.
        let stages = if input.lifecycle_stage.is_empty() && existing.is_some() {
            Vec::new()
        } else {
            stages_in(&mut *transaction, workspace).await?
        };
        if !input.lifecycle_stage.is_empty() && !stages.contains(&input.lifecycle_stage) {
            return Err(ApiError::invalid_field(
                "contact.lifecycle_stage",
                format!(
                    "is not a lifecycle stage of this workspace ({})",
                    stages.join(", ")
                ),
            ));
        }
        let first_stage = stages.first().map_or(DEFAULT_STAGES[0], String::as_str);

        let (contact, created, change) = match existing {
            None => {
                let contact = sqlx::query_as::<_, ContactRow>(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO contacts (workspace_id, contact_id, email, phone, first_name, last_name, company, lifecycle_stage, tags, attributes, source)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                     RETURNING {COLUMNS}"
                )))
                .bind(workspace.0)
                .bind(rapport_core::ids::new_id())
                .bind(&input.email)
                .bind(&input.phone)
                .bind(&input.first_name)
                .bind(&input.last_name)
                .bind(&input.company)
                .bind(if input.lifecycle_stage.is_empty() { first_stage } else { input.lifecycle_stage.as_str() })
                .bind(&input.tags)
                .bind(&input.attributes)
                .bind(if input.source.is_empty() { "api" } else { input.source.as_str() })
                .fetch_one(&mut *transaction)
                .await
                .map_err(map_db_error)?;
                let event = ContactChanged {
                    contact_id: contact.contact_id.to_string(),
                    change_type: ChangeType::Created.into(),
                    contact: Some(contact.snapshot()),
                    source: contact.source.clone(),
                    ..Default::default()
                };
                (contact, true, Some(event))
            }
            Some(before) => {
                let input = input.merged_onto(&before);
                let changed = changed_fields(&before, &input);
                if changed.is_empty() {
                    (before, false, None)
                } else {
                    let after = sqlx::query_as::<_, ContactRow>(sqlx::AssertSqlSafe(format!(
                        "UPDATE contacts SET phone = $3, first_name = $4, last_name = $5, company = $6,
                             lifecycle_stage = $7, tags = $8, attributes = $9, updated_at = now()
                         WHERE workspace_id = $1 AND contact_id = $2
                         RETURNING {COLUMNS}"
                    )))
                    .bind(workspace.0)
                    .bind(before.contact_id)
                    .bind(&input.phone)
                    .bind(&input.first_name)
                    .bind(&input.last_name)
                    .bind(&input.company)
                    .bind(&input.lifecycle_stage)
                    .bind(&input.tags)
                    .bind(&input.attributes)
                    .fetch_one(&mut *transaction)
                    .await
                    .map_err(map_db_error)?;
                    let stage_changed = before.lifecycle_stage != after.lifecycle_stage;
                    let event = ContactChanged {
                        contact_id: after.contact_id.to_string(),
                        change_type: if stage_changed {
                            ChangeType::StageChanged
                        } else {
                            ChangeType::Updated
                        }
                        .into(),
                        contact: Some(after.snapshot()),
                        changed_fields: changed,
                        previous_stage: if stage_changed {
                            before.lifecycle_stage.clone()
                        } else {
                            String::new()
                        },
                        source: if input.source.is_empty() {
                            "api".to_owned()
                        } else {
                            input.source.clone()
                        },
                        ..Default::default()
                    };
                    (after, false, Some(event))
                }
            }
        };

        if let Some(change) = &change
            && (created || change.change_type() == ChangeType::StageChanged)
        {
            record_stage_change(
                &mut transaction,
                workspace,
                &contact,
                &change.previous_stage,
                &cause,
            )
            .await?;
        }
        let (contact, change) = apply_consent(
            &mut transaction,
            workspace,
            contact,
            change,
            &consent_changes,
            created,
        )
        .await?;
        if let Some(event) = event_record(workspace, change) {
            outbox::enqueue(&mut transaction, &event)
                .await
                .map_err(map_db_error)?;
        }
        if let Some(request) = &confirmation
            && contact.consent(Channel::Email).status() == ConsentStatus::Pending
        {
            let requested = ConsentRequested {
                contact_id: contact.contact_id.to_string(),
                channel: "email".into(),
                email: contact.email.clone(),
                template: request.template.clone(),
                form_id: request.form_id.clone(),
                request_id: request.request_id.clone(),
            };
            let envelope = envelope::new_envelope(
                &workspace.to_string(),
                "contacts",
                Payload::ConsentRequested(requested),
            );
            outbox::enqueue(
                &mut transaction,
                &envelope::to_record(
                    topics::CONTACT_CHANGES,
                    &contact.contact_id.to_string(),
                    &envelope,
                ),
            )
            .await
            .map_err(map_db_error)?;
        }
        if let Some(request_id) = request_id {
            sqlx::query("INSERT INTO upsert_requests (workspace_id, request_id, contact_id, created) VALUES ($1, $2, $3, $4)")
                .bind(workspace.0)
                .bind(request_id)
                .bind(contact.contact_id)
                .bind(created)
                .execute(&mut *transaction)
                .await
                .map_err(map_db_error)?;
        }
        transaction.commit().await.map_err(map_db_error)?;
        self.waker.wake();
        Ok(UpsertOutcome { contact, created })
    }
}

fn event_record(
    workspace: WorkspaceId,
    change: Option<ContactChanged>,
) -> Option<rapport_bus::Record> {
    let change = change?;
    let key = change.contact_id.clone();
    let envelope = envelope::new_envelope(
        &workspace.to_string(),
        "contacts",
        Payload::ContactChanged(change),
    );
    Some(envelope::to_record(
        topics::CONTACT_CHANGES,
        &key,
        &envelope,
    ))
}

fn changed_fields(before: &ContactRow, input: &ContactInput) -> Vec<String> {
    let mut changed = Vec::new();
    let pairs = [
        ("phone", &before.phone, &input.phone),
        ("first_name", &before.first_name, &input.first_name),
        ("last_name", &before.last_name, &input.last_name),
        ("company", &before.company, &input.company),
        (
            "lifecycle_stage",
            &before.lifecycle_stage,
            &input.lifecycle_stage,
        ),
    ];
    for (name, old, new) in pairs {
        if old != new {
            changed.push(name.to_owned());
        }
    }
    if before.tags != input.tags {
        changed.push("tags".to_owned());
    }
    if before.attributes != input.attributes {
        changed.push("attributes".to_owned());
    }
    changed
}

/// The attributes a client sent, as JSON.
pub fn attributes_json(contact: &Contact) -> serde_json::Value {
    contact
        .attributes
        .as_ref()
        .map(struct_to_json)
        .unwrap_or_else(|| serde_json::Value::Object(Default::default()))
}

impl Store {
    /// Sets one channel's consent of a contact found by id (a confirmation
    /// link followed, an unsubscribe, a bounce). NOT_FOUND when the contact
    /// is not in the workspace.
    pub async fn set_consent(
        &self,
        workspace: WorkspaceId,
        contact_id: Uuid,
        channel: Channel,
        change: ConsentChange,
    ) -> Result<ContactRow, ApiError> {
        let mut transaction = self.pool.begin().await.map_err(map_db_error)?;
        let contact = sqlx::query_as::<_, ContactRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM contacts WHERE workspace_id = $1 AND contact_id = $2 FOR UPDATE"
        )))
        .bind(workspace.0)
        .bind(contact_id)
        .fetch_optional(&mut *transaction)
        .await
        .map_err(map_db_error)?
        .ok_or_else(|| ApiError::not_found(format!("contact {contact_id}")))?;
        let source = change.reason.clone();
        let (contact, change) = apply_consent(
            &mut transaction,
            workspace,
            contact,
            None,
            &[(channel, change)],
            false,
        )
        .await?;
        if let Some(mut change) = change {
            change.source = source;
            if let Some(event) = event_record(workspace, Some(change)) {
                outbox::enqueue(&mut transaction, &event)
                    .await
                    .map_err(map_db_error)?;
            }
        }
        transaction.commit().await.map_err(map_db_error)?;
        self.waker.wake();
        Ok(contact)
    }
}

/// Applies consent changes to a contact just written (or read) in
/// `transaction`, logs them, and folds them into the contact's change event
/// (making an update event when there was none).
async fn apply_consent(
    transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    workspace: WorkspaceId,
    mut contact: ContactRow,
    mut change: Option<ContactChanged>,
    changes: &[(Channel, ConsentChange)],
    created: bool,
) -> Result<(ContactRow, Option<ContactChanged>), ApiError> {
    let mut changed = Vec::new();
    for (channel, requested) in changes {
        let current = contact.consent(*channel).status();
        let Some(next) = consent::next(current, requested) else {
            continue;
        };
        let column = channel.as_str();
        contact = sqlx::query_as::<_, ContactRow>(sqlx::AssertSqlSafe(format!(
            "UPDATE contacts SET {column}_consent = $3, {column}_consent_reason = $4, {column}_consent_at = now(), updated_at = now()
             WHERE workspace_id = $1 AND contact_id = $2 RETURNING {COLUMNS}"
        )))
        .bind(workspace.0)
        .bind(contact.contact_id)
        .bind(status_text(next))
        .bind(&requested.reason)
        .fetch_one(&mut **transaction)
        .await
        .map_err(map_db_error)?;
        sqlx::query(
            "INSERT INTO consent_changes (workspace_id, contact_id, channel, status, previous_status, reason)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(workspace.0)
        .bind(contact.contact_id)
        .bind(column)
        .bind(status_text(next))
        .bind(status_text(current))
        .bind(&requested.reason)
        .execute(&mut **transaction)
        .await
        .map_err(map_db_error)?;
        changed.push(format!("{column}_consent"));
    }
    if changed.is_empty() {
        return Ok((contact, change));
    }
    let mut event = change.take().unwrap_or_else(|| ContactChanged {
        contact_id: contact.contact_id.to_string(),
        change_type: ChangeType::Updated.into(),
        ..Default::default()
    });
    if !created {
        event.changed_fields.extend(changed);
    }
    event.contact = Some(contact.snapshot());
    Ok((contact, Some(event)))
}

/// The stages of a workspace that has not set its own.
pub const DEFAULT_STAGES: [&str; 5] = ["lead", "customer", "repeat_buyer", "at_risk", "churned"];

async fn stages_in<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    workspace: WorkspaceId,
) -> Result<Vec<String>, ApiError> {
    let stages: Option<Vec<String>> =
        sqlx::query_scalar("SELECT stages FROM lifecycle_stages WHERE workspace_id = $1")
            .bind(workspace.0)
            .fetch_optional(executor)
            .await
            .map_err(map_db_error)?;
    Ok(stages.unwrap_or_else(|| DEFAULT_STAGES.iter().map(|s| (*s).to_owned()).collect()))
}

async fn record_stage_change(
    transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    workspace: WorkspaceId,
    contact: &ContactRow,
    previous_stage: &str,
    cause: &str,
) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO stage_changes (workspace_id, contact_id, change_id, stage, previous_stage, cause)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(workspace.0)
    .bind(contact.contact_id)
    .bind(rapport_core::ids::new_id())
    .bind(&contact.lifecycle_stage)
    .bind(previous_stage)
    .bind(cause)
    .execute(&mut **transaction)
    .await
    .map_err(map_db_error)?;
    Ok(())
}

#[derive(Debug, Clone, FromRow)]
pub struct StageChangeRow {
    pub change_id: Uuid,
    pub stage: String,
    pub previous_stage: String,
    pub cause: String,
    pub changed_at: DateTime<Utc>,
}

impl Store {
    pub async fn stages(&self, workspace: WorkspaceId) -> Result<Vec<String>, ApiError> {
        stages_in(&self.pool, workspace).await
    }

    /// Replaces the workspace's stages; refuses to drop a stage in use.
    pub async fn set_stages(
        &self,
        workspace: WorkspaceId,
        stages: Vec<String>,
    ) -> Result<Vec<String>, ApiError> {
        let mut transaction = self.pool.begin().await.map_err(map_db_error)?;
        // One writer of a workspace's stages at a time, and no contact
        // moving into a stage while it is being dropped.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('stages:' || $1, 0))")
            .bind(workspace.0.to_string())
            .execute(&mut *transaction)
            .await
            .map_err(map_db_error)?;
        let in_use: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT lifecycle_stage FROM contacts
             WHERE workspace_id = $1 AND NOT (lifecycle_stage = ANY($2)) ORDER BY 1 LIMIT 10",
        )
        .bind(workspace.0)
        .bind(&stages)
        .fetch_all(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        if !in_use.is_empty() {
            return Err(ApiError::new(
                rapport_core::ErrorCode::FailedPrecondition,
                format!(
                    "contacts are in stages this list drops: {}",
                    in_use.join(", ")
                ),
            ));
        }
        sqlx::query(
            "INSERT INTO lifecycle_stages (workspace_id, stages) VALUES ($1, $2)
             ON CONFLICT (workspace_id) DO UPDATE SET stages = EXCLUDED.stages, updated_at = now()",
        )
        .bind(workspace.0)
        .bind(&stages)
        .execute(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        transaction.commit().await.map_err(map_db_error)?;
        Ok(stages)
    }

    /// A contact's stage history, newest first.
    pub async fn stage_changes(
        &self,
        workspace: WorkspaceId,
        contact_id: Uuid,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<StageChangeRow>, ApiError> {
        self.get(workspace, contact_id).await?;
        sqlx::query_as::<_, StageChangeRow>(
            "SELECT change_id, stage, previous_stage, cause, changed_at FROM stage_changes
             WHERE workspace_id = $1 AND contact_id = $2 AND ($3::uuid IS NULL OR change_id < $3)
             ORDER BY change_id DESC LIMIT $4",
        )
        .bind(workspace.0)
        .bind(contact_id)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(map_db_error)
    }
}
