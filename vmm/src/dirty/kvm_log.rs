//! KVM's per-slot dirty bitmap, merged with the VMM's own writes.
//!
//! With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (and initially-all-set) enabling the
//! log costs nothing up front, and reading it (KVM_GET_DIRTY_LOG) does not re-arm
//! it: the pages it reported stay writable without faults until the sender is about
//! to send them, when [`DirtyTracker::prepare_send`] re-arms exactly those pages of
//! the chunk with KVM_CLEAR_DIRTY_LOG (QEMU's clear_bitmap, one chunk at a time).
//! A write after the clear is caught by the next sync; a write between the sync and
//! the clear is sent anyway, since the page is sent after its clear. Without manual
//! protect KVM_GET_DIRTY_LOG reads and re-arms at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use migration::vm::DirtyTracker;
use ram::AtomicBitmap;

use crate::kvm::vm::Vm;

/// Default clear chunk: 2^18 pages (1 GiB), QEMU's x-clear-bitmap-shift default.
pub const DEFAULT_CLEAR_SHIFT: u32 = 18;

/// KVM dirty-log tracker.
pub struct KvmDirtyLog {
    vm: Arc<Vm>,
    bufs: Mutex<Vec<Vec<u64>>>,
    /// Per slot: pages reported by GET_DIRTY_LOG and not re-armed yet (manual protect).
    uncleared: Mutex<Vec<Vec<u64>>>,
    clear_shift: u32,
    /// Total time spent in syncs, in nanoseconds.
    pub sync_nanos: AtomicU64,
    /// Number of syncs.
    pub syncs: AtomicU64,
    /// Time spent re-arming chunks, in nanoseconds.
    pub clear_nanos: AtomicU64,
}

impl KvmDirtyLog {
    /// A tracker for `vm` re-arming 2^`clear_shift` pages at a time.
    pub fn new(vm: Arc<Vm>, clear_shift: u32) -> Self {
        let bufs: Vec<Vec<u64>> = vm
            .slots()
            .iter()
            .map(|s| vec![0u64; (s.size / 4096).div_ceil(64) as usize])
            .collect();
        KvmDirtyLog {
            uncleared: Mutex::new(bufs.clone()),
            vm,
            bufs: Mutex::new(bufs),
            clear_shift: clear_shift.clamp(6, 31),
            sync_nanos: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            clear_nanos: AtomicU64::new(0),
        }
    }

    fn manual(&self) -> bool {
        self.vm.dirty_caps().manual_protect
    }
}

impl DirtyTracker for KvmDirtyLog {
    fn name(&self) -> &str {
        if self.manual() {
            "kvm-dirty-log (manual protect)"
        } else {
            "kvm-dirty-log"
        }
    }

    fn start(&self) -> Result<(), String> {
        let ram = self.vm.ram();
        ram.host_dirty().clear_all();
        ram.set_track_host_writes(true);
        self.vm.set_dirty_logging(true).map_err(|e| e.to_string())?;
        // Drain whatever the log holds now (initially-all-set or stale bits): the caller
        // already treats every page as dirty, and its first pass re-arms them chunk by chunk.
        let scratch = AtomicBitmap::new(ram.page_count());
        self.sync(&scratch)?;
        Ok(())
    }

    fn sync(&self, bitmap: &AtomicBitmap) -> Result<u64, String> {
        let t0 = Instant::now();
        let manual = self.manual();
        let mut bufs = self
            .bufs
            .lock()
            .map_err(|_| "dirty log lock poisoned".to_string())?;
        let mut uncleared = self
            .uncleared
            .lock()
            .map_err(|_| "dirty log lock poisoned".to_string())?;
        let mut new = 0u64;
        for ((slot, buf), pend) in self
            .vm
            .slots()
            .iter()
            .zip(bufs.iter_mut())
            .zip(uncleared.iter_mut())
        {
            buf.fill(0);
            self.vm
                .get_dirty_log(slot, buf)
                .map_err(|e| e.to_string())?;
            // Slot RAM offsets are 2 MiB aligned, so slot words line up with bitmap words.
            let base = (slot.ram_offset / 4096 / 64) as usize;
            for (i, &w) in buf.iter().enumerate() {
                if w != 0 {
                    if manual {
                        pend[i] |= w;
                    }
                    let before = bitmap.word(base + i);
                    bitmap.or_word(base + i, w);
                    new += u64::from((w & !before).count_ones());
                }
            }
        }
        let host = self.vm.ram().host_dirty();
        for i in 0..host.word_count() {
            let w = host.take_word(i);
            if w != 0 {
                let before = bitmap.word(i);
                bitmap.or_word(i, w);
                new += u64::from((w & !before).count_ones());
            }
        }
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.sync_nanos
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(new)
    }

    fn stop(&self) {
        let _ = self.vm.set_dirty_logging(false);
        self.vm.ram().set_track_host_writes(false);
        if let Ok(mut u) = self.uncleared.lock() {
            for v in u.iter_mut() {
                v.fill(0);
            }
        }
    }

    fn clear_chunk_pages(&self) -> Option<u64> {
        self.manual().then_some(1u64 << self.clear_shift)
    }

    fn prepare_send(&self, first_page: u64, count: u64) -> Result<(), String> {
        if !self.manual() {
            return Ok(());
        }
        let t0 = Instant::now();
        let mut uncleared = self
            .uncleared
            .lock()
            .map_err(|_| "dirty log lock poisoned".to_string())?;
        for (slot, pend) in self.vm.slots().iter().zip(uncleared.iter_mut()) {
            let slot_first = slot.ram_offset / 4096;
            let slot_pages = slot.size / 4096;
            let start = first_page.max(slot_first);
            let end = (first_page + count).min(slot_first + slot_pages);
            if start >= end {
                continue;
            }
            // Word range inside the slot (chunks and slots are 64-page aligned).
            let w0 = ((start - slot_first) / 64) as usize;
            let w1 = ((end - slot_first).div_ceil(64) as usize).min(pend.len());
            let words = &mut pend[w0..w1];
            if words.iter().all(|&w| w == 0) {
                continue;
            }
            self.vm
                .clear_dirty_log(slot, w0 as u64 * 64, words)
                .map_err(|e| e.to_string())?;
            words.fill(0);
        }
        self.clear_nanos
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    }
}
