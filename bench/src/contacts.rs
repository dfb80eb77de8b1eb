//! `rapport-bench contacts` starts `rapport serve --services contacts` (the
//! release binary next to this one) on a fresh database and a fresh Kafka
//! namespace, then measures, with the same contacts and batch sizes:
//! - raw SQL: each batch inserted into a contacts table and an identities
//!   table shaped like the service's, with `INSERT ... SELECT * FROM UNNEST`,
//!   one transaction per batch, straight on Postgres: the ceiling;
//! - gRPC `BatchUpsertContacts`, both until the last call returns and end to
//!   end, until the service's outbox is empty (every event published);
//! - single gRPC `GetContact` latency at a fixed request rate (open loop),
//!   on contacts the upserts returned;
//!
//! and reads the contacts process's resident memory after each phase.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use rapport_proto::contacts::v1::contacts_service_client::ContactsServiceClient;
use rapport_proto::contacts::v1::{BatchUpsertContactsRequest, Contact, GetContactRequest};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::common::{self, Latency, Memory, Row, Server, authorized};

/// The service refuses larger BatchUpsertContacts calls.
const MAX_BATCH: usize = 1000;
/// At most this many contact ids are kept for the GetContact run.
const MAX_KEPT_IDS: usize = 100_000;

const FIRST_NAMES: [&str; 8] = [
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken",
];

/// The nth contact of a run: email (unique per run), first and last name.
fn person(run: &str, n: usize) -> (String, String, String) {
    (
        format!("bench-{run}-{n}@example.com"),
        FIRST_NAMES[n % FIRST_NAMES.len()].to_owned(),
        format!("Bench {n}"),
    )
}

fn contact(run: &str, n: usize) -> Contact {
    let (email, first_name, last_name) = person(run, n);
    Contact {
        email,
        first_name,
        last_name,
        ..Default::default()
    }
}

/// The contacts of batch `index`: `first..end`.
fn batch_range(index: usize, batch: usize, contacts: usize) -> std::ops::Range<usize> {
    let first = index * batch;
    first..(first + batch).min(contacts)
}

/// The ceiling: the same contacts written as plain rows, one transaction
/// per batch, into a scratch schema of the benchmark's database.
async fn raw_sql(
    pool: &PgPool,
    workspace_id: uuid::Uuid,
    run: &str,
    contacts: usize,
    batch: usize,
    concurrency: usize,
) -> anyhow::Result<Row> {
    sqlx::query("CREATE SCHEMA bench_raw").execute(pool).await?;
    sqlx::query(
        "CREATE TABLE bench_raw.contacts (
            workspace_id UUID NOT NULL,
            contact_id UUID NOT NULL,
            email TEXT NOT NULL,
            first_name TEXT NOT NULL,
            last_name TEXT NOT NULL,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            PRIMARY KEY (workspace_id, contact_id)
        )",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "CREATE TABLE bench_raw.identities (
            workspace_id UUID NOT NULL,
            kind TEXT NOT NULL,
            value TEXT NOT NULL,
            contact_id UUID NOT NULL,
            PRIMARY KEY (workspace_id, kind, value)
        )",
    )
    .execute(pool)
    .await?;
    let started = Instant::now();
    let written = futures::stream::iter(0..contacts.div_ceil(batch))
        .map(|index| async move {
            let range = batch_range(index, batch, contacts);
            let size = range.len();
            let mut contact_ids = Vec::with_capacity(size);
            let mut emails = Vec::with_capacity(size);
            let mut first_names = Vec::with_capacity(size);
            let mut last_names = Vec::with_capacity(size);
            for n in range {
                let (email, first_name, last_name) = person(run, n);
                contact_ids.push(uuid::Uuid::now_v7());
                emails.push(email);
                first_names.push(first_name);
                last_names.push(last_name);
            }
            let workspace_ids = vec![workspace_id; size];
            let kinds = vec!["email".to_owned(); size];
            let mut transaction = pool.begin().await?;
            sqlx::query(
                "INSERT INTO bench_raw.contacts (workspace_id, contact_id, email, first_name, last_name)
                 SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[])",
            )
            .bind(&workspace_ids)
            .bind(&contact_ids)
            .bind(&emails)
            .bind(&first_names)
            .bind(&last_names)
            .execute(&mut *transaction)
            .await?;
            sqlx::query(
                "INSERT INTO bench_raw.identities (workspace_id, kind, value, contact_id)
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::uuid[])",
            )
            .bind(&workspace_ids)
            .bind(&kinds)
            .bind(&emails)
            .bind(&contact_ids)
            .execute(&mut *transaction)
            .await?;
            transaction.commit().await?;
            anyhow::Ok(size)
        })
        .buffer_unordered(concurrency)
        .try_fold(0usize, |total, size| async move { Ok(total + size) })
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Row {
        name: format!("raw SQL ({batch}/transaction, {concurrency} connections)"),
        count: written,
        seconds,
        note: "contacts + identities rows".into(),
    })
}

/// Waits until the contacts service has published every event it wrote,
/// that is until its outbox is empty.
async fn wait_for_outbox(pool: &PgPool) -> anyhow::Result<()> {
    let mut smallest = i64::MAX;
    let mut last_progress = Instant::now();
    loop {
        let backlog: i64 = sqlx::query_scalar("SELECT count(*) FROM contacts.outbox")
            .fetch_one(pool)
            .await?;
        if backlog == 0 {
            return Ok(());
        }
        if backlog < smallest {
            smallest = backlog;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(60) {
            bail!("the contacts outbox has not shrunk in 60 s ({backlog} rows left)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Upserts {
    /// Until the last call returned.
    calls: Row,
    /// Until the outbox was drained as well.
    end_to_end: Row,
    /// Ids of contacts the calls returned, spread over the whole run.
    contact_ids: Vec<String>,
    first_error: Option<tonic::Status>,
}

/// Upserts `contacts` contacts with BatchUpsertContacts, `batch` per call
/// and `concurrency` calls at a time, then waits for the outbox to drain.
/// Keeps about `keep` of the returned contact ids.
#[allow(clippy::too_many_arguments)]
async fn batch_upserts(
    server: &Server,
    pool: &PgPool,
    api_key: &str,
    run: &str,
    contacts: usize,
    batch: usize,
    concurrency: usize,
    keep: usize,
) -> anyhow::Result<Upserts> {
    let client = ContactsServiceClient::connect(server.grpc.clone()).await?;
    let stride = (contacts / keep.max(1)).max(1);
    let started = Instant::now();
    let (upserted, failed_calls, first_error, contact_ids) =
        futures::stream::iter(0..contacts.div_ceil(batch))
            .map(|index| {
                let mut client = client.clone();
                async move {
                    let range = batch_range(index, batch, contacts);
                    let first = range.start;
                    let request = BatchUpsertContactsRequest {
                        request_id: format!("{run}-{index}"),
                        contacts: range.map(|n| contact(run, n)).collect(),
                        stage_cause: "bench".into(),
                    };
                    client
                        .batch_upsert_contacts(authorized(request, api_key))
                        .await
                        .map(|response| -> (usize, Vec<String>) {
                            let results = response.into_inner().results;
                            let kept = results
                                .iter()
                                .enumerate()
                                .filter(|(i, _)| (first + *i) % stride == 0)
                                .filter_map(|(_, result)| {
                                    result.contact.as_ref().map(|c| c.contact_id.clone())
                                })
                                .collect();
                            (results.len(), kept)
                        })
                }
            })
            .buffer_unordered(concurrency)
            .fold(
                (0usize, 0usize, None::<tonic::Status>, Vec::<String>::new()),
                |(mut upserted, mut failed, mut first_error, mut ids), outcome| async move {
                    match outcome {
                        Ok((count, kept)) => {
                            upserted += count;
                            ids.extend(kept);
                        }
                        Err(status) => {
                            failed += 1;
                            if first_error.is_none() {
                                first_error = Some(status);
                            }
                        }
                    }
                    (upserted, failed, first_error, ids)
                },
            )
            .await;
    let calls_seconds = started.elapsed().as_secs_f64();
    wait_for_outbox(pool).await?;
    let seconds = started.elapsed().as_secs_f64();
    let name = format!("gRPC BatchUpsertContacts ({batch}/call, {concurrency} callers)");
    Ok(Upserts {
        calls: Row {
            name: name.clone(),
            count: upserted,
            seconds: calls_seconds,
            note: format!("{failed_calls} calls failed"),
        },
        end_to_end: Row {
            name: format!("{name}, events published"),
            count: upserted,
            seconds,
            note: format!(
                "outbox drained {:.2} s after the last call",
                seconds - calls_seconds
            ),
        },
        contact_ids,
        first_error,
    })
}

async fn get_latency(
    server: &Server,
    api_key: &str,
    contact_ids: &[String],
    rate: u64,
    seconds: u64,
) -> anyhow::Result<Latency> {
    let client = ContactsServiceClient::connect(server.grpc.clone()).await?;
    common::open_loop(rate, seconds, |n| {
        let mut client = client.clone();
        let request = authorized(
            GetContactRequest {
                contact_id: contact_ids[n % contact_ids.len()].clone(),
            },
            api_key,
        );
        async move { client.get_contact(request).await.is_ok() }
    })
    .await
}

pub async fn run(
    contacts: usize,
    batch: usize,
    concurrency: usize,
    get_rate: u64,
    get_seconds: u64,
) -> anyhow::Result<()> {
    if contacts == 0 {
        bail!("--contacts must be at least 1");
    }
    if batch == 0 || batch > MAX_BATCH {
        bail!("--batch must be 1 to {MAX_BATCH}");
    }
    if concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if get_rate == 0 {
        bail!("--get-rate must be at least 1");
    }
    let brokers = std::env::var("TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let namespace = format!("bench-{}.", uuid::Uuid::new_v4().simple());
    let run = uuid::Uuid::new_v4().simple().to_string();
    let (server, workspace) = common::start("contacts", &brokers, &namespace).await?;
    let api_key = workspace.api_key.as_str();
    let workspace_id: uuid::Uuid = workspace.workspace_id.parse().context("workspace id")?;
    let options: PgConnectOptions = server.database_url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(concurrency + 1).unwrap_or(u32::MAX))
        .connect_with(options)
        .await
        .context("Postgres")?;
    let mut memory: Vec<(&str, Memory)> = vec![("started", server.memory())];

    // Warm up connections, pools and the topic's partitions.
    let warm = batch_upserts(
        &server,
        &pool,
        api_key,
        &format!("{run}-warm"),
        batch * concurrency,
        batch,
        concurrency,
        1,
    )
    .await?;
    if let Some(status) = warm.first_error {
        bail!("BatchUpsertContacts failed during warm-up: {status}");
    }
    memory.push(("warm-up", server.memory()));

    let raw = raw_sql(&pool, workspace_id, &run, contacts, batch, concurrency).await?;
    memory.push(("raw SQL", server.memory()));

    let gets = usize::try_from(get_rate.saturating_mul(get_seconds)).unwrap_or(usize::MAX);
    let upserts = batch_upserts(
        &server,
        &pool,
        api_key,
        &run,
        contacts,
        batch,
        concurrency,
        gets.clamp(1, MAX_KEPT_IDS),
    )
    .await?;
    memory.push(("BatchUpsertContacts", server.memory()));
    if upserts.contact_ids.is_empty() {
        match &upserts.first_error {
            Some(status) => bail!("no contact was upserted: {status}"),
            None => bail!("no contact was upserted"),
        }
    }

    let latency = get_latency(
        &server,
        api_key,
        &upserts.contact_ids,
        get_rate,
        get_seconds,
    )
    .await?;
    memory.push(("GetContact", server.memory()));

    println!();
    println!(
        "contacts writes ({contacts} contacts per run, {batch} per batch, {concurrency} at a time)"
    );
    common::print_rows("contacts", &[&raw, &upserts.calls, &upserts.end_to_end]);
    if let Some(status) = &upserts.first_error {
        println!("first BatchUpsertContacts error: {status}");
    }
    println!();
    println!(
        "single gRPC GetContact at {get_rate} requests/s for {get_seconds} s (open loop, {} distinct contacts)",
        upserts.contact_ids.len()
    );
    latency.print();
    println!();
    println!("contacts process resident memory, after each phase");
    println!("{:<24} {:>12} {:>12}", "phase", "current MiB", "peak MiB");
    let mib = |kib: Option<u64>| {
        kib.map(|kib| format!("{:.1}", kib as f64 / 1024.0))
            .unwrap_or_else(|| "-".into())
    };
    for (phase, Memory { current, peak }) in memory {
        println!("{:<24} {:>12} {:>12}", phase, mib(current), mib(peak));
    }
    Ok(())
}
