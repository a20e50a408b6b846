//! Where migration publishes its QMP events (MIGRATION, MIGRATION_PASS, ...).

use serde_json::Value;

/// Receives migration events; the VMM forwards them to QMP clients.
pub trait MigrationEvents: Send + Sync {
    /// Publishes event `name` with `data`.
    fn emit(&self, name: &str, data: Value);
}

/// Drops every event.
pub struct NoMigrationEvents;

impl MigrationEvents for NoMigrationEvents {
    fn emit(&self, _name: &str, _data: Value) {}
}
