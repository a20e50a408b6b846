//! The fault handler: serves guest writes to pages the snapshot has not saved yet.
//!
//! For each write-protect fault it copies the page (still protected, so still as it was at
//! the start instant), claims it (see [`super::claims`]), hands the copy to the writer, then
//! removes the protection, which wakes the faulting thread: a vCPU thread inside KVM, or any
//! VMM thread writing guest memory. A page someone already claimed is only unprotected.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{SendTimeoutError, Sender};
use ram::{GuestRam, PAGE_SIZE};
use userfaultfd::{Event, EventBuffer, FaultKind};

use super::claims::PageClaims;
use super::latency::LatencyHistogram;
use super::protect::WriteProtector;
use crate::uffd::wake;

/// A page saved by the fault handler: its start-instant contents.
#[derive(Debug)]
pub struct FaultCopy {
    /// RAM page number.
    pub page: u64,
    /// The page's bytes (PAGE_SIZE).
    pub data: Box<[u8]>,
}

/// What the handler did, readable while it runs.
#[derive(Debug, Default)]
pub struct FaultStats {
    /// Write-protect faults served.
    pub faults: AtomicU64,
    /// Pages the handler saved (the others were already saved or known zero).
    pub copies: AtomicU64,
    /// Time from reading a fault to waking its thread.
    pub latency: LatencyHistogram,
    error: Mutex<Option<String>>,
}

impl FaultStats {
    /// The first error the handler met, if any (the snapshot must then fail).
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn fail(&self, e: String) {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    }
}

/// Everything the handler thread works with.
pub struct FaultContext {
    /// The registered RAM and its userfaultfd.
    pub protector: Arc<WriteProtector>,
    /// Guest memory.
    pub ram: Arc<GuestRam>,
    /// Which pages are saved already.
    pub claims: Arc<PageClaims>,
    /// Where copies go (the writer).
    pub copies: Sender<FaultCopy>,
    /// Counters and latencies.
    pub stats: Arc<FaultStats>,
}

/// A running fault-handler thread.
pub struct FaultHandler {
    stop: Arc<AtomicBool>,
    wake: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl FaultHandler {
    /// Starts the handler thread.
    pub fn spawn(ctx: FaultContext) -> io::Result<FaultHandler> {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = wake::eventfd()?;
        let wake_fd = wake.as_raw_fd();
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("snapshot-faults".into())
            .spawn(move || serve(&ctx, &s, wake_fd))?;
        Ok(FaultHandler {
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        wake::signal(&self.wake);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(ctx: &FaultContext, stop: &AtomicBool, wake_fd: i32) {
    let uffd = ctx.protector.uffd();
    let mut buf = EventBuffer::new(64);
    let mut addrs: Vec<usize> = Vec::with_capacity(64);
    while !stop.load(Ordering::Acquire) {
        wake::wait_readable(uffd.as_raw_fd(), wake_fd, 100);
        addrs.clear();
        match uffd.read_events(&mut buf) {
            Ok(events) => {
                for e in events {
                    match e {
                        Ok(Event::Pagefault {
                            kind: FaultKind::WriteProtected,
                            addr,
                            ..
                        }) => addrs.push(addr as usize),
                        Ok(Event::Pagefault { addr, .. }) => {
                            // Not ours to resolve (no missing-mode registration): just wake.
                            let page = (addr as usize) & !(PAGE_SIZE - 1);
                            let _ = uffd.wake(page as *mut libc::c_void, PAGE_SIZE);
                        }
                        Ok(_) => {}
                        Err(e) => ctx.stats.fail(format!("reading a userfaultfd event: {e}")),
                    }
                }
            }
            Err(e) => {
                ctx.stats.fail(format!("reading userfaultfd events: {e}"));
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for &addr in &addrs {
            serve_one(ctx, stop, addr);
        }
    }
}

fn serve_one(ctx: &FaultContext, stop: &AtomicBool, addr: usize) {
    let t0 = Instant::now();
    ctx.stats.faults.fetch_add(1, Ordering::Relaxed);
    let Some(page) = ctx.protector.page_at(addr) else {
        let _ = ctx
            .protector
            .uffd()
            .wake((addr & !(PAGE_SIZE - 1)) as *mut libc::c_void, PAGE_SIZE);
        return;
    };
    if !ctx.claims.is_claimed(page) {
        // Copy first, claim second (see claims.rs): the copy is valid if the claim wins.
        if let Some(bytes) = ctx.ram.page(page) {
            let data: Box<[u8]> = bytes.into();
            if ctx.claims.claim(page) {
                ctx.stats.copies.fetch_add(1, Ordering::Relaxed);
                let mut copy = FaultCopy { page, data };
                loop {
                    match ctx.copies.send_timeout(copy, Duration::from_millis(50)) {
                        Ok(()) => break,
                        Err(SendTimeoutError::Timeout(c)) => {
                            if stop.load(Ordering::Acquire) {
                                break;
                            }
                            copy = c;
                        }
                        // The writer is gone: the snapshot is ending anyway.
                        Err(SendTimeoutError::Disconnected(_)) => break,
                    }
                }
            }
        }
    }
    if let Err(e) = ctx.protector.unprotect(page, 1) {
        ctx.stats
            .fail(format!("unprotecting page {page} after a fault: {e}"));
        let _ = ctx
            .protector
            .uffd()
            .wake((addr & !(PAGE_SIZE - 1)) as *mut libc::c_void, PAGE_SIZE);
    }
    ctx.stats.latency.record(t0.elapsed());
}
