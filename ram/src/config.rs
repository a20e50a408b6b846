//! What the user asks for: `--memory SIZE[,backend=..][,mem-path=FILE][,share=on|off][,prealloc=on][,hugepages=thp|hugetlb]`.
//!
//! | option | guest memory is | notes |
//! |---|---|---|
//! | *(default)*, `backend=memfd` | a memfd mapped shared | write-protectable (background snapshots), shareable with another process (`ferry upgrade`) |
//! | `backend=anon` (or `share=off`) | anonymous private memory | the cheapest to fault in; with `hugepages=thp` the fastest to receive into |
//! | `mem-path=FILE[,share=on\|off]` | the file, mapped shared (`on`: guest writes reach the file) or private (`off`, the default: copy on write, the file never changes) | like QEMU's memory-backend-file: /dev/shm, a hugetlbfs mount or a plain file; its contents are the guest's memory at boot; a shorter file is extended, a read-only file is fine with `share=off` |
//! | `hugepages=thp` | MADV_HUGEPAGE on 2 MiB-aligned mappings | anonymous memory follows /sys/kernel/mm/transparent_hugepage/enabled, memfd/tmpfs memory its `shmem_enabled` (a warning says when the host's policy gives none) |
//! | `hugepages=hugetlb` | MFD_HUGETLB / MAP_HUGETLB (or a file on hugetlbfs) | the host must have enough free huge pages reserved (`/proc/sys/vm/nr_hugepages`); Ferry refuses to start otherwise, naming the numbers |
//! | `prealloc=on` | every page faulted in at start | MADV_POPULATE_WRITE on all CPUs, with a progress line for guests of 1 GiB or more |
//!
//! A booting test guest writes its GDT, page tables, code, banner, mailboxes and stacks into
//! the first 2 MiB of RAM: with `mem-path` those bytes of the file's image are overwritten
//! (in the file itself with `share=on`). The rest of the file stays as it was unless the
//! guest's working set (from 2 MiB on) covers it. An incoming guest writes nothing at start.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::size::parse_size_default_unit;

/// Where guest RAM lives on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backend {
    /// A memfd mapped MAP_SHARED: the default. Write-protectable, shareable with other processes.
    SharedMemfd,
    /// Anonymous MAP_PRIVATE memory.
    AnonymousPrivate,
    /// A file (like QEMU's memory-backend-file): its contents are the guest's memory at boot.
    File {
        /// Path of the file (/dev/shm/..., a hugetlbfs mount, a plain file).
        path: PathBuf,
        /// MAP_SHARED (`share=on`: guest writes reach the file) or MAP_PRIVATE.
        share: bool,
    },
}

impl Backend {
    /// Whether the mapping is MAP_SHARED (its pages are shared with the backing object).
    pub fn is_shared(&self) -> bool {
        match self {
            Backend::SharedMemfd => true,
            Backend::AnonymousPrivate => false,
            Backend::File { share, .. } => *share,
        }
    }
}

/// Huge page policy for guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum HugePages {
    /// Base pages only (the kernel may still use THP per its global policy).
    #[default]
    None,
    /// Transparent huge pages requested with MADV_HUGEPAGE.
    Thp,
    /// hugetlb pages (MFD_HUGETLB / MAP_HUGETLB); the host must have them reserved.
    Hugetlb,
}

/// A complete guest memory request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Guest RAM size in bytes (a multiple of 2 MiB).
    pub size: u64,
    /// Host backing.
    pub backend: Backend,
    /// Huge page policy.
    pub hugepages: HugePages,
    /// Populate all memory at start.
    pub prealloc: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: 512 << 20,
            backend: Backend::SharedMemfd,
            hugepages: HugePages::None,
            prealloc: false,
        }
    }
}

/// Why a `--memory` string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryConfigError {
    /// The size part is not a size.
    #[error("memory size: {0}")]
    Size(#[from] crate::size::SizeError),
    /// Size zero, not a multiple of 2 MiB, or too small to hold the guest.
    #[error("memory size {0} must be a non-zero multiple of 2 MiB")]
    BadSize(u64),
    /// An option name Ferry does not know.
    #[error("unknown memory option '{0}' (known: backend, mem-path, share, prealloc, hugepages)")]
    UnknownOption(String),
    /// A bad value for a known option.
    #[error("memory option '{name}' does not accept '{value}'")]
    BadValue {
        /// Option name.
        name: String,
        /// Value given.
        value: String,
    },
    /// Options that contradict each other.
    #[error("{0}")]
    Conflict(String),
}

fn parse_on_off(name: &str, value: &str) -> Result<bool, MemoryConfigError> {
    match value {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(MemoryConfigError::BadValue {
            name: name.to_string(),
            value: value.to_string(),
        }),
    }
}

impl FromStr for MemoryConfig {
    type Err = MemoryConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let size_text = parts.next().unwrap_or_default();
        let size = parse_size_default_unit(size_text, 1 << 20)?;
        if size == 0 || size % (2 << 20) != 0 {
            return Err(MemoryConfigError::BadSize(size));
        }
        let mut backend_name: Option<String> = None;
        let mut path: Option<PathBuf> = None;
        let mut share: Option<bool> = None;
        let mut cfg = MemoryConfig {
            size,
            ..MemoryConfig::default()
        };
        for part in parts {
            let (name, value) = part.split_once('=').unwrap_or((part, "on"));
            match name {
                "backend" => backend_name = Some(value.to_string()),
                "mem-path" => path = Some(PathBuf::from(value)),
                "share" => share = Some(parse_on_off(name, value)?),
                "prealloc" => cfg.prealloc = parse_on_off(name, value)?,
                "hugepages" => {
                    cfg.hugepages = match value {
                        "thp" => HugePages::Thp,
                        "hugetlb" => HugePages::Hugetlb,
                        "off" | "none" => HugePages::None,
                        _ => {
                            return Err(MemoryConfigError::BadValue {
                                name: name.to_string(),
                                value: value.to_string(),
                            })
                        }
                    }
                }
                _ => return Err(MemoryConfigError::UnknownOption(name.to_string())),
            }
        }
        cfg.backend = match (backend_name.as_deref(), path) {
            (None | Some("file"), Some(path)) => Backend::File {
                path,
                share: share.unwrap_or(false),
            },
            (Some("file"), None) => {
                return Err(MemoryConfigError::Conflict(
                    "backend=file needs mem-path=FILE".to_string(),
                ))
            }
            (Some(other), Some(_)) => {
                return Err(MemoryConfigError::Conflict(format!(
                    "mem-path is only valid with backend=file, not backend={other}"
                )))
            }
            (None | Some("memfd"), None) => {
                if share == Some(false) {
                    Backend::AnonymousPrivate
                } else {
                    Backend::SharedMemfd
                }
            }
            (Some("anon") | Some("private"), None) => {
                if share == Some(true) {
                    return Err(MemoryConfigError::Conflict(
                        "backend=anon is private memory; use backend=memfd for share=on"
                            .to_string(),
                    ));
                }
                Backend::AnonymousPrivate
            }
            (Some(other), None) => {
                return Err(MemoryConfigError::BadValue {
                    name: "backend".to_string(),
                    value: other.to_string(),
                })
            }
        };
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_shared_memfd() {
        let c: MemoryConfig = "512M".parse().unwrap();
        assert_eq!(c.size, 512 << 20);
        assert_eq!(c.backend, Backend::SharedMemfd);
        assert!(!c.prealloc);
        let c: MemoryConfig = "1024".parse().unwrap();
        assert_eq!(c.size, 1 << 30, "bare numbers are MiB, as with QEMU's -m");
    }

    #[test]
    fn parses_every_option() {
        let c: MemoryConfig = "2G,mem-path=/dev/shm/x,share=on,prealloc=on,hugepages=thp"
            .parse()
            .unwrap();
        assert_eq!(
            c.backend,
            Backend::File {
                path: "/dev/shm/x".into(),
                share: true
            }
        );
        assert!(c.prealloc);
        assert_eq!(c.hugepages, HugePages::Thp);
        let c: MemoryConfig = "64M,backend=anon".parse().unwrap();
        assert_eq!(c.backend, Backend::AnonymousPrivate);
        let c: MemoryConfig = "64M,share=off".parse().unwrap();
        assert_eq!(c.backend, Backend::AnonymousPrivate);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            "3M".parse::<MemoryConfig>(),
            Err(MemoryConfigError::BadSize(_))
        ));
        assert!(matches!(
            "0".parse::<MemoryConfig>(),
            Err(MemoryConfigError::BadSize(_))
        ));
        assert!(matches!(
            "64M,colour=red".parse::<MemoryConfig>(),
            Err(MemoryConfigError::UnknownOption(_))
        ));
        assert!(matches!(
            "64M,share=maybe".parse::<MemoryConfig>(),
            Err(MemoryConfigError::BadValue { .. })
        ));
        assert!(matches!(
            "64M,backend=file".parse::<MemoryConfig>(),
            Err(MemoryConfigError::Conflict(_))
        ));
        assert!(matches!(
            "64M,backend=anon,share=on".parse::<MemoryConfig>(),
            Err(MemoryConfigError::Conflict(_))
        ));
    }
}
