//! The gRPC server a Rapport service runs in.
//!
//! [`serve`] wraps a service's routes with what every service needs: the
//! standard health service, server reflection, a per-request deadline, the
//! API-key check ([`auth`]), a span per request that continues the caller's
//! trace, and shutdown that stops accepting, drains in-flight calls and exits.

use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry::propagation::Extractor;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub mod auth;
pub mod metrics;

pub use auth::{AuthLayer, workspace_of};

/// One Rapport gRPC service, ready to be served.
pub struct GrpcService {
    /// Fully qualified name, e.g. `rapport.contacts.v1.ContactsService`.
    pub name: &'static str,
    pub routes: Routes,
}

#[derive(Clone)]
pub struct ServeOptions {
    pub request_timeout: Duration,
    pub auth: AuthLayer,
    /// Cancelled to begin a graceful shutdown.
    pub shutdown: CancellationToken,
}

/// A running server.
pub struct RunningServer {
    pub name: &'static str,
    pub local_addr: SocketAddr,
    pub health: HealthReporter,
    pub task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningServer {
    /// Reports NOT_SERVING, so load balancers stop sending new calls.
    pub async fn set_not_serving(&self) {
        self.health
            .set_service_status(self.name, ServingStatus::NotServing)
            .await;
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
    }
}

/// Serves `service` on `listener` until `options.shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    service: GrpcService,
    options: ServeOptions,
) -> Result<RunningServer, Box<dyn std::error::Error + Send + Sync>> {
    let local_addr = listener.local_addr()?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(service.name, ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rapport_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(service.name)
        .with_service_name("grpc.health.v1.Health")
        .build_v1()?;
    let shutdown = options.shutdown.clone();
    let router = Server::builder()
        .timeout(options.request_timeout)
        .trace_fn(request_span)
        .layer(
            tower::ServiceBuilder::new()
                .layer(metrics::MetricsLayer)
                .layer(options.auth.clone())
                .into_inner(),
        )
        .add_routes(service.routes)
        .add_service(health_service)
        .add_service(reflection);
    let task = tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown.cancelled_owned(),
            )
            .await
    });
    tracing::info!(service = service.name, %local_addr, "gRPC server listening");
    Ok(RunningServer {
        name: service.name,
        local_addr,
        health,
        task,
    })
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl opentelemetry::propagation::Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Adds the current span's W3C trace context to outgoing gRPC metadata.
pub fn inject_trace_context(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

/// The current span's trace context as a `traceparent` value ("" when
/// there is none), for work that continues later (a timer, a stored run).
pub fn current_traceparent() -> String {
    let mut carrier = std::collections::HashMap::new();
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut carrier);
    });
    carrier.remove("traceparent").unwrap_or_default()
}

/// A parent context from a stored `traceparent`.
pub fn context_from_traceparent(traceparent: &str) -> opentelemetry::Context {
    let carrier =
        std::collections::HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&carrier))
}

struct MetadataExtractor<'a>(&'a http::HeaderMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The caller's trace context from HTTP or gRPC headers.
pub fn context_from_headers(headers: &http::HeaderMap) -> opentelemetry::Context {
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&MetadataExtractor(headers))
    })
}

/// A server span per call, child of the caller's trace when it sent one.
fn request_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or_default();
    let span = tracing::info_span!(
        "grpc",
        otel.kind = "server",
        otel.name = %path.trim_start_matches('/'),
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&MetadataExtractor(request.headers()))
    });
    let _ = span.set_parent(parent);
    span
}

/// Binds a TCP listener; port 0 picks a free port (tests read it back).
pub async fn bind(host: &str, port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind((host, port)).await
}

/// When a background task stops during shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopPhase {
    /// Takes in work (consumers, runners, public HTTP): stopped first.
    Intake,
    /// Pushes out what was done (outbox relays): stopped after the gRPC
    /// servers drained, so their last writes are published too.
    Flush,
}

/// Work a service runs beside its gRPC server (consumers, relays, timers),
/// stopped in order on shutdown.
pub struct BackgroundTask {
    pub name: &'static str,
    pub phase: StopPhase,
    stop:
        Box<dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send>,
}

impl BackgroundTask {
    pub fn new<F, Fut>(name: &'static str, stop: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        BackgroundTask {
            name,
            phase: StopPhase::Intake,
            stop: Box::new(move || Box::pin(stop())),
        }
    }

    /// A task stopped in the [`StopPhase::Flush`] phase.
    pub fn flush<F, Fut>(name: &'static str, stop: F) -> Self
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        BackgroundTask {
            phase: StopPhase::Flush,
            ..BackgroundTask::new(name, stop)
        }
    }

    /// Stops the task: it finishes what it holds and commits.
    pub async fn stop(self) {
        (self.stop)().await;
    }
}

/// What a service crate hands the binary: its gRPC service and the
/// background work it runs (consumers, relays, timers, public HTTP).
pub struct ServiceParts {
    pub grpc: GrpcService,
    /// Stopped in order: consumers first (no new work), relays last (flush).
    pub background: Vec<BackgroundTask>,
}
