//! The segmentation service: segment definitions, and memberships that change
//! as contact changes arrive.
//!
//! Owns the `segmentation` Postgres schema.

use std::sync::Arc;

use prost::Message;
use rapport_bus::{SharedBus, Subscription, topics};
use rapport_core::paging::{Page, finish_page};
use rapport_core::time::to_timestamp;
use rapport_core::{ApiError, FieldViolation};
use rapport_db::definitions::{DefinitionRow, Definitions, check_name};
use rapport_db::outbox::{self, OutboxWaker};
use rapport_grpc::auth::workspace_of;
use rapport_grpc::{BackgroundTask, GrpcService, ServiceParts};
use rapport_proto::segmentation::v1::condition::Condition as Kind;
use rapport_proto::segmentation::v1::field_condition::Operator;
use rapport_proto::segmentation::v1::segmentation_service_server::{
    SegmentationService, SegmentationServiceServer,
};
use rapport_proto::segmentation::v1::*;
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

mod evaluate;
mod membership;

pub const SCHEMA: &str = "segmentation";
pub const CONSUMER_GROUP: &str = "rapport-segmentation";
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

const MAX_DEPTH: usize = 8;

pub async fn build(
    pool: PgPool,
    bus: SharedBus,
    config: &rapport_config::Config,
) -> Result<ServiceParts, rapport_bus::BusError> {
    let waker = OutboxWaker::default();
    let relay = outbox::spawn_relay(pool.clone(), bus.clone(), SCHEMA, waker.clone());
    let engine = Arc::new(membership::Engine {
        pool: pool.clone(),
        waker,
    });
    let consumer = bus
        .subscribe(
            Subscription::new(CONSUMER_GROUP, &[topics::CONTACT_CHANGES])
                .with_max_attempts(config.kafka.max_delivery_attempts),
            Arc::new(membership::ContactChangeHandler {
                engine: engine.clone(),
            }),
        )
        .await?;
    let api = SegmentationApi {
        segments: Definitions::new(pool, "segments", "segment"),
        engine,
    };
    Ok(ServiceParts {
        grpc: GrpcService {
            name: rapport_proto::service_names::SEGMENTATION,
            routes: tonic::service::Routes::new(SegmentationServiceServer::new(api)),
        },
        background: vec![
            BackgroundTask::new("segmentation contact consumer", move || consumer.shutdown()),
            BackgroundTask::flush("segmentation outbox relay", move || relay.shutdown()),
        ],
    })
}

struct SegmentationApi {
    segments: Definitions,
    engine: Arc<membership::Engine>,
}

fn to_proto(row: &DefinitionRow) -> Result<Segment, ApiError> {
    let mut segment =
        Segment::decode(row.definition.as_slice()).map_err(|error| ApiError::internal(&error))?;
    segment.segment_id = row.id.to_string();
    segment.name = row.name.clone();
    segment.create_time = Some(to_timestamp(row.created_at));
    segment.update_time = Some(to_timestamp(row.updated_at));
    Ok(segment)
}

/// Checks a condition tree, collecting a violation per bad node.
fn check_condition(
    condition: Option<&Condition>,
    path: &str,
    depth: usize,
    violations: &mut Vec<FieldViolation>,
) {
    let mut violation = |field: String, description: &str| {
        violations.push(FieldViolation {
            field,
            description: description.to_owned(),
        })
    };
    if depth > MAX_DEPTH {
        violation(path.to_owned(), "is nested too deeply (at most 8 levels)");
        return;
    }
    let Some(kind) = condition.and_then(|c| c.condition.as_ref()) else {
        violation(path.to_owned(), "is required");
        return;
    };
    match kind {
        Kind::All(AllOf { conditions }) | Kind::Any(AnyOf { conditions }) => {
            let field = if matches!(kind, Kind::All(_)) {
                "all"
            } else {
                "any"
            };
            if conditions.is_empty() {
                violation(
                    format!("{path}.{field}.conditions"),
                    "must hold at least one condition",
                );
            }
            for (index, child) in conditions.iter().enumerate() {
                check_condition(
                    Some(child),
                    &format!("{path}.{field}.conditions[{index}]"),
                    depth + 1,
                    violations,
                );
            }
        }
        Kind::Field(field) => {
            if field.field.trim().is_empty() {
                violation(format!("{path}.field.field"), "is required");
            }
            match Operator::try_from(field.operator) {
                Ok(Operator::Unspecified) | Err(_) => {
                    violation(format!("{path}.field.operator"), "is required")
                }
                Ok(Operator::WithinLast) if field.within_seconds <= 0 => violation(
                    format!("{path}.field.within_seconds"),
                    "must be positive for OPERATOR_WITHIN_LAST",
                ),
                Ok(_) => {}
            }
        }
        Kind::Event(_) => {
            violation(
                format!("{path}.event"),
                "event conditions are not supported yet; use field conditions",
            );
        }
    }
}

#[tonic::async_trait]
impl SegmentationService for SegmentationApi {
    async fn create_segment(
        &self,
        request: Request<CreateSegmentRequest>,
    ) -> Result<Response<CreateSegmentResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let Some(segment) = request.into_inner().segment else {
            return Err(ApiError::invalid_field("segment", "is required").into());
        };
        let name = check_name("segment.name", &segment.name)?;
        let mut violations = Vec::new();
        check_condition(
            segment.condition.as_ref(),
            "segment.condition",
            1,
            &mut violations,
        );
        if !violations.is_empty() {
            return Err(ApiError::invalid_fields(violations).into());
        }
        let stored = Segment {
            description: segment.description.trim().to_owned(),
            condition: segment.condition,
            ..Default::default()
        };
        let row = self
            .segments
            .create(workspace, &name, &stored.encode_to_vec())
            .await?;
        // Contacts already known enter the new segment now.
        // The segment exists from here on; a failed backfill leaves known
        // contacts out until their next change, which is logged, not an
        // error for the caller.
        match self.engine.backfill(workspace.0, row.id, &stored).await {
            Ok(entered) => tracing::info!(segment_id = %row.id, entered, "segment created"),
            Err(error) => {
                tracing::warn!(segment_id = %row.id, %error, "segment created; backfill failed")
            }
        }
        Ok(Response::new(CreateSegmentResponse {
            segment: Some(to_proto(&row)?),
        }))
    }

    async fn get_segment(
        &self,
        request: Request<GetSegmentRequest>,
    ) -> Result<Response<GetSegmentResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let id = rapport_core::ids::parse_id("segment_id", &request.get_ref().segment_id)?;
        let row = self.segments.get(workspace, id).await?;
        Ok(Response::new(GetSegmentResponse {
            segment: Some(to_proto(&row)?),
        }))
    }

    async fn list_segments(
        &self,
        request: Request<ListSegmentsRequest>,
    ) -> Result<Response<ListSegmentsResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let page = Page::<Uuid>::parse(request.get_ref().page.as_ref())?;
        let rows = self
            .segments
            .list(workspace, page.after, page.fetch_limit())
            .await?;
        let (rows, page) = finish_page(rows, page.size, |row| row.id);
        Ok(Response::new(ListSegmentsResponse {
            segments: rows.iter().map(to_proto).collect::<Result<_, _>>()?,
            page: Some(page),
        }))
    }
}
