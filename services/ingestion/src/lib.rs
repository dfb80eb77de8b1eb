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
use rapport_proto::ingestion::v1::ingestion_service_server::{
    IngestionService, IngestionServiceServer,
};
use rapport_proto::ingestion::v1::*;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

mod events;
mod http;
mod intake;
mod intent;
mod pages;
mod segment;

pub const SCHEMA: &str = "ingestion";
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

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
        rules: Arc::new(intent::IntentRules::new(pool.clone())),
    };
    let (group_commit, group_commit_task) = intake::GroupCommit::spawn(intake.clone());
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
        form_limiter: http::FormLimiter::default(),
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
        let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
        // Answers go out at once rather than waiting on Nagle's algorithm
        // for the client's delayed acknowledgement.
        let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
            let _ = stream.set_nodelay(true);
        });
        if let Err(error) = axum::serve(listener, service)
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
                group_commit,
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
            // Ends once the gRPC server (which holds its sender) has drained.
            BackgroundTask::flush("ingestion group commit", move || async move {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), group_commit_task)
                    .await;
            }),
        ],
    })
}

fn intent_rule_proto(row: &rapport_db::definitions::DefinitionRow) -> Result<IntentRule, ApiError> {
    let mut rule: IntentRule = prost::Message::decode(row.definition.as_slice())
        .map_err(|error| ApiError::internal(&error))?;
    rule.rule_id = row.id.to_string();
    rule.create_time = Some(rapport_core::time::to_timestamp(row.created_at));
    Ok(rule)
}

struct IngestionApi {
    intake: intake::Intake,
    group_commit: intake::GroupCommit,
    pool: PgPool,
    public_url: String,
}

/// Most events one Batch call (or one stream message) may carry.
pub const MAX_BATCH_EVENTS: usize = 1000;

impl IngestionApi {
    fn intent_rules(&self) -> rapport_db::definitions::Definitions {
        rapport_db::definitions::Definitions::new(self.pool.clone(), "intent_rules", "intent rule")
    }

    async fn one(
        &self,
        workspace: rapport_core::WorkspaceId,
        event: Result<IngestedEvent, Vec<FieldViolation>>,
    ) -> Result<(String, bool), Status> {
        let event = event.map_err(ApiError::invalid_fields)?;
        let accepted = self.group_commit.accept(workspace, event).await?;
        Ok((accepted.message_id, accepted.duplicate))
    }

    /// Checks every event, then accepts them all at once.
    async fn many(
        &self,
        workspace: rapport_core::WorkspaceId,
        events: Vec<rapport_proto::ingestion::v1::Event>,
    ) -> Result<intake::BatchOutcome, Status> {
        if events.len() > MAX_BATCH_EVENTS {
            return Err(ApiError::invalid_field(
                "events",
                format!(
                    "holds {} events; at most {MAX_BATCH_EVENTS} per call",
                    events.len()
                ),
            )
            .into());
        }
        let mut checked = Vec::with_capacity(events.len());
        let mut violations = Vec::new();
        for (index, event) in events.into_iter().enumerate() {
            match events::any(event, &format!("events[{index}].")) {
                Ok(event) => checked.push(event),
                Err(mut problems) => violations.append(&mut problems),
            }
        }
        if !violations.is_empty() {
            return Err(ApiError::invalid_fields(violations).into());
        }
        Ok(self.intake.accept_batch(workspace, checked).await?)
    }
}

#[tonic::async_trait]
impl IngestionService for IngestionApi {
    async fn track(
        &self,
        request: Request<TrackRequest>,
    ) -> Result<Response<TrackResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let (message_id, duplicate) = self
            .one(workspace, events::track(request.into_inner(), ""))
            .await?;
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
        let (message_id, duplicate) = self
            .one(workspace, events::identify(request.into_inner(), ""))
            .await?;
        Ok(Response::new(IdentifyResponse {
            message_id,
            duplicate,
        }))
    }

    async fn page(&self, request: Request<PageRequest>) -> Result<Response<PageResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let (message_id, duplicate) = self
            .one(workspace, events::page(request.into_inner(), ""))
            .await?;
        Ok(Response::new(PageResponse {
            message_id,
            duplicate,
        }))
    }

    async fn group(
        &self,
        request: Request<GroupRequest>,
    ) -> Result<Response<GroupResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let (message_id, duplicate) = self
            .one(workspace, events::group(request.into_inner(), ""))
            .await?;
        Ok(Response::new(GroupResponse {
            message_id,
            duplicate,
        }))
    }

    async fn alias(
        &self,
        request: Request<AliasRequest>,
    ) -> Result<Response<AliasResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let (message_id, duplicate) = self
            .one(workspace, events::alias(request.into_inner(), ""))
            .await?;
        Ok(Response::new(AliasResponse {
            message_id,
            duplicate,
        }))
    }

    async fn batch(
        &self,
        request: Request<BatchRequest>,
    ) -> Result<Response<BatchResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let outcome = self.many(workspace, request.into_inner().events).await?;
        Ok(Response::new(BatchResponse {
            message_ids: outcome.message_ids,
            accepted: i32::try_from(outcome.accepted).unwrap_or(i32::MAX),
            duplicates: i32::try_from(outcome.duplicates).unwrap_or(i32::MAX),
        }))
    }

    async fn stream_events(
        &self,
        request: Request<tonic::Streaming<StreamEventsRequest>>,
    ) -> Result<Response<StreamEventsResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let mut stream = request.into_inner();
        let mut totals = StreamEventsResponse::default();
        while let Some(message) = stream.message().await? {
            let outcome = self.many(workspace, message.events).await?;
            totals.accepted += i64::try_from(outcome.accepted).unwrap_or(0);
            totals.duplicates += i64::try_from(outcome.duplicates).unwrap_or(0);
        }
        Ok(Response::new(totals))
    }

    async fn create_intent_rule(
        &self,
        request: Request<CreateIntentRuleRequest>,
    ) -> Result<Response<CreateIntentRuleResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let Some(rule) = request.into_inner().rule else {
            return Err(ApiError::invalid_field("rule", "is required").into());
        };
        intent::check(&rule)?;
        let stored = IntentRule {
            signal: rule.signal.trim().to_owned(),
            rule: rule.rule,
            ..Default::default()
        };
        let row = self
            .intent_rules()
            .create(
                workspace,
                &stored.signal,
                &prost::Message::encode_to_vec(&stored),
            )
            .await?;
        self.intake.rules.forget(workspace);
        Ok(Response::new(CreateIntentRuleResponse {
            rule: Some(intent_rule_proto(&row)?),
        }))
    }

    async fn list_intent_rules(
        &self,
        request: Request<ListIntentRulesRequest>,
    ) -> Result<Response<ListIntentRulesResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let page =
            rapport_core::paging::Page::<uuid::Uuid>::parse(request.get_ref().page.as_ref())?;
        let rows = self
            .intent_rules()
            .list(workspace, page.after, page.fetch_limit())
            .await?;
        let (rows, page) = rapport_core::paging::finish_page(rows, page.size, |row| row.id);
        Ok(Response::new(ListIntentRulesResponse {
            rules: rows
                .iter()
                .map(intent_rule_proto)
                .collect::<Result<_, _>>()?,
            page: Some(page),
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
