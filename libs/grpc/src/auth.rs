//! API-key authentication as a tower layer.
//!
//! Every call except health checks and reflection must carry
//! `authorization: Bearer <api key>` (or `x-api-key: <api key>`). The key is
//! resolved to its workspace, which handlers read with [`workspace_of`]; a
//! missing, unknown or revoked key is UNAUTHENTICATED before any handler runs.
//!
//! Services calling each other present the deployment's internal credential
//! (`x-rapport-internal`) and the workspace they act for
//! (`x-rapport-workspace-id`) instead of a workspace key.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rapport_core::{ApiError, WorkspaceId};
use rapport_tenancy::{KeyKind, KeyResolver, Workspace};

/// Paths callers may use without a key.
const PUBLIC_PREFIXES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

pub const INTERNAL_HEADER: &str = "x-rapport-internal";
pub const WORKSPACE_HEADER: &str = "x-rapport-workspace-id";

#[derive(Clone)]
pub struct AuthLayer {
    resolver: Arc<KeyResolver>,
    internal_credential: Arc<str>,
}

impl AuthLayer {
    /// `internal_credential` is what [`rapport_core::signing::Signer::internal_credential`]
    /// derives from the deployment's internal secret.
    pub fn new(resolver: Arc<KeyResolver>, internal_credential: String) -> Self {
        AuthLayer {
            resolver,
            internal_credential: internal_credential.into(),
        }
    }
}

/// Adds the internal credential and workspace to a request one service
/// sends another.
pub fn internal_request<T>(
    message: T,
    credential: &str,
    workspace: WorkspaceId,
) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = credential.parse() {
        request.metadata_mut().insert(INTERNAL_HEADER, value);
    }
    if let Ok(value) = workspace.to_string().parse() {
        request.metadata_mut().insert(WORKSPACE_HEADER, value);
    }
    crate::inject_trace_context(request.metadata_mut());
    request
}

/// The workspace an internal call acts for, if it carries the right credential.
fn internal_workspace(headers: &http::HeaderMap, credential: &str) -> Option<Workspace> {
    let presented = headers.get(INTERNAL_HEADER)?.to_str().ok()?;
    if presented.len() != credential.len()
        || presented
            .bytes()
            .zip(credential.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            != 0
    {
        return None;
    }
    let workspace = headers.get(WORKSPACE_HEADER)?.to_str().ok()?.parse().ok()?;
    Some(Workspace {
        id: workspace,
        name: String::new(),
    })
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            resolver: self.resolver.clone(),
            internal_credential: self.internal_credential.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    resolver: Arc<KeyResolver>,
    internal_credential: Arc<str>,
}

fn presented_key(headers: &http::HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, key) = value.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| key.trim());
    }
    headers
        .get("x-api-key")
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
}

impl<S, ReqBody> tower::Service<http::Request<ReqBody>> for AuthService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        // The clone is not ready; swap so the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let resolver = self.resolver.clone();
        let internal_credential = self.internal_credential.clone();
        Box::pin(async move {
            let path = request.uri().path();
            if PUBLIC_PREFIXES
                .iter()
                .any(|prefix| path.starts_with(prefix))
            {
                return inner.call(request).await;
            }
            if request.headers().contains_key(INTERNAL_HEADER) {
                return match internal_workspace(request.headers(), &internal_credential) {
                    Some(workspace) => {
                        request.extensions_mut().insert(workspace);
                        inner.call(request).await
                    }
                    None => Ok(ApiError::unauthenticated(
                        "internal credential or workspace is not valid",
                    )
                    .to_status()
                    .into_http()),
                };
            }
            let Some(key) = presented_key(request.headers()).map(str::to_owned) else {
                return Ok(ApiError::unauthenticated(
                    "missing API key: send `authorization: Bearer <api key>`",
                )
                .to_status()
                .into_http());
            };
            match resolver.resolve(&key, KeyKind::Api).await {
                Ok(Some(workspace)) => {
                    request.extensions_mut().insert(workspace);
                    inner.call(request).await
                }
                Ok(None) => Ok(ApiError::unauthenticated("API key is not valid")
                    .to_status()
                    .into_http()),
                Err(error) => {
                    tracing::warn!(%error, "API key lookup failed");
                    Ok(ApiError::unavailable("cannot verify API key now; retry")
                        .to_status()
                        .into_http())
                }
            }
        })
    }
}

/// The workspace the authenticated caller acts in.
pub fn workspace_of<T>(request: &tonic::Request<T>) -> Result<WorkspaceId, tonic::Status> {
    request
        .extensions()
        .get::<Workspace>()
        .map(|workspace| workspace.id)
        .ok_or_else(|| ApiError::unauthenticated("no authenticated workspace").to_status())
}

/// The authenticated workspace with its name.
pub fn workspace_details<T>(request: &tonic::Request<T>) -> Result<Workspace, tonic::Status> {
    request
        .extensions()
        .get::<Workspace>()
        .cloned()
        .ok_or_else(|| ApiError::unauthenticated("no authenticated workspace").to_status())
}
