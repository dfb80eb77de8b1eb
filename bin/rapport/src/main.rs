//! `rapport`: one binary for every Rapport service.
//!
//! ```text
//! rapport serve [--services contacts,segmentation,...]   run services (default: all)
//! rapport migrate [--services ...]                      apply database migrations
//! rapport topics create                                 create every Kafka topic
//! rapport workspace create NAME [--output json]         new workspace with keys
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use rapport_config::{Config, ConfigSource, ServiceKind};

mod admin;
mod serve;

#[derive(Parser)]
#[command(
    name = "rapport",
    version,
    about = "Rapport: CRM and marketing automation"
)]
struct Cli {
    /// TOML configuration file (default: $RAPPORT_CONFIG if set).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run services. Without Kafka brokers configured, every service must run
    /// in this one process (they share the in-process bus).
    Serve {
        /// Comma-separated services to run.
        #[arg(
            long,
            env = "RAPPORT_SERVICES",
            value_delimiter = ',',
            default_value = "contacts,ingestion,segmentation,automation,messaging,reporting"
        )]
        services: Vec<ServiceKind>,
    },
    /// Apply database migrations, then exit.
    Migrate {
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "contacts,ingestion,segmentation,automation,messaging,reporting"
        )]
        services: Vec<ServiceKind>,
    },
    /// Manage Kafka topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Manage workspaces.
    Workspace {
        #[command(subcommand)]
        command: WorkspaceCommand,
    },
}

#[derive(Subcommand)]
enum TopicsCommand {
    /// Create every topic (and its dead-letter topic) that does not exist yet.
    Create,
}

#[derive(Subcommand)]
enum WorkspaceCommand {
    /// Create a workspace and print its id, an API key and a write key.
    Create {
        name: String,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Issue another key for a workspace (key rotation: issue, deploy the
    /// new key, then revoke the old one).
    IssueKey {
        workspace_id: String,
        #[arg(long, value_enum, default_value_t = KeyKindArg::Api)]
        kind: KeyKindArg,
    },
    /// Revoke a key. Services stop accepting it once their key cache expires
    /// (api_key_cache_ms).
    RevokeKey { key: String },
}

#[derive(Clone, Copy, ValueEnum)]
enum KeyKindArg {
    /// An API key (rpk_...) for the gRPC API.
    Api,
    /// A write key (rwk_...) for public tracking.
    Write,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// mimalloc: the services allocate and free many small buffers per request
/// (protobuf, JSON, SQL parameters); glibc's allocator spent a quarter of
/// the contacts service's CPU consolidating them under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&ConfigSource::from_process(cli.config.as_deref())) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("rapport: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("rapport: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command, config));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rapport: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve { services } => serve::serve(config, dedupe(services)).await,
        Command::Migrate { services } => {
            serve::migrate_all(&config, &dedupe(services)).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Topics {
            command: TopicsCommand::Create,
        } => create_topics(&config).await,
        Command::Workspace {
            command: WorkspaceCommand::Create { name, output },
        } => create_workspace(&config, &name, output).await,
        Command::Workspace {
            command: WorkspaceCommand::IssueKey { workspace_id, kind },
        } => {
            let workspace_id = workspace_id
                .parse()
                .map_err(|_| anyhow::anyhow!("`{workspace_id}` is not a workspace id"))?;
            let kind = match kind {
                KeyKindArg::Api => rapport_tenancy::KeyKind::Api,
                KeyKindArg::Write => rapport_tenancy::KeyKind::Write,
            };
            let pool = serve::tenancy_pool(&config).await?;
            match rapport_tenancy::issue_key(&pool, workspace_id, kind).await {
                Ok(key) => {
                    println!("{key}");
                    Ok(())
                }
                Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("23503") => {
                    anyhow::bail!("no workspace {workspace_id}")
                }
                Err(error) => Err(error.into()),
            }
        }
        Command::Workspace {
            command: WorkspaceCommand::RevokeKey { key },
        } => {
            let pool = serve::tenancy_pool(&config).await?;
            if rapport_tenancy::revoke_key(&pool, key.trim()).await? {
                println!("revoked");
                Ok(())
            } else {
                anyhow::bail!("no active key matches")
            }
        }
    }
}

fn dedupe(mut services: Vec<ServiceKind>) -> Vec<ServiceKind> {
    services.sort();
    services.dedup();
    services
}

async fn create_topics(config: &Config) -> anyhow::Result<()> {
    use rapport_bus::EventBus;
    let Some(brokers) = config.brokers() else {
        anyhow::bail!("no Kafka brokers configured; set RAPPORT_KAFKA_BROKERS");
    };
    let mut settings = rapport_bus::kafka::KafkaSettings::new(brokers);
    settings.namespace = config.kafka.namespace.clone();
    let bus = rapport_bus::kafka::KafkaBus::connect(settings)?;
    let topics =
        rapport_bus::topics::all_topics(config.kafka.partitions, config.kafka.replication_factor);
    bus.ensure_topics(&topics).await?;
    println!(
        "{:<45} {:>10} {:>9} {:>10}",
        "TOPIC", "PARTITIONS", "REPLICAS", "RETENTION"
    );
    for topic in topics {
        println!(
            "{:<45} {:>10} {:>9} {:>9}d",
            format!("{}{}", config.kafka.namespace, topic.name),
            topic.partitions,
            topic.replication_factor,
            topic.retention.as_secs() / 86_400
        );
    }
    Ok(())
}

async fn create_workspace(config: &Config, name: &str, output: Output) -> anyhow::Result<()> {
    if name.trim().is_empty() || name.trim().chars().count() > 200 {
        anyhow::bail!("workspace name must be 1 to 200 characters");
    }
    let pool = serve::tenancy_pool(config).await?;
    let workspace = rapport_tenancy::create_workspace(&pool, name).await?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&workspace)?),
        Output::Text => {
            println!("workspace_id: {}", workspace.workspace_id);
            println!("name:         {}", workspace.name);
            println!("api_key:      {}", workspace.api_key);
            println!("write_key:    {}", workspace.write_key);
            println!();
            println!("Keep the keys: they are stored hashed and cannot be shown again.");
        }
    }
    Ok(())
}
