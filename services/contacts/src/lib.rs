//! The contacts service: the system of record for people.
//!
//! Owns the `contacts` Postgres schema. Every change is written together with
//! its `ContactChanged` event (transactional outbox) and published on
//! `rapport.contacts.changes.v1`, keyed by contact id.

use std::sync::Arc;

use rapport_bus::{SharedBus, Subscription, topics};
use rapport_config::Config;
use rapport_db::outbox::{self, OutboxWaker};
use rapport_grpc::{BackgroundTask, GrpcService, ServiceParts};
use rapport_proto::contacts::v1::contacts_service_server::ContactsServiceServer;
use sqlx::PgPool;

mod api;
mod commerce;
mod consent;
mod crm;
mod fields;
mod import;
mod intake;
mod notes;
mod privacy;
mod store;
mod timeline;
mod validate;
mod write;

pub const SCHEMA: &str = "contacts";
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub const CONSUMER_GROUP: &str = "rapport-contacts";
/// The CRM sync consumer has a group of its own, so a backlog of activity
/// never delays a connector's changes, or the other way round.
pub const CRM_CONSUMER_GROUP: &str = "rapport-contacts-crm";

/// Builds the service on a pool already migrated and working in [`SCHEMA`].
pub async fn build(
    pool: PgPool,
    bus: SharedBus,
    config: &Config,
) -> Result<ServiceParts, rapport_bus::BusError> {
    let waker = OutboxWaker::default();
    let relay = outbox::spawn_relay(pool.clone(), bus.clone(), SCHEMA, waker.clone());
    let store = Arc::new(store::Store::new(pool, waker));
    let consumer = bus
        .subscribe(
            Subscription::new(
                CONSUMER_GROUP,
                &[topics::INGESTED_EVENTS, topics::MESSAGE_LIFECYCLE],
            )
            .with_max_attempts(config.kafka.max_delivery_attempts),
            Arc::new(intake::IngestedEventHandler {
                store: store.clone(),
            }),
        )
        .await?;
    let crm = bus
        .subscribe(
            Subscription::new(CRM_CONSUMER_GROUP, &[topics::CRM_INBOUND])
                .with_max_attempts(config.kafka.max_delivery_attempts),
            Arc::new(crm::CrmHandler {
                store: store.clone(),
            }),
        )
        .await?;
    let api = api::ContactsApi::new(store);
    Ok(ServiceParts {
        grpc: GrpcService {
            name: rapport_proto::service_names::CONTACTS,
            routes: tonic::service::Routes::new(ContactsServiceServer::new(api)),
        },
        background: vec![
            BackgroundTask::new("contacts event consumer", move || consumer.shutdown()),
            BackgroundTask::new("contacts CRM sync consumer", move || crm.shutdown()),
            BackgroundTask::flush("contacts outbox relay", move || relay.shutdown()),
        ],
    })
}
