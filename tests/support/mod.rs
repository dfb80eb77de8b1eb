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

/// A port nothing listens on, unique within this test process.
///
/// Ports come from a block below the kernel's ephemeral range (which starts
/// at 32768), chosen by nextest's test slot, so concurrently running tests
/// (each its own process) and outgoing connections never hand out the same
/// port twice.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const BLOCK: u16 = 60;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let slot: u16 = std::env::var("NEXTEST_TEST_GLOBAL_SLOT")
        .ok()
        .and_then(|slot| slot.parse().ok())
        .unwrap_or_else(|| u16::try_from(std::process::id() % 150).unwrap_or(0));
    let base = 20_000 + (slot % 200) * BLOCK;
    loop {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(offset < BLOCK, "test used more than {BLOCK} ports");
        let port = base + offset;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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
    /// Topic and group prefix of this platform, so concurrent tests sharing
    /// one broker never see each other's records.
    kafka_namespace: String,
    extra_env: Vec<(String, String)>,
    children: Vec<(String, Child)>,
    /// How each child was started, to start it again.
    commands: Vec<(String, Vec<String>)>,
    /// Admin (metrics and probes) port of each process.
    metrics_ports: BTreeMap<String, u16>,
    log_dir: PathBuf,
    restarts: usize,
}

/// How the services are spread over processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Every service in one `rapport serve` process.
    OneProcess,
    /// Each service in its own `rapport serve --services X` process.
    ProcessPerService,
}

impl Platform {
    fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("RAPPORT_DATABASE_URL".to_owned(), self.database_url.clone()),
            ("RAPPORT_LISTEN_HOST".to_owned(), "127.0.0.1".to_owned()),
            ("RAPPORT_LOG_FORMAT".to_owned(), "pretty".to_owned()),
            (
                "RAPPORT_LOG_LEVEL".to_owned(),
                "info,sqlx::postgres::notice=warn".to_owned(),
            ),
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
            env.push((
                "RAPPORT_KAFKA__NAMESPACE".to_owned(),
                self.kafka_namespace.clone(),
            ));
        }
        env.push(("RAPPORT_PUBLIC_URL".to_owned(), self.public_url()));
        env.extend(self.extra_env.iter().cloned());
        env
    }

    /// The URL of this platform's own database.
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// Base URL of ingestion's public HTTP endpoint.
    pub fn public_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    async fn new(brokers: Option<String>, extra_env: Vec<(String, String)>) -> Platform {
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
            kafka_namespace: format!("test-{}.", uuid::Uuid::new_v4().simple()),
            extra_env,
            children: Vec::new(),
            commands: Vec::new(),
            metrics_ports: BTreeMap::new(),
            log_dir,
            restarts: 0,
        }
    }

    fn spawn(&mut self, label: &str, args: &[&str]) {
        self.commands.push((
            label.to_owned(),
            args.iter().map(|a| (*a).to_owned()).collect(),
        ));
        self.launch(label, args);
    }

    fn log_path(&self, label: &str, extension: &str) -> PathBuf {
        let suffix = if self.restarts == 0 {
            String::new()
        } else {
            format!(".{}", self.restarts)
        };
        self.log_dir.join(format!("{label}{suffix}.{extension}"))
    }

    fn launch(&mut self, label: &str, args: &[&str]) {
        let stdout = std::fs::File::create(self.log_path(label, "out")).expect("log file");
        let stderr = std::fs::File::create(self.log_path(label, "err")).expect("log file");
        let metrics_port = *self
            .metrics_ports
            .entry(label.to_owned())
            .or_insert_with(free_port);
        let mut command = Command::new(rapport_binary());
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env())
            .env("RAPPORT_PORTS__METRICS", metrics_port.to_string())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        let child = command.spawn().expect("rapport starts");
        self.children.push((label.to_owned(), child));
    }

    /// Every service in one `rapport serve` process, on the in-process bus.
    pub async fn start_single_process() -> Platform {
        Platform::start_in_memory(Vec::new()).await
    }

    /// Every service in one process on the in-process bus, with extra environment.
    pub async fn start_in_memory(extra_env: Vec<(String, String)>) -> Platform {
        let mut platform = Platform::new(None, extra_env).await;
        platform.spawn("all", &["serve"]);
        platform.wait_until_serving().await;
        platform
    }

    /// Each service in its own `rapport serve --services X` process, over Kafka.
    pub async fn start_per_service_processes() -> Platform {
        Platform::start_on_kafka(Layout::ProcessPerService, Vec::new()).await
    }

    /// The services laid out as `layout`, over Kafka, with extra environment.
    pub async fn start_on_kafka(layout: Layout, extra_env: Vec<(String, String)>) -> Platform {
        Platform::start_on_brokers(layout, &kafka_brokers(), extra_env).await
    }

    /// The services laid out as `layout`, over the Kafka broker at `brokers`.
    pub async fn start_on_brokers(
        layout: Layout,
        brokers: &str,
        extra_env: Vec<(String, String)>,
    ) -> Platform {
        let mut platform = Platform::new(Some(brokers.to_owned()), extra_env).await;
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
        match layout {
            Layout::OneProcess => platform.spawn("all", &["serve"]),
            Layout::ProcessPerService => {
                for (service, _) in SERVICES {
                    platform.spawn(service, &["serve", "--services", service]);
                }
            }
        }
        platform.wait_until_serving().await;
        platform
    }

    /// Kills the process labelled `label` ("all", or a service name) without
    /// warning, as a crash would, and starts it again.
    pub async fn crash_and_restart(&mut self, label: &str) {
        let index = self
            .children
            .iter()
            .position(|(l, _)| l == label)
            .expect("known process");
        let (_, mut child) = self.children.remove(index);
        child.kill().await.expect("kill");
        let _ = child.wait().await;
        self.start_again(label).await;
    }

    pub fn kafka_brokers(&self) -> String {
        self.brokers.clone().unwrap_or_else(kafka_brokers)
    }

    /// Base URL of the admin endpoint of the process labelled `label`.
    pub fn admin_url(&self, label: &str) -> String {
        format!("http://127.0.0.1:{}", self.metrics_ports[label])
    }

    /// The operating-system process id of the process labelled `label`.
    pub fn pid(&self, label: &str) -> u32 {
        self.children
            .iter()
            .find(|(l, _)| l == label)
            .and_then(|(_, child)| child.id())
            .expect("running process")
    }

    /// Waits for the process labelled `label` to exit by itself.
    pub async fn wait_for_exit(
        &mut self,
        label: &str,
        limit: Duration,
    ) -> std::process::ExitStatus {
        let index = self
            .children
            .iter()
            .position(|(l, _)| l == label)
            .expect("known process");
        let (_, mut child) = self.children.remove(index);
        tokio::time::timeout(limit, child.wait())
            .await
            .unwrap_or_else(|_| panic!("{label} did not exit within {limit:?}"))
            .expect("wait")
    }

    /// Stops the process labelled `label` with SIGTERM, waits for it to
    /// exit, and starts it again.
    pub async fn stop_and_restart(&mut self, label: &str) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid(label).to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let exit = self.wait_for_exit(label, Duration::from_secs(30)).await;
        assert!(exit.success(), "{label} stopped cleanly: {exit:?}");
        self.start_again(label).await;
    }

    /// Starts the process labelled `label` again with its first arguments.
    pub async fn start_again(&mut self, label: &str) {
        let args = self
            .commands
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, args)| args.clone())
            .expect("known command");
        self.restarts += 1;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.launch(label, &args);
        self.wait_until_serving().await;
    }

    pub fn kafka_namespace(&self) -> &str {
        &self.kafka_namespace
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

    /// The last lines of every process's output, for failure messages.
    pub fn logs(&self) -> String {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.log_dir)
            .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        let mut text = String::new();
        for path in files {
            let content = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = content.lines().rev().take(60).collect();
            text.push_str(&format!("--- {} ---\n", path.display()));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
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

/// A bus on the platform's Kafka namespace, as a service or a connector
/// outside the platform would use it.
pub fn kafka_bus(platform: &Platform) -> rapport_bus::kafka::KafkaBus {
    let mut settings = rapport_bus::kafka::KafkaSettings::new(platform.kafka_brokers());
    settings.namespace = platform.kafka_namespace().to_owned();
    rapport_bus::kafka::KafkaBus::connect(settings).expect("kafka")
}

/// Publishes `payload` in an envelope of `workspace_id` from `producer` to
/// `topic`, keyed `key`.
pub async fn publish(
    platform: &Platform,
    topic: &str,
    key: &str,
    workspace_id: &str,
    producer: &str,
    payload: rapport_proto::events::v1::envelope::Payload,
) {
    let envelope = rapport_bus::envelope::new_envelope(workspace_id, producer, payload);
    kafka_bus(platform)
        .publish(rapport_bus::envelope::to_record(topic, key, &envelope))
        .await
        .expect("publish");
}

/// The fields a `google.rpc.BadRequest` in `status` names, in order.
pub fn fields_of(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .bad_request()
        .map(|bad| {
            bad.field_violations
                .iter()
                .map(|v| v.field.clone())
                .collect()
        })
        .unwrap_or_default()
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
    pub async fn start(platform: &Platform, topic: &str) -> KafkaWatcher {
        let bus = kafka_bus(platform);
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

    /// The envelopes whose record key is `key`, in arrival order.
    pub fn envelopes_for(&self, key: &str) -> Vec<Envelope> {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, envelope)| envelope.clone())
            .collect()
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

/// A real SMTP server (aiosmtpd) that writes each message it accepts to a
/// directory as an `.eml` file.
pub struct SmtpSink {
    pub port: u16,
    directory: PathBuf,
    _child: Child,
}

impl SmtpSink {
    pub async fn start() -> SmtpSink {
        let port = free_port();
        let directory =
            std::env::temp_dir().join(format!("rapport-smtp-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&directory).expect("mail dir");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/smtp_sink.py");
        let python_path =
            std::env::var("TEST_PYTHONPATH").unwrap_or_else(|_| "/var/tmp/rapport/python".into());
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(&directory)
            .arg(port.to_string())
            .env("PYTHONPATH", python_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs the SMTP server");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "SMTP server exited with {status} (is aiosmtpd installed? deploy/local-stack.sh installs it)"
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "SMTP server did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        SmtpSink {
            port,
            directory,
            _child: child,
        }
    }

    /// Raw messages received so far, oldest first.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.directory)
            .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.retain(|path| path.extension().is_some_and(|ext| ext == "eml"));
        files.sort();
        files
            .into_iter()
            .filter_map(|path| std::fs::read(path).ok())
            .collect()
    }

    /// Waits until `count` messages have arrived and returns them.
    pub async fn wait_for(&self, count: usize, platform: &Platform) -> Vec<Vec<u8>> {
        let start = Instant::now();
        loop {
            let messages = self.messages();
            if messages.len() >= count {
                return messages;
            }
            if start.elapsed() > STARTUP {
                panic!(
                    "{count} emails expected, {} arrived\n{}",
                    messages.len(),
                    platform.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A response from [`http`].
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A plain HTTP/1.1 request to a local URL (`http://127.0.0.1:port/path`),
/// as a browser or mail client would send it.
pub async fn http(
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> HttpResponse {
    let headers: Vec<(&str, &str)> = content_type
        .map(|content_type| ("Content-Type", content_type))
        .into_iter()
        .collect();
    http_with(method, url, &headers, body).await
}

/// [`http`] with any request headers.
pub async fn http_with(
    method: &str,
    url: &str,
    extra_headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (authority, path) = rest
        .split_once('/')
        .map(|(a, p)| (a, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .expect("connect");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: rapport-tests\r\n"
    );
    for (name, value) in extra_headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(request.as_bytes()).await.expect("send");
    stream.write_all(body).await.expect("send body");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(String::from_utf8_lossy(&data[..line_end]).trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = line_end + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
}

/// Polls `check` until it returns `Some`, for at most `STARTUP`.
pub async fn eventually<T, F, Fut>(what: &str, platform: &Platform, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if start.elapsed() > STARTUP {
            panic!("timed out waiting for {what}\n{}", platform.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One sample of a Prometheus exposition, as the reference parser read it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Sample {
    pub family: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Reads `<admin>/metrics` and parses it with the Prometheus reference parser.
pub async fn scrape(admin_url: &str) -> Vec<Sample> {
    use tokio::io::AsyncWriteExt;
    let response = http("GET", &format!("{admin_url}/metrics"), None, b"").await;
    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .is_some_and(|value| value.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        response.header("content-type")
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/parse_metrics.py");
    let python_path =
        std::env::var("TEST_PYTHONPATH").unwrap_or_else(|_| "/var/tmp/rapport/python".into());
    let mut parser = Command::new("python3")
        .arg(script)
        .env("PYTHONPATH", python_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut stdin = parser.stdin.take().expect("stdin");
    stdin.write_all(&response.body).await.expect("feed parser");
    drop(stdin);
    let output = parser.wait_with_output().await.expect("parser output");
    assert!(
        output.status.success(),
        "/metrics is not valid Prometheus text: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        response.text()
    );
    serde_json::from_slice(&output.stdout).expect("parser prints JSON")
}

/// The value of the sample named `name` whose labels include `labels`
/// (0 when there is none yet).
pub fn sample_value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|sample| sample.name == name)
        .filter(|sample| {
            labels
                .iter()
                .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
        })
        .map(|sample| sample.value)
        .sum()
}

/// A tansu broker of a test's own (memory storage), for tests that stop the
/// broker under the platform.
pub struct OwnBroker {
    pub port: u16,
    child: Option<Child>,
}

impl OwnBroker {
    pub async fn start() -> OwnBroker {
        let mut broker = OwnBroker {
            port: free_port(),
            child: None,
        };
        broker.restart().await;
        broker
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker (again), empty: memory storage keeps nothing.
    pub async fn restart(&mut self) {
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(std::env::var("TEST_TANSU").unwrap_or_else(|_| "tansu".into()))
            .args([
                "broker",
                "--storage-engine",
                "memory://tansu/",
                "--listener-url",
                &listener,
                "--advertised-listener-url",
                &listener,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("tansu runs (deploy/local-stack.sh installs it)");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "tansu did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
    }
}
