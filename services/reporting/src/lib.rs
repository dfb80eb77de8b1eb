//! The reporting service: rollups built from every topic.
//!
//! Owns the `reporting` Postgres schema. Its consumers are idempotent: each
//! event id is recorded in `processed_events` in the same transaction as the
//! counts it moves, so a redelivered event changes nothing.

use std::sync::Arc;

use async_trait::async_trait;
use rapport_bus::{
    BusError, Delivery, Handler, HandlerError, SharedBus, Subscription, envelope, topics,
};
use rapport_core::ApiError;
use rapport_core::time::from_timestamp;
use rapport_db::map_db_error;
use rapport_grpc::auth::workspace_of;
use rapport_grpc::{BackgroundTask, GrpcService, ServiceParts};
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::message_event::Status as MessageStatus;
use rapport_proto::reporting::v1::reporting_service_server::{
    ReportingService, ReportingServiceServer,
};
use rapport_proto::reporting::v1::*;
use sqlx::PgPool;
use tonic::{Request, Response, Status};

pub const SCHEMA: &str = "reporting";
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
pub const CONSUMER_GROUP: &str = "rapport-reporting";

pub async fn build(
    pool: PgPool,
    bus: SharedBus,
    config: &rapport_config::Config,
) -> Result<ServiceParts, BusError> {
    let consumer = bus
        .subscribe(
            Subscription::new(
                CONSUMER_GROUP,
                &[topics::MESSAGE_LIFECYCLE, topics::CONTACT_CHANGES],
            )
            .with_max_attempts(config.kafka.max_delivery_attempts),
            Arc::new(Rollups { pool: pool.clone() }),
        )
        .await?;
    Ok(ServiceParts {
        grpc: GrpcService {
            name: rapport_proto::service_names::REPORTING,
            routes: tonic::service::Routes::new(ReportingServiceServer::new(ReportingApi { pool })),
        },
        background: vec![BackgroundTask::new(
            "reporting message consumer",
            move || consumer.shutdown(),
        )],
    })
}

/// Keeps the rollups: message lifecycle counts per day, journey and
/// template; new leads per day and source.
///
/// Nothing here is per contact: the tables hold counts keyed by day,
/// journey, template and source, and `processed_events` holds event ids. An
/// erasure (`CHANGE_TYPE_ERASED`) or a merge (`CHANGE_TYPE_MERGED`) therefore
/// has nothing to delete or re-point, and neither moves a count: a contact
/// erased or merged away stays counted in the aggregates it was counted in.
struct Rollups {
    pool: PgPool,
}

#[async_trait]
impl Handler for Rollups {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let envelope = envelope::decode(&delivery.record)?;
        let workspace = envelope::workspace(&envelope)?.0;
        let day = envelope
            .occurred_at
            .as_ref()
            .and_then(from_timestamp)
            .unwrap_or_else(chrono::Utc::now)
            .date_naive();
        match &envelope.payload {
            Some(Payload::MessageEvent(event)) => {
                self.count_message(workspace, &envelope.event_id, day, event)
                    .await
            }
            Some(Payload::ContactChanged(change)) => {
                self.count_lead(workspace, &envelope.event_id, day, change)
                    .await
            }
            _ => Ok(()),
        }
    }
}

impl Rollups {
    async fn count_lead(
        &self,
        workspace: uuid::Uuid,
        event_id: &str,
        day: chrono::NaiveDate,
        change: &rapport_proto::events::v1::ContactChanged,
    ) -> Result<(), HandlerError> {
        use rapport_proto::events::v1::contact_changed::ChangeType;
        // Only creations count; erasures and merges leave the counts alone
        // (see `Rollups`).
        let Some(contact) = &change.contact else {
            return Ok(());
        };
        if change.change_type() != ChangeType::Created || contact.lifecycle_stage != "lead" {
            return Ok(());
        }
        let retryable = |error: sqlx::Error| HandlerError::Retryable(error.to_string());
        let mut transaction = self.pool.begin().await.map_err(retryable)?;
        if rapport_db::processed::mark_processed(&mut transaction, workspace, event_id)
            .await
            .map_err(retryable)?
        {
            sqlx::query(
                "INSERT INTO lead_counts (workspace_id, day, source, leads) VALUES ($1, $2, $3, 1)
                 ON CONFLICT (workspace_id, day, source) DO UPDATE SET leads = lead_counts.leads + 1",
            )
            .bind(workspace)
            .bind(day)
            .bind(&contact.source)
            .execute(&mut *transaction)
            .await
            .map_err(retryable)?;
        }
        transaction.commit().await.map_err(retryable)
    }

    async fn count_message(
        &self,
        workspace: uuid::Uuid,
        event_id: &str,
        day: chrono::NaiveDate,
        event: &rapport_proto::events::v1::MessageEvent,
    ) -> Result<(), HandlerError> {
        let column = match MessageStatus::try_from(event.status) {
            Ok(MessageStatus::Sent) => "sent",
            Ok(MessageStatus::Delivered) => "delivered",
            Ok(MessageStatus::Opened) => "opened",
            Ok(MessageStatus::Clicked) => "clicked",
            Ok(MessageStatus::Bounced) => "bounced",
            Ok(MessageStatus::Unsubscribed) => "unsubscribed",
            _ => return Ok(()),
        };
        let retryable = |error: sqlx::Error| HandlerError::Retryable(error.to_string());
        let mut transaction = self.pool.begin().await.map_err(retryable)?;
        if rapport_db::processed::mark_processed(&mut transaction, workspace, event_id)
            .await
            .map_err(retryable)?
        {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO message_counts (workspace_id, day, journey_id, template_id, {column})
                 VALUES ($1, $2, $3, $4, 1)
                 ON CONFLICT (workspace_id, day, journey_id, template_id)
                 DO UPDATE SET {column} = message_counts.{column} + 1"
            )))
            .bind(workspace)
            .bind(day)
            .bind(&event.journey_id)
            .bind(&event.template_id)
            .execute(&mut *transaction)
            .await
            .map_err(retryable)?;
        }
        transaction.commit().await.map_err(retryable)?;
        Ok(())
    }
}

struct ReportingApi {
    pool: PgPool,
}

#[derive(sqlx::FromRow)]
struct CountRow {
    journey_id: String,
    template_id: String,
    sent: i64,
    delivered: i64,
    opened: i64,
    clicked: i64,
    bounced: i64,
    unsubscribed: i64,
}

#[tonic::async_trait]
impl ReportingService for ReportingApi {
    async fn get_message_performance(
        &self,
        request: Request<GetMessagePerformanceRequest>,
    ) -> Result<Response<GetMessagePerformanceResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let request = request.into_inner();
        let (start, end) = period(request.period.as_ref())?;
        let rows = sqlx::query_as::<_, CountRow>(
            "SELECT journey_id, template_id,
                    sum(sent)::bigint AS sent, sum(delivered)::bigint AS delivered,
                    sum(opened)::bigint AS opened, sum(clicked)::bigint AS clicked,
                    sum(bounced)::bigint AS bounced, sum(unsubscribed)::bigint AS unsubscribed
             FROM message_counts
             WHERE workspace_id = $1
               AND ($2 = '' OR journey_id = $2)
               AND ($3 = '' OR template_id = $3)
               AND ($4::timestamptz IS NULL OR day >= $4::date)
               AND ($5::timestamptz IS NULL OR day < $5::date)
             GROUP BY journey_id, template_id
             ORDER BY journey_id, template_id",
        )
        .bind(workspace.0)
        .bind(request.journey_id.trim())
        .bind(request.template_id.trim())
        .bind(start)
        .bind(end)
        .fetch_all(&self.pool)
        .await
        .map_err(map_db_error)?;
        Ok(Response::new(GetMessagePerformanceResponse {
            rows: rows
                .into_iter()
                .map(|row| MessagePerformance {
                    journey_id: row.journey_id,
                    template_id: row.template_id,
                    sent: row.sent,
                    delivered: row.delivered,
                    opened: row.opened,
                    clicked: row.clicked,
                    bounced: row.bounced,
                    unsubscribed: row.unsubscribed,
                })
                .collect(),
        }))
    }

    async fn get_leads_by_source(
        &self,
        request: Request<GetLeadsBySourceRequest>,
    ) -> Result<Response<GetLeadsBySourceResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let (start, end) = period(request.get_ref().period.as_ref())?;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT source, sum(leads)::bigint FROM lead_counts
             WHERE workspace_id = $1
               AND ($2::timestamptz IS NULL OR day >= $2::date)
               AND ($3::timestamptz IS NULL OR day < $3::date)
             GROUP BY source ORDER BY source",
        )
        .bind(workspace.0)
        .bind(start)
        .bind(end)
        .fetch_all(&self.pool)
        .await
        .map_err(map_db_error)?;
        Ok(Response::new(GetLeadsBySourceResponse {
            rows: rows
                .into_iter()
                .map(|(source, leads)| LeadSourceCount { source, leads })
                .collect(),
        }))
    }
}

type Period = (
    Option<chrono::DateTime<chrono::Utc>>,
    Option<chrono::DateTime<chrono::Utc>>,
);

/// A validated reporting period.
fn period(period: Option<&rapport_proto::common::v1::TimeRange>) -> Result<Period, ApiError> {
    let Some(period) = period else {
        return Ok((None, None));
    };
    let start = period
        .start_time
        .as_ref()
        .map(|t| {
            from_timestamp(t)
                .ok_or_else(|| ApiError::invalid_field("period.start_time", "is out of range"))
        })
        .transpose()?;
    let end = period
        .end_time
        .as_ref()
        .map(|t| {
            from_timestamp(t)
                .ok_or_else(|| ApiError::invalid_field("period.end_time", "is out of range"))
        })
        .transpose()?;
    if let (Some(start), Some(end)) = (start, end) {
        if start >= end {
            return Err(ApiError::invalid_field(
                "period",
                "start_time must be before end_time",
            ));
        }
    }
    Ok((start, end))
}
