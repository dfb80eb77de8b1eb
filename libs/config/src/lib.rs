//! Rapport's configuration.
//!
//! Values are layered: built-in defaults, then an optional TOML file, then
//! `RAPPORT_*` environment variables (nested keys use `__`, e.g.
//! `RAPPORT_PORTS__CONTACTS=6051`). The result is checked by [`Config::validate`]
//! before anything starts, so a typo fails at start with a message naming the
//! key rather than at the first request.
//!
//! The environment is read through an injectable map ([`ConfigSource`]) so that
//! tests never mutate the process environment.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// A configuration value that must never be printed. Its `Debug` output is
/// `[redacted]`; read it with [`Secret::expose`].
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Every service Rapport can run. The binary's `--services` flag picks a subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    Contacts,
    Ingestion,
    Segmentation,
    Automation,
    Messaging,
    Reporting,
}

impl ServiceKind {
    pub const ALL: [ServiceKind; 6] = [
        ServiceKind::Contacts,
        ServiceKind::Ingestion,
        ServiceKind::Segmentation,
        ServiceKind::Automation,
        ServiceKind::Messaging,
        ServiceKind::Reporting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ServiceKind::Contacts => "contacts",
            ServiceKind::Ingestion => "ingestion",
            ServiceKind::Segmentation => "segmentation",
            ServiceKind::Automation => "automation",
            ServiceKind::Messaging => "messaging",
            ServiceKind::Reporting => "reporting",
        }
    }
}

impl std::fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ServiceKind {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        ServiceKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == name.trim())
            .ok_or_else(|| {
                format!(
                    "unknown service `{name}`; expected one of: {}",
                    ServiceKind::ALL.map(|k| k.as_str()).join(", ")
                )
            })
    }
}

/// gRPC port per service. Port 0 asks the OS for a free port (used by tests).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Ports {
    pub contacts: u16,
    pub ingestion: u16,
    pub segmentation: u16,
    pub automation: u16,
    pub messaging: u16,
    pub reporting: u16,
    /// Ingestion's public HTTP endpoint (tracking, forms, pixel, redirects).
    pub ingestion_http: u16,
    /// Prometheus metrics and the /livez and /readyz probes (one per process).
    pub metrics: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            contacts: 50051,
            ingestion: 50052,
            segmentation: 50053,
            automation: 50054,
            messaging: 50055,
            reporting: 50056,
            ingestion_http: 8080,
            metrics: 9464,
        }
    }
}

impl Ports {
    pub fn grpc(&self, service: ServiceKind) -> u16 {
        match service {
            ServiceKind::Contacts => self.contacts,
            ServiceKind::Ingestion => self.ingestion,
            ServiceKind::Segmentation => self.segmentation,
            ServiceKind::Automation => self.automation,
            ServiceKind::Messaging => self.messaging,
            ServiceKind::Reporting => self.reporting,
        }
    }

    pub fn set_grpc(&mut self, service: ServiceKind, port: u16) {
        match service {
            ServiceKind::Contacts => self.contacts = port,
            ServiceKind::Ingestion => self.ingestion = port,
            ServiceKind::Segmentation => self.segmentation = port,
            ServiceKind::Automation => self.automation = port,
            ServiceKind::Messaging => self.messaging = port,
            ServiceKind::Reporting => self.reporting = port,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers. Empty means the in-process bus,
    /// which is only allowed when one process runs every service.
    pub brokers: String,
    /// Attempts a consumer makes at one record before dead-lettering it.
    pub max_delivery_attempts: u32,
    /// Partitions per topic created by `rapport topics create`.
    pub partitions: i32,
    /// Replication factor per topic created by `rapport topics create`.
    pub replication_factor: i32,
    /// Prefix of every topic and consumer-group name, for deployments that
    /// share a cluster (e.g. `staging.`). Empty by default.
    pub namespace: String,
    /// How long a publish may wait for the broker's acknowledgement before
    /// the caller is told the event log is unavailable, in milliseconds.
    pub delivery_timeout_ms: u64,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: String::new(),
            max_delivery_attempts: 5,
            partitions: 12,
            replication_factor: 1,
            namespace: String::new(),
            delivery_timeout_ms: 30_000,
        }
    }
}

/// The whole configuration of one `rapport` process.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Postgres URL. A secret: never logged.
    pub database_url: Secret,
    /// Maximum connections per service pool.
    pub database_max_connections: u32,
    /// Shorthand for `kafka.brokers` (`RAPPORT_KAFKA_BROKERS`).
    pub kafka_brokers: Option<String>,
    pub kafka: KafkaConfig,
    /// Address the gRPC and HTTP listeners bind to.
    pub listen_host: String,
    pub ports: Ports,
    /// Deadline applied to every gRPC request, in milliseconds.
    pub request_timeout_ms: u64,
    /// How long a process waits for in-flight work on shutdown, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// On shutdown, how long a process keeps serving after it reports not
    /// ready, so load balancers stop routing to it first, in milliseconds.
    pub shutdown_drain_delay_ms: u64,
    pub log_format: LogFormat,
    /// A tracing-subscriber filter, e.g. `info,rapport_bus=debug`.
    pub log_level: String,
    /// OTLP/gRPC endpoint for traces (e.g. `http://localhost:4317`); unset disables export.
    pub otlp_endpoint: Option<String>,
    /// How long a verified API key stays cached before it is checked again, in milliseconds.
    pub api_key_cache_ms: u64,
    /// Shared secret services use to call each other and to sign tracking
    /// links. Unset: derived from `database_url`, which every process of one
    /// deployment shares. A secret: never logged.
    pub internal_secret: Option<Secret>,
    /// Base URL of ingestion's public HTTP endpoint, as recipients' browsers
    /// reach it; tracking pixels, links and unsubscribe URLs start with it.
    pub public_url: String,
    /// Where services reach each other's gRPC APIs. Unset entries default
    /// to `http://127.0.0.1:<port>`.
    pub endpoints: Endpoints,
    pub smtp: SmtpConfig,
    /// How often automation looks for journey steps that are due, in milliseconds.
    pub automation_poll_ms: u64,
}

/// gRPC endpoints of other services (Kubernetes: their Service DNS names).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoints {
    pub contacts: Option<String>,
    pub messaging: Option<String>,
}

/// The SMTP relay messaging delivers email through.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    /// The From address of every email, e.g. `Acme <hello@acme.example>`.
    pub from: String,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            host: "127.0.0.1".to_owned(),
            port: 25,
            from: "Rapport <noreply@rapport.localhost>".to_owned(),
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &"[redacted]")
            .field("database_max_connections", &self.database_max_connections)
            .field("kafka_brokers", &self.brokers())
            .field("kafka", &self.kafka)
            .field("listen_host", &self.listen_host)
            .field("ports", &self.ports)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("shutdown_grace_ms", &self.shutdown_grace_ms)
            .field("shutdown_drain_delay_ms", &self.shutdown_drain_delay_ms)
            .field("log_format", &self.log_format)
            .field("log_level", &self.log_level)
            .field("otlp_endpoint", &self.otlp_endpoint)
            .field("api_key_cache_ms", &self.api_key_cache_ms)
            .field("internal_secret", &self.internal_secret)
            .field("public_url", &self.public_url)
            .field("endpoints", &self.endpoints)
            .field("smtp", &self.smtp)
            .field("automation_poll_ms", &self.automation_poll_ms)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: Secret("postgres://postgres@127.0.0.1:5432/rapport".to_owned()),
            database_max_connections: 10,
            kafka_brokers: None,
            kafka: KafkaConfig::default(),
            listen_host: "0.0.0.0".to_owned(),
            ports: Ports::default(),
            request_timeout_ms: 30_000,
            shutdown_grace_ms: 20_000,
            shutdown_drain_delay_ms: 0,
            log_format: LogFormat::Json,
            log_level: "info,sqlx::postgres::notice=warn".to_owned(),
            otlp_endpoint: None,
            api_key_cache_ms: 30_000,
            internal_secret: None,
            public_url: "http://127.0.0.1:8080".to_owned(),
            endpoints: Endpoints::default(),
            smtp: SmtpConfig::default(),
            automation_poll_ms: 250,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration could not be read: {0}")]
    Load(String),
    #[error("invalid configuration: `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// `RAPPORT_*` variables read by the command line and the deploy scripts,
/// not by [`Config`].
const NON_CONFIG_VARIABLES: [&str; 4] = [
    "RAPPORT_CONFIG",
    "RAPPORT_SERVICES",
    "RAPPORT_STATE_DIR",
    "RAPPORT_LOCAL_KAFKA_PORT",
];

/// Where configuration comes from: an optional file and the environment.
/// Tests build one from a map; the binary uses [`ConfigSource::from_process`].
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
}

impl ConfigSource {
    /// The process environment's `RAPPORT_*` variables, and the file named by
    /// `file` or by `RAPPORT_CONFIG`.
    pub fn from_process(file: Option<&Path>) -> Self {
        let env: BTreeMap<String, String> = std::env::vars()
            .filter(|(name, _)| name.starts_with("RAPPORT_"))
            .collect();
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| env.get("RAPPORT_CONFIG").map(PathBuf::from));
        ConfigSource { file, env }
    }
}

impl Config {
    /// Loads and validates the configuration from `source`.
    pub fn load(source: &ConfigSource) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = &source.file {
            if !file.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        // figment's Env provider reads the process environment; feed it our
        // own map through a scoped provider instead.
        let env_pairs: Vec<(String, String)> = source
            .env
            .iter()
            .filter(|(name, _)| !NON_CONFIG_VARIABLES.contains(&name.as_str()))
            .filter_map(|(name, value)| {
                name.strip_prefix("RAPPORT_")
                    .map(|key| (key.to_ascii_lowercase().replace("__", "."), value.clone()))
            })
            .collect();
        for (key, value) in env_pairs {
            figment = figment.merge(Serialized::global(&key, env_value(&key, &value)));
        }
        let config: Config = figment
            .extract()
            .map_err(|error| ConfigError::Load(error.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The Kafka bootstrap servers, from `kafka_brokers` or `kafka.brokers`;
    /// `None` means the in-process bus.
    pub fn brokers(&self) -> Option<&str> {
        self.kafka_brokers
            .as_deref()
            .filter(|brokers| !brokers.trim().is_empty())
            .or_else(|| Some(self.kafka.brokers.as_str()).filter(|b| !b.trim().is_empty()))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }

    pub fn shutdown_drain_delay(&self) -> Duration {
        Duration::from_millis(self.shutdown_drain_delay_ms)
    }

    pub fn database_url(&self) -> &str {
        self.database_url.expose()
    }

    /// The secret services share (see `internal_secret`).
    pub fn internal_secret(&self) -> String {
        match &self.internal_secret {
            Some(secret) => secret.expose().to_owned(),
            None => format!("derived:{}", self.database_url()),
        }
    }

    /// The gRPC URL of `service` as other services call it.
    pub fn endpoint(&self, service: ServiceKind) -> String {
        let configured = match service {
            ServiceKind::Contacts => self.endpoints.contacts.clone(),
            ServiceKind::Messaging => self.endpoints.messaging.clone(),
            _ => None,
        };
        configured.unwrap_or_else(|| format!("http://127.0.0.1:{}", self.ports.grpc(service)))
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let database_url =
            url::Url::parse(self.database_url()).map_err(|error| ConfigError::Invalid {
                key: "database_url",
                reason: format!("not a URL ({error})"),
            })?;
        if !matches!(database_url.scheme(), "postgres" | "postgresql") {
            return Err(ConfigError::Invalid {
                key: "database_url",
                reason: format!(
                    "scheme must be postgres:// or postgresql://, not {}://",
                    database_url.scheme()
                ),
            });
        }
        if self.database_max_connections == 0 {
            return Err(ConfigError::Invalid {
                key: "database_max_connections",
                reason: "must be at least 1".into(),
            });
        }
        if self.request_timeout_ms == 0 {
            return Err(ConfigError::Invalid {
                key: "request_timeout_ms",
                reason: "must be greater than 0".into(),
            });
        }
        if self.kafka.delivery_timeout_ms == 0 {
            return Err(ConfigError::Invalid {
                key: "kafka.delivery_timeout_ms",
                reason: "must be greater than 0".into(),
            });
        }
        if self.kafka.max_delivery_attempts == 0 {
            return Err(ConfigError::Invalid {
                key: "kafka.max_delivery_attempts",
                reason: "must be at least 1".into(),
            });
        }
        if self.kafka.partitions < 1 || self.kafka.replication_factor < 1 {
            return Err(ConfigError::Invalid {
                key: "kafka.partitions",
                reason: "partitions and replication_factor must be at least 1".into(),
            });
        }
        let mut seen = HashSet::new();
        let mut ports: Vec<u16> = ServiceKind::ALL.map(|s| self.ports.grpc(s)).to_vec();
        ports.push(self.ports.ingestion_http);
        ports.push(self.ports.metrics);
        for port in ports.into_iter().filter(|port| *port != 0) {
            if !seen.insert(port) {
                return Err(ConfigError::Invalid {
                    key: "ports",
                    reason: format!("port {port} is assigned twice"),
                });
            }
        }
        url::Url::parse(&self.public_url).map_err(|error| ConfigError::Invalid {
            key: "public_url",
            reason: format!("not a URL ({error})"),
        })?;
        if self.shutdown_drain_delay_ms >= self.shutdown_grace_ms {
            return Err(ConfigError::Invalid {
                key: "shutdown_drain_delay_ms",
                reason: "must be shorter than shutdown_grace_ms".into(),
            });
        }
        if self.automation_poll_ms == 0 {
            return Err(ConfigError::Invalid {
                key: "automation_poll_ms",
                reason: "must be greater than 0".into(),
            });
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            url::Url::parse(endpoint).map_err(|error| ConfigError::Invalid {
                key: "otlp_endpoint",
                reason: format!("not a URL ({error})"),
            })?;
        }
        Ok(())
    }
}

/// Keys whose values are numbers; every other key takes its environment
/// value as text (so an all-digit secret or namespace stays a string).
fn is_numeric_key(key: &str) -> bool {
    key.starts_with("ports.")
        || key.ends_with("_ms")
        || matches!(
            key,
            "database_max_connections"
                | "kafka.max_delivery_attempts"
                | "kafka.partitions"
                | "kafka.replication_factor"
                | "smtp.port"
        )
}

/// An environment value typed for `key`. A number that does not parse is
/// passed as text, and extraction reports it with the key.
fn env_value(key: &str, raw: &str) -> figment::value::Value {
    use figment::value::Value;
    if is_numeric_key(key) {
        if let Ok(number) = raw.trim().parse::<u64>() {
            return Value::from(number);
        }
    }
    Value::from(raw.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(pairs: &[(&str, &str)]) -> ConfigSource {
        ConfigSource {
            file: None,
            env: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn defaults_are_valid_and_use_documented_ports() {
        let config = Config::load(&ConfigSource::default()).expect("defaults load");
        assert_eq!(config.ports.grpc(ServiceKind::Contacts), 50051);
        assert_eq!(config.ports.grpc(ServiceKind::Reporting), 50056);
        assert_eq!(config.ports.ingestion_http, 8080);
        assert_eq!(config.brokers(), None);
    }

    #[test]
    fn environment_overrides_file_and_defaults() {
        let dir = std::env::temp_dir().join(format!("rapport-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("rapport.toml");
        std::fs::write(
            &file,
            "log_level = \"debug\"\nrequest_timeout_ms = 1000\n[ports]\ncontacts = 7000\n",
        )
        .expect("write config");
        let mut source = source(&[
            ("RAPPORT_DATABASE_URL", "postgres://u@db:5432/x"),
            ("RAPPORT_KAFKA_BROKERS", "kafka:9092"),
            ("RAPPORT_PORTS__CONTACTS", "7001"),
        ]);
        source.file = Some(file);
        let config = Config::load(&source).expect("config loads");
        assert_eq!(config.database_url(), "postgres://u@db:5432/x");
        assert_eq!(config.brokers(), Some("kafka:9092"));
        assert_eq!(config.ports.contacts, 7001, "env beats file");
        assert_eq!(config.log_level, "debug", "file beats defaults");
        assert_eq!(config.request_timeout_ms, 1000);
    }

    #[test]
    fn invalid_values_are_refused_with_the_key() {
        let error = Config::load(&source(&[("RAPPORT_DATABASE_URL", "mysql://x")]))
            .expect_err("mysql refused");
        assert!(error.to_string().contains("database_url"), "{error}");

        let error = Config::load(&source(&[("RAPPORT_PORTS__INGESTION", "50051")]))
            .expect_err("duplicate port refused");
        assert!(error.to_string().contains("50051"), "{error}");

        let error = Config::load(&source(&[("RAPPORT_NO_SUCH_KEY", "1")]))
            .expect_err("unknown key refused");
        assert!(error.to_string().contains("no_such_key"), "{error}");
    }

    #[test]
    fn all_digit_strings_stay_strings() {
        let config = Config::load(&source(&[
            ("RAPPORT_INTERNAL_SECRET", "12345"),
            ("RAPPORT_KAFKA__NAMESPACE", "007"),
            ("RAPPORT_PORTS__CONTACTS", "7001"),
            ("RAPPORT_KAFKA__MAX_DELIVERY_ATTEMPTS", "3"),
        ]))
        .expect("config loads");
        assert_eq!(config.internal_secret(), "12345");
        assert_eq!(config.kafka.namespace, "007");
        assert_eq!(config.ports.contacts, 7001);
        assert_eq!(config.kafka.max_delivery_attempts, 3);
    }

    #[test]
    fn deploy_script_variables_are_not_configuration() {
        let config = Config::load(&source(&[
            ("RAPPORT_STATE_DIR", "/var/tmp/rapport"),
            ("RAPPORT_SERVICES", "contacts"),
        ]))
        .expect("script variables are ignored");
        assert_eq!(config.ports.contacts, 50051);
    }

    #[test]
    fn secrets_are_not_printed() {
        let config = Config::load(&source(&[(
            "RAPPORT_DATABASE_URL",
            "postgres://user:hunter2@db/rapport",
        )]))
        .expect("config loads");
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
    }
}
