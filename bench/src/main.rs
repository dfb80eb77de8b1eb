//! Rapport's benchmarks. Each prints a table a person can compare between
//! runs; results and the command that produced them go in docs/benchmarks.md.
//!
//! Each benchmark starts one service with `rapport serve --services <name>`
//! (the release binary next to this one) on a fresh database and a fresh
//! Kafka namespace, and reads that process's resident memory:
//! - `rapport-bench ingestion`: raw rdkafka producer, gRPC `Batch`, HTTP
//!   `POST /v1/batch`, and single `Track` latency (see ingestion.rs);
//! - `rapport-bench contacts`: raw SQL inserts, gRPC `BatchUpsertContacts`
//!   with its events published, and single `GetContact` latency (see
//!   contacts.rs).

use clap::{Parser, Subcommand};

mod common;
mod contacts;
mod ingestion;

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
    /// Contacts write throughput (raw SQL, gRPC BatchUpsertContacts with its
    /// events published) and GetContact latency.
    Contacts {
        /// Contacts per throughput run.
        #[arg(long, default_value_t = 1_000_000)]
        contacts: usize,
        /// Contacts per BatchUpsertContacts call and per raw SQL transaction
        /// (1 to 1000).
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Concurrent callers (and raw SQL connections).
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// GetContact requests per second in the latency run.
        #[arg(long, default_value_t = 1000)]
        get_rate: u64,
        /// Length of the latency run, in seconds.
        #[arg(long, default_value_t = 10)]
        get_seconds: u64,
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
        } => ingestion::run(events, batch, http_batch, concurrency, rate, seconds).await,
        Benchmark::Contacts {
            contacts,
            batch,
            concurrency,
            get_rate,
            get_seconds,
        } => contacts::run(contacts, batch, concurrency, get_rate, get_seconds).await,
    }
}
