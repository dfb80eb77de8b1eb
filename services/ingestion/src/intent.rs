//! Intent rules: per-workspace rules that mark events with a signal
//! ("pricing_page_view", "demo_request", "return_visit") before they are
//! published, so segmentation and automation can act on intent.
//!
//! Return-visit rules keep one row per visitor in `visits`: the event's user
//! id (the sender's own id for the person), else its anonymous id, and the
//! time of its last page view; nothing else. No row is keyed by contact id,
//! and a contact erasure (`CHANGE_TYPE_ERASED`) carries no snapshot, so
//! nothing links an erased contact to its rows: ingestion does not consume
//! contact changes, and erasures and merges remove nothing here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use prost::Message;
use rapport_core::json::struct_to_json;
use rapport_core::time::from_timestamp;
use rapport_core::{ApiError, WorkspaceId};
use rapport_proto::events::v1::IngestedEvent;
use rapport_proto::events::v1::ingested_event::Kind;
use rapport_proto::ingestion::v1::IntentRule;
use rapport_proto::ingestion::v1::intent_rule::Rule;
use sqlx::{PgPool, Postgres, Transaction};

/// How long a workspace's rules are cached; a new rule applies after this.
const CACHE_FOR: Duration = Duration::from_secs(10);
/// A page view this soon after the last one is the same visit.
const SAME_VISIT: chrono::Duration = chrono::Duration::hours(1);

type Rules = Arc<Vec<IntentRule>>;

pub struct IntentRules {
    pool: PgPool,
    cache: Mutex<HashMap<WorkspaceId, (Instant, Rules)>>,
}

/// Checks a rule a client sent.
pub fn check(rule: &IntentRule) -> Result<(), ApiError> {
    let signal = rule.signal.trim();
    if signal.is_empty()
        || signal.len() > 64
        || !signal
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(ApiError::invalid_field(
            "rule.signal",
            "must be 1 to 64 lower-case letters, digits or underscores",
        ));
    }
    match &rule.rule {
        None => Err(ApiError::invalid_field(
            "rule.rule",
            "is required (page, event or return_visit)",
        )),
        Some(Rule::Page(page)) if page.path_contains.trim().is_empty() => Err(
            ApiError::invalid_field("rule.page.path_contains", "is required"),
        ),
        Some(Rule::Event(event)) if event.event.trim().is_empty() => {
            Err(ApiError::invalid_field("rule.event.event", "is required"))
        }
        Some(Rule::ReturnVisit(visit)) if !(1..=365).contains(&visit.within_days) => Err(
            ApiError::invalid_field("rule.return_visit.within_days", "must be 1 to 365"),
        ),
        Some(_) => Ok(()),
    }
}

/// The path a page event is about.
fn page_path(event: &IngestedEvent) -> String {
    let properties = event
        .properties
        .as_ref()
        .map(struct_to_json)
        .unwrap_or_default();
    let context = event
        .context
        .as_ref()
        .map(struct_to_json)
        .unwrap_or_default();
    let url_path = properties
        .get("url")
        .and_then(|url| url.as_str())
        .map(|url| {
            let rest = url.split_once("://").map(|(_, rest)| rest).unwrap_or(url);
            rest.find('/')
                .map(|at| rest[at..].to_owned())
                .unwrap_or_default()
        });
    properties
        .get("path")
        .and_then(|path| path.as_str())
        .map(str::to_owned)
        .or(url_path)
        .or_else(|| {
            context
                .pointer("/page/path")
                .and_then(|path| path.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

fn is_page(event: &IngestedEvent) -> bool {
    matches!(event.kind(), Kind::Page | Kind::Screen)
}

fn visitor(event: &IngestedEvent) -> Option<String> {
    [&event.user_id, &event.anonymous_id]
        .into_iter()
        .find(|id| !id.is_empty())
        .cloned()
}

fn event_time(event: &IngestedEvent) -> DateTime<Utc> {
    event
        .timestamp
        .as_ref()
        .and_then(from_timestamp)
        .unwrap_or_else(Utc::now)
}

impl IntentRules {
    pub fn new(pool: PgPool) -> Self {
        IntentRules {
            pool,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn forget(&self, workspace: WorkspaceId) {
        self.lock().remove(&workspace);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WorkspaceId, (Instant, Rules)>> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn rules(&self, workspace: WorkspaceId) -> Result<Rules, sqlx::Error> {
        if let Some((at, rules)) = self.lock().get(&workspace) {
            if at.elapsed() < CACHE_FOR {
                return Ok(rules.clone());
            }
        }
        let rows: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT definition FROM intent_rules WHERE workspace_id = $1 ORDER BY id LIMIT 1000",
        )
        .bind(workspace.0)
        .fetch_all(&self.pool)
        .await?;
        let rules: Rules = Arc::new(
            rows.iter()
                .filter_map(|bytes| IntentRule::decode(bytes.as_slice()).ok())
                .collect(),
        );
        self.lock()
            .insert(workspace, (Instant::now(), rules.clone()));
        Ok(rules)
    }

    /// Adds the signals of `workspace`'s rules to `events`, recording page
    /// visits for return-visit rules in `transaction`.
    pub async fn mark(
        &self,
        transaction: &mut Transaction<'_, Postgres>,
        workspace: WorkspaceId,
        events: &mut [IngestedEvent],
    ) -> Result<(), sqlx::Error> {
        let rules = self.rules(workspace).await?;
        if rules.is_empty() {
            return Ok(());
        }
        for event in events.iter_mut() {
            for rule in rules.iter() {
                let matched = match &rule.rule {
                    Some(Rule::Page(page)) => {
                        let needle = page.path_contains.trim().to_lowercase();
                        is_page(event)
                            && (page_path(event).to_lowercase().contains(&needle)
                                || event.name.to_lowercase().contains(&needle))
                    }
                    Some(Rule::Event(rule)) => {
                        event.kind() == Kind::Track
                            && event.name.eq_ignore_ascii_case(rule.event.trim())
                    }
                    _ => false,
                };
                if matched && !event.intent_signals.contains(&rule.signal) {
                    event.intent_signals.push(rule.signal.clone());
                }
            }
        }
        let return_rules: Vec<&IntentRule> = rules
            .iter()
            .filter(|rule| matches!(rule.rule, Some(Rule::ReturnVisit(_))))
            .collect();
        let page_events: Vec<usize> = (0..events.len())
            .filter(|&index| is_page(&events[index]) && visitor(&events[index]).is_some())
            .collect();
        if return_rules.is_empty() || page_events.is_empty() {
            return Ok(());
        }
        let visitors: Vec<String> = page_events
            .iter()
            .filter_map(|&index| visitor(&events[index]))
            .collect();
        let times: Vec<DateTime<Utc>> = page_events
            .iter()
            .map(|&index| event_time(&events[index]))
            .collect();
        // The previous visit of each visitor, then the visits of this batch.
        let previous: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT visitor_id, last_seen_at FROM visits WHERE workspace_id = $1 AND visitor_id = ANY($2) FOR UPDATE",
        )
        .bind(workspace.0)
        .bind(&visitors)
        .fetch_all(&mut **transaction)
        .await?;
        sqlx::query(
            "INSERT INTO visits (workspace_id, visitor_id, last_seen_at)
             SELECT $1, visitor, max(seen) FROM unnest($2::text[], $3::timestamptz[]) AS input(visitor, seen)
             GROUP BY visitor
             ON CONFLICT (workspace_id, visitor_id)
             DO UPDATE SET last_seen_at = GREATEST(visits.last_seen_at, EXCLUDED.last_seen_at)",
        )
        .bind(workspace.0)
        .bind(&visitors)
        .bind(&times)
        .execute(&mut **transaction)
        .await?;
        let previous: HashMap<String, DateTime<Utc>> = previous.into_iter().collect();
        for &index in &page_events {
            let Some(visitor) = visitor(&events[index]) else {
                continue;
            };
            let Some(last) = previous.get(&visitor) else {
                continue;
            };
            let gap = event_time(&events[index]) - *last;
            for rule in &return_rules {
                let Some(Rule::ReturnVisit(visit)) = &rule.rule else {
                    continue;
                };
                let within = chrono::Duration::days(i64::from(visit.within_days));
                if gap >= SAME_VISIT
                    && gap <= within
                    && !events[index].intent_signals.contains(&rule.signal)
                {
                    events[index].intent_signals.push(rule.signal.clone());
                }
            }
        }
        Ok(())
    }
}
