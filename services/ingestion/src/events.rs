//! gRPC requests turned into [`IngestedEvent`]s, with their checks.

use rapport_core::FieldViolation;
use rapport_proto::events::v1::IngestedEvent;
use rapport_proto::events::v1::ingested_event::Kind;
use rapport_proto::ingestion::v1::event::Event as OneEvent;
use rapport_proto::ingestion::v1::{
    AliasRequest, Event, GroupRequest, IdentifyRequest, PageRequest, TrackRequest,
};

/// Largest id accepted (message, user, anonymous, group ids).
const MAX_ID_LENGTH: usize = 255;

struct Check<'a> {
    prefix: &'a str,
    violations: Vec<FieldViolation>,
}

impl Check<'_> {
    fn violation(&mut self, field: &str, description: impl Into<String>) {
        self.violations.push(FieldViolation {
            field: format!("{}{field}", self.prefix),
            description: description.into(),
        });
    }

    fn ids(&mut self, message_id: &str, user_id: &str, anonymous_id: &str) {
        if user_id.trim().is_empty() && anonymous_id.trim().is_empty() {
            self.violation("user_id", "one of user_id and anonymous_id is required");
        }
        for (field, value) in [
            ("message_id", message_id),
            ("user_id", user_id),
            ("anonymous_id", anonymous_id),
        ] {
            if value.len() > MAX_ID_LENGTH {
                self.violation(field, format!("is longer than {MAX_ID_LENGTH} bytes"));
            }
        }
    }

    fn required(&mut self, field: &str, value: &str) {
        if value.trim().is_empty() {
            self.violation(field, "is required");
        } else if value.len() > MAX_ID_LENGTH {
            self.violation(field, format!("is longer than {MAX_ID_LENGTH} bytes"));
        }
    }

    fn finish(self, event: IngestedEvent) -> Result<IngestedEvent, Vec<FieldViolation>> {
        if self.violations.is_empty() {
            Ok(event)
        } else {
            Err(self.violations)
        }
    }
}

pub fn track(request: TrackRequest, prefix: &str) -> Result<IngestedEvent, Vec<FieldViolation>> {
    let mut check = Check {
        prefix,
        violations: Vec::new(),
    };
    check.ids(&request.message_id, &request.user_id, &request.anonymous_id);
    check.required("event", &request.event);
    check.finish(IngestedEvent {
        message_id: request.message_id.trim().to_owned(),
        kind: Kind::Track.into(),
        name: request.event.trim().to_owned(),
        user_id: request.user_id.trim().to_owned(),
        anonymous_id: request.anonymous_id.trim().to_owned(),
        properties: request.properties,
        context: request.context,
        timestamp: request.timestamp,
        ..Default::default()
    })
}

pub fn identify(
    request: IdentifyRequest,
    prefix: &str,
) -> Result<IngestedEvent, Vec<FieldViolation>> {
    let mut check = Check {
        prefix,
        violations: Vec::new(),
    };
    check.ids(&request.message_id, &request.user_id, &request.anonymous_id);
    check.finish(IngestedEvent {
        message_id: request.message_id.trim().to_owned(),
        kind: Kind::Identify.into(),
        user_id: request.user_id.trim().to_owned(),
        anonymous_id: request.anonymous_id.trim().to_owned(),
        traits: request.traits,
        context: request.context,
        timestamp: request.timestamp,
        ..Default::default()
    })
}

pub fn page(request: PageRequest, prefix: &str) -> Result<IngestedEvent, Vec<FieldViolation>> {
    let mut check = Check {
        prefix,
        violations: Vec::new(),
    };
    check.ids(&request.message_id, &request.user_id, &request.anonymous_id);
    let mut properties = request.properties.unwrap_or_default();
    if !request.category.trim().is_empty() {
        properties.fields.insert(
            "category".into(),
            rapport_core::json::json_to_value(&serde_json::Value::String(
                request.category.trim().to_owned(),
            )),
        );
    }
    check.finish(IngestedEvent {
        message_id: request.message_id.trim().to_owned(),
        kind: Kind::Page.into(),
        name: request.name.trim().to_owned(),
        user_id: request.user_id.trim().to_owned(),
        anonymous_id: request.anonymous_id.trim().to_owned(),
        properties: Some(properties),
        context: request.context,
        timestamp: request.timestamp,
        ..Default::default()
    })
}

pub fn group(request: GroupRequest, prefix: &str) -> Result<IngestedEvent, Vec<FieldViolation>> {
    let mut check = Check {
        prefix,
        violations: Vec::new(),
    };
    check.ids(&request.message_id, &request.user_id, &request.anonymous_id);
    check.required("group_id", &request.group_id);
    check.finish(IngestedEvent {
        message_id: request.message_id.trim().to_owned(),
        kind: Kind::Group.into(),
        user_id: request.user_id.trim().to_owned(),
        anonymous_id: request.anonymous_id.trim().to_owned(),
        group_id: request.group_id.trim().to_owned(),
        traits: request.traits,
        context: request.context,
        timestamp: request.timestamp,
        ..Default::default()
    })
}

pub fn alias(request: AliasRequest, prefix: &str) -> Result<IngestedEvent, Vec<FieldViolation>> {
    let mut check = Check {
        prefix,
        violations: Vec::new(),
    };
    check.required("user_id", &request.user_id);
    check.required("previous_id", &request.previous_id);
    if request.message_id.len() > MAX_ID_LENGTH {
        check.violation(
            "message_id",
            format!("is longer than {MAX_ID_LENGTH} bytes"),
        );
    }
    check.finish(IngestedEvent {
        message_id: request.message_id.trim().to_owned(),
        kind: Kind::Alias.into(),
        user_id: request.user_id.trim().to_owned(),
        previous_id: request.previous_id.trim().to_owned(),
        context: request.context,
        timestamp: request.timestamp,
        ..Default::default()
    })
}

/// One event of a batch, checked, with field names prefixed by `prefix`
/// (`events[3].`).
pub fn any(event: Event, prefix: &str) -> Result<IngestedEvent, Vec<FieldViolation>> {
    match event.event {
        Some(OneEvent::Track(request)) => track(request, &format!("{prefix}track.")),
        Some(OneEvent::Identify(request)) => identify(request, &format!("{prefix}identify.")),
        Some(OneEvent::Page(request)) => page(request, &format!("{prefix}page.")),
        Some(OneEvent::Group(request)) => group(request, &format!("{prefix}group.")),
        Some(OneEvent::Alias(request)) => alias(request, &format!("{prefix}alias.")),
        None => Err(vec![FieldViolation {
            field: format!("{prefix}event"),
            description: "is required (track, identify, page, group or alias)".into(),
        }]),
    }
}
