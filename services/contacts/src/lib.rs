//! The contacts service: the system of record for people.
//!
//! Owns the `contacts` Postgres schema. Every change is written together with
//! its `ContactChanged` event (transactional outbox) and published on
//! `rapport.contacts.changes.v1`, keyed by contact id.

use std::sync::Arc;

use rapport_bus::SharedBus;
use rapport_db::outbox::{self, OutboxWaker};
use rapport_grpc::{BackgroundTask, GrpcService, ServiceParts};
use rapport_proto::contacts::v1::contacts_service_server::ContactsServiceServer;
use sqlx::PgPool;

mod api;
mod store;
mod validate;

pub const SCHEMA: &str = "contacts";
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Builds the service on a pool already migrated and working in [`SCHEMA`].
pub async fn build(pool: PgPool, bus: SharedBus) -> Result<ServiceParts, rapport_bus::BusError> {
    let waker = OutboxWaker::default();
    let relay = outbox::spawn_relay(pool.clone(), bus, SCHEMA, waker.clone());
    let api = api::ContactsApi::new(Arc::new(store::Store::new(pool, waker)));
    Ok(ServiceParts {
        grpc: GrpcService {
            name: rapport_proto::service_names::CONTACTS,
            routes: tonic::service::Routes::new(ContactsServiceServer::new(api)),
        },
        background: vec![BackgroundTask::new("contacts outbox relay", move || {
            relay.shutdown()
        })],
    })
}
