//! Test harness: a fresh database per test, `rapport` child processes on free
//! ports, and small gRPC and Kafka helpers.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rapport_bus::{Delivery, EventBus, Handler, HandlerError, Subscription};
use rapport_proto::events::v1::Envelope;
use tokio::process::{Child, Command};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub const ALL_SERVICE_NAMES: [&str; 6] = [
    rapport_proto::service_names::CONTACTS,
    rapport_proto::service_names::INGESTION,
    rapport_proto::service_names::SEGMENTATION,
    rapport_proto::service_names::AUTOMATION,
    rapport_proto::service_names::MESSAGING,
    rapport_proto::service_names::REPORTING,
];

const SERVICES: [(&str, &str); 6] = [
    ("contacts", rapport_proto::service_names::CONTACTS),
    ("ingestion", rapport_proto::service_names::INGESTION),
    ("segmentation", rapport_proto::service_names::SEGMENTATION),
    ("automation", rapport_proto::service_names::AUTOMATION),
    ("messaging", rapport_proto::service_names::MESSAGING),
    ("reporting", rapport_proto::service_names::REPORTING),
];

const STARTUP: Duration = Duration::from_secs(90);

pub fn rapport_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rapport"))
}

fn admin_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn kafka_brokers() -> String {
    std::env::var("TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// Creates an empty database for one test and returns its URL.
async fn fresh_database() -> String {
    let admin = admin_database_url();
    let name = format!("rapport_test_{}", uuid::Uuid::new_v4().simple());
    let pool = sqlx::PgPool::connect(&admin)
        .await
        .expect("Postgres reachable at TEST_DATABASE_URL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await
        .expect("create test database");
    pool.close().await;
    let mut url = url_without_database(&admin);
    url.push('/');
    url.push_str(&name);
    url
}

fn url_without_database(url: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("database URL has a path");
    base.to_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("free port")
}

/// The keys `rapport workspace create --output json` prints.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct WorkspaceKeys {
    pub workspace_id: String,
    pub name: String,
    pub api_key: String,
    pub write_key: String,
}

/// One or more `rapport serve` processes sharing a database.
pub struct Platform {
    database_url: String,
    ports: BTreeMap<&'static str, u16>,
    http_port: u16,
    brokers: Option<String>,
    children: Vec<(String, Child)>,
    log_dir: PathBuf,
}

impl Platform {
    fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("RAPPORT_DATABASE_URL".to_owned(), self.database_url.clone()),
            ("RAPPORT_LISTEN_HOST".to_owned(), "127.0.0.1".to_owned()),
            ("RAPPORT_LOG_FORMAT".to_owned(), "pretty".to_owned()),
            ("RAPPORT_LOG_LEVEL".to_owned(), "info".to_owned()),
            (
                "RAPPORT_PORTS__INGESTION_HTTP".to_owned(),
                self.http_port.to_string(),
            ),
            ("RAPPORT_SHUTDOWN_GRACE_MS".to_owned(), "5000".to_owned()),
        ];
        for (service, port) in &self.ports {
            env.push((
                format!("RAPPORT_PORTS__{}", service.to_uppercase()),
                port.to_string(),
            ));
        }
        if let Some(brokers) = &self.brokers {
            env.push(("RAPPORT_KAFKA_BROKERS".to_owned(), brokers.clone()));
        }
        env
    }

    async fn new(brokers: Option<String>) -> Platform {
        let database_url = fresh_database().await;
        let ports = SERVICES
            .iter()
            .map(|(service, _)| (*service, free_port()))
            .collect();
        let log_dir =
            std::env::temp_dir().join(format!("rapport-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&log_dir).expect("log dir");
        Platform {
            database_url,
            ports,
            http_port: free_port(),
            brokers,
            children: Vec::new(),
            log_dir,
        }
    }

    fn spawn(&mut self, label: &str, args: &[&str]) {
        let stdout =
            std::fs::File::create(self.log_dir.join(format!("{label}.out"))).expect("log file");
        let stderr =
            std::fs::File::create(self.log_dir.join(format!("{label}.err"))).expect("log file");
        let mut command = Command::new(rapport_binary());
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        let child = command.spawn().expect("rapport starts");
        self.children.push((label.to_owned(), child));
    }

    /// Every service in one `rapport serve` process, on the in-process bus.
    pub async fn start_single_process() -> Platform {
        let mut platform = Platform::new(None).await;
        platform.spawn("all", &["serve"]);
        platform.wait_until_serving().await;
        platform
    }

    /// Each service in its own `rapport serve --services X` process, over Kafka.
    pub async fn start_per_service_processes() -> Platform {
        let mut platform = Platform::new(Some(kafka_brokers())).await;
        let output = platform.run(&["topics", "create"]).await;
        assert!(
            output.status.success(),
            "topics create: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let output = platform.run(&["migrate"]).await;
        assert!(
            output.status.success(),
            "migrate: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        for (service, _) in SERVICES {
            platform.spawn(service, &["serve", "--services", service]);
        }
        platform.wait_until_serving().await;
        platform
    }

    pub fn kafka_brokers(&self) -> String {
        self.brokers.clone().unwrap_or_else(kafka_brokers)
    }

    /// Runs a one-shot `rapport` command against this platform's database.
    pub async fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(rapport_binary())
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env())
            .stdin(Stdio::null())
            .output()
            .await
            .expect("rapport runs")
    }

    pub async fn create_workspace(&self, name: &str) -> WorkspaceKeys {
        let output = self
            .run(&["workspace", "create", name, "--output", "json"])
            .await;
        assert!(
            output.status.success(),
            "workspace create: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("workspace create prints JSON")
    }

    /// (gRPC service name, http://127.0.0.1:port) for every service.
    pub fn grpc_addresses(&self) -> Vec<(&'static str, String)> {
        SERVICES
            .iter()
            .map(|(service, name)| (*name, format!("http://127.0.0.1:{}", self.ports[service])))
            .collect()
    }

    pub fn address_of(&self, service_name: &str) -> String {
        self.grpc_addresses()
            .into_iter()
            .find(|(name, _)| *name == service_name)
            .map(|(_, address)| address)
            .expect("known service")
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for (label, _) in &self.children {
            for extension in ["out", "err"] {
                let path = self.log_dir.join(format!("{label}.{extension}"));
                let content = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = content.lines().rev().take(40).collect();
                text.push_str(&format!("--- {label}.{extension} ---\n"));
                for line in tail.into_iter().rev() {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        text
    }

    async fn wait_until_serving(&mut self) {
        let start = Instant::now();
        for (name, address) in self.grpc_addresses() {
            loop {
                let exited = self.children.iter_mut().find_map(|(label, child)| {
                    child
                        .try_wait()
                        .ok()
                        .flatten()
                        .map(|status| format!("rapport ({label}) exited with {status}"))
                });
                if let Some(exited) = exited {
                    panic!("{exited}\n{}", self.logs());
                }
                if try_health(&address, name).await == Some(ServingStatus::Serving) {
                    break;
                }
                if start.elapsed() > STARTUP {
                    panic!("{name} not serving after {STARTUP:?}\n{}", self.logs());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.start_kill();
        }
    }
}

/// Runs `rapport` with `args` and extra environment, expecting it to exit.
pub async fn run_rapport_expecting_exit(
    args: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let run = Command::new(rapport_binary())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RAPPORT_DATABASE_URL", admin_database_url())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("rapport exits by itself")
        .expect("rapport runs")
}

async fn channel(address: &str) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Channel::from_shared(address.to_owned())
        .expect("valid address")
        .connect()
        .await
}

async fn try_health(address: &str, service: &str) -> Option<ServingStatus> {
    let mut client = HealthClient::new(channel(address).await.ok()?);
    let response = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

pub async fn health_status(address: &str, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(channel(address).await.expect("connect for health"));
    let response = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health check answers");
    ServingStatus::try_from(response.into_inner().status).expect("known status")
}

/// The service names server reflection lists at `address`.
pub async fn reflection_services(address: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let mut client =
        ServerReflectionClient::new(channel(address).await.expect("connect for reflection"));
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection answers")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("reflection stream")
        .expect("one response");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection response: {other:?}"),
    }
}

/// A request carrying `key` as its API key.
pub fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("ascii key"),
    );
    request
}

/// Reads a topic from the start and keeps the envelopes it sees.
pub struct KafkaWatcher {
    seen: Arc<Mutex<Vec<(String, Envelope)>>>,
    _consumer: rapport_bus::ConsumerHandle,
}

struct Keep(Arc<Mutex<Vec<(String, Envelope)>>>);

#[async_trait::async_trait]
impl Handler for Keep {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let envelope = rapport_bus::envelope::decode(&delivery.record)?;
        self.0
            .lock()
            .expect("lock")
            .push((delivery.record.key.clone(), envelope));
        Ok(())
    }
}

impl KafkaWatcher {
    pub async fn start(brokers: &str, topic: &str) -> KafkaWatcher {
        let bus =
            rapport_bus::kafka::KafkaBus::connect(rapport_bus::kafka::KafkaSettings::new(brokers))
                .expect("kafka");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let group = format!("test-watcher-{}", uuid::Uuid::new_v4().simple());
        let consumer = bus
            .subscribe(
                Subscription::new(group, &[topic]),
                Arc::new(Keep(seen.clone())),
            )
            .await
            .expect("subscribe");
        KafkaWatcher {
            seen,
            _consumer: consumer,
        }
    }

    pub fn count_for(&self, key: &str) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|(k, _)| k == key)
            .count()
    }

    pub async fn wait_for_contact(&self, contact_id: &str) -> Envelope {
        let start = Instant::now();
        loop {
            if let Some((_, envelope)) = self
                .seen
                .lock()
                .expect("lock")
                .iter()
                .find(|(key, _)| key == contact_id)
            {
                return envelope.clone();
            }
            assert!(
                start.elapsed() < STARTUP,
                "no event for contact {contact_id} on the topic"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
