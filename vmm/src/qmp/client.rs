//! A small blocking QMP client, for `ferry qmp` and for Ferry's own tests.
//!
//! [`QmpClient::connect`] reads the greeting and negotiates (without `oob`);
//! [`QmpClient::execute`] sends one command with a fresh `id` and waits for
//! its response, keeping events that arrive meanwhile for
//! [`QmpClient::take_events`] / [`QmpClient::wait_event`]. Every wait is
//! bounded by the client's timeout.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use thiserror::Error;

use super::error::QmpError;
use super::events::Event;
use super::framing::JsonStreamer;

/// How long a client waits by default for any one answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a client operation failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The socket could not be connected.
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("QMP connection failed: {0}")]
    Io(#[source] io::Error),
    /// No answer within the timeout.
    #[error("timed out after {0:?} waiting for the QMP server")]
    Timeout(Duration),
    /// The server closed the connection.
    #[error("the QMP server closed the connection")]
    Closed,
    /// The server sent something that is not QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// The command ran and failed; the server's error.
    #[error("{0}")]
    Command(QmpError),
}

impl ClientError {
    /// The server's error, when the command itself failed.
    pub fn qmp_error(&self) -> Option<&QmpError> {
        match self {
            ClientError::Command(err) => Some(err),
            _ => None,
        }
    }
}

/// Connection settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// Longest wait for any one answer.
    pub timeout: Duration,
    /// Whether to run `qmp_capabilities` after the greeting.
    pub negotiate: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: DEFAULT_TIMEOUT,
            negotiate: true,
        }
    }
}

/// A blocking QMP connection.
#[derive(Debug)]
pub struct QmpClient {
    stream: UnixStream,
    streamer: JsonStreamer,
    incoming: VecDeque<Value>,
    /// Responses that arrived while waiting for an event.
    held: VecDeque<Value>,
    events: VecDeque<Event>,
    greeting: Value,
    next_id: u64,
    timeout: Duration,
}

impl QmpClient {
    /// Connects to `path`, reads the greeting and negotiates capabilities.
    pub fn connect(path: impl AsRef<Path>) -> Result<QmpClient, ClientError> {
        QmpClient::connect_with(path, ClientOptions::default())
    }

    /// Connects with explicit options.
    pub fn connect_with(
        path: impl AsRef<Path>,
        options: ClientOptions,
    ) -> Result<QmpClient, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        stream
            .set_write_timeout(Some(options.timeout.max(Duration::from_millis(1))))
            .map_err(ClientError::Io)?;
        let mut client = QmpClient {
            stream,
            streamer: JsonStreamer::default(),
            incoming: VecDeque::new(),
            held: VecDeque::new(),
            events: VecDeque::new(),
            greeting: Value::Null,
            next_id: 1,
            timeout: options.timeout,
        };
        let greeting = client.next_message(Instant::now() + client.timeout)?;
        if !greeting.get("QMP").is_some_and(Value::is_object) {
            return Err(ClientError::Protocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        client.greeting = greeting;
        if options.negotiate {
            client.execute("qmp_capabilities", None)?;
        }
        Ok(client)
    }

    /// The server's greeting.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Changes the timeout for later operations.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
        let _ = self
            .stream
            .set_write_timeout(Some(timeout.max(Duration::from_millis(1))));
    }

    /// Runs `command` with optional `arguments`; the `"return"` value or the failure.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, ClientError> {
        let id = format!("ferry-{}", self.next_id);
        self.next_id += 1;
        let mut request = Map::new();
        request.insert("execute".into(), json!(command));
        if let Some(arguments) = arguments {
            request.insert("arguments".into(), arguments);
        }
        request.insert("id".into(), json!(id));
        self.send_raw(Value::Object(request).to_string().as_bytes())?;
        let response = self.wait_response(Some(&json!(id)))?;
        if let Some(ret) = response.get("return") {
            return Ok(ret.clone());
        }
        match response.get("error").and_then(QmpError::from_value) {
            Some(err) => Err(ClientError::Command(err)),
            None => Err(ClientError::Protocol(format!(
                "malformed response {response}"
            ))),
        }
    }

    /// Sends raw bytes as they are (for tests and for forwarding user input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                ClientError::Timeout(self.timeout)
            }
            _ => ClientError::Io(e),
        })
    }

    /// Waits for the next response (not event); with `id`, skips responses to other requests.
    pub fn wait_response(&mut self, id: Option<&Value>) -> Result<Value, ClientError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let message = match self.held.pop_front() {
                Some(message) => message,
                None => self.next_message(deadline)?,
            };
            if let Some(event) = Event::from_value(&message) {
                self.events.push_back(event);
                continue;
            }
            match (id, message.get("id")) {
                (None, _) => return Ok(message),
                (Some(want), Some(got)) if want == got => return Ok(message),
                (Some(_), None) => {
                    // QEMU answers unparsable input without an id.
                    let desc = message
                        .pointer("/error/desc")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    return Err(ClientError::Protocol(format!(
                        "server could not parse the request: {desc}"
                    )));
                }
                (Some(_), Some(_)) => continue,
            }
        }
    }

    /// Events received so far (oldest first), removing them.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Waits up to `timeout` for event `name`; earlier events stay queued.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Event, ClientError> {
        if let Some(pos) = self.events.iter().position(|e| e.event == name) {
            return self.events.remove(pos).ok_or(ClientError::Closed);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let message = self.next_message(deadline)?;
            match Event::from_value(&message) {
                Some(event) if event.event == name => return Ok(event),
                Some(event) => self.events.push_back(event),
                None => self.held.push_back(message),
            }
        }
    }

    /// The next message from the server, waiting until `deadline`.
    fn next_message(&mut self, deadline: Instant) -> Result<Value, ClientError> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            if let Some(message) = self.incoming.pop_front() {
                return Ok(message);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout(self.timeout));
            }
            // A zero timeout would mean "block forever".
            let wait = (deadline - now).max(Duration::from_millis(1));
            self.stream
                .set_read_timeout(Some(wait))
                .map_err(ClientError::Io)?;
            let n = match self.stream.read(&mut buf) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ClientError::Io(e)),
            };
            for message in self.streamer.feed(&buf[..n]) {
                match message {
                    Ok(value) => self.incoming.push_back(value),
                    Err(err) => return Err(ClientError::Protocol(err.to_string())),
                }
            }
        }
    }
}
