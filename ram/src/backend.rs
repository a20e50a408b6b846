//! Host mappings for guest RAM: memfd, anonymous, file; huge pages; preallocation.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{Backend, HugePages};
use crate::geometry::HUGE_PAGE_SIZE;

/// What kind of kernel memory backs a mapping (it decides what userfaultfd can do with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackingKind {
    /// Anonymous private memory.
    AnonymousPrivate,
    /// Shared shmem (memfd, or a file on tmpfs mapped shared).
    SharedShmem,
    /// A private mapping of a shmem file (copy-on-write).
    PrivateShmem,
    /// hugetlbfs / MFD_HUGETLB memory, shared or private.
    Hugetlb,
    /// A regular file on a disk file system, mapped shared.
    SharedFile,
    /// A regular file on a disk file system, mapped private.
    PrivateFile,
}

/// Errors from creating or preparing guest RAM.
#[derive(Debug, Error)]
pub enum RamError {
    /// memfd_create failed.
    #[error("cannot create the guest memory memfd: {0}")]
    Memfd(#[source] io::Error),
    /// The backing could not be sized.
    #[error("cannot size the guest memory backing to {size} bytes: {source}")]
    Truncate {
        /// Requested size.
        size: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// mmap failed.
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Mmap {
        /// Requested size.
        size: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// hugetlb asked for but the host has none reserved.
    #[error(
        "hugetlb pages requested but the host has none free (see /proc/sys/vm/nr_hugepages): {0}"
    )]
    NoHugetlbPages(#[source] io::Error),
    /// The mem-path file could not be opened.
    #[error("cannot open memory file {path}: {source}")]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A memory file shorter than the guest that cannot be extended (private mapping of a read-only file, ...).
    #[error("memory file {path} is {actual} bytes, smaller than the guest's {wanted}")]
    FileTooSmall {
        /// The file.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// Guest RAM size.
        wanted: u64,
    },
    /// madvise failed.
    #[error("madvise({what}) on guest memory failed: {source}")]
    Madvise {
        /// Which advice.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An address outside guest RAM.
    #[error("guest address {0:#x} is not in guest RAM")]
    OutOfRange(u64),
    /// hugetlb asked for but fewer free huge pages than the guest needs.
    #[error(
        "hugetlb pages requested: the guest needs {needed} free {page_kib} KiB huge pages but the \
         host has {free} free of {total} reserved (raise /proc/sys/vm/nr_hugepages, or use \
         hugepages=thp)"
    )]
    NotEnoughHugetlbPages {
        /// Huge pages the guest needs.
        needed: u64,
        /// Free huge pages on the host.
        free: u64,
        /// Huge pages reserved on the host.
        total: u64,
        /// Huge page size in KiB.
        page_kib: u64,
    },
    /// Writing guest memory through its backing file failed.
    #[error("cannot write guest memory at RAM offset {ram_offset:#x}: {source}")]
    Write {
        /// Where.
        ram_offset: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A helper thread could not be started.
    #[error("cannot start a guest memory thread: {0}")]
    Thread(#[source] io::Error),
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// The object behind all regions of a guest's RAM: a file descriptor (memfd or file) or nothing (anonymous).
#[derive(Debug)]
pub struct Backing {
    /// The memfd or file, when there is one.
    pub file: Option<File>,
    /// Kind of memory, for the write-tracking probe.
    pub kind: BackingKind,
    /// MAP_SHARED or MAP_PRIVATE.
    pub shared: bool,
    /// hugetlb pages.
    pub hugetlb: bool,
}

fn fs_magic(file: &File) -> io::Result<i64> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs writes a statfs struct into the provided buffer for a valid fd.
    let r = unsafe { libc::fstatfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatfs succeeded, so the struct is initialised.
    let st = unsafe { st.assume_init() };
    Ok(st.f_type)
}

fn memfd(name: &str, hugetlb: bool) -> Result<File, RamError> {
    let cname = CString::new(name).map_err(|e| RamError::Memfd(io::Error::other(e)))?;
    let mut flags = libc::MFD_CLOEXEC;
    if hugetlb {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(RamError::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn open_mem_file(path: &Path, size: u64, shared: bool) -> Result<File, RamError> {
    let open_err = |source| RamError::OpenFile {
        path: path.to_path_buf(),
        source,
    };
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
    {
        Ok(f) => f,
        // A private mapping never writes to the file: a read-only file (an image on a
        // read-only mount, a file the user may not write) is enough when it is big enough.
        Err(e)
            if !shared
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EACCES | libc::EROFS | libc::EPERM)
                ) =>
        {
            OpenOptions::new().read(true).open(path).map_err(open_err)?
        }
        Err(e) => return Err(open_err(e)),
    };
    let len = file.metadata().map_err(open_err)?.len();
    // A mapping beyond EOF would SIGBUS: grow the file to the guest's size, as QEMU does.
    if len < size {
        file.set_len(size).map_err(|source| {
            if source.raw_os_error() == Some(libc::EBADF)
                || source.raw_os_error() == Some(libc::EINVAL)
            {
                RamError::FileTooSmall {
                    path: path.to_path_buf(),
                    actual: len,
                    wanted: size,
                }
            } else {
                RamError::Truncate { size, source }
            }
        })?;
    }
    Ok(file)
}

/// Huge page counts of the host, from /proc/meminfo: (total, free, size in KiB).
pub fn hugetlb_pages() -> Option<(u64, u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    Some((
        field("HugePages_Total")?,
        field("HugePages_Free")?,
        field("Hugepagesize")?,
    ))
}

/// Refuses a hugetlb guest the host's free huge pages cannot hold (instead of a SIGBUS
/// on the first fault beyond them).
fn check_hugetlb(size: u64) -> Result<(), RamError> {
    let Some((total, free, page_kib)) = hugetlb_pages() else {
        return Ok(());
    };
    let needed = size.div_ceil(page_kib.max(1) << 10);
    if free < needed {
        return Err(RamError::NotEnoughHugetlbPages {
            needed,
            free,
            total,
            page_kib,
        });
    }
    Ok(())
}

/// Creates the backing object for `size` bytes of guest RAM.
pub fn create_backing(
    backend: &Backend,
    size: u64,
    hugepages: HugePages,
) -> Result<Backing, RamError> {
    let hugetlb = hugepages == HugePages::Hugetlb;
    if hugetlb && !matches!(backend, Backend::File { .. }) {
        check_hugetlb(size)?;
    }
    match backend {
        Backend::SharedMemfd => {
            let file = memfd("ferry-guest-ram", hugetlb)?;
            file.set_len(size).map_err(|source| {
                if hugetlb {
                    RamError::NoHugetlbPages(source)
                } else {
                    RamError::Truncate { size, source }
                }
            })?;
            Ok(Backing {
                file: Some(file),
                kind: if hugetlb {
                    BackingKind::Hugetlb
                } else {
                    BackingKind::SharedShmem
                },
                shared: true,
                hugetlb,
            })
        }
        Backend::AnonymousPrivate => Ok(Backing {
            file: None,
            kind: if hugetlb {
                BackingKind::Hugetlb
            } else {
                BackingKind::AnonymousPrivate
            },
            shared: false,
            hugetlb,
        }),
        Backend::File { path, share } => {
            let file = open_mem_file(path, size, *share)?;
            let magic = fs_magic(&file).unwrap_or(0);
            if magic == HUGETLBFS_MAGIC {
                // Pages already in the file are the guest's; only the rest must be free.
                let held = file_allocated_bytes(&file);
                check_hugetlb(size.saturating_sub(held))?;
            } else if hugetlb {
                return Err(RamError::Mmap {
                    size,
                    source: io::Error::other(format!(
                        "hugepages=hugetlb with mem-path needs a file on a hugetlbfs mount; {} is not on one",
                        path.display()
                    )),
                });
            }
            let kind = match (magic, *share) {
                (HUGETLBFS_MAGIC, _) => BackingKind::Hugetlb,
                (TMPFS_MAGIC, true) => BackingKind::SharedShmem,
                (TMPFS_MAGIC, false) => BackingKind::PrivateShmem,
                (_, true) => BackingKind::SharedFile,
                (_, false) => BackingKind::PrivateFile,
            };
            Ok(Backing {
                file: Some(file),
                kind,
                shared: *share,
                hugetlb: magic == HUGETLBFS_MAGIC,
            })
        }
    }
}

/// Bytes of storage a file holds (st_blocks), for a hugetlbfs file the pages it already has.
fn file_allocated_bytes(file: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Reserves `len` bytes of address space aligned to [`HUGE_PAGE_SIZE`]; returns its start.
///
/// Guest RAM is mapped at 2 MiB-aligned host addresses so that transparent huge pages
/// can back it, and so that KVM can map it into the guest with 2 MiB entries (it needs the
/// host address and the guest address to agree modulo 2 MiB).
fn reserve_aligned(len: usize) -> Result<usize, RamError> {
    let align = HUGE_PAGE_SIZE;
    let total = len + align;
    // SAFETY: a fresh PROT_NONE reservation chosen by the kernel; it touches no memory.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(RamError::Mmap {
            size: len as u64,
            source: io::Error::last_os_error(),
        });
    }
    let start = p as usize;
    let aligned = start.next_multiple_of(align);
    let head = aligned - start;
    let tail = total - head - len;
    // SAFETY: both ranges are parts of the reservation just made, outside [aligned, +len).
    unsafe {
        if head > 0 {
            libc::munmap(p, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    Ok(aligned)
}

/// Maps `size` bytes of `backing` at file offset `offset`; returns the host address
/// (2 MiB aligned).
pub fn map_region(backing: &Backing, offset: u64, size: u64) -> Result<*mut u8, RamError> {
    let len = usize::try_from(size).map_err(|_| RamError::Mmap {
        size,
        source: io::Error::from_raw_os_error(libc::ENOMEM),
    })?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // hugetlb mappings keep their reservation: without one, running out of huge pages is a
    // SIGBUS at the first fault that finds none instead of an error here.
    let mut flags = if backing.hugetlb {
        0
    } else {
        libc::MAP_NORESERVE
    };
    flags |= if backing.shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    let fd = match &backing.file {
        Some(f) => f.as_raw_fd(),
        None => {
            flags |= libc::MAP_ANONYMOUS;
            if backing.hugetlb {
                flags |= libc::MAP_HUGETLB;
            }
            -1
        }
    };
    let file_offset = if backing.file.is_some() {
        offset as libc::off_t
    } else {
        0
    };
    let at = reserve_aligned(len)?;
    // SAFETY: MAP_FIXED over the reservation made just above for exactly this range, which
    // nothing else uses; it replaces only that reservation.
    let ptr = unsafe {
        libc::mmap(
            at as *mut libc::c_void,
            len,
            prot,
            flags | libc::MAP_FIXED,
            fd,
            file_offset,
        )
    };
    if ptr == libc::MAP_FAILED {
        let source = io::Error::last_os_error();
        // SAFETY: the reservation is ours and unused.
        unsafe { libc::munmap(at as *mut libc::c_void, len) };
        return Err(if backing.hugetlb {
            RamError::NoHugetlbPages(source)
        } else {
            RamError::Mmap { size, source }
        });
    }
    Ok(ptr.cast())
}

/// Maps `len` bytes of `file` at file offset `offset` shared, exactly over the existing
/// mapping at `addr` (MAP_FIXED replaces it atomically; the address stays valid).
pub fn map_shared_fixed(addr: *mut u8, len: u64, file: &File, offset: u64) -> Result<(), RamError> {
    let size = usize::try_from(len).map_err(|_| RamError::Mmap {
        size: len,
        source: io::Error::from_raw_os_error(libc::ENOMEM),
    })?;
    // SAFETY: `addr`/`len` is a mapping this GuestRam made and owns; MAP_FIXED replaces
    // exactly that range with the file's pages. The caller guarantees nothing accesses the
    // range while it is replaced.
    let ptr = unsafe {
        libc::mmap(
            addr.cast(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED || ptr.cast() != addr {
        return Err(RamError::Mmap {
            size: len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Applies `advice` to a mapping.
pub fn madvise(addr: *mut u8, len: usize, advice: i32, what: &'static str) -> Result<(), RamError> {
    // SAFETY: addr/len describe a mapping owned by the caller; madvise does not invalidate it
    // for the advice values Ferry uses (HUGEPAGE, POPULATE_WRITE, DONTDUMP).
    let r = unsafe { libc::madvise(addr.cast(), len, advice) };
    if r != 0 {
        return Err(RamError::Madvise {
            what,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// MADV_POPULATE_WRITE (Linux 5.14), not yet in every libc.
pub const MADV_POPULATE_WRITE: i32 = 23;

/// Whether transparent huge pages can back `shared` (shmem) or private anonymous memory
/// that asks for them with MADV_HUGEPAGE; `Err` says why not, from the host's policy in
/// /sys/kernel/mm/transparent_hugepage.
pub fn thp_available(shared: bool) -> Result<(), String> {
    let (file, ok): (&str, &[&str]) = if shared {
        (
            "shmem_enabled",
            &["always", "within_size", "advise", "force"],
        )
    } else {
        ("enabled", &["always", "madvise"])
    };
    let path = format!("/sys/kernel/mm/transparent_hugepage/{file}");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("transparent huge pages unavailable ({path}: {e})"))?;
    let active = bracketed(&text);
    if ok.contains(&active) {
        Ok(())
    } else {
        Err(format!(
            "transparent huge pages for {} memory are off on this host ({path} is [{active}])",
            if shared {
                "shared (memfd/tmpfs)"
            } else {
                "anonymous"
            }
        ))
    }
}

/// The active choice of a sysfs policy file: the bracketed word of "always [madvise] never".
fn bracketed(text: &str) -> &str {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .unwrap_or("")
}

/// Populates (faults in, writable) `len` bytes at `addr`, spread over `threads` threads.
pub fn populate(addr: *mut u8, len: usize, threads: usize) -> Result<(), RamError> {
    let threads = threads.max(1);
    let chunk = len
        .div_ceil(threads)
        .next_multiple_of(crate::geometry::HUGE_PAGE_SIZE);
    let base = addr as usize;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .filter_map(|i| {
                let start = i * chunk;
                (start < len).then(|| {
                    let this = chunk.min(len - start);
                    s.spawn(move || {
                        madvise(
                            (base + start) as *mut u8,
                            this,
                            MADV_POPULATE_WRITE,
                            "POPULATE_WRITE",
                        )
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().unwrap_or(Ok(())))
    })
}

/// Unmaps a mapping created by [`map_region`].
///
/// # Safety
/// `addr`/`len` must be exactly a mapping returned by [`map_region`] that nothing uses any more.
pub unsafe fn unmap(addr: *mut u8, len: usize) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        libc::munmap(addr.cast(), len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MemoryConfig;
    use crate::guest_ram::GuestRam;

    fn cfg(size: u64, backend: Backend, hugepages: HugePages) -> MemoryConfig {
        MemoryConfig {
            size,
            backend,
            hugepages,
            prealloc: false,
        }
    }

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ferry-backend-{}-{name}", std::process::id()))
    }

    #[test]
    fn regions_are_mapped_at_2mib_aligned_addresses() {
        for backend in [Backend::SharedMemfd, Backend::AnonymousPrivate] {
            let r = GuestRam::new(&cfg(6 << 20, backend.clone(), HugePages::None)).unwrap();
            for reg in r.regions() {
                assert_eq!(reg.host_addr % HUGE_PAGE_SIZE, 0, "{backend:?}");
            }
            r.write_u64((6 << 20) - 8, 5).unwrap();
            assert_eq!(r.read_u64((6 << 20) - 8).unwrap(), 5);
        }
    }

    #[test]
    fn hugetlb_without_free_pages_is_a_clear_error() {
        let Some((_, free, page_kib)) = hugetlb_pages() else {
            return;
        };
        let size = 64 << 20;
        if free * (page_kib << 10) >= size {
            eprintln!("this host has {free} free huge pages: nothing to check");
            return;
        }
        for backend in [Backend::SharedMemfd, Backend::AnonymousPrivate] {
            let e = GuestRam::new(&cfg(size, backend, HugePages::Hugetlb)).unwrap_err();
            assert!(
                matches!(e, RamError::NotEnoughHugetlbPages { needed: 32, .. }),
                "{e}"
            );
            assert!(e.to_string().contains("nr_hugepages"), "{e}");
        }
    }

    #[test]
    fn hugetlb_with_a_file_off_hugetlbfs_is_refused() {
        let path = temp("not-hugetlbfs");
        let e = GuestRam::new(&cfg(
            4 << 20,
            Backend::File {
                path: path.clone(),
                share: true,
            },
            HugePages::Hugetlb,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("hugetlbfs"), "{e}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_file_is_the_guests_memory_and_grows_to_its_size() {
        use std::os::unix::fs::FileExt;
        let path = temp("image");
        std::fs::write(&path, vec![0x5au8; 8192]).unwrap();
        {
            let r = GuestRam::new(&cfg(
                4 << 20,
                Backend::File {
                    path: path.clone(),
                    share: true,
                },
                HugePages::None,
            ))
            .unwrap();
            assert_eq!(r.page(1).unwrap()[4095], 0x5a, "the file's bytes at boot");
            assert!(r.is_zero(2), "the extension reads as zero");
            r.write_u64(3 * 4096, 0xfeed).unwrap();
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
        let mut b = [0u8; 8];
        File::open(&path)
            .unwrap()
            .read_exact_at(&mut b, 3 * 4096)
            .unwrap();
        assert_eq!(
            u64::from_le_bytes(b),
            0xfeed,
            "share=on writes reach the file"
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_private_mapping_of_a_read_only_file_works_and_leaves_it_unchanged() {
        use std::os::unix::fs::PermissionsExt;
        let path = temp("readonly");
        std::fs::write(&path, vec![7u8; 4 << 20]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        // Root may open it for writing anyway; either way the mapping must be private.
        let r = GuestRam::new(&cfg(
            4 << 20,
            Backend::File {
                path: path.clone(),
                share: false,
            },
            HugePages::None,
        ))
        .unwrap();
        assert_eq!(r.backing_kind(), BackingKind::PrivateFile);
        r.write_u64(0, 0).unwrap();
        assert_eq!(r.read_u64(0).unwrap(), 0);
        drop(r);
        assert_eq!(std::fs::read(&path).unwrap()[..8], [7u8; 8]);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn thp_gives_anonymous_memory_huge_pages_where_the_host_allows() {
        if let Err(why) = thp_available(false) {
            eprintln!("skipped: {why}");
            return;
        }
        let r = GuestRam::new(&cfg(16 << 20, Backend::AnonymousPrivate, HugePages::Thp)).unwrap();
        r.populate(1).unwrap();
        let start = r.regions()[0].host_addr;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        // The mapping's block starts with its address range; AnonHugePages follows.
        let block = smaps
            .split_inclusive('\n')
            .skip_while(|l| !l.starts_with(&format!("{start:x}-")))
            .take_while(|l| !l.starts_with("VmFlags"))
            .collect::<String>();
        let huge_kib: u64 = block
            .lines()
            .find_map(|l| l.strip_prefix("AnonHugePages:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        assert!(huge_kib >= 2048, "no huge pages in:\n{block}");
    }

    #[test]
    fn thp_policy_is_the_bracketed_word() {
        assert_eq!(bracketed("always [madvise] never\n"), "madvise");
        assert_eq!(
            bracketed("always within_size advise [never] deny force"),
            "never"
        );
        assert_eq!(bracketed("garbage"), "");
    }
}
