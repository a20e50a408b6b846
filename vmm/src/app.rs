//! A running Ferry VMM: the machine, its migration settings and state, and how it ends.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use migration::dest::Incoming;
use migration::events::MigrationEvents;
use migration::options::MigrationOptions;
use migration::source::Outgoing;
use migration::transport::MigrationUri;
use serde_json::Value;

use crate::incoming_populate::IncomingPopulate;
use crate::machine::{EventSink, Machine};
use crate::qmp::EventBus;
use crate::vm_adapter::MachineDest;

/// Forwards machine and migration events to QMP clients.
#[derive(Clone)]
pub struct QmpEvents(pub EventBus);

impl EventSink for QmpEvents {
    fn emit(&self, name: &str, data: Value) {
        let data = match data {
            Value::Object(m) if m.is_empty() => None,
            other => Some(other),
        };
        self.0.emit(name, data);
    }
}

impl MigrationEvents for QmpEvents {
    fn emit(&self, name: &str, data: Value) {
        EventSink::emit(self, name, data);
    }
}

/// How this process waits for an incoming migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncomingMode {
    /// Not an incoming VM.
    None,
    /// `--incoming defer`: waits for QMP `migrate-incoming`.
    Defer,
    /// Listening (or done).
    Started,
}

/// The VMM.
pub struct Vmm {
    /// The machine.
    pub machine: Arc<Machine>,
    /// Migration capabilities and parameters.
    pub options: Arc<MigrationOptions>,
    /// The migration object's pseudo-properties (`-global migration.*`).
    pub props: migration::options::Properties,
    /// QMP events.
    pub events: QmpEvents,
    /// The VM's UUID (QEMU's -uuid; all zeros by default, as in QEMU).
    pub uuid: [u8; 16],
    /// Start the guest after an incoming migration (false with `-S`/`--paused`).
    pub autostart: bool,
    /// The current or last outgoing migration.
    pub outgoing: Mutex<Option<Arc<Outgoing>>>,
    /// The incoming migration.
    pub incoming: Mutex<Option<Arc<Incoming>>>,
    /// Incoming state.
    pub incoming_mode: Mutex<IncomingMode>,
    exit: Mutex<Option<i32>>,
    exit_cond: Condvar,
    exit_code: AtomicI32,
}

impl Vmm {
    /// A VMM around `machine`.
    pub fn new(
        machine: Arc<Machine>,
        options: Arc<MigrationOptions>,
        props: migration::options::Properties,
        events: QmpEvents,
        uuid: [u8; 16],
        autostart: bool,
        incoming_mode: IncomingMode,
    ) -> Arc<Vmm> {
        Arc::new(Vmm {
            machine,
            options,
            props,
            events,
            uuid,
            autostart,
            outgoing: Mutex::new(None),
            incoming: Mutex::new(None),
            incoming_mode: Mutex::new(incoming_mode),
            exit: Mutex::new(None),
            exit_cond: Condvar::new(),
            exit_code: AtomicI32::new(0),
        })
    }

    /// Asks the process to exit with `code`.
    pub fn request_exit(&self, code: i32) {
        self.exit_code.store(code, Ordering::Release);
        if let Ok(mut e) = self.exit.lock() {
            e.get_or_insert(code);
        }
        self.exit_cond.notify_all();
    }

    /// Blocks until [`Vmm::request_exit`] or `poll` returns Some; returns the exit code.
    pub fn wait_exit(&self, poll: impl Fn() -> Option<i32>) -> i32 {
        let code = self.wait_exit_code(poll);
        // Threads blocked on pages a postcopy migration never delivered must not hold up
        // the exit.
        if let Some(i) = self.incoming.lock().ok().and_then(|i| i.clone()) {
            i.abandon_postcopy();
        }
        code
    }

    fn wait_exit_code(&self, poll: impl Fn() -> Option<i32>) -> i32 {
        let mut e = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(code) = *e {
                return code;
            }
            if let Some(code) = poll() {
                return code;
            }
            e = self
                .exit_cond
                .wait_timeout(e, std::time::Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Starts listening for an incoming migration on `uri`.
    pub fn start_incoming(self: &Arc<Self>, uri: &MigrationUri) -> Result<(), String> {
        self.options.set_incoming(true);
        let me = self.clone();
        let fresh = !matches!(
            self.machine.config().memory.backend,
            ram::Backend::File { .. }
        );
        // A local migration (x-ignore-shared) maps the source's memory: nothing to populate.
        let local = self
            .options
            .caps()
            .get(migration::options::Capability::XIgnoreShared);
        let populate = if fresh && !local && !self.machine.config().memory.prealloc {
            populate_threads(std::env::var(POPULATE_ENV).ok().as_deref()).map(|threads| {
                Arc::new(IncomingPopulate::start(self.machine.ram().clone(), threads))
            })
        } else {
            None
        };
        let dest = Arc::new(
            MachineDest::new(self.machine.clone(), self.uuid, self.autostart)
                .with_populate(populate.clone())
                .with_decompress_error_check(self.props.decompress_error_check),
        );
        let incoming = Incoming::start_with_hooks(
            uri,
            dest.clone(),
            self.options.clone(),
            Arc::new(self.events.clone()),
            fresh,
            Box::new(move |result| {
                if let Some(p) = &populate {
                    p.report();
                }
                me.options.set_incoming(false);
                match result {
                    Ok(()) => {}
                    Err(e) => {
                        // As QEMU does: an incoming migration that fails ends the process,
                        // and no guest ever runs here.
                        eprintln!("ferry: load of migration failed: {e}");
                        me.request_exit(1);
                    }
                }
            }),
            dest,
        )
        .map_err(|e| e.to_string())?;
        if let Some(port) = incoming.port() {
            eprintln!("ferry: waiting for an incoming migration on port {port}");
        }
        *self
            .incoming
            .lock()
            .map_err(|_| "lock poisoned".to_string())? = Some(incoming);
        *self
            .incoming_mode
            .lock()
            .map_err(|_| "lock poisoned".to_string())? = IncomingMode::Started;
        Ok(())
    }
}

/// Environment variable that tunes populating an incoming guest's memory ahead of the
/// receiver: `off`, `on` (the default: one thread per CPU but the receiver's, at least 1 and
/// at most 8) or a thread count.
pub const POPULATE_ENV: &str = "FERRY_INCOMING_POPULATE";

/// Threads for the incoming populate, from [`POPULATE_ENV`]; None when it is off.
fn populate_threads(setting: Option<&str>) -> Option<usize> {
    match setting.map(str::trim) {
        None | Some("" | "on") => Some(ram::guest_ram::threads_for_incoming_populate()),
        Some("off" | "0") => None,
        Some(n) => Some(n.parse::<usize>().map_or_else(
            |_| ram::guest_ram::threads_for_incoming_populate(),
            |n| n.clamp(1, 64),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn populate_setting_turns_off_or_counts_threads() {
        assert!(populate_threads(Some("off")).is_none());
        assert!(populate_threads(Some("0")).is_none());
        assert_eq!(populate_threads(Some("3")), Some(3));
        assert_eq!(populate_threads(Some("1000")), Some(64));
        assert!(populate_threads(None).is_some_and(|n| n >= 1));
        assert!(populate_threads(Some("on")).is_some_and(|n| n >= 1));
        assert!(
            populate_threads(Some("lots")).is_some_and(|n| n >= 1),
            "nonsense keeps the default"
        );
    }
}
