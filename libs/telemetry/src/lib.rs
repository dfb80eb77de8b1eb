//! Telemetry set-up for a `rapport` process.
//!
//! Logs go to stdout through `tracing`, as one JSON object per line unless
//! `log_format = "pretty"`. When `otlp_endpoint` is set, spans are also
//! exported over OTLP/gRPC. The W3C trace-context propagator is installed in
//! every case; spans carry trace ids (and pass them on in gRPC metadata and
//! Kafka headers) only when export is configured.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use rapport_config::{Config, LogFormat};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log_level filter: {0}")]
    Filter(String),
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("a global subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the trace pipeline alive; [`TelemetryGuard::shutdown`] flushes it.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Exports spans still buffered. Call last on shutdown.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("telemetry shutdown: {error}");
            }
        }
    }
}

/// Installs the global subscriber for `service_name` ("rapport" or the one
/// service a process runs).
pub fn init(config: &Config, service_name: &str) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_new(&config.log_level)
        .map_err(|error| TelemetryError::Filter(error.to_string()))?;
    let fmt_layer = match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .compact()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .boxed(),
    };

    let provider = match &config.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|error| TelemetryError::Exporter(error.to_string()))?;
            let resource = Resource::builder()
                .with_service_name(service_name.to_owned())
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
    };
    let otel_layer = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("rapport")));

    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    Ok(TelemetryGuard { provider })
}
