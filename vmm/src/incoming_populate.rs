//! Populating an incoming guest's fresh memory ahead of the migration's receiver, so that it
//! rarely stalls on page faults, without allocating what the source's guest never used.
//!
//! Two steps: from `migrate-incoming` on, a head start over the first [`head_start_pages`]
//! of RAM (the receiver writes in RAM-offset order, so that is where it starts); then, when
//! the source's DATA_RANGES frame says which pages may hold data, only those. A guest that
//! uses 16 MiB of 1 GiB thus costs the destination what it uses plus at most the head start
//! (64 MiB), where QEMU, which does not populate ahead, costs what it uses.

use std::sync::{Arc, Mutex};

use ram::{BackgroundPopulate, GuestRam, PopulateStats};

/// The most RAM populated before the source says what holds data.
pub const HEAD_START_BYTES: u64 = 64 << 20;

/// Pages populated before the source says what holds data: [`HEAD_START_BYTES`], but no
/// more than a sixteenth of RAM.
pub fn head_start_pages(ram_pages: u64) -> u64 {
    (HEAD_START_BYTES / ram::PAGE_SIZE as u64).min(ram_pages / 16)
}

/// The populate of one incoming migration.
pub struct IncomingPopulate {
    ram: Arc<GuestRam>,
    /// Threads, until the populate of the data ranges starts (or may no longer start).
    threads: Mutex<Option<usize>>,
    /// The populate running now (the head start, then the data ranges).
    running: Mutex<Option<BackgroundPopulate>>,
    /// What the head start did, once it was stopped.
    head_start: Mutex<Option<PopulateStats>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts populating `ranges`; None (said on stderr) when it cannot.
fn start_ranges(
    ram: Arc<GuestRam>,
    ranges: &[(u64, u64)],
    threads: usize,
) -> Option<BackgroundPopulate> {
    BackgroundPopulate::start_ranges(ram, ranges, threads)
        .map_err(|e| eprintln!("ferry: cannot populate guest memory ahead of the migration: {e}"))
        .ok()
}

/// Stops `p` and waits for its threads; None (said on stderr) when one of them failed.
fn finish(p: BackgroundPopulate) -> Option<PopulateStats> {
    p.finish()
        .map_err(|e| eprintln!("ferry: populating guest memory ahead of the migration failed: {e}"))
        .ok()
}

impl IncomingPopulate {
    /// Starts the head start on `threads` threads.
    pub fn start(ram: Arc<GuestRam>, threads: usize) -> IncomingPopulate {
        let pages = head_start_pages(ram.page_count());
        let head = start_ranges(ram.clone(), &[(0, pages)], threads);
        IncomingPopulate {
            ram,
            threads: Mutex::new(Some(threads)),
            running: Mutex::new(head),
            head_start: Mutex::new(None),
        }
    }

    /// The source says only `ranges` (`[start, end)` RAM pages) may hold data: the head
    /// start stops and the populate goes on over those ranges alone (once per migration).
    pub fn data_ranges(&self, ranges: &[(u64, u64)]) {
        let Some(threads) = lock(&self.threads).take() else {
            return;
        };
        let head = lock(&self.running).take();
        *lock(&self.head_start) = head.and_then(finish);
        *lock(&self.running) = start_ranges(self.ram.clone(), ranges, threads);
    }

    /// Stops for good (before postcopy registers the memory, or before a local migration
    /// replaces it) and waits for the threads.
    pub fn stop(&self) {
        lock(&self.threads).take();
        let running = lock(&self.running).take();
        if let Some(p) = running {
            finish(p);
        }
    }

    /// Stops (what is not populated by now was never sent: it stays zero, unallocated) and
    /// prints what was done, once the migration has ended.
    pub fn report(&self) {
        lock(&self.threads).take();
        let Some(p) = lock(&self.running).take() else {
            return;
        };
        let total = p.total_bytes();
        // Without a head start on record, the run that just ended was the head start: the
        // source never said what holds data.
        let head = lock(&self.head_start).as_ref().map(|s| s.bytes);
        match (finish(p), head) {
            (Some(s), Some(head)) => eprintln!(
                "ferry: populated {} of {} MiB ahead of the receiver ({} MiB before the source said what holds data; {} MiB already resident) in {:.2} s on {} thread(s)",
                s.bytes >> 20,
                total >> 20,
                head >> 20,
                s.skipped_bytes >> 20,
                s.elapsed.as_secs_f64(),
                s.threads
            ),
            (Some(s), None) => eprintln!(
                "ferry: populated {} of the first {} MiB ahead of the receiver (the source never said what holds data) in {:.2} s on {} thread(s)",
                s.bytes >> 20,
                total >> 20,
                s.elapsed.as_secs_f64(),
                s.threads
            ),
            (None, _) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_start_is_64_mib_or_a_sixteenth_of_smaller_guests() {
        let mib = |m: u64| m << 20 >> 12;
        assert_eq!(head_start_pages(mib(2048)), mib(64));
        assert_eq!(head_start_pages(mib(1024)), mib(64));
        assert_eq!(head_start_pages(mib(256)), mib(16));
        assert_eq!(head_start_pages(0), 0);
    }
}
