//! Host mappings for guest RAM: memfd, anonymous, file; huge pages; preallocation.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{Backend, HugePages};

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
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| RamError::OpenFile {
            path: path.to_path_buf(),
            source,
        })?;
    let len = file
        .metadata()
        .map_err(|source| RamError::OpenFile {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    // A mapping beyond EOF would SIGBUS: grow the file to the guest's size, as QEMU does.
    let _ = shared;
    if len < size {
        file.set_len(size)
            .map_err(|source| RamError::Truncate { size, source })?;
    }
    Ok(file)
}

/// Creates the backing object for `size` bytes of guest RAM.
pub fn create_backing(
    backend: &Backend,
    size: u64,
    hugepages: HugePages,
) -> Result<Backing, RamError> {
    let hugetlb = hugepages == HugePages::Hugetlb;
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

/// Maps `size` bytes of `backing` at file offset `offset`; returns the host address.
pub fn map_region(backing: &Backing, offset: u64, size: u64) -> Result<*mut u8, RamError> {
    let len = usize::try_from(size).map_err(|_| RamError::Mmap {
        size,
        source: io::Error::from_raw_os_error(libc::ENOMEM),
    })?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let mut flags = libc::MAP_NORESERVE;
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
    // SAFETY: a fresh mapping chosen by the kernel (addr NULL); it touches no existing memory.
    let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, file_offset) };
    if ptr == libc::MAP_FAILED {
        let source = io::Error::last_os_error();
        return Err(if backing.hugetlb {
            RamError::NoHugetlbPages(source)
        } else {
            RamError::Mmap { size, source }
        });
    }
    Ok(ptr.cast())
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
