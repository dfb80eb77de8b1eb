//! Accepting one event: dedupe on its message id, publish, acknowledge.
//!
//! The dedupe mark is inserted in a transaction that stays open while the
//! event is published and commits only after the bus acknowledged it. A
//! concurrent retry of the same message id waits on that row; a failed
//! publish rolls the mark back so the client's retry goes through. Nothing
//! acknowledged is lost; if the process dies between the bus's
//! acknowledgement and the commit, a retry publishes the event again with the
//! same message id (and a new envelope event id); consumers that count
//! ingested events deduplicate on the message id.

use chrono::Utc;
use rapport_bus::{SharedBus, envelope, topics};
use rapport_core::time::to_timestamp;
use rapport_core::{ApiError, WorkspaceId};
use rapport_db::map_db_error;
use rapport_proto::events::v1::IngestedEvent;
use rapport_proto::events::v1::envelope::Payload;
use sqlx::PgPool;

#[derive(Clone)]
pub struct Intake {
    pub pool: PgPool,
    pub bus: SharedBus,
    /// Marks events with the workspace's intent signals before they leave.
    pub rules: std::sync::Arc<crate::intent::IntentRules>,
}

pub struct Accepted {
    pub message_id: String,
    pub duplicate: bool,
}

impl Intake {
    /// Accepts one event: a batch of one.
    pub async fn accept(
        &self,
        workspace: WorkspaceId,
        event: IngestedEvent,
    ) -> Result<Accepted, ApiError> {
        let outcome = self.accept_batch(workspace, vec![event]).await?;
        Ok(Accepted {
            message_id: outcome.message_ids.into_iter().next().unwrap_or_default(),
            duplicate: outcome.duplicate.first().copied().unwrap_or(false),
        })
    }
}

/// What [`Intake::accept_batch`] did.
pub struct BatchOutcome {
    /// Message ids in the order of the events given.
    pub message_ids: Vec<String>,
    /// Whether each event (in the order given) was a duplicate.
    pub duplicate: Vec<bool>,
    pub accepted: usize,
    pub duplicates: usize,
}

impl Intake {
    /// Accepts many events with one dedupe statement and one publish: every
    /// new event is on the bus before this returns, or none is marked seen.
    pub async fn accept_batch(
        &self,
        workspace: WorkspaceId,
        mut events: Vec<IngestedEvent>,
    ) -> Result<BatchOutcome, ApiError> {
        let now = to_timestamp(Utc::now());
        for event in &mut events {
            if event.message_id.trim().is_empty() {
                event.message_id = rapport_core::ids::new_id().to_string();
            }
            event.received_at = Some(now);
            if event.timestamp.is_none() {
                event.timestamp = Some(now);
            }
        }
        let message_ids: Vec<String> = events
            .iter()
            .map(|event| event.message_id.clone())
            .collect();
        let mut transaction = self.pool.begin().await.map_err(map_db_error)?;
        let fresh: Vec<String> = sqlx::query_scalar(
            "INSERT INTO seen_messages (workspace_id, message_id)
             SELECT $1, unnest($2::text[])
             ON CONFLICT DO NOTHING
             RETURNING message_id",
        )
        .bind(workspace.0)
        .bind(&message_ids)
        .fetch_all(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        let mut fresh: std::collections::HashSet<String> = fresh.into_iter().collect();
        let workspace_text = workspace.to_string();
        let metrics = rapport_metrics::metrics();
        let mut records = Vec::with_capacity(fresh.len());
        let mut kinds = Vec::with_capacity(fresh.len());
        let mut duplicate = Vec::with_capacity(message_ids.len());
        let mut taken = Vec::with_capacity(fresh.len());
        for event in events {
            // The first event with a new id is taken; repeats are duplicates.
            if !fresh.remove(&event.message_id) {
                duplicate.push(true);
                continue;
            }
            duplicate.push(false);
            taken.push(event);
        }
        self.rules
            .mark(&mut transaction, workspace, &mut taken)
            .await
            .map_err(map_db_error)?;
        for event in taken {
            let key = [&event.contact_id, &event.user_id, &event.anonymous_id]
                .into_iter()
                .find(|id| !id.is_empty())
                .cloned()
                .unwrap_or_else(|| event.message_id.clone());
            kinds.push(
                event
                    .kind()
                    .as_str_name()
                    .trim_start_matches("KIND_")
                    .to_ascii_lowercase(),
            );
            let envelope =
                envelope::new_envelope(&workspace_text, "ingestion", Payload::IngestedEvent(event));
            records.push(envelope::to_record(
                topics::INGESTED_EVENTS,
                &key,
                &envelope,
            ));
        }
        let accepted = records.len();
        if accepted > 0 {
            if let Err(error) = self.bus.publish_batch(records).await {
                tracing::warn!(%error, "event bus refused a batch");
                let _ = transaction.rollback().await;
                return Err(ApiError::unavailable("event log unavailable; retry"));
            }
        }
        transaction.commit().await.map_err(map_db_error)?;
        for kind in kinds {
            metrics
                .events_ingested
                .with_label_values(&[kind.as_str()])
                .inc();
        }
        let duplicates = message_ids.len() - accepted;
        if duplicates > 0 {
            metrics
                .events_ingested
                .with_label_values(&["duplicate"])
                .inc_by(u64::try_from(duplicates).unwrap_or(0));
        }
        Ok(BatchOutcome {
            message_ids,
            duplicate,
            accepted,
            duplicates,
        })
    }
}

type Reply = tokio::sync::oneshot::Sender<Result<Accepted, ApiError>>;

/// Group commit for single events: concurrent calls are gathered for up to
/// [`GATHER`] (or [`GATHER_MAX`] events) and accepted together with one dedupe
/// statement and one publish, so a burst of single calls costs a few round
/// trips instead of one database connection held per call across the
/// broker's acknowledgement. Each caller is answered when its batch is
/// durable.
#[derive(Clone)]
pub struct GroupCommit {
    sender: tokio::sync::mpsc::Sender<(WorkspaceId, IngestedEvent, Reply)>,
}

const GATHER: std::time::Duration = std::time::Duration::from_millis(2);
const GATHER_MAX: usize = 500;
/// Batches in flight at once (each waits on the broker).
const IN_FLIGHT: usize = 8;

impl GroupCommit {
    pub fn spawn(intake: Intake) -> (Self, tokio::task::JoinHandle<()>) {
        let (sender, mut receiver) =
            tokio::sync::mpsc::channel::<(WorkspaceId, IngestedEvent, Reply)>(10_000);
        let task = tokio::spawn(async move {
            let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
            while let Some(first) = receiver.recv().await {
                let mut gathered = vec![first];
                let deadline = tokio::time::Instant::now() + GATHER;
                while gathered.len() < GATHER_MAX {
                    match tokio::time::timeout_at(deadline, receiver.recv()).await {
                        Ok(Some(item)) => gathered.push(item),
                        Ok(None) | Err(_) => break,
                    }
                }
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let intake = intake.clone();
                tokio::spawn(async move {
                    let mut by_workspace: std::collections::HashMap<
                        WorkspaceId,
                        Vec<(IngestedEvent, Reply)>,
                    > = std::collections::HashMap::new();
                    for (workspace, event, reply) in gathered {
                        by_workspace
                            .entry(workspace)
                            .or_default()
                            .push((event, reply));
                    }
                    for (workspace, items) in by_workspace {
                        let (events, replies): (Vec<_>, Vec<_>) = items.into_iter().unzip();
                        match intake.accept_batch(workspace, events).await {
                            Ok(outcome) => {
                                for ((reply, message_id), duplicate) in replies
                                    .into_iter()
                                    .zip(outcome.message_ids)
                                    .zip(outcome.duplicate)
                                {
                                    let _ = reply.send(Ok(Accepted {
                                        message_id,
                                        duplicate,
                                    }));
                                }
                            }
                            Err(error) => {
                                for reply in replies {
                                    let _ = reply.send(Err(ApiError::new(
                                        error.code,
                                        error.message.clone(),
                                    )));
                                }
                            }
                        }
                    }
                    drop(permit);
                });
            }
        });
        (GroupCommit { sender }, task)
    }

    /// Accepts one event; returns once it is durable (or refused).
    pub async fn accept(
        &self,
        workspace: WorkspaceId,
        event: IngestedEvent,
    ) -> Result<Accepted, ApiError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.sender
            .send((workspace, event, reply))
            .await
            .map_err(|_| ApiError::unavailable("ingestion is shutting down; retry"))?;
        answer
            .await
            .map_err(|_| ApiError::unavailable("ingestion is shutting down; retry"))?
    }
}
