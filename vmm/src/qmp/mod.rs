//! QMP: the QEMU Machine Protocol, server and client, as QEMU 8.1 speaks it.
//!
//! Tools that drive QEMU (the `qemu.qmp` Python library, libvirt-style
//! orchestrators) drive Ferry through the same wire protocol:
//!
//! ```text
//!   client connects to the unix socket (mode 0600)
//!   S: {"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 8}, "package": "ferry-0.1.0"}, "capabilities": ["oob"]}}
//!   C: {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}
//!   S: {"return": {}}
//!   C: {"execute": "migrate-set-capabilities", "arguments": {...}, "id": "a1"}
//!   S: {"return": {}, "id": "a1"}
//!   C: {"execute": "nope", "id": 2}
//!   S: {"id": 2, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}
//!   S: {"timestamp": {"seconds": 1700000000, "microseconds": 5}, "event": "STOP"}
//!   C: {"execute": "stop"  <garbage>
//!   S: {"error": {"class": "GenericError", "desc": "JSON parse error, stray '<'"}}
//! ```
//!
//! Every server message is one line ending in `"\r\n"`, written exactly as
//! QEMU writes it ([`writer`]). Input is a stream of JSON values in any
//! chunking, split and parsed like QEMU's monitor does ([`framing`],
//! [`lexer`], [`parser`]); requests are validated with QEMU's texts
//! ([`request`]); each connection is a [`session::Session`] that answers
//! the control commands and passes the rest to the VMM's
//! [`dispatch::Dispatcher`]; [`events::EventBus`] broadcasts events;
//! [`server::QmpServer`] serves a unix socket; [`client::QmpClient`] is the
//! blocking client behind `ferry qmp`.
//!
//! Wiring in the VMM:
//! ```no_run
//! use std::sync::Arc;
//! use vmm::qmp::{CommandTable, EventBus, QmpServer, ServerConfig};
//! let mut commands = CommandTable::new();
//! commands.register_no_args("stop", || Ok(serde_json::json!({})));
//! let events = EventBus::new();
//! let server = QmpServer::start("/run/ferry/qmp.sock", Arc::new(commands), events.clone(), ServerConfig::default())?;
//! events.emit("STOP", None);
//! server.join(); // or server.handle().shutdown() from a `quit` handler, then join
//! # Ok::<(), vmm::qmp::ServerError>(())
//! ```

pub mod client;
pub mod control;
pub mod dispatch;
pub mod error;
pub mod events;
pub mod framing;
pub mod lexer;
pub mod listener;
pub mod parser;
pub mod request;
pub mod server;
pub mod session;
pub mod writer;

pub use client::{ClientError, ClientOptions, QmpClient};
pub use control::Identity;
pub use dispatch::{no_arguments, CommandTable, Dispatcher};
pub use error::{ErrorClass, QmpError};
pub use events::{Event, EventBus, Timestamp};
pub use framing::{FramingError, JsonStreamer, Limits};
pub use request::{parse_request, Request};
pub use server::{QmpServer, ServerConfig, ServerError, ServerHandle};
pub use session::{Session, SessionConfig};
