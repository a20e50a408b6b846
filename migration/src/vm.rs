//! The seam between migration and the VMM: what a migration needs from a VM.
//!
//! `migration` never talks to KVM. The VMM implements these traits with
//! kvm-ioctls; tests implement them in memory.

use std::sync::Arc;

use ram::{AtomicBitmap, GuestRam};

/// A source of dirty-page information (KVM's dirty log or ring, userfaultfd write-protect...).
pub trait DirtyTracker: Send + Sync {
    /// A short name for reports ("kvm-dirty-log", "kvm-dirty-ring", ...).
    fn name(&self) -> &str;
    /// Starts tracking. From now on every page written is reported by [`DirtyTracker::sync`];
    /// the caller treats all pages as dirty at the start.
    fn start(&self) -> Result<(), String>;
    /// ORs the pages written since the previous call into `bitmap` (one bit per RAM page,
    /// RAM-offset order) and returns how many bits it set that were clear.
    fn sync(&self, bitmap: &AtomicBitmap) -> Result<u64, String>;
    /// Stops tracking.
    fn stop(&self);
    /// Pages per clear chunk: the sender calls [`DirtyTracker::prepare_send`] once per chunk
    /// before sending pages in it (KVM manual-protect clears the log lazily, QEMU's
    /// clear_bitmap). `None` when the tracker needs no such call.
    fn clear_chunk_pages(&self) -> Option<u64> {
        None
    }
    /// Re-arms tracking for the pages of `[first_page, first_page + count)` that the last
    /// sync reported, before they are sent.
    fn prepare_send(&self, _first_page: u64, _count: u64) -> Result<(), String> {
        Ok(())
    }
}

/// What the sending side needs from its VM.
pub trait SourceVm: Send + Sync {
    /// Guest memory.
    fn ram(&self) -> Arc<GuestRam>;
    /// Number of vCPUs.
    fn vcpus(&self) -> u32;
    /// The VM's UUID.
    fn uuid(&self) -> [u8; 16];
    /// The dirty tracker to use for this migration.
    fn dirty_tracker(&self) -> Arc<dyn DirtyTracker>;
    /// Whether the vCPUs are running.
    fn is_running(&self) -> bool;
    /// Stops the vCPUs for the switchover.
    fn stop_vcpus(&self) -> Result<(), String>;
    /// Lets the vCPUs run again (a failed or cancelled migration).
    fn resume_vcpus(&self) -> Result<(), String>;
    /// Sets the auto-converge throttle (0 = off).
    fn set_throttle(&self, pct: u8);
    /// Serializes vCPU, VM and device state (vCPUs stopped).
    fn save_state(&self) -> Result<Vec<u8>, String>;
    /// The migration completed: the VM stays stopped for good (postmigrate).
    fn migrated_away(&self);
    /// A local migration (x-ignore-shared) completed: another process runs the guest in
    /// this VM's memory now, so this VM must never write it (nor run) again.
    fn memory_handed_over(&self) {}
}

/// What the receiving side needs from its VM.
pub trait DestVm: Send + Sync {
    /// Guest memory.
    fn ram(&self) -> Arc<GuestRam>;
    /// Number of vCPUs.
    fn vcpus(&self) -> u32;
    /// The VM's UUID (checked against the stream's with validate-uuid).
    fn uuid(&self) -> [u8; 16];
    /// Loads state saved by [`SourceVm::save_state`].
    fn load_state(&self, state: &[u8]) -> Result<(), String>;
    /// Starts the guest (after the source's COMMIT).
    fn start(&self) -> Result<(), String>;
    /// Makes `memory` (the source's guest memory, passed by a local migration) this VM's
    /// RAM instead of its own, at the same guest addresses. The guest is not running.
    fn adopt_shared_ram(&self, memory: std::fs::File) -> Result<(), String> {
        let _ = memory;
        Err("this VM cannot map another process's guest memory".into())
    }
    /// The source says only `ranges` of guest memory may hold data (the rest reads as zero
    /// and is never written by the load): the VM may allocate those pages ahead of the
    /// receiver, and should allocate nothing else.
    fn populate_ahead(&self, ranges: &[crate::stream::ranges::PageRange]) {
        let _ = ranges;
    }
    /// QEMU's `decompress-error-check` property: a compressed page that does not inflate
    /// fails the migration (off: the page is zeroed and waits for a later copy).
    fn decompress_error_check(&self) -> bool {
        true
    }
}
