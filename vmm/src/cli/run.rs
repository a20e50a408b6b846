//! `ferry run`: boot the test guest (or wait for an incoming migration) and serve QMP.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;
use devices::SerialOutput;
use migration::options::{apply_global_arg, GlobalSettings, MigrationOptions};
use migration::transport::MigrationUri;
use migration::uffd::GuestRamSupport;
use ram::MemoryConfig;

use crate::app::{IncomingMode, QmpEvents, Vmm};
use crate::commands::command_table;
use crate::guest::layout::GuestLayout;
use crate::kvm::vm::{DirtyMode, VmOptions};
use crate::machine::{Machine, MachineConfig, Workload};
use crate::qmp::{EventBus, QmpServer, ServerConfig};

/// Arguments of `ferry run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest memory: SIZE[,backend=memfd|anon|file][,mem-path=FILE][,share=on|off][,prealloc=on][,hugepages=thp|hugetlb]
    /// (a bare number is MiB, as with QEMU's -m).
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: usize,
    /// The test guest's workload: working-set=SIZE,rate=PAGES_PER_SEC[,pattern=full|sparse]
    /// (rate 0 = as fast as possible; sparse rewrites one word per page after the first pass).
    /// Default: a working set of half the memory (at most 256 MiB) at 10000 pages/s.
    #[arg(long)]
    pub workload: Option<String>,
    /// Serve QMP on this unix socket (created with mode 0600).
    #[arg(long)]
    pub qmp: Option<PathBuf>,
    /// Wait for an incoming migration: tcp:HOST:PORT, unix:PATH, file:PATH, or defer
    /// (then QMP migrate-incoming).
    #[arg(long)]
    pub incoming: Option<String>,
    /// Resume the guest saved in a snapshot file (written by `migrate` with the
    /// background-snapshot capability): the same as `--incoming file:PATH`.
    #[arg(long, value_name = "PATH", conflicts_with = "incoming")]
    pub restore: Option<PathBuf>,
    /// Where the guest's serial console goes: stdout, file:PATH or none.
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// The VM's UUID (checked by the destination with the validate-uuid capability).
    #[arg(long)]
    pub uuid: Option<String>,
    /// Do not start the guest (after boot, or after an incoming migration) until QMP cont.
    #[arg(short = 'S', long = "paused")]
    pub paused: bool,
    /// Do not create KVM's in-kernel irqchip.
    #[arg(long)]
    pub no_irqchip: bool,
    /// How migrations find dirty pages: `bitmap` (KVM's dirty log, with manual protect when
    /// offered), `ring[:ENTRIES]` (KVM's per-vCPU dirty ring, default 4096 entries) or
    /// `uffd-async` (userfaultfd WP_ASYNC + PAGEMAP_SCAN, Linux 6.7+; see `ferry probe`).
    #[arg(long, default_value = "bitmap")]
    pub dirty_tracking: String,
    /// A QEMU migration property, as with QEMU's -global (repeatable), e.g.
    /// `migration.x-multifd=on`, `migration.x-max-bandwidth=64M`, `migration.x-clear-bitmap-shift=14`.
    #[arg(long = "global", value_name = "migration.NAME=VALUE")]
    pub globals: Vec<String>,
    /// An object, as with QEMU's -object (repeatable):
    /// `tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off]`
    /// (DIR holds ca-cert.pem and server-cert.pem/server-key.pem or client-cert.pem/client-key.pem),
    /// `authz-simple,id=ID,identity=DN`, or
    /// `authz-list,id=ID[,policy=allow|deny],rules.N.match=DN[,rules.N.policy=allow|deny][,rules.N.format=exact|glob]`.
    #[arg(long = "object", value_name = "TYPE,id=ID,...")]
    pub objects: Vec<String>,
    /// Seconds a migration socket may make no progress (a blocked write, unacknowledged data,
    /// a silent peer, a destination that does not confirm the switchover) before the
    /// migration fails instead of hanging.
    #[arg(long, default_value_t = 30.0)]
    pub migration_io_timeout: f64,
}

fn parse_dirty_tracking(text: &str) -> Result<DirtyMode, String> {
    match text.split_once(':') {
        None if text == "bitmap" => Ok(DirtyMode::Bitmap),
        None if text == "ring" => Ok(DirtyMode::Ring(4096)),
        None if text == "uffd-async" => Ok(DirtyMode::Bitmap), // KVM's side: see run()
        Some(("ring", n)) => n
            .parse::<u32>()
            .ok()
            .filter(|n| n.is_power_of_two() && *n >= 64)
            .map(DirtyMode::Ring)
            .ok_or_else(|| {
                format!("ring size '{n}' must be a power of two of at least 64 entries")
            }),
        _ => Err(format!(
            "'{text}' is not bitmap, ring[:ENTRIES] or uffd-async"
        )),
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_sig: libc::c_int) {
    STOP.store(true, Ordering::Release);
}

fn install_term_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_term as *const () as libc::sighandler_t);
        }
    }
}

/// What `ferry run` builds from its arguments.
struct Built {
    config: MachineConfig,
    incoming: Option<String>,
    uuid: [u8; 16],
    globals: GlobalSettings,
}

fn build(a: &RunArgs) -> Result<Built, String> {
    for o in &a.objects {
        crate::cli::objects::add_object(o)?;
    }
    if !(a.migration_io_timeout >= 0.1 && a.migration_io_timeout <= 86400.0) {
        return Err("--migration-io-timeout must be between 0.1 and 86400 seconds".into());
    }
    migration::transport::set_io_timeout(std::time::Duration::from_secs_f64(
        a.migration_io_timeout,
    ));
    let mut globals = GlobalSettings::default();
    for g in &a.globals {
        apply_global_arg(&mut globals, g)?;
    }
    let (clear_shift, warning) = globals.props.effective_clear_bitmap_shift();
    if let Some(w) = warning {
        eprintln!("ferry: warning: {w}");
    }
    let memory: MemoryConfig = a.memory.parse().map_err(|e| format!("--memory: {e}"))?;
    let max_ws = GuestLayout::max_ws_pages(memory.size) * 4096;
    let default_ws = (memory.size / 2).min(256 << 20).min(max_ws);
    let workload = Workload::parse(
        a.workload.as_deref().unwrap_or(""),
        Workload {
            working_set: default_ws,
            rate: 10_000,
            pattern: devices::guest_abi::Pattern::Full,
        },
    )
    .map_err(|e| format!("--workload: {e}"))?;
    if workload.working_set > max_ws {
        return Err(format!(
            "--workload: a working set of {} MiB does not fit in {} MiB of memory (at most {} MiB)",
            workload.working_set >> 20,
            memory.size >> 20,
            max_ws >> 20
        ));
    }
    if a.vcpus == 0 || a.vcpus > crate::guest::layout::MAX_VCPUS {
        return Err(format!(
            "--vcpus must be between 1 and {}",
            crate::guest::layout::MAX_VCPUS
        ));
    }
    let serial: SerialOutput = a.serial.parse().map_err(|e| format!("--serial: {e}"))?;
    let uuid = match &a.uuid {
        None => [0u8; 16],
        Some(u) => *uuid::Uuid::parse_str(u)
            .map_err(|e| format!("--uuid: {e}"))?
            .as_bytes(),
    };
    Ok(Built {
        config: MachineConfig {
            memory,
            vcpus: a.vcpus,
            workload,
            serial,
            vm: VmOptions {
                irqchip: !a.no_irqchip,
                dirty: parse_dirty_tracking(&a.dirty_tracking)
                    .map_err(|e| format!("--dirty-tracking: {e}"))?,
                clear_shift: u32::from(clear_shift),
            },
        },
        incoming: a
            .incoming
            .clone()
            .or_else(|| a.restore.as_ref().map(|p| format!("file:{}", p.display()))),
        uuid,
        globals,
    })
}

/// Runs `ferry run`; returns the exit code.
pub fn run(a: RunArgs) -> i32 {
    let Built {
        config,
        incoming,
        uuid,
        globals,
    } = match build(&a) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("ferry: {e}");
            return 2;
        }
    };
    let incoming_uri = match incoming.as_deref() {
        None | Some("defer") => None,
        Some(u) => match u.parse::<MigrationUri>() {
            Ok(u) => Some(u),
            Err(e) => {
                eprintln!("ferry: --incoming: {e}");
                return 2;
            }
        },
    };
    install_term_handlers();
    let bus = EventBus::new();
    let events = QmpEvents(bus.clone());
    let machine = if incoming.is_some() {
        Machine::incoming(config, Arc::new(events.clone()))
    } else {
        Machine::boot_paused(config, Arc::new(events.clone()))
    };
    let machine = match machine {
        Ok(m) => Arc::new(m),
        Err(e) => {
            eprintln!("ferry: {e}");
            return 1;
        }
    };
    // The -global settings are checked as a whole, as QEMU's migration_object_check does,
    // before the guest runs; with --incoming (defer too) this process is the incoming side
    // from the start, as QEMU is in RUN_STATE_INMIGRATE from its command line on.
    let options = match MigrationOptions::with_settings(
        globals.caps,
        globals.params.clone(),
        &GuestRamSupport::new(machine.ram()),
        incoming.is_some(),
    ) {
        Ok(o) => Arc::new(o),
        Err(e) => {
            eprintln!("ferry: --global: {e}");
            return 1;
        }
    };
    if !a.paused && incoming.is_none() {
        if let Err(e) = machine.resume() {
            eprintln!("ferry: {e}");
            return 1;
        }
    }
    let mode = match incoming.as_deref() {
        None => IncomingMode::None,
        Some(_) => IncomingMode::Defer,
    };
    let vmm = Vmm::new(
        machine,
        options,
        globals.props,
        events,
        uuid,
        !a.paused,
        mode,
    );
    if a.dirty_tracking == "uffd-async" {
        if let Err(e) = crate::dirty::uffd_async::select(&vmm) {
            eprintln!("ferry: --dirty-tracking: {e}");
            return 1;
        }
    }
    let server = match &a.qmp {
        None => None,
        Some(path) => {
            let table = command_table(&vmm);
            match QmpServer::start(path, Arc::new(table), bus.clone(), ServerConfig::default()) {
                Ok(s) => Some(s),
                Err(e) => {
                    eprintln!("ferry: {e}");
                    return 1;
                }
            }
        }
    };
    if let Some(uri) = &incoming_uri {
        if let Err(e) = vmm.start_incoming(uri) {
            eprintln!("ferry: --incoming {uri}: {e}");
            return 1;
        }
    }
    let code = vmm.wait_exit(|| STOP.load(Ordering::Acquire).then_some(0));
    if let Some(s) = server {
        s.handle().shutdown();
        s.join();
    }
    code
}
