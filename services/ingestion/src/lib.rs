//! The ingestion service: everything people do enters Rapport here.
//!
//! Owns the `ingestion` Postgres schema (the dedupe window, landing pages and
//! forms). gRPC takes events from integrations; the public HTTP endpoint
//! serves landing pages and takes form posts, email opens, clicks and
//! unsubscribes. An event is acknowledged only once the bus has it: ingestion
//! publishes directly rather than through an outbox, because it has no state
//! change of its own to keep consistent with the event.

use std::sync::Arc;

use rapport_bus::SharedBus;
use rapport_core::{ApiError, FieldViolation};
use rapport_db::definitions::check_name;
use rapport_grpc::auth::workspace_of;
use rapport_grpc::{BackgroundTask, GrpcService, ServiceParts};
use rapport_proto::events::v1::IngestedEvent;
use rapport_proto::events::v1::ingested_event::Kind;
use rapport_proto::ingestion::v1::ingestion_service_server::{
    IngestionService, IngestionServiceServer,
};
use rapport_proto::ingestion::v1::*;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

mod http;
mod intake;
mod pages;
mod segment;

pub const SCHEMA: &str = "ingestion";
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

const MAX_ID_LENGTH: usize = 255;

/// How long a message id is remembered: a repeat within this window is
/// acknowledged and dropped.
pub const DEDUPE_WINDOW_HOURS: i32 = 7 * 24;

/// Forgets message ids older than the dedupe window, every ten minutes.
fn spawn_dedupe_pruner(pool: PgPool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let pruned = sqlx::query(
                "DELETE FROM seen_messages WHERE received_at < now() - make_interval(hours => $1)",
            )
            .bind(DEDUPE_WINDOW_HOURS)
            .execute(&pool)
            .await;
            match pruned {
                Ok(result) if result.rows_affected() > 0 => {
                    tracing::info!(pruned = result.rows_affected(), "dedupe window pruned")
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "dedupe pruning failed"),
            }
            tokio::time::sleep(std::time::Duration::from_secs(600)).await;
        }
    })
}

pub async fn build(
    pool: PgPool,
    bus: SharedBus,
    config: &rapport_config::Config,
) -> Result<ServiceParts, rapport_bus::BusError> {
    let intake = intake::Intake {
        pool: pool.clone(),
        bus,
    };
    let state = Arc::new(http::HttpState {
        intake: intake.clone(),
        signer: rapport_core::signing::Signer::new(
            &config.internal_secret(),
            rapport_core::signing::TRACKING_PURPOSE,
        ),
        public_url: config.public_url.clone(),
        keys: Arc::new(rapport_tenancy::KeyResolver::new(
            rapport_db::connect(config.database_url(), rapport_tenancy::SCHEMA, 4)
                .await
                .map_err(|error| {
                    rapport_bus::BusError::Unavailable(format!("tenancy database: {error}"))
                })?,
            std::time::Duration::from_millis(config.api_key_cache_ms),
        )),
    });
    let listener =
        tokio::net::TcpListener::bind((config.listen_host.as_str(), config.ports.ingestion_http))
            .await
            .map_err(|error| {
                rapport_bus::BusError::Invalid(format!(
                    "ingestion HTTP cannot listen on {}:{}: {error}",
                    config.listen_host, config.ports.ingestion_http
                ))
            })?;
    let local_addr = listener.local_addr().ok();
    tracing::info!(address = ?local_addr, "ingestion HTTP listening");
    let cancel = CancellationToken::new();
    let server_cancel = cancel.clone();
    let router = http::router(state);
    let server = tokio::spawn(async move {
        let shutdown = async move { server_cancel.cancelled().await };
        if let Err(error) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(%error, "ingestion HTTP server failed");
        }
    });
    let pruner = spawn_dedupe_pruner(pool.clone());
    Ok(ServiceParts {
        grpc: GrpcService {
            name: rapport_proto::service_names::INGESTION,
            routes: tonic::service::Routes::new(IngestionServiceServer::new(IngestionApi {
                intake,
                pool,
                public_url: config.public_url.clone(),
            })),
        },
        background: vec![
            BackgroundTask::new("ingestion HTTP server", move || async move {
                cancel.cancel();
                let _ = server.await;
            }),
            BackgroundTask::new("ingestion dedupe pruner", move || async move {
                pruner.abort();
            }),
        ],
    })
}

struct IngestionApi {
    intake: intake::Intake,
    pool: PgPool,
    public_url: String,
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
        let accepted = self.intake.accept(workspace, event).await?;
        Ok(Response::new(TrackResponse {
            message_id: accepted.message_id,
            duplicate: accepted.duplicate,
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
        let accepted = self.intake.accept(workspace, event).await?;
        Ok(Response::new(IdentifyResponse {
            message_id: accepted.message_id,
            duplicate: accepted.duplicate,
        }))
    }

    async fn create_landing_page(
        &self,
        request: Request<CreateLandingPageRequest>,
    ) -> Result<Response<CreateLandingPageResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let Some(mut page) = request.into_inner().page else {
            return Err(ApiError::invalid_field("page", "is required").into());
        };
        page.name = check_name("page.name", &page.name)?;
        pages::check(&page)?;
        let page = pages::create(&self.pool, workspace, page, &self.public_url).await?;
        Ok(Response::new(CreateLandingPageResponse {
            page: Some(page),
        }))
    }

    async fn get_landing_page(
        &self,
        request: Request<GetLandingPageRequest>,
    ) -> Result<Response<GetLandingPageResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let page_id = rapport_core::ids::parse_id("page_id", &request.get_ref().page_id)?;
        match pages::by_page(&self.pool, page_id).await? {
            Some(stored) if stored.workspace == workspace => {
                Ok(Response::new(GetLandingPageResponse {
                    page: Some(stored.page),
                }))
            }
            _ => Err(ApiError::not_found(format!("landing page {page_id}")).into()),
        }
    }
}
