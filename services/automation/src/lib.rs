//! The automation service: journey definitions, enrolment of contacts that
//! enter a journey's segment, the runner that executes due steps, and the
//! stopping of runs whose contact is erased or merged away.
//!
//! Owns the `automation` Postgres schema.

use std::collections::HashSet;

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use rapport_bus::{SharedBus, Subscription, topics};
use rapport_config::ServiceKind;
use rapport_core::paging::{Page, finish_page};
use rapport_core::time::to_timestamp;
use rapport_core::{ApiError, FieldViolation};
use rapport_db::definitions::{DefinitionRow, Definitions, check_name};
use rapport_db::outbox::{self, OutboxWaker};
use rapport_grpc::auth::workspace_of;
use rapport_grpc::{BackgroundTask, GrpcService, ServiceParts};
use rapport_proto::automation::v1::automation_service_server::{
    AutomationService, AutomationServiceServer,
};
use rapport_proto::automation::v1::journey::State;
use rapport_proto::automation::v1::step::Action;
use rapport_proto::automation::v1::trigger::Trigger as TriggerKind;
use rapport_proto::automation::v1::*;
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

mod contact_changes;
mod runner;

pub const SCHEMA: &str = "automation";
pub const CONSUMER_GROUP: &str = "rapport-automation";
/// The group that consumes contact changes (erasures and merges), apart from
/// enrolment so neither holds the other up.
pub const CONTACTS_CONSUMER_GROUP: &str = "rapport-automation-contacts";
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub async fn build(
    pool: PgPool,
    bus: SharedBus,
    config: &rapport_config::Config,
) -> Result<ServiceParts, rapport_bus::BusError> {
    let channel = |service: ServiceKind| {
        tonic::transport::Endpoint::from_shared(config.endpoint(service))
            .map(|endpoint| {
                endpoint
                    .connect_timeout(Duration::from_secs(5))
                    .connect_lazy()
            })
            .map_err(|error| rapport_bus::BusError::Invalid(format!("{service} endpoint: {error}")))
    };
    let waker = OutboxWaker::default();
    let relay = outbox::spawn_relay(pool.clone(), bus.clone(), SCHEMA, waker.clone());
    let due = Arc::new(tokio::sync::Notify::new());
    let runner = Arc::new(runner::Runner {
        pool: pool.clone(),
        waker: waker.clone(),
        due: due.clone(),
        contacts: rapport_proto::contacts::v1::contacts_service_client::ContactsServiceClient::new(
            channel(ServiceKind::Contacts)?,
        ),
        messaging:
            rapport_proto::messaging::v1::messaging_service_client::MessagingServiceClient::new(
                channel(ServiceKind::Messaging)?,
            ),
        credential: rapport_core::signing::Signer::internal_credential(&config.internal_secret()),
        poll: Duration::from_millis(config.automation_poll_ms),
    });
    let contact_consumer = bus
        .subscribe(
            Subscription::new(CONTACTS_CONSUMER_GROUP, &[topics::CONTACT_CHANGES])
                .with_max_attempts(config.kafka.max_delivery_attempts),
            Arc::new(contact_changes::ContactChangeHandler {
                pool: pool.clone(),
                waker: waker.clone(),
            }),
        )
        .await?;
    let consumer = bus
        .subscribe(
            Subscription::new(CONSUMER_GROUP, &[topics::MEMBERSHIPS])
                .with_max_attempts(config.kafka.max_delivery_attempts),
            Arc::new(runner::EnrolmentHandler {
                pool: pool.clone(),
                waker,
                due,
            }),
        )
        .await?;
    let (runner_cancel, runner_task) = runner.spawn();
    let api = AutomationApi {
        journeys: Definitions::new(pool, "journeys", "journey"),
    };
    Ok(ServiceParts {
        grpc: GrpcService {
            name: rapport_proto::service_names::AUTOMATION,
            routes: tonic::service::Routes::new(AutomationServiceServer::new(api)),
        },
        background: vec![
            BackgroundTask::new("automation membership consumer", move || {
                consumer.shutdown()
            }),
            BackgroundTask::new("automation contact consumer", move || {
                contact_consumer.shutdown()
            }),
            BackgroundTask::new("automation journey runner", move || async move {
                runner_cancel.cancel();
                let _ = runner_task.await;
            }),
            BackgroundTask::flush("automation outbox relay", move || relay.shutdown()),
        ],
    })
}

struct AutomationApi {
    journeys: Definitions,
}

fn to_proto(row: &DefinitionRow) -> Result<Journey, ApiError> {
    let mut journey =
        Journey::decode(row.definition.as_slice()).map_err(|error| ApiError::internal(&error))?;
    journey.journey_id = row.id.to_string();
    journey.name = row.name.clone();
    journey.create_time = Some(to_timestamp(row.created_at));
    journey.update_time = Some(to_timestamp(row.updated_at));
    Ok(journey)
}

fn check_journey(journey: &Journey) -> Vec<FieldViolation> {
    let mut violations = Vec::new();
    let mut violation = |field: String, description: &str| {
        violations.push(FieldViolation {
            field,
            description: description.to_owned(),
        })
    };
    match journey.trigger.as_ref().and_then(|t| t.trigger.as_ref()) {
        None => violation("journey.trigger".into(), "is required"),
        Some(TriggerKind::SegmentEntered(segment)) if segment.trim().is_empty() => violation(
            "journey.trigger.segment_entered".into(),
            "must name a segment id",
        ),
        Some(TriggerKind::Event(_)) => violation(
            "journey.trigger.event".into(),
            "event triggers are not supported yet; use segment_entered",
        ),
        Some(_) => {}
    }
    if !matches!(
        State::try_from(journey.state),
        Ok(State::Unspecified | State::Draft | State::Published)
    ) {
        violation(
            "journey.state".into(),
            "must be STATE_DRAFT or STATE_PUBLISHED on creation",
        );
    }
    if journey.steps.is_empty() {
        violation("journey.steps".into(), "must hold at least one step");
    }
    let mut step_ids = HashSet::new();
    for (index, step) in journey.steps.iter().enumerate() {
        let path = format!("journey.steps[{index}]");
        if step.step_id.trim().is_empty() {
            violation(format!("{path}.step_id"), "is required");
        } else if !step_ids.insert(step.step_id.trim()) {
            violation(format!("{path}.step_id"), "is used by an earlier step");
        }
        match &step.action {
            None => violation(
                format!("{path}.action"),
                "is required (send_message or wait)",
            ),
            Some(Action::SendMessage(send)) if send.template.trim().is_empty() => {
                violation(format!("{path}.send_message.template"), "is required")
            }
            Some(Action::Wait(wait)) => {
                let positive = wait
                    .duration
                    .as_ref()
                    .is_some_and(|d| d.seconds > 0 || (d.seconds == 0 && d.nanos > 0));
                if !positive {
                    violation(format!("{path}.wait.duration"), "must be positive");
                }
            }
            Some(_) => {}
        }
    }
    violations
}

#[tonic::async_trait]
impl AutomationService for AutomationApi {
    async fn create_journey(
        &self,
        request: Request<CreateJourneyRequest>,
    ) -> Result<Response<CreateJourneyResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let Some(journey) = request.into_inner().journey else {
            return Err(ApiError::invalid_field("journey", "is required").into());
        };
        let name = check_name("journey.name", &journey.name)?;
        let violations = check_journey(&journey);
        if !violations.is_empty() {
            return Err(ApiError::invalid_fields(violations).into());
        }
        let state = match State::try_from(journey.state) {
            Ok(State::Published) => State::Published,
            _ => State::Draft,
        };
        let stored = Journey {
            state: state.into(),
            version: 1,
            trigger: journey.trigger,
            steps: journey.steps,
            ..Default::default()
        };
        let row = self
            .journeys
            .create(workspace, &name, &stored.encode_to_vec())
            .await?;
        Ok(Response::new(CreateJourneyResponse {
            journey: Some(to_proto(&row)?),
        }))
    }

    async fn get_journey(
        &self,
        request: Request<GetJourneyRequest>,
    ) -> Result<Response<GetJourneyResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let id = rapport_core::ids::parse_id("journey_id", &request.get_ref().journey_id)?;
        let row = self.journeys.get(workspace, id).await?;
        Ok(Response::new(GetJourneyResponse {
            journey: Some(to_proto(&row)?),
        }))
    }

    async fn list_journeys(
        &self,
        request: Request<ListJourneysRequest>,
    ) -> Result<Response<ListJourneysResponse>, Status> {
        let workspace = workspace_of(&request)?;
        let page = Page::<Uuid>::parse(request.get_ref().page.as_ref())?;
        let rows = self
            .journeys
            .list(workspace, page.after, page.fetch_limit())
            .await?;
        let (rows, page) = finish_page(rows, page.size, |row| row.id);
        Ok(Response::new(ListJourneysResponse {
            journeys: rows.iter().map(to_proto).collect::<Result<_, _>>()?,
            page: Some(page),
        }))
    }
}
