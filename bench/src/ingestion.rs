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

use base64::Engine;
use futures::StreamExt;
use rapport_proto::ingestion::v1::ingestion_service_client::IngestionServiceClient;
use rapport_proto::ingestion::v1::{BatchRequest, Event, TrackRequest, event};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::common::{self, Latency, Row, Server, authorized};

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
        count: events,
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
                client
                    .batch(authorized(request, api_key))
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
        count: accepted,
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
        count: accepted,
        seconds,
        note: format!("{} requests refused", bodies.len() - ok_requests),
    })
}

async fn track_latency(
    server: &Server,
    api_key: &str,
    run: &str,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<Latency> {
    let client = IngestionServiceClient::connect(server.grpc.clone()).await?;
    let run = format!("{run}-latency");
    common::open_loop(rate, seconds, |n| {
        let mut client = client.clone();
        let request = authorized(track(&run, n), api_key);
        async move { client.track(request).await.is_ok() }
    })
    .await
}

pub async fn run(
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
    let (server, workspace) = common::start("ingestion", &brokers, &namespace).await?;
    let (api_key, write_key) = (workspace.api_key.as_str(), workspace.write_key.as_str());
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

    println!();
    println!("ingestion throughput ({events} events per run, acknowledged by Kafka)");
    common::print_rows("events", &[&raw, &grpc, &http]);
    println!();
    println!("single gRPC Track at {rate} requests/s for {seconds} s (open loop)");
    latency.print();
    if let Some(kib) = server.resident_memory_kib() {
        println!();
        println!(
            "ingestion process peak resident memory: {:.1} MiB",
            kib as f64 / 1024.0
        );
    }
    Ok(())
}
