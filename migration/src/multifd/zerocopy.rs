//! `MSG_ZEROCOPY` sends on a TCP socket (Linux): the kernel pins the pages and sends them
//! without copying; a completion for each `sendmsg` arrives on the socket's error queue.
//!
//! The sender only passes guest memory this way (packet headers go with a plain write),
//! so nothing of ours must stay untouched until completion; completions are still reaped
//! after every send, so the error queue (and the pinned-page accounting behind it) stays
//! small, and waited for at every sync point, where a completion flagged "copied" (the
//! kernel fell back to copying, as it always does on loopback) counts one
//! `dirty-sync-missed-zero-copy`, as QEMU does.

use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// `SO_EE_ORIGIN_ZEROCOPY` from linux/errqueue.h.
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `SO_EE_CODE_ZEROCOPY_COPIED`: the kernel copied the data after all.
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;
/// Sends not yet completed after which the sender waits for completions.
const MAX_OUTSTANDING: u64 = 256;

/// A socket sending with `MSG_ZEROCOPY`.
pub struct ZeroCopySender {
    fd: RawFd,
    issued: u64,
    completed: u64,
    copied: bool,
    timeout: Duration,
}

/// Turns `SO_ZEROCOPY` on for `fd` (fails when the kernel or socket type lacks it).
pub fn enable(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ZEROCOPY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl ZeroCopySender {
    /// Enables zero-copy on `fd`, a connected TCP socket that outlives this value;
    /// completions are waited for at most `timeout`.
    pub fn new(fd: RawFd, timeout: Duration) -> io::Result<Self> {
        enable(fd)?;
        Ok(ZeroCopySender {
            fd,
            issued: 0,
            completed: 0,
            copied: false,
            timeout,
        })
    }

    /// Sends completed so far and sends issued.
    pub fn progress(&self) -> (u64, u64) {
        (self.completed, self.issued)
    }

    fn sendmsg(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: an all-zero msghdr is a valid empty message.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len().min(1024) as _;
        // SAFETY: `msg` points at `bufs` (IoSlice is ABI-compatible with iovec), which
        // stay alive for the call; the kernel only reads them.
        let r = unsafe { libc::sendmsg(self.fd, &msg, libc::MSG_ZEROCOPY | libc::MSG_NOSIGNAL) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Sends every byte of `bufs` with `MSG_ZEROCOPY`.
    pub fn send_all(&mut self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match self.sendmsg(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.issued += 1;
                    IoSlice::advance_slices(&mut bufs, n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Too much pinned memory outstanding: wait for completions, then retry.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    if self.completed == self.issued {
                        return Err(e);
                    }
                    self.reap_until(self.issued)?;
                }
                Err(e) => return Err(e),
            }
        }
        self.reap(false)?;
        if self.issued - self.completed > MAX_OUTSTANDING {
            self.reap_until(self.issued - MAX_OUTSTANDING / 2)?;
        }
        Ok(())
    }

    /// Reads the completions waiting on the error queue; with `wait`, waits up to 100 ms
    /// for the first one.
    fn reap(&mut self, wait: bool) -> io::Result<bool> {
        let mut got = false;
        loop {
            let mut control = [0u64; 16];
            // SAFETY: an all-zero msghdr is a valid empty message.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            // SAFETY: `msg` describes `control`, a live buffer of msg_controllen bytes.
            let r = unsafe {
                libc::recvmsg(self.fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT)
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock if wait && !got => {
                        let mut p = libc::pollfd {
                            fd: self.fd,
                            events: libc::POLLERR,
                            revents: 0,
                        };
                        // SAFETY: poll on one live pollfd.
                        let n = unsafe { libc::poll(&mut p, 1, 100) };
                        if n <= 0 {
                            return Ok(false);
                        }
                        continue;
                    }
                    io::ErrorKind::WouldBlock => return Ok(got),
                    _ => return Err(e),
                }
            }
            got |= self.parse(&msg)?;
        }
    }

    fn parse(&mut self, msg: &libc::msghdr) -> io::Result<bool> {
        let mut got = false;
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the control buffer the kernel filled in,
        // bounded by msg_controllen.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
        while !cmsg.is_null() {
            // SAFETY: `cmsg` is non-null and points inside the control buffer.
            let c = unsafe { &*cmsg };
            let ours = (c.cmsg_level == libc::SOL_IP && c.cmsg_type == libc::IP_RECVERR)
                || (c.cmsg_level == libc::SOL_IPV6 && c.cmsg_type == libc::IPV6_RECVERR);
            if ours {
                // SAFETY: an IP(V6)_RECVERR message carries a sock_extended_err; read it
                // unaligned from the data area.
                let ee: libc::sock_extended_err = unsafe {
                    std::ptr::read_unaligned(
                        libc::CMSG_DATA(cmsg).cast::<libc::sock_extended_err>(),
                    )
                };
                if ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY && ee.ee_errno == 0 {
                    let (lo, hi) = (ee.ee_info, ee.ee_data);
                    self.completed += u64::from(hi.wrapping_sub(lo)) + 1;
                    if ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0 {
                        self.copied = true;
                    }
                    got = true;
                } else if ee.ee_errno != 0 {
                    return Err(io::Error::from_raw_os_error(ee.ee_errno as i32));
                }
            }
            // SAFETY: as above.
            cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
        }
        Ok(got)
    }

    fn reap_until(&mut self, target: u64) -> io::Result<()> {
        let deadline = Instant::now() + self.timeout;
        while self.completed < target {
            self.reap(true)?;
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "zero-copy completions: {} of {} after {:?}",
                        self.completed, self.issued, self.timeout
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Waits until every send has completed; returns whether any was copied after all
    /// since the previous flush (QEMU's `qio_channel_flush` returning 1).
    pub fn flush(&mut self) -> io::Result<bool> {
        self.reap_until(self.issued)?;
        Ok(std::mem::take(&mut self.copied))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn zero_copy_sends_arrive_intact_and_complete() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut rx, _) = l.accept().unwrap();
        let Ok(mut zc) = ZeroCopySender::new(tx.as_raw_fd(), Duration::from_secs(10)) else {
            eprintln!("SO_ZEROCOPY unavailable here: skipped");
            return;
        };
        let a: Vec<u8> = (0..64 * 1024).map(|i| i as u8).collect();
        let b = vec![7u8; 4096];
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            rx.read_to_end(&mut got).unwrap();
            got
        });
        for _ in 0..50 {
            zc.send_all(&mut [IoSlice::new(&a), IoSlice::new(&b)])
                .unwrap();
        }
        // Loopback always copies, so a flush reports "copied" there.
        let _copied = zc.flush().unwrap();
        let (done, issued) = zc.progress();
        assert_eq!(done, issued);
        assert!(issued >= 50);
        drop(tx);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), 50 * (a.len() + b.len()));
        for chunk in got.chunks(a.len() + b.len()) {
            assert_eq!(&chunk[..a.len()], &a[..]);
            assert_eq!(&chunk[a.len()..], &b[..]);
        }
    }
}
