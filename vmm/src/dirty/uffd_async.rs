//! A dirty tracker from userfaultfd's *asynchronous* write protection (Linux 6.7+):
//! with `UFFD_FEATURE_WP_ASYNC` the kernel resolves write-protect faults itself (no
//! message, no waiting thread), and the `PAGEMAP_SCAN` ioctl lists the pages written since
//! they were last protected and protects them again, atomically.
//!
//! It sees every write through the VMM's mapping of guest RAM: the guest's (KVM faults on
//! its behalf) and the VMM's own alike. All of RAM is protected at the start, never-touched
//! pages included (markers): protecting only the pages that hold data is not enough, since
//! for shmem the scan reports every unprotected empty entry as written (measured on 6.18:
//! the first sync then returns all of memory). Its sync walks the page tables of all guest
//! memory, so its cost grows with memory size like KVM's bitmap; `ferry bench snapshot
//! --dirty-sync` compares it with KVM's dirty log and ring on a real guest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use migration::snapshot::pagemap::PagemapScanner;
use migration::snapshot::WriteProtector;
use migration::vm::DirtyTracker;
use ram::{AtomicBitmap, GuestRam};

use crate::app::Vmm;

/// The VMMs of this process that chose this tracker (`--dirty-tracking uffd-async`).
static SELECTED: Mutex<Vec<(Weak<Vmm>, Arc<UffdAsyncTracker>)>> = Mutex::new(Vec::new());

/// Makes `vmm`'s migrations track dirty pages with this tracker; fails (saying why) when
/// the host or the guest's memory cannot.
pub fn select(vmm: &Arc<Vmm>) -> Result<(), String> {
    let ram = vmm.machine.ram().clone();
    if let Some(why) = UffdAsyncTracker::unsupported(&ram) {
        return Err(format!("uffd-async dirty tracking is not available: {why}"));
    }
    let mut list = SELECTED.lock().unwrap_or_else(|p| p.into_inner());
    list.retain(|(w, _)| w.strong_count() > 0);
    list.push((Arc::downgrade(vmm), Arc::new(UffdAsyncTracker::new(ram))));
    Ok(())
}

/// The tracker `vmm` chose, if it chose this one.
pub fn tracker_for(vmm: &Vmm) -> Option<Arc<dyn DirtyTracker>> {
    let list = SELECTED.lock().unwrap_or_else(|p| p.into_inner());
    list.iter()
        .find(|(w, _)| w.strong_count() > 0 && std::ptr::eq(w.as_ptr(), vmm))
        .map(|(_, t)| t.clone() as Arc<dyn DirtyTracker>)
}

struct Armed {
    protector: WriteProtector,
    scanner: PagemapScanner,
}

/// Dirty pages from WP_ASYNC + PAGEMAP_SCAN.
pub struct UffdAsyncTracker {
    ram: Arc<GuestRam>,
    armed: Mutex<Option<Armed>>,
    /// Total time spent in syncs, in nanoseconds.
    pub sync_nanos: AtomicU64,
    /// Number of syncs.
    pub syncs: AtomicU64,
}

impl UffdAsyncTracker {
    /// A tracker for `ram` (nothing is protected until [`DirtyTracker::start`]).
    pub fn new(ram: Arc<GuestRam>) -> Self {
        UffdAsyncTracker {
            ram,
            armed: Mutex::new(None),
            sync_nanos: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        }
    }

    /// Why this host or memory cannot use it, if it cannot (tries for real).
    pub fn unsupported(ram: &GuestRam) -> Option<String> {
        WriteProtector::new_async(ram).err().map(|e| e.to_string())
    }
}

impl DirtyTracker for UffdAsyncTracker {
    fn name(&self) -> &str {
        "uffd-wp-async (PAGEMAP_SCAN)"
    }

    fn start(&self) -> Result<(), String> {
        let protector = WriteProtector::new_async(&self.ram).map_err(|e| e.to_string())?;
        protector.populate_if_needed();
        protector.protect_all().map_err(|e| e.to_string())?;
        let scanner = PagemapScanner::new().map_err(|e| format!("/proc/self/pagemap: {e}"))?;
        // Dropping a previous protector lifts its protection and unregisters.
        *self.armed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Armed { protector, scanner });
        Ok(())
    }

    fn sync(&self, bitmap: &AtomicBitmap) -> Result<u64, String> {
        let t0 = Instant::now();
        let mut guard = self.armed.lock().unwrap_or_else(|p| p.into_inner());
        let armed = guard.as_mut().ok_or("dirty tracking is not started")?;
        let mut newly = 0u64;
        for (host, len, first_page) in armed.protector.areas() {
            armed
                .scanner
                .take_written(host, len, |first, count| {
                    for p in first_page + first..first_page + first + count {
                        if !bitmap.get(p) {
                            bitmap.set(p);
                            newly += 1;
                        }
                    }
                })
                .map_err(|e| format!("PAGEMAP_SCAN: {e}"))?;
        }
        self.sync_nanos
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(newly)
    }

    fn stop(&self) {
        // Dropping the protector lifts every protection and unregisters guest RAM.
        self.armed.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration::snapshot::pagemap::protected_pages;
    use ram::{Backend, MemoryConfig, PAGE_SIZE};

    #[test]
    fn writes_are_reported_once_per_sync() {
        for backend in [Backend::SharedMemfd, Backend::AnonymousPrivate] {
            let ram = Arc::new(
                GuestRam::new(&MemoryConfig {
                    size: 8 << 20,
                    backend: backend.clone(),
                    ..MemoryConfig::default()
                })
                .unwrap(),
            );
            if let Some(why) = UffdAsyncTracker::unsupported(&ram) {
                eprintln!("skipping: {why}");
                return;
            }
            ram.write_page(3, &[1; PAGE_SIZE]).unwrap();
            let t = UffdAsyncTracker::new(ram.clone());
            t.start().unwrap();
            let b = AtomicBitmap::new(ram.page_count());
            assert_eq!(t.sync(&b).unwrap(), 0, "{backend:?}: nothing written yet");
            // A populated page and a never-touched one; neither write blocks.
            ram.write_page(3, &[2; PAGE_SIZE]).unwrap();
            ram.write_page(1000, &[2; PAGE_SIZE]).unwrap();
            assert_eq!(t.sync(&b).unwrap(), 2, "{backend:?}");
            assert!(b.get(3) && b.get(1000) && b.count_ones() == 2);
            b.clear_all();
            assert_eq!(t.sync(&b).unwrap(), 0, "re-protected by the scan");
            ram.write_page(3, &[3; PAGE_SIZE]).unwrap();
            assert_eq!(t.sync(&b).unwrap(), 1);
            t.stop();
            assert_eq!(
                protected_pages(&ram).unwrap(),
                0,
                "stop lifts the protection"
            );
            assert!(t.sync(&b).is_err(), "not started");
        }
    }
}
