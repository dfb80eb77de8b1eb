//! Writing contacts. Upsert, BatchUpsert, Import, consent updates and CRM
//! sync all go through [`Store::write`], which in one transaction:
//!
//! 1. finds each input's contact by id or by its identities (external ids,
//!    email, phone, anonymous ids, in that order), locking the rows it finds;
//! 2. plans every change in memory: a new contact, fields merged onto an
//!    existing one, anonymous contacts folded into the one an identify names;
//! 3. writes the contacts in one statement, then identities, stage, consent
//!    and score logs, timeline entries and change events in one statement
//!    each, so a batch of 500 costs a handful of round trips.
//!
//! Two writers racing to create one identity: the second's identity insert
//! fails on the primary key and the whole write is retried, finding the
//! first writer's contact.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use rapport_bus::{envelope, topics};
use rapport_core::{ApiError, ErrorCode, FieldViolation, WorkspaceId};
use rapport_db::map_db_error;
use rapport_db::outbox;
use rapport_proto::common::v1::ConsentStatus;
use rapport_proto::events::v1::contact_changed::ChangeType;
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::{ConsentRequested, ContactChanged};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::consent::{self, Channel, ConsentChange, ConsentState, status_text};
use crate::fields;
use crate::store::{
    COLUMNS, ContactRow, DEFAULT_STAGES, IdentityRow, Profile, Store, TouchRecord, event_record,
    identities_of, stages_in,
};
use crate::timeline::{self, Entry};

/// A checked write of one contact. Empty fields leave the stored value.
#[derive(Debug, Clone, Default)]
pub struct ContactInput {
    pub contact_id: Option<Uuid>,
    pub email: String,
    pub phone: String,
    pub first_name: String,
    pub last_name: String,
    pub company: String,
    pub job_title: String,
    pub time_zone: String,
    pub locale: String,
    pub country: String,
    pub owner_id: String,
    pub lifecycle_stage: String,
    pub company_id: Option<Uuid>,
    pub tags: Vec<String>,
    /// Free-form traits, merged key by key.
    pub attributes: serde_json::Map<String, serde_json::Value>,
    /// Custom field values as sent; checked against the definitions here.
    /// A null clears the field.
    pub custom_fields: serde_json::Map<String, serde_json::Value>,
    /// `system:id`.
    pub external_ids: Vec<String>,
    pub anonymous_ids: Vec<String>,
    pub touch: Option<TouchRecord>,
    /// Where the write comes from ("api", "form", "crm:salesforce", ...).
    pub source: String,
    pub email_consent: Option<ConsentChange>,
    pub sms_consent: Option<ConsentChange>,
    /// A double opt-in form asked for email consent: when it is pending
    /// after this write, the confirmation is requested.
    pub confirmation: Option<ConfirmationRequest>,
    /// Why the stage changes, when it does; the source otherwise.
    pub stage_cause: String,
    /// Where field violations point ("contact", "contacts[3]").
    pub path: String,
    /// CRM sync: (field, source, source time) of each field this write sets.
    pub field_times: Vec<(String, String, DateTime<Utc>)>,
}

#[derive(Debug, Clone)]
pub struct ConfirmationRequest {
    pub template: String,
    pub form_id: String,
    pub request_id: String,
}

impl ContactInput {
    /// The identities this input names, strongest first.
    fn identities(&self) -> Vec<(&'static str, String)> {
        let mut keys = Vec::new();
        for id in &self.external_ids {
            keys.push(("external", id.clone()));
        }
        if !self.email.is_empty() {
            keys.push(("email", self.email.clone()));
        }
        if !self.phone.is_empty() {
            keys.push(("phone", self.phone.clone()));
        }
        for id in &self.anonymous_ids {
            keys.push(("anonymous", id.clone()));
        }
        keys
    }

    fn field(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.path)
        }
    }
}

pub struct UpsertOutcome {
    pub profile: Profile,
    pub created: bool,
}

/// A contact being written.
struct Working {
    row: ContactRow,
    /// As it was in the database; None for a contact this write creates.
    before: Option<ContactRow>,
    merged: Vec<Uuid>,
    consent_log: Vec<(Channel, String, String, String)>,
    confirmation: Option<ConfirmationRequest>,
    cause: String,
    source: String,
    field_times: Vec<(String, String, DateTime<Utc>)>,
}

struct Plan {
    now: DateTime<Utc>,
    stages: Vec<String>,
    contacts: HashMap<Uuid, Working>,
    order: Vec<Uuid>,
    owner: HashMap<(String, String), Uuid>,
    identities: Vec<IdentityRow>,
    new_identities: Vec<IdentityRow>,
    merges: Vec<(Uuid, Uuid)>,
    /// Merged-away id -> the contact it went into.
    folded: HashMap<Uuid, Uuid>,
}

impl Plan {
    fn survivor(&self, mut id: Uuid) -> Uuid {
        while let Some(next) = self.folded.get(&id) {
            id = *next;
        }
        id
    }

    fn is_anonymous(&self, id: Uuid) -> bool {
        self.contacts
            .get(&id)
            .is_some_and(|w| w.row.is_anonymous(&self.identities))
    }

    fn owner_of(&self, kind: &str, value: &str) -> Option<Uuid> {
        self.owner
            .get(&(kind.to_owned(), value.to_owned()))
            .map(|id| self.survivor(*id))
    }

    /// Plans one input; returns its contact and whether it is new. Nothing
    /// in the plan changes when it fails.
    fn apply(&mut self, mut input: ContactInput) -> Result<(Uuid, bool), ApiError> {
        let explicit = match input.contact_id {
            Some(id) => {
                let id = self.survivor(id);
                if !self.contacts.contains_key(&id) {
                    return Err(ApiError::not_found(format!("contact {id}")));
                }
                Some(id)
            }
            None => None,
        };
        let keys = input.identities();
        let strong: Vec<(String, Uuid)> = keys
            .iter()
            .filter(|(kind, _)| *kind == "external" || *kind == "email")
            .filter_map(|(kind, value)| {
                self.owner_of(kind, value)
                    .map(|id| (format!("{kind} {value}"), id))
            })
            .collect();
        let mut primary = explicit.or_else(|| strong.first().map(|(_, id)| *id));
        let mut to_merge: Vec<Uuid> = Vec::new();
        for (what, id) in &strong {
            if Some(*id) == primary || to_merge.contains(id) {
                continue;
            }
            if self.is_anonymous(*id) {
                to_merge.push(*id);
            } else {
                return Err(ApiError::new(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "{}: {what} belongs to contact {id}; merge the contacts first (MergeContacts)",
                        if input.path.is_empty() {
                            "contact"
                        } else {
                            &input.path
                        }
                    ),
                ));
            }
        }
        if primary.is_none() {
            primary = keys
                .iter()
                .filter(|(kind, _)| *kind == "phone")
                .find_map(|(kind, value)| self.owner_of(kind, value));
        }
        let anonymous_hits: Vec<Uuid> = keys
            .iter()
            .filter(|(kind, _)| *kind == "anonymous")
            .filter_map(|(kind, value)| self.owner_of(kind, value))
            .collect();
        if primary.is_none() {
            primary = anonymous_hits.first().copied();
        }
        for id in anonymous_hits {
            if Some(id) != primary && !to_merge.contains(&id) && self.is_anonymous(id) {
                to_merge.push(id);
            }
        }
        if !input.lifecycle_stage.is_empty() && !self.stages.contains(&input.lifecycle_stage) {
            return Err(ApiError::invalid_field(
                input.field("lifecycle_stage"),
                format!(
                    "is not a lifecycle stage of this workspace ({})",
                    self.stages.join(", ")
                ),
            ));
        }

        // Valid: from here on the plan changes.
        let now = self.now;
        let (id, created) = match primary {
            Some(id) => (id, false),
            None => {
                let id = rapport_core::ids::new_id();
                let row = new_row(id, now);
                self.contacts.insert(
                    id,
                    Working {
                        row,
                        before: None,
                        merged: Vec::new(),
                        consent_log: Vec::new(),
                        confirmation: None,
                        cause: String::new(),
                        source: String::new(),
                        field_times: Vec::new(),
                    },
                );
                self.order.push(id);
                (id, true)
            }
        };
        for merged in to_merge {
            self.fold(id, merged);
        }
        // Identities the input brings that nobody holds yet.
        for (kind, value) in &keys {
            let key = ((*kind).to_owned(), value.clone());
            if !self.owner.contains_key(&key) {
                self.owner.insert(key, id);
                let identity = IdentityRow {
                    contact_id: id,
                    kind: (*kind).to_owned(),
                    value: value.clone(),
                };
                self.identities.push(identity.clone());
                self.new_identities.push(identity);
            }
        }
        let first_stage = self
            .stages
            .first()
            .cloned()
            .unwrap_or_else(|| DEFAULT_STAGES[0].to_owned());
        let identities = &self.identities;
        let working = self.contacts.get_mut(&id).expect("planned contact");
        working.field_times.append(&mut input.field_times);
        let row = &mut working.row;
        for (value, slot) in [
            (&mut input.email, &mut row.email),
            (&mut input.phone, &mut row.phone),
            (&mut input.first_name, &mut row.first_name),
            (&mut input.last_name, &mut row.last_name),
            (&mut input.company, &mut row.company),
            (&mut input.job_title, &mut row.job_title),
            (&mut input.time_zone, &mut row.time_zone),
            (&mut input.locale, &mut row.locale),
            (&mut input.country, &mut row.country),
            (&mut input.owner_id, &mut row.owner_id),
            (&mut input.lifecycle_stage, &mut row.lifecycle_stage),
        ] {
            if !value.is_empty() {
                *slot = std::mem::take(value);
            }
        }
        // A contact becomes a lead (the first stage) once it is known by
        // more than tracking ids.
        if row.lifecycle_stage.is_empty() && !row.is_anonymous(identities) {
            row.lifecycle_stage = first_stage;
        }
        if input.company_id.is_some() {
            row.company_id = input.company_id;
        }
        if !input.tags.is_empty() {
            let mut tags = std::mem::take(&mut row.tags);
            tags.extend(input.tags);
            tags.sort();
            tags.dedup();
            row.tags = tags;
        }
        merge_object(&mut row.attributes, input.attributes);
        merge_object(&mut row.custom_fields, input.custom_fields);
        if let Some(touch) = input.touch.filter(|t| !t.is_empty()) {
            let value = serde_json::to_value(&touch).unwrap_or_default();
            if row.first_touch.is_none() {
                row.first_touch = Some(value.clone());
            }
            row.last_touch = Some(value);
        }
        if created {
            row.source = if input.source.is_empty() {
                "api".to_owned()
            } else {
                input.source.clone()
            };
        }
        for (channel, change) in [
            (Channel::Email, input.email_consent),
            (Channel::Sms, input.sms_consent),
        ] {
            let Some(change) = change else { continue };
            let current = row.consent(channel).status();
            if let Some(next) = consent::next(current, &change) {
                row.set_consent(
                    channel,
                    ConsentState {
                        status: status_text(next).to_owned(),
                        reason: change.reason.clone(),
                        changed_at: Some(now),
                    },
                );
                working.consent_log.push((
                    channel,
                    status_text(next).to_owned(),
                    status_text(current).to_owned(),
                    change.reason,
                ));
            }
        }
        if input.confirmation.is_some() {
            working.confirmation = input.confirmation;
        }
        working.source = if input.source.is_empty() {
            "api".to_owned()
        } else {
            input.source
        };
        working.cause = [input.stage_cause, working.source.clone()]
            .into_iter()
            .find(|c| !c.is_empty())
            .unwrap_or_else(|| "api".to_owned());
        Ok((id, created))
    }

    /// Folds `merged` into `survivor` by the merge rule (docs/contacts.md).
    fn fold(&mut self, survivor: Uuid, merged: Uuid) {
        let Some(gone) = self.contacts.remove(&merged) else {
            return;
        };
        self.order.retain(|id| *id != merged);
        self.folded.insert(merged, survivor);
        if gone.before.is_some() {
            self.merges.push((survivor, merged));
        }
        for identity in self
            .identities
            .iter_mut()
            .chain(self.new_identities.iter_mut())
        {
            if identity.contact_id == merged {
                identity.contact_id = survivor;
            }
        }
        for owner in self.owner.values_mut() {
            if *owner == merged {
                *owner = survivor;
            }
        }
        let now = self.now;
        let working = self.contacts.get_mut(&survivor).expect("survivor planned");
        fold_row(&mut working.row, &gone.row, now);
        // A contact this write created and folded at once was never stored:
        // nobody needs to hear that it went.
        if gone.before.is_some() {
            working.merged.push(merged);
        }
        working.merged.extend(gone.merged);
        working.field_times.extend(gone.field_times);
        if working.confirmation.is_none() {
            working.confirmation = gone.confirmation;
        }
    }
}

fn new_row(id: Uuid, now: DateTime<Utc>) -> ContactRow {
    ContactRow {
        workspace_id: Uuid::nil(),
        contact_id: id,
        email: String::new(),
        phone: String::new(),
        first_name: String::new(),
        last_name: String::new(),
        company: String::new(),
        lifecycle_stage: String::new(),
        tags: Vec::new(),
        attributes: serde_json::json!({}),
        source: String::new(),
        created_at: now,
        updated_at: now,
        email_consent: "unspecified".into(),
        email_consent_reason: String::new(),
        email_consent_at: None,
        sms_consent: "unspecified".into(),
        sms_consent_reason: String::new(),
        sms_consent_at: None,
        job_title: String::new(),
        time_zone: String::new(),
        locale: String::new(),
        country: String::new(),
        owner_id: String::new(),
        score: 0,
        custom_fields: serde_json::json!({}),
        first_touch: None,
        last_touch: None,
        company_id: None,
        order_count: 0,
        first_purchase_at: None,
        last_purchase_at: None,
        spend: serde_json::json!([]),
    }
}

/// Sets the keys of `update` on `target`; a null removes the key.
fn merge_object(
    target: &mut serde_json::Value,
    update: serde_json::Map<String, serde_json::Value>,
) {
    if update.is_empty() {
        return;
    }
    if !target.is_object() {
        *target = serde_json::json!({});
    }
    let object = target.as_object_mut().expect("object");
    for (key, value) in update {
        if value.is_null() {
            object.remove(&key);
        } else {
            object.insert(key, value);
        }
    }
}

/// The merge rule, applied to the rows:
/// - the survivor keeps every field it has; empty ones take the merged
///   contact's value; tags are united; attributes and custom fields keep the
///   survivor's keys and add the others;
/// - consent: an unsubscribe on either side wins (who opted out stays out);
///   otherwise the more recent change;
/// - score and order aggregates add up; the first touch is the earlier, the
///   last touch the later; the earlier creation time and its source stay.
pub fn fold_row(survivor: &mut ContactRow, gone: &ContactRow, now: DateTime<Utc>) {
    for (slot, value) in [
        (&mut survivor.email, &gone.email),
        (&mut survivor.phone, &gone.phone),
        (&mut survivor.first_name, &gone.first_name),
        (&mut survivor.last_name, &gone.last_name),
        (&mut survivor.company, &gone.company),
        (&mut survivor.job_title, &gone.job_title),
        (&mut survivor.time_zone, &gone.time_zone),
        (&mut survivor.locale, &gone.locale),
        (&mut survivor.country, &gone.country),
        (&mut survivor.owner_id, &gone.owner_id),
        (&mut survivor.lifecycle_stage, &gone.lifecycle_stage),
    ] {
        if slot.is_empty() {
            slot.clone_from(value);
        }
    }
    if survivor.company_id.is_none() {
        survivor.company_id = gone.company_id;
    }
    let mut tags = survivor.tags.clone();
    tags.extend(gone.tags.iter().cloned());
    tags.sort();
    tags.dedup();
    survivor.tags = tags;
    for (target, other) in [
        (&mut survivor.attributes, &gone.attributes),
        (&mut survivor.custom_fields, &gone.custom_fields),
    ] {
        if let (Some(target), Some(other)) = (target.as_object_mut(), other.as_object()) {
            for (key, value) in other {
                target.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
    }
    for channel in [Channel::Email, Channel::Sms] {
        let mine = survivor.consent(channel);
        let theirs = gone.consent(channel);
        let take_theirs = match (mine.status(), theirs.status()) {
            (ConsentStatus::Unsubscribed, _) => false,
            (_, ConsentStatus::Unsubscribed) => true,
            (_, ConsentStatus::Unspecified) => false,
            (ConsentStatus::Unspecified, _) => true,
            _ => theirs.changed_at > mine.changed_at,
        };
        if take_theirs {
            survivor.set_consent(channel, theirs);
        }
    }
    survivor.score += gone.score;
    let touch_time =
        |t: &Option<serde_json::Value>| crate::store::touch_of(t.as_ref()).map(|t| t.at);
    if gone.first_touch.is_some()
        && (survivor.first_touch.is_none()
            || touch_time(&gone.first_touch) < touch_time(&survivor.first_touch))
    {
        survivor.first_touch.clone_from(&gone.first_touch);
    }
    if gone.last_touch.is_some()
        && (survivor.last_touch.is_none()
            || touch_time(&gone.last_touch) > touch_time(&survivor.last_touch))
    {
        survivor.last_touch.clone_from(&gone.last_touch);
    }
    if gone.created_at < survivor.created_at {
        survivor.created_at = gone.created_at;
        if !gone.source.is_empty() {
            survivor.source.clone_from(&gone.source);
        }
    }
    survivor.order_count += gone.order_count;
    survivor.first_purchase_at = [survivor.first_purchase_at, gone.first_purchase_at]
        .into_iter()
        .flatten()
        .min();
    survivor.last_purchase_at = [survivor.last_purchase_at, gone.last_purchase_at]
        .into_iter()
        .flatten()
        .max();
    let mut spend = survivor.spend();
    for theirs in gone.spend() {
        match spend.iter_mut().find(|s| s.currency == theirs.currency) {
            Some(mine) => {
                mine.order_count += theirs.order_count;
                mine.total_micros += theirs.total_micros;
            }
            None => spend.push(theirs),
        }
    }
    survivor.spend = serde_json::to_value(&spend).unwrap_or_else(|_| serde_json::json!([]));
    survivor.updated_at = now;
}

/// The fields that differ between two versions of a contact.
pub fn changed_fields(before: &ContactRow, after: &ContactRow) -> Vec<String> {
    let mut changed = Vec::new();
    let mut check = |name: &str, differs: bool| {
        if differs {
            changed.push(name.to_owned());
        }
    };
    check("email", before.email != after.email);
    check("phone", before.phone != after.phone);
    check("first_name", before.first_name != after.first_name);
    check("last_name", before.last_name != after.last_name);
    check("company", before.company != after.company);
    check("job_title", before.job_title != after.job_title);
    check("time_zone", before.time_zone != after.time_zone);
    check("locale", before.locale != after.locale);
    check("country", before.country != after.country);
    check("owner_id", before.owner_id != after.owner_id);
    check(
        "lifecycle_stage",
        before.lifecycle_stage != after.lifecycle_stage,
    );
    check("company_id", before.company_id != after.company_id);
    check("tags", before.tags != after.tags);
    check("attributes", before.attributes != after.attributes);
    check("custom_fields", before.custom_fields != after.custom_fields);
    check("first_touch", before.first_touch != after.first_touch);
    check("last_touch", before.last_touch != after.last_touch);
    check(
        "email_consent",
        before.email_consent != after.email_consent
            || before.email_consent_reason != after.email_consent_reason,
    );
    check(
        "sms_consent",
        before.sms_consent != after.sms_consent
            || before.sms_consent_reason != after.sms_consent_reason,
    );
    check("score", before.score != after.score);
    check(
        "orders",
        before.order_count != after.order_count || before.spend != after.spend,
    );
    changed
}

/// Writes `rows` (new or changed) in one statement.
pub async fn save_rows(
    transaction: &mut Transaction<'_, Postgres>,
    rows: &[&ContactRow],
) -> Result<(), ApiError> {
    if rows.is_empty() {
        return Ok(());
    }
    let json = sqlx::types::Json(rows);
    let updates = COLUMNS
        .split(',')
        .map(str::trim)
        .filter(|c| *c != "workspace_id" && *c != "contact_id")
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO contacts ({COLUMNS})
         SELECT {COLUMNS} FROM jsonb_populate_recordset(NULL::contacts, $1)
         ON CONFLICT (workspace_id, contact_id) DO UPDATE SET {updates}"
    )))
    .bind(json)
    .execute(&mut **transaction)
    .await
    .map_err(map_db_error)?;
    Ok(())
}

/// Moves everything recorded about `merged` to `survivor` and removes
/// `merged`, which resolves to `survivor` from then on.
pub async fn repoint(
    transaction: &mut Transaction<'_, Postgres>,
    workspace: WorkspaceId,
    survivor: Uuid,
    merged: Uuid,
) -> Result<(), ApiError> {
    // Where both have a CRM field time, the survivor's stays.
    sqlx::query(
        "DELETE FROM field_times f WHERE workspace_id = $1 AND contact_id = $3
           AND EXISTS (SELECT 1 FROM field_times s WHERE s.workspace_id = $1 AND s.contact_id = $2 AND s.field = f.field)",
    )
    .bind(workspace.0)
    .bind(survivor)
    .bind(merged)
    .execute(&mut **transaction)
    .await
    .map_err(map_db_error)?;
    for table in [
        "identities",
        "notes",
        "stage_changes",
        "consent_changes",
        "score_changes",
        "orders",
        "timeline",
        "field_times",
        "deals",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {table} SET contact_id = $2 WHERE workspace_id = $1 AND contact_id = $3"
        )))
        .bind(workspace.0)
        .bind(survivor)
        .bind(merged)
        .execute(&mut **transaction)
        .await
        .map_err(map_db_error)?;
    }
    sqlx::query("DELETE FROM contacts WHERE workspace_id = $1 AND contact_id = $2")
        .bind(workspace.0)
        .bind(merged)
        .execute(&mut **transaction)
        .await
        .map_err(map_db_error)?;
    sqlx::query(
        "UPDATE merged_contacts SET survivor_id = $2 WHERE workspace_id = $1 AND survivor_id = $3",
    )
    .bind(workspace.0)
    .bind(survivor)
    .bind(merged)
    .execute(&mut **transaction)
    .await
    .map_err(map_db_error)?;
    sqlx::query(
        "INSERT INTO merged_contacts (workspace_id, merged_id, survivor_id) VALUES ($1, $2, $3)
         ON CONFLICT (workspace_id, merged_id) DO UPDATE SET survivor_id = EXCLUDED.survivor_id",
    )
    .bind(workspace.0)
    .bind(merged)
    .bind(survivor)
    .execute(&mut **transaction)
    .await
    .map_err(map_db_error)?;
    Ok(())
}

/// Results of one write, one per input.
pub type WriteResults = Vec<Result<UpsertOutcome, ApiError>>;

impl Store {
    /// Creates or updates one contact (see [`Store::write`]).
    pub async fn upsert(
        &self,
        workspace: WorkspaceId,
        request_id: Option<&str>,
        input: ContactInput,
    ) -> Result<UpsertOutcome, ApiError> {
        // Request ids of single and batch upserts are apart.
        let request_id = request_id.map(|id| format!("upsert:{id}"));
        self.write(workspace, request_id.as_deref(), vec![input], false)
            .await?
            .pop()
            .expect("one result per input")
    }

    /// Writes `inputs` in one transaction. With `partial`, an input that
    /// cannot be written gets its error in the results and the others are
    /// written; otherwise any error fails the whole write. A repeated
    /// `request_id` returns the first results without writing.
    #[tracing::instrument(
        name = "db",
        skip_all,
        fields(
            otel.kind = "client",
            otel.name = "UPSERT contacts",
            db.system.name = "postgresql",
            db.operation.name = "UPSERT",
            db.collection.name = "contacts",
            contacts = inputs.len(),
        )
    )]
    pub async fn write(
        &self,
        workspace: WorkspaceId,
        request_id: Option<&str>,
        inputs: Vec<ContactInput>,
        partial: bool,
    ) -> Result<WriteResults, ApiError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .write_once(workspace, request_id, inputs.clone(), partial)
                .await
            {
                Err(error)
                    if attempt < 4
                        && matches!(error.code, ErrorCode::AlreadyExists | ErrorCode::Aborted) =>
                {
                    tracing::debug!(%error.message, attempt, "contact write raced another; retrying");
                }
                result => return result,
            }
        }
    }

    async fn write_once(
        &self,
        workspace: WorkspaceId,
        request_id: Option<&str>,
        inputs: Vec<ContactInput>,
        partial: bool,
    ) -> Result<WriteResults, ApiError> {
        let mut transaction = self.pool().begin().await.map_err(map_db_error)?;
        if let Some(request_id) = request_id {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || ':write:' || $2, 0))")
                .bind(workspace.0.to_string())
                .bind(request_id)
                .execute(&mut *transaction)
                .await
                .map_err(map_db_error)?;
            let previous: Option<(Vec<Uuid>, Vec<bool>)> = sqlx::query_as(
                "SELECT contact_ids, created FROM batch_requests WHERE workspace_id = $1 AND request_id = $2",
            )
            .bind(workspace.0)
            .bind(request_id)
            .fetch_optional(&mut *transaction)
            .await
            .map_err(map_db_error)?;
            if let Some((ids, created)) = previous {
                transaction.rollback().await.map_err(map_db_error)?;
                let found = self.get_many(workspace, &ids).await?;
                return Ok(ids
                    .iter()
                    .zip(created)
                    .map(|(id, created)| {
                        found
                            .get(id)
                            .cloned()
                            .map(|profile| UpsertOutcome { profile, created })
                            .ok_or_else(|| ApiError::not_found(format!("contact {id}")))
                    })
                    .collect());
            }
        }
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
            .fetch_one(&mut *transaction)
            .await
            .map_err(map_db_error)?;

        // Custom fields, checked against the workspace's definitions.
        let mut inputs = inputs;
        let mut failures: HashMap<usize, ApiError> = HashMap::new();
        if inputs.iter().any(|i| !i.custom_fields.is_empty()) {
            let definitions = fields::definitions(&mut *transaction, workspace).await?;
            for (index, input) in inputs.iter_mut().enumerate() {
                if input.custom_fields.is_empty() {
                    continue;
                }
                let mut violations = Vec::new();
                let path = input.field("custom_fields");
                input.custom_fields = fields::check_values(
                    &definitions,
                    &input.custom_fields,
                    &path,
                    &mut violations,
                );
                if !violations.is_empty() {
                    failures.insert(index, ApiError::invalid_fields(violations));
                }
            }
        }
        if !partial && !failures.is_empty() {
            return Err(combine(failures));
        }

        // Find the contacts the inputs name, and lock them.
        let mut kinds = Vec::new();
        let mut values = Vec::new();
        for input in &inputs {
            for (kind, value) in input.identities() {
                kinds.push(kind.to_owned());
                values.push(value);
            }
        }
        let found = sqlx::query_as::<_, IdentityRow>(
            "SELECT i.contact_id, i.kind, i.value FROM identities i
             JOIN UNNEST($2::text[], $3::text[]) AS asked(kind, value)
               ON i.kind = asked.kind AND i.value = asked.value
             WHERE i.workspace_id = $1",
        )
        .bind(workspace.0)
        .bind(&kinds)
        .bind(&values)
        .fetch_all(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        let explicit: Vec<Uuid> = inputs.iter().filter_map(|i| i.contact_id).collect();
        let redirects: Vec<(Uuid, Uuid)> = if explicit.is_empty() {
            Vec::new()
        } else {
            sqlx::query_as(
                "SELECT merged_id, survivor_id FROM merged_contacts WHERE workspace_id = $1 AND merged_id = ANY($2)",
            )
            .bind(workspace.0)
            .bind(&explicit)
            .fetch_all(&mut *transaction)
            .await
            .map_err(map_db_error)?
        };
        let mut ids: BTreeSet<Uuid> = found.iter().map(|i| i.contact_id).collect();
        ids.extend(explicit.iter().copied());
        ids.extend(redirects.iter().map(|(_, survivor)| *survivor));
        let ids: Vec<Uuid> = ids.into_iter().collect();
        let rows = if ids.is_empty() {
            Vec::new()
        } else {
            sqlx::query_as::<_, ContactRow>(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM contacts WHERE workspace_id = $1 AND contact_id = ANY($2)
                 ORDER BY contact_id FOR UPDATE"
            )))
            .bind(workspace.0)
            .bind(&ids)
            .fetch_all(&mut *transaction)
            .await
            .map_err(map_db_error)?
        };
        let identities = if rows.is_empty() {
            Vec::new()
        } else {
            let locked: Vec<Uuid> = rows.iter().map(|r| r.contact_id).collect();
            identities_of(&mut *transaction, workspace, &locked).await?
        };
        let stages = stages_in(&mut *transaction, workspace).await?;

        let mut plan = Plan {
            now,
            stages,
            contacts: HashMap::new(),
            order: Vec::new(),
            owner: identities
                .iter()
                .map(|i| ((i.kind.clone(), i.value.clone()), i.contact_id))
                .collect(),
            identities,
            new_identities: Vec::new(),
            merges: Vec::new(),
            folded: redirects.into_iter().collect(),
        };
        for row in rows {
            plan.order.push(row.contact_id);
            plan.contacts.insert(
                row.contact_id,
                Working {
                    before: Some(row.clone()),
                    row,
                    merged: Vec::new(),
                    consent_log: Vec::new(),
                    confirmation: None,
                    cause: String::new(),
                    source: String::new(),
                    field_times: Vec::new(),
                },
            );
        }
        let mut planned: Vec<Result<(Uuid, bool), ApiError>> = Vec::with_capacity(inputs.len());
        for (index, input) in inputs.into_iter().enumerate() {
            if let Some(error) = failures.remove(&index) {
                planned.push(Err(error));
                continue;
            }
            let result = match plan.apply(input) {
                Err(error) if !partial => return Err(error),
                result => result,
            };
            planned.push(result);
        }

        // Each contact's identities, once, for the events and the answer.
        let mut identities_by_contact: HashMap<Uuid, Vec<IdentityRow>> = HashMap::new();
        for identity in &plan.identities {
            let owner = plan.survivor(identity.contact_id);
            identities_by_contact
                .entry(owner)
                .or_default()
                .push(IdentityRow {
                    contact_id: owner,
                    ..identity.clone()
                });
        }

        // Write.
        for (survivor, merged) in &plan.merges {
            let survivor = plan.survivor(*survivor);
            repoint(&mut transaction, workspace, survivor, *merged).await?;
        }
        let mut to_save = Vec::new();
        let mut events = Vec::new();
        let mut stage_log = Vec::new();
        let mut consent_log = Vec::new();
        let mut entries = Vec::new();
        for id in &plan.order {
            let Some(working) = plan.contacts.get_mut(id) else {
                continue;
            };
            working.row.workspace_id = workspace.0;
            let contact_id = id.to_string();
            let (change_type, changed, previous_stage) = match &working.before {
                None => (ChangeType::Created, Vec::new(), String::new()),
                Some(before) => {
                    let changed = changed_fields(before, &working.row);
                    if changed.is_empty() && working.merged.is_empty() {
                        continue;
                    }
                    working.row.updated_at = now;
                    let change_type = if !working.merged.is_empty() {
                        ChangeType::Merged
                    } else if before.lifecycle_stage != working.row.lifecycle_stage {
                        ChangeType::StageChanged
                    } else {
                        ChangeType::Updated
                    };
                    (change_type, changed, before.lifecycle_stage.clone())
                }
            };
            let row = &working.row;
            if previous_stage != row.lifecycle_stage && !row.lifecycle_stage.is_empty() {
                stage_log.push((
                    *id,
                    row.lifecycle_stage.clone(),
                    previous_stage.clone(),
                    working.cause.clone(),
                ));
                // A new contact's first stage is part of its creation entry.
                if change_type != ChangeType::Created {
                    entries.push(Entry::stage(
                        *id,
                        &previous_stage,
                        &row.lifecycle_stage,
                        &working.cause,
                    ));
                }
            }
            match change_type {
                ChangeType::Created => {
                    entries.push(Entry::created(*id, &row.source, &row.lifecycle_stage))
                }
                _ if !changed.is_empty() => {
                    entries.push(Entry::fields(*id, &changed, &working.source))
                }
                _ => {}
            }
            if !working.merged.is_empty() {
                entries.push(Entry::merged(*id, &working.merged));
            }
            for (channel, status, previous, reason) in &working.consent_log {
                consent_log.push((
                    *id,
                    *channel,
                    status.clone(),
                    previous.clone(),
                    reason.clone(),
                ));
                entries.push(Entry::consent(*id, channel.as_str(), status, reason));
            }
            events.push(event_record(
                workspace,
                ContactChanged {
                    contact_id: contact_id.clone(),
                    change_type: change_type.into(),
                    contact: Some(
                        row.snapshot(identities_by_contact.get(id).map_or(&[], Vec::as_slice)),
                    ),
                    changed_fields: changed,
                    merged_contact_ids: working.merged.iter().map(Uuid::to_string).collect(),
                    previous_stage: if change_type == ChangeType::StageChanged {
                        previous_stage
                    } else {
                        String::new()
                    },
                    source: if change_type == ChangeType::Created {
                        row.source.clone()
                    } else {
                        working.source.clone()
                    },
                },
            ));
            // A new contact that absorbed anonymous ones: created, then
            // merged, so the other services drop the merged ids.
            if change_type == ChangeType::Created && !working.merged.is_empty() {
                events.push(event_record(
                    workspace,
                    ContactChanged {
                        contact_id: contact_id.clone(),
                        change_type: ChangeType::Merged.into(),
                        contact: Some(
                            row.snapshot(identities_by_contact.get(id).map_or(&[], Vec::as_slice)),
                        ),
                        merged_contact_ids: working.merged.iter().map(Uuid::to_string).collect(),
                        source: working.source.clone(),
                        ..Default::default()
                    },
                ));
            }
            if let Some(request) = &working.confirmation
                && row.consent(Channel::Email).status() == ConsentStatus::Pending
            {
                let requested = ConsentRequested {
                    contact_id: contact_id.clone(),
                    channel: "email".into(),
                    email: row.email.clone(),
                    template: request.template.clone(),
                    form_id: request.form_id.clone(),
                    request_id: request.request_id.clone(),
                };
                let envelope = envelope::new_envelope(
                    &workspace.to_string(),
                    "contacts",
                    Payload::ConsentRequested(requested),
                );
                events.push(envelope::to_record(
                    topics::CONTACT_CHANGES,
                    &contact_id,
                    &envelope,
                ));
            }
            to_save.push(*id);
        }
        let rows: Vec<&ContactRow> = to_save
            .iter()
            .filter_map(|id| plan.contacts.get(id).map(|w| &w.row))
            .collect();
        save_rows(&mut transaction, &rows).await?;
        if !plan.new_identities.is_empty() {
            let kinds: Vec<&str> = plan
                .new_identities
                .iter()
                .map(|i| i.kind.as_str())
                .collect();
            let values: Vec<&str> = plan
                .new_identities
                .iter()
                .map(|i| i.value.as_str())
                .collect();
            let owners: Vec<Uuid> = plan
                .new_identities
                .iter()
                .map(|i| plan.survivor(i.contact_id))
                .collect();
            sqlx::query(
                "INSERT INTO identities (workspace_id, kind, value, contact_id)
                 SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::uuid[])",
            )
            .bind(workspace.0)
            .bind(&kinds)
            .bind(&values)
            .bind(&owners)
            .execute(&mut *transaction)
            .await
            .map_err(map_db_error)?;
        }
        log_stages(&mut transaction, workspace, &stage_log).await?;
        log_consent(&mut transaction, workspace, &consent_log).await?;
        // The newest source time per (contact, field) this write sets.
        let mut times: HashMap<(Uuid, &str), (&str, DateTime<Utc>)> = HashMap::new();
        for id in &plan.order {
            let Some(working) = plan.contacts.get(id) else {
                continue;
            };
            for (field, source, at) in &working.field_times {
                let slot = times
                    .entry((*id, field.as_str()))
                    .or_insert((source.as_str(), *at));
                if *at > slot.1 {
                    *slot = (source.as_str(), *at);
                }
            }
        }
        if !times.is_empty() {
            let contacts: Vec<Uuid> = times.keys().map(|(id, _)| *id).collect();
            let names: Vec<&str> = times.keys().map(|(_, field)| *field).collect();
            let sources: Vec<&str> = times.values().map(|(source, _)| *source).collect();
            let at: Vec<DateTime<Utc>> = times.values().map(|(_, at)| *at).collect();
            sqlx::query(
                "INSERT INTO field_times (workspace_id, contact_id, field, source, source_time)
                 SELECT $1, * FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::timestamptz[])
                 ON CONFLICT (workspace_id, contact_id, field) DO UPDATE
                 SET source = EXCLUDED.source, source_time = EXCLUDED.source_time
                 WHERE field_times.source_time <= EXCLUDED.source_time",
            )
            .bind(workspace.0)
            .bind(&contacts)
            .bind(&names)
            .bind(&sources)
            .bind(&at)
            .execute(&mut *transaction)
            .await
            .map_err(map_db_error)?;
        }
        timeline::insert(&mut transaction, workspace, &entries).await?;
        let published = !events.is_empty();
        outbox::enqueue_many(&mut transaction, events)
            .await
            .map_err(map_db_error)?;

        let outcomes: Vec<Result<(Uuid, bool), ApiError>> = planned
            .into_iter()
            .map(|result| {
                result.map(|(id, created)| {
                    let id = plan.survivor(id);
                    // Created only if what it became was new as well.
                    (id, created && plan.contacts[&id].before.is_none())
                })
            })
            .collect();
        if let Some(request_id) = request_id {
            let ids: Vec<Uuid> = outcomes
                .iter()
                .map(|r| {
                    r.as_ref()
                        .map(|(id, _)| *id)
                        .unwrap_or_else(|_| Uuid::nil())
                })
                .collect();
            let created: Vec<bool> = outcomes
                .iter()
                .map(|r| r.as_ref().is_ok_and(|(_, created)| *created))
                .collect();
            sqlx::query(
                "INSERT INTO batch_requests (workspace_id, request_id, contact_ids, created) VALUES ($1, $2, $3, $4)",
            )
            .bind(workspace.0)
            .bind(request_id)
            .bind(&ids)
            .bind(&created)
            .execute(&mut *transaction)
            .await
            .map_err(map_db_error)?;
        }
        transaction.commit().await.map_err(map_db_error)?;
        if published {
            self.waker.wake();
        }
        Ok(outcomes
            .into_iter()
            .map(|result| {
                result.map(|(id, created)| UpsertOutcome {
                    profile: Profile {
                        row: plan.contacts[&id].row.clone(),
                        identities: identities_by_contact.get(&id).cloned().unwrap_or_default(),
                    },
                    created,
                })
            })
            .collect())
    }

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
        let source = change.reason.clone();
        let mut input = ContactInput {
            contact_id: Some(contact_id),
            source,
            ..Default::default()
        };
        match channel {
            Channel::Email => input.email_consent = Some(change),
            Channel::Sms => input.sms_consent = Some(change),
        }
        Ok(self.upsert(workspace, None, input).await?.profile.row)
    }

    /// Merges `merged` into `survivor` (MergeContacts). Ids already merged
    /// into the survivor are skipped, so a repeat changes nothing.
    pub async fn merge(
        &self,
        workspace: WorkspaceId,
        survivor: Uuid,
        merged: &[Uuid],
    ) -> Result<Profile, ApiError> {
        let mut transaction = self.pool().begin().await.map_err(map_db_error)?;
        let survivor = Store::resolve_id(&mut *transaction, workspace, survivor).await?;
        let mut others = Vec::new();
        for id in merged {
            let id = Store::resolve_id(&mut *transaction, workspace, *id).await?;
            if id != survivor && !others.contains(&id) {
                others.push(id);
            }
        }
        let mut ids = others.clone();
        ids.push(survivor);
        ids.sort();
        let rows = sqlx::query_as::<_, ContactRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM contacts WHERE workspace_id = $1 AND contact_id = ANY($2)
             ORDER BY contact_id FOR UPDATE"
        )))
        .bind(workspace.0)
        .bind(&ids)
        .fetch_all(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        let mut by_id: HashMap<Uuid, ContactRow> =
            rows.into_iter().map(|row| (row.contact_id, row)).collect();
        let Some(mut row) = by_id.remove(&survivor) else {
            return Err(ApiError::not_found(format!("contact {survivor}")));
        };
        if let Some(missing) = others.iter().find(|id| !by_id.contains_key(id)) {
            return Err(ApiError::not_found(format!("contact {missing}")));
        }
        if others.is_empty() {
            transaction.rollback().await.map_err(map_db_error)?;
            return self.profile(workspace, survivor).await;
        }
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
            .fetch_one(&mut *transaction)
            .await
            .map_err(map_db_error)?;
        let before = row.clone();
        // The most recently changed first: their values win over older ones.
        others.sort_by_key(|id| std::cmp::Reverse(by_id[id].updated_at));
        for id in &others {
            fold_row(&mut row, &by_id[id], now);
            repoint(&mut transaction, workspace, survivor, *id).await?;
        }
        if row.lifecycle_stage.is_empty() {
            let stages = stages_in(&mut *transaction, workspace).await?;
            row.lifecycle_stage = stages.first().cloned().unwrap_or_default();
        }
        row.updated_at = now;
        save_rows(&mut transaction, &[&row]).await?;
        // What the fold changed in the stage or consent goes in their logs.
        if row.lifecycle_stage != before.lifecycle_stage {
            let change = (
                survivor,
                row.lifecycle_stage.clone(),
                before.lifecycle_stage.clone(),
                "merge".to_owned(),
            );
            log_stages(&mut transaction, workspace, &[change]).await?;
        }
        let consent: Vec<ConsentLog> = [Channel::Email, Channel::Sms]
            .into_iter()
            .filter_map(|channel| {
                let (old, new) = (before.consent(channel), row.consent(channel));
                (old.status != new.status).then(|| {
                    let reason = format!("merge ({})", new.reason);
                    (survivor, channel, new.status, old.status, reason)
                })
            })
            .collect();
        log_consent(&mut transaction, workspace, &consent).await?;
        let identities = identities_of(&mut *transaction, workspace, &[survivor]).await?;
        let changed = changed_fields(&before, &row);
        timeline::insert(
            &mut transaction,
            workspace,
            &[Entry::merged(survivor, &others)],
        )
        .await?;
        outbox::enqueue_many(
            &mut transaction,
            vec![event_record(
                workspace,
                ContactChanged {
                    contact_id: survivor.to_string(),
                    change_type: ChangeType::Merged.into(),
                    contact: Some(row.snapshot(&identities)),
                    changed_fields: changed,
                    merged_contact_ids: others.iter().map(Uuid::to_string).collect(),
                    source: "api".into(),
                    ..Default::default()
                },
            )],
        )
        .await
        .map_err(map_db_error)?;
        transaction.commit().await.map_err(map_db_error)?;
        self.waker.wake();
        Ok(Profile { row, identities })
    }
}

/// A row of `stage_changes`: contact, stage, previous stage, cause.
type StageLog = (Uuid, String, String, String);
/// A row of `consent_changes`: contact, channel, status, previous, reason.
type ConsentLog = (Uuid, Channel, String, String, String);

/// Adds rows to `stage_changes` in one statement.
async fn log_stages(
    transaction: &mut Transaction<'_, Postgres>,
    workspace: WorkspaceId,
    rows: &[StageLog],
) -> Result<(), ApiError> {
    if rows.is_empty() {
        return Ok(());
    }
    let contacts: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let change_ids: Vec<Uuid> = rows.iter().map(|_| rapport_core::ids::new_id()).collect();
    let stages: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    let previous: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    let causes: Vec<&str> = rows.iter().map(|r| r.3.as_str()).collect();
    sqlx::query(
        "INSERT INTO stage_changes (workspace_id, contact_id, change_id, stage, previous_stage, cause)
         SELECT $1, * FROM UNNEST($2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[])",
    )
    .bind(workspace.0)
    .bind(&contacts)
    .bind(&change_ids)
    .bind(&stages)
    .bind(&previous)
    .bind(&causes)
    .execute(&mut **transaction)
    .await
    .map_err(map_db_error)?;
    Ok(())
}

/// Adds rows to `consent_changes` in one statement.
async fn log_consent(
    transaction: &mut Transaction<'_, Postgres>,
    workspace: WorkspaceId,
    rows: &[ConsentLog],
) -> Result<(), ApiError> {
    if rows.is_empty() {
        return Ok(());
    }
    let contacts: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let channels: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    let statuses: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    let previous: Vec<&str> = rows.iter().map(|r| r.3.as_str()).collect();
    let reasons: Vec<&str> = rows.iter().map(|r| r.4.as_str()).collect();
    sqlx::query(
        "INSERT INTO consent_changes (workspace_id, contact_id, channel, status, previous_status, reason)
         SELECT $1, * FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[])",
    )
    .bind(workspace.0)
    .bind(&contacts)
    .bind(&channels)
    .bind(&statuses)
    .bind(&previous)
    .bind(&reasons)
    .execute(&mut **transaction)
    .await
    .map_err(map_db_error)?;
    Ok(())
}

/// One INVALID_ARGUMENT holding every input's violations, or the first
/// other error.
fn combine(failures: HashMap<usize, ApiError>) -> ApiError {
    let mut failures: Vec<(usize, ApiError)> = failures.into_iter().collect();
    failures.sort_by_key(|(index, _)| *index);
    if let Some(index) = failures
        .iter()
        .position(|(_, e)| e.code != ErrorCode::InvalidArgument)
    {
        return failures.swap_remove(index).1;
    }
    let violations: Vec<FieldViolation> = failures
        .into_iter()
        .flat_map(|(_, error)| error.field_violations)
        .collect();
    ApiError::invalid_fields(violations)
}
