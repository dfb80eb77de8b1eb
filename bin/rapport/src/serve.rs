//! `rapport serve`: start the chosen services, then shut them down in order.

use std::sync::Arc;

use anyhow::Context;
use rapport_bus::SharedBus;
use rapport_config::{Config, ServiceKind};
use rapport_grpc::{
    AuthLayer, BackgroundTask, RunningServer, ServeOptions, ServiceParts, StopPhase,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

fn schema(service: ServiceKind) -> &'static str {
    match service {
        ServiceKind::Contacts => rapport_contacts::SCHEMA,
        ServiceKind::Ingestion => rapport_ingestion::SCHEMA,
        ServiceKind::Segmentation => rapport_segmentation::SCHEMA,
        ServiceKind::Automation => rapport_automation::SCHEMA,
        ServiceKind::Messaging => rapport_messaging::SCHEMA,
        ServiceKind::Reporting => rapport_reporting::SCHEMA,
    }
}

fn migrator(service: ServiceKind) -> &'static sqlx::migrate::Migrator {
    match service {
        ServiceKind::Contacts => &rapport_contacts::MIGRATOR,
        ServiceKind::Ingestion => &rapport_ingestion::MIGRATOR,
        ServiceKind::Segmentation => &rapport_segmentation::MIGRATOR,
        ServiceKind::Automation => &rapport_automation::MIGRATOR,
        ServiceKind::Messaging => &rapport_messaging::MIGRATOR,
        ServiceKind::Reporting => &rapport_reporting::MIGRATOR,
    }
}

async fn build(
    service: ServiceKind,
    pool: PgPool,
    bus: SharedBus,
    config: &Config,
) -> Result<ServiceParts, rapport_bus::BusError> {
    match service {
        ServiceKind::Contacts => rapport_contacts::build(pool, bus, config).await,
        ServiceKind::Ingestion => rapport_ingestion::build(pool, bus, config).await,
        ServiceKind::Segmentation => rapport_segmentation::build(pool, bus, config).await,
        ServiceKind::Automation => rapport_automation::build(pool, bus, config).await,
        ServiceKind::Messaging => rapport_messaging::build(pool, bus, config).await,
        ServiceKind::Reporting => rapport_reporting::build(pool, bus, config).await,
    }
}

/// The pool of the `tenancy` schema, migrated.
pub async fn tenancy_pool(config: &Config) -> anyhow::Result<PgPool> {
    rapport_db::ensure_database(config.database_url())
        .await
        .context("cannot reach Postgres at database_url")?;
    let pool = rapport_db::connect(config.database_url(), rapport_tenancy::SCHEMA, 4)
        .await
        .context("cannot connect to Postgres")?;
    rapport_tenancy::MIGRATOR
        .run(&pool)
        .await
        .context("tenancy migrations failed")?;
    Ok(pool)
}

async fn service_pool(config: &Config, service: ServiceKind) -> anyhow::Result<PgPool> {
    let pool = rapport_db::connect(
        config.database_url(),
        schema(service),
        config.database_max_connections,
    )
    .await
    .with_context(|| format!("{service}: cannot connect to Postgres"))?;
    rapport_db::migrate(&pool, migrator(service))
        .await
        .with_context(|| format!("{service}: migrations failed"))?;
    Ok(pool)
}

/// Applies the migrations of `services` and of the tenancy schema.
pub async fn migrate_all(config: &Config, services: &[ServiceKind]) -> anyhow::Result<()> {
    tenancy_pool(config).await?.close().await;
    for service in services {
        service_pool(config, *service).await?.close().await;
        tracing::info!(%service, "migrations applied");
    }
    Ok(())
}

fn connect_bus(config: &Config, services: &[ServiceKind]) -> anyhow::Result<SharedBus> {
    match config.brokers() {
        Some(brokers) => {
            let mut settings = rapport_bus::kafka::KafkaSettings::new(brokers);
            settings.namespace = config.kafka.namespace.clone();
            settings.delivery_timeout =
                std::time::Duration::from_millis(config.kafka.delivery_timeout_ms);
            settings.client_id = format!(
                "rapport-{}",
                services
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join("-")
            );
            Ok(Arc::new(rapport_bus::kafka::KafkaBus::connect(settings)?))
        }
        None if services.len() == ServiceKind::ALL.len() => {
            tracing::info!("no Kafka brokers configured; using the in-process bus");
            Ok(Arc::new(rapport_bus::memory::MemoryBus::new()))
        }
        None => anyhow::bail!(
            "no Kafka brokers configured: the in-process bus only works when one process runs every \
             service; set RAPPORT_KAFKA_BROKERS or run without --services"
        ),
    }
}

pub async fn serve(config: Config, services: Vec<ServiceKind>) -> anyhow::Result<()> {
    let process_name = match services.as_slice() {
        [only] => format!("rapport-{only}"),
        _ => "rapport".to_owned(),
    };
    let telemetry = rapport_telemetry::init(&config, &process_name)?;
    tracing::info!(?config, services = ?services, "starting");

    let bus = connect_bus(&config, &services)?;
    let tenancy = tenancy_pool(&config).await?;
    let readiness = Arc::new(crate::admin::Readiness::new(tenancy.clone(), bus.clone()));
    let admin = crate::admin::start(&config, readiness.clone()).await?;
    let resolver = Arc::new(rapport_tenancy::KeyResolver::new(
        tenancy,
        std::time::Duration::from_millis(config.api_key_cache_ms),
    ));
    let shutdown = CancellationToken::new();
    let options = ServeOptions {
        request_timeout: config.request_timeout(),
        auth: AuthLayer::new(
            resolver,
            rapport_core::signing::Signer::internal_credential(&config.internal_secret()),
        ),
        shutdown: shutdown.clone(),
    };

    let mut servers: Vec<RunningServer> = Vec::new();
    let mut background: Vec<BackgroundTask> = Vec::new();
    let mut pools: Vec<(ServiceKind, PgPool)> = Vec::new();
    for service in &services {
        let pool = service_pool(&config, *service).await?;
        let parts = build(*service, pool.clone(), bus.clone(), &config)
            .await
            .with_context(|| format!("{service}: cannot start"))?;
        let port = config.ports.grpc(*service);
        let listener = rapport_grpc::bind(&config.listen_host, port)
            .await
            .with_context(|| {
                format!("{service}: cannot listen on {}:{port}", config.listen_host)
            })?;
        let server = rapport_grpc::serve(listener, parts.grpc, options.clone())
            .await
            .map_err(|error| anyhow::anyhow!("{service}: {error}"))?;
        println!("{service} listening on {}", server.local_addr);
        servers.push(server);
        background.extend(parts.background);
        pools.push((*service, pool));
    }
    let sampler = crate::admin::spawn_sampler(pools);
    readiness.set_started();
    tracing::info!(bus = bus.kind(), "all services started");

    wait_for_signal().await;
    let grace = config.shutdown_grace();
    tracing::info!(?grace, "shutting down");
    // Not ready from now on; keep serving while load balancers notice.
    readiness.set_draining();
    for server in &servers {
        server.set_not_serving().await;
    }
    tokio::time::sleep(config.shutdown_drain_delay()).await;
    let drain = async {
        let (intake, flush): (Vec<_>, Vec<_>) = background
            .into_iter()
            .partition(|task| task.phase == StopPhase::Intake);
        // 1. Stop taking work: consumers commit what they handled, runners
        //    finish their step, public HTTP stops accepting.
        for task in intake {
            let name = task.name;
            task.stop().await;
            tracing::info!(task = name, "stopped");
        }
        // 2. Drain in-flight gRPC calls.
        shutdown.cancel();
        for server in servers {
            let _ = server.task.await;
        }
        // 3. Publish what is left in the outboxes, then flush the producer.
        for task in flush {
            let name = task.name;
            task.stop().await;
            tracing::info!(task = name, "stopped");
        }
        if let Err(error) = bus.flush(std::time::Duration::from_secs(5)).await {
            tracing::warn!(%error, "bus flush failed");
        }
    };
    let remaining = grace.saturating_sub(config.shutdown_drain_delay());
    if tokio::time::timeout(remaining, drain).await.is_err() {
        tracing::warn!(
            ?grace,
            "shutdown grace period elapsed; exiting with work in flight"
        );
    }
    sampler.abort();
    admin.stop().await;
    tracing::info!("stopped");
    telemetry.shutdown();
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
