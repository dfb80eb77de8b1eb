//! The bus contract against a real Kafka-compatible broker (tansu in CI).
//! The broker is read from `TEST_KAFKA_BROKERS`, default
//! `127.0.0.1:9092`; `deploy/local-stack.sh` starts one.

use std::sync::Arc;

use rapport_bus::SharedBus;
use rapport_bus::kafka::{KafkaBus, KafkaSettings};

async fn kafka_bus() -> SharedBus {
    let brokers = std::env::var("TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let bus = KafkaBus::connect(KafkaSettings::new(brokers)).expect("kafka client");
    rapport_bus::EventBus::ping(&bus)
        .await
        .expect("a Kafka broker answers (start one with deploy/local-stack.sh)");
    Arc::new(bus)
}

rapport_bus::bus_contract_suite!(kafka_bus);
