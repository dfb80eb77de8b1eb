//! The bus contract against the in-process implementation.

use std::sync::Arc;

use rapport_bus::SharedBus;
use rapport_bus::memory::MemoryBus;

async fn memory_bus() -> SharedBus {
    Arc::new(MemoryBus::new())
}

rapport_bus::bus_contract_suite!(memory_bus);
