//! The source's preempt channel (`postcopy-preempt`): a thread that reads page requests
//! from the second connection and answers each at once on that same connection, so a
//! faulting vCPU's page never waits behind the background stream.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use ram::{AtomicBitmap, GuestRam};

use crate::info::Phase;
use crate::rate_limit::RateLimiter;
use crate::source::ram_sender::RamSender;
use crate::source::Shared;
use crate::stream::frame::FrameWriter;
use crate::stream::ranges::PageRange;
use crate::stream::Reply;
use crate::transport::Channel;

/// A message for the migration thread: a reply, or why a channel broke.
pub(crate) type RpMsg = std::result::Result<Reply, String>;

/// What the urgent thread shares with the migration thread.
pub(crate) struct UrgentContext {
    /// Guest memory (stopped).
    pub ram: Arc<GuestRam>,
    /// Pages not sent yet (a requested page's bit is cleared here).
    pub to_send: Arc<AtomicBitmap>,
    /// Pages the destination has (never sent again).
    pub acked: Arc<AtomicBitmap>,
    /// The migration (counters, postcopy controls).
    pub shared: Arc<Shared>,
    /// Where a broken channel is reported.
    pub events: Sender<RpMsg>,
}

/// A running urgent-page thread.
pub(crate) struct UrgentSender {
    ch: Channel,
    thread: Option<JoinHandle<()>>,
}

impl UrgentSender {
    /// Starts serving requests that arrive on `ch`.
    pub(crate) fn spawn(ch: Channel, ctx: UrgentContext) -> std::io::Result<UrgentSender> {
        let reader = ch.try_clone()?;
        let writer = ch.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("postcopy-urgent".into())
            .spawn(move || serve(reader, writer, &ctx))?;
        Ok(UrgentSender {
            ch,
            thread: Some(thread),
        })
    }

    /// Closes the channel and waits for the thread.
    pub(crate) fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.ch.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for UrgentSender {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn serve(mut reader: Channel, writer: Channel, ctx: &UrgentContext) {
    let mut out = FrameWriter::new(writer);
    let unlimited = RateLimiter::with_limit(0);
    let never = AtomicBool::new(false);
    let pages = ctx.ram.page_count();
    loop {
        let ranges = match Reply::read_from(&mut reader) {
            Ok(Reply::PageRequest(r)) => r,
            Ok(other) => {
                let _ = ctx
                    .events
                    .send(Err(format!("unexpected {other:?} on the preempt channel")));
                return;
            }
            Err(e) => {
                let _ = ctx.events.send(Err(format!("preempt channel: {e}")));
                return;
            }
        };
        let mut sender = RamSender::new(
            &ctx.ram,
            &mut out,
            &ctx.shared.counters,
            &unlimited,
            &never,
            Phase::Postcopy,
        );
        let mut n = 0u64;
        let mut result = Ok(());
        for p in pages_in_ram(&ranges, pages) {
            if ctx.acked.get(p) {
                continue;
            }
            ctx.to_send.test_and_clear(p);
            if let Err(e) = sender.send_page(p) {
                result = Err(e);
                break;
            }
            n += 1;
        }
        let result = result.and_then(|_| sender.finish());
        ctx.shared
            .counters
            .add_postcopy_requests(ranges.len() as u64);
        ctx.shared.postcopy.add_urgent(n);
        if let Err(e) = result.and_then(|_| out.flush().map_err(Into::into)) {
            let _ = ctx
                .events
                .send(Err(format!("sending on the preempt channel: {e}")));
            return;
        }
    }
}

/// The pages of the requested `ranges`, in order. Ranges come from the destination checked
/// only for overflow (decoded against u64::MAX): one that reaches past the `pages` pages of
/// RAM is ignored whole, as on the main channel, rather than walked up to u64::MAX.
fn pages_in_ram(ranges: &[PageRange], pages: u64) -> impl Iterator<Item = u64> + '_ {
    ranges
        .iter()
        .filter(move |r| r.within(pages))
        .flat_map(PageRange::pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_reaching_past_ram_are_ignored_whole_not_walked() {
        let r = |first, count| PageRange { first, count };
        let asked = [
            r(2, 3),
            r(0, u64::MAX),
            r(10, u64::MAX - 10),
            r(15, 2),
            r(14, 2),
        ];
        // Before the fix the two huge ranges were walked page by page to u64::MAX.
        assert_eq!(
            pages_in_ram(&asked, 16).collect::<Vec<_>>(),
            vec![2, 3, 4, 14, 15]
        );
    }
}
