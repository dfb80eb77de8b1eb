//! Identifier newtypes. Ids are UUIDv7 (time-ordered, so they index well and
//! page naturally) rendered as plain hyphenated strings on the wire.

use crate::error::ApiError;

/// The tenant every row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkspaceId(pub uuid::Uuid);

impl WorkspaceId {
    pub fn new() -> Self {
        WorkspaceId(uuid::Uuid::now_v7())
    }
}

impl Default for WorkspaceId {
    fn default() -> Self {
        WorkspaceId::new()
    }
}

impl std::fmt::Display for WorkspaceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for WorkspaceId {
    type Err = uuid::Error;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(text).map(WorkspaceId)
    }
}

/// Parses a resource id sent by a client, naming the field when it is not a
/// well-formed id. A well-formed id of another workspace is a NOT_FOUND later,
/// never a parse error, so callers cannot probe other tenants.
pub fn parse_id(field: &str, text: &str) -> Result<uuid::Uuid, ApiError> {
    if text.trim().is_empty() {
        return Err(ApiError::invalid_field(field, "is required"));
    }
    uuid::Uuid::parse_str(text.trim())
        .map_err(|_| ApiError::invalid_field(field, "is not a valid id (expected a UUID)"))
}

/// A new time-ordered id.
pub fn new_id() -> uuid::Uuid {
    uuid::Uuid::now_v7()
}
