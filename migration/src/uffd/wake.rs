//! Waking a thread that polls a userfaultfd: an eventfd it polls beside the uffd, shared by
//! the background-snapshot and postcopy fault handlers.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A new non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd(2) takes two integers and returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes `wake` readable, ending a [`wait_readable`] that polls it.
pub fn signal(wake: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a live u64 to an eventfd the caller owns.
    unsafe {
        libc::write(
            wake.as_raw_fd(),
            (&one as *const u64).cast(),
            std::mem::size_of::<u64>(),
        );
    }
}

/// Waits until the userfaultfd or the wake fd is readable, or `ms` milliseconds pass.
pub fn wait_readable(uffd: i32, wake: i32, ms: i32) {
    let mut fds = [
        libc::pollfd {
            fd: uffd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a live array of two pollfd structs.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_signal_ends_the_wait_at_once() {
        let wake = eventfd().expect("eventfd");
        let other = eventfd().expect("eventfd");
        let t = Instant::now();
        wait_readable(other.as_raw_fd(), wake.as_raw_fd(), 50);
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "nothing readable: waits"
        );
        signal(&wake);
        let t = Instant::now();
        wait_readable(other.as_raw_fd(), wake.as_raw_fd(), 5000);
        assert!(t.elapsed() < Duration::from_secs(2), "signalled: returns");
    }
}
