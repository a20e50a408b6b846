//! KVM's per-vCPU dirty ring (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]).
//!
//! Each vCPU has a ring of `kvm_dirty_gfn {flags, slot, offset}` entries mapped from
//! its fd at page offset KVM_DIRTY_LOG_PAGE_OFFSET. KVM publishes an entry by setting
//! DIRTY; we harvest it (record the page, set RESET) and, after a round over all rings,
//! KVM_RESET_DIRTY_RINGS lets KVM reuse the entries and re-protects the pages.
//!
//! A vCPU whose ring fills exits with KVM_EXIT_DIRTY_RING_FULL; its thread harvests
//! (into this tracker's pending bitmap) and runs again. A ring that stays full although
//! nothing can be harvested from it means KVM lost track inside its instruction emulator
//! (seen on nested hosts with heavily-dirtying CPL0 guest code): the tracker then refuses
//! to continue, with a message saying to use the dirty bitmap instead.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET;
use migration::vm::DirtyTracker;
use ram::AtomicBitmap;

use crate::kvm::vm::Vm;
use crate::kvm::KvmError;

const DIRTY: u32 = 1;
const RESET: u32 = 2;
const ENTRY_SIZE: usize = 16;

/// One vCPU's mapped ring.
struct Ring {
    base: *mut u8,
    entries: u32,
    fetch: Mutex<u32>,
    empty_full_exits: AtomicU32,
}

// SAFETY: the ring is shared memory with KVM; every access to entries goes through atomics
// (flags) or reads of fields KVM no longer changes once DIRTY is published; `fetch` is locked.
unsafe impl Send for Ring {}
// SAFETY: as above.
unsafe impl Sync for Ring {}

impl Ring {
    fn flags(&self, i: u32) -> &AtomicU32 {
        let off = (i % self.entries) as usize * ENTRY_SIZE;
        // SAFETY: `off` is inside the mapping (entries * 16 bytes); the flags field is the
        // first, 4-byte aligned u32 of the entry; KVM and we only touch it atomically.
        unsafe { &*(self.base.add(off) as *const AtomicU32) }
    }

    fn slot_offset(&self, i: u32) -> (u32, u64) {
        let off = (i % self.entries) as usize * ENTRY_SIZE;
        // SAFETY: in-bounds reads of the entry's slot and offset, published by KVM before it
        // set DIRTY (observed with Acquire by the caller).
        unsafe {
            let slot = std::ptr::read_volatile(self.base.add(off + 4) as *const u32);
            let offset = std::ptr::read_volatile(self.base.add(off + 8) as *const u64);
            (slot, offset)
        }
    }

    /// Harvests every published entry; returns how many.
    fn harvest(&self, slots: &[(u32, u64, u64)], into: &AtomicBitmap) -> u64 {
        let mut fetch = self.fetch.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        loop {
            let flags = self.flags(*fetch);
            if flags.load(Ordering::Acquire) & DIRTY == 0 {
                break;
            }
            let (slot, offset) = self.slot_offset(*fetch);
            if let Some(&(_, base_page, pages)) = slots.iter().find(|s| s.0 == slot) {
                if offset < pages {
                    into.set(base_page + offset);
                }
            }
            flags.store(RESET, Ordering::Release);
            *fetch = fetch.wrapping_add(1);
            n += 1;
        }
        n
    }
}

/// The dirty-ring tracker.
pub struct KvmDirtyRing {
    vm: Arc<Vm>,
    rings: Vec<Ring>,
    /// (slot id, first RAM page, pages) of every slot.
    slots: Vec<(u32, u64, u64)>,
    pending: AtomicBitmap,
    broken: AtomicBool,
    /// Entries harvested so far.
    pub harvested: AtomicU64,
    /// Ring-full exits handled.
    pub full_exits: AtomicU64,
    /// Total time spent in syncs, in nanoseconds.
    pub sync_nanos: AtomicU64,
}

impl KvmDirtyRing {
    /// Maps the rings of vCPU fds `vcpu_fds` (the VM must have the ring enabled).
    pub fn new(vm: Arc<Vm>, vcpu_fds: &[RawFd]) -> Result<Self, KvmError> {
        let entries = vm
            .dirty_caps()
            .ring_entries
            .ok_or(KvmError::MissingCap("the dirty ring on this VM"))?;
        let len = entries as usize * ENTRY_SIZE;
        let mut rings = Vec::new();
        for &fd in vcpu_fds {
            let offset = (KVM_DIRTY_LOG_PAGE_OFFSET as i64) * 4096;
            // SAFETY: maps the vCPU's dirty ring as KVM documents (shared, at its page offset);
            // a fresh mapping that aliases nothing Rust owns.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    offset,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(KvmError::Ioctl {
                    what: "mmap(dirty ring)",
                    source: kvm_ioctls::Error::last(),
                });
            }
            rings.push(Ring {
                base: p.cast(),
                entries,
                fetch: Mutex::new(0),
                empty_full_exits: AtomicU32::new(0),
            });
        }
        let slots = vm
            .slots()
            .iter()
            .map(|s| (s.slot, s.ram_offset / 4096, s.size / 4096))
            .collect();
        let pending = AtomicBitmap::new(vm.ram().page_count());
        Ok(KvmDirtyRing {
            vm,
            rings,
            slots,
            pending,
            broken: AtomicBool::new(false),
            harvested: AtomicU64::new(0),
            full_exits: AtomicU64::new(0),
            sync_nanos: AtomicU64::new(0),
        })
    }

    fn harvest_all(&self) -> Result<u64, String> {
        let mut n = 0;
        for r in &self.rings {
            n += r.harvest(&self.slots, &self.pending);
        }
        if n > 0 {
            self.vm.reset_dirty_rings().map_err(|e| e.to_string())?;
        }
        self.harvested.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    /// Called by vCPU `vcpu`'s thread on KVM_EXIT_DIRTY_RING_FULL: harvests so it can run.
    pub fn on_ring_full(&self, vcpu: usize) -> Result<(), String> {
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        let Some(ring) = self.rings.get(vcpu) else {
            return Err(format!("no dirty ring for vCPU {vcpu}"));
        };
        let own = ring.harvest(&self.slots, &self.pending);
        let others = self.harvest_all()?;
        if own > 0 {
            self.vm.reset_dirty_rings().map_err(|e| e.to_string())?;
            ring.empty_full_exits.store(0, Ordering::Relaxed);
        } else if ring.empty_full_exits.fetch_add(1, Ordering::Relaxed) >= 3 {
            self.broken.store(true, Ordering::Release);
            return Err(format!(
                "vCPU {vcpu}'s dirty ring reports full but holds no entries ({others} harvested elsewhere): \
                 KVM lost track of dirty pages (its instruction emulator overflowed the ring); \
                 dirty tracking with the ring cannot be trusted on this host: use the dirty bitmap \
                 (--dirty-tracking bitmap)"
            ));
        }
        Ok(())
    }
}

impl DirtyTracker for KvmDirtyRing {
    fn name(&self) -> &str {
        "kvm-dirty-ring"
    }

    fn start(&self) -> Result<(), String> {
        let ram = self.vm.ram();
        ram.host_dirty().clear_all();
        ram.set_track_host_writes(true);
        self.vm.set_dirty_logging(true).map_err(|e| e.to_string())?;
        self.harvest_all()?;
        self.pending.clear_all();
        Ok(())
    }

    fn sync(&self, bitmap: &AtomicBitmap) -> Result<u64, String> {
        if self.broken.load(Ordering::Acquire) {
            return Err(
                "the dirty ring lost track of dirty pages; use --dirty-tracking bitmap".into(),
            );
        }
        let t0 = Instant::now();
        self.harvest_all()?;
        let mut new = 0u64;
        let host = self.vm.ram().host_dirty();
        for i in 0..bitmap.word_count() {
            let w = self.pending.take_word(i) | host.take_word(i);
            if w != 0 {
                let before = bitmap.word(i);
                bitmap.or_word(i, w);
                new += u64::from((w & !before).count_ones());
            }
        }
        self.sync_nanos
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(new)
    }

    fn stop(&self) {
        let _ = self.vm.set_dirty_logging(false);
        self.vm.ram().set_track_host_writes(false);
        let _ = self.harvest_all();
        self.pending.clear_all();
    }
}

impl Drop for KvmDirtyRing {
    fn drop(&mut self) {
        for r in &self.rings {
            // SAFETY: unmaps exactly the ring mapping made in `new`; nothing uses it after drop.
            unsafe {
                libc::munmap(r.base.cast(), r.entries as usize * ENTRY_SIZE);
            }
        }
    }
}
