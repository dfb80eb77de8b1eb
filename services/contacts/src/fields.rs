//! Custom fields: typed definitions per workspace, and the check every
//! value passes on its way in. Values are stored normalised in
//! `contacts.custom_fields` (dates as `YYYY-MM-DD`, datetimes as RFC 3339 in
//! UTC, multi-enums as sorted lists), under one GIN index.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use rapport_core::{ApiError, FieldViolation, WorkspaceId};
use rapport_db::map_db_error;
use rapport_proto::contacts::v1::{CustomField, CustomFieldType};
use serde_json::Value;

use crate::store::Store;

const MAX_STRING: usize = 2_000;
const MAX_OPTIONS: usize = 200;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Definition {
    pub key: String,
    pub label: String,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub options: Vec<String>,
}

impl Definition {
    pub fn to_proto(&self) -> CustomField {
        CustomField {
            key: self.key.clone(),
            label: self.label.clone(),
            r#type: type_of(&self.kind).into(),
            options: self.options.clone(),
        }
    }
}

fn type_of(kind: &str) -> CustomFieldType {
    match kind {
        "string" => CustomFieldType::String,
        "number" => CustomFieldType::Number,
        "boolean" => CustomFieldType::Boolean,
        "date" => CustomFieldType::Date,
        "datetime" => CustomFieldType::Datetime,
        "enum" => CustomFieldType::Enum,
        "multi_enum" => CustomFieldType::MultiEnum,
        _ => CustomFieldType::Unspecified,
    }
}

fn type_text(kind: CustomFieldType) -> Option<&'static str> {
    Some(match kind {
        CustomFieldType::Unspecified => return None,
        CustomFieldType::String => "string",
        CustomFieldType::Number => "number",
        CustomFieldType::Boolean => "boolean",
        CustomFieldType::Date => "date",
        CustomFieldType::Datetime => "datetime",
        CustomFieldType::Enum => "enum",
        CustomFieldType::MultiEnum => "multi_enum",
    })
}

pub async fn definitions<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    workspace: WorkspaceId,
) -> Result<HashMap<String, Definition>, ApiError> {
    let rows = sqlx::query_as::<_, Definition>(
        "SELECT key, label, type, options FROM custom_fields WHERE workspace_id = $1",
    )
    .bind(workspace.0)
    .fetch_all(executor)
    .await
    .map_err(map_db_error)?;
    Ok(rows.into_iter().map(|d| (d.key.clone(), d)).collect())
}

/// Checks `values` against `definitions`, adding a violation per bad value
/// (`{path}.{key}`), and returns them normalised. Nulls stay: they clear.
pub fn check_values(
    definitions: &HashMap<String, Definition>,
    values: &serde_json::Map<String, Value>,
    path: &str,
    violations: &mut Vec<FieldViolation>,
) -> serde_json::Map<String, Value> {
    let mut checked = serde_json::Map::new();
    for (key, value) in values {
        let field = format!("{path}.{key}");
        let Some(definition) = definitions.get(key) else {
            violations.push(FieldViolation {
                field,
                description: "is not a custom field of this workspace (DefineCustomField)".into(),
            });
            continue;
        };
        if value.is_null() {
            checked.insert(key.clone(), Value::Null);
            continue;
        }
        match normalise(definition, value) {
            Ok(value) => {
                checked.insert(key.clone(), value);
            }
            Err(description) => violations.push(FieldViolation { field, description }),
        }
    }
    checked
}

fn normalise(definition: &Definition, value: &Value) -> Result<Value, String> {
    let in_options = |text: &str| {
        if definition.options.iter().any(|o| o == text) {
            Ok(())
        } else {
            Err(format!(
                "`{text}` is not one of {}",
                definition.options.join(", ")
            ))
        }
    };
    match definition.kind.as_str() {
        "string" => match value {
            Value::String(text) if text.chars().count() <= MAX_STRING => {
                Ok(Value::String(text.trim().to_owned()))
            }
            Value::String(_) => Err(format!("is longer than {MAX_STRING} characters")),
            _ => Err("must be a string".into()),
        },
        "number" => match value {
            Value::Number(number) if number.as_f64().is_some_and(f64::is_finite) => {
                Ok(value.clone())
            }
            Value::String(text) => text
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite())
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| "must be a number".to_owned()),
            _ => Err("must be a number".into()),
        },
        "boolean" => match value {
            Value::Bool(_) => Ok(value.clone()),
            Value::String(text) => match text.trim().to_lowercase().as_str() {
                "true" | "yes" | "1" => Ok(Value::Bool(true)),
                "false" | "no" | "0" => Ok(Value::Bool(false)),
                _ => Err("must be true or false".into()),
            },
            _ => Err("must be true or false".into()),
        },
        "date" => value
            .as_str()
            .and_then(|text| NaiveDate::parse_from_str(text.trim(), "%Y-%m-%d").ok())
            .map(|date| Value::String(date.format("%Y-%m-%d").to_string()))
            .ok_or_else(|| "must be a date, YYYY-MM-DD".into()),
        "datetime" => value
            .as_str()
            .and_then(|text| DateTime::parse_from_rfc3339(text.trim()).ok())
            .map(|time| {
                Value::String(
                    time.with_timezone(&Utc)
                        .to_rfc3339_opts(SecondsFormat::AutoSi, true),
                )
            })
            .ok_or_else(|| "must be an RFC 3339 date and time".into()),
        "enum" => match value {
            Value::String(text) => {
                in_options(text.trim())?;
                Ok(Value::String(text.trim().to_owned()))
            }
            _ => Err("must be one of the field's options".into()),
        },
        "multi_enum" => {
            let items: Vec<String> = match value {
                Value::Array(items) => items
                    .iter()
                    .map(|item| {
                        item.as_str()
                            .map(|s| s.trim().to_owned())
                            .ok_or_else(|| "must be a list of options".to_owned())
                    })
                    .collect::<Result<_, _>>()?,
                // A CSV cell or a form: options separated by `;`.
                Value::String(text) => text
                    .split(';')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect(),
                _ => return Err("must be a list of options".into()),
            };
            let mut items = items;
            for item in &items {
                in_options(item)?;
            }
            items.sort();
            items.dedup();
            Ok(Value::Array(items.into_iter().map(Value::String).collect()))
        }
        other => Err(format!("has an unknown type {other}")),
    }
}

/// A filter on custom fields, as a JSON containment value: a multi-enum
/// value given as one option matches the lists that contain it.
pub fn filter_value(
    definitions: &HashMap<String, Definition>,
    filter: &Value,
) -> Result<Value, ApiError> {
    let mut violations = Vec::new();
    let mut wanted = serde_json::Map::new();
    if let Some(object) = filter.as_object() {
        for (key, value) in object {
            let value = match (definitions.get(key), value) {
                (Some(d), Value::String(_)) if d.kind == "multi_enum" => {
                    Value::Array(vec![value.clone()])
                }
                _ => value.clone(),
            };
            wanted.insert(key.clone(), value);
        }
    }
    let checked = check_values(
        definitions,
        &wanted,
        "filter.custom_fields",
        &mut violations,
    );
    if violations.is_empty() {
        Ok(Value::Object(checked))
    } else {
        Err(ApiError::invalid_fields(violations))
    }
}

fn check_definition(field: Option<&CustomField>) -> Result<(CustomField, &'static str), ApiError> {
    let Some(field) = field else {
        return Err(ApiError::invalid_field("field", "is required"));
    };
    let mut violations = Vec::new();
    let key = field.key.trim();
    let valid_key = !key.is_empty()
        && key.len() <= 64
        && key.starts_with(|c: char| c.is_ascii_lowercase())
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid_key {
        violations.push(FieldViolation {
            field: "field.key".into(),
            description:
                "must be 1 to 64 lower-case letters, digits or underscores, starting with a letter"
                    .into(),
        });
    }
    if field.label.chars().count() > 200 {
        violations.push(FieldViolation {
            field: "field.label".into(),
            description: "is longer than 200 characters".into(),
        });
    }
    let kind = type_text(field.r#type());
    if kind.is_none() {
        violations.push(FieldViolation {
            field: "field.type".into(),
            description: "is required".into(),
        });
    }
    let options: Vec<String> = field.options.iter().map(|o| o.trim().to_owned()).collect();
    let listed = matches!(kind, Some("enum" | "multi_enum"));
    if listed && (options.is_empty() || options.len() > MAX_OPTIONS) {
        violations.push(FieldViolation {
            field: "field.options".into(),
            description: format!("an enum needs 1 to {MAX_OPTIONS} options"),
        });
    }
    if !listed && !options.is_empty() {
        violations.push(FieldViolation {
            field: "field.options".into(),
            description: "only enum and multi-enum fields have options".into(),
        });
    }
    for (index, option) in options.iter().enumerate() {
        if option.is_empty() || option.chars().count() > 200 || option.contains(';') {
            violations.push(FieldViolation {
                field: format!("field.options[{index}]"),
                description: "must be 1 to 200 characters without `;`".into(),
            });
        } else if options[..index].contains(option) {
            violations.push(FieldViolation {
                field: format!("field.options[{index}]"),
                description: "is listed twice".into(),
            });
        }
    }
    if !violations.is_empty() {
        return Err(ApiError::invalid_fields(violations));
    }
    Ok((
        CustomField {
            key: key.to_owned(),
            label: field.label.trim().to_owned(),
            r#type: field.r#type,
            options,
        },
        kind.expect("checked"),
    ))
}

impl Store {
    /// Defines a field, or updates its label and adds options.
    pub async fn define_field(
        &self,
        workspace: WorkspaceId,
        field: Option<&CustomField>,
    ) -> Result<CustomField, ApiError> {
        let (field, kind) = check_definition(field)?;
        let mut transaction = self.pool().begin().await.map_err(map_db_error)?;
        let existing = sqlx::query_as::<_, Definition>(
            "SELECT key, label, type, options FROM custom_fields WHERE workspace_id = $1 AND key = $2 FOR UPDATE",
        )
        .bind(workspace.0)
        .bind(&field.key)
        .fetch_optional(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        if let Some(existing) = &existing {
            if existing.kind != kind {
                return Err(ApiError::invalid_field(
                    "field.type",
                    format!(
                        "cannot change: `{}` is a {} field",
                        existing.key, existing.kind
                    ),
                ));
            }
            if let Some(dropped) = existing.options.iter().find(|o| !field.options.contains(o)) {
                return Err(ApiError::invalid_field(
                    "field.options",
                    format!("cannot drop the option `{dropped}`; options are only added"),
                ));
            }
        }
        let saved = sqlx::query_as::<_, Definition>(
            "INSERT INTO custom_fields (workspace_id, key, label, type, options) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (workspace_id, key) DO UPDATE SET label = EXCLUDED.label, options = EXCLUDED.options, updated_at = now()
             RETURNING key, label, type, options",
        )
        .bind(workspace.0)
        .bind(&field.key)
        .bind(&field.label)
        .bind(kind)
        .bind(&field.options)
        .fetch_one(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        transaction.commit().await.map_err(map_db_error)?;
        Ok(saved.to_proto())
    }

    pub async fn fields(&self, workspace: WorkspaceId) -> Result<Vec<CustomField>, ApiError> {
        let mut fields: Vec<Definition> = definitions(self.pool(), workspace)
            .await?
            .into_values()
            .collect();
        fields.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(fields.iter().map(Definition::to_proto).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(kind: &str, options: &[&str]) -> HashMap<String, Definition> {
        HashMap::from([(
            "f".to_owned(),
            Definition {
                key: "f".into(),
                label: String::new(),
                kind: kind.into(),
                options: options.iter().map(|o| (*o).to_owned()).collect(),
            },
        )])
    }

    fn check(kind: &str, options: &[&str], value: Value) -> Result<Value, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        let values = serde_json::Map::from_iter([("f".to_owned(), value)]);
        let checked = check_values(
            &definition(kind, options),
            &values,
            "contact.custom_fields",
            &mut violations,
        );
        if violations.is_empty() {
            Ok(checked["f"].clone())
        } else {
            Err(violations)
        }
    }

    #[test]
    fn values_are_checked_and_normalised_by_type() {
        use serde_json::json;
        assert_eq!(check("number", &[], json!("12.5")), Ok(json!(12.5)));
        assert!(check("number", &[], json!("twelve")).is_err());
        assert_eq!(check("boolean", &[], json!("yes")), Ok(json!(true)));
        assert_eq!(
            check("date", &[], json!("2026-12-04")),
            Ok(json!("2026-12-04"))
        );
        assert!(check("date", &[], json!("04/12/2026")).is_err());
        assert_eq!(
            check("datetime", &[], json!("2026-12-04T10:00:00+01:00")),
            Ok(json!("2026-12-04T09:00:00Z"))
        );
        assert_eq!(
            check("enum", &["pro", "free"], json!("pro")),
            Ok(json!("pro"))
        );
        assert!(check("enum", &["pro", "free"], json!("gold")).is_err());
        assert_eq!(
            check("multi_enum", &["a", "b", "c"], json!("c; a")),
            Ok(json!(["a", "c"]))
        );
        assert_eq!(check("string", &[], Value::Null), Ok(Value::Null));
        let mut violations = Vec::new();
        let values = serde_json::Map::from_iter([("nope".to_owned(), json!(1))]);
        check_values(
            &definition("string", &[]),
            &values,
            "contact.custom_fields",
            &mut violations,
        );
        assert_eq!(violations[0].field, "contact.custom_fields.nope");
    }
}
