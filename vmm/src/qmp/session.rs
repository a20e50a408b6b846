//! One client's QMP session: greeting, capabilities negotiation, commands.
//!
//! ```text
//!   server: {"QMP": {"version": {...}, "capabilities": ["oob"]}}      greeting
//!   client: {"execute": "query-status"}
//!   server: {"error": {"class": "CommandNotFound",
//!            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
//!   client: {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}
//!   server: {"return": {}}                                               now in command mode
//!   client: {"execute": "query-status", "id": 1}
//!   server: {"return": {...}, "id": 1}
//!   server: {"timestamp": {...}, "event": "STOP"}                        events only from here on
//! ```
//!
//! Until `qmp_capabilities` succeeds, QEMU's monitor knows no other command,
//! so every command is answered `CommandNotFound` with the text "Expecting
//! capabilities negotiation with 'qmp_capabilities'". Afterwards a second
//! `qmp_capabilities` gets `CommandNotFound` "Capabilities negotiation is
//! already complete, command ignored", and unknown commands "The command foo
//! has not been found".
//!
//! Version: the greeting announces QEMU 8.1.0 (package `ferry-<version>`),
//! because Ferry implements QEMU 8.1's migration QAPI (capabilities and
//! parameters of `migration/options.c` 8.1); orchestrators that gate
//! features on the QEMU version then expect exactly what Ferry offers.
//! `oob` is offered like QEMU does on a socket monitor; `exec-oob` is
//! accepted for commands the dispatcher marks out-of-band capable.
//!
//! A [`Session`] is shared by the threads serving one client (`&self`
//! everywhere): in-band commands run in order on one thread, `exec-oob`
//! commands on the reading thread, as in QEMU.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use super::control::{
    self, Capability, Identity, CONTROL_COMMANDS, QMP_CAPABILITIES, QUERY_COMMANDS, QUERY_VERSION,
};
use super::dispatch::Dispatcher;
use super::error::QmpError;
use super::framing::FramingError;
use super::request::{parse_request, Rejected, Request};

/// How sessions present themselves; shared by all clients of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// The version in the greeting and in `query-version`.
    pub identity: Identity,
    /// Whether the greeting offers the `oob` capability.
    pub offer_oob: bool,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            identity: Identity::default(),
            offer_oob: true,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct State {
    negotiated: bool,
    oob: bool,
}

/// The answer to one message.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The response object (`{"return": ...}` or `{"error": ...}`, with `"id"` if given).
    pub response: Value,
    /// True when this response completes capabilities negotiation (events may follow it).
    pub negotiated: bool,
}

/// The state machine of one client connection.
pub struct Session {
    dispatcher: Arc<dyn Dispatcher>,
    config: Arc<SessionConfig>,
    state: Mutex<State>,
    negotiated: Arc<AtomicBool>,
}

impl Session {
    /// A fresh session (in capabilities negotiation mode).
    pub fn new(dispatcher: Arc<dyn Dispatcher>, config: Arc<SessionConfig>) -> Session {
        Session {
            dispatcher,
            config,
            state: Mutex::new(State::default()),
            negotiated: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The greeting sent when the client connects.
    pub fn greeting(&self) -> Value {
        let caps: Vec<&str> = self.offered().iter().map(|c| c.as_str()).collect();
        json!({"QMP": {"version": self.config.identity.version_info(), "capabilities": caps}})
    }

    fn offered(&self) -> Vec<Capability> {
        if self.config.offer_oob {
            vec![Capability::Oob]
        } else {
            Vec::new()
        }
    }

    fn state(&self) -> State {
        // A poisoned lock still holds a consistent pair of flags.
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `qmp_capabilities` has succeeded.
    pub fn negotiated(&self) -> bool {
        self.state().negotiated
    }

    /// Whether the client enabled out-of-band execution.
    pub fn oob_enabled(&self) -> bool {
        self.state().oob
    }

    /// A flag that turns true when negotiation completes (read by event delivery).
    pub fn negotiated_flag(&self) -> Arc<AtomicBool> {
        self.negotiated.clone()
    }

    /// The response to input that was not a JSON value (never has an `"id"`).
    pub fn parse_error_response(err: &FramingError) -> Value {
        QmpError::generic(err.to_string()).to_response(None)
    }

    /// Handles one parsed message and returns its response.
    pub fn handle(&self, message: Value) -> Outcome {
        let state = self.state();
        let request = match parse_request(message, state.oob) {
            Ok(request) => request,
            Err(Rejected { error, id }) => return self.outcome(Err(error), id.as_ref(), false),
        };
        let id = request.id.clone();
        let (result, negotiated) = self.execute(request, state);
        self.outcome(result, id.as_ref(), negotiated)
    }

    fn outcome(
        &self,
        result: Result<Value, QmpError>,
        id: Option<&Value>,
        negotiated: bool,
    ) -> Outcome {
        let response = match result {
            Ok(ret) => {
                let mut rsp = Map::new();
                rsp.insert("return".into(), ret);
                if let Some(id) = id {
                    rsp.insert("id".into(), id.clone());
                }
                Value::Object(rsp)
            }
            Err(error) => error.to_response(id),
        };
        Outcome {
            response,
            negotiated,
        }
    }

    fn execute(&self, request: Request, state: State) -> (Result<Value, QmpError>, bool) {
        let Request {
            command,
            arguments,
            oob,
            ..
        } = request;
        if !state.negotiated {
            // Only qmp_capabilities exists in negotiation mode; QEMU rewrites
            // the text of every CommandNotFound error there.
            let result = if command == QMP_CAPABILITIES && !oob {
                self.qmp_capabilities(&arguments)
            } else if command == QMP_CAPABILITIES {
                Err(QmpError::generic(format!(
                    "The command {command} does not support OOB"
                )))
            } else {
                Err(QmpError::unknown_command(&command))
            };
            return match result {
                Ok(ret) => (Ok(ret), true),
                Err(mut err) => {
                    if err.class == super::error::ErrorClass::CommandNotFound {
                        err.desc =
                            "Expecting capabilities negotiation with 'qmp_capabilities'".into();
                    }
                    (Err(err), false)
                }
            };
        }
        let control = CONTROL_COMMANDS.contains(&command.as_str());
        if !control && !self.dispatcher.has_command(&command) {
            return (Err(QmpError::unknown_command(&command)), false);
        }
        if oob && (control || !self.dispatcher.allows_oob(&command)) {
            return (
                Err(QmpError::generic(format!(
                    "The command {command} does not support OOB"
                ))),
                false,
            );
        }
        let result = match command.as_str() {
            QMP_CAPABILITIES => self.qmp_capabilities(&arguments),
            QUERY_COMMANDS => control::query_commands(self.dispatcher.as_ref(), &arguments),
            QUERY_VERSION => control::query_version(&self.config.identity, &arguments),
            _ => self.run_dispatcher(&command, arguments),
        };
        (result, false)
    }

    fn run_dispatcher(
        &self,
        command: &str,
        arguments: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        // A panicking handler must not take the client's session down with it.
        catch_unwind(AssertUnwindSafe(|| {
            self.dispatcher.dispatch(command, arguments)
        }))
        .unwrap_or_else(|_| {
            Err(QmpError::generic(format!(
                "Command {command} failed with an internal error"
            )))
        })
    }

    fn qmp_capabilities(&self, arguments: &Map<String, Value>) -> Result<Value, QmpError> {
        let requested = control::parse_capabilities_args(arguments)?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.negotiated {
            return Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        control::accept_capabilities(&requested, &self.offered())?;
        state.negotiated = true;
        state.oob = requested.contains(&Capability::Oob);
        self.negotiated.store(true, Ordering::SeqCst);
        Ok(json!({}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::dispatch::CommandTable;
    use crate::qmp::ErrorClass;

    fn session_with(offer_oob: bool) -> Session {
        let mut table = CommandTable::new();
        table
            .register_no_args("stop", || Ok(json!({})))
            .register("echo", |a| Ok(Value::Object(a)))
            .register("fail", |_| {
                Err(QmpError::new(ErrorClass::DeviceNotFound, "no such device"))
            })
            .register("panic", |_| panic!("handler bug"))
            .register_oob("migrate-pause", |_| Ok(json!({"paused": true})));
        let config = SessionConfig {
            offer_oob,
            ..SessionConfig::default()
        };
        Session::new(Arc::new(table), Arc::new(config))
    }

    fn session() -> Session {
        session_with(true)
    }

    fn negotiated(enable_oob: bool) -> Session {
        let s = session();
        let args = if enable_oob {
            json!({"enable": ["oob"]})
        } else {
            json!({})
        };
        let out = s.handle(json!({"execute": "qmp_capabilities", "arguments": args}));
        assert_eq!(out.response, json!({"return": {}}));
        assert!(out.negotiated);
        s
    }

    fn rsp(s: &Session, msg: Value) -> Value {
        s.handle(msg).response
    }

    #[test]
    fn greeting_announces_qemu_8_1_and_oob() {
        let g = session().greeting();
        assert_eq!(
            g,
            json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 8},
                "package": format!("ferry-{}", env!("CARGO_PKG_VERSION"))}, "capabilities": ["oob"]}})
        );
        assert_eq!(
            session_with(false).greeting()["QMP"]["capabilities"],
            json!([])
        );
    }

    #[test]
    fn commands_before_negotiation_get_expecting_capabilities() {
        let s = session();
        let want = json!({"error": {"class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 3});
        assert_eq!(rsp(&s, json!({"execute": "stop", "id": 3})), want);
        assert_eq!(rsp(&s, json!({"execute": "no-such-thing", "id": 3})), want);
        assert_eq!(rsp(&s, json!({"execute": "query-commands", "id": 3})), want);
        assert!(!s.negotiated());
        // Request validation errors are not rewritten.
        assert_eq!(
            rsp(&s, json!({"execute": 1}))["error"]["desc"],
            json!("QMP input member 'execute' must be a string")
        );
    }

    #[test]
    fn negotiation_then_second_negotiation_is_refused() {
        let s = negotiated(false);
        assert!(s.negotiated() && !s.oob_enabled());
        assert!(s.negotiated_flag().load(Ordering::SeqCst));
        let out = s.handle(json!({"execute": "qmp_capabilities", "id": "x"}));
        assert!(!out.negotiated);
        assert_eq!(
            out.response,
            json!({"error": {"class": "CommandNotFound",
                "desc": "Capabilities negotiation is already complete, command ignored"}, "id": "x"})
        );
    }

    #[test]
    fn negotiation_with_unknown_or_unoffered_capability_fails() {
        let s = session();
        assert_eq!(
            rsp(
                &s,
                json!({"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}})
            ),
            json!({"error": {"class": "GenericError", "desc": "Parameter 'null' does not accept value 'foo'"}})
        );
        assert!(!s.negotiated());
        let s = session_with(false);
        assert_eq!(
            rsp(
                &s,
                json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
            ),
            json!({"error": {"class": "GenericError", "desc": "Capability oob not available"}})
        );
        assert!(!s.negotiated());
    }

    #[test]
    fn unknown_command_after_negotiation() {
        let s = negotiated(false);
        assert_eq!(
            rsp(&s, json!({"execute": "foo"})),
            json!({"error": {"class": "CommandNotFound", "desc": "The command foo has not been found"}})
        );
    }

    #[test]
    fn id_is_echoed_verbatim() {
        let s = negotiated(false);
        for id in [
            json!(7),
            json!(-1.5),
            json!("abc"),
            json!({"a": [1, {"b": null}]}),
            json!(null),
            json!([]),
        ] {
            assert_eq!(
                rsp(&s, json!({"execute": "stop", "id": id.clone()})),
                json!({"return": {}, "id": id})
            );
        }
        assert_eq!(rsp(&s, json!({"execute": "stop"})), json!({"return": {}}));
    }

    #[test]
    fn dispatcher_results_and_errors_pass_through() {
        let s = negotiated(false);
        assert_eq!(
            rsp(
                &s,
                json!({"execute": "echo", "arguments": {"x": [1]}, "id": 1})
            ),
            json!({"return": {"x": [1]}, "id": 1})
        );
        assert_eq!(
            rsp(&s, json!({"execute": "fail", "id": 2})),
            json!({"error": {"class": "DeviceNotFound", "desc": "no such device"}, "id": 2})
        );
        assert_eq!(
            rsp(&s, json!({"execute": "stop", "arguments": {"now": true}})),
            json!({"error": {"class": "GenericError", "desc": "Parameter 'now' is unexpected"}})
        );
    }

    #[test]
    fn a_panicking_handler_becomes_an_error() {
        let s = negotiated(false);
        let r = rsp(&s, json!({"execute": "panic", "id": 9}));
        assert_eq!(r["error"]["class"], json!("GenericError"));
        assert_eq!(r["id"], json!(9));
        // The session keeps working.
        assert_eq!(rsp(&s, json!({"execute": "stop"})), json!({"return": {}}));
    }

    #[test]
    fn exec_oob_needs_the_capability_and_a_capable_command() {
        let s = negotiated(false);
        assert_eq!(
            rsp(&s, json!({"exec-oob": "migrate-pause"}))["error"]["desc"],
            json!("QMP input member 'exec-oob' is unexpected")
        );
        let s = negotiated(true);
        assert!(s.oob_enabled());
        assert_eq!(
            rsp(&s, json!({"exec-oob": "migrate-pause", "id": "o"})),
            json!({"return": {"paused": true}, "id": "o"})
        );
        assert_eq!(
            rsp(&s, json!({"exec-oob": "stop"})),
            json!({"error": {"class": "GenericError", "desc": "The command stop does not support OOB"}})
        );
        assert_eq!(
            rsp(&s, json!({"exec-oob": "nope"}))["error"]["class"],
            json!("CommandNotFound")
        );
    }

    #[test]
    fn control_commands_are_answered_by_the_session() {
        let s = negotiated(false);
        let list = rsp(&s, json!({"execute": "query-commands"}));
        let names: Vec<&str> = list["return"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert!(
            names.contains(&"qmp_capabilities")
                && names.contains(&"stop")
                && names.contains(&"migrate-pause")
        );
        assert_eq!(
            rsp(&s, json!({"execute": "query-version"}))["return"]["qemu"]["major"],
            json!(8)
        );
    }

    #[test]
    fn parse_errors_have_no_id() {
        assert_eq!(
            Session::parse_error_response(&FramingError::Stray("@".into())),
            json!({"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}})
        );
    }
}
