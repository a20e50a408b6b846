//! Can this host be the incoming side of a postcopy migration? QEMU's
//! `postcopy_ram_supported_by_host()`, whose reason follows "Postcopy is not
//! supported: " when `postcopy-ram` is enabled on the destination.
//!
//! The checks, in QEMU 8.1's order and with its texts:
//! 1. the target page (4 KiB) is not larger than the host page;
//! 2. a userfaultfd opens: `Userfaultfd not available: <strerror>`;
//! 3. the `UFFDIO_API` handshake (asking for `THREAD_ID` when offered):
//!    `Userfault feature detection failed`, `Failed features <mask>`;
//!    hugetlb RAM needs `MISSING_HUGETLBFS`: `Userfault on this host does
//!    not support huge pages`; shmem RAM needs `MISSING_SHMEM` (Ferry's own
//!    check and text: `Userfault on this host does not support shared memory`);
//! 4. every RAM area is a whole number of pages and, if file-backed, on
//!    tmpfs or hugetlbfs: `Host backend files need to be TMPFS or HUGETLBFS only`;
//! 5. a one-page anonymous test area registers for missing faults and offers
//!    `WAKE`, `COPY` and `ZEROPAGE`: `UFFDIO_REGISTER failed: <strerror>`,
//!    `UFFDIO_UNREGISTER failed: <strerror>`, `Missing userfault map features: <hex>`.
//!
//! QEMU also calls `munlockall()` here; Ferry does not, since a probe must
//! not change the process's memory locking.

use std::ffi::c_void;
use std::io;

use ram::BackingKind;

use super::features::{
    FEATURE_MISSING_HUGETLBFS, FEATURE_MISSING_SHMEM, FEATURE_THREAD_ID, IOCTL_COPY, IOCTL_WAKE,
    IOCTL_ZEROPAGE,
};
use super::open::{api, open_fd, query_features, strerror};
use super::write_tracking::RamArea;
use super::UffdError;

/// The page size Ferry migrates in.
const TARGET_PAGE_SIZE: usize = 4096;
/// hugetlb page size used by Ferry's RAM (2 MiB).
const HUGE_PAGE_SIZE: usize = 2 << 20;

fn host_page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(TARGET_PAGE_SIZE)
}

/// Probes postcopy support for guest RAM made of `areas`; `Err` is QEMU's reason text.
pub fn probe_postcopy(areas: &[RamArea]) -> Result<(), String> {
    let host_page = host_page_size();
    if TARGET_PAGE_SIZE > host_page {
        return Err("Target page size bigger than host page size".into());
    }

    let (fd, _) = open_fd().map_err(|e| match e {
        UffdError::Unavailable { syscall, .. } => {
            format!("Userfaultfd not available: {}", strerror(&syscall))
        }
        other => other.to_string(),
    })?;

    let (offered, _) =
        query_features().map_err(|_| "Userfault feature detection failed".to_string())?;
    let asked = offered.bits & FEATURE_THREAD_ID;
    api(&fd, asked).map_err(|_| format!("Failed features {asked}"))?;
    if areas.iter().any(|a| a.kind == BackingKind::Hugetlb)
        && !offered.contains(FEATURE_MISSING_HUGETLBFS)
    {
        return Err("Userfault on this host does not support huge pages".into());
    }
    if areas
        .iter()
        .any(|a| matches!(a.kind, BackingKind::SharedShmem | BackingKind::PrivateShmem))
        && !offered.contains(FEATURE_MISSING_SHMEM)
    {
        return Err("Userfault on this host does not support shared memory".into());
    }

    for area in areas {
        let page = if area.kind == BackingKind::Hugetlb {
            HUGE_PAGE_SIZE
        } else {
            host_page
        };
        if area.len % page != 0 {
            return Err(format!(
                "Postcopy requires RAM blocks to be a page size multiple, block {} is 0x{:x} bytes with a page size of 0x{:x}",
                area.name, area.len, page
            ));
        }
        if matches!(
            area.kind,
            BackingKind::SharedFile | BackingKind::PrivateFile
        ) {
            return Err("Host backend files need to be TMPFS or HUGETLBFS only".into());
        }
    }

    test_area_ioctls(&fd, host_page)
}

/// QEMU's test: register one anonymous page for missing faults and look at the offered ioctls.
fn test_area_ioctls(fd: &std::os::fd::OwnedFd, page: usize) -> Result<(), String> {
    use std::os::fd::AsRawFd;

    let area =
        TestArea::map(page).map_err(|e| format!("Failed to map test area: {}", strerror(&e)))?;
    let mut reg = UffdioRegister {
        start: area.addr as u64,
        len: page as u64,
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: `fd` is an initialised userfaultfd, `reg` a live uffdio_register.
    unsafe { raw::uffdio_register(fd.as_raw_fd(), &mut reg) }.map_err(|e| {
        format!(
            "UFFDIO_REGISTER failed: {}",
            strerror(&io::Error::from_raw_os_error(e as i32))
        )
    })?;
    let mut range = UffdioRange {
        start: area.addr as u64,
        len: page as u64,
    };
    // SAFETY: as above, with a live uffdio_range.
    unsafe { raw::uffdio_unregister(fd.as_raw_fd(), &mut range) }.map_err(|e| {
        format!(
            "UFFDIO_UNREGISTER failed: {}",
            strerror(&io::Error::from_raw_os_error(e as i32))
        )
    })?;
    let mask = IOCTL_WAKE | IOCTL_COPY | IOCTL_ZEROPAGE;
    if reg.ioctls & mask != mask {
        return Err(format!(
            "Missing userfault map features: {:x}",
            !reg.ioctls & mask
        ));
    }
    Ok(())
}

const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

/// `struct uffdio_register` (range flattened).
#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

mod raw {
    use super::{UffdioRange, UffdioRegister};

    nix::ioctl_readwrite!(
        /// `UFFDIO_REGISTER`: `_IOWR(0xAA, 0x00, struct uffdio_register)`.
        uffdio_register,
        0xAA,
        0x00,
        UffdioRegister
    );

    nix::ioctl_read!(
        /// `UFFDIO_UNREGISTER`: `_IOR(0xAA, 0x01, struct uffdio_range)`.
        uffdio_unregister,
        0xAA,
        0x01,
        UffdioRange
    );
}

/// A one-page anonymous private mapping, unmapped on drop.
struct TestArea {
    addr: *mut c_void,
    len: usize,
}

impl TestArea {
    fn map(len: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(TestArea { addr, len })
    }
}

impl Drop for TestArea {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly the mapping made in `map`, used by nobody else.
        unsafe {
            libc::munmap(self.addr, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ram::{Backend, GuestRam, MemoryConfig};

    fn usable() -> bool {
        match open_fd() {
            Ok(_) => true,
            Err(e) => {
                eprintln!("skipping: {e}");
                false
            }
        }
    }

    #[test]
    fn memfd_and_anonymous_ram_support_postcopy() {
        if !usable() {
            return;
        }
        for backend in [Backend::SharedMemfd, Backend::AnonymousPrivate] {
            let ram = GuestRam::new(&MemoryConfig {
                size: 8 << 20,
                backend,
                ..MemoryConfig::default()
            })
            .unwrap();
            assert_eq!(probe_postcopy(&RamArea::from_guest_ram(&ram)), Ok(()));
        }
    }

    #[test]
    fn partial_pages_are_refused_with_qemus_text() {
        if !usable() {
            return;
        }
        let areas = [RamArea {
            name: "pc.ram".into(),
            host_addr: 0,
            len: 4097,
            kind: BackingKind::AnonymousPrivate,
        }];
        assert_eq!(
            probe_postcopy(&areas).unwrap_err(),
            "Postcopy requires RAM blocks to be a page size multiple, block pc.ram is 0x1001 bytes with a page size of 0x1000"
        );
    }

    #[test]
    fn disk_file_backing_is_refused_with_qemus_text() {
        if !usable() {
            return;
        }
        let areas = [RamArea {
            name: "ram0".into(),
            host_addr: 0,
            len: 8192,
            kind: BackingKind::SharedFile,
        }];
        assert_eq!(
            probe_postcopy(&areas).unwrap_err(),
            "Host backend files need to be TMPFS or HUGETLBFS only"
        );
    }

    #[test]
    fn hugetlb_needs_missing_hugetlbfs() {
        if !usable() {
            return;
        }
        let (offered, _) = query_features().unwrap();
        let areas = [RamArea {
            name: "ram0".into(),
            host_addr: 0,
            len: 2 << 20,
            kind: BackingKind::Hugetlb,
        }];
        let r = probe_postcopy(&areas);
        if offered.contains(FEATURE_MISSING_HUGETLBFS) {
            assert_eq!(r, Ok(()));
        } else {
            assert_eq!(
                r.unwrap_err(),
                "Userfault on this host does not support huge pages"
            );
        }
    }

    #[test]
    fn test_area_offers_copy_zeropage_wake() {
        if !usable() {
            return;
        }
        let (fd, _) = open_fd().unwrap();
        api(&fd, 0).unwrap();
        assert_eq!(test_area_ioctls(&fd, host_page_size()), Ok(()));
    }
}
