//! Database errors mapped once to API errors.

use rapport_core::{ApiError, ErrorCode};

/// A database failure with the meaning a caller should see.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DbError(#[from] pub sqlx::Error);

impl From<DbError> for ApiError {
    fn from(error: DbError) -> Self {
        map_db_error(error.0)
    }
}

/// Maps a sqlx error to what the caller sees: constraint violations are the
/// caller's (with the constraint as the field), connection trouble is
/// UNAVAILABLE, everything else is logged and reported as INTERNAL.
pub fn map_db_error(error: sqlx::Error) -> ApiError {
    match &error {
        sqlx::Error::RowNotFound => ApiError::new(ErrorCode::NotFound, "not found"),
        sqlx::Error::Database(database_error) => {
            let constraint = database_error.constraint().unwrap_or("").to_owned();
            match database_error.code().as_deref() {
                Some("23505") => ApiError::new(
                    ErrorCode::AlreadyExists,
                    format!("already exists ({})", describe_constraint(&constraint)),
                ),
                Some("23503") => ApiError::new(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "refers to something that does not exist ({})",
                        describe_constraint(&constraint)
                    ),
                ),
                Some("23502" | "23514" | "22001" | "22P02" | "22003" | "22P05" | "22021") => {
                    ApiError::invalid_field(
                        describe_constraint(&constraint),
                        "violates a constraint",
                    )
                }
                Some("40001" | "40P01") => {
                    ApiError::new(ErrorCode::Aborted, "concurrent change; retry")
                }
                Some("57P01" | "57P02" | "57P03" | "53300") => {
                    ApiError::unavailable("database unavailable; retry")
                }
                _ => ApiError::internal(&error),
            }
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
            tracing::warn!(error = %error, "database unavailable");
            ApiError::unavailable("database unavailable; retry")
        }
        _ => ApiError::internal(&error),
    }
}

fn describe_constraint(constraint: &str) -> String {
    if constraint.is_empty() {
        "value".to_owned()
    } else {
        constraint.to_owned()
    }
}
