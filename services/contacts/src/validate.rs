//! Checks on what clients send, producing field violations.

use rapport_core::FieldViolation;
use rapport_core::json::struct_to_json;
use rapport_proto::common::v1::{Consent, ConsentStatus};
use rapport_proto::contacts::v1::Contact;

use crate::consent::ConsentChange;
use crate::store::TouchRecord;
use crate::write::ContactInput;

/// Largest attributes object accepted, in bytes of JSON.
pub const MAX_ATTRIBUTES_BYTES: usize = 64 * 1024;
const MAX_TEXT: usize = 500;

/// Trims and lower-cases an email, or says why it is not one.
pub fn normalise_email(raw: &str) -> Result<String, &'static str> {
    let email = raw.trim().to_lowercase();
    if email.is_empty() {
        return Err("is required");
    }
    if email.len() > 254 {
        return Err("is longer than 254 characters");
    }
    let Some((local, domain)) = email.split_once('@') else {
        return Err("is not an email address (no @)");
    };
    let valid_domain = domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && domain
            .chars()
            .all(|c| c.is_alphanumeric() || c == '.' || c == '-');
    if local.is_empty()
        || local.len() > 64
        || local.contains(char::is_whitespace)
        || domain.contains('@')
        || !valid_domain
    {
        return Err("is not an email address");
    }
    Ok(email)
}

/// Validates a phone number with its country code (libphonenumber's
/// metadata) and returns it in E.164 form; empty stays empty.
pub fn normalise_phone(raw: &str) -> Result<String, &'static str> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(String::new());
    }
    if !raw.starts_with('+') {
        return Err("must start with + and the country code");
    }
    if raw.len() > 40 {
        return Err("is not a phone number");
    }
    let number = phonenumber::parse(None, raw).map_err(|_| "is not a phone number")?;
    if !phonenumber::is_valid(&number) {
        return Err("is not a valid phone number for its country");
    }
    Ok(number.format().mode(phonenumber::Mode::E164).to_string())
}

pub fn check_text(field: &str, value: &str, violations: &mut Vec<FieldViolation>) {
    check_text_within(field, value, MAX_TEXT, violations);
}

/// Text of at most `max` characters, without control characters other than
/// tab and line breaks.
pub fn check_text_within(
    field: &str,
    value: &str,
    max: usize,
    violations: &mut Vec<FieldViolation>,
) {
    if value
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        violations.push(FieldViolation {
            field: field.to_owned(),
            description: "holds a control character".into(),
        });
    } else if value.chars().count() > max {
        violations.push(FieldViolation {
            field: field.to_owned(),
            description: format!("is longer than {max} characters"),
        });
    }
}

/// The contact's plain text field called `name`, for writes that name
/// fields (CRM sync, CSV columns); None for any other name.
pub fn text_field<'a>(contact: &'a mut Contact, name: &str) -> Option<&'a mut String> {
    Some(match name {
        "email" => &mut contact.email,
        "phone" => &mut contact.phone,
        "first_name" => &mut contact.first_name,
        "last_name" => &mut contact.last_name,
        "company" => &mut contact.company,
        "job_title" => &mut contact.job_title,
        "time_zone" => &mut contact.time_zone,
        "locale" => &mut contact.locale,
        "country" => &mut contact.country,
        "owner_id" => &mut contact.owner_id,
        "lifecycle_stage" => &mut contact.lifecycle_stage,
        _ => return None,
    })
}

/// Checks an external id, `system:id`: a lower-case system name, a colon,
/// and an id of up to 200 characters.
pub fn normalise_external_id(raw: &str) -> Result<String, &'static str> {
    let raw = raw.trim();
    let Some((system, id)) = raw.split_once(':') else {
        return Err("must be `system:id`, such as salesforce:0035e00001");
    };
    let system = system.trim().to_lowercase();
    let id = id.trim();
    let valid_system = !system.is_empty()
        && system.len() <= 40
        && system
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if !valid_system {
        return Err("has a system name that is not 1 to 40 lower-case letters, digits, - or _");
    }
    if id.is_empty() || id.chars().count() > 200 || id.contains(char::is_whitespace) {
        return Err("has an id that is not 1 to 200 characters without spaces");
    }
    Ok(format!("{system}:{id}"))
}

/// Checks the contact a client sent, adding violations under `path`
/// ("contact", "contacts[3]", or "" for CSV columns), and returns it as a
/// write.
pub fn check_contact(
    contact: &Contact,
    path: &str,
    violations: &mut Vec<FieldViolation>,
) -> ContactInput {
    let at = |name: &str| {
        if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        }
    };
    let before = violations.len();
    let mut violation = |field: String, description: &str| {
        violations.push(FieldViolation {
            field,
            description: description.to_owned(),
        });
    };
    let contact_id = match contact.contact_id.trim() {
        "" => None,
        id => match uuid::Uuid::parse_str(id) {
            Ok(id) => Some(id),
            Err(_) => {
                violation(at("contact_id"), "is not a contact id");
                None
            }
        },
    };
    let email = if contact.email.trim().is_empty() {
        String::new()
    } else {
        normalise_email(&contact.email).unwrap_or_else(|reason| {
            violation(at("email"), reason);
            String::new()
        })
    };
    let phone = normalise_phone(&contact.phone).unwrap_or_else(|reason| {
        violation(at("phone"), reason);
        String::new()
    });
    let time_zone = contact.time_zone.trim();
    if !time_zone.is_empty() && time_zone.parse::<chrono_tz::Tz>().is_err() {
        violation(
            at("time_zone"),
            "is not an IANA time zone such as Europe/Paris",
        );
    }
    let locale = contact.locale.trim();
    let valid_locale = locale.is_empty()
        || (locale.len() <= 35 && {
            let mut parts = locale.split(['-', '_']);
            let language = parts.next().unwrap_or("");
            (2..=3).contains(&language.len())
                && language.chars().all(|c| c.is_ascii_alphabetic())
                && parts.all(|p| {
                    (1..=8).contains(&p.len()) && p.chars().all(|c| c.is_ascii_alphanumeric())
                })
        });
    if !valid_locale {
        violation(at("locale"), "is not a language tag such as fr-FR");
    }
    let country = contact.country.trim().to_uppercase();
    if !country.is_empty() && country.parse::<phonenumber::country::Id>().is_err() {
        violation(
            at("country"),
            "is not an ISO 3166-1 alpha-2 country code such as FR",
        );
    }
    let company_id = match contact.company_id.trim() {
        "" => None,
        id => match uuid::Uuid::parse_str(id) {
            Ok(id) => Some(id),
            Err(_) => {
                violation(at("company_id"), "is not a company id");
                None
            }
        },
    };
    let mut external_ids = Vec::new();
    for (index, id) in contact.external_ids.iter().enumerate() {
        match normalise_external_id(id) {
            Ok(id) => external_ids.push(id),
            Err(reason) => violation(at(&format!("external_ids[{index}]")), reason),
        }
    }
    let mut anonymous_ids = Vec::new();
    for (index, id) in contact.anonymous_ids.iter().enumerate() {
        let id = id.trim();
        if id.is_empty() || id.chars().count() > 200 {
            violation(
                at(&format!("anonymous_ids[{index}]")),
                "must be 1 to 200 characters",
            );
        } else {
            anonymous_ids.push(id.to_owned());
        }
    }
    if contact.external_ids.len() > 20 || contact.anonymous_ids.len() > 50 {
        violation(
            at("external_ids"),
            "a contact is sent with at most 20 external and 50 anonymous ids",
        );
    }
    for (field, value) in [
        ("first_name", &contact.first_name),
        ("last_name", &contact.last_name),
        ("company", &contact.company),
        ("job_title", &contact.job_title),
        ("owner_id", &contact.owner_id),
        ("lifecycle_stage", &contact.lifecycle_stage),
        ("source", &contact.source),
    ] {
        check_text(&at(field), value, violations);
    }
    if contact.tags.len() > 100 {
        violations.push(FieldViolation {
            field: at("tags"),
            description: "holds more than 100 tags".into(),
        });
    }
    for (index, tag) in contact.tags.iter().enumerate() {
        check_text(&at(&format!("tags[{index}]")), tag, violations);
    }
    let attributes = contact
        .attributes
        .as_ref()
        .map(struct_to_json)
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    if serde_json::to_string(&attributes).map_or(0, |s| s.len()) > MAX_ATTRIBUTES_BYTES {
        violations.push(FieldViolation {
            field: at("attributes"),
            description: format!("is larger than {MAX_ATTRIBUTES_BYTES} bytes"),
        });
    }
    let custom_fields = contact
        .custom_fields
        .as_ref()
        .map(struct_to_json)
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    if serde_json::to_string(&custom_fields).map_or(0, |s| s.len()) > MAX_ATTRIBUTES_BYTES {
        violations.push(FieldViolation {
            field: at("custom_fields"),
            description: format!("is larger than {MAX_ATTRIBUTES_BYTES} bytes"),
        });
    }
    let touch = contact
        .last_touch
        .as_ref()
        .or(contact.first_touch.as_ref())
        .map(|t| TouchRecord::from_proto(t, chrono::Utc::now()));
    if let Some(touch) = &touch {
        for (field, value) in [
            ("source", &touch.source),
            ("medium", &touch.medium),
            ("campaign", &touch.campaign),
            ("term", &touch.term),
            ("content", &touch.content),
        ] {
            check_text(&at(&format!("last_touch.{field}")), value, violations);
        }
        for (field, value) in [
            ("referrer", &touch.referrer),
            ("landing_url", &touch.landing_url),
        ] {
            if value.len() > 2_000 {
                violations.push(FieldViolation {
                    field: at(&format!("last_touch.{field}")),
                    description: "is longer than 2000 characters".into(),
                });
            }
        }
    }
    let identified = contact_id.is_some()
        || !email.is_empty()
        || !phone.is_empty()
        || !external_ids.is_empty()
        || !anonymous_ids.is_empty();
    if !identified && violations.len() == before {
        violations.push(FieldViolation {
            field: at("email"),
            description:
                "is required when the contact has no contact_id, phone, external id or anonymous id"
                    .into(),
        });
    }
    let mut tags: Vec<String> = contact
        .tags
        .iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    tags.sort();
    tags.dedup();
    ContactInput {
        contact_id,
        email,
        phone,
        first_name: contact.first_name.trim().to_owned(),
        last_name: contact.last_name.trim().to_owned(),
        company: contact.company.trim().to_owned(),
        job_title: contact.job_title.trim().to_owned(),
        time_zone: time_zone.to_owned(),
        locale: locale.replace('_', "-"),
        country,
        owner_id: contact.owner_id.trim().to_owned(),
        lifecycle_stage: contact.lifecycle_stage.trim().to_lowercase(),
        company_id,
        tags,
        attributes,
        custom_fields,
        external_ids,
        anonymous_ids,
        touch,
        source: contact.source.trim().to_owned(),
        email_consent: consent_from_proto(contact.email_consent.as_ref()),
        sms_consent: consent_from_proto(contact.sms_consent.as_ref()),
        confirmation: None,
        stage_cause: String::new(),
        path: path.to_owned(),
        field_times: Vec::new(),
    }
}

/// A consent an API caller set: a status other than unspecified.
fn consent_from_proto(consent: Option<&Consent>) -> Option<ConsentChange> {
    let consent = consent?;
    let status = consent.status();
    if status == ConsentStatus::Unspecified {
        return None;
    }
    let reason = match consent.reason.trim() {
        "" => "api",
        reason => reason,
    };
    Some(ConsentChange::new(status, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_or_refused() {
        assert_eq!(
            normalise_email("  Ada@Example.COM ").as_deref(),
            Ok("ada@example.com")
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a b@example.com",
            "ada@ex..com",
        ] {
            assert!(normalise_email(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn phones_are_validated_per_country_and_stored_as_e164() {
        assert_eq!(
            normalise_phone("+44 20 7946 0958").as_deref(),
            Ok("+442079460958")
        );
        assert_eq!(normalise_phone("").as_deref(), Ok(""));
        assert_eq!(
            normalise_phone("+1 (415) 555-2671").as_deref(),
            Ok("+14155552671")
        );
        assert!(normalise_phone("020 7946 0958").is_err());
        assert!(normalise_phone("+12").is_err());
        // Right length, but no such number range in the UK.
        assert!(normalise_phone("+44 00 0000 0000").is_err());
    }
}
