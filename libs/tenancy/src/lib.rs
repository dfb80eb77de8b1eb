//! Workspaces and keys.
//!
//! This is the control plane every service shares: it owns the `tenancy`
//! schema, and services read it only through this crate. A gRPC caller
//! presents an API key (`authorization: Bearer rpk_...`); public tracking
//! clients present a write key (`rwk_...`). Keys are stored as SHA-256
//! digests and each maps to exactly one workspace.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;
use rapport_core::WorkspaceId;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;

pub const SCHEMA: &str = "tenancy";
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

const API_KEY_PREFIX: &str = "rpk_";
const WRITE_KEY_PREFIX: &str = "rwk_";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// Full access to a workspace's gRPC API.
    Api,
    /// Public, append-only: tracking calls from browsers and apps.
    Write,
}

impl KeyKind {
    fn as_str(self) -> &'static str {
        match self {
            KeyKind::Api => "api",
            KeyKind::Write => "write",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            KeyKind::Api => API_KEY_PREFIX,
            KeyKind::Write => WRITE_KEY_PREFIX,
        }
    }
}

/// What `rapport workspace create` prints. The keys are shown once, here.
#[derive(Debug, Clone, Serialize)]
pub struct NewWorkspace {
    pub workspace_id: String,
    pub name: String,
    pub api_key: String,
    pub write_key: String,
}

/// A workspace as an authenticated caller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    pub id: WorkspaceId,
    pub name: String,
}

fn digest(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

fn generate_key(kind: KeyKind) -> String {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    format!("{}{}", kind.prefix(), hex::encode(secret))
}

/// Creates a workspace with one API key and one write key.
pub async fn create_workspace(pool: &PgPool, name: &str) -> Result<NewWorkspace, sqlx::Error> {
    let name = name.trim();
    let workspace_id = WorkspaceId::new();
    let api_key = generate_key(KeyKind::Api);
    let write_key = generate_key(KeyKind::Write);
    let mut transaction = pool.begin().await?;
    sqlx::query("INSERT INTO workspaces (workspace_id, name) VALUES ($1, $2)")
        .bind(workspace_id.0)
        .bind(name)
        .execute(&mut *transaction)
        .await?;
    for (kind, key) in [(KeyKind::Api, &api_key), (KeyKind::Write, &write_key)] {
        insert_key(&mut transaction, workspace_id, kind, key).await?;
    }
    transaction.commit().await?;
    Ok(NewWorkspace {
        workspace_id: workspace_id.to_string(),
        name: name.to_owned(),
        api_key,
        write_key,
    })
}

async fn insert_key(
    transaction: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    workspace_id: WorkspaceId,
    kind: KeyKind,
    key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO api_keys (key_id, workspace_id, key_digest, key_prefix, kind)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(workspace_id.0)
    .bind(digest(key))
    .bind(&key[..key.len().min(12)])
    .bind(kind.as_str())
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// Issues a new key of `kind` for a workspace (key rotation: issue, deploy,
/// then revoke the old one).
pub async fn issue_key(
    pool: &PgPool,
    workspace_id: WorkspaceId,
    kind: KeyKind,
) -> Result<String, sqlx::Error> {
    let key = generate_key(kind);
    let mut transaction = pool.begin().await?;
    insert_key(&mut transaction, workspace_id, kind, &key).await?;
    transaction.commit().await?;
    Ok(key)
}

/// Revokes a key; it stops working once caches expire.
pub async fn revoke_key(pool: &PgPool, key: &str) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "UPDATE api_keys SET revoked_at = now() WHERE key_digest = $1 AND revoked_at IS NULL",
    )
    .bind(digest(key))
    .execute(pool)
    .await?;
    Ok(result.rows_affected() > 0)
}

/// Looks up the workspace of a key of `kind`; `None` when it is unknown,
/// revoked, or of another kind.
pub async fn find_workspace(
    pool: &PgPool,
    key: &str,
    kind: KeyKind,
) -> Result<Option<Workspace>, sqlx::Error> {
    if !key.starts_with(kind.prefix()) {
        return Ok(None);
    }
    let row: Option<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT w.workspace_id, w.name FROM api_keys k
         JOIN workspaces w ON w.workspace_id = k.workspace_id
         WHERE k.key_digest = $1 AND k.kind = $2 AND k.revoked_at IS NULL",
    )
    .bind(digest(key))
    .bind(kind.as_str())
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(id, name)| Workspace {
        id: WorkspaceId(id),
        name,
    }))
}

/// Resolves keys to workspaces, remembering answers (found or not) for a
/// short time so a hot path does not hit Postgres on every request.
pub struct KeyResolver {
    pool: PgPool,
    ttl: Duration,
    cache: Mutex<HashMap<(Vec<u8>, &'static str), (Option<Workspace>, Instant)>>,
}

const CACHE_LIMIT: usize = 100_000;

impl KeyResolver {
    pub fn new(pool: PgPool, ttl: Duration) -> Self {
        KeyResolver {
            pool,
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn resolve(
        &self,
        key: &str,
        kind: KeyKind,
    ) -> Result<Option<Workspace>, sqlx::Error> {
        let cache_key = (digest(key), kind.as_str());
        if let Some((workspace, at)) = self.lock().get(&cache_key) {
            if at.elapsed() < self.ttl {
                return Ok(workspace.clone());
            }
        }
        let workspace = find_workspace(&self.pool, key, kind).await?;
        let mut cache = self.lock();
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(cache_key, (workspace.clone(), Instant::now()));
        Ok(workspace)
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(Vec<u8>, &'static str), (Option<Workspace>, Instant)>>
    {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
