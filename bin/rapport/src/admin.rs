//! The admin HTTP endpoint of a `rapport` process (default port 9464):
//! `/metrics` in the Prometheus text format, `/livez` (the process runs) and
//! `/readyz` (it has started every service, its database and broker answer,
//! and it is not shutting down).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use rapport_bus::SharedBus;
use rapport_config::{Config, ServiceKind};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

pub struct Readiness {
    started: AtomicBool,
    draining: AtomicBool,
    database: PgPool,
    bus: SharedBus,
}

impl Readiness {
    pub fn new(database: PgPool, bus: SharedBus) -> Self {
        Readiness {
            started: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            database,
            bus,
        }
    }

    /// Every service has applied its migrations and is serving.
    pub fn set_started(&self) {
        self.started.store(true, Ordering::SeqCst);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Why the process is not ready, if it is not.
    async fn not_ready_because(&self) -> Option<String> {
        if self.draining.load(Ordering::SeqCst) {
            return Some("shutting down".into());
        }
        if !self.started.load(Ordering::SeqCst) {
            return Some("starting".into());
        }
        let database = tokio::time::timeout(
            CHECK_TIMEOUT,
            sqlx::query("SELECT 1").execute(&self.database),
        )
        .await;
        if !matches!(database, Ok(Ok(_))) {
            return Some("database does not answer".into());
        }
        let bus = tokio::time::timeout(CHECK_TIMEOUT, self.bus.ping()).await;
        if !matches!(bus, Ok(Ok(()))) {
            return Some("event bus does not answer".into());
        }
        None
    }
}

pub struct Admin {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Admin {
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, rapport_metrics::CONTENT_TYPE)],
        rapport_metrics::encode(),
    )
}

async fn ready(State(readiness): State<Arc<Readiness>>) -> impl IntoResponse {
    match readiness.not_ready_because().await {
        None => (StatusCode::OK, "ready\n".to_owned()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}

/// Starts the admin endpoint; it answers from now until [`Admin::stop`].
pub async fn start(config: &Config, readiness: Arc<Readiness>) -> anyhow::Result<Admin> {
    let listener =
        tokio::net::TcpListener::bind((config.listen_host.as_str(), config.ports.metrics))
            .await
            .with_context(|| {
                format!(
                    "metrics: cannot listen on {}:{}",
                    config.listen_host, config.ports.metrics
                )
            })?;
    if let Ok(address) = listener.local_addr() {
        println!("metrics listening on {address}");
    }
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(readiness);
    let cancel = CancellationToken::new();
    let server_cancel = cancel.clone();
    let task = tokio::spawn(async move {
        let shutdown = async move { server_cancel.cancelled().await };
        if let Err(error) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(%error, "admin HTTP server failed");
        }
    });
    Ok(Admin { cancel, task })
}

/// Samples gauges that have no event to update them: connection pool use and
/// outbox backlog per service.
pub fn spawn_sampler(pools: Vec<(ServiceKind, PgPool)>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let metrics = rapport_metrics::metrics();
        loop {
            for (service, pool) in &pools {
                let size = i64::from(pool.size());
                let idle = i64::try_from(pool.num_idle()).unwrap_or(0);
                metrics
                    .db_connections
                    .with_label_values(&[service.as_str(), "idle"])
                    .set(idle);
                metrics
                    .db_connections
                    .with_label_values(&[service.as_str(), "in_use"])
                    .set((size - idle).max(0));
                if let Ok(backlog) = rapport_db::outbox::backlog(pool).await {
                    metrics
                        .outbox_backlog
                        .with_label_values(&[service.as_str()])
                        .set(backlog);
                }
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    })
}
