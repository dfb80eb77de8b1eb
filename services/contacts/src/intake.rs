//! Contacts from what people do: an identify call or a form submission that
//! carries an email creates the contact, or fills in what it lacked.

use std::sync::Arc;

use async_trait::async_trait;
use rapport_bus::{Delivery, Handler, HandlerError, envelope};
use rapport_core::WorkspaceId;
use rapport_core::json::struct_to_json;
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::ingested_event::Kind;

use crate::store::{ContactInput, Store};
use crate::validate::{normalise_email, normalise_phone};

pub struct IngestedEventHandler {
    pub store: Arc<Store>,
}

fn text(traits: &serde_json::Value, names: &[&str]) -> String {
    names
        .iter()
        .find_map(|name| traits.get(*name).and_then(|v| v.as_str()))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

#[async_trait]
impl Handler for IngestedEventHandler {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let envelope = envelope::decode(&delivery.record)?;
        let Some(Payload::IngestedEvent(event)) = envelope.payload else {
            return Ok(());
        };
        if !matches!(event.kind(), Kind::Identify | Kind::FormSubmitted) {
            return Ok(());
        }
        let workspace: WorkspaceId = envelope
            .workspace_id
            .parse()
            .map_err(|_| HandlerError::Permanent("workspace_id is not a UUID".into()))?;
        let traits = event
            .traits
            .as_ref()
            .map(struct_to_json)
            .unwrap_or_default();
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
        let Ok(email) = normalise_email(&text(&traits, &["email"])) else {
            // Anonymous activity: nothing to create yet.
            return Ok(());
        };
        let utm_source = [
            properties.get("utm_source"),
            context.pointer("/campaign/source"),
        ]
        .into_iter()
        .flatten()
        .find_map(|v| v.as_str())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
        let default_source = if event.kind() == Kind::FormSubmitted {
            "form"
        } else {
            "identify"
        };
        let input = ContactInput {
            email,
            phone: normalise_phone(&text(&traits, &["phone"])).unwrap_or_default(),
            first_name: text(&traits, &["first_name", "firstName"]),
            last_name: text(&traits, &["last_name", "lastName"]),
            company: text(&traits, &["company"]),
            lifecycle_stage: String::new(),
            tags: Vec::new(),
            attributes: custom_traits(&traits),
            source: utm_source.unwrap_or_else(|| default_source.to_owned()),
        };
        match self.store.upsert(workspace, None, input).await {
            Ok(_) => Ok(()),
            // ALREADY_EXISTS: another writer created the same email a moment
            // ago; the retry finds it and updates it instead.
            Err(error)
                if error.code.is_retryable()
                    || matches!(
                        error.code,
                        rapport_core::ErrorCode::Internal | rapport_core::ErrorCode::AlreadyExists
                    ) =>
            {
                Err(HandlerError::Retryable(error.message))
            }
            Err(error) => Err(HandlerError::Permanent(error.message)),
        }
    }
}

/// Standard contact fields, which traits fill directly; other traits become
/// custom attributes.
const STANDARD_TRAITS: [&str; 9] = [
    "email",
    "phone",
    "first_name",
    "firstName",
    "last_name",
    "lastName",
    "company",
    "name",
    "id",
];

fn custom_traits(traits: &serde_json::Value) -> serde_json::Value {
    let custom = traits
        .as_object()
        .map(|object| {
            object
                .iter()
                .filter(|(key, value)| !STANDARD_TRAITS.contains(&key.as_str()) && !value.is_null())
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default();
    serde_json::Value::Object(custom)
}
