//! The incoming side of a migration: listen, check, load, confirm, start the guest.

pub mod loader;
mod local;
pub mod silence_watch;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::json;

use crate::error::{MigrationError, Result};
use crate::events::MigrationEvents;
use crate::info::{DestinationState, MigrationStatus, SocketAddress};
use crate::multifd::recv::{accept_channels, check_settings, LocalSettings};
use crate::multifd::{Method, MultifdReceiver};
use crate::options::{Capability, MigrationOptions};
use crate::postcopy::{DestControl, DestHooks, NoHooks, PostcopyDestStats};
use crate::stream::frame::FrameReader;
use crate::stream::header::{
    Header, FEATURE_COMPRESS, FEATURE_IGNORE_SHARED, FEATURE_POSTCOPY, FEATURE_SWITCHOVER_ACK,
};
use crate::stream::Reply;
use crate::transport::{Channel, Listener, MigrationUri};
use crate::vm::DestVm;
use loader::{check_header, load_stream_until, LoadEnd, LoadProgress, RamLoader};

/// Called once when the incoming migration ends: Ok when the guest runs here now.
pub type DoneCallback = Box<dyn FnOnce(std::result::Result<(), String>) + Send>;

/// State shared by the incoming thread, QMP and postcopy's threads.
pub(crate) struct DestShared {
    status: Mutex<(MigrationStatus, Option<String>)>,
    events: Arc<dyn MigrationEvents>,
    pub(crate) options: Arc<MigrationOptions>,
    address: Vec<SocketAddress>,
    pub(crate) postcopy: DestControl,
}

impl DestShared {
    /// Moves to `s`, emitting a MIGRATION event when the events capability is on.
    pub(crate) fn set_status(&self, s: MigrationStatus) {
        if let Ok(mut st) = self.status.lock() {
            st.0 = s;
        }
        if self.options.caps().get(Capability::Events) {
            self.events
                .emit("MIGRATION", json!({ "status": s.as_str() }));
        }
    }

    fn fail(&self, e: &MigrationError) {
        if let Ok(mut st) = self.status.lock() {
            st.1 = Some(e.to_string());
        }
        self.set_status(MigrationStatus::Failed);
    }
}

/// An incoming migration.
pub struct Incoming {
    shared: Arc<DestShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    port: Option<u16>,
}

/// How long the destination waits for every multifd channel to connect and say hello.
const MULTIFD_ACCEPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends SWITCHOVER_ACK after the first pass when the source asked for it; with multifd,
/// makes every pass end wait for the channels' SYNCs; hands the source's data ranges to
/// `vm` (none for a local migration, whose memory is the source's own).
struct AckAfterFirstPass<'a> {
    want: bool,
    sent: bool,
    ch: Option<&'a mut Channel>,
    multifd: Option<&'a mut MultifdReceiver>,
    vm: Option<&'a dyn DestVm>,
}

impl LoadProgress for AckAfterFirstPass<'_> {
    fn data_ranges(&mut self, ranges: &[crate::stream::ranges::PageRange]) -> Result<()> {
        if let Some(vm) = self.vm {
            vm.populate_ahead(ranges);
        }
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        match self.multifd.as_deref_mut() {
            Some(m) => m.finish(),
            None => Ok(()),
        }
    }

    fn pass_end(&mut self, pass: u64) -> Result<()> {
        if let Some(m) = self.multifd.as_deref_mut() {
            m.sync(pass)?;
        }
        if self.want && !self.sent {
            if let Some(ch) = self.ch.as_deref_mut() {
                Reply::SwitchoverAck.write_to(ch)?;
            }
            self.sent = true;
        }
        Ok(())
    }
}

fn socket_address(uri: &MigrationUri, port: Option<u16>) -> Vec<SocketAddress> {
    match uri {
        MigrationUri::Tcp { host, port: p } => vec![SocketAddress::Inet {
            host: host.clone(),
            port: port.unwrap_or(*p).to_string(),
        }],
        MigrationUri::Unix(path) => vec![SocketAddress::Unix {
            path: path.display().to_string(),
        }],
        MigrationUri::File { .. } => Vec::new(),
    }
}

impl Incoming {
    /// Starts listening on `uri`; the load runs on its own thread and ends with `done`.
    ///
    /// `fresh_ram` says the destination's memory is all zeros (nothing loaded into it yet).
    pub fn start(
        uri: &MigrationUri,
        vm: Arc<dyn DestVm>,
        options: Arc<MigrationOptions>,
        events: Arc<dyn MigrationEvents>,
        fresh_ram: bool,
        done: DoneCallback,
    ) -> Result<Arc<Incoming>> {
        Self::start_with_hooks(uri, vm, options, events, fresh_ram, done, Arc::new(NoHooks))
    }

    /// [`Incoming::start`] with the VMM's postcopy hooks (stopping helpers that touch guest
    /// memory, naming vCPU threads for blocktime).
    pub fn start_with_hooks(
        uri: &MigrationUri,
        vm: Arc<dyn DestVm>,
        options: Arc<MigrationOptions>,
        events: Arc<dyn MigrationEvents>,
        fresh_ram: bool,
        done: DoneCallback,
        hooks: Arc<dyn DestHooks>,
    ) -> Result<Arc<Incoming>> {
        let listener = Listener::bind(uri)?;
        let port = listener.local_port();
        let shared = Arc::new(DestShared {
            status: Mutex::new((MigrationStatus::None, None)),
            events,
            options,
            address: socket_address(uri, port),
            postcopy: DestControl::default(),
        });
        shared.set_status(MigrationStatus::Setup);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("migration-in".into())
            .spawn(move || {
                let result = receive(&s, &listener, vm.as_ref(), hooks.as_ref(), fresh_ram);
                drop(listener);
                match result {
                    Ok(()) => {
                        s.set_status(MigrationStatus::Completed);
                        done(Ok(()));
                    }
                    Err(e) => {
                        s.fail(&e);
                        done(Err(e.to_string()));
                    }
                }
            })
            .map_err(|e| MigrationError::Vm(format!("cannot start the incoming thread: {e}")))?;
        Ok(Arc::new(Incoming {
            shared,
            thread: Mutex::new(Some(thread)),
            port,
        }))
    }

    /// The TCP port listened on (useful with port 0).
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Current status.
    pub fn status(&self) -> MigrationStatus {
        self.shared
            .status
            .lock()
            .map(|s| s.0)
            .unwrap_or(MigrationStatus::Failed)
    }

    /// What query-migrate reports for the incoming side.
    pub fn state(&self) -> DestinationState {
        let (status, error) = self
            .shared
            .status
            .lock()
            .map(|s| s.clone())
            .unwrap_or((MigrationStatus::Failed, None));
        let blocktime = self
            .shared
            .options
            .caps()
            .get(Capability::PostcopyBlocktime)
            .then(|| self.shared.postcopy.tracker())
            .flatten()
            .and_then(|t| t.blocktime());
        DestinationState {
            status,
            socket_address: self.shared.address.clone(),
            postcopy_blocktime: blocktime.as_ref().map(|b| b.total_ms),
            postcopy_vcpu_blocktime: blocktime.map(|b| b.per_vcpu_ms),
            error_desc: error,
        }
    }

    /// Postcopy figures of this incoming migration (once it switched to postcopy).
    pub fn postcopy_stats(&self) -> Option<PostcopyDestStats> {
        self.shared.postcopy.tracker().map(|t| t.stats())
    }

    /// `migrate-recover`: listen on `uri` for the source's recovery connection.
    pub fn recover(&self, uri: &MigrationUri) -> std::result::Result<(), String> {
        if self.status() != MigrationStatus::PostcopyPaused {
            return Err("Migrate recover can only be run when postcopy is paused.".into());
        }
        let listener = Listener::bind(uri).map_err(|e| e.to_string())?;
        if let Some(port) = listener.local_port() {
            eprintln!("ferry: waiting for the source to resume postcopy on port {port}");
        }
        self.shared.postcopy.recover(listener);
        Ok(())
    }

    /// The process is exiting: if postcopy is under way (the guest is lost anyway), lets
    /// every thread blocked on a missing page go (see [`DestControl::abandon`]).
    pub fn abandon_postcopy(&self) {
        if self.shared.postcopy.abandon() {
            eprintln!(
                "ferry: exiting during postcopy: {}",
                crate::postcopy::GUEST_LOST
            );
        }
    }

    /// `migrate-pause` on the destination: breaks the connections of a postcopy migration.
    pub fn pause(&self) -> std::result::Result<(), String> {
        if self.status() != MigrationStatus::PostcopyActive || !self.shared.postcopy.pause() {
            return Err(
                "migrate-pause is currently only supported during postcopy-active state".into(),
            );
        }
        Ok(())
    }

    /// Waits for the incoming thread to end.
    pub fn join(&self) {
        let t = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

fn receive(
    shared: &DestShared,
    listener: &Listener,
    vm: &dyn DestVm,
    hooks: &dyn DestHooks,
    fresh_ram: bool,
) -> Result<()> {
    let options = shared.options.clone();
    let security = crate::transport::tls::Security::destination(&options.params())
        .map_err(crate::transport::TransportError::from)?;
    let ch = security
        .secure(listener.accept()?)
        .map_err(crate::transport::TransportError::from)?;
    shared.set_status(MigrationStatus::Active);
    let mut reply_ch =
        if ch.is_bidirectional() {
            Some(ch.try_clone().map_err(|e| {
                MigrationError::Vm(format!("cannot clone the migration socket: {e}"))
            })?)
        } else {
            None
        };
    let result = load(
        ch,
        Env {
            shared,
            listener,
            security: &security,
            hooks,
        },
        reply_ch.as_mut(),
        vm,
        fresh_ram,
    );
    if let (Err(e), Some(rc)) = (&result, reply_ch.as_mut()) {
        // Tell the source why, so its error says more than "connection reset".
        let _ = Reply::Failed(e.to_string()).write_to(rc);
        rc.shutdown();
    }
    result
}

/// What a load works with beside the stream.
struct Env<'a> {
    shared: &'a DestShared,
    listener: &'a Listener,
    security: &'a crate::transport::tls::Security,
    hooks: &'a dyn DestHooks,
}

fn load(
    ch: Channel,
    env: Env<'_>,
    mut reply_ch: Option<&mut Channel>,
    vm: &dyn DestVm,
    fresh_ram: bool,
) -> Result<()> {
    let (options, listener, security) = (&*env.shared.options, env.listener, env.security);
    // A silent source fails the load after the io timeout (at least three keepalive
    // intervals); a postcopy load takes the plain channel back.
    let silence = crate::transport::io_timeout().max(3 * crate::source::KEEPALIVE_INTERVAL);
    let write_timeout = Some(crate::transport::io_timeout());
    let mut reader = FrameReader::new(
        silence_watch::SilenceWatch::new(ch, silence, write_timeout)
            .map_err(|e| MigrationError::Vm(format!("cannot set the socket timeouts: {e}")))?,
    );
    let header = Header::read_from(reader.get_mut())?;
    check_header(&header, vm)?;
    if header.has(FEATURE_POSTCOPY) {
        // Refuse early what could not switch later.
        if let Some(why) =
            crate::postcopy::registration::unsupported_backing(vm.ram().backing_kind())
        {
            return Err(crate::postcopy::PostcopyError::Unsupported(why).into());
        }
    }
    if header.has(FEATURE_IGNORE_SHARED) {
        return local::load(reader, options, reply_ch, vm);
    }
    let (caps, params) = options.snapshot();
    let method = Method::from(params.multifd_compression);
    check_settings(
        &header,
        &LocalSettings {
            enabled: caps.get(Capability::Multifd),
            channels: params.multifd_channels,
            method,
        },
    )?;
    let ram = vm.ram();
    let mut loader = RamLoader::new(&ram, fresh_ram);
    if header.has(FEATURE_COMPRESS) {
        let pool = crate::compress::DecompressPool::start(
            ram.clone(),
            loader.book(),
            params.decompress_threads,
            vm.decompress_error_check(),
        )?;
        loader = loader.with_decompress(pool);
    }
    let mut multifd = if header.multifd_channels > 0 {
        let channels = accept_channels(listener, &header, MULTIFD_ACCEPT_TIMEOUT, security)?;
        let main = reader.get_mut().get_ref().try_clone().ok();
        Some(
            MultifdReceiver::start(channels, method, ram.clone(), loader.book(), main)?
                .with_silence_limit(silence),
        )
    } else {
        None
    };
    if let Some(m) = &multifd {
        reader.get_mut().watch_also(m.progress());
    }
    let mut progress = AckAfterFirstPass {
        want: header.has(FEATURE_SWITCHOVER_ACK),
        sent: false,
        ch: reply_ch.as_deref_mut(),
        multifd: multifd.as_mut(),
        vm: Some(vm),
    };
    let loaded = load_stream_until(&mut reader, &mut loader, &mut progress);
    let end = match (loaded, multifd.as_ref().and_then(|m| m.error())) {
        // A failing channel stops the main stream; its error is the real cause.
        (Err(_), Some(e)) => return Err(e),
        (r, _) => r?,
    };
    drop(multifd);
    match end {
        LoadEnd::Complete(state) => finish(&mut reader, &state, reply_ch, vm),
        LoadEnd::Postcopy {
            state,
            discard,
            listen,
        } => {
            let reply = reply_ch
                .ok_or_else(|| {
                    MigrationError::Config("postcopy needs a return path to the source".into())
                })?
                .try_clone()
                .map_err(|e| {
                    MigrationError::Vm(format!("cannot clone the migration socket: {e}"))
                })?;
            let suspect = loader.book().suspect_ranges();
            crate::postcopy::incoming::run(
                &crate::postcopy::incoming::Ctx {
                    shared: env.shared,
                    listener,
                    security,
                    vm,
                    hooks: env.hooks,
                },
                reader.map_source(silence_watch::SilenceWatch::into_inner),
                reply,
                crate::postcopy::incoming::Switch {
                    state,
                    discard,
                    listen,
                    suspect,
                },
            )
        }
    }
}

/// Loads the state, confirms (LOADED), waits for the source's COMMIT and starts the guest.
fn finish<R: crate::stream::frame::StreamSource>(
    reader: &mut FrameReader<R>,
    state: &[u8],
    reply_ch: Option<&mut Channel>,
    vm: &dyn DestVm,
) -> Result<()> {
    vm.load_state(state).map_err(MigrationError::Vm)?;
    if let Some(rc) = reply_ch {
        Reply::Loaded.write_to(rc)?;
        match Reply::read_from(reader.get_mut())? {
            Reply::Commit => {}
            other => {
                return Err(MigrationError::DestinationLost(format!(
                    "expected COMMIT from the source, got {other:?}"
                )))
            }
        }
    }
    vm.start().map_err(MigrationError::Vm)?;
    Ok(())
}
