//! Rapport's public contracts: the gRPC services and the Kafka event payloads
//! generated from `proto/`. Nothing here is hand-written except module wiring.

#![allow(clippy::all, missing_docs)]

/// Encoded `FileDescriptorSet` of every Rapport proto file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/rapport_descriptor.bin"));

pub mod common {
    pub mod v1 {
        tonic::include_proto!("rapport.common.v1");
    }
}

pub mod events {
    pub mod v1 {
        tonic::include_proto!("rapport.events.v1");
    }
}

pub mod contacts {
    pub mod v1 {
        tonic::include_proto!("rapport.contacts.v1");
    }
}

pub mod ingestion {
    pub mod v1 {
        tonic::include_proto!("rapport.ingestion.v1");
    }
}

pub mod segmentation {
    pub mod v1 {
        tonic::include_proto!("rapport.segmentation.v1");
    }
}

pub mod automation {
    pub mod v1 {
        tonic::include_proto!("rapport.automation.v1");
    }
}

pub mod messaging {
    pub mod v1 {
        tonic::include_proto!("rapport.messaging.v1");
    }
}

pub mod reporting {
    pub mod v1 {
        tonic::include_proto!("rapport.reporting.v1");
    }
}

/// Fully qualified gRPC service names, as health and reflection report them.
pub mod service_names {
    pub const CONTACTS: &str = "rapport.contacts.v1.ContactsService";
    pub const INGESTION: &str = "rapport.ingestion.v1.IngestionService";
    pub const SEGMENTATION: &str = "rapport.segmentation.v1.SegmentationService";
    pub const AUTOMATION: &str = "rapport.automation.v1.AutomationService";
    pub const MESSAGING: &str = "rapport.messaging.v1.MessagingService";
    pub const REPORTING: &str = "rapport.reporting.v1.ReportingService";
}
