//! [`MissingRegistration`]: the destination's guest RAM registered with a userfaultfd in
//! MISSING mode, and the atomic placement of pages into it.
//!
//! Once registered, a first access to a page that has no memory behind it (never written,
//! or discarded with MADV_DONTNEED / MADV_REMOVE) blocks the accessing thread — a vCPU
//! thread inside KVM, or any VMM thread — and queues a fault message. `UFFDIO_COPY` (or
//! `UFFDIO_ZEROPAGE`) then installs the whole page atomically and wakes the waiters; a page
//! that is already present fails with `EEXIST`, which [`Placement::AlreadyPresent`] reports,
//! so two copies of one page (a requested page racing with the background stream) are
//! harmless. Nothing may write registered guest memory directly: a write would fault.
//!
//! memfd memory needs `UFFD_FEATURE_MISSING_SHMEM`; the fd asks for `THREAD_ID` when
//! offered (for `postcopy-blocktime`). The fd is opened without `UFFD_USER_MODE_ONLY`
//! (see [`crate::uffd::open`]): KVM faults on guest pages from kernel mode.

use std::ffi::c_void;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use ram::{BackingKind, GuestRam, PAGE_SIZE};
use userfaultfd::{RegisterMode, Uffd};

use super::PostcopyError;
use crate::uffd::features::{
    FEATURE_MISSING_SHMEM, FEATURE_THREAD_ID, IOCTL_COPY, IOCTL_WAKE, IOCTL_ZEROPAGE,
};

/// One registered host mapping.
#[derive(Debug, Clone, Copy)]
struct Area {
    host: usize,
    len: usize,
    first_page: u64,
}

/// What placing a page did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The page was installed (and its waiters woken).
    Placed,
    /// The page was there already (EEXIST); nothing changed.
    AlreadyPresent,
}

/// A missing-page fault as read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Host address that faulted.
    pub addr: usize,
    /// The faulting thread (0 without `UFFD_FEATURE_THREAD_ID`).
    pub tid: i32,
}

/// Guest RAM registered for missing-page faults.
#[derive(Debug)]
pub struct MissingRegistration {
    uffd: Uffd,
    areas: Vec<Area>,
    thread_ids: bool,
    unregistered: AtomicBool,
}

/// `UFFD_EVENT_PAGEFAULT`.
const EVENT_PAGEFAULT: u8 = 0x12;
/// Bytes of a `struct uffd_msg`.
const MSG_LEN: usize = 32;

fn errno_of(e: &userfaultfd::Error) -> Option<i32> {
    match e {
        userfaultfd::Error::CopyFailed(n) | userfaultfd::Error::ZeropageFailed(n) => {
            Some(*n as i32)
        }
        userfaultfd::Error::SystemError(n) => Some(*n as i32),
        userfaultfd::Error::PartiallyCopied(_) => Some(libc::EAGAIN),
        _ => None,
    }
}

fn ioctl_error(what: &'static str, e: &userfaultfd::Error) -> PostcopyError {
    PostcopyError::Ioctl {
        what,
        errno: match errno_of(e) {
            Some(n) => crate::uffd::open::strerror(&io::Error::from_raw_os_error(n)),
            None => e.to_string(),
        },
    }
}

/// Why `kind` memory cannot be the incoming side of postcopy in Ferry, if it cannot.
pub fn unsupported_backing(kind: BackingKind) -> Option<String> {
    match kind {
        BackingKind::AnonymousPrivate | BackingKind::SharedShmem => None,
        BackingKind::PrivateShmem => Some(
            "postcopy needs shared memfd/tmpfs or anonymous guest memory, not a private mapping of a shmem file"
                .into(),
        ),
        BackingKind::Hugetlb => Some(
            "postcopy with hugetlb guest memory is not supported by Ferry (it places pages 4 KiB at a time)"
                .into(),
        ),
        BackingKind::SharedFile | BackingKind::PrivateFile => {
            Some("Host backend files need to be TMPFS or HUGETLBFS only".into())
        }
    }
}

impl MissingRegistration {
    /// Opens a userfaultfd and registers all of `ram` for missing-page faults.
    pub fn new(ram: &GuestRam) -> Result<Self, PostcopyError> {
        let kind = ram.backing_kind();
        if let Some(why) = unsupported_backing(kind) {
            return Err(PostcopyError::Unsupported(why));
        }
        let (offered, _) = crate::uffd::query_features()?;
        let mut features = 0;
        if kind == BackingKind::SharedShmem {
            if !offered.contains(FEATURE_MISSING_SHMEM) {
                return Err(PostcopyError::Unsupported(
                    "Userfault on this host does not support shared memory".into(),
                ));
            }
            features |= FEATURE_MISSING_SHMEM;
        }
        let thread_ids = offered.contains(FEATURE_THREAD_ID);
        if thread_ids {
            features |= FEATURE_THREAD_ID;
        }
        let opened = crate::uffd::open(features)?;
        let mut reg = MissingRegistration {
            uffd: opened.uffd,
            areas: Vec::new(),
            thread_ids,
            unregistered: AtomicBool::new(false),
        };
        for r in ram.regions() {
            let len = usize::try_from(r.size)
                .map_err(|_| PostcopyError::Unsupported("region too large".into()))?;
            let ioctls = reg
                .uffd
                .register_with_mode(r.host_addr as *mut c_void, len, RegisterMode::MISSING)
                .map_err(|e| ioctl_error("UFFDIO_REGISTER(MISSING)", &e))?;
            reg.areas.push(Area {
                host: r.host_addr,
                len,
                first_page: r.ram_offset / PAGE_SIZE as u64,
            });
            let need = IOCTL_COPY | IOCTL_WAKE | IOCTL_ZEROPAGE;
            if ioctls.bits() & need != need {
                return Err(PostcopyError::Unsupported(format!(
                    "Missing userfault map features: {:x}",
                    !ioctls.bits() & need
                )));
            }
        }
        Ok(reg)
    }

    /// Whether fault messages carry the faulting thread's id.
    pub fn has_thread_ids(&self) -> bool {
        self.thread_ids
    }

    /// The userfaultfd (for poll).
    pub fn raw_fd(&self) -> i32 {
        self.uffd.as_raw_fd()
    }

    /// The RAM page number at host address `addr`, if it lies in guest RAM.
    pub fn page_at(&self, addr: usize) -> Option<u64> {
        self.areas
            .iter()
            .find(|a| addr >= a.host && addr < a.host + a.len)
            .map(|a| a.first_page + ((addr - a.host) / PAGE_SIZE) as u64)
    }

    fn host_of(&self, page: u64) -> Option<usize> {
        self.areas.iter().find_map(|a| {
            let pages = (a.len / PAGE_SIZE) as u64;
            (page >= a.first_page && page < a.first_page + pages)
                .then(|| a.host + ((page - a.first_page) as usize) * PAGE_SIZE)
        })
    }

    fn page_host(&self, page: u64) -> Result<usize, PostcopyError> {
        self.host_of(page)
            .ok_or_else(|| PostcopyError::Protocol(format!("page {page} is outside guest RAM")))
    }

    /// Installs `data` (one page) as page `page`, waking its waiters.
    pub fn place(&self, page: u64, data: &[u8]) -> Result<Placement, PostcopyError> {
        if data.len() != PAGE_SIZE {
            return Err(PostcopyError::Protocol(format!(
                "a page of {} bytes",
                data.len()
            )));
        }
        let dst = self.page_host(page)?;
        let mut tries = 0;
        loop {
            // SAFETY: `dst` is a page of registered guest RAM (an area of this registration)
            // and `data` a live buffer of PAGE_SIZE bytes; the kernel copies between them.
            let r = unsafe {
                self.uffd
                    .copy(data.as_ptr().cast(), dst as *mut c_void, PAGE_SIZE, true)
            };
            match r {
                Ok(_) => return Ok(Placement::Placed),
                Err(e) => match errno_of(&e) {
                    Some(libc::EEXIST) => return Ok(Placement::AlreadyPresent),
                    // mmap_changing (an madvise in flight): try again.
                    Some(libc::EAGAIN) if tries < 10_000 => {
                        tries += 1;
                        std::thread::yield_now();
                    }
                    _ => return Err(ioctl_error("UFFDIO_COPY", &e)),
                },
            }
        }
    }

    /// Installs a zero page as page `page`, waking its waiters.
    pub fn place_zero(&self, page: u64) -> Result<Placement, PostcopyError> {
        let dst = self.page_host(page)?;
        let mut tries = 0;
        loop {
            // SAFETY: `dst` is a page of registered guest RAM of this registration.
            let r = unsafe { self.uffd.zeropage(dst as *mut c_void, PAGE_SIZE, true) };
            match r {
                Ok(_) => return Ok(Placement::Placed),
                Err(e) => match errno_of(&e) {
                    Some(libc::EEXIST) => return Ok(Placement::AlreadyPresent),
                    Some(libc::EAGAIN) if tries < 10_000 => {
                        tries += 1;
                        std::thread::yield_now();
                    }
                    _ => return Err(ioctl_error("UFFDIO_ZEROPAGE", &e)),
                },
            }
        }
    }

    /// Wakes threads waiting on page `page` (after it became present some other way).
    pub fn wake(&self, page: u64) -> Result<(), PostcopyError> {
        let host = self.page_host(page)?;
        self.uffd
            .wake(host as *mut c_void, PAGE_SIZE)
            .map_err(|e| ioctl_error("UFFDIO_WAKE", &e))
    }

    /// Reads the pending fault messages (non-blocking) into `out`; returns how many.
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> io::Result<usize> {
        let mut buf = [0u8; MSG_LEN * 64];
        // SAFETY: reading into a live local buffer of the length passed.
        let n = unsafe { libc::read(self.raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(e),
            };
        }
        let n = n as usize;
        let before = out.len();
        for m in buf[..n - n % MSG_LEN].chunks_exact(MSG_LEN) {
            if m[0] != EVENT_PAGEFAULT {
                continue;
            }
            let mut a = [0u8; 8];
            a.copy_from_slice(&m[16..24]);
            let tid = i32::from_ne_bytes([m[24], m[25], m[26], m[27]]);
            out.push(Fault {
                addr: u64::from_ne_bytes(a) as usize,
                tid: if self.thread_ids { tid } else { 0 },
            });
        }
        Ok(out.len() - before)
    }

    /// Unregisters all of RAM, waking every waiting thread; pages still missing then read as
    /// zero without a fault. Idempotent.
    pub fn unregister(&self) {
        if self.unregistered.swap(true, Ordering::AcqRel) {
            return;
        }
        for a in &self.areas {
            if let Err(e) = self.uffd.unregister(a.host as *mut c_void, a.len) {
                eprintln!(
                    "ferry: postcopy: unregistering guest RAM from userfaultfd failed: {}",
                    ioctl_error("UFFDIO_UNREGISTER", &e)
                );
            }
        }
    }
}

impl Drop for MissingRegistration {
    fn drop(&mut self) {
        self.unregister();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ram::{Backend, MemoryConfig};
    use std::sync::Arc;
    use std::time::Duration;

    fn usable() -> bool {
        match crate::uffd::query_features() {
            Ok(_) => true,
            Err(e) => {
                eprintln!("skipping: {e}");
                false
            }
        }
    }

    fn ram(backend: Backend) -> Arc<GuestRam> {
        Arc::new(
            GuestRam::new(&MemoryConfig {
                size: 4 << 20,
                backend,
                ..MemoryConfig::default()
            })
            .unwrap(),
        )
    }

    #[test]
    fn a_thread_touching_a_missing_page_waits_until_the_page_is_placed() {
        if !usable() {
            return;
        }
        for backend in [Backend::SharedMemfd, Backend::AnonymousPrivate] {
            let ram = ram(backend.clone());
            ram.write_page(2, &[7u8; PAGE_SIZE]).unwrap();
            let reg = MissingRegistration::new(&ram).unwrap();
            ram.discard(2 * PAGE_SIZE as u64, PAGE_SIZE as u64).unwrap();
            let r = ram.clone();
            let reader = std::thread::spawn(move || r.page(2).unwrap()[100]);
            // The reader blocks in a fault: read the message.
            let mut faults = Vec::new();
            for _ in 0..500 {
                reg.read_faults(&mut faults).unwrap();
                if !faults.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            assert_eq!(faults.len(), 1, "{backend:?}: one fault");
            assert_eq!(reg.page_at(faults[0].addr), Some(2));
            if reg.has_thread_ids() {
                assert_ne!(faults[0].tid, 0);
            }
            assert!(!reader.is_finished(), "the reader waits for the page");
            assert_eq!(reg.place(2, &[9u8; PAGE_SIZE]).unwrap(), Placement::Placed);
            assert_eq!(reader.join().unwrap(), 9, "{backend:?}");
            // Present now: a second copy changes nothing.
            assert_eq!(
                reg.place(2, &[1u8; PAGE_SIZE]).unwrap(),
                Placement::AlreadyPresent
            );
            assert_eq!(
                reg.place_zero(2).unwrap(),
                Placement::AlreadyPresent,
                "{backend:?}"
            );
            assert_eq!(ram.page(2).unwrap()[0], 9);
            // A missing page zero-filled.
            assert_eq!(reg.place_zero(5).unwrap(), Placement::Placed);
            assert!(ram.page(5).unwrap().iter().all(|&b| b == 0));
            assert!(reg.place(ram.page_count(), &[0u8; PAGE_SIZE]).is_err());
        }
    }

    #[test]
    fn hugetlb_and_disk_files_are_refused_with_a_reason() {
        assert!(unsupported_backing(BackingKind::Hugetlb).is_some());
        assert_eq!(
            unsupported_backing(BackingKind::SharedFile).unwrap(),
            "Host backend files need to be TMPFS or HUGETLBFS only"
        );
        assert!(unsupported_backing(BackingKind::SharedShmem).is_none());
        assert!(unsupported_backing(BackingKind::AnonymousPrivate).is_none());
    }
}
