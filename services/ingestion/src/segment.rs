//! The Segment-compatible tracking API: `POST /v1/track`, `/v1/identify`,
//! `/v1/page`, `/v1/screen`, `/v1/group`, `/v1/alias` and `/v1/batch`, as
//! Segment's and RudderStack's client libraries send them (tested with
//! segment-analytics-python and rudder-sdk-python).
//!
//! - Authentication: the workspace's write key as the HTTP Basic user name
//!   (what the libraries send), or `writeKey` in the body.
//! - Bodies are JSON, optionally gzip-compressed (`Content-Encoding: gzip`);
//!   32 KB per event and 500 KB per batch, measured uncompressed.
//! - `timestamp` is corrected for the client's clock skew using `sentAt`:
//!   the event is placed at `timestamp + (received_at - sentAt)`.
//! - A batch is validated whole before anything is accepted: one bad event
//!   rejects the request with the event's index, and nothing is half-taken.
//! - Success (`{"success": true}`) is sent only once the bus has every event;
//!   when it cannot take them the answer is 503 with `Retry-After`.

use std::io::Read;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use chrono::{DateTime, Utc};
use rapport_core::json::json_to_struct;
use rapport_core::time::to_timestamp;
use rapport_core::{ErrorCode, WorkspaceId};
use rapport_proto::events::v1::IngestedEvent;
use rapport_proto::events::v1::ingested_event::Kind;
use rapport_tenancy::{KeyKind, KeyResolver};
use serde_json::Value;

use crate::http::HttpState;

/// Largest event, uncompressed.
pub const MAX_EVENT_BYTES: usize = 32 * 1024;
/// Largest request body, uncompressed.
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
/// Largest request body as received (compressed or not).
pub const MAX_WIRE_BYTES: usize = 1024 * 1024;

/// A client mistake (or our unavailability), as the API reports it.
#[derive(Debug)]
pub struct Rejection {
    status: StatusCode,
    message: String,
}

impl Rejection {
    fn bad(message: impl Into<String>) -> Self {
        Rejection {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "success": false, "error": self.message });
        let mut response = (self.status, axum::Json(body)).into_response();
        response.headers_mut().insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}

/// The write key from `Authorization: Basic base64(key:)`.
fn basic_user(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let user = text.split_once(':').map(|(user, _)| user).unwrap_or(&text);
    Some(user.trim().to_owned()).filter(|user| !user.is_empty())
}

/// The request body, gunzipped when it says so, within the size limits.
fn body_json(headers: &HeaderMap, body: &Bytes) -> Result<Value, Rejection> {
    let too_large = || Rejection {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("request body is larger than {} KB", MAX_BATCH_BYTES / 1024),
    };
    if body.len() > MAX_WIRE_BYTES {
        return Err(too_large());
    }
    let gzipped = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim().eq_ignore_ascii_case("gzip"));
    let plain: Vec<u8> = if gzipped {
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(body.as_ref())
            .take(u64::try_from(MAX_BATCH_BYTES).unwrap_or(u64::MAX) + 1)
            .read_to_end(&mut decoded)
            .map_err(|_| Rejection::bad("body is not valid gzip"))?;
        decoded
    } else {
        body.to_vec()
    };
    if plain.len() > MAX_BATCH_BYTES {
        return Err(too_large());
    }
    serde_json::from_slice(&plain)
        .map_err(|error| Rejection::bad(format!("body is not valid JSON: {error}")))
}

fn text(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(text)) => text.trim().to_owned(),
        Some(Value::Number(number)) => number.to_string(),
        _ => String::new(),
    }
}

fn parse_time(field: &str, value: Option<&Value>) -> Result<Option<DateTime<Utc>>, Rejection> {
    let Some(value) = value.filter(|value| !value.is_null()) else {
        return Ok(None);
    };
    let Some(text) = value.as_str() else {
        return Err(Rejection::bad(format!(
            "`{field}` must be an ISO 8601 timestamp"
        )));
    };
    if let Ok(time) = DateTime::parse_from_rfc3339(text.trim()) {
        return Ok(Some(time.with_timezone(&Utc)));
    }
    chrono::NaiveDateTime::parse_from_str(text.trim(), "%Y-%m-%dT%H:%M:%S%.f")
        .map(|naive| Some(naive.and_utc()))
        .map_err(|_| Rejection::bad(format!("`{field}` is not an ISO 8601 timestamp: {text}")))
}

fn object(field: &str, value: Option<&Value>) -> Result<Option<prost_types::Struct>, Rejection> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(value @ Value::Object(_)) => Ok(Some(json_to_struct(value))),
        Some(_) => Err(Rejection::bad(format!("`{field}` must be an object"))),
    }
}

/// One event of the spec, checked and turned into an [`IngestedEvent`].
fn parse_event(
    value: &Value,
    path: &str,
    kind_from_route: Option<Kind>,
    batch_sent_at: Option<DateTime<Utc>>,
    received_at: DateTime<Utc>,
) -> Result<IngestedEvent, Rejection> {
    let Value::Object(fields) = value else {
        return Err(Rejection::bad(format!("{path} must be a JSON object")));
    };
    if serde_json::to_vec(value)
        .map(|bytes| bytes.len())
        .unwrap_or(0)
        > MAX_EVENT_BYTES
    {
        return Err(Rejection {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("{path} is larger than {} KB", MAX_EVENT_BYTES / 1024),
        });
    }
    let field = |name: &str| fields.get(name);
    let kind = match kind_from_route {
        Some(kind) => kind,
        None => match text(field("type")).as_str() {
            "track" => Kind::Track,
            "identify" => Kind::Identify,
            "page" => Kind::Page,
            "screen" => Kind::Screen,
            "group" => Kind::Group,
            "alias" => Kind::Alias,
            "" => return Err(Rejection::bad(format!("{path}.type is required"))),
            other => {
                return Err(Rejection::bad(format!(
                    "{path}.type `{other}` is not a known event type"
                )));
            }
        },
    };
    let user_id = text(field("userId"));
    let anonymous_id = text(field("anonymousId"));
    if user_id.is_empty() && anonymous_id.is_empty() {
        return Err(Rejection::bad(format!(
            "{path} needs a userId or an anonymousId"
        )));
    }
    let message_id = text(field("messageId"));
    for (name, value) in [
        ("messageId", &message_id),
        ("userId", &user_id),
        ("anonymousId", &anonymous_id),
    ] {
        if value.len() > 255 {
            return Err(Rejection::bad(format!(
                "{path}.{name} is longer than 255 bytes"
            )));
        }
    }
    let name = match kind {
        Kind::Track => {
            let event = text(field("event"));
            if event.is_empty() {
                return Err(Rejection::bad(format!(
                    "{path}.event is required for track"
                )));
            }
            event
        }
        Kind::Page | Kind::Screen => text(field("name")),
        _ => String::new(),
    };
    let group_id = text(field("groupId"));
    if kind == Kind::Group && group_id.is_empty() {
        return Err(Rejection::bad(format!(
            "{path}.groupId is required for group"
        )));
    }
    let previous_id = text(field("previousId"));
    if kind == Kind::Alias && previous_id.is_empty() {
        return Err(Rejection::bad(format!(
            "{path}.previousId is required for alias"
        )));
    }
    let timestamp = parse_time(&format!("{path}.timestamp"), field("timestamp"))?.or(parse_time(
        &format!("{path}.originalTimestamp"),
        field("originalTimestamp"),
    )?);
    let sent_at = parse_time(&format!("{path}.sentAt"), field("sentAt"))?.or(batch_sent_at);
    let corrected = match (timestamp, sent_at) {
        (Some(timestamp), Some(sent_at)) => timestamp + (received_at - sent_at),
        (Some(timestamp), None) => timestamp,
        (None, _) => received_at,
    };
    let mut properties = object(&format!("{path}.properties"), field("properties"))?;
    if matches!(kind, Kind::Page | Kind::Screen) {
        if let Some(category) = field("category").and_then(Value::as_str) {
            properties
                .get_or_insert_with(Default::default)
                .fields
                .insert(
                    "category".into(),
                    rapport_core::json::json_to_value(&Value::String(category.into())),
                );
        }
    }
    Ok(IngestedEvent {
        message_id,
        kind: kind.into(),
        name,
        user_id,
        anonymous_id,
        properties,
        // RudderStack's libraries send identify traits in context.traits.
        traits: object(&format!("{path}.traits"), field("traits"))?.or(object(
            &format!("{path}.context.traits"),
            field("context").and_then(|context| context.get("traits")),
        )?),
        context: object(&format!("{path}.context"), field("context"))?,
        timestamp: Some(to_timestamp(corrected)),
        received_at: Some(to_timestamp(received_at)),
        previous_id,
        group_id,
        ..Default::default()
    })
}

async fn authenticate(
    resolver: &KeyResolver,
    headers: &HeaderMap,
    body: &Value,
) -> Result<WorkspaceId, Rejection> {
    let key =
        basic_user(headers).or_else(|| Some(text(body.get("writeKey"))).filter(|k| !k.is_empty()));
    let Some(key) = key else {
        return Err(Rejection {
            status: StatusCode::UNAUTHORIZED,
            message: "missing write key: send it as the HTTP Basic user name".into(),
        });
    };
    match resolver.resolve(&key, KeyKind::Write).await {
        Ok(Some(workspace)) => Ok(workspace.id),
        Ok(None) => Err(Rejection {
            status: StatusCode::UNAUTHORIZED,
            message: "write key is not valid".into(),
        }),
        Err(error) => {
            tracing::warn!(%error, "write key lookup failed");
            Err(Rejection {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "cannot verify the write key now; retry".into(),
            })
        }
    }
}

async fn accept_all(
    state: &HttpState,
    workspace: WorkspaceId,
    events: Vec<IngestedEvent>,
) -> Result<Response, Rejection> {
    if let Err(error) = state.intake.accept_batch(workspace, events).await {
        let status = if error.code == ErrorCode::Unavailable || error.code.is_retryable() {
            StatusCode::SERVICE_UNAVAILABLE
        } else if error.code == ErrorCode::InvalidArgument {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        return Err(Rejection {
            status,
            message: error.message,
        });
    }
    let mut response = axum::Json(serde_json::json!({ "success": true })).into_response();
    response.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    Ok(response)
}

async fn single(
    state: Arc<HttpState>,
    headers: HeaderMap,
    body: Bytes,
    kind: Kind,
) -> Result<Response, Rejection> {
    let received_at = Utc::now();
    let value = body_json(&headers, &body)?;
    let workspace = authenticate(&state.keys, &headers, &value).await?;
    let event = parse_event(&value, "body", Some(kind), None, received_at)?;
    accept_all(&state, workspace, vec![event]).await
}

pub async fn track(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Rejection> {
    single(state, headers, body, Kind::Track).await
}

pub async fn identify(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Rejection> {
    single(state, headers, body, Kind::Identify).await
}

pub async fn page(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Rejection> {
    single(state, headers, body, Kind::Page).await
}

pub async fn screen(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Rejection> {
    single(state, headers, body, Kind::Screen).await
}

pub async fn group(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Rejection> {
    single(state, headers, body, Kind::Group).await
}

pub async fn alias(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Rejection> {
    single(state, headers, body, Kind::Alias).await
}

pub async fn batch(
    State(state): State<Arc<HttpState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Rejection> {
    let received_at = Utc::now();
    let value = body_json(&headers, &body)?;
    let workspace = authenticate(&state.keys, &headers, &value).await?;
    let Some(Value::Array(items)) = value.get("batch") else {
        return Err(Rejection::bad("`batch` must be an array of events"));
    };
    let batch_sent_at = parse_time("sentAt", value.get("sentAt"))?;
    let shared_context = value.get("context").filter(|c| c.is_object());
    let mut events = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let mut event = parse_event(
            item,
            &format!("batch[{index}]"),
            None,
            batch_sent_at,
            received_at,
        )?;
        if event.context.is_none() {
            event.context = shared_context.map(json_to_struct);
        }
        events.push(event);
    }
    accept_all(&state, workspace, events).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_skew_is_corrected_from_sent_at() {
        let received = Utc::now();
        let event = serde_json::json!({
            "type": "track", "event": "Signed Up", "userId": "u1",
            "timestamp": "2026-01-01T10:00:00Z", "sentAt": "2026-01-01T10:05:00Z"
        });
        let parsed = parse_event(&event, "body", None, None, received).expect("valid");
        let corrected = rapport_core::time::from_timestamp(&parsed.timestamp.expect("timestamp"))
            .expect("time");
        assert_eq!(corrected, received - chrono::Duration::minutes(5));
    }

    #[test]
    fn bad_events_name_their_problem() {
        let now = Utc::now();
        let cases = [
            (
                serde_json::json!({"type": "track", "event": "x"}),
                "needs a userId or an anonymousId",
            ),
            (
                serde_json::json!({"type": "track", "userId": "u"}),
                "event is required",
            ),
            (
                serde_json::json!({"type": "nope", "userId": "u"}),
                "not a known event type",
            ),
            (
                serde_json::json!({"type": "alias", "userId": "u"}),
                "previousId is required",
            ),
            (
                serde_json::json!({"type": "identify", "userId": "u", "timestamp": "yesterday"}),
                "not an ISO 8601",
            ),
            (
                serde_json::json!({"type": "identify", "userId": "u", "traits": [1]}),
                "must be an object",
            ),
        ];
        for (event, expected) in cases {
            let error = parse_event(&event, "body", None, None, now).expect_err("invalid");
            assert!(
                error.message.contains(expected),
                "{} vs {expected}",
                error.message
            );
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
        }
    }
}
