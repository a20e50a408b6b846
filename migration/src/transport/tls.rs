//! TLS for migration channels, QEMU's way: `tls-creds-x509` objects (a directory holding
//! `ca-cert.pem`, `server-cert.pem`/`server-key.pem` or `client-cert.pem`/`client-key.pem`),
//! `tls-hostname` to override the name checked against the server's certificate, and
//! `tls-authz` naming an authorization object (allowed client distinguished names).
//!
//! Built on rustls. A [`TlsStream`] is shared by the threads of one connection (the sender
//! and the return-path reader): the rustls state sits behind a mutex over a non-blocking
//! socket, and a thread waiting for the network waits in poll(2) without the lock.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, Connection, RootCertStore, ServerConfig};
use thiserror::Error;

/// Why TLS could not be set up or a handshake failed (QEMU's words where it has them).
#[derive(Debug, Error)]
pub enum TlsError {
    /// A credentials file is missing or unreadable.
    #[error("Unable to access credentials {path}: {why}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// The files do not make a usable configuration.
    #[error("TLS credentials '{id}': {why}")]
    Config {
        /// Object id.
        id: String,
        /// What is wrong.
        why: String,
    },
    /// No object with that id.
    #[error("No TLS credentials with id '{0}'")]
    NoCreds(String),
    /// No authorization object with that id.
    #[error("Cannot find TLS authorization object '{0}'")]
    NoAuthz(String),
    /// The credentials are for the other end.
    #[error("Expecting TLS credentials with a {expected} endpoint")]
    WrongEndpoint {
        /// "client" or "server".
        expected: &'static str,
    },
    /// The handshake failed.
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    /// The peer's certificate does not name the host we wanted.
    #[error("Certificate does not match the hostname {0}")]
    Hostname(String),
    /// The client is not on the authorization list.
    #[error("TLS x509 authz check for {0} is denied")]
    Denied(String),
    /// Socket trouble during the handshake.
    #[error("TLS handshake failed: {0}")]
    Io(#[from] io::Error),
}

/// Which end credentials are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The incoming side.
    Server,
    /// The outgoing side.
    Client,
}

/// A loaded `tls-creds-x509` object.
#[derive(Debug)]
pub struct TlsCreds {
    /// Object id (what `tls-creds` names).
    pub id: String,
    /// Which end.
    pub endpoint: Endpoint,
    /// Whether the peer must present a verified certificate (server side: the client's).
    pub verify_peer: bool,
    client: Option<Arc<ClientConfig>>,
    server: Option<Arc<ServerConfig>>,
}

fn file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::File {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?
        .collect();
    let certs = certs.map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            path: path.to_path_buf(),
            why: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsCreds {
    /// Loads the credentials in `dir` for `endpoint` (QEMU's tls-creds-x509 file names).
    pub fn load(
        id: &str,
        dir: &Path,
        endpoint: Endpoint,
        verify_peer: bool,
    ) -> Result<Self, TlsError> {
        let cfg_err = |why: String| TlsError::Config {
            id: id.to_string(),
            why,
        };
        let ca_path = file(dir, "ca-cert.pem");
        let mut roots = RootCertStore::empty();
        let ca_present = ca_path.exists();
        if ca_present || verify_peer {
            for c in load_certs(&ca_path)? {
                roots
                    .add(c)
                    .map_err(|e| cfg_err(format!("bad CA certificate: {e}")))?;
            }
        }
        match endpoint {
            Endpoint::Client => {
                let builder = ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| cfg_err(e.to_string()))?
                    .with_root_certificates(roots);
                let cert = file(dir, "client-cert.pem");
                let config = if cert.exists() {
                    builder
                        .with_client_auth_cert(
                            load_certs(&cert)?,
                            load_key(&file(dir, "client-key.pem"))?,
                        )
                        .map_err(|e| cfg_err(format!("client certificate and key: {e}")))?
                } else {
                    builder.with_no_client_auth()
                };
                Ok(TlsCreds {
                    id: id.to_string(),
                    endpoint,
                    verify_peer,
                    client: Some(Arc::new(config)),
                    server: None,
                })
            }
            Endpoint::Server => {
                let builder = ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| cfg_err(e.to_string()))?;
                let builder = if verify_peer {
                    let v =
                        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                            .build()
                            .map_err(|e| cfg_err(format!("client verifier: {e}")))?;
                    builder.with_client_cert_verifier(v)
                } else {
                    builder.with_no_client_auth()
                };
                let config = builder
                    .with_single_cert(
                        load_certs(&file(dir, "server-cert.pem"))?,
                        load_key(&file(dir, "server-key.pem"))?,
                    )
                    .map_err(|e| cfg_err(format!("server certificate and key: {e}")))?;
                Ok(TlsCreds {
                    id: id.to_string(),
                    endpoint,
                    verify_peer,
                    client: None,
                    server: Some(Arc::new(config)),
                })
            }
        }
    }
}

/// One rule of an authorization list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzRule {
    /// The distinguished name (or glob pattern) to match.
    pub pattern: String,
    /// Allow (true) or deny (false) on a match.
    pub allow: bool,
    /// `*` and `?` are wildcards (QEMU's format=glob).
    pub glob: bool,
}

/// An authorization object: QEMU's `authz-simple` (one identity) or `authz-list` (rules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authz {
    /// Object id (what `tls-authz` names).
    pub id: String,
    /// Rules, first match wins.
    pub rules: Vec<AuthzRule>,
    /// What happens when no rule matches.
    pub default_allow: bool,
}

fn normalize_dn(dn: &str) -> Vec<String> {
    let mut parts: Vec<String> = dn
        .split(',')
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    parts.sort();
    parts
}

/// fnmatch-style `*` and `?` matching in O(pattern x text) steps at worst: on a mismatch it
/// only moves the last `*` on by one byte (a recursive matcher takes exponential time on a
/// pattern with several `*` against a long client name).
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it now stands for up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    star = Some((sp, st + 1));
                    p = sp + 1;
                    t = st + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

impl Authz {
    /// `authz-simple`: exactly one identity allowed.
    pub fn simple(id: &str, identity: &str) -> Self {
        Authz {
            id: id.to_string(),
            rules: vec![AuthzRule {
                pattern: identity.to_string(),
                allow: true,
                glob: false,
            }],
            default_allow: false,
        }
    }

    /// Whether the client with distinguished name `dn` may migrate in.
    pub fn is_allowed(&self, dn: &str) -> bool {
        for r in &self.rules {
            let hit = if r.glob {
                glob_match(r.pattern.as_bytes(), dn.as_bytes())
            } else {
                normalize_dn(&r.pattern) == normalize_dn(dn)
            };
            if hit {
                return r.allow;
            }
        }
        self.default_allow
    }
}

#[derive(Default)]
struct Registry {
    creds: HashMap<String, Arc<TlsCreds>>,
    authz: HashMap<String, Arc<Authz>>,
}

static REGISTRY: RwLock<Option<Registry>> = RwLock::new(None);

/// Makes `creds` available under its id (QEMU's `-object tls-creds-x509,id=...`).
pub fn register_creds(creds: TlsCreds) {
    let mut r = REGISTRY.write().unwrap_or_else(|p| p.into_inner());
    r.get_or_insert_with(Registry::default)
        .creds
        .insert(creds.id.clone(), Arc::new(creds));
}

/// Makes `authz` available under its id.
pub fn register_authz(authz: Authz) {
    let mut r = REGISTRY.write().unwrap_or_else(|p| p.into_inner());
    r.get_or_insert_with(Registry::default)
        .authz
        .insert(authz.id.clone(), Arc::new(authz));
}

/// The credentials object `id`.
pub fn lookup_creds(id: &str) -> Result<Arc<TlsCreds>, TlsError> {
    let r = REGISTRY.read().unwrap_or_else(|p| p.into_inner());
    r.as_ref()
        .and_then(|r| r.creds.get(id).cloned())
        .ok_or_else(|| TlsError::NoCreds(id.to_string()))
}

/// The authorization object `id`.
pub fn lookup_authz(id: &str) -> Result<Arc<Authz>, TlsError> {
    let r = REGISTRY.read().unwrap_or_else(|p| p.into_inner());
    r.as_ref()
        .and_then(|r| r.authz.get(id).cloned())
        .ok_or_else(|| TlsError::NoAuthz(id.to_string()))
}

/// The socket under a TLS stream.
#[derive(Debug)]
pub enum Socket {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain.
    Unix(UnixStream),
}

impl Socket {
    fn fd(&self) -> RawFd {
        match self {
            Socket::Tcp(s) => s.as_raw_fd(),
            Socket::Unix(s) => s.as_raw_fd(),
        }
    }
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_nonblocking(on),
            Socket::Unix(s) => s.set_nonblocking(on),
        }
    }
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Socket::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
    fn shutdown_how(&self, how: std::net::Shutdown) {
        match self {
            Socket::Tcp(s) => {
                let _ = s.shutdown(how);
            }
            Socket::Unix(s) => {
                let _ = s.shutdown(how);
            }
        }
    }
}

impl Read for &Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => (&*s).read(buf),
            Socket::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => (&*s).write(buf),
            Socket::Unix(s) => (&*s).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Shared {
    conn: Mutex<Connection>,
    sock: Socket,
    timeouts: Mutex<(Option<Duration>, Option<Duration>)>,
    /// The peer's distinguished name (subject of its certificate), if it sent one.
    peer_dn: Option<String>,
}

/// A TLS connection usable from several threads at once (a writer and a reader).
#[derive(Clone)]
pub struct TlsStream(Arc<Shared>);

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("peer_dn", &self.0.peer_dn)
            .finish_non_exhaustive()
    }
}

fn wait(fd: RawFd, events: i16, timeout: Option<Duration>) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: poll on one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return Ok(());
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS channel timed out",
            ));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl TlsStream {
    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.0.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The peer's certificate subject, when it presented one.
    pub fn peer_dn(&self) -> Option<&str> {
        self.0.peer_dn.as_deref()
    }

    /// Read and write timeouts (None = wait forever).
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) {
        *self.0.timeouts.lock().unwrap_or_else(|p| p.into_inner()) = (read, write);
    }

    fn timeouts(&self) -> (Option<Duration>, Option<Duration>) {
        *self.0.timeouts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the socket both ways, waking any thread waiting on it.
    pub fn shutdown(&self) {
        self.0.sock.shutdown_how(std::net::Shutdown::Both);
    }

    /// Closes the reading direction, waking a thread blocked reading.
    pub fn shutdown_read(&self) {
        self.0.sock.shutdown_how(std::net::Shutdown::Read);
    }

    /// The socket's descriptor (for poll; never read or write it directly).
    pub fn raw_fd(&self) -> RawFd {
        self.0.sock.fd()
    }

    /// Sends what rustls has buffered; waits (without the lock) while the socket is full.
    fn push<'a>(
        &'a self,
        mut conn: MutexGuard<'a, Connection>,
        deadline: Option<Instant>,
    ) -> io::Result<()> {
        while conn.wants_write() {
            match conn.write_tls(&mut &self.0.sock) {
                Ok(_) => {}
                Err(e) if is_would_block(&e) => {
                    drop(conn);
                    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                    if left == Some(Duration::ZERO) {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "TLS write timed out",
                        ));
                    }
                    wait(self.0.sock.fd(), libc::POLLOUT, left)?;
                    conn = self.lock();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = self.timeouts().0.map(|t| Instant::now() + t);
        loop {
            let mut conn = self.lock();
            match conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if is_would_block(&e) => {}
                Err(e) => return Err(e),
            }
            match conn.read_tls(&mut &self.0.sock) {
                Ok(0) => {
                    // End of the socket (the peer closed it, or we shut our reading side
                    // down): end of stream, as with a plain socket. Ferry's framing and
                    // checksums detect a stream cut short.
                    return Ok(0);
                }
                Ok(_) => {
                    conn.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    // Alerts or key updates may need an answer.
                    self.push(conn, deadline)?;
                }
                Err(e) if is_would_block(&e) => {
                    drop(conn);
                    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                    if left == Some(Duration::ZERO) {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "TLS read timed out",
                        ));
                    }
                    wait(self.0.sock.fd(), libc::POLLIN, left)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let deadline = self.timeouts().1.map(|t| Instant::now() + t);
        let mut conn = self.lock();
        let n = conn.writer().write(buf)?;
        // Keep rustls' buffer bounded: push out what it holds before taking more.
        self.push(conn, deadline)?;
        if n == 0 && !buf.is_empty() {
            conn = self.lock();
            let n = conn.writer().write(buf)?;
            self.push(conn, deadline)?;
            return Ok(n);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        let deadline = self.timeouts().1.map(|t| Instant::now() + t);
        let conn = self.lock();
        self.push(conn, deadline)
    }
}

fn describe(e: &rustls::Error, hostname: &str) -> TlsError {
    match e {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => TlsError::Hostname(hostname.to_string()),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => TlsError::Handshake(
            "the certificate issuer is unknown (not signed by ca-cert.pem)".into(),
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => TlsError::Handshake("the peer's certificate has expired".into()),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => TlsError::Handshake("the peer's certificate is not valid yet".into()),
        rustls::Error::NoCertificatesPresented => {
            TlsError::Handshake("the peer presented no certificate (verify-peer is on)".into())
        }
        other => TlsError::Handshake(other.to_string()),
    }
}

fn subject_dn(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let parts: Vec<String> = c
        .subject()
        .iter_rdn()
        .flat_map(|rdn| rdn.iter())
        .filter_map(|atv| {
            let key = x509_parser::objects::oid2abbrev(
                atv.attr_type(),
                x509_parser::objects::oid_registry(),
            )
            .ok()?
            .to_string();
            let val = atv.as_str().ok()?.to_string();
            Some(format!("{key}={val}"))
        })
        .collect();
    Some(parts.join(","))
}

fn handshake(
    mut conn: Connection,
    sock: Socket,
    hostname: &str,
    timeout: Duration,
) -> Result<TlsStream, TlsError> {
    sock.set_nonblocking(false)?;
    sock.set_timeouts(Some(timeout))?;
    while conn.is_handshaking() {
        let mut s = &sock;
        if let Err(e) = conn.complete_io(&mut s) {
            // rustls reports certificate problems as InvalidData wrapping its error.
            if let Some(r) = e.get_ref().and_then(|x| x.downcast_ref::<rustls::Error>()) {
                return Err(describe(r, hostname));
            }
            return Err(TlsError::Io(e));
        }
    }
    let peer_dn = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(subject_dn);
    sock.set_timeouts(None)?;
    sock.set_nonblocking(true)?;
    Ok(TlsStream(Arc::new(Shared {
        conn: Mutex::new(conn),
        sock,
        timeouts: Mutex::new((None, None)),
        peer_dn,
    })))
}

/// The outgoing side: a TLS client over `sock`, checking the server's certificate names
/// `hostname`.
pub fn client(
    sock: Socket,
    creds: &TlsCreds,
    hostname: &str,
    timeout: Duration,
) -> Result<TlsStream, TlsError> {
    let config = creds
        .client
        .clone()
        .ok_or(TlsError::WrongEndpoint { expected: "client" })?;
    let name = ServerName::try_from(hostname.to_string())
        .map_err(|_| TlsError::Handshake(format!("'{hostname}' is not a valid TLS host name")))?;
    let conn = rustls::ClientConnection::new(config, name)
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
    handshake(Connection::Client(conn), sock, hostname, timeout)
}

/// The incoming side: a TLS server over `sock`, checking the client against `authz`.
pub fn server(
    sock: Socket,
    creds: &TlsCreds,
    authz: Option<&Authz>,
    timeout: Duration,
) -> Result<TlsStream, TlsError> {
    let config = creds
        .server
        .clone()
        .ok_or(TlsError::WrongEndpoint { expected: "server" })?;
    let conn =
        rustls::ServerConnection::new(config).map_err(|e| TlsError::Handshake(e.to_string()))?;
    let stream = handshake(Connection::Server(conn), sock, "", timeout)?;
    if let Some(authz) = authz {
        let dn = stream.peer_dn().unwrap_or("").to_string();
        if dn.is_empty() || !authz.is_allowed(&dn) {
            stream.shutdown();
            return Err(TlsError::Denied(if dn.is_empty() {
                "an anonymous client".into()
            } else {
                dn
            }));
        }
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authz_matches_dns_in_any_order_and_globs() {
        let a = Authz::simple("a", "CN=laptop.example.com,O=Example Org");
        assert!(a.is_allowed("O=Example Org,CN=laptop.example.com"));
        assert!(!a.is_allowed("CN=other.example.com,O=Example Org"));
        let l = Authz {
            id: "l".into(),
            rules: vec![
                AuthzRule {
                    pattern: "CN=bad.example.com*".into(),
                    allow: false,
                    glob: true,
                },
                AuthzRule {
                    pattern: "CN=*.example.com*".into(),
                    allow: true,
                    glob: true,
                },
            ],
            default_allow: false,
        };
        assert!(l.is_allowed("CN=good.example.com,O=x"));
        assert!(!l.is_allowed("CN=bad.example.com,O=x"));
        assert!(!l.is_allowed("CN=elsewhere.org"));
    }

    #[test]
    fn glob_matches_like_fnmatch_and_in_bounded_time() {
        for (pattern, text, want) in [
            ("", "", true),
            ("*", "", true),
            ("*", "anything", true),
            ("a*c", "abbbc", true),
            ("a*c", "abbbd", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*b*b*", "abcb", true),
            ("*b*b*", "abc", false),
            ("CN=*.example.com*", "CN=good.example.com,O=x", true),
            ("ab", "abc", false),
            ("abc*", "ab", false),
        ] {
            assert_eq!(
                glob_match(pattern.as_bytes(), text.as_bytes()),
                want,
                "{pattern:?} vs {text:?}"
            );
        }
        // The recursive matcher this replaced never finished this one (exponential in the
        // number of `*`); this one takes at most pattern x text steps.
        let pattern = format!("{}b", "*a".repeat(20));
        assert!(!glob_match(pattern.as_bytes(), "a".repeat(200).as_bytes()));
    }

    #[test]
    fn missing_files_and_unknown_ids_are_clear_errors() {
        let e = TlsCreds::load("t", Path::new("/nonexistent"), Endpoint::Server, true).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca-cert.pem"), "{e}");
        assert_eq!(
            lookup_creds("no-such").unwrap_err().to_string(),
            "No TLS credentials with id 'no-such'"
        );
    }
}

/// How one migration secures its connections, from `tls-creds`, `tls-hostname` and
/// `tls-authz` (QEMU's parameters).
#[derive(Clone, Default)]
pub enum Security {
    /// No TLS (`tls-creds` empty).
    #[default]
    Plain,
    /// The outgoing side.
    Client {
        /// Credentials (client endpoint).
        creds: Arc<TlsCreds>,
        /// Name the server's certificate must carry.
        hostname: String,
    },
    /// The incoming side.
    Server {
        /// Credentials (server endpoint).
        creds: Arc<TlsCreds>,
        /// Who may connect (`tls-authz`), if restricted.
        authz: Option<Arc<Authz>>,
    },
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Security::Plain => f.write_str("Plain"),
            Security::Client { creds, hostname } => write!(f, "Client({}, {hostname})", creds.id),
            Security::Server { creds, authz } => write!(
                f,
                "Server({}, authz {:?})",
                creds.id,
                authz.as_ref().map(|a| a.id.as_str())
            ),
        }
    }
}

impl Security {
    /// The outgoing side's security for a migration to `uri`.
    pub fn source(
        params: &crate::options::Parameters,
        uri: &super::MigrationUri,
    ) -> Result<Security, TlsError> {
        if params.tls_creds.is_empty() {
            return Ok(Security::Plain);
        }
        let creds = lookup_creds(&params.tls_creds)?;
        if creds.endpoint != Endpoint::Client {
            return Err(TlsError::WrongEndpoint { expected: "client" });
        }
        let hostname = if !params.tls_hostname.is_empty() {
            params.tls_hostname.clone()
        } else {
            match uri {
                super::MigrationUri::Tcp { host, .. } => host.clone(),
                super::MigrationUri::Unix(_) => {
                    return Err(TlsError::Handshake(
                        "No hostname available for TLS: set tls-hostname for a unix: migration"
                            .into(),
                    ))
                }
                super::MigrationUri::File { .. } => {
                    return Err(TlsError::Handshake(
                        "TLS is not available for file: migrations".into(),
                    ))
                }
            }
        };
        Ok(Security::Client { creds, hostname })
    }

    /// The incoming side's security.
    pub fn destination(params: &crate::options::Parameters) -> Result<Security, TlsError> {
        if params.tls_creds.is_empty() {
            return Ok(Security::Plain);
        }
        let creds = lookup_creds(&params.tls_creds)?;
        if creds.endpoint != Endpoint::Server {
            return Err(TlsError::WrongEndpoint { expected: "server" });
        }
        let authz = if params.tls_authz.is_empty() {
            None
        } else {
            Some(lookup_authz(&params.tls_authz)?)
        };
        Ok(Security::Server { creds, authz })
    }

    /// Whether TLS is in use.
    pub fn is_tls(&self) -> bool {
        !matches!(self, Security::Plain)
    }

    /// Secures a freshly connected or accepted channel (a no-op without TLS).
    pub fn secure(&self, ch: super::Channel) -> Result<super::Channel, TlsError> {
        match self {
            Security::Plain => Ok(ch),
            Security::Client { creds, hostname } => ch.into_tls_client(creds, hostname),
            Security::Server { creds, authz } => ch.into_tls_server(creds, authz.as_deref()),
        }
    }
}
