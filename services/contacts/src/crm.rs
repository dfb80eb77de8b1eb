//! Sync from sales CRMs: connectors write `InboundSync` records to
//! `rapport.crm.inbound.v1`, keyed by their external id.
//!
//! - A contact record sets the fields it names on the contact with that
//!   external id (created when none has it; found by email too).
//! - Conflicts resolve per field by source time: `field_times` keeps, for
//!   each field a connector set, the source time of the value held, and an
//!   older change to that field is skipped. Different fields of one record
//!   can win and lose independently.
//! - The changes are published with source `crm:<connector>`, which the
//!   connector skips when it reads `rapport.contacts.changes.v1`, so its own
//!   change never comes back to it; a record that changes nothing publishes
//!   nothing.
//! - A record that can never apply (not an InboundSync, no source time, an
//!   unknown field, a bad value) is dead-lettered with the reason; the
//!   partition moves on.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rapport_bus::{Delivery, Handler, HandlerError, envelope};
use rapport_core::json::{json_to_struct, struct_to_json};
use rapport_core::{ApiError, WorkspaceId};
use rapport_db::map_db_error;
use rapport_proto::contacts::v1::Contact;
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::inbound_sync::Record;
use rapport_proto::events::v1::{InboundContact, InboundDeal};
use serde_json::Value;
use uuid::Uuid;

use crate::store::Store;
use crate::timeline::{self, Entry};
use crate::validate::{check_contact, normalise_email, normalise_external_id, text_field};

pub struct CrmHandler {
    pub store: Arc<Store>,
}

#[async_trait]
impl Handler for CrmHandler {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let envelope = envelope::decode(&delivery.record)?;
        let workspace = envelope::workspace(&envelope)?;
        let Some(Payload::InboundSync(sync)) = envelope.payload else {
            return Err(HandlerError::Permanent("not an InboundSync record".into()));
        };
        let connector = sync.connector.trim().to_lowercase();
        if connector.is_empty()
            || connector.len() > 40
            || !connector
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            return Err(HandlerError::Permanent(
                "connector must be 1 to 40 lower-case letters, digits, - or _".into(),
            ));
        }
        let external_id = external_id(&connector, &sync.external_id)?;
        let Some(source_time) = sync
            .source_time
            .as_ref()
            .and_then(rapport_core::time::from_timestamp)
        else {
            return Err(HandlerError::Permanent("source_time is required".into()));
        };
        match sync.record {
            Some(Record::Contact(contact)) => {
                self.contact(workspace, &connector, &external_id, source_time, &contact)
                    .await
            }
            Some(Record::Deal(deal)) => {
                self.deal(workspace, &connector, &external_id, source_time, &deal)
                    .await
            }
            None => Err(HandlerError::Permanent(
                "record is neither a contact nor a deal".into(),
            )),
        }
    }
}

fn external_id(connector: &str, raw: &str) -> Result<String, HandlerError> {
    let raw = raw.trim();
    let full = if raw.contains(':') {
        raw.to_owned()
    } else {
        format!("{connector}:{raw}")
    };
    normalise_external_id(&full)
        .map_err(|reason| HandlerError::Permanent(format!("external_id {reason}")))
}

impl CrmHandler {
    async fn contact(
        &self,
        workspace: WorkspaceId,
        connector: &str,
        external_id: &str,
        source_time: DateTime<Utc>,
        record: &InboundContact,
    ) -> Result<(), HandlerError> {
        let fields = record
            .fields
            .as_ref()
            .map(struct_to_json)
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        if fields.is_empty() {
            return Err(HandlerError::Permanent(
                "contact record sets no fields".into(),
            ));
        }
        // The source times of the values held now.
        let mut existing = self
            .store
            .find_by_identity(workspace, "external", external_id)
            .await
            .map_err(HandlerError::from)?;
        if existing.is_none()
            && let Some(Value::String(email)) = fields.get("email")
        {
            existing = self
                .store
                .find_by_identity(workspace, "email", email)
                .await
                .map_err(HandlerError::from)?;
        }
        let held: HashMap<String, DateTime<Utc>> = match existing {
            Some(contact_id) => self
                .store
                .field_times(workspace, contact_id)
                .await
                .map_err(HandlerError::from)?,
            None => HashMap::new(),
        };
        let mut contact = Contact {
            external_ids: vec![external_id.to_owned()],
            source: format!("crm:{connector}"),
            ..Default::default()
        };
        let mut custom = serde_json::Map::new();
        let mut applied = Vec::new();
        for (field, value) in fields {
            if held.get(&field).is_some_and(|held| *held > source_time) {
                continue;
            }
            match field.as_str() {
                "tags" => {
                    contact.tags = match &value {
                        Value::Array(items) => items
                            .iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect(),
                        _ => {
                            return Err(HandlerError::Permanent(
                                "field tags must be a list of strings".into(),
                            ));
                        }
                    }
                }
                name => match (text_field(&mut contact, name), &value) {
                    (Some(slot), Value::String(text)) => slot.clone_from(text),
                    (Some(_), _) => {
                        return Err(HandlerError::Permanent(format!(
                            "field {name} must be a string"
                        )));
                    }
                    // Anything else must be a custom field; the write checks it.
                    (None, _) => {
                        custom.insert(name.to_owned(), value.clone());
                    }
                },
            }
            applied.push(field);
        }
        if applied.is_empty() {
            return Ok(());
        }
        if !custom.is_empty() {
            contact.custom_fields = Some(json_to_struct(&Value::Object(custom)));
        }
        let mut violations = Vec::new();
        let mut input = check_contact(&contact, "fields", &mut violations);
        if !violations.is_empty() {
            return Err(HandlerError::from(ApiError::invalid_fields(violations)));
        }
        input.stage_cause = format!("crm:{connector}");
        input.field_times = applied
            .into_iter()
            .map(|field| (field, format!("crm:{connector}"), source_time))
            .collect();
        self.store
            .upsert(workspace, None, input)
            .await
            .map(|_| ())
            .map_err(HandlerError::from)
    }

    async fn deal(
        &self,
        workspace: WorkspaceId,
        connector: &str,
        external_id: &str,
        source_time: DateTime<Utc>,
        deal: &InboundDeal,
    ) -> Result<(), HandlerError> {
        let deal_id = match deal.deal_id.trim() {
            "" => external_id.to_owned(),
            id => id.to_owned(),
        };
        if deal_id.chars().count() > 200 || deal.name.chars().count() > 500 {
            return Err(HandlerError::Permanent(
                "deal id or name is too long".into(),
            ));
        }
        let contact_id = match deal.contact_external_id.trim() {
            "" => None,
            raw => {
                let id = self::external_id(connector, raw)?;
                self.store
                    .find_by_identity(workspace, "external", &id)
                    .await
                    .map_err(HandlerError::from)?
            }
        };
        let (currency, amount) = deal
            .amount
            .as_ref()
            .map(|m| (m.currency_code.trim().to_uppercase(), m.amount_micros))
            .unwrap_or_default();
        self.store
            .save_deal(
                workspace,
                connector,
                &deal_id,
                contact_id,
                deal,
                (&currency, amount),
                source_time,
            )
            .await
            .map_err(HandlerError::from)
    }
}

impl Store {
    /// The contact holding an identity, if any.
    pub async fn find_by_identity(
        &self,
        workspace: WorkspaceId,
        kind: &str,
        value: &str,
    ) -> Result<Option<Uuid>, ApiError> {
        let value = if kind == "email" {
            normalise_email(value).unwrap_or_else(|_| value.to_owned())
        } else {
            value.to_owned()
        };
        sqlx::query_scalar(
            "SELECT contact_id FROM identities WHERE workspace_id = $1 AND kind = $2 AND value = $3",
        )
        .bind(workspace.0)
        .bind(kind)
        .bind(value)
        .fetch_optional(self.pool())
        .await
        .map_err(map_db_error)
    }

    pub async fn field_times(
        &self,
        workspace: WorkspaceId,
        contact_id: Uuid,
    ) -> Result<HashMap<String, DateTime<Utc>>, ApiError> {
        let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT field, source_time FROM field_times WHERE workspace_id = $1 AND contact_id = $2",
        )
        .bind(workspace.0)
        .bind(contact_id)
        .fetch_all(self.pool())
        .await
        .map_err(map_db_error)?;
        Ok(rows.into_iter().collect())
    }

    /// Saves a deal unless a newer version of it is already held.
    #[allow(clippy::too_many_arguments)]
    async fn save_deal(
        &self,
        workspace: WorkspaceId,
        connector: &str,
        deal_id: &str,
        contact_id: Option<Uuid>,
        deal: &InboundDeal,
        (currency, amount): (&str, i64),
        source_time: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        let mut transaction = self.pool().begin().await.map_err(map_db_error)?;
        let saved: Option<Option<Uuid>> = sqlx::query_scalar(
            "INSERT INTO deals (workspace_id, deal_id, connector, contact_id, name, stage, currency, amount_micros, source_time)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (workspace_id, connector, deal_id) DO UPDATE SET
                 contact_id = COALESCE(EXCLUDED.contact_id, deals.contact_id), name = EXCLUDED.name,
                 stage = EXCLUDED.stage, currency = EXCLUDED.currency,
                 amount_micros = EXCLUDED.amount_micros, source_time = EXCLUDED.source_time
             WHERE deals.source_time <= EXCLUDED.source_time
             RETURNING contact_id",
        )
        .bind(workspace.0)
        .bind(deal_id)
        .bind(connector)
        .bind(contact_id)
        .bind(deal.name.trim())
        .bind(deal.stage.trim())
        .bind(currency)
        .bind(amount)
        .bind(source_time)
        .fetch_optional(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        if let Some(Some(contact_id)) = saved {
            timeline::insert(
                &mut transaction,
                workspace,
                &[Entry::event(
                    contact_id,
                    format!(
                        "Deal {} in {}: {}",
                        deal.name.trim(),
                        connector,
                        deal.stage.trim()
                    ),
                    serde_json::json!({
                        "deal_id": deal_id,
                        "connector": connector,
                        "stage": deal.stage.trim(),
                        "currency_code": currency,
                        "amount_micros": amount,
                    }),
                )
                .at(source_time)],
            )
            .await?;
        }
        transaction.commit().await.map_err(map_db_error)
    }
}
