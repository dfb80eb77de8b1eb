//! Rapport's benchmarks. Each prints a table a person can compare between
//! runs; results and the command that produced them go in docs/benchmarks.md.
//!
//! `rapport-bench ingestion` starts `rapport serve --services ingestion` (the
//! release binary next to this one) on a fresh database and a fresh Kafka
//! namespace, then measures, against the same broker and with the same event
//! payloads:
//! - the raw rdkafka producer rate (idempotent, acks=all): the ceiling;
//! - gRPC `Batch`, acknowledged only once Kafka has the events;
//! - HTTP `POST /v1/batch` (Segment format), likewise;
//! - single gRPC `Track` latency at a fixed request rate (open loop).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use rapport_proto::ingestion::v1::ingestion_service_client::IngestionServiceClient;
use rapport_proto::ingestion::v1::{BatchRequest, Event, TrackRequest, event};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Parser)]
#[command(name = "rapport-bench", about = "Rapport benchmarks")]
struct Cli {
    #[command(subcommand)]
    benchmark: Benchmark,
}

#[derive(Subcommand)]
enum Benchmark {
    /// Ingestion throughput (raw producer, gRPC Batch, HTTP /v1/batch) and Track latency.
    Ingestion {
        /// Events per throughput run.
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        /// Events per gRPC Batch call.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Events per HTTP /v1/batch request.
        #[arg(long, default_value_t = 100)]
        http_batch: usize,
        /// Concurrent callers.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Track requests per second in the latency run.
        #[arg(long, default_value_t = 2000)]
        rate: u64,
        /// Length of the latency run, in seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().benchmark {
        Benchmark::Ingestion {
            events,
            batch,
            http_batch,
            concurrency,
            rate,
            seconds,
        } => ingestion(events, batch, http_batch, concurrency, rate, seconds).await,
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Server {
    child: Child,
    env: Vec<(String, String)>,
    binary: std::path::PathBuf,
    grpc: String,
    http: String,
}

impl Server {
    async fn run(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let output = Command::new(&self.binary)
            .args(args)
            .envs(self.env.iter().cloned())
            .output()
            .await?;
        if !output.status.success() {
            bail!(
                "rapport {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(output)
    }

    fn resident_memory_kib(&self) -> Option<u64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find(|line| line.starts_with("VmHWM:"))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse().ok())
    }
}

async fn start_ingestion(brokers: &str, namespace: &str) -> anyhow::Result<(Server, String)> {
    let admin_url = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let database = format!("rapport_bench_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&admin_url)
        .await
        .context("Postgres")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&admin)
        .await?;
    let database_url = format!(
        "{}/{database}",
        admin_url
            .rsplit_once('/')
            .map(|(base, _)| base)
            .unwrap_or(&admin_url)
    );
    let binary = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .join("rapport");
    let (grpc_port, http_port, metrics_port) = (free_port()?, free_port()?, free_port()?);
    let env: Vec<(String, String)> = vec![
        ("RAPPORT_DATABASE_URL".into(), database_url),
        ("RAPPORT_KAFKA_BROKERS".into(), brokers.into()),
        ("RAPPORT_KAFKA__NAMESPACE".into(), namespace.into()),
        ("RAPPORT_LISTEN_HOST".into(), "127.0.0.1".into()),
        ("RAPPORT_PORTS__INGESTION".into(), grpc_port.to_string()),
        (
            "RAPPORT_PORTS__INGESTION_HTTP".into(),
            http_port.to_string(),
        ),
        ("RAPPORT_PORTS__METRICS".into(), metrics_port.to_string()),
        ("RAPPORT_LOG_LEVEL".into(), "warn".into()),
        ("RAPPORT_DATABASE_MAX_CONNECTIONS".into(), "16".into()),
    ];
    let mut server = Server {
        child: Command::new(&binary)
            .args(["serve", "--services", "ingestion"])
            .envs(env.iter().cloned())
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?,
        env,
        binary,
        grpc: format!("http://127.0.0.1:{grpc_port}"),
        http: format!("127.0.0.1:{http_port}"),
    };
    server.run(&["topics", "create"]).await?;
    let created = server
        .run(&["workspace", "create", "Bench", "--output", "json"])
        .await?;
    let keys: serde_json::Value = serde_json::from_slice(&created.stdout)?;
    let started = Instant::now();
    while IngestionServiceClient::connect(server.grpc.clone())
        .await
        .is_err()
    {
        if let Ok(Some(status)) = server.child.try_wait() {
            bail!("rapport exited: {status}");
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("ingestion did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let keys = format!(
        "{}\n{}",
        keys["api_key"].as_str().unwrap_or_default(),
        keys["write_key"].as_str().unwrap_or_default()
    );
    Ok((server, keys))
}

fn properties(n: usize) -> prost_types::Struct {
    let json = serde_json::json!({
        "plan": "pro", "revenue": 42.5, "currency": "EUR", "page": "/pricing", "n": n
    });
    let serde_json::Value::Object(map) = json else {
        return Default::default();
    };
    prost_types::Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| {
                let kind = match v {
                    serde_json::Value::String(s) => prost_types::value::Kind::StringValue(s),
                    serde_json::Value::Number(n) => {
                        prost_types::value::Kind::NumberValue(n.as_f64().unwrap_or(0.0))
                    }
                    _ => prost_types::value::Kind::NullValue(0),
                };
                (k, prost_types::Value { kind: Some(kind) })
            })
            .collect(),
    }
}

fn track(run: &str, n: usize) -> TrackRequest {
    TrackRequest {
        message_id: format!("{run}-{n}"),
        event: "Order Completed".into(),
        user_id: format!("user-{}", n % 10_000),
        properties: Some(properties(n)),
        ..Default::default()
    }
}

struct Row {
    name: String,
    events: usize,
    seconds: f64,
    note: String,
}

/// The ceiling: the same envelopes straight from an rdkafka producer.
async fn raw_producer(
    brokers: &str,
    namespace: &str,
    run: &str,
    events: usize,
) -> anyhow::Result<Row> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()?;
    let topic = format!("{namespace}{}", rapport_bus::topics::INGESTED_EVENTS);
    let records: Vec<rapport_bus::Record> = (0..events)
        .map(|n| {
            let request = track(run, n);
            let event = rapport_proto::events::v1::IngestedEvent {
                message_id: request.message_id,
                name: request.event,
                user_id: request.user_id.clone(),
                properties: request.properties,
                ..Default::default()
            };
            let envelope = rapport_bus::envelope::new_envelope(
                "00000000-0000-0000-0000-000000000000",
                "bench",
                rapport_proto::events::v1::envelope::Payload::IngestedEvent(event),
            );
            rapport_bus::envelope::to_record(
                rapport_bus::topics::INGESTED_EVENTS,
                &request.user_id,
                &envelope,
            )
        })
        .collect();
    let started = Instant::now();
    let producer = &producer;
    let topic = &topic;
    let failures = futures::stream::iter(records.iter())
        .map(|record| async move {
            producer
                .send(
                    FutureRecord::to(topic)
                        .key(record.key.as_bytes())
                        .payload(record.payload.as_slice()),
                    Timeout::After(Duration::from_secs(60)),
                )
                .await
                .is_err()
        })
        .buffer_unordered(20_000)
        .filter(|failed| futures::future::ready(*failed))
        .count()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Row {
        name: "raw rdkafka producer".into(),
        events,
        seconds,
        note: format!("{failures} failed"),
    })
}

async fn grpc_batches(
    server: &Server,
    api_key: &str,
    run: &str,
    events: usize,
    batch: usize,
    concurrency: usize,
) -> anyhow::Result<Row> {
    let client = IngestionServiceClient::connect(server.grpc.clone()).await?;
    let batches: Vec<BatchRequest> = (0..events)
        .collect::<Vec<_>>()
        .chunks(batch)
        .map(|chunk| BatchRequest {
            events: chunk
                .iter()
                .map(|n| Event {
                    event: Some(event::Event::Track(track(run, *n))),
                })
                .collect(),
        })
        .collect();
    let started = Instant::now();
    let accepted: usize = futures::stream::iter(batches)
        .map(|request| {
            let mut client = client.clone();
            async move {
                let mut request = tonic::Request::new(request);
                if let Ok(value) = format!("Bearer {api_key}").parse() {
                    request.metadata_mut().insert("authorization", value);
                }
                client
                    .batch(request)
                    .await
                    .map(|r| usize::try_from(r.into_inner().accepted).unwrap_or(0))
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(concurrency)
        .fold(0, |total, accepted| async move { total + accepted })
        .await;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Row {
        name: format!("gRPC Batch ({batch}/call, {concurrency} callers)"),
        events: accepted,
        seconds,
        note: format!("{} not accepted", events - accepted),
    })
}

/// One keep-alive HTTP/1.1 connection posting bodies and reading replies.
struct HttpConnection {
    reader: BufReader<tokio::net::TcpStream>,
    host: String,
}

impl HttpConnection {
    async fn open(host: &str) -> anyhow::Result<Self> {
        // As HTTP client libraries do (urllib3, Node's http): no Nagle delay.
        let stream = tokio::net::TcpStream::connect(host).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConnection {
            reader: BufReader::new(stream),
            host: host.to_owned(),
        })
    }

    async fn post(&mut self, path: &str, authorization: &str, body: &[u8]) -> anyhow::Result<u16> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: {authorization}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let mut request = Vec::with_capacity(head.len() + body.len());
        request.extend_from_slice(head.as_bytes());
        request.extend_from_slice(body);
        self.reader.get_mut().write_all(&request).await?;
        let mut line = String::new();
        self.reader.read_line(&mut line).await?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        loop {
            line.clear();
            self.reader.read_line(&mut line).await?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).await?;
        Ok(status)
    }
}

async fn http_batches(
    server: &Server,
    write_key: &str,
    run: &str,
    events: usize,
    batch: usize,
    concurrency: usize,
) -> anyhow::Result<Row> {
    let authorization = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"))
    );
    let bodies: Vec<Vec<u8>> = (0..events)
        .collect::<Vec<_>>()
        .chunks(batch)
        .map(|chunk| {
            let items: Vec<serde_json::Value> = chunk
                .iter()
                .map(|n| {
                    serde_json::json!({
                        "type": "track", "messageId": format!("{run}-http-{n}"), "userId": format!("user-{}", n % 10_000),
                        "event": "Order Completed",
                        "properties": {"plan": "pro", "revenue": 42.5, "currency": "EUR", "page": "/pricing", "n": n},
                        "timestamp": "2026-12-04T10:00:00.000Z"
                    })
                })
                .collect();
            serde_json::to_vec(&serde_json::json!({ "batch": items, "sentAt": "2026-12-04T10:00:00.000Z" })).unwrap_or_default()
        })
        .collect();
    let per_connection = bodies.len().div_ceil(concurrency);
    let bodies = Arc::new(bodies);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let bodies = bodies.clone();
        let host = server.http.clone();
        let authorization = authorization.clone();
        tasks.push(tokio::spawn(async move {
            let mut connection = HttpConnection::open(&host).await?;
            let mut ok = 0;
            for body in bodies
                .iter()
                .skip(worker * per_connection)
                .take(per_connection)
            {
                if connection.post("/v1/batch", &authorization, body).await? == 200 {
                    ok += 1;
                }
            }
            anyhow::Ok(ok)
        }));
    }
    let mut ok_requests = 0;
    for task in tasks {
        ok_requests += task.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let accepted = (ok_requests * batch).min(events);
    Ok(Row {
        name: format!("HTTP /v1/batch ({batch}/request, {concurrency} connections)"),
        events: accepted,
        seconds,
        note: format!("{} requests refused", bodies.len() - ok_requests),
    })
}

struct Latency {
    sent: usize,
    failed: usize,
    achieved_rate: f64,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

async fn track_latency(
    server: &Server,
    api_key: &str,
    run: &str,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<Latency> {
    let client = IngestionServiceClient::connect(server.grpc.clone()).await?;
    let total = usize::try_from(rate * seconds).unwrap_or(usize::MAX);
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(total);
    let started = Instant::now();
    for n in 0..total {
        interval.tick().await;
        let mut client = client.clone();
        let request = track(&format!("{run}-latency"), n);
        let api_key = api_key.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut request = tonic::Request::new(request);
            if let Ok(value) = format!("Bearer {api_key}").parse() {
                request.metadata_mut().insert("authorization", value);
            }
            let sent = Instant::now();
            let ok = client.track(request).await.is_ok();
            (ok, sent.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut failed = 0;
    for task in tasks {
        let (ok, latency) = task.await?;
        if ok {
            latencies.push(latency);
        } else {
            failed += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    Ok(Latency {
        sent: total,
        failed,
        achieved_rate: total as f64 / elapsed,
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: latencies.last().copied().unwrap_or_default(),
    })
}

async fn ingestion(
    events: usize,
    batch: usize,
    http_batch: usize,
    concurrency: usize,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<()> {
    let brokers = std::env::var("TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let namespace = format!("bench-{}.", uuid::Uuid::new_v4().simple());
    let run = uuid::Uuid::new_v4().simple().to_string();
    let (server, keys) = start_ingestion(&brokers, &namespace).await?;
    let (api_key, write_key) = keys.split_once('\n').context("keys")?;
    // Warm up connections, pools and the topic's partitions.
    grpc_batches(
        &server,
        api_key,
        &format!("{run}-warm"),
        batch * concurrency,
        batch,
        concurrency,
    )
    .await?;

    let raw = raw_producer(&brokers, &namespace, &run, events).await?;
    let grpc = grpc_batches(&server, api_key, &run, events, batch, concurrency).await?;
    let http = http_batches(&server, write_key, &run, events, http_batch, concurrency).await?;
    let latency = track_latency(&server, api_key, &run, rate, seconds).await?;
    let raw_rate = raw.events as f64 / raw.seconds;

    println!();
    println!("ingestion throughput ({events} events per run, acknowledged by Kafka)");
    println!(
        "{:<48} {:>9} {:>9} {:>12} {:>8}  {}",
        "path", "events", "seconds", "events/s", "of raw", "note"
    );
    for row in [&raw, &grpc, &http] {
        let per_second = row.events as f64 / row.seconds;
        println!(
            "{:<48} {:>9} {:>9.2} {:>12.0} {:>7.0}%  {}",
            row.name,
            row.events,
            row.seconds,
            per_second,
            100.0 * per_second / raw_rate,
            row.note
        );
    }
    println!();
    println!("single gRPC Track at {rate} requests/s for {seconds} s (open loop)");
    println!(
        "{:>8} {:>7} {:>12} {:>9} {:>9} {:>9} {:>9}",
        "sent", "failed", "achieved/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{:>8} {:>7} {:>12.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        latency.sent,
        latency.failed,
        latency.achieved_rate,
        ms(latency.p50),
        ms(latency.p90),
        ms(latency.p99),
        ms(latency.max)
    );
    if let Some(kib) = server.resident_memory_kib() {
        println!();
        println!(
            "ingestion process peak resident memory: {:.1} MiB",
            kib as f64 / 1024.0
        );
    }
    Ok(())
}
