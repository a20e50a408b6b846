//! Passing a file descriptor over a unix socket (SCM_RIGHTS), for local migration.
//!
//! The descriptor travels with a small payload (sent in the same message, so the receiver
//! reads the payload's first byte and the descriptor together); the payload says what the
//! descriptor is.

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Sends `payload` (at least one byte) and `fd` over `sock` in one message.
pub fn send_fd(sock: &UnixStream, payload: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    if payload.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a passed descriptor needs at least one byte of payload",
        ));
    }
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let mut sent = loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(payload)],
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    // The descriptor went with the first byte; the rest of the payload follows plainly.
    let mut w = sock;
    while sent < payload.len() {
        sent += io::Write::write(&mut w, &payload[sent..])?;
    }
    Ok(())
}

/// Receives exactly `payload.len()` bytes and the descriptor sent with them by [`send_fd`].
///
/// Fails if the message carries no descriptor or more than one (extra ones are closed).
pub fn recv_fd(sock: &UnixStream, payload: &mut [u8]) -> io::Result<OwnedFd> {
    if payload.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a passed descriptor comes with at least one byte of payload",
        ));
    }
    // Room for a few descriptors, so a peer sending several cannot make the kernel drop
    // them silently (MSG_CTRUNC): they are received and closed here.
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let (n, fds) = loop {
        let mut iov = [IoSliceMut::new(payload)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds: Vec<OwnedFd> = Vec::new();
                let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            for r in raw {
                                // SAFETY: the kernel just installed `r` in this process for
                                // us (SCM_RIGHTS); nothing else owns it.
                                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                            }
                        }
                    }
                }
                if truncated {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the peer sent more descriptors than expected",
                    ));
                }
                break (msg.bytes, fds);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection instead of passing a descriptor",
        ));
    }
    let mut fds = fds.into_iter();
    let fd = match (fds.next(), fds.next()) {
        (Some(fd), None) => fd,
        (None, _) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer's message carries no file descriptor",
            ))
        }
        (Some(_), Some(_)) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer's message carries several file descriptors, expected one",
            ))
        }
    };
    let mut r = sock;
    r.read_exact(&mut payload[n..])?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::fd::AsFd;

    #[test]
    fn a_file_travels_with_its_payload_and_stays_the_same_file() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile_like();
        f.write_all(b"shared pages").unwrap();
        send_fd(&a, &42u64.to_le_bytes(), f.as_fd()).unwrap();
        (&a).write_all(b"after").unwrap();
        let mut payload = [0u8; 8];
        let fd = recv_fd(&b, &mut payload).unwrap();
        assert_eq!(u64::from_le_bytes(payload), 42);
        let mut g = File::from(fd);
        g.seek(SeekFrom::Start(0)).unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "shared pages");
        let mut rest = [0u8; 5];
        (&b).read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"after", "the stream goes on after the descriptor");
    }

    #[test]
    fn a_message_without_a_descriptor_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let mut payload = [0u8; 8];
        let e = recv_fd(&b, &mut payload).unwrap_err();
        assert!(e.to_string().contains("no file descriptor"), "{e}");
        drop(a);
        let e = recv_fd(&b, &mut payload).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn several_descriptors_are_refused_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let f1 = tempfile_like();
        let f2 = tempfile_like();
        let fds = [f1.as_raw_fd(), f2.as_raw_fd()];
        sendmsg::<()>(
            a.as_raw_fd(),
            &[IoSlice::new(&[0u8; 8])],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut payload = [0u8; 8];
        let e = recv_fd(&b, &mut payload).unwrap_err();
        assert!(e.to_string().contains("several"), "{e}");
    }

    fn tempfile_like() -> File {
        let fd = nix::sys::memfd::memfd_create(
            c"ferry-fd-passing-test",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .unwrap();
        File::from(fd)
    }
}
