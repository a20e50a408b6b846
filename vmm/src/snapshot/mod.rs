//! The VMM side of background snapshots (`migrate` with the `background-snapshot`
//! capability): starting one for this machine, finding the current one for query-migrate
//! and migrate_cancel, and Ferry's own QMP commands about it.
//!
//! - `ferry-query-snapshot`: the last snapshot's figures (stall, faults and their service
//!   latency, pages saved by the writer and by the fault handler) and, once completed, the
//!   page digest of guest memory at the start instant.
//! - `ferry-memory-page-digest`: the same digest of memory as it is now (a restored guest,
//!   stopped), to compare with it.
//!
//! The engine is `migration::snapshot`; this module only wires it to the machine and QMP.

pub mod source;

use std::sync::{Arc, Mutex, Weak};

use migration::info::SourceState;
use migration::snapshot::{page_digest, BackgroundSnapshot};
use migration::transport::MigrationUri;
use serde_json::{json, Value};

use crate::app::Vmm;
use crate::qmp::{CommandTable, QmpError};
use source::SnapshotSource;

/// The latest snapshot of each VMM in this process (one in practice), while it is the
/// latest outgoing operation (a later `migrate` without the capability forgets it).
static CURRENT: Mutex<Vec<(Weak<Vmm>, Arc<BackgroundSnapshot>)>> = Mutex::new(Vec::new());

fn is_vmm(entry: &Weak<Vmm>, vmm: &Vmm) -> bool {
    entry.strong_count() > 0 && std::ptr::eq(entry.as_ptr(), vmm)
}

/// The current (or last) snapshot of `vmm`.
pub fn current(vmm: &Vmm) -> Option<Arc<BackgroundSnapshot>> {
    let list = CURRENT.lock().unwrap_or_else(|p| p.into_inner());
    list.iter()
        .find(|(w, _)| is_vmm(w, vmm))
        .map(|(_, s)| s.clone())
}

/// Forgets `vmm`'s last snapshot (another outgoing migration starts).
pub fn forget(vmm: &Vmm) {
    let mut list = CURRENT.lock().unwrap_or_else(|p| p.into_inner());
    list.retain(|(w, _)| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), vmm));
}

/// Whether a snapshot of `vmm` is in progress.
pub fn is_running(vmm: &Vmm) -> bool {
    current(vmm).is_some_and(|s| s.status().is_running())
}

/// query-migrate's source part while a snapshot is the latest outgoing operation.
pub fn source_state(vmm: &Vmm) -> Option<SourceState> {
    current(vmm).map(|s| s.state())
}

/// migrate_cancel for a running snapshot.
pub fn cancel(vmm: &Vmm) {
    if let Some(s) = current(vmm) {
        s.cancel();
    }
}

/// Starts a background snapshot of `vmm`'s machine to `uri` (a `file:` URI).
pub fn start(vmm: &Arc<Vmm>, uri: MigrationUri) -> Result<Value, QmpError> {
    let source = Arc::new(SnapshotSource::new(
        vmm.machine.clone(),
        vmm.uuid,
        vmm.props.store_global_state,
    ));
    let snap = BackgroundSnapshot::start(
        uri,
        source,
        vmm.options.clone(),
        Arc::new(vmm.events.clone()),
    )
    .map_err(|e| QmpError::generic(e.to_string()))?;
    forget(vmm);
    CURRENT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((Arc::downgrade(vmm), snap));
    Ok(json!({}))
}

/// Registers `ferry-query-snapshot` and `ferry-memory-page-digest`.
pub fn register_commands(t: &mut CommandTable, vmm: &Arc<Vmm>) {
    let v = vmm.clone();
    t.register_no_args("ferry-query-snapshot", move || match current(&v) {
        Some(s) => serde_json::to_value(s.report()).map_err(|e| QmpError::generic(e.to_string())),
        None => Err(QmpError::generic("no background snapshot has been taken")),
    });
    let v = vmm.clone();
    t.register_no_args("ferry-memory-page-digest", move || {
        let ram = v.machine.ram();
        Ok(json!({
            "digest": format!("{:016x}", page_digest(ram)),
            "size": ram.size(),
        }))
    });
}
