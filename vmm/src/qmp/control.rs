//! The control commands the protocol layer answers itself (QEMU's
//! `monitor/qmp-cmds-control.c`): `qmp_capabilities`, `query-commands`,
//! `query-version`.

use serde_json::{json, Map, Value};

use super::dispatch::{no_arguments, Dispatcher};
use super::error::QmpError;

/// The capabilities negotiation command.
pub const QMP_CAPABILITIES: &str = "qmp_capabilities";
/// Lists the commands available to the client.
pub const QUERY_COMMANDS: &str = "query-commands";
/// Reports the version also shown in the greeting.
pub const QUERY_VERSION: &str = "query-version";

/// The commands answered by the protocol layer, whatever the dispatcher offers.
pub const CONTROL_COMMANDS: [&str; 3] = [QMP_CAPABILITIES, QUERY_COMMANDS, QUERY_VERSION];

/// A QMP capability (QEMU's `QMPCapability`; 8.1 has only `oob`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// Out-of-band execution (`exec-oob`).
    Oob,
}

impl Capability {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Oob => "oob",
        }
    }

    fn from_name(name: &str) -> Option<Capability> {
        match name {
            "oob" => Some(Capability::Oob),
            _ => None,
        }
    }
}

/// Reads `qmp_capabilities`' arguments (`'*enable': ['QMPCapability']`) with
/// the texts of QEMU's input visitor; members first, unexpected ones last.
pub fn parse_capabilities_args(
    arguments: &Map<String, Value>,
) -> Result<Vec<Capability>, QmpError> {
    let mut enable = Vec::new();
    if let Some(list) = arguments.get("enable") {
        let Value::Array(items) = list else {
            return Err(QmpError::generic(
                "Invalid parameter type for 'enable', expected: array",
            ));
        };
        for (i, item) in items.iter().enumerate() {
            let Value::String(name) = item else {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for 'enable[{i}]', expected: string"
                )));
            };
            // QEMU names list elements "null" in this one message.
            let cap = Capability::from_name(name).ok_or_else(|| {
                QmpError::generic(format!("Parameter 'null' does not accept value '{name}'"))
            })?;
            enable.push(cap);
        }
    }
    if let Some(extra) = arguments.keys().find(|k| k.as_str() != "enable") {
        return Err(QmpError::unexpected_parameter(extra));
    }
    Ok(enable)
}

/// Checks the requested capabilities against those offered, QEMU's `qmp_caps_accept()`.
pub fn accept_capabilities(
    requested: &[Capability],
    offered: &[Capability],
) -> Result<(), QmpError> {
    let unavailable: Vec<&str> = requested
        .iter()
        .filter(|c| !offered.contains(c))
        .map(|c| c.as_str())
        .collect();
    if unavailable.is_empty() {
        Ok(())
    } else {
        Err(QmpError::generic(format!(
            "Capability {} not available",
            unavailable.join(", ")
        )))
    }
}

/// The QEMU version Ferry announces and the package string beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// QEMU major version.
    pub major: u64,
    /// QEMU minor version.
    pub minor: u64,
    /// QEMU micro version.
    pub micro: u64,
    /// Free-form package string (`"ferry-<version>"`).
    pub package: String,
}

impl Default for Identity {
    /// QEMU 8.1.0, whose migration QAPI Ferry implements, packaged as `ferry-<crate version>`.
    fn default() -> Self {
        Identity {
            major: 8,
            minor: 1,
            micro: 0,
            package: format!("ferry-{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

impl Identity {
    /// The `VersionInfo` object of the greeting and of `query-version`.
    pub fn version_info(&self) -> Value {
        json!({
            "qemu": {"major": self.major, "minor": self.minor, "micro": self.micro},
            "package": self.package,
        })
    }
}

/// `query-version`'s answer.
pub fn query_version(
    identity: &Identity,
    arguments: &Map<String, Value>,
) -> Result<Value, QmpError> {
    no_arguments(arguments)?;
    Ok(identity.version_info())
}

/// `query-commands`' answer: `[{"name": ...}, ...]` for the control commands and the dispatcher's.
pub fn query_commands(
    dispatcher: &dyn Dispatcher,
    arguments: &Map<String, Value>,
) -> Result<Value, QmpError> {
    no_arguments(arguments)?;
    let mut names: Vec<String> = CONTROL_COMMANDS.iter().map(|s| s.to_string()).collect();
    for name in dispatcher.commands() {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Ok(Value::Array(
        names
            .into_iter()
            .map(|name| json!({ "name": name }))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::dispatch::CommandTable;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn cap_err(v: Value) -> String {
        parse_capabilities_args(&args(v)).unwrap_err().desc
    }

    #[test]
    fn capabilities_arguments_use_visitor_texts() {
        assert_eq!(parse_capabilities_args(&Map::new()).unwrap(), vec![]);
        assert_eq!(
            parse_capabilities_args(&args(json!({"enable": ["oob"]}))).unwrap(),
            vec![Capability::Oob]
        );
        assert_eq!(
            cap_err(json!({"enable": "oob"})),
            "Invalid parameter type for 'enable', expected: array"
        );
        assert_eq!(
            cap_err(json!({"enable": null})),
            "Invalid parameter type for 'enable', expected: array"
        );
        assert_eq!(
            cap_err(json!({"enable": ["oob", 1]})),
            "Invalid parameter type for 'enable[1]', expected: string"
        );
        assert_eq!(
            cap_err(json!({"enable": ["foo"]})),
            "Parameter 'null' does not accept value 'foo'"
        );
        assert_eq!(cap_err(json!({"foo": 1})), "Parameter 'foo' is unexpected");
        // Member errors come before unexpected members.
        assert_eq!(
            cap_err(json!({"enable": 1, "foo": 1})),
            "Invalid parameter type for 'enable', expected: array"
        );
    }

    #[test]
    fn unavailable_capabilities_are_listed() {
        assert!(accept_capabilities(&[Capability::Oob], &[Capability::Oob]).is_ok());
        assert_eq!(
            accept_capabilities(&[Capability::Oob, Capability::Oob], &[])
                .unwrap_err()
                .desc,
            "Capability oob, oob not available"
        );
    }

    #[test]
    fn query_commands_lists_control_and_dispatcher_commands() {
        let mut table = CommandTable::new();
        table
            .register_no_args("stop", || Ok(json!({})))
            .register_no_args("query-version", || Ok(json!(1)));
        let list = query_commands(&table, &Map::new()).unwrap();
        assert_eq!(
            list,
            json!([{"name": "qmp_capabilities"}, {"name": "query-commands"}, {"name": "query-version"}, {"name": "stop"}])
        );
        assert_eq!(
            query_commands(&table, &args(json!({"x": 1})))
                .unwrap_err()
                .desc,
            "Parameter 'x' is unexpected"
        );
    }

    #[test]
    fn version_is_qemu_8_1_0_by_default() {
        let id = Identity::default();
        assert_eq!(
            query_version(&id, &Map::new()).unwrap(),
            json!({"qemu": {"major": 8, "minor": 1, "micro": 0}, "package": format!("ferry-{}", env!("CARGO_PKG_VERSION"))})
        );
    }
}
