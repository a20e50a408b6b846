//! What QMP commands reach into a postcopy migration through: [`SourceControl`] on the
//! source (`migrate-start-postcopy`, `migrate-pause`, `migrate {"resume": true}`) and
//! [`DestControl`] on the destination (`migrate-pause`, `migrate-recover`, blocktime).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::pages::PageTracker;
use super::registration::MissingRegistration;
use crate::transport::{Channel, Listener, MigrationUri};

/// A slot one thread waits on and a QMP command fills.
struct Slot<T> {
    value: Mutex<Option<T>>,
    cond: Condvar,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot {
            value: Mutex::new(None),
            cond: Condvar::new(),
        }
    }
}

impl<T> Slot<T> {
    fn lock(&self) -> MutexGuard<'_, Option<T>> {
        self.value.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put(&self, v: T) {
        *self.lock() = Some(v);
        self.cond.notify_all();
    }

    fn take_within(&self, timeout: Duration) -> Option<T> {
        let mut g = self.lock();
        if g.is_none() {
            g = self
                .cond
                .wait_timeout(g, timeout)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        g.take()
    }
}

/// Channels to shut down on `migrate-pause`.
#[derive(Default)]
struct Channels(Mutex<Vec<Channel>>);

impl Channels {
    fn set(&self, chans: Vec<Channel>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = chans;
    }

    fn shutdown(&self) -> bool {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for c in g.iter() {
            c.shutdown();
        }
        !g.is_empty()
    }
}

/// The source's postcopy controls.
#[derive(Default)]
pub struct SourceControl {
    requested: AtomicBool,
    requested_at: Mutex<Option<Instant>>,
    switch_us: AtomicU64,
    committed: AtomicBool,
    resume: Slot<MigrationUri>,
    channels: Channels,
    released_pages: AtomicU64,
    urgent_pages: AtomicU64,
}

impl SourceControl {
    /// `migrate-start-postcopy`: switch as soon as the migration thread can.
    pub fn request(&self) {
        self.requested_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Instant::now);
        self.requested.store(true, Ordering::Release);
    }

    /// Whether a switch to postcopy was asked for.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// The request as a flag a sender can poll between pages.
    pub fn flag(&self) -> &AtomicBool {
        &self.requested
    }

    /// The source sent (or tried to send) POSTCOPY_RUN: its guest must never run again.
    pub fn commit(&self) {
        if let Some(t) = *self.requested_at.lock().unwrap_or_else(|p| p.into_inner()) {
            self.switch_us
                .store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        self.committed.store(true, Ordering::Release);
    }

    /// Microseconds from `migrate-start-postcopy` to POSTCOPY_RUN (0 before the commit).
    pub fn switch_us(&self) -> u64 {
        self.switch_us.load(Ordering::Relaxed)
    }

    /// Whether the guest was handed over in postcopy (it must not run here again).
    pub fn committed(&self) -> bool {
        self.committed.load(Ordering::Acquire)
    }

    /// `migrate {"uri": ..., "resume": true}`.
    pub fn resume(&self, uri: MigrationUri) {
        self.resume.put(uri);
    }

    /// Waits up to `timeout` for a resume request.
    pub fn wait_resume(&self, timeout: Duration) -> Option<MigrationUri> {
        self.resume.take_within(timeout)
    }

    /// The channels `migrate-pause` shuts down.
    pub fn set_channels(&self, chans: Vec<Channel>) {
        self.channels.set(chans);
    }

    /// `migrate-pause`: breaks the connections (both sides then pause); false if none.
    pub fn pause(&self) -> bool {
        self.channels.shutdown()
    }

    /// Counts pages released by `release-ram`.
    pub fn add_released(&self, pages: u64) {
        self.released_pages.fetch_add(pages, Ordering::Relaxed);
    }

    /// Pages released by `release-ram` so far.
    pub fn released_pages(&self) -> u64 {
        self.released_pages.load(Ordering::Relaxed)
    }

    /// Counts pages sent because the destination asked for them.
    pub fn add_urgent(&self, pages: u64) {
        self.urgent_pages.fetch_add(pages, Ordering::Relaxed);
    }

    /// Pages sent because the destination asked for them.
    pub fn urgent_pages(&self) -> u64 {
        self.urgent_pages.load(Ordering::Relaxed)
    }
}

/// The destination's postcopy controls.
#[derive(Default)]
pub struct DestControl {
    recover: Slot<Listener>,
    channels: Channels,
    tracker: Mutex<Option<Arc<PageTracker>>>,
    registration: Mutex<Option<Arc<MissingRegistration>>>,
}

impl DestControl {
    /// `migrate-recover`: the listener a recovery connection arrives on.
    pub fn recover(&self, listener: Listener) {
        self.recover.put(listener);
    }

    /// Waits up to `timeout` for a `migrate-recover`.
    pub fn wait_recover(&self, timeout: Duration) -> Option<Listener> {
        self.recover.take_within(timeout)
    }

    /// The channels `migrate-pause` shuts down.
    pub fn set_channels(&self, chans: Vec<Channel>) {
        self.channels.set(chans);
    }

    /// `migrate-pause`: breaks the connections; false if none.
    pub fn pause(&self) -> bool {
        self.channels.shutdown()
    }

    /// Publishes the page bookkeeping (for blocktime and statistics).
    pub fn set_tracker(&self, t: Arc<PageTracker>) {
        *self.tracker.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
    }

    /// Publishes the registered memory (for [`DestControl::abandon`]); None once done.
    pub fn set_registration(&self, r: Option<Arc<MissingRegistration>>) {
        *self.registration.lock().unwrap_or_else(|p| p.into_inner()) = r;
    }

    /// The process is exiting in the middle of postcopy (the guest is lost anyway):
    /// unregisters guest memory so no thread stays blocked on a missing page forever.
    /// Returns whether there was anything to abandon.
    pub fn abandon(&self) -> bool {
        let r = self
            .registration
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.channels.shutdown();
        match r {
            Some(r) => {
                r.unregister();
                true
            }
            None => false,
        }
    }

    /// The page bookkeeping, once postcopy started.
    pub fn tracker(&self) -> Option<Arc<PageTracker>> {
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What the destination's VMM does for postcopy (beside [`crate::vm::DestVm`]).
pub trait DestHooks: Send + Sync {
    /// Called once before guest memory is registered and discarded: stop every helper
    /// that writes or populates guest memory (a populate thread would refill discarded
    /// pages with zeros that no fault would ever replace).
    fn before_postcopy(&self) {}

    /// Linux thread ids of the vCPU threads in vCPU order (for `postcopy-blocktime`).
    fn vcpu_thread_ids(&self) -> Vec<i32> {
        Vec::new()
    }
}

/// Hooks that do nothing (a VM with no helpers and no blocktime).
pub struct NoHooks;

impl DestHooks for NoHooks {}
