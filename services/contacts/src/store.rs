//! Contacts storage. Every query is scoped by workspace id.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rapport_bus::{envelope, topics};
use rapport_core::json::{json_to_struct, struct_to_json};
use rapport_core::time::to_timestamp;
use rapport_core::{ApiError, WorkspaceId};
use rapport_db::map_db_error;
use rapport_db::outbox::OutboxWaker;
use rapport_proto::common::v1::Money;
use rapport_proto::contacts::v1::{
    Contact, ContactFilter, CurrencySpend, Identity, IdentityKind, OrderAggregates, Touch,
};
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::{ContactChanged, ContactSnapshot};
use serde::{Deserialize, Serialize};
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

use crate::consent::{Channel, ConsentState};

/// A contact as stored: the columns of `contacts`, in table order, so a
/// row can be written back with `jsonb_populate_recordset`.
#[derive(Debug, Clone, FromRow, PartialEq, Serialize, Deserialize)]
pub struct ContactRow {
    pub workspace_id: Uuid,
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
    pub job_title: String,
    pub time_zone: String,
    pub locale: String,
    pub country: String,
    pub owner_id: String,
    pub score: i64,
    pub custom_fields: serde_json::Value,
    pub first_touch: Option<serde_json::Value>,
    pub last_touch: Option<serde_json::Value>,
    pub company_id: Option<Uuid>,
    pub order_count: i64,
    pub first_purchase_at: Option<DateTime<Utc>>,
    pub last_purchase_at: Option<DateTime<Utc>>,
    pub spend: serde_json::Value,
}

pub const COLUMNS: &str = "workspace_id, contact_id, email, phone, first_name, last_name, company, lifecycle_stage, tags, attributes, source, created_at, updated_at, \
    email_consent, email_consent_reason, email_consent_at, sms_consent, sms_consent_reason, sms_consent_at, \
    job_title, time_zone, locale, country, owner_id, score, custom_fields, first_touch, last_touch, company_id, \
    order_count, first_purchase_at, last_purchase_at, spend";

/// [`COLUMNS`] of the table aliased `c`.
static COLUMNS_OF_C: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    COLUMNS
        .split(',')
        .map(|column| format!("c.{}", column.trim()))
        .collect::<Vec<_>>()
        .join(", ")
});

#[derive(FromRow)]
struct FoundRow {
    asked: Uuid,
    identity_list: Vec<String>,
    #[sqlx(flatten)]
    row: ContactRow,
}

/// One identity of a contact: kind is email, phone, external or anonymous.
#[derive(Debug, Clone, FromRow, PartialEq, Eq, Hash)]
pub struct IdentityRow {
    pub contact_id: Uuid,
    pub kind: String,
    pub value: String,
}

pub fn identity_kind(kind: &str) -> IdentityKind {
    match kind {
        "email" => IdentityKind::Email,
        "phone" => IdentityKind::Phone,
        "external" => IdentityKind::External,
        "anonymous" => IdentityKind::Anonymous,
        _ => IdentityKind::Unspecified,
    }
}

/// Total spend in one currency, as kept in `contacts.spend`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Spend {
    pub currency: String,
    pub order_count: i64,
    pub total_micros: i64,
}

/// A touch as kept in `first_touch` / `last_touch`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TouchRecord {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub medium: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub campaign: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub term: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub content: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub referrer: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub landing_url: String,
    pub at: DateTime<Utc>,
}

impl TouchRecord {
    pub fn from_proto(touch: &Touch, now: DateTime<Utc>) -> Self {
        TouchRecord {
            source: touch.source.trim().to_owned(),
            medium: touch.medium.trim().to_owned(),
            campaign: touch.campaign.trim().to_owned(),
            term: touch.term.trim().to_owned(),
            content: touch.content.trim().to_owned(),
            referrer: touch.referrer.trim().to_owned(),
            landing_url: touch.landing_url.trim().to_owned(),
            at: touch
                .touch_time
                .as_ref()
                .and_then(rapport_core::time::from_timestamp)
                .unwrap_or(now),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.source.is_empty()
            && self.medium.is_empty()
            && self.campaign.is_empty()
            && self.referrer.is_empty()
            && self.landing_url.is_empty()
    }

    fn to_proto(&self) -> Touch {
        Touch {
            source: self.source.clone(),
            medium: self.medium.clone(),
            campaign: self.campaign.clone(),
            term: self.term.clone(),
            content: self.content.clone(),
            referrer: self.referrer.clone(),
            landing_url: self.landing_url.clone(),
            touch_time: Some(to_timestamp(self.at)),
        }
    }
}

pub fn touch_of(value: Option<&serde_json::Value>) -> Option<TouchRecord> {
    value.and_then(|v| serde_json::from_value(v.clone()).ok())
}

fn money(currency: &str, micros: i64) -> Money {
    Money {
        currency_code: currency.to_owned(),
        amount_micros: micros,
    }
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

    pub fn set_consent(&mut self, channel: Channel, state: ConsentState) {
        match channel {
            Channel::Email => {
                self.email_consent = state.status;
                self.email_consent_reason = state.reason;
                self.email_consent_at = state.changed_at;
            }
            Channel::Sms => {
                self.sms_consent = state.status;
                self.sms_consent_reason = state.reason;
                self.sms_consent_at = state.changed_at;
            }
        }
    }

    pub fn spend(&self) -> Vec<Spend> {
        serde_json::from_value(self.spend.clone()).unwrap_or_default()
    }

    pub fn aggregates(&self) -> OrderAggregates {
        OrderAggregates {
            order_count: self.order_count,
            first_purchase_time: self.first_purchase_at.map(to_timestamp),
            last_purchase_time: self.last_purchase_at.map(to_timestamp),
            spend: self
                .spend()
                .iter()
                .map(|spend| CurrencySpend {
                    currency_code: spend.currency.clone(),
                    order_count: spend.order_count,
                    total: Some(money(&spend.currency, spend.total_micros)),
                    average_order_value: Some(money(
                        &spend.currency,
                        if spend.order_count > 0 {
                            spend.total_micros / spend.order_count
                        } else {
                            0
                        },
                    )),
                })
                .collect(),
        }
    }

    /// No email, phone or external id: a visitor known only by tracking ids.
    pub fn is_anonymous(&self, identities: &[IdentityRow]) -> bool {
        self.email.is_empty()
            && self.phone.is_empty()
            && !identities
                .iter()
                .any(|i| i.contact_id == self.contact_id && i.kind == "external")
    }

    pub fn to_proto(&self, identities: &[IdentityRow]) -> Contact {
        let mine = || {
            identities
                .iter()
                .filter(|i| i.contact_id == self.contact_id)
        };
        let of_kind = |kind: &str| {
            mine()
                .filter(|i| i.kind == kind)
                .map(|i| i.value.clone())
                .collect::<Vec<_>>()
        };
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
            job_title: self.job_title.clone(),
            time_zone: self.time_zone.clone(),
            locale: self.locale.clone(),
            country: self.country.clone(),
            owner_id: self.owner_id.clone(),
            score: self.score,
            custom_fields: Some(json_to_struct(&self.custom_fields)),
            identities: mine()
                .map(|i| Identity {
                    kind: identity_kind(&i.kind).into(),
                    value: i.value.clone(),
                })
                .collect(),
            first_touch: touch_of(self.first_touch.as_ref()).map(|t| t.to_proto()),
            last_touch: touch_of(self.last_touch.as_ref()).map(|t| t.to_proto()),
            company_id: self.company_id.map(|id| id.to_string()).unwrap_or_default(),
            orders: Some(self.aggregates()),
            external_ids: of_kind("external"),
            anonymous_ids: of_kind("anonymous"),
        }
    }

    pub fn snapshot(&self, identities: &[IdentityRow]) -> ContactSnapshot {
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
            job_title: self.job_title.clone(),
            time_zone: self.time_zone.clone(),
            locale: self.locale.clone(),
            country: self.country.clone(),
            owner_id: self.owner_id.clone(),
            score: self.score,
            custom_fields: Some(json_to_struct(&self.custom_fields)),
            external_ids: identities
                .iter()
                .filter(|i| i.contact_id == self.contact_id && i.kind == "external")
                .map(|i| i.value.clone())
                .collect(),
            company_id: self.company_id.map(|id| id.to_string()).unwrap_or_default(),
            first_touch_source: touch_of(self.first_touch.as_ref())
                .map(|t| t.source)
                .unwrap_or_default(),
            last_touch_source: touch_of(self.last_touch.as_ref())
                .map(|t| t.source)
                .unwrap_or_default(),
            order_count: self.order_count,
        }
    }
}

/// A contact with its identities.
#[derive(Debug, Clone)]
pub struct Profile {
    pub row: ContactRow,
    pub identities: Vec<IdentityRow>,
}

impl Profile {
    pub fn to_proto(&self) -> Contact {
        self.row.to_proto(&self.identities)
    }
}

pub struct Store {
    pool: PgPool,
    pub(crate) waker: OutboxWaker,
}

/// The record of a contact change event.
pub fn event_record(workspace: WorkspaceId, change: ContactChanged) -> rapport_bus::Record {
    let key = change.contact_id.clone();
    let envelope = envelope::new_envelope(
        &workspace.to_string(),
        "contacts",
        Payload::ContactChanged(change),
    );
    envelope::to_record(topics::CONTACT_CHANGES, &key, &envelope)
}

impl Store {
    pub fn new(pool: PgPool, waker: OutboxWaker) -> Self {
        Store { pool, waker }
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Where a merged-away id now lives; the id itself otherwise.
    pub async fn resolve_id<'e>(
        executor: impl sqlx::PgExecutor<'e>,
        workspace: WorkspaceId,
        contact_id: Uuid,
    ) -> Result<Uuid, ApiError> {
        let survivor: Option<Uuid> = sqlx::query_scalar(
            "SELECT survivor_id FROM merged_contacts WHERE workspace_id = $1 AND merged_id = $2",
        )
        .bind(workspace.0)
        .bind(contact_id)
        .fetch_optional(executor)
        .await
        .map_err(map_db_error)?;
        Ok(survivor.unwrap_or(contact_id))
    }

    /// One contact by id (a merged-away id gives its survivor). NOT_FOUND
    /// when it is not in the workspace.
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
        let mut found = self.get_many(workspace, &[contact_id]).await?;
        found
            .remove(&contact_id)
            .map(|profile| profile.row)
            .ok_or_else(|| ApiError::not_found(format!("contact {contact_id}")))
    }

    pub async fn profile(
        &self,
        workspace: WorkspaceId,
        contact_id: Uuid,
    ) -> Result<Profile, ApiError> {
        let mut found = self.get_many(workspace, &[contact_id]).await?;
        found
            .remove(&contact_id)
            .ok_or_else(|| ApiError::not_found(format!("contact {contact_id}")))
    }

    /// Contacts by id, keyed by the id asked for (merged ids give their
    /// survivor), with their identities. Ids not found are absent.
    pub async fn get_many(
        &self,
        workspace: WorkspaceId,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, Profile>, ApiError> {
        // One round trip: merged ids resolved, identities folded in.
        let rows = sqlx::query_as::<_, FoundRow>(sqlx::AssertSqlSafe(format!(
            "SELECT asked.id AS asked, \
                (SELECT COALESCE(array_agg(i.kind || ':' || i.value ORDER BY i.kind, i.created_at, i.value), '{{}}')
                   FROM identities i WHERE i.workspace_id = c.workspace_id AND i.contact_id = c.contact_id) AS identity_list, \
                {columns}
             FROM UNNEST($2::uuid[]) AS asked(id)
             LEFT JOIN merged_contacts m ON m.workspace_id = $1 AND m.merged_id = asked.id
             JOIN contacts c ON c.workspace_id = $1 AND c.contact_id = COALESCE(m.survivor_id, asked.id)",
            columns = *COLUMNS_OF_C
        )))
        .bind(workspace.0)
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(map_db_error)?;
        Ok(rows
            .into_iter()
            .map(|found| {
                let contact_id = found.row.contact_id;
                let identities = found
                    .identity_list
                    .into_iter()
                    .filter_map(|entry| {
                        let (kind, value) = entry.split_once(':')?;
                        Some(IdentityRow {
                            contact_id,
                            kind: kind.to_owned(),
                            value: value.to_owned(),
                        })
                    })
                    .collect();
                (
                    found.asked,
                    Profile {
                        row: found.row,
                        identities,
                    },
                )
            })
            .collect())
    }

    /// Contacts matching `filter`, newest first, with cursor paging.
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
        filter: &Filter,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Profile>, ApiError> {
        let rows = sqlx::query_as::<_, ContactRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM contacts
             WHERE workspace_id = $1
               AND ($2::text IS NULL OR lifecycle_stage = $2)
               AND ($3::uuid IS NULL OR contact_id < $3)
               AND ($5::text IS NULL OR tags @> ARRAY[$5])
               AND ($6::text IS NULL OR owner_id = $6)
               AND ($7::uuid IS NULL OR company_id = $7)
               AND ($8::jsonb IS NULL OR custom_fields @> $8)
               AND ($9::timestamptz IS NULL OR updated_at >= $9)
               AND ($10::text IS NULL OR email_consent = $10)
             ORDER BY contact_id DESC LIMIT $4"
        )))
        .bind(workspace.0)
        .bind(filter.stage.as_deref())
        .bind(after)
        .bind(limit)
        .bind(filter.tag.as_deref())
        .bind(filter.owner_id.as_deref())
        .bind(filter.company_id)
        .bind(filter.custom_fields.as_ref())
        .bind(filter.updated_after)
        .bind(filter.email_consent.as_deref())
        .fetch_all(&self.pool)
        .await
        .map_err(map_db_error)?;
        let ids: Vec<Uuid> = rows.iter().map(|row| row.contact_id).collect();
        let identities = identities_of(&self.pool, workspace, &ids).await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let identities = identities
                    .iter()
                    .filter(|i| i.contact_id == row.contact_id)
                    .cloned()
                    .collect();
                Profile { row, identities }
            })
            .collect())
    }
}

/// A validated List / Export filter.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub stage: Option<String>,
    pub tag: Option<String>,
    pub owner_id: Option<String>,
    pub company_id: Option<Uuid>,
    pub custom_fields: Option<serde_json::Value>,
    pub updated_after: Option<DateTime<Utc>>,
    pub email_consent: Option<String>,
}

impl Filter {
    /// Checks a filter; custom-field values are checked against the
    /// workspace's definitions by the caller.
    pub fn from_proto(
        filter: Option<&ContactFilter>,
        legacy_stage: &str,
    ) -> Result<(Filter, Option<serde_json::Value>), ApiError> {
        let text = |value: &str| Some(value.trim().to_owned()).filter(|v| !v.is_empty());
        let Some(filter) = filter else {
            return Ok((
                Filter {
                    stage: text(legacy_stage).map(|s| s.to_lowercase()),
                    ..Default::default()
                },
                None,
            ));
        };
        let company_id = match filter.company_id.trim() {
            "" => None,
            id => Some(rapport_core::ids::parse_id("filter.company_id", id)?),
        };
        let custom = filter
            .custom_fields
            .as_ref()
            .map(struct_to_json)
            .filter(|v| v.as_object().is_some_and(|o| !o.is_empty()));
        let email_consent = match filter.email_consent() {
            rapport_proto::common::v1::ConsentStatus::Unspecified => None,
            status => Some(crate::consent::status_text(status).to_owned()),
        };
        Ok((
            Filter {
                stage: text(&filter.lifecycle_stage)
                    .or_else(|| text(legacy_stage))
                    .map(|s| s.to_lowercase()),
                tag: text(&filter.tag),
                owner_id: text(&filter.owner_id),
                company_id,
                custom_fields: None,
                updated_after: filter
                    .updated_after
                    .as_ref()
                    .and_then(rapport_core::time::from_timestamp),
                email_consent,
            },
            custom,
        ))
    }
}

pub async fn identities_of<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    workspace: WorkspaceId,
    contacts: &[Uuid],
) -> Result<Vec<IdentityRow>, ApiError> {
    sqlx::query_as::<_, IdentityRow>(
        "SELECT contact_id, kind, value FROM identities
         WHERE workspace_id = $1 AND contact_id = ANY($2)
         ORDER BY contact_id, kind, created_at, value",
    )
    .bind(workspace.0)
    .bind(contacts)
    .fetch_all(executor)
    .await
    .map_err(map_db_error)
}

/// The stages of a workspace that has not set its own.
pub const DEFAULT_STAGES: [&str; 5] = ["lead", "customer", "repeat_buyer", "at_risk", "churned"];

pub async fn stages_in<'e>(
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
             WHERE workspace_id = $1 AND lifecycle_stage <> '' AND NOT (lifecycle_stage = ANY($2))
             ORDER BY 1 LIMIT 10",
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
        let contact_id = self.get(workspace, contact_id).await?.contact_id;
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
