//! The destination's fault thread: reads missing-page faults from the userfaultfd and
//! turns them into page requests (QEMU's `postcopy_ram_fault_thread`).
//!
//! For each fault it asks the [`PageTracker`] what to do: request a needed page (once, in
//! one PAGE_REQUEST per batch of faults), or resolve a page the source never has to send
//! (a page that was never written reads as zero; one placed meanwhile only needs a wake).
//! While the link is down requests cannot be sent; the tracker remembers them and they are
//! asked for again after the recovery. Between faults it flushes due acknowledgements.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::link::{Acker, ReplyLink};
use super::pages::{FaultAction, PageTracker};
use super::registration::{Fault, MissingRegistration, Placement};
use crate::stream::ranges::ranges_of_pages;
use crate::stream::Reply;
use crate::uffd::wake;

/// Everything the fault thread works with.
pub struct FaultContext {
    /// The registered RAM.
    pub reg: Arc<MissingRegistration>,
    /// The page bookkeeping.
    pub tracker: Arc<PageTracker>,
    /// Where requests go (the preempt channel with postcopy-preempt, else the return path).
    pub requests: Arc<ReplyLink>,
    /// The return path (for acknowledgements).
    pub main: Arc<ReplyLink>,
    /// RECEIVED batching.
    pub acker: Arc<Acker>,
}

/// A running fault thread.
pub struct FaultThread {
    stop: Arc<AtomicBool>,
    wake: std::os::fd::OwnedFd,
    thread: Option<JoinHandle<()>>,
    error: Arc<Mutex<Option<String>>>,
}

impl FaultThread {
    /// Starts the thread.
    pub fn spawn(ctx: FaultContext) -> std::io::Result<FaultThread> {
        use std::os::fd::AsRawFd;
        let stop = Arc::new(AtomicBool::new(false));
        let wake = wake::eventfd()?;
        let wake_fd = wake.as_raw_fd();
        let error = Arc::new(Mutex::new(None));
        let (s, e) = (stop.clone(), error.clone());
        let thread = std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || serve(&ctx, &s, wake_fd, &e))?;
        Ok(FaultThread {
            stop,
            wake,
            thread: Some(thread),
            error,
        })
    }

    /// The first error the thread met, if any.
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
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

impl Drop for FaultThread {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(ctx: &FaultContext, stop: &AtomicBool, wake_fd: i32, error: &Mutex<Option<String>>) {
    let mut faults: Vec<Fault> = Vec::with_capacity(64);
    let mut want: Vec<u64> = Vec::with_capacity(64);
    let fail = |e: String| {
        error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    };
    while !stop.load(Ordering::Acquire) {
        wake::wait_readable(ctx.reg.raw_fd(), wake_fd, 20);
        faults.clear();
        if let Err(e) = ctx.reg.read_faults(&mut faults) {
            fail(format!("reading userfaultfd messages: {e}"));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        want.clear();
        for f in &faults {
            let Some(page) = ctx.reg.page_at(f.addr) else {
                continue;
            };
            match ctx.tracker.fault(page, f.tid) {
                FaultAction::ResolveLocally => match ctx.reg.place_zero(page) {
                    Ok(Placement::Placed) => {}
                    Ok(Placement::AlreadyPresent) => {
                        if let Err(e) = ctx.reg.wake(page) {
                            fail(e.to_string());
                        }
                    }
                    Err(e) => fail(e.to_string()),
                },
                FaultAction::Request => want.push(page),
                FaultAction::AlreadyRequested => {}
            }
        }
        if !want.is_empty() {
            want.sort_unstable();
            // A request that cannot go out now is asked for again after a recovery.
            ctx.requests.send_all(&Reply::chunked(
                &ranges_of_pages(want.iter().copied()),
                Reply::PageRequest,
            ));
        }
        ctx.acker.flush(&ctx.main, false);
    }
}
