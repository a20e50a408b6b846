//! Can guest RAM be write-tracked with userfaultfd? QEMU's
//! `ram_write_tracking_available()` / `ram_write_tracking_compatible()`,
//! the question behind the `background-snapshot` capability.
//!
//! - [`WriteTrackingSupport::Absent`]: no userfaultfd, or no
//!   `PAGEFAULT_FLAG_WP` in the kernel.
//! - [`WriteTrackingSupport::Available`]: the kernel can write-protect, but
//!   some RAM area cannot be registered for it (shmem also needs
//!   `WP_HUGETLBFS_SHMEM`; regular files cannot be tracked at all), or is hugetlb
//!   memory, which Ferry's background snapshot does not handle (2 MiB pages).
//! - [`WriteTrackingSupport::Compatible`]: every area was really registered in
//!   write-protect mode on a fresh userfaultfd, the kernel offered
//!   `UFFDIO_WRITEPROTECT` on it, and it was unregistered again.

use std::ffi::c_void;

use ram::{BackingKind, GuestRam};
use serde::Serialize;
use userfaultfd::RegisterMode;

use super::features::{FEATURE_PAGEFAULT_FLAG_WP, FEATURE_WP_HUGETLBFS_SHMEM, IOCTL_WRITEPROTECT};
use super::open::{open, query_features};
use super::UffdError;

/// How far userfaultfd write-tracking goes on this host for this guest (ordered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriteTrackingSupport {
    /// The kernel cannot write-protect with userfaultfd.
    Absent,
    /// The kernel can, but not every guest RAM area.
    Available,
    /// Every guest RAM area can be write-protected.
    Compatible,
}

/// One host mapping of guest RAM, as the probes see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamArea {
    /// A name for messages (QEMU prints its RAM block id).
    pub name: String,
    /// Host virtual address of the first byte.
    pub host_addr: usize,
    /// Length in bytes.
    pub len: usize,
    /// What backs it.
    pub kind: BackingKind,
}

impl RamArea {
    /// The areas of a guest's RAM (`ram0`, `ram1`, ... in RAM-offset order).
    pub fn from_guest_ram(ram: &GuestRam) -> Vec<RamArea> {
        ram.regions()
            .iter()
            .enumerate()
            .map(|(i, r)| RamArea {
                name: format!("ram{i}"),
                host_addr: r.host_addr,
                len: usize::try_from(r.size).unwrap_or(usize::MAX),
                kind: ram.backing_kind(),
            })
            .collect()
    }
}

/// Whether write-protect on `kind` needs `WP_HUGETLBFS_SHMEM` from the kernel.
pub fn needs_wp_hugetlbfs_shmem(kind: BackingKind) -> bool {
    matches!(
        kind,
        BackingKind::SharedShmem | BackingKind::PrivateShmem | BackingKind::Hugetlb
    )
}

/// The probe's answer, with the reason when it is not `Compatible`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WriteTrackingReport {
    /// The support level.
    pub support: WriteTrackingSupport,
    /// Why it is not higher, if it is not `Compatible`.
    pub reason: Option<String>,
}

/// QEMU's `ram_write_tracking_available()`: userfaultfd with `PAGEFAULT_FLAG_WP`.
pub fn write_tracking_available() -> bool {
    matches!(query_features(), Ok((f, _)) if f.contains(FEATURE_PAGEFAULT_FLAG_WP))
}

/// Probes write-tracking for `areas` for real (QEMU's `migrate_query_write_tracking`).
pub fn probe_write_tracking(areas: &[RamArea]) -> WriteTrackingReport {
    let offered = match query_features() {
        Ok((f, _)) => f,
        Err(e) => {
            return WriteTrackingReport {
                support: WriteTrackingSupport::Absent,
                reason: Some(e.to_string()),
            }
        }
    };
    if !offered.contains(FEATURE_PAGEFAULT_FLAG_WP) {
        return WriteTrackingReport {
            support: WriteTrackingSupport::Absent,
            reason: Some("the kernel offers no UFFD_FEATURE_PAGEFAULT_FLAG_WP".into()),
        };
    }
    match check_areas(areas, offered.contains(FEATURE_WP_HUGETLBFS_SHMEM)) {
        Ok(()) => WriteTrackingReport {
            support: WriteTrackingSupport::Compatible,
            reason: None,
        },
        Err(reason) => WriteTrackingReport {
            support: WriteTrackingSupport::Available,
            reason: Some(reason),
        },
    }
}

/// Registers every area in write-protect mode on a fresh userfaultfd (QEMU's
/// `ram_write_tracking_compatible`); `Err` says which area failed and why. Hugetlb areas
/// fail first: the kernel can write-protect them, but Ferry's background snapshot tracks
/// 4 KiB pages only (see `snapshot::protect::strategy_for`).
fn check_areas(areas: &[RamArea], wp_shmem: bool) -> Result<(), String> {
    if let Some(a) = areas.iter().find(|a| a.kind == BackingKind::Hugetlb) {
        return Err(format!(
            "{} is hugetlb memory: Ferry's background snapshot tracks 4 KiB pages only",
            a.name
        ));
    }
    if let Some(a) = areas
        .iter()
        .find(|a| needs_wp_hugetlbfs_shmem(a.kind) && !wp_shmem)
    {
        return Err(format!(
            "{} is {:?} memory and the kernel offers no UFFD_FEATURE_WP_HUGETLBFS_SHMEM",
            a.name, a.kind
        ));
    }
    let opened = open(FEATURE_PAGEFAULT_FLAG_WP).map_err(|e| e.to_string())?;
    for area in areas.iter().filter(|a| a.len > 0) {
        let start = area.host_addr as *mut c_void;
        let ioctls = opened
            .uffd
            .register_with_mode(start, area.len, RegisterMode::WRITE_PROTECT)
            .map_err(|e| format!("{}: {}", area.name, UffdError::from(e)))?;
        let unregistered = opened.uffd.unregister(start, area.len);
        if ioctls.bits() & IOCTL_WRITEPROTECT == 0 {
            return Err(format!(
                "{}: registration offers no UFFDIO_WRITEPROTECT",
                area.name
            ));
        }
        unregistered.map_err(|e| format!("{}: {}", area.name, UffdError::from(e)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::open::open_fd;
    use super::*;
    use ram::{Backend, MemoryConfig};

    fn ram(backend: Backend) -> GuestRam {
        GuestRam::new(&MemoryConfig {
            size: 8 << 20,
            backend,
            ..MemoryConfig::default()
        })
        .unwrap()
    }

    fn uffd_usable() -> bool {
        match open_fd() {
            Ok(_) => true,
            Err(e) => {
                eprintln!("skipping: {e}");
                false
            }
        }
    }

    #[test]
    fn support_levels_are_ordered_like_qemus() {
        assert!(WriteTrackingSupport::Absent < WriteTrackingSupport::Available);
        assert!(WriteTrackingSupport::Available < WriteTrackingSupport::Compatible);
    }

    #[test]
    fn shared_memfd_ram_is_compatible() {
        if !uffd_usable() {
            return;
        }
        let ram = ram(Backend::SharedMemfd);
        let areas = RamArea::from_guest_ram(&ram);
        assert_eq!(areas[0].kind, BackingKind::SharedShmem);
        let report = probe_write_tracking(&areas);
        assert_eq!(
            report.support,
            WriteTrackingSupport::Compatible,
            "{report:?}"
        );
    }

    #[test]
    fn anonymous_private_ram_is_compatible() {
        if !uffd_usable() {
            return;
        }
        let ram = ram(Backend::AnonymousPrivate);
        let report = probe_write_tracking(&RamArea::from_guest_ram(&ram));
        assert_eq!(
            report.support,
            WriteTrackingSupport::Compatible,
            "{report:?}"
        );
        assert!(write_tracking_available());
    }

    #[test]
    fn probe_leaves_the_ram_unregistered() {
        if !uffd_usable() {
            return;
        }
        let ram = ram(Backend::SharedMemfd);
        let areas = RamArea::from_guest_ram(&ram);
        assert_eq!(
            probe_write_tracking(&areas).support,
            WriteTrackingSupport::Compatible
        );
        // A second probe (a new fd registering the same range) would get EBUSY
        // if the first had left the range registered.
        assert_eq!(
            probe_write_tracking(&areas).support,
            WriteTrackingSupport::Compatible
        );
        // And the memory is writable without faulting.
        ram.write_page(0, &[7u8; 4096]).unwrap();
    }

    #[test]
    fn regular_file_ram_is_only_available() {
        if !uffd_usable() {
            return;
        }
        // A regular file on a disk file system (not tmpfs) cannot be write-protected.
        let dir = std::env::var_os("CARGO_TARGET_TMPDIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let path = dir.join(format!("ferry-wt-probe-{}", std::process::id()));
        let ram = GuestRam::new(&MemoryConfig {
            size: 8 << 20,
            backend: Backend::File {
                path: path.clone(),
                share: true,
            },
            ..MemoryConfig::default()
        });
        let _ = std::fs::remove_file(&path);
        let Ok(ram) = ram else {
            eprintln!(
                "skipping: cannot create file-backed RAM at {}",
                path.display()
            );
            return;
        };
        let areas = RamArea::from_guest_ram(&ram);
        if !matches!(areas[0].kind, BackingKind::SharedFile) {
            eprintln!(
                "skipping: {} is on {:?}, not a disk file system",
                path.display(),
                areas[0].kind
            );
            return;
        }
        let report = probe_write_tracking(&areas);
        assert_eq!(
            report.support,
            WriteTrackingSupport::Available,
            "{report:?}"
        );
        assert!(report.reason.unwrap().starts_with("ram0: "));
    }

    #[test]
    fn unmapped_area_is_only_available() {
        if !uffd_usable() {
            return;
        }
        // An address range with no mapping cannot be registered.
        let areas = [RamArea {
            name: "hole".into(),
            host_addr: 0x1000,
            len: 4096,
            kind: BackingKind::AnonymousPrivate,
        }];
        let report = probe_write_tracking(&areas);
        assert_eq!(report.support, WriteTrackingSupport::Available);
        assert!(report.reason.unwrap().starts_with("hole: "));
    }

    #[test]
    fn no_areas_is_compatible_when_the_kernel_has_wp() {
        if !uffd_usable() {
            return;
        }
        assert_eq!(
            probe_write_tracking(&[]).support,
            WriteTrackingSupport::Compatible
        );
    }
}
