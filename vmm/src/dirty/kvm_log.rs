//! KVM's per-slot dirty bitmap, merged with the VMM's own writes.
//!
//! With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (and initially-all-set) enabling the
//! log costs nothing up front; each sync reads the log with KVM_GET_DIRTY_LOG
//! and re-arms exactly the pages it reported with KVM_CLEAR_DIRTY_LOG, before
//! any of them is sent, so a write after the clear is caught by the next sync.
//! Without manual protect KVM_GET_DIRTY_LOG does both at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use migration::vm::DirtyTracker;
use ram::AtomicBitmap;

use crate::kvm::vm::Vm;

/// KVM dirty-log tracker.
pub struct KvmDirtyLog {
    vm: Arc<Vm>,
    bufs: Mutex<Vec<Vec<u64>>>,
    /// Total time spent in syncs, in nanoseconds.
    pub sync_nanos: AtomicU64,
    /// Number of syncs.
    pub syncs: AtomicU64,
}

impl KvmDirtyLog {
    /// A tracker for `vm`.
    pub fn new(vm: Arc<Vm>) -> Self {
        let bufs = vm
            .slots()
            .iter()
            .map(|s| vec![0u64; (s.size / 4096).div_ceil(64) as usize])
            .collect();
        KvmDirtyLog {
            vm,
            bufs: Mutex::new(bufs),
            sync_nanos: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        }
    }
}

impl DirtyTracker for KvmDirtyLog {
    fn name(&self) -> &str {
        if self.vm.dirty_caps().manual_protect {
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
        // already treats every page as dirty.
        let scratch = AtomicBitmap::new(ram.page_count());
        self.sync(&scratch)?;
        Ok(())
    }

    fn sync(&self, bitmap: &AtomicBitmap) -> Result<u64, String> {
        let t0 = Instant::now();
        let manual = self.vm.dirty_caps().manual_protect;
        let mut bufs = self
            .bufs
            .lock()
            .map_err(|_| "dirty log lock poisoned".to_string())?;
        let mut new = 0u64;
        for (slot, buf) in self.vm.slots().iter().zip(bufs.iter_mut()) {
            buf.fill(0);
            self.vm
                .get_dirty_log(slot, buf)
                .map_err(|e| e.to_string())?;
            if manual && buf.iter().any(|&w| w != 0) {
                self.vm
                    .clear_dirty_log(slot, 0, buf)
                    .map_err(|e| e.to_string())?;
            }
            // Slot RAM offsets are 2 MiB aligned, so slot words line up with bitmap words.
            let base = (slot.ram_offset / 4096 / 64) as usize;
            for (i, &w) in buf.iter().enumerate() {
                if w != 0 {
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
    }
}
