//! The VMM side of background snapshots (`migrate` with the `background-snapshot`
//! capability): starting one for this machine, finding the current one for query-migrate
//! and migrate_cancel, and Ferry's own QMP commands about it.
//!
//! - `ferry-query-snapshot`: the last snapshot's figures (stall, faults and their service
//!   latency, pages saved by the writer and by the fault handler) and, once completed, the
//!   page digest of guest memory at the start instant.
//! - `ferry-memory-page-digest`: the same digest of memory as it is now (a restored guest,
//!   stopped), to compare with it.
//! - `ferry-snapshot-settings {"verify-digest": bool}`: Ferry's own settings for the next
//!   snapshots (see `migration::snapshot::SnapshotSettings`); returns them.
//!
//! The engine is `migration::snapshot`; this module only wires it to the machine and QMP.

pub mod source;

use std::sync::{Arc, Mutex, Weak};

use migration::info::SourceState;
use migration::qapi::Args;
use migration::snapshot::{page_digest, BackgroundSnapshot, SnapshotSettings};
use migration::transport::MigrationUri;
use serde_json::{json, Value};

use crate::app::Vmm;
use crate::qmp::{CommandTable, QmpError};
use source::SnapshotSource;

/// Snapshot state of one VMM.
struct Entry {
    vmm: Weak<Vmm>,
    /// The latest snapshot, while it is the latest outgoing operation (a later `migrate`
    /// without the capability forgets it).
    current: Option<Arc<BackgroundSnapshot>>,
    settings: SnapshotSettings,
}

/// Per VMM of this process (one in practice).
static VMMS: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Runs `f` on `vmm`'s entry (created when missing); drops entries of dead VMMs.
fn with_entry<T>(vmm: &Vmm, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
    let mut list = VMMS.lock().unwrap_or_else(|p| p.into_inner());
    list.retain(|e| e.vmm.strong_count() > 0);
    list.iter_mut()
        .find(|e| std::ptr::eq(e.vmm.as_ptr(), vmm))
        .map(f)
}

fn entry_mut<T>(vmm: &Arc<Vmm>, f: impl FnOnce(&mut Entry) -> T) -> T {
    let mut list = VMMS.lock().unwrap_or_else(|p| p.into_inner());
    list.retain(|e| e.vmm.strong_count() > 0);
    let at = match list
        .iter()
        .position(|e| std::ptr::eq(e.vmm.as_ptr(), &**vmm))
    {
        Some(i) => i,
        None => {
            list.push(Entry {
                vmm: Arc::downgrade(vmm),
                current: None,
                settings: SnapshotSettings::default(),
            });
            list.len() - 1
        }
    };
    f(&mut list[at])
}

/// The current (or last) snapshot of `vmm`.
pub fn current(vmm: &Vmm) -> Option<Arc<BackgroundSnapshot>> {
    with_entry(vmm, |e| e.current.clone()).flatten()
}

/// Forgets `vmm`'s last snapshot (another outgoing migration starts).
pub fn forget(vmm: &Vmm) {
    with_entry(vmm, |e| e.current = None);
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
    let settings = entry_mut(vmm, |e| e.settings);
    let source = Arc::new(SnapshotSource::new(
        vmm.machine.clone(),
        vmm.uuid,
        vmm.props.store_global_state,
    ));
    let snap = BackgroundSnapshot::start_with(
        uri,
        source,
        vmm.options.clone(),
        Arc::new(vmm.events.clone()),
        settings,
    )
    .map_err(|e| QmpError::generic(e.to_string()))?;
    entry_mut(vmm, |e| e.current = Some(snap));
    Ok(json!({}))
}

/// Registers `ferry-query-snapshot`, `ferry-memory-page-digest` and `ferry-snapshot-settings`.
pub fn register_commands(t: &mut CommandTable, vmm: &Arc<Vmm>) {
    let v = vmm.clone();
    t.register("ferry-snapshot-settings", move |args| {
        let mut a = Args::new(&args);
        let verify = a
            .opt_bool("verify-digest")
            .map_err(|e| QmpError::generic(e.to_string()))?;
        a.finish().map_err(|e| QmpError::generic(e.to_string()))?;
        let settings = entry_mut(&v, |e| {
            if let Some(x) = verify {
                e.settings.verify_digest = x;
            }
            e.settings
        });
        serde_json::to_value(settings).map_err(|e| QmpError::generic(e.to_string()))
    });
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
