//! What the benchmarks share: starting one Rapport service on a fresh
//! database, authorised requests, the process's memory, open-loop latency
//! runs and the throughput table.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs `rapport ARGS` to completion.
async fn rapport(
    binary: &Path,
    env: &[(String, String)],
    args: &[&str],
) -> anyhow::Result<std::process::Output> {
    let output = Command::new(binary)
        .args(args)
        .envs(env.iter().cloned())
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

/// A running `rapport serve --services <one service>`.
pub struct Server {
    child: Child,
    /// The service's gRPC address (`http://127.0.0.1:port`).
    pub grpc: String,
    /// Ingestion's public HTTP address (`127.0.0.1:port`).
    pub http: String,
    /// The benchmark's own database.
    pub database_url: String,
}

/// Resident memory of the service process, in KiB.
#[derive(Clone, Copy)]
pub struct Memory {
    /// VmRSS.
    pub current: Option<u64>,
    /// VmHWM.
    pub peak: Option<u64>,
}

impl Server {
    /// One `kB` field of the process's /proc status ("VmHWM:", "VmRSS:").
    fn status_kib(&self, field: &str) -> Option<u64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find(|line| line.starts_with(field))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse().ok())
    }

    /// Peak resident memory (VmHWM), in KiB.
    pub fn resident_memory_kib(&self) -> Option<u64> {
        self.status_kib("VmHWM:")
    }

    pub fn memory(&self) -> Memory {
        Memory {
            current: self.status_kib("VmRSS:"),
            peak: self.resident_memory_kib(),
        }
    }
}

/// The workspace `rapport workspace create --output json` made.
#[derive(serde::Deserialize)]
pub struct Workspace {
    pub workspace_id: String,
    pub api_key: String,
    pub write_key: String,
}

/// Starts `rapport serve --services <service>` (the release binary next to
/// this one) on a fresh database and the Kafka `namespace`, with its
/// migrations applied and its topics created, and creates a workspace.
/// Returns once the service accepts gRPC connections.
pub async fn start(
    service: &str,
    brokers: &str,
    namespace: &str,
) -> anyhow::Result<(Server, Workspace)> {
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
        ("RAPPORT_DATABASE_URL".into(), database_url.clone()),
        ("RAPPORT_KAFKA_BROKERS".into(), brokers.into()),
        ("RAPPORT_KAFKA__NAMESPACE".into(), namespace.into()),
        ("RAPPORT_LISTEN_HOST".into(), "127.0.0.1".into()),
        (
            format!("RAPPORT_PORTS__{}", service.to_uppercase()),
            grpc_port.to_string(),
        ),
        (
            "RAPPORT_PORTS__INGESTION_HTTP".into(),
            http_port.to_string(),
        ),
        ("RAPPORT_PORTS__METRICS".into(), metrics_port.to_string()),
        ("RAPPORT_LOG_LEVEL".into(), "warn".into()),
        ("RAPPORT_DATABASE_MAX_CONNECTIONS".into(), "16".into()),
    ];
    rapport(&binary, &env, &["migrate", "--services", service]).await?;
    let mut server = Server {
        child: Command::new(&binary)
            .args(["serve", "--services", service])
            .envs(env.iter().cloned())
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?,
        grpc: format!("http://127.0.0.1:{grpc_port}"),
        http: format!("127.0.0.1:{http_port}"),
        database_url,
    };
    rapport(&binary, &env, &["topics", "create"]).await?;
    let created = rapport(
        &binary,
        &env,
        &["workspace", "create", "Bench", "--output", "json"],
    )
    .await?;
    let workspace: Workspace =
        serde_json::from_slice(&created.stdout).context("workspace create output")?;
    let endpoint = tonic::transport::Endpoint::from_shared(server.grpc.clone())?;
    let started = Instant::now();
    while endpoint.connect().await.is_err() {
        if let Ok(Some(status)) = server.child.try_wait() {
            bail!("rapport exited: {status}");
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{service} did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((server, workspace))
}

/// `message` with the API key in the `authorization: Bearer` metadata.
pub fn authorized<T>(message: T, api_key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {api_key}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// One line of a throughput table.
pub struct Row {
    pub name: String,
    /// Items written (events, contacts).
    pub count: usize,
    pub seconds: f64,
    pub note: String,
}

/// Prints `rows` with each one's rate as a share of the first row's.
pub fn print_rows(unit: &str, rows: &[&Row]) {
    let Some(first) = rows.first() else {
        return;
    };
    let raw_rate = first.count as f64 / first.seconds;
    let width = rows
        .iter()
        .map(|row| row.name.chars().count())
        .max()
        .unwrap_or(0)
        .max(48);
    println!(
        "{:<width$} {:>9} {:>9} {:>12} {:>8}  {}",
        "path",
        unit,
        "seconds",
        format!("{unit}/s"),
        "of raw",
        "note"
    );
    for row in rows {
        let per_second = row.count as f64 / row.seconds;
        println!(
            "{:<width$} {:>9} {:>9.2} {:>12.0} {:>7.0}%  {}",
            row.name,
            row.count,
            row.seconds,
            per_second,
            100.0 * per_second / raw_rate,
            row.note
        );
    }
}

pub struct Latency {
    pub sent: usize,
    pub failed: usize,
    pub achieved_rate: f64,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Latency {
    pub fn print(&self) {
        println!(
            "{:>8} {:>7} {:>12} {:>9} {:>9} {:>9} {:>9}",
            "sent", "failed", "achieved/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{:>8} {:>7} {:>12.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            self.sent,
            self.failed,
            self.achieved_rate,
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.max)
        );
    }
}

/// Starts `rate` calls a second for `seconds` seconds without waiting for
/// earlier ones to answer (open loop), and records the latency of those that
/// succeed. `call(n)` prepares the nth call; it is timed from its first poll,
/// on its own task, until it resolves to whether it succeeded.
pub async fn open_loop<F, C>(rate: u64, seconds: u64, mut call: F) -> anyhow::Result<Latency>
where
    F: FnMut(usize) -> C,
    C: Future<Output = bool> + Send + 'static,
{
    if rate == 0 {
        bail!("the request rate must be at least 1 per second");
    }
    let total = usize::try_from(rate * seconds).unwrap_or(usize::MAX);
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(total);
    let started = Instant::now();
    for n in 0..total {
        interval.tick().await;
        let pending = call(n);
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let ok = pending.await;
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
