//! userfaultfd feature and ioctl bits (`linux/userfaultfd.h`), defined here
//! because Debian 12's headers and the `userfaultfd` crate lack the newer ones.

use serde::Serialize;

/// `UFFD_API`: the only API version.
pub const UFFD_API: u64 = 0xAA;

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults.
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_EVENT_FORK`.
pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
/// `UFFD_FEATURE_EVENT_REMAP`.
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `UFFD_FEATURE_EVENT_REMOVE`.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFD_FEATURE_MISSING_HUGETLBFS`: missing faults on hugetlbfs.
pub const FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// `UFFD_FEATURE_MISSING_SHMEM`: missing faults on shmem.
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_EVENT_UNMAP`.
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// `UFFD_FEATURE_SIGBUS`.
pub const FEATURE_SIGBUS: u64 = 1 << 7;
/// `UFFD_FEATURE_THREAD_ID`: the faulting thread's id in each message.
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFD_FEATURE_MINOR_HUGETLBFS`.
pub const FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
/// `UFFD_FEATURE_MINOR_SHMEM`.
pub const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `UFFD_FEATURE_EXACT_ADDRESS`.
pub const FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write-protect on hugetlbfs and shmem.
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED`: write-protect pages not yet populated.
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_POISON`.
pub const FEATURE_POISON: u64 = 1 << 14;
/// `UFFD_FEATURE_WP_ASYNC`: write-protect resolved by the kernel, read with PAGEMAP_SCAN.
pub const FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFD_FEATURE_MOVE`.
pub const FEATURE_MOVE: u64 = 1 << 16;

/// Every feature bit with its name, lowest bit first.
pub const FEATURE_NAMES: [(u64, &str); 17] = [
    (FEATURE_PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
    (FEATURE_EVENT_FORK, "EVENT_FORK"),
    (FEATURE_EVENT_REMAP, "EVENT_REMAP"),
    (FEATURE_EVENT_REMOVE, "EVENT_REMOVE"),
    (FEATURE_MISSING_HUGETLBFS, "MISSING_HUGETLBFS"),
    (FEATURE_MISSING_SHMEM, "MISSING_SHMEM"),
    (FEATURE_EVENT_UNMAP, "EVENT_UNMAP"),
    (FEATURE_SIGBUS, "SIGBUS"),
    (FEATURE_THREAD_ID, "THREAD_ID"),
    (FEATURE_MINOR_HUGETLBFS, "MINOR_HUGETLBFS"),
    (FEATURE_MINOR_SHMEM, "MINOR_SHMEM"),
    (FEATURE_EXACT_ADDRESS, "EXACT_ADDRESS"),
    (FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
    (FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED"),
    (FEATURE_POISON, "POISON"),
    (FEATURE_WP_ASYNC, "WP_ASYNC"),
    (FEATURE_MOVE, "MOVE"),
];

/// Bit of `UFFDIO_REGISTER` in an ioctl mask.
pub const IOCTL_REGISTER: u64 = 1 << 0x00;
/// Bit of `UFFDIO_UNREGISTER`.
pub const IOCTL_UNREGISTER: u64 = 1 << 0x01;
/// Bit of `UFFDIO_WAKE`.
pub const IOCTL_WAKE: u64 = 1 << 0x02;
/// Bit of `UFFDIO_COPY`.
pub const IOCTL_COPY: u64 = 1 << 0x03;
/// Bit of `UFFDIO_ZEROPAGE`.
pub const IOCTL_ZEROPAGE: u64 = 1 << 0x04;
/// Bit of `UFFDIO_MOVE`.
pub const IOCTL_MOVE: u64 = 1 << 0x05;
/// Bit of `UFFDIO_WRITEPROTECT`.
pub const IOCTL_WRITEPROTECT: u64 = 1 << 0x06;
/// Bit of `UFFDIO_CONTINUE`.
pub const IOCTL_CONTINUE: u64 = 1 << 0x07;
/// Bit of `UFFDIO_POISON`.
pub const IOCTL_POISON: u64 = 1 << 0x08;
/// Bit of `UFFDIO_API`.
pub const IOCTL_API: u64 = 1 << 0x3F;

/// Every ioctl bit with its name.
pub const IOCTL_NAMES: [(u64, &str); 10] = [
    (IOCTL_REGISTER, "REGISTER"),
    (IOCTL_UNREGISTER, "UNREGISTER"),
    (IOCTL_WAKE, "WAKE"),
    (IOCTL_COPY, "COPY"),
    (IOCTL_ZEROPAGE, "ZEROPAGE"),
    (IOCTL_MOVE, "MOVE"),
    (IOCTL_WRITEPROTECT, "WRITEPROTECT"),
    (IOCTL_CONTINUE, "CONTINUE"),
    (IOCTL_POISON, "POISON"),
    (IOCTL_API, "API"),
];

/// The names of the bits set in `mask` according to `table` (unknown bits as `bit<N>`).
pub fn bit_names(mask: u64, table: &[(u64, &'static str)]) -> Vec<String> {
    (0..64)
        .map(|bit| 1u64 << bit)
        .filter(|b| mask & b != 0)
        .map(|b| match table.iter().find(|(v, _)| *v == b) {
            Some((_, name)) => (*name).to_string(),
            None => format!("bit{}", b.trailing_zeros()),
        })
        .collect()
}

/// The userfaultfd features a kernel offers, by name and as raw bits (what `ferry probe` prints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct UffdFeatures {
    /// Raw `uffdio_api.features`.
    pub bits: u64,
    /// Write-protect faults.
    pub pagefault_flag_wp: bool,
    /// Fork events.
    pub event_fork: bool,
    /// mremap events.
    pub event_remap: bool,
    /// madvise(DONTNEED/REMOVE) events.
    pub event_remove: bool,
    /// Missing faults on hugetlbfs.
    pub missing_hugetlbfs: bool,
    /// Missing faults on shmem.
    pub missing_shmem: bool,
    /// munmap events.
    pub event_unmap: bool,
    /// SIGBUS instead of fault messages.
    pub sigbus: bool,
    /// Thread id in fault messages.
    pub thread_id: bool,
    /// Minor faults on hugetlbfs.
    pub minor_hugetlbfs: bool,
    /// Minor faults on shmem.
    pub minor_shmem: bool,
    /// Exact fault addresses.
    pub exact_address: bool,
    /// Write-protect on hugetlbfs and shmem.
    pub wp_hugetlbfs_shmem: bool,
    /// Write-protect unpopulated pages.
    pub wp_unpopulated: bool,
    /// UFFDIO_POISON.
    pub poison: bool,
    /// Asynchronous write-protect.
    pub wp_async: bool,
    /// UFFDIO_MOVE.
    pub r#move: bool,
}

impl UffdFeatures {
    /// Decodes a raw feature mask.
    pub fn from_bits(bits: u64) -> Self {
        let has = |f: u64| bits & f != 0;
        UffdFeatures {
            bits,
            pagefault_flag_wp: has(FEATURE_PAGEFAULT_FLAG_WP),
            event_fork: has(FEATURE_EVENT_FORK),
            event_remap: has(FEATURE_EVENT_REMAP),
            event_remove: has(FEATURE_EVENT_REMOVE),
            missing_hugetlbfs: has(FEATURE_MISSING_HUGETLBFS),
            missing_shmem: has(FEATURE_MISSING_SHMEM),
            event_unmap: has(FEATURE_EVENT_UNMAP),
            sigbus: has(FEATURE_SIGBUS),
            thread_id: has(FEATURE_THREAD_ID),
            minor_hugetlbfs: has(FEATURE_MINOR_HUGETLBFS),
            minor_shmem: has(FEATURE_MINOR_SHMEM),
            exact_address: has(FEATURE_EXACT_ADDRESS),
            wp_hugetlbfs_shmem: has(FEATURE_WP_HUGETLBFS_SHMEM),
            wp_unpopulated: has(FEATURE_WP_UNPOPULATED),
            poison: has(FEATURE_POISON),
            wp_async: has(FEATURE_WP_ASYNC),
            r#move: has(FEATURE_MOVE),
        }
    }

    /// Whether every bit of `features` is offered.
    pub const fn contains(&self, features: u64) -> bool {
        self.bits & features == features
    }

    /// Names of the offered features, lowest bit first.
    pub fn names(&self) -> Vec<String> {
        bit_names(self.bits, &FEATURE_NAMES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_bits_are_the_kernels() {
        // Values from linux/userfaultfd.h (6.x).
        assert_eq!(FEATURE_WP_HUGETLBFS_SHMEM, 0x1000);
        assert_eq!(FEATURE_WP_UNPOPULATED, 0x2000);
        assert_eq!(FEATURE_POISON, 0x4000);
        assert_eq!(FEATURE_WP_ASYNC, 0x8000);
        assert_eq!(FEATURE_MOVE, 0x10000);
        let all = FEATURE_NAMES.iter().fold(0, |a, (b, _)| a | b);
        assert_eq!(all, 0x1ffff);
    }

    #[test]
    fn decoding_names_every_bit() {
        let f = UffdFeatures::from_bits(0x1ffff);
        assert!(f.pagefault_flag_wp && f.r#move && f.wp_async && f.missing_shmem);
        assert_eq!(f.names().len(), 17);
        assert_eq!(f.names()[0], "PAGEFAULT_FLAG_WP");
        assert_eq!(f.names()[16], "MOVE");
        let f = UffdFeatures::from_bits(FEATURE_THREAD_ID | 1 << 40);
        assert!(f.thread_id && !f.pagefault_flag_wp);
        assert_eq!(
            f.names(),
            vec!["THREAD_ID".to_string(), "bit40".to_string()]
        );
        assert!(f.contains(FEATURE_THREAD_ID));
        assert!(!f.contains(FEATURE_THREAD_ID | FEATURE_MOVE));
    }

    #[test]
    fn ioctl_names_match_the_probe_output() {
        // run_all.out: "register ioctls=0x17c: WAKE COPY ZEROPAGE MOVE WRITEPROTECT POISON"
        assert_eq!(
            bit_names(0x17c, &IOCTL_NAMES),
            ["WAKE", "COPY", "ZEROPAGE", "MOVE", "WRITEPROTECT", "POISON"]
        );
        assert_eq!(
            bit_names(0x8000000000000003, &IOCTL_NAMES),
            ["REGISTER", "UNREGISTER", "API"]
        );
    }

    #[test]
    fn serializes_named_bools_and_raw_bits() {
        let v = serde_json::to_value(UffdFeatures::from_bits(FEATURE_PAGEFAULT_FLAG_WP)).unwrap();
        assert_eq!(v["bits"], 1);
        assert_eq!(v["pagefault_flag_wp"], true);
        assert_eq!(v["move"], false);
    }
}
