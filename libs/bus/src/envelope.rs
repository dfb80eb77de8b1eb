//! Building and reading [`Envelope`]s, the value of every Rapport record.

use chrono::Utc;
use prost::Message;
use rapport_proto::events::v1::Envelope;
use rapport_proto::events::v1::envelope::Payload;

use rapport_core::WorkspaceId;

use crate::{HandlerError, Record, headers};

pub const CONTENT_TYPE_PROTOBUF: &str = "application/x-protobuf; proto=rapport.events.v1.Envelope";

/// A new envelope with a fresh event id, stamped now.
pub fn new_envelope(workspace_id: &str, producer: &str, payload: Payload) -> Envelope {
    Envelope {
        event_id: uuid::Uuid::now_v7().to_string(),
        workspace_id: workspace_id.to_owned(),
        occurred_at: Some(rapport_core::time::to_timestamp(Utc::now())),
        producer: producer.to_owned(),
        payload: Some(payload),
    }
}

/// The record carrying `envelope` on `topic`, keyed by `key`, with the
/// envelope's identity copied into headers so consumers can route and dedupe
/// without decoding.
pub fn to_record(topic: &str, key: &str, envelope: &Envelope) -> Record {
    let occurred_at = envelope
        .occurred_at
        .as_ref()
        .and_then(rapport_core::time::from_timestamp)
        .unwrap_or_else(Utc::now);
    Record {
        topic: topic.to_owned(),
        key: key.to_owned(),
        payload: envelope.encode_to_vec(),
        headers: vec![
            (headers::EVENT_ID.to_owned(), envelope.event_id.clone()),
            (
                headers::WORKSPACE_ID.to_owned(),
                envelope.workspace_id.clone(),
            ),
            (headers::OCCURRED_AT.to_owned(), occurred_at.to_rfc3339()),
            (
                headers::CONTENT_TYPE.to_owned(),
                CONTENT_TYPE_PROTOBUF.to_owned(),
            ),
        ],
    }
}

/// Decodes a record's envelope. A record that is not one can never be
/// handled, so this is a permanent error (the record is dead-lettered).
pub fn decode(record: &Record) -> Result<Envelope, HandlerError> {
    let envelope = Envelope::decode(record.payload.as_slice()).map_err(|error| {
        HandlerError::Permanent(format!("not a rapport.events.v1.Envelope: {error}"))
    })?;
    if envelope.event_id.is_empty() || envelope.workspace_id.is_empty() {
        return Err(HandlerError::Permanent(
            "envelope lacks event_id or workspace_id".to_owned(),
        ));
    }
    if envelope.payload.is_none() {
        return Err(HandlerError::Permanent(
            "envelope has no payload".to_owned(),
        ));
    }
    Ok(envelope)
}

/// The workspace an envelope belongs to; a record without a valid one can
/// never be handled.
pub fn workspace(envelope: &Envelope) -> Result<WorkspaceId, HandlerError> {
    parse_workspace(&envelope.workspace_id)
}

/// [`workspace`] from the id as text.
pub fn parse_workspace(workspace_id: &str) -> Result<WorkspaceId, HandlerError> {
    workspace_id
        .parse()
        .map_err(|_| HandlerError::Permanent("workspace_id is not a UUID".into()))
}
