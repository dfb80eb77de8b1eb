//! Contacts from what people do:
//! - an identify call or a form submission that carries an email creates
//!   the contact, or fills in what it lacked, and links the user id (as the
//!   external id `app:<user id>`) and the anonymous id; an anonymous contact
//!   holding that anonymous id is merged into it;
//! - unsubscribes and double opt-in confirmations set consent;
//! - every event and message about a known contact goes on its timeline.

use std::sync::Arc;

use async_trait::async_trait;
use rapport_bus::{Delivery, Handler, HandlerError, envelope};
use rapport_core::WorkspaceId;
use rapport_core::json::struct_to_json;
use rapport_proto::events::v1::envelope::Payload;
use rapport_proto::events::v1::ingested_event::Kind;

use rapport_proto::common::v1::ConsentStatus;
use rapport_proto::events::v1::message_event::{
    Channel as MessageChannel, Status as MessageStatus,
};
use rapport_proto::events::v1::{IngestedEvent, MessageEvent};
use uuid::Uuid;

use crate::consent::{Channel, ConsentChange};
use crate::store::{Store, TouchRecord};
use crate::timeline::Entry;
use crate::validate::{normalise_email, normalise_external_id, normalise_phone};
use crate::write::{ConfirmationRequest, ContactInput};

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
        let workspace = envelope::workspace(&envelope)?;
        let event = match envelope.payload {
            Some(Payload::IngestedEvent(event)) => event,
            Some(Payload::MessageEvent(message)) => {
                return self.message(workspace, &message).await;
            }
            _ => return Ok(()),
        };
        let consent = match event.kind() {
            Kind::OptInConfirmed => Some(ConsentChange::new(
                ConsentStatus::Subscribed,
                "double_opt_in_confirmed",
            )),
            Kind::Unsubscribed => Some(ConsentChange::new(
                ConsentStatus::Unsubscribed,
                "unsubscribed",
            )),
            Kind::Unspecified => return Ok(()),
            _ => None,
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
                Err(error) => Err(HandlerError::from(error)),
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
        let occurred_at = event
            .timestamp
            .as_ref()
            .and_then(rapport_core::time::from_timestamp);
        let email = normalise_email(&text(&traits, &["email"])).ok();
        let user_id = event.user_id.trim();
        let external = normalise_external_id(&format!("app:{user_id}")).ok();
        let anonymous = Some(event.anonymous_id.trim().to_owned())
            .filter(|id| !id.is_empty() && id.chars().count() <= 200);
        let identifies = matches!(event.kind(), Kind::Identify | Kind::FormSubmitted);
        let contact_id = if identifies && email.is_some() {
            Some(
                self.identify(
                    workspace,
                    &event,
                    &traits,
                    &properties,
                    &context,
                    email,
                    external,
                    anonymous,
                )
                .await?,
            )
        } else {
            self.known_contact(
                workspace,
                &event,
                email.as_deref(),
                external.as_deref(),
                anonymous.as_deref(),
            )
            .await
            .map_err(HandlerError::from)?
        };
        let Some(contact_id) = contact_id else {
            // Anonymous activity of nobody known yet.
            return Ok(());
        };
        let (summary, details) = describe(&event, &properties);
        let mut entry = Entry::event(contact_id, summary, details);
        if let Some(at) = occurred_at {
            entry = entry.at(at);
        }
        self.store
            .add_entries(workspace, &[entry])
            .await
            .map_err(HandlerError::from)
    }
}

impl IngestedEventHandler {
    /// An identify or form submission that names an email: creates the
    /// contact or fills in what it lacked, linking its tracking ids.
    #[allow(clippy::too_many_arguments)]
    async fn identify(
        &self,
        workspace: WorkspaceId,
        event: &IngestedEvent,
        traits: &serde_json::Value,
        properties: &serde_json::Value,
        context: &serde_json::Value,
        email: Option<String>,
        external: Option<String>,
        anonymous: Option<String>,
    ) -> Result<Uuid, HandlerError> {
        let touch = touch_of(properties, context, event);
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
        let template = text(properties, &["confirmation_template"]);
        let confirmation =
            (event.kind() == Kind::FormSubmitted && !template.is_empty()).then(|| {
                ConfirmationRequest {
                    template,
                    form_id: text(properties, &["form_id"]),
                    request_id: event.message_id.clone(),
                }
            });
        let source = touch
            .as_ref()
            .map(|t| t.source.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| default_source.to_owned());
        let input = ContactInput {
            email: email.unwrap_or_default(),
            phone: normalise_phone(&text(traits, &["phone"])).unwrap_or_default(),
            first_name: text(traits, &["first_name", "firstName"]),
            last_name: text(traits, &["last_name", "lastName"]),
            company: text(traits, &["company"]),
            job_title: text(traits, &["title", "job_title"]),
            attributes: custom_traits(traits),
            external_ids: external.into_iter().collect(),
            anonymous_ids: anonymous.into_iter().collect(),
            touch,
            source,
            email_consent,
            confirmation,
            ..Default::default()
        };
        let fallback = input.clone();
        match self.store.upsert(workspace, None, input).await {
            Ok(outcome) => Ok(outcome.profile.row.contact_id),
            // The user id or anonymous id is someone else's: keep the
            // person's data without linking those ids.
            Err(error) if error.code == rapport_core::ErrorCode::FailedPrecondition => {
                tracing::info!(%error.message, "identify names ids of two known contacts; linking only the email");
                let mut input = fallback;
                input.external_ids.clear();
                input.anonymous_ids.clear();
                self.store
                    .upsert(workspace, None, input)
                    .await
                    .map(|outcome| outcome.profile.row.contact_id)
                    .map_err(HandlerError::from)
            }
            Err(error) => Err(HandlerError::from(error)),
        }
    }

    /// The contact an event is about, if it is someone known.
    async fn known_contact(
        &self,
        workspace: WorkspaceId,
        event: &IngestedEvent,
        email: Option<&str>,
        external: Option<&str>,
        anonymous: Option<&str>,
    ) -> Result<Option<Uuid>, rapport_core::ApiError> {
        if let Ok(id) = event.contact_id.parse::<Uuid>() {
            return match self.store.get(workspace, id).await {
                Ok(row) => Ok(Some(row.contact_id)),
                Err(error) if error.code == rapport_core::ErrorCode::NotFound => Ok(None),
                Err(error) => Err(error),
            };
        }
        for (kind, value) in [
            ("external", external),
            ("email", email),
            ("anonymous", anonymous),
        ] {
            if let Some(value) = value
                && let Some(id) = self.store.find_by_identity(workspace, kind, value).await?
            {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    /// A message sent to, opened or clicked by a contact: on their timeline.
    async fn message(
        &self,
        workspace: WorkspaceId,
        message: &MessageEvent,
    ) -> Result<(), HandlerError> {
        let Ok(contact_id) = message.contact_id.parse::<Uuid>() else {
            return Ok(());
        };
        let contact_id = match self.store.get(workspace, contact_id).await {
            Ok(row) => row.contact_id,
            Err(error) if error.code == rapport_core::ErrorCode::NotFound => return Ok(()),
            Err(error) => return Err(HandlerError::from(error)),
        };
        // A bounce or a complaint means: do not contact on that channel.
        let do_not_contact = match message.status() {
            MessageStatus::Bounced => Some("bounced"),
            MessageStatus::Complained => Some("complained"),
            _ => None,
        };
        if let Some(reason) = do_not_contact {
            let channel = match message.channel() {
                MessageChannel::Sms => Channel::Sms,
                _ => Channel::Email,
            };
            match self
                .store
                .set_consent(
                    workspace,
                    contact_id,
                    channel,
                    ConsentChange::new(ConsentStatus::Unsubscribed, reason),
                )
                .await
            {
                Ok(_) => {}
                Err(error) if error.code == rapport_core::ErrorCode::NotFound => return Ok(()),
                Err(error) => return Err(HandlerError::from(error)),
            }
        }
        let status = message
            .status()
            .as_str_name()
            .trim_start_matches("STATUS_")
            .to_lowercase();
        let summary = match message.url.as_str() {
            "" => format!("Email {status}"),
            url => format!("Email {status}: {url}"),
        };
        let entry = Entry::message(
            contact_id,
            summary,
            serde_json::json!({
                "message_id": message.message_id,
                "status": status,
                "template_id": message.template_id,
                "journey_id": message.journey_id,
                "url": message.url,
                "reason": message.reason,
            }),
        );
        self.store
            .add_entries(workspace, &[entry])
            .await
            .map_err(HandlerError::from)
    }
}

/// The UTM parameters and page of an event, when it carries any.
fn touch_of(
    properties: &serde_json::Value,
    context: &serde_json::Value,
    event: &IngestedEvent,
) -> Option<TouchRecord> {
    let pick = |property: &str, campaign: &str| {
        [
            properties.get(property),
            context.pointer(&format!("/campaign/{campaign}")),
        ]
        .into_iter()
        .flatten()
        .find_map(|v| v.as_str())
        .map(|v| v.trim().chars().take(500).collect::<String>())
        .unwrap_or_default()
    };
    let page = |name: &str| {
        context
            .pointer(&format!("/page/{name}"))
            .and_then(|v| v.as_str())
            .map(|v| v.chars().take(2_000).collect::<String>())
            .unwrap_or_default()
    };
    let touch = TouchRecord {
        source: pick("utm_source", "source"),
        medium: pick("utm_medium", "medium"),
        campaign: pick("utm_campaign", "name"),
        term: pick("utm_term", "term"),
        content: pick("utm_content", "content"),
        referrer: page("referrer"),
        landing_url: page("url"),
        at: event
            .timestamp
            .as_ref()
            .and_then(rapport_core::time::from_timestamp)
            .unwrap_or_else(chrono::Utc::now),
    };
    (!touch.source.is_empty() || !touch.campaign.is_empty() || !touch.medium.is_empty())
        .then_some(touch)
}

/// A line and the details of an event, for the timeline.
fn describe(event: &IngestedEvent, properties: &serde_json::Value) -> (String, serde_json::Value) {
    let kind = event
        .kind()
        .as_str_name()
        .trim_start_matches("KIND_")
        .to_lowercase();
    let summary = match (event.kind(), event.name.as_str()) {
        (_, "") => kind.replace('_', " "),
        (Kind::Page | Kind::Screen, name) => format!("Viewed {name}"),
        (_, name) => name.to_owned(),
    };
    let mut details = serde_json::json!({
        "kind": kind,
        "name": event.name,
        "message_id": event.message_id,
        "properties": properties,
    });
    if !event.intent_signals.is_empty() {
        details["intent_signals"] = serde_json::json!(event.intent_signals);
    }
    (summary, details)
}

/// Standard contact fields, which traits fill directly; other traits become
/// custom attributes.
const STANDARD_TRAITS: [&str; 12] = [
    "email_consent",
    "title",
    "job_title",
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

fn custom_traits(traits: &serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    traits
        .as_object()
        .map(|object| {
            object
                .iter()
                .filter(|(key, value)| !STANDARD_TRAITS.contains(&key.as_str()) && !value.is_null())
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default()
}
