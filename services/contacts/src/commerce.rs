//! Score, companies and orders: what a contact is worth and where they work.

use chrono::{DateTime, Utc};
use rapport_core::json::{json_to_struct, struct_to_json};
use rapport_core::time::{from_timestamp, to_timestamp};
use rapport_core::{ApiError, ErrorCode, FieldViolation, WorkspaceId};
use rapport_db::map_db_error;
use rapport_db::outbox;
use rapport_proto::common::v1::Money;
use rapport_proto::contacts::v1::{Company, LineItem, Order, ScoreChange};
use rapport_proto::events::v1::ContactChanged;
use rapport_proto::events::v1::contact_changed::ChangeType;
use serde::{Deserialize, Serialize};
use sqlx::FromRow;
use uuid::Uuid;

use crate::store::{COLUMNS, ContactRow, Profile, Spend, Store, event_record, identities_of};
use crate::timeline::{self, Entry};
use crate::write::{changed_fields, save_rows};

#[derive(Debug, Clone, FromRow)]
pub struct ScoreRow {
    pub change_id: Uuid,
    pub delta: i64,
    pub score: i64,
    pub reason: String,
    pub changed_at: DateTime<Utc>,
}

impl ScoreRow {
    pub fn to_proto(&self) -> ScoreChange {
        ScoreChange {
            delta: self.delta,
            score: self.score,
            reason: self.reason.clone(),
            change_time: Some(to_timestamp(self.changed_at)),
        }
    }
}

#[derive(Debug, Clone, FromRow)]
pub struct CompanyRow {
    pub company_id: Uuid,
    pub name: String,
    pub domain: String,
    pub industry: String,
    pub employee_count: i64,
    pub attributes: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl CompanyRow {
    pub fn to_proto(&self) -> Company {
        Company {
            company_id: self.company_id.to_string(),
            name: self.name.clone(),
            domain: self.domain.clone(),
            industry: self.industry.clone(),
            employee_count: self.employee_count,
            attributes: Some(json_to_struct(&self.attributes)),
            create_time: Some(to_timestamp(self.created_at)),
            update_time: Some(to_timestamp(self.updated_at)),
        }
    }
}

const COMPANY_COLUMNS: &str =
    "company_id, name, domain, industry, employee_count, attributes, created_at, updated_at";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredLine {
    product: String,
    sku: String,
    category: String,
    quantity: i64,
    unit_price_micros: i64,
}

#[derive(Debug, Clone, FromRow)]
pub struct OrderRow {
    pub order_id: String,
    pub contact_id: Uuid,
    pub currency: String,
    pub total_micros: i64,
    pub line_items: serde_json::Value,
    pub ordered_at: DateTime<Utc>,
}

impl OrderRow {
    pub fn to_proto(&self) -> Order {
        let lines: Vec<StoredLine> =
            serde_json::from_value(self.line_items.clone()).unwrap_or_default();
        Order {
            order_id: self.order_id.clone(),
            contact_id: self.contact_id.to_string(),
            line_items: lines
                .into_iter()
                .map(|l| LineItem {
                    product: l.product,
                    sku: l.sku,
                    category: l.category,
                    quantity: l.quantity,
                    unit_price_micros: l.unit_price_micros,
                })
                .collect(),
            total: Some(Money {
                currency_code: self.currency.clone(),
                amount_micros: self.total_micros,
            }),
            order_time: Some(to_timestamp(self.ordered_at)),
        }
    }
}

const ORDER_COLUMNS: &str = "order_id, contact_id, currency, total_micros, line_items, ordered_at";

/// A checked order.
pub struct NewOrder {
    order_id: String,
    contact_id: Uuid,
    currency: String,
    total_micros: i64,
    lines: Vec<StoredLine>,
    ordered_at: Option<DateTime<Utc>>,
}

fn text_violation(
    violations: &mut Vec<FieldViolation>,
    field: &str,
    value: &str,
    max: usize,
    required: bool,
) {
    if required && value.trim().is_empty() {
        violations.push(FieldViolation {
            field: field.into(),
            description: "is required".into(),
        });
    } else {
        crate::validate::check_text_within(field, value, max, violations);
    }
}

pub fn check_order(order: Option<&Order>) -> Result<NewOrder, ApiError> {
    let Some(order) = order else {
        return Err(ApiError::invalid_field("order", "is required"));
    };
    let mut violations = Vec::new();
    text_violation(
        &mut violations,
        "order.order_id",
        &order.order_id,
        200,
        true,
    );
    let contact_id = rapport_core::ids::parse_id("order.contact_id", &order.contact_id);
    let currency = order
        .total
        .as_ref()
        .map(|m| m.currency_code.trim().to_uppercase())
        .unwrap_or_default();
    if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()) {
        violations.push(FieldViolation {
            field: "order.total.currency_code".into(),
            description: "must be an ISO 4217 code such as EUR".into(),
        });
    }
    let total_micros = order.total.as_ref().map_or(0, |m| m.amount_micros);
    if total_micros < 0 {
        violations.push(FieldViolation {
            field: "order.total.amount_micros".into(),
            description: "must not be negative".into(),
        });
    }
    if order.line_items.len() > 500 {
        violations.push(FieldViolation {
            field: "order.line_items".into(),
            description: "holds more than 500 items".into(),
        });
    }
    let mut lines = Vec::new();
    for (index, line) in order.line_items.iter().enumerate() {
        let at = |name: &str| format!("order.line_items[{index}].{name}");
        text_violation(&mut violations, &at("product"), &line.product, 500, true);
        text_violation(&mut violations, &at("sku"), &line.sku, 200, false);
        text_violation(&mut violations, &at("category"), &line.category, 200, false);
        if line.quantity <= 0 {
            violations.push(FieldViolation {
                field: at("quantity"),
                description: "must be at least 1".into(),
            });
        }
        if line.unit_price_micros < 0 {
            violations.push(FieldViolation {
                field: at("unit_price_micros"),
                description: "must not be negative".into(),
            });
        }
        lines.push(StoredLine {
            product: line.product.trim().to_owned(),
            sku: line.sku.trim().to_owned(),
            category: line.category.trim().to_owned(),
            quantity: line.quantity,
            unit_price_micros: line.unit_price_micros,
        });
    }
    let contact_id = match contact_id {
        Ok(id) => Some(id),
        Err(error) => {
            violations.extend(error.field_violations);
            None
        }
    };
    if !violations.is_empty() {
        return Err(ApiError::invalid_fields(violations));
    }
    Ok(NewOrder {
        order_id: order.order_id.trim().to_owned(),
        contact_id: contact_id.expect("checked"),
        currency,
        total_micros,
        lines,
        ordered_at: order.order_time.as_ref().and_then(from_timestamp),
    })
}

pub fn check_company(company: Option<&Company>) -> Result<Company, ApiError> {
    let Some(company) = company else {
        return Err(ApiError::invalid_field("company", "is required"));
    };
    let mut violations = Vec::new();
    text_violation(&mut violations, "company.name", &company.name, 500, false);
    text_violation(
        &mut violations,
        "company.industry",
        &company.industry,
        200,
        false,
    );
    let domain = company.domain.trim().to_lowercase();
    let valid_domain = domain.is_empty()
        || (domain.len() <= 253
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && domain
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'));
    if !valid_domain {
        violations.push(FieldViolation {
            field: "company.domain".into(),
            description: "is not a domain name".into(),
        });
    }
    if company.employee_count < 0 {
        violations.push(FieldViolation {
            field: "company.employee_count".into(),
            description: "must not be negative".into(),
        });
    }
    if !company.company_id.trim().is_empty() {
        if let Err(error) = rapport_core::ids::parse_id("company.company_id", &company.company_id) {
            violations.extend(error.field_violations);
        }
    }
    if company
        .attributes
        .as_ref()
        .map(struct_to_json)
        .map_or(0, |a| a.to_string().len())
        > crate::validate::MAX_ATTRIBUTES_BYTES
    {
        violations.push(FieldViolation {
            field: "company.attributes".into(),
            description: "is too large".into(),
        });
    }
    if !violations.is_empty() {
        return Err(ApiError::invalid_fields(violations));
    }
    Ok(Company {
        domain,
        ..company.clone()
    })
}

impl Store {
    /// Locks a contact (resolving merged ids) for a change of its own.
    async fn lock_contact(
        transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        workspace: WorkspaceId,
        contact_id: Uuid,
    ) -> Result<ContactRow, ApiError> {
        let contact_id = Store::resolve_id(&mut **transaction, workspace, contact_id).await?;
        sqlx::query_as::<_, ContactRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM contacts WHERE workspace_id = $1 AND contact_id = $2 FOR UPDATE"
        )))
        .bind(workspace.0)
        .bind(contact_id)
        .fetch_optional(&mut **transaction)
        .await
        .map_err(map_db_error)?
        .ok_or_else(|| ApiError::not_found(format!("contact {contact_id}")))
    }

    /// Saves a contact changed by one of the calls here, with its event.
    async fn save_changed(
        transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        workspace: WorkspaceId,
        before: &ContactRow,
        row: &ContactRow,
        entry: Entry,
    ) -> Result<Profile, ApiError> {
        save_rows(transaction, &[row]).await?;
        let identities = identities_of(&mut **transaction, workspace, &[row.contact_id]).await?;
        timeline::insert(transaction, workspace, &[entry]).await?;
        outbox::enqueue_many(
            transaction,
            vec![event_record(
                workspace,
                ContactChanged {
                    contact_id: row.contact_id.to_string(),
                    change_type: ChangeType::Updated.into(),
                    contact: Some(row.snapshot(&identities)),
                    changed_fields: changed_fields(before, row),
                    source: "api".into(),
                    ..Default::default()
                },
            )],
        )
        .await
        .map_err(map_db_error)?;
        Ok(Profile {
            row: row.clone(),
            identities,
        })
    }

    /// Adds `delta` points with a reason. A repeated request id adds nothing.
    pub async fn adjust_score(
        &self,
        workspace: WorkspaceId,
        request_id: Option<&str>,
        contact_id: Uuid,
        delta: i64,
        reason: &str,
    ) -> Result<Profile, ApiError> {
        let mut transaction = self.pool().begin().await.map_err(map_db_error)?;
        let before = Store::lock_contact(&mut transaction, workspace, contact_id).await?;
        if let Some(request_id) = request_id {
            let seen: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM score_changes WHERE workspace_id = $1 AND request_id = $2)",
            )
            .bind(workspace.0)
            .bind(request_id)
            .fetch_one(&mut *transaction)
            .await
            .map_err(map_db_error)?;
            if seen {
                transaction.rollback().await.map_err(map_db_error)?;
                return self.profile(workspace, before.contact_id).await;
            }
        }
        let mut row = before.clone();
        row.score = row
            .score
            .checked_add(delta)
            .ok_or_else(|| ApiError::invalid_field("delta", "would take the score out of range"))?;
        row.updated_at = Utc::now();
        sqlx::query(
            "INSERT INTO score_changes (workspace_id, contact_id, change_id, delta, score, reason, request_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(workspace.0)
        .bind(row.contact_id)
        .bind(rapport_core::ids::new_id())
        .bind(delta)
        .bind(row.score)
        .bind(reason)
        .bind(request_id.unwrap_or(""))
        .execute(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        let entry = Entry::score(row.contact_id, delta, row.score, reason);
        let profile =
            Store::save_changed(&mut transaction, workspace, &before, &row, entry).await?;
        transaction.commit().await.map_err(map_db_error)?;
        self.waker.wake();
        Ok(profile)
    }

    pub async fn score_changes(
        &self,
        workspace: WorkspaceId,
        contact_id: Uuid,
        before: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<ScoreRow>, ApiError> {
        let contact_id = self.get(workspace, contact_id).await?.contact_id;
        sqlx::query_as::<_, ScoreRow>(
            "SELECT change_id, delta, score, reason, changed_at FROM score_changes
             WHERE workspace_id = $1 AND contact_id = $2 AND ($3::uuid IS NULL OR change_id < $3)
             ORDER BY change_id DESC LIMIT $4",
        )
        .bind(workspace.0)
        .bind(contact_id)
        .bind(before)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(map_db_error)
    }

    /// Creates or updates a company, found by id or else by domain.
    pub async fn upsert_company(
        &self,
        workspace: WorkspaceId,
        company: Company,
    ) -> Result<(CompanyRow, bool), ApiError> {
        let mut transaction = self.pool().begin().await.map_err(map_db_error)?;
        let by_id = match company.company_id.trim() {
            "" => None,
            id => Some(rapport_core::ids::parse_id("company.company_id", id)?),
        };
        let existing = sqlx::query_as::<_, CompanyRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {COMPANY_COLUMNS} FROM companies
             WHERE workspace_id = $1 AND (company_id = $2 OR ($2::uuid IS NULL AND $3 <> '' AND domain = $3))
             FOR UPDATE"
        )))
        .bind(workspace.0)
        .bind(by_id)
        .bind(&company.domain)
        .fetch_optional(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        let attributes = company
            .attributes
            .as_ref()
            .map(struct_to_json)
            .filter(|a| a.as_object().is_some_and(|o| !o.is_empty()));
        let (row, created) = match existing {
            None => {
                if by_id.is_some() {
                    return Err(ApiError::not_found(format!(
                        "company {}",
                        company.company_id.trim()
                    )));
                }
                if company.name.trim().is_empty() {
                    return Err(ApiError::invalid_field(
                        "company.name",
                        "is required for a new company",
                    ));
                }
                let row = sqlx::query_as::<_, CompanyRow>(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO companies (workspace_id, company_id, name, domain, industry, employee_count, attributes)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COMPANY_COLUMNS}"
                )))
                .bind(workspace.0)
                .bind(rapport_core::ids::new_id())
                .bind(company.name.trim())
                .bind(&company.domain)
                .bind(company.industry.trim())
                .bind(company.employee_count)
                .bind(attributes.unwrap_or_else(|| serde_json::json!({})))
                .fetch_one(&mut *transaction)
                .await
                .map_err(map_db_error)?;
                (row, true)
            }
            Some(before) => {
                let pick = |new: &str, old: &str| {
                    if new.trim().is_empty() {
                        old.to_owned()
                    } else {
                        new.trim().to_owned()
                    }
                };
                let mut merged = before.attributes.as_object().cloned().unwrap_or_default();
                if let Some(new) = attributes.as_ref().and_then(|a| a.as_object()) {
                    for (key, value) in new {
                        merged.insert(key.clone(), value.clone());
                    }
                }
                let row = sqlx::query_as::<_, CompanyRow>(sqlx::AssertSqlSafe(format!(
                    "UPDATE companies SET name = $3, domain = $4, industry = $5, employee_count = $6, attributes = $7, updated_at = now()
                     WHERE workspace_id = $1 AND company_id = $2 RETURNING {COMPANY_COLUMNS}"
                )))
                .bind(workspace.0)
                .bind(before.company_id)
                .bind(pick(&company.name, &before.name))
                .bind(pick(&company.domain, &before.domain))
                .bind(pick(&company.industry, &before.industry))
                .bind(if company.employee_count > 0 { company.employee_count } else { before.employee_count })
                .bind(serde_json::Value::Object(merged))
                .fetch_one(&mut *transaction)
                .await
                .map_err(map_db_error)?;
                (row, false)
            }
        };
        transaction.commit().await.map_err(map_db_error)?;
        Ok((row, created))
    }

    pub async fn company(
        &self,
        workspace: WorkspaceId,
        company_id: Uuid,
    ) -> Result<(CompanyRow, i64), ApiError> {
        let row = sqlx::query_as::<_, CompanyRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {COMPANY_COLUMNS} FROM companies WHERE workspace_id = $1 AND company_id = $2"
        )))
        .bind(workspace.0)
        .bind(company_id)
        .fetch_optional(self.pool())
        .await
        .map_err(map_db_error)?
        .ok_or_else(|| ApiError::not_found(format!("company {company_id}")))?;
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM contacts WHERE workspace_id = $1 AND company_id = $2",
        )
        .bind(workspace.0)
        .bind(company_id)
        .fetch_one(self.pool())
        .await
        .map_err(map_db_error)?;
        Ok((row, count))
    }

    /// Whether a company exists in the workspace (for linking contacts).
    pub async fn company_exists(
        &self,
        workspace: WorkspaceId,
        company_id: Uuid,
    ) -> Result<bool, ApiError> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM companies WHERE workspace_id = $1 AND company_id = $2)",
        )
        .bind(workspace.0)
        .bind(company_id)
        .fetch_one(self.pool())
        .await
        .map_err(map_db_error)
    }

    /// Records an order (a repeat of its id replaces it) and brings the
    /// contact's aggregates up to date in the same transaction.
    pub async fn record_order(
        &self,
        workspace: WorkspaceId,
        order: NewOrder,
    ) -> Result<(OrderRow, ContactRow), ApiError> {
        let mut transaction = self.pool().begin().await.map_err(map_db_error)?;
        let before = Store::lock_contact(&mut transaction, workspace, order.contact_id).await?;
        let previous: Option<Uuid> = sqlx::query_scalar(
            "SELECT contact_id FROM orders WHERE workspace_id = $1 AND order_id = $2 FOR UPDATE",
        )
        .bind(workspace.0)
        .bind(&order.order_id)
        .fetch_optional(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        if let Some(owner) = previous
            && owner != before.contact_id
        {
            return Err(ApiError::new(
                ErrorCode::FailedPrecondition,
                format!("order {} belongs to contact {owner}", order.order_id),
            ));
        }
        let lines = serde_json::to_value(&order.lines).map_err(|e| ApiError::internal(&e))?;
        let saved = sqlx::query_as::<_, OrderRow>(sqlx::AssertSqlSafe(format!(
            "INSERT INTO orders (workspace_id, order_id, contact_id, currency, total_micros, line_items, ordered_at)
             VALUES ($1, $2, $3, $4, $5, $6, COALESCE($7, now()))
             ON CONFLICT (workspace_id, order_id) DO UPDATE SET currency = EXCLUDED.currency,
                 total_micros = EXCLUDED.total_micros, line_items = EXCLUDED.line_items, ordered_at = EXCLUDED.ordered_at
             RETURNING {ORDER_COLUMNS}"
        )))
        .bind(workspace.0)
        .bind(&order.order_id)
        .bind(before.contact_id)
        .bind(&order.currency)
        .bind(order.total_micros)
        .bind(lines)
        .bind(order.ordered_at)
        .fetch_one(&mut *transaction)
        .await
        .map_err(map_db_error)?;
        let mut row = before.clone();
        refresh_aggregates(&mut transaction, workspace, &mut row).await?;
        row.updated_at = Utc::now();
        let entry = Entry::order(
            row.contact_id,
            &saved.order_id,
            &saved.currency,
            saved.total_micros,
        )
        .at(saved.ordered_at);
        let profile =
            Store::save_changed(&mut transaction, workspace, &before, &row, entry).await?;
        transaction.commit().await.map_err(map_db_error)?;
        self.waker.wake();
        Ok((saved, profile.row))
    }

    pub async fn orders(
        &self,
        workspace: WorkspaceId,
        contact_id: Uuid,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<OrderRow>, ApiError> {
        let contact_id = self.get(workspace, contact_id).await?.contact_id;
        sqlx::query_as::<_, OrderRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE workspace_id = $1 AND contact_id = $2
             ORDER BY ordered_at DESC, order_id DESC OFFSET $3 LIMIT $4"
        )))
        .bind(workspace.0)
        .bind(contact_id)
        .bind(offset)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(map_db_error)
    }
}

/// Recomputes the order aggregates of `row` from its orders.
async fn refresh_aggregates(
    transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    workspace: WorkspaceId,
    row: &mut ContactRow,
) -> Result<(), ApiError> {
    let per_currency: Vec<(String, i64, i64, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT currency, count(*), sum(total_micros)::bigint, min(ordered_at), max(ordered_at)
         FROM orders WHERE workspace_id = $1 AND contact_id = $2 GROUP BY currency ORDER BY currency",
    )
    .bind(workspace.0)
    .bind(row.contact_id)
    .fetch_all(&mut **transaction)
    .await
    .map_err(map_db_error)?;
    row.order_count = per_currency.iter().map(|c| c.1).sum();
    row.first_purchase_at = per_currency.iter().map(|c| c.3).min();
    row.last_purchase_at = per_currency.iter().map(|c| c.4).max();
    let spend: Vec<Spend> = per_currency
        .into_iter()
        .map(|(currency, order_count, total_micros, _, _)| Spend {
            currency,
            order_count,
            total_micros,
        })
        .collect();
    row.spend = serde_json::to_value(spend).unwrap_or_else(|_| serde_json::json!([]));
    Ok(())
}
