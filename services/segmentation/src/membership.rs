//! Memberships that follow contact changes as they happen.
//!
//! Each contact change updates the contact's profile in segmentation's read
//! model and re-evaluates the workspace's segments for that contact. Entries
//! and exits are written with their `MembershipChanged` events in the same
//! transaction (outbox), so a redelivered change finds nothing to do.
//!
//! An erased contact (`CHANGE_TYPE_ERASED`) loses its profile and every
//! membership, each exit published as usual. A merge (`CHANGE_TYPE_MERGED`)
//! does the same for every merged id and evaluates the survivor, in one
//! transaction.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use prost::Message;
use rapport_bus::{Delivery, Handler, HandlerError, envelope, topics};
use rapport_core::json::struct_to_json;
use rapport_core::time::from_timestamp;
use rapport_db::outbox::{self, OutboxWaker};
use rapport_proto::events::v1::contact_changed::ChangeType;
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::membership_changed::Change;
use rapport_proto::events::v1::{ContactSnapshot, MembershipChanged};
use rapport_proto::segmentation::v1::Segment;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::evaluate::matches;

#[derive(Clone)]
pub struct Engine {
    pub pool: PgPool,
    pub waker: OutboxWaker,
}

/// A contact snapshot as the JSON segments are evaluated on.
pub fn profile(snapshot: &ContactSnapshot) -> serde_json::Value {
    let time = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .and_then(from_timestamp)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default()
    };
    serde_json::json!({
        "contact_id": snapshot.contact_id,
        "email": snapshot.email,
        "phone": snapshot.phone,
        "first_name": snapshot.first_name,
        "last_name": snapshot.last_name,
        "company": snapshot.company,
        "lifecycle_stage": snapshot.lifecycle_stage,
        "tags": snapshot.tags,
        "attributes": snapshot.attributes.as_ref().map(struct_to_json).unwrap_or_else(|| serde_json::json!({})),
        "create_time": time(&snapshot.create_time),
        "update_time": time(&snapshot.update_time),
        "source": snapshot.source,
        "job_title": snapshot.job_title,
        "time_zone": snapshot.time_zone,
        "locale": snapshot.locale,
        "country": snapshot.country,
        "owner_id": snapshot.owner_id,
        "score": snapshot.score,
        "custom_fields": snapshot.custom_fields.as_ref().map(struct_to_json).unwrap_or_else(|| serde_json::json!({})),
        "company_id": snapshot.company_id,
        "first_touch_source": snapshot.first_touch_source,
        "last_touch_source": snapshot.last_touch_source,
        "order_count": snapshot.order_count,
        "email_consent": snapshot
            .email_consent
            .as_ref()
            .map(|c| c.status().as_str_name().trim_start_matches("CONSENT_STATUS_").to_lowercase())
            .unwrap_or_default(),
    })
}

async fn segments(
    transaction: &mut Transaction<'_, Postgres>,
    workspace: Uuid,
) -> Result<Vec<(Uuid, Segment)>, sqlx::Error> {
    let rows: Vec<(Uuid, Vec<u8>)> =
        sqlx::query_as("SELECT id, definition FROM segments WHERE workspace_id = $1")
            .bind(workspace)
            .fetch_all(&mut **transaction)
            .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, bytes)| {
            Segment::decode(bytes.as_slice())
                .ok()
                .map(|segment| (id, segment))
        })
        .collect())
}

/// Moves `contact_id` into or out of `segment_id` if `should_be_member`
/// differs from what is recorded; returns whether it changed.
async fn reconcile(
    transaction: &mut Transaction<'_, Postgres>,
    workspace: Uuid,
    segment_id: Uuid,
    contact_id: &str,
    should_be_member: bool,
    cause_event_id: &str,
) -> Result<bool, sqlx::Error> {
    let changed = if should_be_member {
        sqlx::query(
            "INSERT INTO memberships (workspace_id, segment_id, contact_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(workspace)
        .bind(segment_id)
        .bind(contact_id)
        .execute(&mut **transaction)
        .await?
        .rows_affected()
            == 1
    } else {
        sqlx::query("DELETE FROM memberships WHERE workspace_id = $1 AND segment_id = $2 AND contact_id = $3")
            .bind(workspace)
            .bind(segment_id)
            .bind(contact_id)
            .execute(&mut **transaction)
            .await?
            .rows_affected()
            == 1
    };
    if changed {
        rapport_metrics::metrics()
            .membership_changes
            .with_label_values(&[if should_be_member {
                "entered"
            } else {
                "exited"
            }])
            .inc();
        let event = MembershipChanged {
            segment_id: segment_id.to_string(),
            contact_id: contact_id.to_owned(),
            change: if should_be_member {
                Change::Entered
            } else {
                Change::Exited
            }
            .into(),
            cause_event_id: cause_event_id.to_owned(),
        };
        let envelope = envelope::new_envelope(
            &workspace.to_string(),
            "segmentation",
            Payload::MembershipChanged(event),
        );
        outbox::enqueue(
            transaction,
            &envelope::to_record(topics::MEMBERSHIPS, contact_id, &envelope),
        )
        .await?;
    }
    Ok(changed)
}

/// Records a contact's new profile (or, with no snapshot, its erasure) and
/// re-evaluates every segment of the workspace for it, within `transaction`;
/// returns whether a membership changed. A snapshot older than the stored
/// profile writes nothing and returns false.
///
/// An erasure deletes the contact's row in `contact_profiles` (its personal
/// data: email, phone, names, company, attributes) and every membership it
/// has in a segment of the workspace, each exit with its `MembershipChanged`.
async fn apply_in(
    transaction: &mut Transaction<'_, Postgres>,
    workspace: Uuid,
    contact_id: &str,
    snapshot: Option<&ContactSnapshot>,
    cause_event_id: &str,
) -> Result<bool, sqlx::Error> {
    let now = Utc::now();
    let profile = match snapshot {
        Some(snapshot) => {
            let version: DateTime<Utc> = snapshot
                .update_time
                .as_ref()
                .and_then(from_timestamp)
                .unwrap_or(now);
            let profile = profile(snapshot);
            let stored = sqlx::query(
                "INSERT INTO contact_profiles (workspace_id, contact_id, profile, version) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (workspace_id, contact_id) DO UPDATE SET profile = EXCLUDED.profile, version = EXCLUDED.version
                 WHERE contact_profiles.version <= EXCLUDED.version",
            )
            .bind(workspace)
            .bind(contact_id)
            .bind(&profile)
            .bind(version)
            .execute(&mut **transaction)
            .await?
            .rows_affected();
            if stored == 0 {
                // An older change arriving late: the newer one already decided.
                return Ok(false);
            }
            Some(profile)
        }
        None => {
            sqlx::query("DELETE FROM contact_profiles WHERE workspace_id = $1 AND contact_id = $2")
                .bind(workspace)
                .bind(contact_id)
                .execute(&mut **transaction)
                .await?;
            None
        }
    };
    let mut changed = false;
    for (segment_id, segment) in segments(transaction, workspace).await? {
        let member = match (&profile, &segment.condition) {
            (Some(profile), Some(condition)) => matches(condition, profile, now),
            _ => false,
        };
        changed |= reconcile(
            transaction,
            workspace,
            segment_id,
            contact_id,
            member,
            cause_event_id,
        )
        .await?;
    }
    Ok(changed)
}

impl Engine {
    /// Records a contact's new profile (or its erasure) and re-evaluates every
    /// segment of the workspace for it, in one transaction.
    pub async fn apply_contact(
        &self,
        workspace: Uuid,
        contact_id: &str,
        snapshot: Option<&ContactSnapshot>,
        cause_event_id: &str,
    ) -> Result<(), sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        let changed = apply_in(
            &mut transaction,
            workspace,
            contact_id,
            snapshot,
            cause_event_id,
        )
        .await?;
        transaction.commit().await?;
        if changed {
            self.waker.wake();
        }
        Ok(())
    }

    /// Applies a merge in one transaction: each merged id is removed exactly
    /// as an erasure removes a contact (its profile and its memberships,
    /// each exit with its `MembershipChanged`), then the survivor's snapshot
    /// is recorded and evaluated as any other change. Applying it again finds
    /// nothing left to remove and a profile no newer than the stored one.
    pub async fn apply_merge(
        &self,
        workspace: Uuid,
        survivor_id: &str,
        merged_ids: &[String],
        survivor: &ContactSnapshot,
        cause_event_id: &str,
    ) -> Result<(), sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        let mut changed = false;
        for merged_id in merged_ids {
            if merged_id.is_empty() || merged_id == survivor_id {
                continue;
            }
            changed |=
                apply_in(&mut transaction, workspace, merged_id, None, cause_event_id).await?;
        }
        changed |= apply_in(
            &mut transaction,
            workspace,
            survivor_id,
            Some(survivor),
            cause_event_id,
        )
        .await?;
        transaction.commit().await?;
        if changed {
            self.waker.wake();
        }
        Ok(())
    }

    /// Evaluates a new segment against every known contact of its workspace.
    pub async fn backfill(
        &self,
        workspace: Uuid,
        segment_id: Uuid,
        segment: &Segment,
    ) -> Result<u64, sqlx::Error> {
        let Some(condition) = &segment.condition else {
            return Ok(0);
        };
        let now = Utc::now();
        let mut transaction = self.pool.begin().await?;
        let profiles: Vec<(String, serde_json::Value)> = sqlx::query_as(
            "SELECT contact_id, profile FROM contact_profiles WHERE workspace_id = $1",
        )
        .bind(workspace)
        .fetch_all(&mut *transaction)
        .await?;
        let mut entered = 0;
        for (contact_id, profile) in profiles {
            if matches(condition, &profile, now)
                && reconcile(
                    &mut transaction,
                    workspace,
                    segment_id,
                    &contact_id,
                    true,
                    "",
                )
                .await?
            {
                entered += 1;
            }
        }
        transaction.commit().await?;
        if entered > 0 {
            self.waker.wake();
        }
        Ok(entered)
    }
}

/// Feeds contact changes to the engine. An erasure removes the contact's
/// profile and memberships; a merge removes each merged id's the same way and
/// evaluates the survivor (see `Engine::apply_merge`).
pub struct ContactChangeHandler {
    pub engine: Arc<Engine>,
}

#[async_trait]
impl Handler for ContactChangeHandler {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let envelope = envelope::decode(&delivery.record)?;
        let Some(Payload::ContactChanged(change)) = &envelope.payload else {
            return Ok(());
        };
        let workspace = envelope::workspace(&envelope)?.0;
        let snapshot = match change.change_type() {
            ChangeType::Erased => None,
            _ => Some(change.contact.as_ref().ok_or_else(|| {
                HandlerError::Permanent("contact change without a snapshot".into())
            })?),
        };
        let applied = match (change.change_type(), snapshot) {
            (ChangeType::Merged, Some(survivor)) => {
                self.engine
                    .apply_merge(
                        workspace,
                        &change.contact_id,
                        &change.merged_contact_ids,
                        survivor,
                        &envelope.event_id,
                    )
                    .await
            }
            (_, snapshot) => {
                self.engine
                    .apply_contact(workspace, &change.contact_id, snapshot, &envelope.event_id)
                    .await
            }
        };
        applied.map_err(|error| HandlerError::Retryable(error.to_string()))
    }
}
