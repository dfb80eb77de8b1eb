//! Postgres for Rapport's services.
//!
//! Each service owns one Postgres schema (`contacts`, `ingestion`, ...). Its
//! pool sets `search_path` to that schema, so its SQL names bare tables and can
//! never reach another service's by accident; its migrations are embedded in
//! its crate and tracked in its own `_sqlx_migrations` table.
//!
//! State changes and the events they cause are written in one transaction
//! through the [`outbox`]; a relay publishes them afterwards.

use std::time::Duration;

use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool, Postgres};

pub mod definitions;
pub mod error;
pub mod outbox;
pub mod processed;

pub use error::{DbError, map_db_error};

/// Creates the database named in `url` when it does not exist yet.
pub async fn ensure_database(url: &str) -> Result<(), sqlx::Error> {
    if !Postgres::database_exists(url).await? {
        tracing::info!("creating database");
        match Postgres::create_database(url).await {
            Ok(()) => {}
            // Another process created it in the meantime.
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42P04") => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// A pool whose connections work in `schema`. The schema is created if
/// missing.
pub async fn connect(url: &str, schema: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    if !schema.chars().all(|c| c.is_ascii_lowercase() || c == '_') || schema.is_empty() {
        return Err(sqlx::Error::Configuration(
            format!("schema name `{schema}` must be lower-case letters and underscores").into(),
        ));
    }
    let options: PgConnectOptions = url.parse()?;
    let options = options
        .options([("search_path", schema)])
        .application_name(&format!("rapport-{schema}"))
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}"
    )))
    .execute(&pool)
    .await?;
    Ok(pool)
}

/// Applies `migrator` (a service's embedded migrations) and the outbox table
/// every service has.
pub async fn migrate(
    pool: &PgPool,
    migrator: &Migrator,
) -> Result<(), sqlx::migrate::MigrateError> {
    migrator.run(pool).await?;
    outbox::create_table(pool).await?;
    Ok(())
}

/// Whether every migration of `migrator` is applied (readiness).
pub async fn migrations_applied(pool: &PgPool, migrator: &Migrator) -> Result<bool, sqlx::Error> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    Ok(migrator.iter().all(|m| applied.contains(&m.version)))
}
