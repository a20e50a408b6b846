//! The destination's main-stream reader with a bound on silence: a read that gets no byte
//! from the source, on the main stream or on any multifd channel, for the io timeout
//! fails instead of waiting forever (a source that froze, a link that died without a
//! reset). The source sends keepalive frames while it has nothing to send (see
//! `source::send_keepalive`), so silence means trouble. Precopy and local loads read through
//! it; postcopy takes the plain channel back (it pauses and recovers instead).

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::stall::StallClock;
use crate::stream::frame::StreamSource;
use crate::transport::Channel;

/// How long one blocking read waits before the watch looks at the other channels.
const TICK: Duration = Duration::from_millis(500);

/// A channel whose reads fail after `limit` without progress.
pub struct SilenceWatch {
    ch: Channel,
    limit: Duration,
    write_timeout: Option<Duration>,
    /// Bytes received on other channels (the multifd ones) so far.
    other: Option<Arc<AtomicU64>>,
}

impl SilenceWatch {
    /// Watches reads of `ch`, failing them after `limit` of silence; `write_timeout` is what
    /// the channel's writes keep (the socket's timeouts are shared with its clones).
    pub fn new(ch: Channel, limit: Duration, write_timeout: Option<Duration>) -> io::Result<Self> {
        ch.set_timeouts(Some(TICK.min(limit)), write_timeout)?;
        Ok(SilenceWatch {
            ch,
            limit,
            write_timeout,
            other: None,
        })
    }

    /// Counts bytes arriving on other channels as progress too.
    pub fn watch_also(&mut self, other: Arc<AtomicU64>) {
        self.other = Some(other);
    }

    /// The channel.
    pub fn get_ref(&self) -> &Channel {
        &self.ch
    }

    /// The channel back, reads blocking without a bound again (the write timeout kept).
    pub fn into_inner(self) -> Channel {
        let _ = self.ch.set_timeouts(None, self.write_timeout);
        self.ch
    }

    /// Runs `f` on the channel with one read bounded by the whole silence limit, for a read
    /// that cannot be retried in pieces (a message carrying file descriptors).
    pub fn with_whole_limit<T>(&self, f: impl FnOnce(&Channel) -> T) -> io::Result<T> {
        self.ch.set_timeouts(Some(self.limit), self.write_timeout)?;
        let r = f(&self.ch);
        self.ch
            .set_timeouts(Some(TICK.min(self.limit)), self.write_timeout)?;
        Ok(r)
    }

    /// Runs `op` until it gets bytes (or the end of the stream, or an error), retrying
    /// reads that time out while anything arrives anywhere, for up to `limit` of silence.
    fn watched(
        &mut self,
        mut op: impl FnMut(&mut Channel) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut clock = StallClock::new(self.other_bytes(), self.limit);
        loop {
            match op(&mut self.ch) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if clock.stalled(self.other_bytes()) {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "nothing arrived from the source for {:?}: the source stopped, or \
                                 the link between the hosts is down or stuck",
                                self.limit
                            ),
                        ));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    fn other_bytes(&self) -> u64 {
        self.other.as_ref().map_or(0, |o| o.load(Ordering::Acquire))
    }
}

impl Read for SilenceWatch {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.watched(|ch| ch.read(buf))
    }
}

impl StreamSource for SilenceWatch {
    unsafe fn read_iov(&mut self, iov: &mut [libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller's guarantee about `iov` is passed on unchanged.
        self.watched(|ch| unsafe { ch.read_iov(iov) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    fn pair(limit: Duration) -> (SilenceWatch, UnixStream) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        (
            SilenceWatch::new(Channel::Unix(a), limit, None).expect("watch"),
            b,
        )
    }

    #[test]
    fn a_silent_peer_fails_the_read_after_the_limit() {
        let (mut w, _peer) = pair(Duration::from_millis(300));
        let t0 = Instant::now();
        let e = w.read(&mut [0u8; 8]).expect_err("silence");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("nothing arrived"), "{e}");
        assert!(t0.elapsed() >= Duration::from_millis(300));
    }

    #[test]
    fn progress_on_another_channel_keeps_the_read_waiting() {
        let (mut w, mut peer) = pair(Duration::from_millis(300));
        let other = Arc::new(AtomicU64::new(0));
        w.watch_also(other.clone());
        let writer = std::thread::spawn(move || {
            // 1.2 s of silence on this channel while the other one moves.
            for _ in 0..12 {
                std::thread::sleep(Duration::from_millis(100));
                other.fetch_add(1, Ordering::Release);
            }
            peer.write_all(b"late").expect("write");
            peer
        });
        let mut buf = [0u8; 4];
        w.read_exact(&mut buf).expect("the read outlives the limit");
        assert_eq!(&buf, b"late");
        drop(writer.join());
    }

    #[test]
    fn data_and_end_of_stream_pass_through() {
        let (mut w, mut peer) = pair(Duration::from_millis(300));
        peer.write_all(b"abc").expect("write");
        drop(peer);
        let mut all = Vec::new();
        w.read_to_end(&mut all).expect("read");
        assert_eq!(all, b"abc");
        let ch = w.into_inner();
        assert!(matches!(ch, Channel::Unix(_)));
    }
}
