//! The seam between the protocol and the VMM: a [`Dispatcher`] runs commands.
//!
//! The protocol layer validates requests, answers the control commands
//! itself (`qmp_capabilities`, `query-commands`, `query-version`), and hands
//! every other command with its raw `arguments` object to the dispatcher.
//! Handlers parse their own arguments (the `migration::qapi` module offers
//! QEMU-exact typed parsing); handlers without arguments call
//! [`no_arguments`] or are registered with [`CommandTable::register_no_args`].

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::error::QmpError;

/// Runs QMP commands; implemented by the VMM and shared by all client sessions.
pub trait Dispatcher: Send + Sync {
    /// Runs `command` with its `arguments` object; `Ok` is the `"return"` value.
    fn dispatch(&self, command: &str, arguments: Map<String, Value>) -> Result<Value, QmpError>;

    /// Names of every command [`Dispatcher::dispatch`] accepts (for `query-commands`).
    fn commands(&self) -> Vec<String>;

    /// Whether `command` exists; unknown commands get QEMU's `CommandNotFound` without a dispatch.
    fn has_command(&self, command: &str) -> bool {
        self.commands().iter().any(|c| c == command)
    }

    /// Whether `command` may run out of band (`exec-oob`), QEMU's `allow-oob`.
    fn allows_oob(&self, _command: &str) -> bool {
        false
    }
}

/// Refuses any argument, as QEMU does for a command without parameters:
/// "Parameter 'x' is unexpected" naming the first member.
pub fn no_arguments(arguments: &Map<String, Value>) -> Result<(), QmpError> {
    match arguments.keys().next() {
        Some(name) => Err(QmpError::unexpected_parameter(name)),
        None => Ok(()),
    }
}

type Handler = Arc<dyn Fn(Map<String, Value>) -> Result<Value, QmpError> + Send + Sync>;

struct Entry {
    handler: Handler,
    allow_oob: bool,
}

/// A [`Dispatcher`] built from closures, one per command name.
#[derive(Default)]
pub struct CommandTable {
    commands: BTreeMap<String, Entry>,
}

impl CommandTable {
    /// An empty table.
    pub fn new() -> CommandTable {
        CommandTable::default()
    }

    /// Adds (or replaces) a command whose handler receives the raw `arguments` object.
    pub fn register<F>(&mut self, name: &str, handler: F) -> &mut CommandTable
    where
        F: Fn(Map<String, Value>) -> Result<Value, QmpError> + Send + Sync + 'static,
    {
        self.insert(name, Arc::new(handler), false)
    }

    /// Adds a command without parameters: any argument is refused with QEMU's text.
    pub fn register_no_args<F>(&mut self, name: &str, handler: F) -> &mut CommandTable
    where
        F: Fn() -> Result<Value, QmpError> + Send + Sync + 'static,
    {
        let handler = move |arguments: Map<String, Value>| {
            no_arguments(&arguments)?;
            handler()
        };
        self.insert(name, Arc::new(handler), false)
    }

    /// Adds a command that may also run out of band (`exec-oob`).
    pub fn register_oob<F>(&mut self, name: &str, handler: F) -> &mut CommandTable
    where
        F: Fn(Map<String, Value>) -> Result<Value, QmpError> + Send + Sync + 'static,
    {
        self.insert(name, Arc::new(handler), true)
    }

    fn insert(&mut self, name: &str, handler: Handler, allow_oob: bool) -> &mut CommandTable {
        self.commands
            .insert(name.to_string(), Entry { handler, allow_oob });
        self
    }
}

impl Dispatcher for CommandTable {
    fn dispatch(&self, command: &str, arguments: Map<String, Value>) -> Result<Value, QmpError> {
        match self.commands.get(command) {
            Some(entry) => (entry.handler)(arguments),
            None => Err(QmpError::unknown_command(command)),
        }
    }

    fn commands(&self) -> Vec<String> {
        self.commands.keys().cloned().collect()
    }

    fn has_command(&self, command: &str) -> bool {
        self.commands.contains_key(command)
    }

    fn allows_oob(&self, command: &str) -> bool {
        self.commands.get(command).is_some_and(|e| e.allow_oob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn no_arguments_refuses_the_first_member() {
        assert!(no_arguments(&Map::new()).is_ok());
        let err = no_arguments(&args(json!({"b": 1, "a": 2}))).unwrap_err();
        assert_eq!(err.desc, "Parameter 'a' is unexpected");
        assert_eq!(err.class, crate::qmp::ErrorClass::GenericError);
    }

    #[test]
    fn table_dispatches_by_name() {
        let mut table = CommandTable::new();
        table
            .register("echo", |a| Ok(Value::Object(a)))
            .register_no_args("stop", || Ok(json!({})))
            .register_oob("migrate-pause", |_| Ok(json!({})));
        assert_eq!(
            table.dispatch("echo", args(json!({"x": 1}))),
            Ok(json!({"x": 1}))
        );
        assert_eq!(table.dispatch("stop", Map::new()), Ok(json!({})));
        assert_eq!(
            table
                .dispatch("stop", args(json!({"force": true})))
                .unwrap_err()
                .desc,
            "Parameter 'force' is unexpected"
        );
        assert_eq!(
            table.dispatch("nope", Map::new()).unwrap_err(),
            QmpError::unknown_command("nope")
        );
        assert_eq!(table.commands(), vec!["echo", "migrate-pause", "stop"]);
        assert!(table.has_command("stop") && !table.has_command("nope"));
        assert!(table.allows_oob("migrate-pause") && !table.allows_oob("stop"));
    }
}
