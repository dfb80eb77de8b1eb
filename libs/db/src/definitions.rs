//! Storage for named definitions (segments, journeys, templates): a protobuf
//! message kept whole, with a name unique per workspace. Each service has its
//! own table of this shape:
//!
//! ```sql
//! CREATE TABLE <table> (
//!     workspace_id UUID NOT NULL, id UUID NOT NULL, name TEXT NOT NULL,
//!     definition BYTEA NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
//!     updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
//!     PRIMARY KEY (workspace_id, id), UNIQUE (workspace_id, name));
//! ```

use chrono::{DateTime, Utc};
use rapport_core::{ApiError, ErrorCode, WorkspaceId};
use sqlx::{FromRow, PgPool};
use uuid::Uuid;

use crate::map_db_error;

#[derive(Debug, Clone, FromRow)]
pub struct DefinitionRow {
    pub id: Uuid,
    pub name: String,
    pub definition: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone)]
pub struct Definitions {
    pool: PgPool,
    table: &'static str,
    /// What the rows are, for messages ("segment").
    noun: &'static str,
}

impl Definitions {
    pub fn new(pool: PgPool, table: &'static str, noun: &'static str) -> Self {
        Definitions { pool, table, noun }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    #[tracing::instrument(
        name = "db",
        skip_all,
        fields(
            otel.kind = "client",
            otel.name = format!("INSERT {}", self.table),
            db.system.name = "postgresql",
            db.operation.name = "INSERT",
            db.collection.name = %self.table,
        )
    )]
    pub async fn create(
        &self,
        workspace: WorkspaceId,
        name: &str,
        definition: &[u8],
    ) -> Result<DefinitionRow, ApiError> {
        let result = sqlx::query_as::<_, DefinitionRow>(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} (workspace_id, id, name, definition) VALUES ($1, $2, $3, $4)
             RETURNING id, name, definition, created_at, updated_at",
            self.table
        )))
        .bind(workspace.0)
        .bind(rapport_core::ids::new_id())
        .bind(name)
        .bind(definition)
        .fetch_one(&self.pool)
        .await;
        match result {
            Ok(row) => Ok(row),
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("23505") => {
                Err(ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!("a {} named `{name}` already exists", self.noun),
                ))
            }
            Err(error) => Err(map_db_error(error)),
        }
    }

    #[tracing::instrument(
        name = "db",
        skip_all,
        fields(
            otel.kind = "client",
            otel.name = format!("SELECT {}", self.table),
            db.system.name = "postgresql",
            db.operation.name = "SELECT",
            db.collection.name = %self.table,
        )
    )]
    pub async fn get(&self, workspace: WorkspaceId, id: Uuid) -> Result<DefinitionRow, ApiError> {
        sqlx::query_as::<_, DefinitionRow>(sqlx::AssertSqlSafe(format!(
            "SELECT id, name, definition, created_at, updated_at FROM {} WHERE workspace_id = $1 AND id = $2",
            self.table
        )))
        .bind(workspace.0)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_db_error)?
        .ok_or_else(|| ApiError::not_found(format!("{} {id}", self.noun)))
    }

    #[tracing::instrument(
        name = "db",
        skip_all,
        fields(
            otel.kind = "client",
            otel.name = format!("SELECT {}", self.table),
            db.system.name = "postgresql",
            db.operation.name = "SELECT",
            db.collection.name = %self.table,
        )
    )]
    pub async fn get_by_name(
        &self,
        workspace: WorkspaceId,
        name: &str,
    ) -> Result<Option<DefinitionRow>, ApiError> {
        sqlx::query_as::<_, DefinitionRow>(sqlx::AssertSqlSafe(format!(
            "SELECT id, name, definition, created_at, updated_at FROM {} WHERE workspace_id = $1 AND name = $2",
            self.table
        )))
        .bind(workspace.0)
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_db_error)
    }

    /// Newest first, after the cursor `after` (an id from a previous page).
    #[tracing::instrument(
        name = "db",
        skip_all,
        fields(
            otel.kind = "client",
            otel.name = format!("SELECT {}", self.table),
            db.system.name = "postgresql",
            db.operation.name = "SELECT",
            db.collection.name = %self.table,
        )
    )]
    pub async fn list(
        &self,
        workspace: WorkspaceId,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<DefinitionRow>, ApiError> {
        sqlx::query_as::<_, DefinitionRow>(sqlx::AssertSqlSafe(format!(
            "SELECT id, name, definition, created_at, updated_at FROM {}
             WHERE workspace_id = $1 AND ($2::uuid IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3",
            self.table
        )))
        .bind(workspace.0)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(map_db_error)
    }
}

/// Checks a definition's name: required, at most 200 characters.
pub fn check_name(field: &str, name: &str) -> Result<String, ApiError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(ApiError::invalid_field(field, "is required"));
    }
    if name.chars().count() > 200 {
        return Err(ApiError::invalid_field(
            field,
            "is longer than 200 characters",
        ));
    }
    Ok(name.to_owned())
}
