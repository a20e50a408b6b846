//! `ferry probe [--json]`: what this host's kernel offers Ferry, as a table or JSON.
//!
//! - KVM: API version and the capabilities Ferry uses; dirty logging is checked for real
//!   (a memslot with `KVM_MEM_LOG_DIRTY_PAGES` and one `KVM_GET_DIRTY_LOG`).
//! - userfaultfd: the syscall, `/dev/userfaultfd`, `vm.unprivileged_userfaultfd`, and every
//!   feature bit the kernel reports.
//! - Memory: transparent huge pages, hugetlb pages.
//! - Write tracking (`background-snapshot`) per memory backend: QEMU's levels absent /
//!   available / compatible, from really registering that memory, plus a write to a
//!   never-populated page that must fault.
//!
//! Exits 0 when everything live migration needs is present. `.ci/run` prints it first,
//! and tests read `--json` to decide what they can run.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use clap::Args;
use kvm_bindings::{
    kvm_userspace_memory_region, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_NR_MEMSLOTS,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Cap, Kvm};
use migration::snapshot::{probe_unpopulated_wp, UnpopulatedWpReport};
use migration::uffd::features::FEATURE_NAMES;
use migration::uffd::{self, OpenMethod, RamArea, WriteTrackingSupport};
use ram::{GuestRam, MemoryConfig};

use crate::dirty::UffdAsyncTracker;
use serde::Serialize;

/// Arguments of `ferry probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The KVM API version every Linux since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;
/// Bytes of one dirty-ring entry (`struct kvm_dirty_gfn`).
const DIRTY_GFN_BYTES: i32 = 16;

/// What KVM offers.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct KvmReport {
    /// /dev/kvm could be opened.
    pub available: bool,
    /// Why not, if not.
    pub error: Option<String>,
    /// KVM_GET_API_VERSION.
    pub api_version: Option<i32>,
    /// KVM_CAP_USER_MEMORY.
    pub user_memory: bool,
    /// A memslot with dirty logging accepted and KVM_GET_DIRTY_LOG answered.
    pub dirty_log: bool,
    /// Why dirty logging failed, if it did.
    pub dirty_log_error: Option<String>,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 flags (0 = absent).
    pub manual_dirty_log_protect: i32,
    /// KVM_CAP_DIRTY_LOG_RING: largest ring in bytes (0 = absent).
    pub dirty_ring_max_bytes: i32,
    /// The same in entries.
    pub dirty_ring_max_entries: i32,
    /// KVM_CAP_DIRTY_LOG_RING_ACQ_REL: largest ring in bytes (0 = absent).
    pub dirty_ring_acq_rel_max_bytes: i32,
    /// KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP.
    pub dirty_ring_with_bitmap: bool,
    /// KVM_CAP_IRQCHIP.
    pub irqchip: bool,
    /// Recommended vCPUs (KVM_CAP_NR_VCPUS).
    pub nr_vcpus: usize,
    /// Maximum vCPUs (KVM_CAP_MAX_VCPUS).
    pub max_vcpus: usize,
    /// Memory slots (KVM_CAP_NR_MEMSLOTS).
    pub nr_memslots: i32,
    /// KVM_CAP_TSC_CONTROL.
    pub tsc_control: bool,
    /// KVM_CAP_GET_TSC_KHZ.
    pub get_tsc_khz: bool,
    /// KVM_CAP_IMMEDIATE_EXIT (how Ferry kicks vCPUs).
    pub immediate_exit: bool,
}

/// One userfaultfd feature bit.
#[derive(Debug, Serialize)]
pub struct FeatureBit {
    /// Name without the `UFFD_FEATURE_` prefix.
    pub name: String,
    /// Whether the kernel offers it.
    pub offered: bool,
}

/// What userfaultfd offers.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct UffdReport {
    /// userfaultfd(2) gave this process an fd.
    pub syscall: bool,
    /// Why not.
    pub syscall_error: Option<String>,
    /// /dev/userfaultfd exists.
    pub dev_userfaultfd: bool,
    /// vm.unprivileged_userfaultfd (None: unreadable).
    pub unprivileged_userfaultfd: Option<bool>,
    /// How Ferry opens one here.
    pub open_method: Option<OpenMethod>,
    /// Raw feature mask.
    pub feature_bits: Option<u64>,
    /// Every known bit (and unknown ones the kernel reports), lowest first.
    pub features: Vec<FeatureBit>,
    /// Why no userfaultfd could be used.
    pub error: Option<String>,
}

/// Huge pages.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MemoryReport {
    /// /sys/kernel/mm/transparent_hugepage/enabled (the selected value).
    pub thp_enabled: Option<String>,
    /// .../defrag.
    pub thp_defrag: Option<String>,
    /// .../shmem_enabled.
    pub thp_shmem: Option<String>,
    /// HugePages_Total (default size).
    pub hugetlb_pages_total: Option<u64>,
    /// HugePages_Free.
    pub hugetlb_pages_free: Option<u64>,
    /// Hugepagesize in KiB.
    pub hugetlb_page_kib: Option<u64>,
}

/// Write tracking for one memory backend.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BackendReport {
    /// Short name (memfd, anon, ...).
    pub backend: String,
    /// The `--memory` text probed.
    pub memory: String,
    /// QEMU's level.
    pub support: WriteTrackingSupport,
    /// Why it is not compatible.
    pub reason: Option<String>,
    /// A write to a never-populated, protected page (when compatible).
    pub unpopulated_wp: Option<UnpopulatedWpReport>,
}

/// One source of dirty-page information for precopy (`ferry run --dirty-tracking`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DirtySource {
    /// The `--dirty-tracking` value.
    pub name: String,
    /// Whether it works here.
    pub available: bool,
    /// What was checked, or why it is not available.
    pub detail: String,
}

/// Everything `ferry probe` reports.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ProbeReport {
    /// Kernel release.
    pub kernel: Option<String>,
    /// KVM.
    pub kvm: KvmReport,
    /// userfaultfd.
    pub userfaultfd: UffdReport,
    /// Huge pages.
    pub memory: MemoryReport,
    /// Per backend.
    pub write_tracking: Vec<BackendReport>,
    /// Dirty-page sources for precopy.
    pub dirty_tracking: Vec<DirtySource>,
    /// Everything live migration needs is here.
    pub live_migration_ready: bool,
    /// What live migration lacks.
    pub missing: Vec<String>,
    /// Background snapshots work with the default memory (memfd).
    pub background_snapshot_ready: bool,
}

fn dirty_log_works(kvm: &Kvm) -> Result<(), String> {
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let ram = GuestRam::new(&MemoryConfig {
        size: 2 << 20,
        ..MemoryConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let r = &ram.regions()[0];
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: r.size,
        userspace_addr: r.host_addr as u64,
    };
    // SAFETY: the region describes a live mapping owned by `ram`, which outlives `vm`
    // (declared before it, so dropped after it).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION(LOG_DIRTY_PAGES): {e}"))?;
    vm.get_dirty_log(0, r.size as usize)
        .map_err(|e| format!("KVM_GET_DIRTY_LOG: {e}"))?;
    drop(vm);
    Ok(())
}

fn probe_kvm() -> KvmReport {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            return KvmReport {
                error: Some(format!("/dev/kvm: {e}")),
                ..KvmReport::default()
            }
        }
    };
    let vm = kvm.create_vm().ok();
    let raw = |cap: u32| {
        vm.as_ref()
            .map_or(0, |v| v.check_extension_raw(u64::from(cap) as _))
    };
    let ring = raw(KVM_CAP_DIRTY_LOG_RING);
    let dirty = dirty_log_works(&kvm);
    KvmReport {
        available: true,
        error: None,
        api_version: Some(kvm.get_api_version()),
        user_memory: kvm.check_extension(Cap::UserMemory),
        dirty_log: dirty.is_ok(),
        dirty_log_error: dirty.err(),
        manual_dirty_log_protect: raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
        dirty_ring_max_bytes: ring,
        dirty_ring_max_entries: ring / DIRTY_GFN_BYTES,
        dirty_ring_acq_rel_max_bytes: raw(KVM_CAP_DIRTY_LOG_RING_ACQ_REL),
        dirty_ring_with_bitmap: raw(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) > 0,
        irqchip: kvm.check_extension(Cap::Irqchip),
        nr_vcpus: kvm.get_nr_vcpus(),
        max_vcpus: kvm.get_max_vcpus(),
        nr_memslots: raw(KVM_CAP_NR_MEMSLOTS),
        tsc_control: kvm.check_extension(Cap::TscControl),
        get_tsc_khz: kvm.check_extension(Cap::GetTscKhz),
        immediate_exit: kvm.check_extension(Cap::ImmediateExit),
    }
}

fn probe_uffd() -> UffdReport {
    let h = uffd::probe_host();
    let bits = h.features.map(|f| f.bits);
    let mut features: Vec<FeatureBit> = FEATURE_NAMES
        .iter()
        .map(|(bit, name)| FeatureBit {
            name: (*name).to_string(),
            offered: bits.is_some_and(|b| b & bit != 0),
        })
        .collect();
    let known = FEATURE_NAMES.iter().fold(0, |a, (b, _)| a | b);
    for bit in (0..64).map(|i| 1u64 << i) {
        if bits.is_some_and(|b| b & bit & !known != 0) {
            features.push(FeatureBit {
                name: format!("bit{}", bit.trailing_zeros()),
                offered: true,
            });
        }
    }
    UffdReport {
        syscall: h.syscall,
        syscall_error: h.syscall_error,
        dev_userfaultfd: h.dev_userfaultfd,
        unprivileged_userfaultfd: h.unprivileged_userfaultfd,
        open_method: h.open_method,
        feature_bits: bits,
        features,
        error: h.error,
    }
}

/// The selected value of a sysfs choice file ("always [madvise] never" -> "madvise").
fn selected(text: &str) -> String {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .unwrap_or(text.trim())
        .to_string()
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn probe_memory() -> MemoryReport {
    let thp = |f: &str| {
        std::fs::read_to_string(format!("/sys/kernel/mm/transparent_hugepage/{f}"))
            .ok()
            .map(|t| selected(&t))
    };
    MemoryReport {
        thp_enabled: thp("enabled"),
        thp_defrag: thp("defrag"),
        thp_shmem: thp("shmem_enabled"),
        hugetlb_pages_total: meminfo("HugePages_Total"),
        hugetlb_pages_free: meminfo("HugePages_Free"),
        hugetlb_page_kib: meminfo("Hugepagesize"),
    }
}

fn probe_backend(name: &str, spec: &str) -> BackendReport {
    let cfg: Result<MemoryConfig, String> = spec.parse().map_err(|e| format!("{e}"));
    let result = cfg.and_then(|cfg| {
        let ram = GuestRam::new(&cfg).map_err(|e| e.to_string())?;
        let wt = uffd::probe_write_tracking(&RamArea::from_guest_ram(&ram));
        Ok((cfg, wt))
    });
    match result {
        Ok((cfg, wt)) => {
            let unpopulated_wp = (wt.support == WriteTrackingSupport::Compatible)
                .then(|| probe_unpopulated_wp(&cfg));
            BackendReport {
                backend: name.into(),
                memory: spec.into(),
                support: wt.support,
                reason: wt.reason,
                unpopulated_wp,
            }
        }
        Err(e) => BackendReport {
            backend: name.into(),
            memory: spec.into(),
            support: WriteTrackingSupport::Absent,
            reason: Some(e),
            unpopulated_wp: None,
        },
    }
}

fn probe_backends() -> Vec<BackendReport> {
    let pid = std::process::id();
    let shm = format!("/dev/shm/ferry-probe-{pid}");
    let disk = format!("/var/tmp/ferry-probe-{pid}");
    let list = [
        ("memfd", "2M".to_string()),
        ("anon", "2M,backend=anon".to_string()),
        ("anon,thp", "2M,backend=anon,hugepages=thp".to_string()),
        ("tmpfs-file,shared", format!("2M,mem-path={shm},share=on")),
        ("tmpfs-file,private", format!("2M,mem-path={shm},share=off")),
        ("disk-file,shared", format!("2M,mem-path={disk},share=on")),
        ("memfd,hugetlb", "2M,hugepages=hugetlb".to_string()),
    ];
    let out = list
        .iter()
        .map(|(name, spec)| {
            let r = probe_backend(name, spec);
            let _ = std::fs::remove_file(&shm);
            let _ = std::fs::remove_file(&disk);
            r
        })
        .collect();
    out
}

/// Tracks a write to one page of a small memfd with WP_ASYNC + PAGEMAP_SCAN.
fn uffd_async_works() -> Result<(), String> {
    use migration::vm::DirtyTracker;
    let ram = std::sync::Arc::new(
        GuestRam::new(&MemoryConfig {
            size: 2 << 20,
            ..MemoryConfig::default()
        })
        .map_err(|e| e.to_string())?,
    );
    if let Some(why) = UffdAsyncTracker::unsupported(&ram) {
        return Err(why);
    }
    let t = UffdAsyncTracker::new(ram.clone());
    t.start()?;
    let bitmap = ram::AtomicBitmap::new(ram.page_count());
    ram.write_page(7, &[1; ram::PAGE_SIZE])
        .map_err(|e| e.to_string())?;
    let n = t.sync(&bitmap);
    t.stop();
    match n {
        Ok(1) if bitmap.get(7) => Ok(()),
        Ok(n) => Err(format!("a write to one page was reported as {n} pages")),
        Err(e) => Err(e),
    }
}

fn probe_dirty_sources(kvm: &KvmReport) -> Vec<DirtySource> {
    let uffd = uffd_async_works();
    vec![
        DirtySource {
            name: "bitmap".into(),
            available: kvm.dirty_log,
            detail: if kvm.manual_dirty_log_protect != 0 {
                "KVM dirty log with manual protect".into()
            } else {
                "KVM dirty log".into()
            },
        },
        DirtySource {
            name: "ring".into(),
            available: kvm.dirty_ring_max_bytes > 0,
            detail: format!(
                "KVM dirty ring, up to {} entries per vCPU",
                kvm.dirty_ring_max_entries
            ),
        },
        DirtySource {
            name: "uffd-async".into(),
            available: uffd.is_ok(),
            detail: match uffd {
                Ok(()) => "userfaultfd WP_ASYNC + PAGEMAP_SCAN (a write was tracked)".into(),
                Err(e) => e,
            },
        },
    ]
}

/// Probes the host.
pub fn probe() -> ProbeReport {
    let kvm = probe_kvm();
    let userfaultfd = probe_uffd();
    let memory = probe_memory();
    let write_tracking = probe_backends();
    let dirty_tracking = probe_dirty_sources(&kvm);
    let mut missing = Vec::new();
    if !kvm.available {
        missing.push(format!(
            "KVM ({})",
            kvm.error.as_deref().unwrap_or("unavailable")
        ));
    } else {
        if kvm.api_version != Some(KVM_API_VERSION) {
            missing.push(format!(
                "KVM API version {KVM_API_VERSION} (found {:?})",
                kvm.api_version
            ));
        }
        if !kvm.user_memory {
            missing.push("KVM_CAP_USER_MEMORY".into());
        }
        if !kvm.dirty_log {
            missing.push(format!(
                "KVM dirty logging ({})",
                kvm.dirty_log_error.as_deref().unwrap_or("failed")
            ));
        }
        if !kvm.immediate_exit {
            missing.push("KVM_CAP_IMMEDIATE_EXIT (vCPU kicks)".into());
        }
    }
    let background_snapshot_ready = write_tracking.first().is_some_and(|b| {
        b.support == WriteTrackingSupport::Compatible
            && b.unpopulated_wp.as_ref().is_some_and(|u| u.works)
    });
    ProbeReport {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_string()),
        live_migration_ready: missing.is_empty(),
        missing,
        background_snapshot_ready,
        kvm,
        userfaultfd,
        memory,
        write_tracking,
        dirty_tracking,
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".into(), |x| x.to_string())
}

/// Appends one `name value` line of the table.
fn row(out: &mut String, name: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "  {name:<36} {value}");
}

impl ProbeReport {
    /// The report as an aligned table.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "kernel {}", opt(&self.kernel));
        let k = &self.kvm;
        o.push_str("KVM\n");
        row(&mut o, "/dev/kvm", yes(k.available));
        if let Some(e) = &k.error {
            row(&mut o, "error", e);
        }
        row(&mut o, "API version", opt(&k.api_version));
        row(&mut o, "user memory", yes(k.user_memory));
        let dirty = match &k.dirty_log_error {
            Some(e) => format!("NO: {e}"),
            None => yes(k.dirty_log).into(),
        };
        row(&mut o, "dirty log (memslot + GET_DIRTY_LOG)", dirty);
        let manual = match k.manual_dirty_log_protect {
            0 => "no".into(),
            f => format!("yes (flags {f:#x})"),
        };
        row(&mut o, "manual dirty-log protect", manual);
        let ring = match k.dirty_ring_max_bytes {
            0 => "no".into(),
            b => format!(
                "yes, up to {} entries ({b} bytes)",
                k.dirty_ring_max_entries
            ),
        };
        row(&mut o, "dirty ring", ring);
        row(
            &mut o,
            "dirty ring acq/rel (max bytes)",
            k.dirty_ring_acq_rel_max_bytes,
        );
        row(
            &mut o,
            "dirty ring with bitmap",
            yes(k.dirty_ring_with_bitmap),
        );
        row(&mut o, "in-kernel irqchip", yes(k.irqchip));
        let vcpus = format!("{} / {}", k.nr_vcpus, k.max_vcpus);
        row(&mut o, "vCPUs recommended / max", vcpus);
        row(&mut o, "memory slots", k.nr_memslots);
        row(&mut o, "TSC control", yes(k.tsc_control));
        row(&mut o, "GET_TSC_KHZ", yes(k.get_tsc_khz));
        row(&mut o, "immediate exit", yes(k.immediate_exit));

        let u = &self.userfaultfd;
        o.push_str("userfaultfd\n");
        let syscall = match &u.syscall_error {
            Some(e) => format!("no ({e})"),
            None => yes(u.syscall).into(),
        };
        row(&mut o, "syscall", syscall);
        row(&mut o, "/dev/userfaultfd", yes(u.dev_userfaultfd));
        let sysctl = u
            .unprivileged_userfaultfd
            .map_or("-".into(), |v| u8::from(v).to_string());
        row(&mut o, "vm.unprivileged_userfaultfd", sysctl);
        let method = u.open_method.map_or("-".into(), |m| format!("{m:?}"));
        row(&mut o, "opened with", method);
        if let Some(e) = &u.error {
            row(&mut o, "error", e);
        }
        if let Some(bits) = u.feature_bits {
            row(&mut o, "features", format!("{bits:#x}"));
        }
        for f in &u.features {
            row(&mut o, &format!("  {}", f.name), yes(f.offered));
        }

        let m = &self.memory;
        o.push_str("memory\n");
        row(&mut o, "transparent huge pages", opt(&m.thp_enabled));
        row(&mut o, "  defrag", opt(&m.thp_defrag));
        row(&mut o, "  shmem", opt(&m.thp_shmem));
        let hugetlb = format!(
            "{} / {} of {} KiB",
            opt(&m.hugetlb_pages_free),
            opt(&m.hugetlb_pages_total),
            opt(&m.hugetlb_page_kib)
        );
        row(&mut o, "hugetlb pages (free / total)", hugetlb);

        o.push_str("write tracking (background-snapshot), per --memory backend\n");
        for b in &self.write_tracking {
            let mut line = format!("{:?}", b.support).to_lowercase();
            if let Some(u) = &b.unpopulated_wp {
                let how = u.strategy.map_or("-".into(), |s| {
                    serde_json::to_value(s)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                });
                let trapped = if u.works { "trapped" } else { "NOT trapped" };
                let _ = write!(line, "; unpopulated pages: {trapped} ({how})");
                if let Some(r) = &u.reason {
                    let _ = write!(line, ": {r}");
                }
            }
            if let Some(r) = &b.reason {
                let _ = write!(line, " ({r})");
            }
            row(&mut o, &b.backend, line);
        }
        o.push_str("dirty tracking for precopy (--dirty-tracking)\n");
        for d in &self.dirty_tracking {
            let state = if d.available { "yes" } else { "no" };
            row(&mut o, &d.name, format!("{state}: {}", d.detail));
        }
        let snap = if self.background_snapshot_ready {
            "ready"
        } else {
            "NOT ready"
        };
        let _ = writeln!(o, "background snapshots (default memory): {snap}");
        if self.live_migration_ready {
            o.push_str("live migration: ready\n");
        } else {
            let _ = writeln!(
                o,
                "live migration: NOT ready, missing: {}",
                self.missing.join("; ")
            );
        }
        o
    }

    /// Feature bits by name, for lookups.
    pub fn uffd_features(&self) -> BTreeMap<&str, bool> {
        self.userfaultfd
            .features
            .iter()
            .map(|f| (f.name.as_str(), f.offered))
            .collect()
    }
}

/// Runs `ferry probe`; exits 0 when everything live migration needs is present.
pub fn run(a: ProbeArgs) -> i32 {
    let report = probe();
    if a.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("ferry probe: {e}");
                return 1;
            }
        }
    } else {
        print!("{}", report.to_text());
    }
    if report.live_migration_ready {
        0
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_choice_is_the_bracketed_word() {
        assert_eq!(selected("always [madvise] never\n"), "madvise");
        assert_eq!(selected("[always] never"), "always");
        assert_eq!(selected("plain\n"), "plain");
    }

    #[test]
    fn report_is_consistent_with_the_host() {
        let r = probe();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v["kvm"]["available"],
            std::path::Path::new("/dev/kvm").exists()
        );
        assert_eq!(r.live_migration_ready, r.missing.is_empty());
        assert_eq!(r.write_tracking[0].backend, "memfd");
        if let Some(bits) = r.userfaultfd.feature_bits {
            let offered: u64 = FEATURE_NAMES
                .iter()
                .filter(|(_, n)| r.uffd_features().get(n) == Some(&true))
                .fold(0, |a, (b, _)| a | b);
            assert_eq!(offered, bits & offered, "named bits match the mask");
            // A disk file can never be write-tracked.
            let disk = r
                .write_tracking
                .iter()
                .find(|b| b.backend == "disk-file,shared")
                .unwrap();
            assert_ne!(disk.support, WriteTrackingSupport::Compatible, "{disk:?}");
        }
        let text = r.to_text();
        assert!(text.contains("PAGEFAULT_FLAG_WP"));
        assert!(text.contains("live migration: "));
    }
}
