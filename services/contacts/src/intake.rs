//! Contacts from what people do: an identify call or a form submission that
//! carries an email creates the contact, or fills in what it lacked.

use std::sync::Arc;

use async_trait::async_trait;
use rapport_bus::{Delivery, Handler, HandlerError, envelope};
use rapport_core::WorkspaceId;
use rapport_core::json::struct_to_json;
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::ingested_event::Kind;

use crate::consent::{Channel, ConsentChange};
use crate::store::{ConfirmationRequest, ContactInput, Store};
use crate::validate::{normalise_email, normalise_phone};
use rapport_proto::common::v1::ConsentStatus;

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
        let workspace: WorkspaceId = envelope
            .workspace_id
            .parse()
            .map_err(|_| HandlerError::Permanent("workspace_id is not a UUID".into()))?;
        let consent = match event.kind() {
            Kind::Identify | Kind::FormSubmitted => None,
            Kind::OptInConfirmed => Some(ConsentChange::new(
                ConsentStatus::Subscribed,
                "double_opt_in_confirmed",
            )),
            Kind::Unsubscribed => Some(ConsentChange::new(
                ConsentStatus::Unsubscribed,
                "unsubscribed",
            )),
            _ => return Ok(()),
        };
        if let Some(change) = consent {
            let Ok(contact_id) = event.contact_id.parse() else {
                return Ok(());
            };
            return match self
                .store
                .set_consent(workspace, contact_id, Channel::Email, change)
                .await
            {
                Ok(_) => Ok(()),
                // Erased or never here: nothing to record.
                Err(error) if error.code == rapport_core::ErrorCode::NotFound => Ok(()),
                Err(error) => Err(retry_or_fail(error)),
            };
        }
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
        let email_consent = match traits.get("email_consent") {
            Some(serde_json::Value::Bool(true)) => Some(ConsentStatus::Subscribed),
            Some(serde_json::Value::String(text)) if text == "pending" => {
                Some(ConsentStatus::Pending)
            }
            _ => None,
        }
        .map(|status| ConsentChange::new(status, default_source));
        let template = text(&properties, &["confirmation_template"]);
        let confirmation =
            (event.kind() == Kind::FormSubmitted && !template.is_empty()).then(|| {
                ConfirmationRequest {
                    template,
                    form_id: text(&properties, &["form_id"]),
                    request_id: event.message_id.clone(),
                }
            });
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
            email_consent,
            sms_consent: None,
            confirmation,
            stage_cause: String::new(),
        };
        match self.store.upsert(workspace, None, input).await {
            Ok(_) => Ok(()),
            Err(error) => Err(retry_or_fail(error)),
        }
    }
}

/// ALREADY_EXISTS means another writer created the same email a moment ago;
/// the retry finds it and updates it instead.
fn retry_or_fail(error: rapport_core::ApiError) -> HandlerError {
    if error.code.is_retryable()
        || matches!(
            error.code,
            rapport_core::ErrorCode::Internal | rapport_core::ErrorCode::AlreadyExists
        )
    {
        HandlerError::Retryable(error.message)
    } else {
        HandlerError::Permanent(error.message)
    }
}

/// Standard contact fields, which traits fill directly; other traits become
/// custom attributes.
const STANDARD_TRAITS: [&str; 10] = [
    "email_consent",
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
