//! Ferry's QMP commands: QEMU's names and semantics, plus `ferry-*` extensions.

use std::sync::Arc;
use std::time::Duration;

use migration::info::{MigrationInfo, MigrationStatus, SourceState};
use migration::options::qmp as opts;
use migration::qapi::Args;
use migration::source::Outgoing;
use migration::transport::MigrationUri;
use migration::uffd::GuestRamSupport;
use serde_json::{json, Map, Value};

use crate::app::{IncomingMode, Vmm};
use crate::machine::RunState;
use crate::qmp::{CommandTable, QmpError};
use crate::vm_adapter::MachineSource;

/// QEMU's QERR_MIGRATION_ACTIVE.
const MIGRATION_ACTIVE: &str = "There's a migration process in progress";

fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

fn qapi(e: migration::qapi::QapiError) -> QmpError {
    QmpError::generic(e.to_string())
}

fn outgoing(vmm: &Vmm) -> Option<Arc<Outgoing>> {
    vmm.outgoing.lock().ok().and_then(|o| o.clone())
}

fn migration_running(vmm: &Vmm) -> bool {
    outgoing(vmm).is_some_and(|o| o.status().is_running()) || crate::snapshot::is_running(vmm)
}

/// Builds the command table for `vmm`.
pub fn command_table(vmm: &Arc<Vmm>) -> CommandTable {
    let mut t = CommandTable::new();
    crate::snapshot::register_commands(&mut t, vmm);

    let v = vmm.clone();
    t.register_no_args("query-status", move || {
        let st = v.machine.run_state();
        Ok(json!({
            "running": st == RunState::Running,
            "singlestep": false,
            "status": st.as_str(),
        }))
    });

    let v = vmm.clone();
    t.register_no_args("stop", move || {
        match v.machine.run_state() {
            RunState::InMigrate => Ok(json!({})), // QEMU: just do not autostart; Ferry keeps it simple
            _ => v
                .machine
                .pause(RunState::Paused)
                .map(|_| json!({}))
                .map_err(generic),
        }
    });

    let v = vmm.clone();
    t.register_no_args("cont", move || match v.machine.run_state() {
        RunState::InMigrate => Err(QmpError::generic(
            "Migration is not finished yet: the guest will start when it is",
        )),
        RunState::Running => Ok(json!({})),
        _ => {
            if migration_running(&v) {
                return Err(QmpError::generic(MIGRATION_ACTIVE));
            }
            if outgoing(&v).is_some_and(|o| o.postcopy_committed()) {
                // See migration::postcopy: two running copies must never exist.
                return Err(QmpError::generic(
                    "the guest was handed over to the destination in postcopy: it cannot run here again",
                ));
            }
            v.machine.resume().map(|_| json!({})).map_err(generic)
        }
    });

    let v = vmm.clone();
    t.register_no_args("quit", move || {
        let v2 = v.clone();
        // Reply first, as QEMU does, then shut down.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            v2.events.0.emit(
                "SHUTDOWN",
                Some(json!({"guest": false, "reason": "host-qmp-quit"})),
            );
            v2.request_exit(0);
        });
        Ok(json!({}))
    });

    let v = vmm.clone();
    t.register_no_args("query-migrate-capabilities", move || {
        Ok(opts::query_capabilities_json(&v.options.caps()))
    });

    let v = vmm.clone();
    t.register("migrate-set-capabilities", move |args| {
        let host = GuestRamSupport::new(v.machine.ram());
        opts::migrate_set_capabilities(&v.options, &args, &host)
            .map(|_| json!({}))
            .map_err(generic)
    });

    let v = vmm.clone();
    t.register_no_args("ferry-query-migration-properties", move || {
        serde_json::to_value(v.props).map_err(generic)
    });

    let v = vmm.clone();
    t.register_no_args("query-migrate-parameters", move || {
        Ok(opts::query_parameters_json(&v.options.params()))
    });

    let v = vmm.clone();
    t.register("migrate-set-parameters", move |args| {
        opts::migrate_set_parameters(&v.options, &args)
            .map(|_| json!({}))
            .map_err(generic)
    });

    let v = vmm.clone();
    t.register("migrate", move |args| migrate(&v, &args));

    let v = vmm.clone();
    t.register("migrate-incoming", move |args| {
        let mut a = Args::new(&args);
        let uri = a.req_str("uri").map_err(qapi)?;
        a.finish().map_err(qapi)?;
        let mode = v
            .incoming_mode
            .lock()
            .map(|m| m.clone())
            .unwrap_or(IncomingMode::None);
        match mode {
            IncomingMode::None => Err(QmpError::generic(
                "'-incoming' was not specified on the command line",
            )),
            IncomingMode::Started => Err(QmpError::generic(
                "The incoming migration has already been started",
            )),
            IncomingMode::Defer => {
                let uri: MigrationUri = uri.parse().map_err(generic)?;
                v.start_incoming(&uri)
                    .map(|_| json!({}))
                    .map_err(QmpError::generic)
            }
        }
    });

    let v = vmm.clone();
    t.register_no_args("migrate_cancel", move || {
        if let Some(o) = outgoing(&v) {
            o.try_cancel().map_err(QmpError::generic)?;
        }
        crate::snapshot::cancel(&v);
        Ok(json!({}))
    });

    let v = vmm.clone();
    t.register_no_args("migrate-start-postcopy", move || match outgoing(&v) {
        Some(o) => o
            .start_postcopy()
            .map(|_| json!({}))
            .map_err(QmpError::generic),
        None if !v
            .options
            .caps()
            .get(migration::options::Capability::PostcopyRam) =>
        {
            Err(QmpError::generic(
                "Enable postcopy with migrate_set_capability before the start of migration",
            ))
        }
        None => Err(QmpError::generic(
            "Postcopy must be started after migration has been started",
        )),
    });

    let v = vmm.clone();
    t.register_oob("migrate-pause", move |args| {
        Args::new(&args).finish().map_err(qapi)?;
        if let Some(o) = outgoing(&v).filter(|o| o.status() == MigrationStatus::PostcopyActive) {
            return o
                .pause()
                .map(|_| json!({}))
                .map_err(|_| QmpError::generic("Failed to pause source migration"));
        }
        let incoming = v.incoming.lock().ok().and_then(|i| i.clone());
        if let Some(i) = incoming.filter(|i| i.status() == MigrationStatus::PostcopyActive) {
            return i
                .pause()
                .map(|_| json!({}))
                .map_err(|_| QmpError::generic("Failed to pause destination migration"));
        }
        Err(QmpError::generic(
            "migrate-pause is currently only supported during postcopy-active state",
        ))
    });

    let v = vmm.clone();
    t.register_oob("migrate-recover", move |args| {
        let mut a = Args::new(&args);
        let uri = a.req_str("uri").map_err(qapi)?;
        a.finish().map_err(qapi)?;
        let uri: MigrationUri = uri.parse().map_err(generic)?;
        match v.incoming.lock().ok().and_then(|i| i.clone()) {
            Some(i) => i
                .recover(&uri)
                .map(|_| json!({}))
                .map_err(QmpError::generic),
            None => Err(QmpError::generic(
                "Migrate recover can only be run when postcopy is paused.",
            )),
        }
    });

    let v = vmm.clone();
    t.register("migrate-continue", move |args| {
        let mut a = Args::new(&args);
        let state: MigrationStatus = a
            .req_enum("state", |s| s.parse::<MigrationStatus>().ok())
            .map_err(qapi)?;
        a.finish().map_err(qapi)?;
        match outgoing(&v) {
            Some(o) => o
                .migrate_continue(state)
                .map(|_| json!({}))
                .map_err(QmpError::generic),
            None => Err(QmpError::generic(format!(
                "Migration not in expected state: {}",
                MigrationStatus::None.as_str()
            ))),
        }
    });

    let v = vmm.clone();
    t.register_no_args("query-migrate", move || {
        let src = source_state(&v);
        let dest = v
            .incoming
            .lock()
            .ok()
            .and_then(|i| i.as_ref().map(|i| i.state()));
        let info = MigrationInfo::query(&src, dest.as_ref());
        let mut value = serde_json::to_value(info).map_err(generic)?;
        // Ferry's extension: per-channel multifd figures and the compression ratio (QEMU 8.1
        // reports only ram.multifd-bytes). QMP clients ignore members they do not know.
        if let (Some(report), Value::Object(map)) =
            (outgoing(&v).and_then(|o| o.multifd_report()), &mut value)
        {
            map.insert(
                "x-ferry-multifd".into(),
                serde_json::to_value(report).map_err(generic)?,
            );
        }
        // Ferry's extension: postcopy figures (destination: faults, requests, the fault
        // round trip; source: pages sent on request, pages released).
        let incoming = v.incoming.lock().ok().and_then(|i| i.clone());
        let postcopy = match incoming.and_then(|i| i.postcopy_stats()) {
            Some(stats) => Some(serde_json::to_value(stats).map_err(generic)?),
            None => outgoing(&v).and_then(|o| o.postcopy_report()),
        };
        if let (Some(p), Value::Object(map)) = (postcopy, &mut value) {
            map.insert("x-ferry-postcopy".into(), p);
        }
        // Ferry's extension: the downtime to the microsecond (local migrations take less
        // than the millisecond `downtime` can show).
        if let (Some(o), Value::Object(map)) = (outgoing(&v), &mut value) {
            if o.status() == migration::info::MigrationStatus::Completed
                && crate::snapshot::source_state(&v).is_none()
            {
                map.insert("x-ferry-downtime-us".into(), json!(o.downtime_us()));
            }
        }
        Ok(value)
    });

    let v = vmm.clone();
    t.register_no_args("ferry-query-migrate-timeline", move || {
        // The current or last outgoing migration's timeline; an empty one before any.
        let timeline = outgoing(&v).map(|o| o.timeline()).unwrap_or_default();
        serde_json::to_value(timeline).map_err(generic)
    });

    let v = vmm.clone();
    t.register("ferry-guest-verify", move |args| {
        let mut a = Args::new(&args);
        let timeout = a.opt_u64("timeout-ms").map_err(qapi)?.unwrap_or(30_000);
        a.finish().map_err(qapi)?;
        let c = v
            .machine
            .control()
            .ok_or_else(|| QmpError::generic("the guest has not started yet"))?;
        if !v.machine.is_running() {
            return Err(QmpError::generic(
                "the guest is not running: it verifies its memory itself, so resume it (cont) first",
            ));
        }
        let r = c.guest_verify(Duration::from_millis(timeout)).map_err(generic)?;
        Ok(json!({"pages-checked": r.pages_checked, "bad-pages": r.bad_pages}))
    });

    let v = vmm.clone();
    t.register_no_args("ferry-host-verify", move || {
        let c = v
            .machine
            .control()
            .ok_or_else(|| QmpError::generic("the guest has not started yet"))?;
        if v.machine.is_running() {
            return Err(QmpError::generic(
                "stop the guest first: a host-side check needs still memory",
            ));
        }
        let r = c.host_verify().map_err(generic)?;
        Ok(json!({"pages-checked": r.pages_checked, "bad-pages": r.bad_pages}))
    });

    let v = vmm.clone();
    t.register_no_args("ferry-guest-progress", move || {
        let c = v
            .machine
            .control()
            .ok_or_else(|| QmpError::generic("the guest has not started yet"))?;
        let p = c.progress().map_err(generic)?;
        // Guest-written counters: saturate rather than overflow.
        let total = p
            .iter()
            .fold(0u64, |a, x| a.saturating_add(x.pages_written));
        Ok(json!({
            "pages-written": total,
            "vcpus": p.iter().map(|x| json!({
                "generation": x.generation, "index": x.index,
                "pages-written": x.pages_written, "passes": x.passes,
            })).collect::<Vec<_>>(),
        }))
    });

    let v = vmm.clone();
    t.register("ferry-guest-set-rate", move |args| {
        let mut a = Args::new(&args);
        let rate = a.req_u64("rate").map_err(qapi)?;
        a.finish().map_err(qapi)?;
        if v.machine.memory_handed_over() {
            return Err(QmpError::generic(crate::machine::MEMORY_HANDED_OVER));
        }
        let c = v
            .machine
            .control()
            .ok_or_else(|| QmpError::generic("the guest has not started yet"))?;
        let ticks =
            crate::guest::boot::ticks_per_page(rate, v.machine.vcpus().len(), v.machine.tsc_khz());
        c.set_ticks_per_page(ticks).map_err(generic)?;
        Ok(json!({}))
    });

    let v = vmm.clone();
    t.register_no_args("ferry-memory-digest", move || {
        let ram = v.machine.ram();
        Ok(json!({
            "digest": format!("{:016x}", ram.digest()),
            "size": ram.size(),
        }))
    });

    let v = vmm.clone();
    t.register_no_args("ferry-query-config", move || {
        // What `ferry upgrade` needs to start a replacement process for this one.
        let config = v.machine.config();
        Ok(json!({
            "pid": std::process::id(),
            "executable": std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default(),
            "argv": std::env::args().skip(1).collect::<Vec<_>>(),
            "memory-size": v.machine.ram().size(),
            "memory-shared": v.machine.ram().is_shared(),
            "vcpus": config.vcpus,
            "memory-handed-over": v.machine.memory_handed_over(),
        }))
    });

    let v = vmm.clone();
    t.register_no_args("ferry-serial-tail", move || {
        Ok(json!({ "output": String::from_utf8_lossy(&v.machine.serial_tail()) }))
    });

    t
}

fn migrate(vmm: &Arc<Vmm>, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let mut a = Args::new(args);
    let uri = a.opt_str("uri").map_err(qapi)?;
    let blk = a.opt_bool("blk").map_err(qapi)?.unwrap_or(false);
    let inc = a.opt_bool("inc").map_err(qapi)?.unwrap_or(false);
    let _detach = a.opt_bool("detach").map_err(qapi)?;
    let resume = a.opt_bool("resume").map_err(qapi)?.unwrap_or(false);
    a.finish().map_err(qapi)?;
    if blk || inc {
        return Err(QmpError::generic(
            "QEMU compiled without old-style (blk/-b, inc/-i) block migration",
        ));
    }
    let uri = uri.ok_or_else(|| QmpError::generic("Parameter 'uri' is missing"))?;
    if resume {
        let uri: MigrationUri = uri.parse().map_err(generic)?;
        return match outgoing(vmm) {
            Some(o) => o.resume(uri).map(|_| json!({})).map_err(QmpError::generic),
            None => Err(QmpError::generic(
                "Cannot resume if there is no paused migration",
            )),
        };
    }
    if vmm.machine.run_state() == RunState::InMigrate {
        return Err(QmpError::generic(
            "Guest is waiting for an incoming migration",
        ));
    }
    if migration_running(vmm) {
        return Err(QmpError::generic(MIGRATION_ACTIVE));
    }
    if vmm.machine.memory_handed_over() {
        return Err(QmpError::generic(crate::machine::MEMORY_HANDED_OVER));
    }
    let uri: MigrationUri = uri.parse().map_err(generic)?;
    let caps = vmm.options.caps();
    if caps.get(migration::options::Capability::BackgroundSnapshot)
        && caps.get(migration::options::Capability::XIgnoreShared)
    {
        return Err(QmpError::generic(
            "x-ignore-shared cannot be used with background-snapshot: a snapshot must hold the memory's contents",
        ));
    }
    if caps.get(migration::options::Capability::BackgroundSnapshot) {
        return crate::snapshot::start(vmm, uri);
    }
    crate::snapshot::forget(vmm);
    let source = Arc::new(
        MachineSource::new(vmm.machine.clone(), vmm.uuid, vmm.props.store_global_state)
            .with_dirty_tracker(crate::dirty::uffd_async::tracker_for(vmm)),
    );
    let out = Outgoing::start(
        uri,
        source,
        vmm.options.clone(),
        Arc::new(vmm.events.clone()),
    )
    .map_err(generic)?;
    *vmm.outgoing
        .lock()
        .map_err(|_| QmpError::generic("lock poisoned"))? = Some(out);
    Ok(json!({}))
}

/// query-migrate's source part for a VMM (used by the CLI's progress display too).
pub fn source_state(vmm: &Vmm) -> SourceState {
    crate::snapshot::source_state(vmm)
        .unwrap_or_else(|| outgoing(vmm).map(|o| o.state()).unwrap_or_default())
}
