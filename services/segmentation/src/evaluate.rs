//! Evaluates a segment's condition against one contact profile (the JSON of a
//! `ContactSnapshot`, with `attributes` as an object and times as RFC 3339).

use chrono::{DateTime, Utc};
use rapport_proto::segmentation::v1::condition::Condition as Kind;
use rapport_proto::segmentation::v1::field_condition::Operator;
use rapport_proto::segmentation::v1::{Condition, FieldCondition};

pub fn matches(condition: &Condition, profile: &serde_json::Value, now: DateTime<Utc>) -> bool {
    match &condition.condition {
        None => false,
        Some(Kind::All(all)) => all.conditions.iter().all(|c| matches(c, profile, now)),
        Some(Kind::Any(any)) => any.conditions.iter().any(|c| matches(c, profile, now)),
        Some(Kind::Field(field)) => field_matches(field, profile, now),
        // Refused at creation until the event read model exists.
        Some(Kind::Event(_)) => false,
    }
}

fn lookup<'a>(profile: &'a serde_json::Value, field: &str) -> Option<&'a serde_json::Value> {
    if let Some(attribute) = field.strip_prefix("attributes.") {
        return profile.get("attributes")?.get(attribute);
    }
    if let Some(key) = field.strip_prefix("custom_fields.") {
        return profile.get("custom_fields")?.get(key);
    }
    profile.get(field)
}

fn as_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn field_matches(
    condition: &FieldCondition,
    profile: &serde_json::Value,
    now: DateTime<Utc>,
) -> bool {
    let value = lookup(profile, condition.field.trim());
    let operator = Operator::try_from(condition.operator).unwrap_or(Operator::Unspecified);
    let expected = condition.value.trim();
    match operator {
        Operator::Unspecified => false,
        Operator::Exists => {
            value.is_some_and(|v| !v.is_null() && as_text(v) != "" && v != &serde_json::json!([]))
        }
        Operator::Equals => value.is_some_and(|v| equals(v, expected)),
        Operator::NotEquals => !value.is_some_and(|v| equals(v, expected)),
        Operator::Contains => value.is_some_and(|v| match v {
            serde_json::Value::Array(items) => items.iter().any(|item| equals(item, expected)),
            other => as_text(other)
                .to_lowercase()
                .contains(&expected.to_lowercase()),
        }),
        Operator::GreaterThan | Operator::LessThan => {
            let Some(value) = value else { return false };
            let ordering = match (as_text(value).parse::<f64>(), expected.parse::<f64>()) {
                (Ok(left), Ok(right)) => left.partial_cmp(&right),
                _ => match (parse_time(&as_text(value)), parse_time(expected)) {
                    (Some(left), Some(right)) => Some(left.cmp(&right)),
                    _ => Some(as_text(value).as_str().cmp(expected)),
                },
            };
            match ordering {
                Some(std::cmp::Ordering::Greater) => operator == Operator::GreaterThan,
                Some(std::cmp::Ordering::Less) => operator == Operator::LessThan,
                _ => false,
            }
        }
        Operator::WithinLast => value
            .and_then(|v| parse_time(&as_text(v)))
            .is_some_and(|time| {
                time <= now && (now - time).num_seconds() <= condition.within_seconds
            }),
    }
}

fn equals(value: &serde_json::Value, expected: &str) -> bool {
    match value {
        serde_json::Value::Array(items) => items.iter().any(|item| equals(item, expected)),
        serde_json::Value::Number(number) => expected.parse::<f64>().ok() == number.as_f64(),
        serde_json::Value::Bool(flag) => expected.eq_ignore_ascii_case(&flag.to_string()),
        other => as_text(other).eq_ignore_ascii_case(expected),
    }
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rapport_proto::segmentation::v1::AllOf;

    fn field(field: &str, operator: Operator, value: &str, within_seconds: i64) -> Condition {
        Condition {
            condition: Some(Kind::Field(FieldCondition {
                field: field.into(),
                operator: operator.into(),
                value: value.into(),
                within_seconds,
            })),
        }
    }

    #[test]
    fn new_leads_are_leads_created_in_the_last_week() {
        let now = Utc::now();
        let new_leads = Condition {
            condition: Some(Kind::All(AllOf {
                conditions: vec![
                    field("lifecycle_stage", Operator::Equals, "lead", 0),
                    field("create_time", Operator::WithinLast, "", 7 * 24 * 3600),
                ],
            })),
        };
        let fresh = serde_json::json!({"lifecycle_stage": "lead", "create_time": (now - chrono::Duration::hours(1)).to_rfc3339()});
        let old = serde_json::json!({"lifecycle_stage": "lead", "create_time": (now - chrono::Duration::days(8)).to_rfc3339()});
        let customer =
            serde_json::json!({"lifecycle_stage": "customer", "create_time": now.to_rfc3339()});
        assert!(matches(&new_leads, &fresh, now));
        assert!(!matches(&new_leads, &old, now));
        assert!(!matches(&new_leads, &customer, now));
    }

    #[test]
    fn attributes_tags_and_numbers() {
        let now = Utc::now();
        let profile = serde_json::json!({
            "tags": ["vip", "beta"],
            "attributes": {"plan": "pro", "seats": 12},
            "custom_fields": {"tier": "gold", "licences": 40.0},
        });
        assert!(matches(
            &field("custom_fields.tier", Operator::Equals, "gold", 0),
            &profile,
            now
        ));
        assert!(matches(
            &field("custom_fields.licences", Operator::GreaterThan, "25", 0),
            &profile,
            now
        ));
        assert!(!matches(
            &field("custom_fields.tier", Operator::Equals, "pro", 0),
            &profile,
            now
        ));
        assert!(matches(
            &field("tags", Operator::Contains, "vip", 0),
            &profile,
            now
        ));
        assert!(matches(
            &field("attributes.plan", Operator::Equals, "PRO", 0),
            &profile,
            now
        ));
        assert!(matches(
            &field("attributes.seats", Operator::GreaterThan, "10", 0),
            &profile,
            now
        ));
        assert!(!matches(
            &field("attributes.seats", Operator::LessThan, "10", 0),
            &profile,
            now
        ));
        assert!(matches(
            &field("attributes.missing", Operator::NotEquals, "x", 0),
            &profile,
            now
        ));
        assert!(!matches(
            &field("attributes.missing", Operator::Exists, "", 0),
            &profile,
            now
        ));
    }
}
