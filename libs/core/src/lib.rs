//! Types every Rapport crate shares. This crate depends on nothing of
//! Rapport's but the generated protos; it must never depend on storage,
//! messaging or a service.

pub mod error;
pub mod ids;
pub mod json;
pub mod paging;
pub mod signing;
pub mod time;

pub use error::{ApiError, ErrorCode, FieldViolation};
pub use ids::WorkspaceId;
