//! One error type for every API: a small code enum mapped once to gRPC and
//! HTTP. Client mistakes carry the offending fields; internal failures are
//! logged with their cause and reach the caller only as a generic message.

use rapport_proto::common::v1::ErrorReason;
use tonic_types::{ErrorDetails, StatusExt};

/// Error domain reported in `google.rpc.ErrorInfo`.
pub const ERROR_DOMAIN: &str = "rapport.dev";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    PayloadTooLarge,
    /// A dependency is down or overloaded; the caller may retry.
    Unavailable,
    /// A concurrent change won; the caller may retry.
    Aborted,
    DeadlineExceeded,
    Internal,
}

impl ErrorCode {
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorCode::Unauthenticated => tonic::Code::Unauthenticated,
            ErrorCode::PermissionDenied => tonic::Code::PermissionDenied,
            ErrorCode::NotFound => tonic::Code::NotFound,
            ErrorCode::AlreadyExists => tonic::Code::AlreadyExists,
            ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorCode::PayloadTooLarge => tonic::Code::InvalidArgument,
            ErrorCode::Unavailable => tonic::Code::Unavailable,
            ErrorCode::Aborted => tonic::Code::Aborted,
            ErrorCode::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            ErrorCode::Internal => tonic::Code::Internal,
        }
    }

    pub fn http_status(self) -> http::StatusCode {
        match self {
            ErrorCode::InvalidArgument => http::StatusCode::BAD_REQUEST,
            ErrorCode::Unauthenticated => http::StatusCode::UNAUTHORIZED,
            ErrorCode::PermissionDenied => http::StatusCode::FORBIDDEN,
            ErrorCode::NotFound => http::StatusCode::NOT_FOUND,
            ErrorCode::AlreadyExists => http::StatusCode::CONFLICT,
            ErrorCode::FailedPrecondition => http::StatusCode::PRECONDITION_FAILED,
            ErrorCode::PayloadTooLarge => http::StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Unavailable => http::StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Aborted => http::StatusCode::CONFLICT,
            ErrorCode::DeadlineExceeded => http::StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::Internal => http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn reason(self) -> ErrorReason {
        match self {
            ErrorCode::InvalidArgument => ErrorReason::FieldInvalid,
            ErrorCode::Unauthenticated => ErrorReason::ApiKeyInvalid,
            ErrorCode::NotFound => ErrorReason::ResourceNotFound,
            ErrorCode::AlreadyExists => ErrorReason::ResourceExists,
            ErrorCode::Unavailable => ErrorReason::DependencyUnavailable,
            ErrorCode::PayloadTooLarge => ErrorReason::PayloadTooLarge,
            _ => ErrorReason::Unspecified,
        }
    }

    /// Whether the same request may succeed if retried unchanged.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Unavailable | ErrorCode::Aborted | ErrorCode::DeadlineExceeded
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// An error as a caller sees it.
#[derive(Debug, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub field_violations: Vec<FieldViolation>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            field_violations: Vec::new(),
        }
    }

    /// INVALID_ARGUMENT naming one field.
    pub fn invalid_field(field: impl Into<String>, description: impl Into<String>) -> Self {
        let field = field.into();
        let description = description.into();
        ApiError {
            code: ErrorCode::InvalidArgument,
            message: format!("invalid `{field}`: {description}"),
            field_violations: vec![FieldViolation { field, description }],
        }
    }

    /// INVALID_ARGUMENT naming several fields.
    pub fn invalid_fields(violations: Vec<FieldViolation>) -> Self {
        let message = violations
            .iter()
            .map(|v| format!("`{}`: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; ");
        ApiError {
            code: ErrorCode::InvalidArgument,
            message: format!("invalid request: {message}"),
            field_violations: violations,
        }
    }

    pub fn not_found(what: impl std::fmt::Display) -> Self {
        ApiError::new(ErrorCode::NotFound, format!("{what} not found"))
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Unauthenticated, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Unavailable, message)
    }

    /// An internal failure. The cause is logged here, with its full chain;
    /// the caller only learns that something went wrong on our side.
    pub fn internal(cause: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %error_chain(cause), "internal error");
        ApiError::new(ErrorCode::Internal, "internal error")
    }

    pub fn to_status(&self) -> tonic::Status {
        let mut details = ErrorDetails::new();
        details.set_error_info(
            self.code.reason().as_str_name(),
            ERROR_DOMAIN,
            std::collections::HashMap::<String, String>::new(),
        );
        for violation in &self.field_violations {
            details
                .add_bad_request_violation(violation.field.clone(), violation.description.clone());
        }
        tonic::Status::with_error_details(self.code.grpc_code(), self.message.clone(), details)
    }
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        error.to_status()
    }
}

/// "outer: inner: innermost" for logs.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_violations_travel_as_bad_request_details() {
        let status = ApiError::invalid_field("contact.email", "not an email address").to_status();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let details = status.get_error_details();
        let bad_request = details.bad_request().expect("BadRequest detail");
        assert_eq!(bad_request.field_violations[0].field, "contact.email");
        let info = details.error_info().expect("ErrorInfo detail");
        assert_eq!(info.reason, "ERROR_REASON_FIELD_INVALID");
        assert_eq!(info.domain, ERROR_DOMAIN);
    }

    #[test]
    fn internal_errors_do_not_leak_their_cause() {
        let cause = std::io::Error::other("password authentication failed for user rapport");
        let status = ApiError::internal(&cause).to_status();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(!status.message().contains("password"));
    }
}
