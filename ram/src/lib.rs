//! Guest memory for Ferry.
//!
//! A guest's RAM is one or two host mappings ("regions") laid out in guest
//! physical address space like a PC: RAM below 3 GiB, and the rest above
//! 4 GiB so that the range just under 4 GiB stays free for KVM's own pages.
//! Every region is addressed two ways:
//! - by guest physical address (GPA), what the guest and KVM see;
//! - by *RAM offset*, the position in the concatenation of all regions, what
//!   migration sees: one dense space of pages, one bit per page in a bitmap.
//!
//! Backing is chosen by [`MemoryConfig`]: a shared memfd (default, so
//! userfaultfd write-protect and other processes can use it), anonymous
//! private memory, or a file (`mem-path`), optionally with transparent or
//! hugetlb huge pages and preallocation.

pub mod access;
pub mod backend;
pub mod bitmap;
pub mod config;
pub mod geometry;
pub mod guest_ram;
pub mod layout;
pub mod populate;
pub mod residency;
pub mod size;

pub use access::{is_zero_page, page_hash};
pub use backend::{BackingKind, RamError};
pub use bitmap::AtomicBitmap;
pub use config::{Backend, HugePages, MemoryConfig};
pub use geometry::{pages_for, PAGE_SHIFT, PAGE_SIZE};
pub use guest_ram::{GuestRam, RamRegion};
pub use populate::{BackgroundPopulate, PopulateStats};
pub use size::{parse_size, parse_size_default_unit, SizeError};
