//! [`WriteProtector`]: guest RAM registered with a userfaultfd in write-protect mode.
//!
//! The fd is opened *without* `UFFD_USER_MODE_ONLY` (see [`crate::uffd::open`]): a guest write
//! reaches the page through KVM, which faults on the page from kernel mode on the vCPU
//! thread's behalf, and that fault must be delivered to us like a user-mode one.
//!
//! Pages never populated have no page-table entry to carry the protection:
//! - anonymous memory needs `UFFD_FEATURE_WP_UNPOPULATED` (the kernel then installs a
//!   marker); without it they are populated first by reading one byte of each (QEMU's
//!   `ram_block_populate_read`, which maps the shared zero page);
//! - shmem (memfd) gets markers whenever the kernel offers `WP_HUGETLBFS_SHMEM`.
//!
//! Unregistering (done on drop, after removing every protection) clears whatever is left,
//! so a failed or cancelled snapshot never leaves a page protected.

use std::ffi::c_void;

use ram::{BackingKind, GuestRam, PAGE_SIZE};
use thiserror::Error;
use userfaultfd::{RegisterMode, Uffd};

use crate::uffd::features::{
    FEATURE_PAGEFAULT_FLAG_WP, FEATURE_THREAD_ID, FEATURE_WP_ASYNC, FEATURE_WP_HUGETLBFS_SHMEM,
    FEATURE_WP_UNPOPULATED, IOCTL_WRITEPROTECT,
};
use crate::uffd::{self, UffdError, UffdFeatures};

/// Errors setting up or using write protection.
#[derive(Debug, Error)]
pub enum ProtectError {
    /// No usable userfaultfd.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The kernel or this memory cannot be write-tracked.
    #[error("{0}")]
    Unsupported(String),
    /// An ioctl on the userfaultfd failed.
    #[error("{what} failed: {errno}")]
    Ioctl {
        /// Which operation.
        what: &'static str,
        /// The error number's C text.
        errno: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, ProtectError>;

/// One registered host mapping.
#[derive(Debug, Clone, Copy)]
struct Area {
    host: usize,
    len: usize,
    first_page: u64,
}

/// How unpopulated pages get protected on this host for this memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnpopulatedStrategy {
    /// Shmem: the kernel installs markers (WP_HUGETLBFS_SHMEM).
    ShmemMarkers,
    /// Anonymous memory with UFFD_FEATURE_WP_UNPOPULATED.
    WpUnpopulated,
    /// Anonymous memory on an older kernel: every page is read once first.
    TouchPages,
}

/// Guest RAM registered for write-protect faults on one userfaultfd.
#[derive(Debug)]
pub struct WriteProtector {
    uffd: Uffd,
    areas: Vec<Area>,
    features: u64,
    strategy: UnpopulatedStrategy,
    offered: UffdFeatures,
}

/// The OS error number inside an error of the `userfaultfd` crate (which uses its own `nix`).
fn errno_of(e: &userfaultfd::Error) -> Option<i32> {
    match e {
        userfaultfd::Error::SystemError(n) => Some(*n as i32),
        _ => None,
    }
}

fn errno_text(e: &userfaultfd::Error) -> String {
    match errno_of(e) {
        Some(n) => uffd::open::strerror(&std::io::Error::from_raw_os_error(n)),
        None => e.to_string(),
    }
}

fn is_eagain(e: &userfaultfd::Error) -> bool {
    errno_of(e) == Some(libc::EAGAIN)
}

/// Chooses how this memory's unpopulated pages are protected, or says why they cannot be.
pub fn strategy_for(
    kind: BackingKind,
    offered: &UffdFeatures,
) -> std::result::Result<UnpopulatedStrategy, String> {
    if !offered.contains(FEATURE_PAGEFAULT_FLAG_WP) {
        return Err("the kernel offers no UFFD_FEATURE_PAGEFAULT_FLAG_WP".into());
    }
    match kind {
        BackingKind::AnonymousPrivate => Ok(if offered.contains(FEATURE_WP_UNPOPULATED) {
            UnpopulatedStrategy::WpUnpopulated
        } else {
            UnpopulatedStrategy::TouchPages
        }),
        BackingKind::SharedShmem | BackingKind::PrivateShmem => {
            if offered.contains(FEATURE_WP_HUGETLBFS_SHMEM) {
                Ok(UnpopulatedStrategy::ShmemMarkers)
            } else {
                Err(format!(
                    "{kind:?} memory needs UFFD_FEATURE_WP_HUGETLBFS_SHMEM, which the kernel does not offer"
                ))
            }
        }
        BackingKind::Hugetlb => Err(
            "hugetlb guest memory is not supported by Ferry's background snapshot (its pages are not 4 KiB)"
                .into(),
        ),
        BackingKind::SharedFile | BackingKind::PrivateFile => Err(format!(
            "{kind:?} memory (a regular file) cannot be write-protected with userfaultfd"
        )),
    }
}

impl WriteProtector {
    /// Opens a userfaultfd for `ram` and registers all of it in write-protect mode
    /// (nothing is protected yet).
    pub fn new(ram: &GuestRam) -> Result<Self> {
        Self::with_mode(ram, false)
    }

    /// Like [`WriteProtector::new`], with `UFFD_FEATURE_WP_ASYNC`: writes to protected
    /// pages are resolved by the kernel without a fault message, and `PAGEMAP_SCAN` finds
    /// them (see [`super::pagemap::PagemapScanner`]) — a dirty tracker.
    pub fn new_async(ram: &GuestRam) -> Result<Self> {
        Self::with_mode(ram, true)
    }

    fn with_mode(ram: &GuestRam, asynchronous: bool) -> Result<Self> {
        let (offered, _) = uffd::query_features()?;
        let strategy =
            strategy_for(ram.backing_kind(), &offered).map_err(ProtectError::Unsupported)?;
        let mut features = FEATURE_PAGEFAULT_FLAG_WP;
        if asynchronous {
            if !offered.contains(FEATURE_WP_ASYNC) {
                return Err(ProtectError::Unsupported(
                    "the kernel offers no UFFD_FEATURE_WP_ASYNC".into(),
                ));
            }
            features |= FEATURE_WP_ASYNC;
        }
        for optional in [FEATURE_THREAD_ID, FEATURE_WP_HUGETLBFS_SHMEM] {
            if offered.contains(optional) {
                features |= optional;
            }
        }
        if strategy == UnpopulatedStrategy::WpUnpopulated {
            features |= FEATURE_WP_UNPOPULATED;
        }
        let opened = uffd::open(features)?;
        let mut p = WriteProtector {
            uffd: opened.uffd,
            areas: Vec::new(),
            features,
            strategy,
            offered,
        };
        for r in ram.regions() {
            let len = usize::try_from(r.size)
                .map_err(|_| ProtectError::Unsupported("region too large".into()))?;
            let ioctls = p
                .uffd
                .register_with_mode(r.host_addr as *mut c_void, len, RegisterMode::WRITE_PROTECT)
                .map_err(|e| ProtectError::Ioctl {
                    what: "UFFDIO_REGISTER(WP)",
                    errno: errno_text(&e),
                })?;
            p.areas.push(Area {
                host: r.host_addr,
                len,
                first_page: r.ram_offset / PAGE_SIZE as u64,
            });
            if ioctls.bits() & IOCTL_WRITEPROTECT == 0 {
                return Err(ProtectError::Unsupported(
                    "the registration offers no UFFDIO_WRITEPROTECT".into(),
                ));
            }
        }
        Ok(p)
    }

    /// How unpopulated pages are handled.
    pub fn strategy(&self) -> UnpopulatedStrategy {
        self.strategy
    }

    /// Features enabled on the fd.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Everything the kernel offers.
    pub fn offered(&self) -> UffdFeatures {
        self.offered
    }

    /// The registered host mappings: (host address, bytes, RAM page number of the first page).
    pub fn areas(&self) -> Vec<(usize, usize, u64)> {
        self.areas
            .iter()
            .map(|a| (a.host, a.len, a.first_page))
            .collect()
    }

    /// The userfaultfd (to read fault events from).
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Reads one byte of every page so that each has a page-table entry to protect
    /// (only for [`UnpopulatedStrategy::TouchPages`]).
    pub fn populate_if_needed(&self) {
        if self.strategy != UnpopulatedStrategy::TouchPages {
            return;
        }
        for a in &self.areas {
            for off in (0..a.len).step_by(PAGE_SIZE) {
                // SAFETY: `a.host + off` lies inside a live mapping of guest RAM registered
                // by this protector; a volatile read of one byte has no other effect than
                // populating the page table.
                unsafe { std::ptr::read_volatile((a.host + off) as *const u8) };
            }
        }
    }

    fn change(&self, host: usize, len: usize, protect: bool) -> Result<()> {
        let mut tries = 0;
        loop {
            let r = if protect {
                self.uffd.write_protect(host as *mut c_void, len)
            } else {
                self.uffd
                    .remove_write_protection(host as *mut c_void, len, true)
            };
            match r {
                Ok(()) => return Ok(()),
                // The address space is changing under us (mmap_changing): try again.
                Err(e) if is_eagain(&e) && tries < 1000 => {
                    tries += 1;
                    std::thread::yield_now();
                }
                Err(e) => {
                    return Err(ProtectError::Ioctl {
                        what: if protect {
                            "UFFDIO_WRITEPROTECT(WP)"
                        } else {
                            "UFFDIO_WRITEPROTECT(clear)"
                        },
                        errno: errno_text(&e),
                    })
                }
            }
        }
    }

    /// Write-protects all guest RAM.
    pub fn protect_all(&self) -> Result<()> {
        for a in &self.areas {
            self.change(a.host, a.len, true)?;
        }
        Ok(())
    }

    /// Write-protects pages `[first, first + count)`.
    pub fn protect(&self, first: u64, count: u64) -> Result<()> {
        self.change_pages(first, count, true)
    }

    /// Removes the protection of pages `[first, first + count)` and wakes their waiters.
    pub fn unprotect(&self, first: u64, count: u64) -> Result<()> {
        self.change_pages(first, count, false)
    }

    fn change_pages(&self, first: u64, count: u64, protect: bool) -> Result<()> {
        let end = first.saturating_add(count);
        for a in &self.areas {
            let a_end = a.first_page + (a.len / PAGE_SIZE) as u64;
            let s = first.max(a.first_page);
            let e = end.min(a_end);
            if s < e {
                let host = a.host + ((s - a.first_page) as usize) * PAGE_SIZE;
                self.change(host, ((e - s) as usize) * PAGE_SIZE, protect)?;
            }
        }
        Ok(())
    }

    /// Removes every protection.
    pub fn unprotect_all(&self) -> Result<()> {
        for a in &self.areas {
            self.change(a.host, a.len, false)?;
        }
        Ok(())
    }

    /// The RAM page number of host address `addr`, if it lies in guest RAM.
    pub fn page_at(&self, addr: usize) -> Option<u64> {
        self.areas
            .iter()
            .find(|a| addr >= a.host && addr < a.host + a.len)
            .map(|a| a.first_page + ((addr - a.host) / PAGE_SIZE) as u64)
    }

    /// Unregisters all of RAM (clears any protection left). Idempotent.
    pub fn unregister(&mut self) {
        for a in self.areas.drain(..) {
            if let Err(e) = self.uffd.unregister(a.host as *mut c_void, a.len) {
                eprintln!(
                    "ferry: snapshot: unregistering guest RAM from userfaultfd failed: {}",
                    errno_text(&e)
                );
            }
        }
    }
}

impl Drop for WriteProtector {
    fn drop(&mut self) {
        if let Err(e) = self.unprotect_all() {
            eprintln!("ferry: snapshot: removing write protection failed: {e}");
        }
        self.unregister();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::pagemap::protected_pages;
    use crate::uffd::features::FEATURE_WP_UNPOPULATED;
    use ram::{Backend, MemoryConfig};

    fn uffd_usable() -> bool {
        match uffd::query_features() {
            Ok((f, _)) if f.contains(FEATURE_PAGEFAULT_FLAG_WP) => true,
            other => {
                eprintln!("skipping: no userfaultfd write-protect here: {other:?}");
                false
            }
        }
    }

    fn ram(backend: Backend) -> GuestRam {
        GuestRam::new(&MemoryConfig {
            size: 4 << 20,
            backend,
            ..MemoryConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn strategies_follow_backing_and_features() {
        let all = UffdFeatures::from_bits(0x1ffff);
        let no_unpop = UffdFeatures::from_bits(0x1ffff & !FEATURE_WP_UNPOPULATED);
        let bare = UffdFeatures::from_bits(FEATURE_PAGEFAULT_FLAG_WP);
        assert_eq!(
            strategy_for(BackingKind::AnonymousPrivate, &all),
            Ok(UnpopulatedStrategy::WpUnpopulated)
        );
        assert_eq!(
            strategy_for(BackingKind::AnonymousPrivate, &no_unpop),
            Ok(UnpopulatedStrategy::TouchPages)
        );
        assert_eq!(
            strategy_for(BackingKind::SharedShmem, &all),
            Ok(UnpopulatedStrategy::ShmemMarkers)
        );
        assert!(strategy_for(BackingKind::SharedShmem, &bare).is_err());
        assert!(strategy_for(BackingKind::Hugetlb, &all).is_err());
        assert!(strategy_for(BackingKind::SharedFile, &all).is_err());
        assert!(strategy_for(BackingKind::AnonymousPrivate, &UffdFeatures::default()).is_err());
    }

    #[test]
    fn protecting_marks_every_page_and_dropping_clears_them() {
        if !uffd_usable() {
            return;
        }
        for backend in [Backend::SharedMemfd, Backend::AnonymousPrivate] {
            let ram = ram(backend.clone());
            ram.write_page(3, &[1u8; PAGE_SIZE]).unwrap();
            let p = WriteProtector::new(&ram).unwrap();
            p.populate_if_needed();
            p.protect_all().unwrap();
            assert_eq!(
                protected_pages(&ram).unwrap(),
                ram.page_count(),
                "{backend:?}: every page, populated or not, is protected"
            );
            p.unprotect(10, 5).unwrap();
            assert_eq!(protected_pages(&ram).unwrap(), ram.page_count() - 5);
            assert_eq!(
                p.page_at(ram.regions()[0].host_addr + 5 * PAGE_SIZE + 7),
                Some(5)
            );
            assert_eq!(p.page_at(1), None);
            drop(p);
            assert_eq!(protected_pages(&ram).unwrap(), 0, "{backend:?}");
            // Writable again without any handler.
            ram.write_page(4, &[2u8; PAGE_SIZE]).unwrap();
        }
    }
}
