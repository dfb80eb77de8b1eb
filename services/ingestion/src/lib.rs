//! The ingestion service: everything people do enters Rapport here.
//!
//! Owns the `ingestion` Postgres schema (dedupe window; later write-key
//! settings, forms and landing pages). An event is acknowledged only once the
//! bus has it: ingestion publishes directly, not through an outbox, because
//! it has no state change of its own to keep consistent with the event.

use chrono::Utc;
use rapport_bus::{SharedBus, envelope, topics};
use rapport_core::time::to_timestamp;
use rapport_core::{ApiError, FieldViolation, WorkspaceId};
use rapport_db::map_db_error;
use rapport_grpc::auth::workspace_of;
use rapport_grpc::{GrpcService, ServiceParts};
use rapport_proto::events::v1::IngestedEvent;
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::ingested_event::Kind;
use rapport_proto::ingestion::v1::ingestion_service_server::{
    IngestionService, IngestionServiceServer,
};
use rapport_proto::ingestion::v1::*;
use sqlx::PgPool;
use tonic::{Request, Response, Status};

pub const SCHEMA: &str = "ingestion";
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

const MAX_ID_LENGTH: usize = 255;

pub async fn build(pool: PgPool, bus: SharedBus) -> Result<ServiceParts, rapport_bus::BusError> {
    Ok(ServiceParts {
        grpc: GrpcService {
            name: rapport_proto::service_names::INGESTION,
            routes: tonic::service::Routes::new(IngestionServiceServer::new(IngestionApi {
                pool,
                bus,
            })),
        },
        background: Vec::new(),
    })
}

struct IngestionApi {
    pool: PgPool,
    bus: SharedBus,
}

fn check_ids(message_id: &str, user_id: &str, anonymous_id: &str) -> Result<(), ApiError> {
    let mut violations = Vec::new();
    if user_id.trim().is_empty() && anonymous_id.trim().is_empty() {
        violations.push(FieldViolation {
            field: "user_id".into(),
            description: "one of user_id and anonymous_id is required".into(),
        });
    }
    for (field, value) in [
        ("message_id", message_id),
        ("user_id", user_id),
        ("anonymous_id", anonymous_id),
    ] {
        if value.len() > MAX_ID_LENGTH {
            violations.push(FieldViolation {
                field: field.into(),
                description: format!("is longer than {MAX_ID_LENGTH} characters"),
            });
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid_fields(violations))
    }
}

impl IngestionApi {
    /// Dedupes on the message id, then publishes; returns whether it was a
    /// duplicate. If the bus cannot take the event the dedupe mark is removed
    /// so the client's retry goes through.
    async fn accept(
        &self,
        workspace: WorkspaceId,
        mut event: IngestedEvent,
    ) -> Result<(String, bool), ApiError> {
        if event.message_id.trim().is_empty() {
            event.message_id = rapport_core::ids::new_id().to_string();
        }
        let first_time = sqlx::query(
            "INSERT INTO seen_messages (workspace_id, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(workspace.0)
        .bind(&event.message_id)
        .execute(&self.pool)
        .await
        .map_err(map_db_error)?
        .rows_affected()
            == 1;
        if !first_time {
            return Ok((event.message_id, true));
        }
        let now = to_timestamp(Utc::now());
        event.received_at = Some(now);
        if event.timestamp.is_none() {
            event.timestamp = Some(now);
        }
        let key = if event.user_id.is_empty() {
            event.anonymous_id.clone()
        } else {
            event.user_id.clone()
        };
        let message_id = event.message_id.clone();
        let envelope = envelope::new_envelope(
            &workspace.to_string(),
            "ingestion",
            Payload::IngestedEvent(event),
        );
        let record = envelope::to_record(topics::INGESTED_EVENTS, &key, &envelope);
        if let Err(error) = self.bus.publish(record).await {
            tracing::warn!(%error, "event bus refused an event");
            let _ = sqlx::query(
                "DELETE FROM seen_messages WHERE workspace_id = $1 AND message_id = $2",
            )
            .bind(workspace.0)
            .bind(&message_id)
            .execute(&self.pool)
            .await;
            return Err(ApiError::unavailable("event log unavailable; retry"));
        }
        Ok((message_id, false))
    }
}

#[tonic::async_trait]
impl IngestionService for IngestionApi {
    async fn track(
        &self,
        request: Request<TrackRequest>,
    ) -> Result<Response<TrackResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let request = request.into_inner();
        check_ids(&request.message_id, &request.user_id, &request.anonymous_id)?;
        if request.event.trim().is_empty() {
            return Err(ApiError::invalid_field("event", "is required").into());
        }
        let event = IngestedEvent {
            message_id: request.message_id.trim().to_owned(),
            kind: Kind::Track.into(),
            name: request.event.trim().to_owned(),
            user_id: request.user_id.trim().to_owned(),
            anonymous_id: request.anonymous_id.trim().to_owned(),
            properties: request.properties,
            context: request.context,
            timestamp: request.timestamp,
            ..Default::default()
        };
        let (message_id, duplicate) = self.accept(workspace, event).await?;
        Ok(Response::new(TrackResponse {
            message_id,
            duplicate,
        }))
    }

    async fn identify(
        &self,
        request: Request<IdentifyRequest>,
    ) -> Result<Response<IdentifyResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let request = request.into_inner();
        check_ids(&request.message_id, &request.user_id, &request.anonymous_id)?;
        let event = IngestedEvent {
            message_id: request.message_id.trim().to_owned(),
            kind: Kind::Identify.into(),
            user_id: request.user_id.trim().to_owned(),
            anonymous_id: request.anonymous_id.trim().to_owned(),
            traits: request.traits,
            context: request.context,
            timestamp: request.timestamp,
            ..Default::default()
        };
        let (message_id, duplicate) = self.accept(workspace, event).await?;
        Ok(Response::new(IdentifyResponse {
            message_id,
            duplicate,
        }))
    }
}
