//! The catalogue of Rapport's topics: the public contracts named in
//! `proto/rapport/events/v1/events.proto`. Records are keyed by contact id;
//! ingestion keys events by the user id or anonymous id before a contact is
//! known, and connectors key inbound sync records by their external id.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
    pub retention: Duration,
}

impl TopicSpec {
    pub fn new(name: impl Into<String>, partitions: i32) -> Self {
        TopicSpec {
            name: name.into(),
            partitions,
            replication_factor: 1,
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

pub const CONTACT_CHANGES: &str = "rapport.contacts.changes.v1";
pub const INGESTED_EVENTS: &str = "rapport.ingestion.events.v1";
pub const MEMBERSHIPS: &str = "rapport.segmentation.memberships.v1";
pub const JOURNEY_STEPS: &str = "rapport.automation.steps.v1";
pub const SALES_HANDOFFS: &str = "rapport.automation.handoffs.v1";
pub const MESSAGE_LIFECYCLE: &str = "rapport.messaging.lifecycle.v1";
pub const CRM_INBOUND: &str = "rapport.crm.inbound.v1";

/// One row of the topic catalogue. `consumers` are the consumers wired
/// today; ARCHITECTURE.md says which others are planned.
#[derive(Debug, Clone, Copy)]
pub struct TopicInfo {
    pub name: &'static str,
    pub payload: &'static str,
    pub producer: &'static str,
    pub consumers: &'static [&'static str],
    /// Retention in days.
    pub retention_days: u64,
}

pub const CATALOGUE: [TopicInfo; 7] = [
    TopicInfo {
        name: CONTACT_CHANGES,
        payload: "ContactChanged, ConsentRequested",
        producer: "contacts",
        consumers: &["segmentation", "reporting", "messaging", "automation"],
        retention_days: 7,
    },
    TopicInfo {
        name: INGESTED_EVENTS,
        payload: "IngestedEvent",
        producer: "ingestion",
        consumers: &["contacts", "messaging"],
        retention_days: 7,
    },
    TopicInfo {
        name: MEMBERSHIPS,
        payload: "MembershipChanged",
        producer: "segmentation",
        consumers: &["automation"],
        retention_days: 7,
    },
    TopicInfo {
        name: JOURNEY_STEPS,
        payload: "JourneyStepEvent",
        producer: "automation",
        consumers: &[],
        retention_days: 7,
    },
    TopicInfo {
        name: SALES_HANDOFFS,
        payload: "SalesHandoff",
        producer: "automation",
        consumers: &[],
        retention_days: 14,
    },
    TopicInfo {
        name: MESSAGE_LIFECYCLE,
        payload: "MessageEvent",
        producer: "messaging",
        consumers: &["reporting", "contacts"],
        retention_days: 7,
    },
    TopicInfo {
        name: CRM_INBOUND,
        payload: "InboundSync",
        producer: "sales-CRM connectors",
        consumers: &["contacts"],
        retention_days: 7,
    },
];

/// Every topic with the given partition count and replication factor, plus
/// the dead-letter topic of each (one partition, 30 days).
pub fn all_topics(partitions: i32, replication_factor: i32) -> Vec<TopicSpec> {
    let mut specs = Vec::new();
    for info in CATALOGUE {
        specs.push(TopicSpec {
            name: info.name.to_owned(),
            partitions,
            replication_factor,
            retention: Duration::from_secs(info.retention_days * 24 * 3600),
        });
        specs.push(TopicSpec {
            name: crate::dead_letter_topic(info.name),
            partitions: 1,
            replication_factor,
            retention: Duration::from_secs(30 * 24 * 3600),
        });
    }
    specs
}
