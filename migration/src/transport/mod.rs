//! Where a migration goes: URIs (`tcp:`, `unix:`, `file:`), connecting and listening.

pub mod fd_passing;
pub mod tls;
pub mod uri;

pub use uri::MigrationUri;

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// Errors setting up a transport.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The URI is not one Ferry understands (QEMU's text).
    #[error("unknown migration protocol: {0}")]
    UnknownProtocol(String),
    /// A URI with the right scheme but a bad address.
    #[error("invalid migration URI '{uri}': {why}")]
    BadUri {
        /// The URI.
        uri: String,
        /// What is wrong.
        why: String,
    },
    /// Connecting failed.
    #[error("failed to connect to '{uri}': {source}")]
    Connect {
        /// The URI.
        uri: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Listening failed.
    #[error("failed to listen on '{uri}': {source}")]
    Listen {
        /// The URI.
        uri: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Opening a file failed.
    #[error("failed to open migration file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Accepting a connection failed.
    #[error("failed to accept a migration connection: {0}")]
    Accept(#[source] io::Error),
    /// TLS could not be set up or its handshake failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Default of [`io_timeout`]: a write that makes no progress for this long fails the
/// migration (a peer that stopped reading, a link that went down).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

static IO_TIMEOUT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(30_000);

/// Sets how long a migration socket may make no progress before the migration fails
/// (blocked writes, unacknowledged data, a dead peer): `ferry run --migration-io-timeout`.
pub fn set_io_timeout(t: Duration) {
    IO_TIMEOUT_MS.store(
        t.as_millis().clamp(100, u128::from(u32::MAX)) as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// How long a migration socket may make no progress (default [`WRITE_TIMEOUT`]).
pub fn io_timeout() -> Duration {
    Duration::from_millis(IO_TIMEOUT_MS.load(std::sync::atomic::Ordering::Relaxed))
}
/// Unacknowledged TCP data older than this breaks the connection (TCP_USER_TIMEOUT), and
/// keepalive probes find a dead peer on an idle connection in about the same time.
pub const TCP_DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(30);

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) {
    // SAFETY: setsockopt with a pointer to a live c_int of the size passed.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
    }
}

/// Makes a TCP socket notice a dead peer or link instead of hanging forever.
fn tcp_dead_peer_detection(s: &TcpStream) {
    let fd = s.as_raw_fd();
    let _ = s.set_nodelay(true);
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    // Keepalive probes find a dead peer on an idle connection in about io_timeout().
    let t = io_timeout().as_secs().max(2) as i32;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, (t / 3).max(1));
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, (t / 6).max(1));
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 4);
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        io_timeout().as_millis() as i32,
    );
    // Writes block while this much is queued unsent, instead of filling a send buffer of
    // megabytes: what the migration counts as sent is then (nearly) on the wire, so its
    // bandwidth estimate and switchover decision hold on slow links too.
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_NOTSENT_LOWAT,
        NOTSENT_LOWAT,
    );
}

/// Most bytes a migration TCP socket keeps queued but not yet sent (TCP_NOTSENT_LOWAT).
pub const NOTSENT_LOWAT: i32 = 1 << 20;

/// How long a TLS handshake may take.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// One end of a migration connection, or a file.
pub enum Channel {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A unix-socket connection.
    Unix(UnixStream),
    /// A file being written (outgoing) or read (incoming).
    File(File),
    /// A TLS connection (over TCP or a unix socket).
    Tls(tls::TlsStream),
}

impl Channel {
    /// Whether the channel can carry replies from the destination (sockets can, files cannot).
    pub fn is_bidirectional(&self) -> bool {
        !matches!(self, Channel::File(_))
    }

    /// A second handle on the same channel (for a reader thread beside a writer).
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(match self {
            Channel::Tcp(s) => Channel::Tcp(s.try_clone()?),
            Channel::Unix(s) => Channel::Unix(s.try_clone()?),
            Channel::File(f) => Channel::File(f.try_clone()?),
            Channel::Tls(t) => Channel::Tls(t.clone()),
        })
    }

    /// Sets read and write timeouts (None = block forever). Files ignore them.
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Channel::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Channel::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Channel::File(_) => Ok(()),
            Channel::Tls(t) => {
                t.set_timeouts(read, write);
                Ok(())
            }
        }
    }

    /// Bytes written into the channel that the peer has not taken yet (TCP: not yet
    /// acknowledged; unix: not yet read); None for files or when the kernel does not say.
    /// While it shrinks, the peer is making progress.
    pub fn unacknowledged_bytes(&self) -> Option<u64> {
        let fd = match self {
            Channel::Tcp(s) => s.as_raw_fd(),
            Channel::Unix(s) => s.as_raw_fd(),
            Channel::File(_) => return None,
            Channel::Tls(t) => t.raw_fd(),
        };
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one c_int through the pointer, which points at
        // a live local of that type; a bad descriptor only makes the call fail.
        let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued as *mut libc::c_int) };
        (r == 0).then(|| u64::try_from(queued).unwrap_or(0))
    }

    /// Shuts both directions down, waking any thread blocked on the channel.
    pub fn shutdown(&self) {
        match self {
            Channel::Tcp(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Channel::Unix(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Channel::File(_) => {}
            Channel::Tls(t) => t.shutdown(),
        }
    }

    /// Shuts the reading direction down, waking a thread blocked reading (its read returns
    /// end of stream) while replies can still be written.
    pub fn shutdown_read(&self) {
        match self {
            Channel::Tcp(s) => {
                let _ = s.shutdown(Shutdown::Read);
            }
            Channel::Unix(s) => {
                let _ = s.shutdown(Shutdown::Read);
            }
            Channel::File(_) => {}
            Channel::Tls(t) => t.shutdown_read(),
        }
    }

    /// The raw file descriptor.
    pub fn raw_fd(&self) -> i32 {
        match self {
            Channel::Tcp(s) => s.as_raw_fd(),
            Channel::Unix(s) => s.as_raw_fd(),
            Channel::File(f) => f.as_raw_fd(),
            Channel::Tls(t) => t.raw_fd(),
        }
    }

    /// Secures this (socket) channel as the outgoing side of TLS with `creds`, checking that
    /// the server's certificate names `hostname`.
    pub fn into_tls_client(
        self,
        creds: &tls::TlsCreds,
        hostname: &str,
    ) -> Result<Channel, tls::TlsError> {
        let sock = self.into_socket()?;
        tls::client(sock, creds, hostname, TLS_HANDSHAKE_TIMEOUT).map(Channel::Tls)
    }

    /// Secures this (socket) channel as the incoming side of TLS with `creds`, checking the
    /// client against `authz` when given.
    pub fn into_tls_server(
        self,
        creds: &tls::TlsCreds,
        authz: Option<&tls::Authz>,
    ) -> Result<Channel, tls::TlsError> {
        let sock = self.into_socket()?;
        tls::server(sock, creds, authz, TLS_HANDSHAKE_TIMEOUT).map(Channel::Tls)
    }

    fn into_socket(self) -> Result<tls::Socket, tls::TlsError> {
        match self {
            Channel::Tcp(s) => Ok(tls::Socket::Tcp(s)),
            Channel::Unix(s) => Ok(tls::Socket::Unix(s)),
            Channel::File(_) => Err(tls::TlsError::Handshake(
                "TLS is only available for socket migrations, not file:".into(),
            )),
            Channel::Tls(_) => Err(tls::TlsError::Handshake(
                "the channel is already TLS".into(),
            )),
        }
    }

    /// The unix socket, for passing file descriptors (x-ignore-shared).
    pub fn as_unix(&self) -> Option<&UnixStream> {
        match self {
            Channel::Unix(s) => Some(s),
            _ => None,
        }
    }
}

impl crate::stream::frame::StreamSource for Channel {
    unsafe fn read_iov(&mut self, iov: &mut [libc::iovec]) -> io::Result<usize> {
        if let Channel::Tls(t) = self {
            // Decrypted bytes come out of rustls: copy them into place.
            let total: usize = iov.iter().map(|v| v.iov_len).sum();
            let mut tmp = vec![0u8; total.min(1 << 20)];
            let n = t.read(&mut tmp)?;
            let mut done = 0;
            for v in iov.iter() {
                if done == n {
                    break;
                }
                let k = v.iov_len.min(n - done);
                // SAFETY: the caller guarantees `v` describes `iov_len` writable bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(tmp[done..].as_ptr(), v.iov_base.cast(), k)
                };
                done += k;
            }
            return Ok(n);
        }
        let n = iov.len().min(1024);
        // SAFETY: the caller guarantees the iovecs describe writable, unaliased memory;
        // readv writes at most their total length.
        let r = unsafe { libc::readv(self.raw_fd(), iov.as_ptr(), n as i32) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Channel::Tcp(s) => s.read(buf),
            Channel::Unix(s) => s.read(buf),
            Channel::File(f) => f.read(buf),
            Channel::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Channel::Tcp(s) => s.write(buf),
            Channel::Unix(s) => s.write(buf),
            Channel::File(f) => f.write(buf),
            Channel::Tls(t) => t.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Channel::Tcp(s) => s.write_vectored(bufs),
            Channel::Unix(s) => s.write_vectored(bufs),
            Channel::File(f) => f.write_vectored(bufs),
            Channel::Tls(t) => t.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Channel::Tcp(s) => s.flush(),
            Channel::Unix(s) => s.flush(),
            Channel::File(f) => f.flush(),
            Channel::Tls(t) => t.flush(),
        }
    }
}

/// Opens the outgoing side of a migration to `uri`.
pub fn connect(uri: &MigrationUri, timeout: Duration) -> Result<Channel, TransportError> {
    connect_cancellable(uri, timeout, &std::sync::atomic::AtomicBool::new(false))
}

/// Why a non-blocking connect ended early.
fn cancelled_error() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "cancelled while connecting")
}

/// Connects a non-blocking socket `fd` to `addr`, waiting in 100 ms slices so `cancel`
/// is noticed, for at most `timeout`; leaves the socket blocking on success.
fn connect_nonblocking(
    fd: &std::os::fd::OwnedFd,
    addr: &dyn nix::sys::socket::SockaddrLike,
    timeout: Duration,
    cancel: &std::sync::atomic::AtomicBool,
) -> io::Result<()> {
    use nix::errno::Errno;
    use std::os::fd::AsFd;
    let deadline = std::time::Instant::now() + timeout;
    let mut result = nix::sys::socket::connect(fd.as_raw_fd(), addr);
    // A unix socket whose listener's queue is full says EAGAIN instead of EINPROGRESS:
    // try again every 100 ms, noticing cancel and the deadline.
    while result == Err(Errno::EAGAIN) {
        if cancel.load(std::sync::atomic::Ordering::Acquire) {
            return Err(cancelled_error());
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection timed out",
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
        result = nix::sys::socket::connect(fd.as_raw_fd(), addr);
    }
    match result {
        Ok(()) => {}
        Err(Errno::EINPROGRESS) => loop {
            if cancel.load(std::sync::atomic::Ordering::Acquire) {
                return Err(cancelled_error());
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connection timed out",
                ));
            }
            let slice = (deadline - now).min(Duration::from_millis(100));
            let mut pfd = [nix::poll::PollFd::new(
                fd.as_fd(),
                nix::poll::PollFlags::POLLOUT,
            )];
            let ms = nix::poll::PollTimeout::try_from(slice.as_millis() as i32)
                .unwrap_or(nix::poll::PollTimeout::ZERO);
            match nix::poll::poll(&mut pfd, ms) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {
                    let err =
                        nix::sys::socket::getsockopt(fd, nix::sys::socket::sockopt::SocketError)
                            .map_err(io::Error::from)?;
                    if err != 0 {
                        return Err(io::Error::from_raw_os_error(err));
                    }
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        },
        Err(e) => return Err(e.into()),
    }
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
    flags.remove(nix::fcntl::OFlag::O_NONBLOCK);
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// Like [`connect`], but gives up as soon as `cancel` is set (migrate_cancel during setup).
pub fn connect_cancellable(
    uri: &MigrationUri,
    timeout: Duration,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<Channel, TransportError> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType, SockaddrStorage, UnixAddr};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let text = uri.to_string();
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    match uri {
        MigrationUri::Tcp { host, port } => {
            let addrs: Vec<_> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|source| TransportError::Connect {
                    uri: text.clone(),
                    source,
                })?
                .collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for a in addrs {
                let family = if a.is_ipv4() {
                    AddressFamily::Inet
                } else {
                    AddressFamily::Inet6
                };
                let attempt = socket(family, SockType::Stream, flags, None)
                    .map_err(io::Error::from)
                    .and_then(|fd| {
                        connect_nonblocking(&fd, &SockaddrStorage::from(a), timeout, cancel)?;
                        // SAFETY: `fd` is a connected TCP socket we own; ownership moves.
                        Ok(unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) })
                    });
                match attempt {
                    Ok(s) => {
                        tcp_dead_peer_detection(&s);
                        let _ = s.set_write_timeout(Some(io_timeout()));
                        return Ok(Channel::Tcp(s));
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        return Err(TransportError::Connect {
                            uri: text,
                            source: e,
                        })
                    }
                    Err(e) => last = e,
                }
            }
            Err(TransportError::Connect {
                uri: text,
                source: last,
            })
        }
        MigrationUri::Unix(path) => {
            let attempt = socket(AddressFamily::Unix, SockType::Stream, flags, None)
                .map_err(io::Error::from)
                .and_then(|fd| {
                    let addr = UnixAddr::new(path.as_path()).map_err(io::Error::from)?;
                    connect_nonblocking(&fd, &addr, timeout, cancel)?;
                    // SAFETY: `fd` is a connected unix socket we own; ownership moves.
                    Ok(unsafe { UnixStream::from_raw_fd(fd.into_raw_fd()) })
                });
            let s = attempt.map_err(|source| TransportError::Connect { uri: text, source })?;
            let _ = s.set_write_timeout(Some(io_timeout()));
            Ok(Channel::Unix(s))
        }
        MigrationUri::File { path, offset } => {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(*offset == 0)
                .open(path)
                .map_err(|source| TransportError::File {
                    path: path.clone(),
                    source,
                })?;
            if *offset > 0 {
                f.seek(SeekFrom::Start(*offset))
                    .and_then(|_| f.set_len(*offset))
                    .map_err(|source| TransportError::File {
                        path: path.clone(),
                        source,
                    })?;
            }
            Ok(Channel::File(f))
        }
    }
}

/// The incoming side before any connection.
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A unix-socket listener (the path is removed on drop).
    Unix(UnixListener, PathBuf),
    /// A file to read.
    File(PathBuf, u64),
}

impl Listener {
    /// Starts listening on `uri` (files are opened at accept time).
    pub fn bind(uri: &MigrationUri) -> Result<Listener, TransportError> {
        let text = uri.to_string();
        match uri {
            MigrationUri::Tcp { host, port } => {
                let l = TcpListener::bind((host.as_str(), *port))
                    .map_err(|source| TransportError::Listen { uri: text, source })?;
                Ok(Listener::Tcp(l))
            }
            MigrationUri::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path)
                    .map_err(|source| TransportError::Listen { uri: text, source })?;
                Ok(Listener::Unix(l, path.clone()))
            }
            MigrationUri::File { path, offset } => Ok(Listener::File(path.clone(), *offset)),
        }
    }

    /// The local port of a TCP listener (useful with port 0).
    pub fn local_port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            _ => None,
        }
    }

    /// Waits for the next connection (or opens the file).
    pub fn accept(&self) -> Result<Channel, TransportError> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().map_err(TransportError::Accept)?;
                tcp_dead_peer_detection(&s);
                let _ = s.set_write_timeout(Some(io_timeout()));
                Ok(Channel::Tcp(s))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().map_err(TransportError::Accept)?;
                let _ = s.set_write_timeout(Some(io_timeout()));
                Ok(Channel::Unix(s))
            }
            Listener::File(path, offset) => {
                let mut f = File::open(path).map_err(|source| TransportError::File {
                    path: path.clone(),
                    source,
                })?;
                f.seek(SeekFrom::Start(*offset))
                    .map_err(|source| TransportError::File {
                        path: path.clone(),
                        source,
                    })?;
                Ok(Channel::File(f))
            }
        }
    }

    /// Like [`Listener::accept`], but gives up after `timeout` (files open at once).
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Channel, TransportError> {
        let fd = match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::File(..) => return self.accept(),
        };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll on one live pollfd for a descriptor owned by self.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            return Err(TransportError::Accept(io::Error::last_os_error()));
        }
        if n == 0 {
            return Err(TransportError::Accept(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {timeout:?}"),
            )));
        }
        self.accept()
    }

    /// A handle that can wake a thread blocked in [`Listener::accept`] (by shutting the socket).
    pub fn waker(&self) -> Option<OwnedFd> {
        let fd = match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::File(..) => return None,
        };
        // SAFETY: dup of a valid descriptor owned by self; the duplicate is owned by the caller.
        let d = unsafe { libc::dup(fd) };
        if d < 0 {
            return None;
        }
        // SAFETY: `d` is a fresh descriptor nobody else owns.
        Some(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(d) })
    }
}

/// Wakes a thread blocked in accept() on the listener `waker` was taken from.
pub fn wake_accept(waker: &OwnedFd) {
    // SAFETY: shutdown on a valid socket descriptor; it makes a blocked accept() return.
    unsafe {
        libc::shutdown(waker.as_raw_fd(), libc::SHUT_RDWR);
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod connect_tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    /// A unix listener whose accept queue is full: connects to it block.
    fn full_listener(path: &std::path::Path) -> (std::os::fd::OwnedFd, Vec<UnixStream>) {
        use nix::sys::socket::{
            bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
        };
        let _ = std::fs::remove_file(path);
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        listen(&fd, Backlog::new(0).unwrap()).unwrap();
        // Fill the queue with non-blocking attempts until one would block.
        let mut filled = Vec::new();
        for _ in 0..4 {
            let s = nix::sys::socket::socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            if nix::sys::socket::connect(s.as_raw_fd(), &UnixAddr::new(path).unwrap()).is_err() {
                break;
            }
            // SAFETY: a socket we own.
            filled.push(unsafe {
                <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(
                    std::os::fd::IntoRawFd::into_raw_fd(s),
                )
            });
        }
        (fd, filled)
    }

    #[test]
    fn a_connect_that_would_hang_ends_on_cancel() {
        let path = std::env::temp_dir().join(format!("ferry-connect-{}.sock", std::process::id()));
        let (_l, _filled) = full_listener(&path);
        let cancel = Arc::new(AtomicBool::new(false));
        let c = cancel.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            c.store(true, Ordering::Release);
        });
        let t0 = Instant::now();
        let r = connect_cancellable(
            &MigrationUri::Unix(path.clone()),
            Duration::from_secs(30),
            &cancel,
        );
        t.join().unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(r.is_err(), "connect to a full listener cannot succeed");
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "cancel took {:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn connect_reaches_a_listener_and_refusal_is_an_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let never = AtomicBool::new(false);
        let uri = MigrationUri::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        assert!(connect_cancellable(&uri, Duration::from_secs(5), &never).is_ok());
        drop(l);
        assert!(connect_cancellable(&uri, Duration::from_secs(5), &never).is_err());
    }
}
