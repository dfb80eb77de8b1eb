//! Journey runs: enrolment from segment entries, and the runner that executes
//! due steps.
//!
//! A step is executed inside a transaction that holds its run's row lock and
//! commits the run's next position with the step's event (outbox). A send
//! carries the idempotency key `<run id>:<step id>`, so if the process dies
//! after messaging delivered but before the commit, the step runs again and
//! messaging answers "already sent" instead of sending twice.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use prost::Message;
use rapport_bus::{Delivery, Handler, HandlerError, envelope, topics};
use rapport_core::WorkspaceId;
use rapport_core::json::json_to_struct;
use rapport_db::outbox::{self, OutboxWaker};
use rapport_grpc::auth::internal_request;
use rapport_proto::automation::v1::Journey;
use rapport_proto::automation::v1::journey::State;
use rapport_proto::automation::v1::step::Action;
use rapport_proto::automation::v1::trigger::Trigger;
use rapport_proto::contacts::v1::GetContactRequest;
use rapport_proto::contacts::v1::contacts_service_client::ContactsServiceClient;
use rapport_proto::events::v1::JourneyStepEvent;
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::journey_step_event::Status as StepStatus;
use rapport_proto::events::v1::membership_changed::Change;
use rapport_proto::messaging::v1::SendMessageRequest;
use rapport_proto::messaging::v1::messaging_service_client::MessagingServiceClient;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

/// Attempts at one step before the run fails.
const MAX_ATTEMPTS: i32 = 10;

pub struct Runner {
    pub pool: PgPool,
    pub waker: OutboxWaker,
    pub due: Arc<Notify>,
    pub contacts: ContactsServiceClient<Channel>,
    pub messaging: MessagingServiceClient<Channel>,
    pub credential: String,
    pub poll: Duration,
}

pub(crate) async fn step_event(
    transaction: &mut Transaction<'_, Postgres>,
    workspace: Uuid,
    event: JourneyStepEvent,
) -> Result<(), sqlx::Error> {
    let key = event.contact_id.clone();
    let envelope = envelope::new_envelope(
        &workspace.to_string(),
        "automation",
        Payload::JourneyStep(event),
    );
    outbox::enqueue(
        transaction,
        &envelope::to_record(topics::JOURNEY_STEPS, &key, &envelope),
    )
    .await
}

/// Enrols contacts that enter a segment some published journey starts from.
pub struct EnrolmentHandler {
    pub pool: PgPool,
    pub waker: OutboxWaker,
    pub due: Arc<Notify>,
}

#[async_trait]
impl Handler for EnrolmentHandler {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let incoming = envelope::decode(&delivery.record)?;
        let Some(Payload::MembershipChanged(change)) = &incoming.payload else {
            return Ok(());
        };
        if change.change() != Change::Entered {
            return Ok(());
        }
        let workspace = envelope::workspace(&incoming)?.0;
        let retryable = |error: sqlx::Error| HandlerError::Retryable(error.to_string());
        let mut transaction = self.pool.begin().await.map_err(retryable)?;
        let journeys: Vec<(Uuid, Vec<u8>)> =
            sqlx::query_as("SELECT id, definition FROM journeys WHERE workspace_id = $1")
                .bind(workspace)
                .fetch_all(&mut *transaction)
                .await
                .map_err(retryable)?;
        let mut enrolled = 0;
        for (journey_id, definition) in journeys {
            let Ok(journey) = Journey::decode(definition.as_slice()) else {
                continue;
            };
            let starts_here = matches!(
                journey.trigger.as_ref().and_then(|t| t.trigger.as_ref()),
                Some(Trigger::SegmentEntered(segment)) if segment == &change.segment_id
            );
            if journey.state() != State::Published || !starts_here {
                continue;
            }
            let run_id = rapport_core::ids::new_id();
            let inserted = sqlx::query(
                "INSERT INTO runs (run_id, workspace_id, journey_id, journey_version, definition, contact_id, due_at, trace_parent)
                 VALUES ($1, $2, $3, $4, $5, $6, now(), $7)
                 ON CONFLICT (workspace_id, journey_id, contact_id) DO NOTHING",
            )
            .bind(run_id)
            .bind(workspace)
            .bind(journey_id)
            .bind(journey.version)
            .bind(&definition)
            .bind(&change.contact_id)
            .bind(rapport_grpc::current_traceparent())
            .execute(&mut *transaction)
            .await
            .map_err(retryable)?
            .rows_affected();
            if inserted == 1 {
                enrolled += 1;
                step_event(
                    &mut transaction,
                    workspace,
                    JourneyStepEvent {
                        journey_id: journey_id.to_string(),
                        journey_version: journey.version,
                        run_id: run_id.to_string(),
                        contact_id: change.contact_id.clone(),
                        status: StepStatus::Enrolled.into(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(retryable)?;
            }
        }
        transaction.commit().await.map_err(retryable)?;
        if enrolled > 0 {
            self.waker.wake();
            self.due.notify_one();
        }
        Ok(())
    }
}

#[derive(sqlx::FromRow)]
struct DueRun {
    run_id: Uuid,
    workspace_id: Uuid,
    journey_id: Uuid,
    journey_version: i32,
    definition: Vec<u8>,
    contact_id: String,
    step_index: i32,
    attempts: i32,
    trace_parent: String,
}

enum StepResult {
    /// Go on to the next step at this time.
    Advance(chrono::DateTime<Utc>),
    /// Try this step again at this time.
    Retry(chrono::DateTime<Utc>, String),
    Fail(String),
}

impl Runner {
    pub fn spawn(self: Arc<Self>) -> (CancellationToken, JoinHandle<()>) {
        let cancel = CancellationToken::new();
        let task_cancel = cancel.clone();
        let task = tokio::spawn(async move {
            loop {
                if task_cancel.is_cancelled() {
                    break;
                }
                match self.run_one_due().await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(error) => tracing::warn!(%error, "journey runner failed; retrying"),
                }
                tokio::select! {
                    _ = task_cancel.cancelled() => break,
                    _ = self.due.notified() => {}
                    _ = tokio::time::sleep(self.poll) => {}
                }
            }
        });
        (cancel, task)
    }

    /// Executes one due step, if any; returns whether it found one.
    async fn run_one_due(&self) -> Result<bool, sqlx::Error> {
        let mut transaction = self.pool.begin().await?;
        let Some(run) = sqlx::query_as::<_, DueRun>(
            "SELECT run_id, workspace_id, journey_id, journey_version, definition, contact_id, step_index, attempts, trace_parent
             FROM runs WHERE status = 'active' AND due_at <= now()
             ORDER BY due_at LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .fetch_optional(&mut *transaction)
        .await?
        else {
            return Ok(false);
        };
        let span = tracing::info_span!(
            "journey step",
            otel.kind = "internal",
            run_id = %run.run_id,
            journey_id = %run.journey_id,
            step_index = run.step_index,
        );
        if !run.trace_parent.is_empty() {
            let _ = span.set_parent(rapport_grpc::context_from_traceparent(&run.trace_parent));
        }
        self.continue_run(transaction, run).instrument(span).await
    }

    /// Executes the due step of `run`, whose row `transaction` holds locked.
    async fn continue_run(
        &self,
        mut transaction: Transaction<'_, Postgres>,
        run: DueRun,
    ) -> Result<bool, sqlx::Error> {
        let journey = Journey::decode(run.definition.as_slice()).unwrap_or_default();
        let index = usize::try_from(run.step_index).unwrap_or(usize::MAX);
        let event = |status: StepStatus, step_id: &str, detail: String| JourneyStepEvent {
            journey_id: run.journey_id.to_string(),
            journey_version: run.journey_version,
            run_id: run.run_id.to_string(),
            contact_id: run.contact_id.clone(),
            step_id: step_id.to_owned(),
            status: status.into(),
            detail,
        };
        let Some(step) = journey.steps.get(index) else {
            sqlx::query("UPDATE runs SET status = 'completed', due_at = NULL, updated_at = now() WHERE run_id = $1")
                .bind(run.run_id)
                .execute(&mut *transaction)
                .await?;
            step_event(
                &mut transaction,
                run.workspace_id,
                event(StepStatus::Completed, "", String::new()),
            )
            .await?;
            transaction.commit().await?;
            self.waker.wake();
            return Ok(true);
        };
        let result = self
            .execute(&run, &step.step_id, step.action.as_ref())
            .await;
        let action = match &step.action {
            Some(Action::SendMessage(_)) => "send_message",
            Some(Action::Wait(_)) => "wait",
            None => "none",
        };
        let outcome = match &result {
            StepResult::Advance(_) => "completed",
            StepResult::Retry(..) => "retried",
            StepResult::Fail(_) => "failed",
        };
        rapport_metrics::metrics()
            .journey_steps
            .with_label_values(&[action, outcome])
            .inc();
        match result {
            StepResult::Advance(next_due) => {
                sqlx::query(
                    "UPDATE runs SET step_index = step_index + 1, due_at = $2, attempts = 0, last_error = '', updated_at = now()
                     WHERE run_id = $1",
                )
                .bind(run.run_id)
                .bind(next_due)
                .execute(&mut *transaction)
                .await?;
                step_event(
                    &mut transaction,
                    run.workspace_id,
                    event(StepStatus::StepCompleted, &step.step_id, String::new()),
                )
                .await?;
            }
            StepResult::Retry(next_due, error) => {
                tracing::warn!(run_id = %run.run_id, step_id = %step.step_id, %error, "journey step failed; will retry");
                sqlx::query(
                    "UPDATE runs SET attempts = attempts + 1, due_at = $2, last_error = $3, updated_at = now() WHERE run_id = $1",
                )
                .bind(run.run_id)
                .bind(next_due)
                .bind(&error)
                .execute(&mut *transaction)
                .await?;
            }
            StepResult::Fail(error) => {
                tracing::warn!(run_id = %run.run_id, step_id = %step.step_id, %error, "journey step failed; run stopped");
                sqlx::query(
                    "UPDATE runs SET status = 'failed', due_at = NULL, last_error = $2, updated_at = now() WHERE run_id = $1",
                )
                .bind(run.run_id)
                .bind(&error)
                .execute(&mut *transaction)
                .await?;
                step_event(
                    &mut transaction,
                    run.workspace_id,
                    event(StepStatus::StepFailed, &step.step_id, error),
                )
                .await?;
            }
        }
        transaction.commit().await?;
        self.waker.wake();
        Ok(true)
    }

    async fn execute(&self, run: &DueRun, step_id: &str, action: Option<&Action>) -> StepResult {
        let now = Utc::now();
        match action {
            None => StepResult::Advance(now),
            Some(Action::Wait(wait)) => {
                let duration = wait
                    .duration
                    .map(|d| {
                        chrono::Duration::seconds(d.seconds)
                            + chrono::Duration::nanoseconds(i64::from(d.nanos))
                    })
                    .unwrap_or_else(chrono::Duration::zero);
                StepResult::Advance(now + duration)
            }
            Some(Action::SendMessage(send)) => {
                match self.send(run, step_id, &send.template).await {
                    Ok(()) => StepResult::Advance(now),
                    Err(status)
                        if is_retryable(status.code()) && run.attempts + 1 < MAX_ATTEMPTS =>
                    {
                        let backoff = chrono::Duration::seconds(
                            2_i64.pow(u32::try_from(run.attempts).unwrap_or(0).min(8)),
                        );
                        StepResult::Retry(
                            now + backoff,
                            format!("{:?}: {}", status.code(), status.message()),
                        )
                    }
                    Err(status) => {
                        StepResult::Fail(format!("{:?}: {}", status.code(), status.message()))
                    }
                }
            }
        }
    }

    async fn send(&self, run: &DueRun, step_id: &str, template: &str) -> Result<(), tonic::Status> {
        let workspace = WorkspaceId(run.workspace_id);
        let contact = self
            .contacts
            .clone()
            .get_contact(internal_request(
                GetContactRequest {
                    contact_id: run.contact_id.clone(),
                },
                &self.credential,
                workspace,
            ))
            .await?
            .into_inner()
            .contact
            .ok_or_else(|| tonic::Status::not_found("contact"))?;
        let variables = serde_json::json!({
            "contact": {
                "contact_id": contact.contact_id,
                "email": contact.email,
                "first_name": contact.first_name,
                "last_name": contact.last_name,
                "company": contact.company,
                "lifecycle_stage": contact.lifecycle_stage,
            }
        });
        self.messaging
            .clone()
            .send_message(internal_request(
                SendMessageRequest {
                    idempotency_key: format!("{}:{step_id}", run.run_id),
                    template: template.to_owned(),
                    contact_id: contact.contact_id.clone(),
                    to_email: contact.email.clone(),
                    variables: Some(json_to_struct(&variables)),
                    journey_id: run.journey_id.to_string(),
                },
                &self.credential,
                workspace,
            ))
            .await?;
        Ok(())
    }
}

fn is_retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Aborted
            | tonic::Code::ResourceExhausted
            | tonic::Code::Internal
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}
