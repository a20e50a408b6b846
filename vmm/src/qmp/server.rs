//! The QMP server: a unix socket, three threads per client, no global lock.
//!
//! ```text
//!            accept thread (polls the listener, at most max_clients at once)
//!                 |
//!    per client:  reader --in-band queue (8)--> worker --+
//!                   |  exec-oob runs right here          |
//!                   +---------------> output queue <-----+--- EventBus::emit (try_send)
//!                                         |
//!                                      writer --> socket, one JSON object + "\r\n" per message
//! ```
//!
//! - The reader feeds bytes to the [`JsonStreamer`]; parse errors and
//!   in-band requests go to the worker in order, so responses keep the order
//!   of requests. Like QEMU with `oob` enabled, at most 8 in-band requests
//!   wait; then the reader stops reading until the worker catches up.
//! - The worker runs commands one at a time through the [`Session`]; a slow
//!   command only delays its own client.
//! - The writer owns all output of the client: greeting, responses, events.
//!   Its bounded queue is what keeps a stuck client from costing unbounded
//!   memory (see [`super::events`]); a write that does not progress for
//!   `write_timeout` drops the client.
//! - A client that sends garbage gets errors and keeps its session; one that
//!   vanishes mid-command has its response discarded; neither affects others.
//!   A client that half-closes still gets the responses to what it sent.
//!
//! Shutdown: [`ServerHandle::shutdown`] (callable from a command handler,
//! e.g. `quit`) stops accepting, removes the socket file and stops reading
//! from clients; queued output (the `quit` response) is still written, and
//! events emitted until `join` (a final `SHUTDOWN`) still reach negotiated
//! clients. [`QmpServer::join`] (or dropping the server) then stops event
//! delivery, lets writers flush for a short grace period, closes the
//! connections and waits for the client threads.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::socket::{send, MsgFlags};
use thiserror::Error;

use super::dispatch::Dispatcher;
use super::events::{EventBus, Outgoing, Subscription};
use super::framing::{JsonStreamer, Limits, Message};
use super::listener::{bind_private, remove_if_ours, SocketFile};
use super::request::is_oob;
use super::session::{Outcome, Session, SessionConfig};
use super::writer::to_qemu_line;

/// In-band requests waiting per client (QEMU's `QMP_REQ_QUEUE_LEN_MAX`).
const IN_BAND_QUEUE: usize = 8;
/// How often the accept loop looks at the stop flag.
const POLL_INTERVAL_MS: u16 = 100;
/// How long `join` lets clients flush their output before closing them.
const JOIN_GRACE: Duration = Duration::from_secs(2);
/// Threads per client: reader, worker, writer.
const THREADS_PER_CLIENT: usize = 3;

/// Server settings; `Default` is what `ferry run --qmp` uses.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Greeting contents and offered capabilities.
    pub session: SessionConfig,
    /// Most clients served at once; further connections wait in the listen backlog.
    pub max_clients: usize,
    /// Most messages (responses and events) waiting for a client's writer.
    pub output_queue_len: usize,
    /// A write blocked this long drops the client (`None`: wait forever).
    pub write_timeout: Option<Duration>,
    /// Per-message input limits (QEMU's by default).
    pub limits: Limits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            session: SessionConfig::default(),
            max_clients: 8,
            output_queue_len: 1024,
            write_timeout: Some(Duration::from_secs(30)),
            limits: Limits::default(),
        }
    }
}

/// Why the server could not start.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The socket could not be created at the path.
    #[error("cannot create QMP socket {path}: {source}")]
    Bind {
        /// The requested socket path.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
    /// The accept thread could not be started.
    #[error("cannot start the QMP server thread: {0}")]
    Spawn(#[source] io::Error),
}

struct Client {
    /// For shutting the connection down from outside its threads.
    stream: UnixStream,
    threads: Vec<JoinHandle<()>>,
    finished: Arc<AtomicUsize>,
}

impl Client {
    fn done(&self) -> bool {
        self.finished.load(Ordering::SeqCst) >= self.threads.len()
    }
}

/// Event subscriptions of clients whose session ended during shutdown.
#[derive(Default)]
struct Lingering {
    /// Set by `join`: from then on subscriptions are dropped, not kept.
    closing: bool,
    subscriptions: Vec<Subscription>,
}

struct Shared {
    path: PathBuf,
    socket_file: SocketFile,
    listener: UnixListener,
    stopping: AtomicBool,
    clients: Mutex<Vec<Client>>,
    changed: Condvar,
    lingering: Mutex<Lingering>,
    dispatcher: Arc<dyn Dispatcher>,
    events: EventBus,
    session: Arc<SessionConfig>,
    config: ServerConfig,
}

impl Shared {
    fn clients(&self) -> MutexGuard<'_, Vec<Client>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Ends a client's event subscription when its session ends; during a
    /// shutdown it is kept until `join`, so events emitted after `quit` (like
    /// QEMU's `SHUTDOWN`) still reach the client.
    fn retire(&self, subscription: Subscription) {
        if self.stopping() {
            let mut lingering = self.lingering.lock().unwrap_or_else(|e| e.into_inner());
            if !lingering.closing {
                lingering.subscriptions.push(subscription);
            }
        }
    }

    /// Stops event delivery to clients whose sessions ended, so their writers finish.
    fn close_lingering(&self) {
        let subscriptions = {
            let mut lingering = self.lingering.lock().unwrap_or_else(|e| e.into_inner());
            lingering.closing = true;
            std::mem::take(&mut lingering.subscriptions)
        };
        drop(subscriptions);
    }
}

/// A cloneable handle to stop the server from anywhere, including a command handler.
#[derive(Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("path", &self.shared.path)
            .field("stopping", &self.shared.stopping())
            .finish()
    }
}

impl ServerHandle {
    /// Stops accepting, removes the socket file and stops reading from clients; never blocks.
    pub fn shutdown(&self) {
        let shared = &self.shared;
        if shared.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        remove_if_ours(&shared.path, shared.socket_file);
        for client in shared.clients().iter() {
            let _ = client.stream.shutdown(Shutdown::Read);
        }
        shared.changed.notify_all();
    }

    /// Whether [`ServerHandle::shutdown`] was called.
    pub fn is_shut_down(&self) -> bool {
        self.shared.stopping()
    }

    /// Number of clients currently connected.
    pub fn clients(&self) -> usize {
        self.shared.clients().iter().filter(|c| !c.done()).count()
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }
}

/// A running QMP server; dropping it shuts it down and waits for its threads.
pub struct QmpServer {
    handle: ServerHandle,
    accept_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpServer")
            .field("handle", &self.handle)
            .finish()
    }
}

impl QmpServer {
    /// Creates the socket at `path` (mode 0600, replacing a stale one) and starts serving.
    pub fn start(
        path: impl AsRef<Path>,
        dispatcher: Arc<dyn Dispatcher>,
        events: EventBus,
        config: ServerConfig,
    ) -> Result<QmpServer, ServerError> {
        let path = path.as_ref().to_path_buf();
        let bind_err = |source| ServerError::Bind {
            path: path.clone(),
            source,
        };
        let (listener, socket_file) = bind_private(&path).map_err(bind_err)?;
        if let Err(e) = listener.set_nonblocking(true) {
            remove_if_ours(&path, socket_file);
            return Err(bind_err(e));
        }
        let shared = Arc::new(Shared {
            path: path.clone(),
            socket_file,
            listener,
            stopping: AtomicBool::new(false),
            clients: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            lingering: Mutex::new(Lingering::default()),
            dispatcher,
            events,
            session: Arc::new(config.session.clone()),
            config,
        });
        let accept_shared = shared.clone();
        let accept_thread = thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || accept_loop(accept_shared))
            .map_err(|e| {
                remove_if_ours(&path, socket_file);
                ServerError::Spawn(e)
            })?;
        Ok(QmpServer {
            handle: ServerHandle { shared },
            accept_thread: Some(accept_thread),
        })
    }

    /// A handle for stopping the server from other threads.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.handle.path()
    }

    /// Shuts down (if not yet) and waits for every server thread.
    ///
    /// Must not be called from a command handler (use [`ServerHandle::shutdown`] there).
    pub fn join(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.handle.shutdown();
        if let Some(accept) = self.accept_thread.take() {
            let _ = accept.join();
        }
        let shared = &self.handle.shared;
        shared.close_lingering();
        let deadline = Instant::now() + JOIN_GRACE;
        let mut clients = shared.clients();
        while clients.iter().any(|c| !c.done()) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            clients = shared
                .changed
                .wait_timeout(clients, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        for client in clients.iter() {
            let _ = client.stream.shutdown(Shutdown::Both);
        }
        let all = std::mem::take(&mut *clients);
        drop(clients);
        let me = thread::current().id();
        for client in all {
            for t in client.threads {
                if t.thread().id() != me {
                    let _ = t.join();
                }
            }
        }
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn accept_loop(shared: Arc<Shared>) {
    loop {
        let mut finished = Vec::new();
        {
            let mut clients = shared.clients();
            finished.extend(take_finished(&mut clients));
            while !shared.stopping() && active(&clients) >= shared.config.max_clients.max(1) {
                clients = shared
                    .changed
                    .wait_timeout(clients, Duration::from_millis(u64::from(POLL_INTERVAL_MS)))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                finished.extend(take_finished(&mut clients));
            }
        }
        // Joined without the lock: finishing threads take it on their way out.
        for client in finished {
            for t in client.threads {
                let _ = t.join();
            }
        }
        if shared.stopping() {
            return;
        }
        let mut fds = [PollFd::new(shared.listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, POLL_INTERVAL_MS) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => {
                thread::sleep(Duration::from_millis(u64::from(POLL_INTERVAL_MS)));
                continue;
            }
        }
        match shared.listener.accept() {
            Ok((stream, _)) => {
                if shared.stopping() {
                    return;
                }
                start_client(&shared, stream);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => {
                // Out of file descriptors or similar: back off instead of spinning.
                thread::sleep(Duration::from_millis(u64::from(POLL_INTERVAL_MS)));
            }
        }
    }
}

fn active(clients: &[Client]) -> usize {
    clients.iter().filter(|c| !c.done()).count()
}

/// Removes the clients whose threads have all finished, for joining.
fn take_finished(clients: &mut Vec<Client>) -> Vec<Client> {
    let (done, live): (Vec<Client>, Vec<Client>) =
        std::mem::take(clients).into_iter().partition(Client::done);
    *clients = live;
    done
}

/// Counts a client thread as finished when dropped (also on panic).
struct FinishGuard {
    finished: Arc<AtomicUsize>,
    shared: Arc<Shared>,
}

impl Drop for FinishGuard {
    fn drop(&mut self) {
        // Counted under the lock, so a waiter cannot miss the notification,
        // and whoever sees the count complete knows this thread holds no lock.
        {
            let _clients = self.shared.clients();
            self.finished.fetch_add(1, Ordering::SeqCst);
        }
        self.shared.changed.notify_all();
    }
}

fn start_client(shared: &Arc<Shared>, stream: UnixStream) {
    // Failures here just drop the connection; the server carries on.
    let _ = try_start_client(shared, stream);
}

fn try_start_client(shared: &Arc<Shared>, stream: UnixStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(shared.config.write_timeout)?;
    let session = Arc::new(Session::new(
        shared.dispatcher.clone(),
        shared.session.clone(),
    ));
    let (out_tx, out_rx) = bounded::<Outgoing>(shared.config.output_queue_len.max(1));
    let (in_tx, in_rx) = bounded::<Message>(IN_BAND_QUEUE);
    let greeting = Outgoing::Response(to_qemu_line(&session.greeting()));
    if out_tx.send(greeting).is_err() {
        return Ok(());
    }
    let closer = stream.try_clone()?;
    let subscription = shared.events.subscribe(
        out_tx.clone(),
        session.negotiated_flag(),
        Box::new(move || {
            let _ = closer.shutdown(Shutdown::Both);
        }),
    );
    let finished = Arc::new(AtomicUsize::new(0));
    let guard = || FinishGuard {
        finished: finished.clone(),
        shared: shared.clone(),
    };
    let mut threads = Vec::with_capacity(THREADS_PER_CLIENT);

    let (write_stream, g) = (stream.try_clone()?, guard());
    threads.push(
        thread::Builder::new()
            .name("qmp-writer".into())
            .spawn(move || {
                let _g = g;
                writer(write_stream, out_rx);
            })?,
    );

    let (worker_session, worker_out, worker_shared, g) =
        (session.clone(), out_tx.clone(), shared.clone(), guard());
    threads.push(
        thread::Builder::new()
            .name("qmp-worker".into())
            .spawn(move || {
                let _g = g;
                worker(&worker_session, in_rx, worker_out, &worker_shared);
                worker_shared.retire(subscription);
            })?,
    );

    let (read_stream, limits, g) = (stream.try_clone()?, shared.config.limits, guard());
    threads.push(
        thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || {
                let _g = g;
                reader(read_stream, &session, in_tx, out_tx, limits);
            })?,
    );

    let mut clients = shared.clients();
    if shared.stopping() {
        let _ = stream.shutdown(Shutdown::Read);
    }
    clients.push(Client {
        stream,
        threads,
        finished,
    });
    Ok(())
}

fn outgoing(outcome: Outcome) -> Outgoing {
    let line = to_qemu_line(&outcome.response);
    if outcome.negotiated {
        Outgoing::Negotiated(line)
    } else {
        Outgoing::Response(line)
    }
}

fn reader(
    mut stream: UnixStream,
    session: &Session,
    in_tx: Sender<Message>,
    out_tx: Sender<Outgoing>,
    limits: Limits,
) {
    let mut streamer = JsonStreamer::new(limits);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        for message in streamer.feed(&buf[..n]) {
            let sent = match message {
                // Out-of-band commands overtake the queue, as in QEMU.
                Ok(value) if is_oob(&value) => out_tx.send(outgoing(session.handle(value))).is_ok(),
                other => in_tx.send(other).is_ok(),
            };
            if !sent {
                return;
            }
        }
    }
}

fn worker(session: &Session, in_rx: Receiver<Message>, out_tx: Sender<Outgoing>, shared: &Shared) {
    for message in in_rx.iter() {
        if shared.stopping() {
            // Shutting down: requests still queued are dropped, as QEMU does.
            continue;
        }
        let out = match message {
            Ok(value) => outgoing(session.handle(value)),
            Err(err) => Outgoing::Response(to_qemu_line(&Session::parse_error_response(&err))),
        };
        if out_tx.send(out).is_err() {
            return;
        }
    }
}

fn writer(stream: UnixStream, out_rx: Receiver<Outgoing>) {
    let mut events_on = false;
    for item in out_rx.iter() {
        let line: &str = match &item {
            Outgoing::Response(line) => line,
            Outgoing::Negotiated(line) => {
                events_on = true;
                line
            }
            // Queued before this client's negotiation response: not for it.
            Outgoing::Event(_) if !events_on => continue,
            Outgoing::Event(line) => line,
        };
        if write_all(&stream, line.as_bytes()).is_err() {
            break;
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Writes all of `bytes` without raising SIGPIPE if the client is gone.
fn write_all(stream: &UnixStream, mut bytes: &[u8]) -> nix::Result<()> {
    while !bytes.is_empty() {
        match send(stream.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(0) => return Err(Errno::EPIPE),
            Ok(n) => bytes = &bytes[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
