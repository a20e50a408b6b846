//! The destination's outgoing messages during postcopy: a [`ReplyLink`] several threads
//! write replies through (and which remembers that it broke), and the [`Acker`] that
//! batches RECEIVED acknowledgements for `release-ram`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::stream::ranges::ranges_of_pages;
use crate::stream::Reply;
use crate::transport::Channel;

/// A reply channel shared by threads: the fault thread's requests, the receivers'
/// acknowledgements, the control thread's handshake messages.
#[derive(Default)]
pub struct ReplyLink {
    ch: Mutex<Option<Channel>>,
    broken: AtomicBool,
    why: Mutex<Option<String>>,
}

impl ReplyLink {
    /// A link with no channel yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Option<Channel>> {
        self.ch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts writing to `ch` (a fresh connection after a recovery).
    pub fn attach(&self, ch: Channel) {
        *self.lock() = Some(ch);
        *self.why.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.broken.store(false, Ordering::Release);
    }

    /// Stops writing: shuts the channel down and forgets it.
    pub fn detach(&self) {
        if let Some(ch) = self.lock().take() {
            ch.shutdown();
        }
    }

    /// Sends `r`; false when there is no channel or it broke (the link is then marked broken).
    pub fn send(&self, r: &Reply) -> bool {
        let mut g = self.lock();
        let Some(ch) = g.as_mut() else { return false };
        match r.write_to(ch) {
            Ok(()) => true,
            Err(e) => {
                self.broken.store(true, Ordering::Release);
                self.why
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert_with(|| format!("sending to the source: {e}"));
                false
            }
        }
    }

    /// Sends every message of `rs` in order; false if one could not be sent.
    pub fn send_all(&self, rs: &[Reply]) -> bool {
        rs.iter().all(|r| self.send(r))
    }

    /// Whether a write failed since the last [`ReplyLink::attach`].
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Why it broke.
    pub fn why(&self) -> Option<String> {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Pages placed but not yet acknowledged.
struct Pending {
    pages: Vec<u64>,
    since: Instant,
}

/// Batches RECEIVED acknowledgements (only when the source asked for them).
pub struct Acker {
    enabled: bool,
    pending: Mutex<Pending>,
}

/// Acknowledge once this many pages are pending ...
const ACK_PAGES: usize = 512;
/// ... or the oldest waited this long.
const ACK_DELAY: Duration = Duration::from_millis(20);

impl Acker {
    /// An acker; `enabled` when the source wants acknowledgements (release-ram).
    pub fn new(enabled: bool) -> Self {
        Acker {
            enabled,
            pending: Mutex::new(Pending {
                pages: Vec::new(),
                since: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that `page` is in place; acknowledges through `link` when a batch is due.
    pub fn placed(&self, page: u64, link: &ReplyLink) {
        if !self.enabled {
            return;
        }
        let mut p = self.lock();
        if p.pages.is_empty() {
            p.since = Instant::now();
        }
        p.pages.push(page);
        if p.pages.len() >= ACK_PAGES {
            let pages = std::mem::take(&mut p.pages);
            drop(p);
            Self::send(pages, link);
        }
    }

    /// Acknowledges what is pending if it waited long enough (or at all, with `force`).
    pub fn flush(&self, link: &ReplyLink, force: bool) {
        if !self.enabled {
            return;
        }
        let mut p = self.lock();
        if p.pages.is_empty() || (!force && p.since.elapsed() < ACK_DELAY) {
            return;
        }
        let pages = std::mem::take(&mut p.pages);
        drop(p);
        Self::send(pages, link);
    }

    fn send(mut pages: Vec<u64>, link: &ReplyLink) {
        pages.sort_unstable();
        // Unsent acknowledgements are harmless: the pages simply stay unreleased on the source.
        link.send_all(&Reply::chunked(&ranges_of_pages(pages), Reply::Received));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::ranges::PageRange;
    use std::os::unix::net::UnixStream;

    #[test]
    fn acknowledgements_are_batched_as_ranges() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let link = ReplyLink::new();
        link.attach(Channel::Unix(a));
        let acker = Acker::new(true);
        for p in (0..ACK_PAGES as u64).rev() {
            acker.placed(p, &link);
        }
        match Reply::read_from(&mut b).unwrap() {
            Reply::Received(r) => assert_eq!(
                r,
                vec![PageRange {
                    first: 0,
                    count: ACK_PAGES as u64
                }]
            ),
            other => panic!("{other:?}"),
        }
        acker.placed(900, &link);
        acker.flush(&link, false);
        acker.flush(&link, true);
        match Reply::read_from(&mut b).unwrap() {
            Reply::Received(r) => assert_eq!(
                r,
                vec![PageRange {
                    first: 900,
                    count: 1
                }]
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_detached_link_refuses_quietly_and_a_dead_one_is_marked_broken() {
        let link = ReplyLink::new();
        assert!(!link.send(&Reply::PostcopyDone));
        assert!(!link.is_broken());
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        link.attach(Channel::Unix(a));
        let _ = link.send(&Reply::PostcopyDone);
        assert!(!link.send(&Reply::PostcopyDone));
        assert!(link.is_broken());
        assert!(link.why().is_some());
    }
}
