//! QMP errors as they travel on the wire: `{"error": {"class": ..., "desc": ...}}`.
//!
//! QEMU reports every failure with one of a handful of error classes
//! (`qapi/error.json`, `QapiErrorClass`) and a human-readable description.
//! Almost everything is a `GenericError`; the other classes survive for
//! compatibility and clients do match on them (`CommandNotFound` above all).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

/// QEMU's QMP error classes (`QapiErrorClass`), spelled as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorClass {
    /// The catch-all class for every error without a more specific one.
    GenericError,
    /// The requested command does not exist (or is not available yet).
    CommandNotFound,
    /// A device exists but is not active.
    DeviceNotActive,
    /// The requested device does not exist.
    DeviceNotFound,
    /// A KVM capability the command needs is missing.
    KVMMissingCap,
}

impl ErrorClass {
    /// The class name exactly as QEMU writes it in `"class"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }

    /// Parses a class name as found in a response; `None` for unknown names.
    pub fn from_name(name: &str) -> Option<ErrorClass> {
        [
            ErrorClass::GenericError,
            ErrorClass::CommandNotFound,
            ErrorClass::DeviceNotActive,
            ErrorClass::DeviceNotFound,
            ErrorClass::KVMMissingCap,
        ]
        .into_iter()
        .find(|class| class.as_str() == name)
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One QMP error: a class and QEMU's description text; `Display` shows the description.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
#[error("{desc}")]
pub struct QmpError {
    /// The error class (`"class"` on the wire).
    pub class: ErrorClass,
    /// The human-readable description (`"desc"` on the wire).
    pub desc: String,
}

impl QmpError {
    /// An error of the given class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> QmpError {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`, QEMU's `error_setg()`.
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound` error with a free-form description.
    pub fn command_not_found(desc: impl Into<String>) -> QmpError {
        QmpError::new(ErrorClass::CommandNotFound, desc)
    }

    /// QEMU's answer to an unknown command: "The command foo has not been found".
    pub fn unknown_command(command: &str) -> QmpError {
        QmpError::command_not_found(format!("The command {command} has not been found"))
    }

    /// QEMU's rejection of an argument a command does not take: "Parameter 'x' is unexpected".
    pub fn unexpected_parameter(name: &str) -> QmpError {
        QmpError::generic(format!("Parameter '{name}' is unexpected"))
    }

    /// The inner error object, `{"class": ..., "desc": ...}`.
    pub fn to_value(&self) -> Value {
        let mut inner = Map::new();
        inner.insert("class".into(), Value::String(self.class.as_str().into()));
        inner.insert("desc".into(), Value::String(self.desc.clone()));
        Value::Object(inner)
    }

    /// The whole response, `{"error": {...}}` plus `"id"` when the request carried one.
    pub fn to_response(&self, id: Option<&Value>) -> Value {
        let mut rsp = Map::new();
        rsp.insert("error".into(), self.to_value());
        if let Some(id) = id {
            rsp.insert("id".into(), id.clone());
        }
        Value::Object(rsp)
    }

    /// Reads the inner error object of a response (`{"class": ..., "desc": ...}`).
    ///
    /// Unknown classes are read as `GenericError`, as QEMU's own clients do;
    /// `None` when `class` or `desc` is missing or not a string.
    pub fn from_value(value: &Value) -> Option<QmpError> {
        let class = value.get("class")?.as_str()?;
        let desc = value.get("desc")?.as_str()?;
        Some(QmpError::new(
            ErrorClass::from_name(class).unwrap_or(ErrorClass::GenericError),
            desc,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn serde_shape_is_class_and_desc() {
        let err = QmpError::unknown_command("foo");
        assert_eq!(
            serde_json::to_value(&err).unwrap(),
            json!({"class": "CommandNotFound", "desc": "The command foo has not been found"})
        );
        assert_eq!(err.to_value(), serde_json::to_value(&err).unwrap());
    }

    #[test]
    fn response_carries_id_only_when_given() {
        let err = QmpError::generic("boom");
        assert_eq!(
            err.to_response(None),
            json!({"error": {"class": "GenericError", "desc": "boom"}})
        );
        assert_eq!(
            err.to_response(Some(&json!({"a": [1]}))),
            json!({"error": {"class": "GenericError", "desc": "boom"}, "id": {"a": [1]}})
        );
    }

    #[test]
    fn every_class_round_trips_by_name() {
        for class in [
            ErrorClass::GenericError,
            ErrorClass::CommandNotFound,
            ErrorClass::DeviceNotActive,
            ErrorClass::DeviceNotFound,
            ErrorClass::KVMMissingCap,
        ] {
            assert_eq!(ErrorClass::from_name(class.as_str()), Some(class));
            assert_eq!(serde_json::to_value(class).unwrap(), json!(class.as_str()));
        }
        assert_eq!(ErrorClass::from_name("Nope"), None);
    }

    #[test]
    fn from_value_reads_a_response_error() {
        let err = QmpError::from_value(&json!({"class": "DeviceNotFound", "desc": "no"})).unwrap();
        assert_eq!(err, QmpError::new(ErrorClass::DeviceNotFound, "no"));
        let odd = QmpError::from_value(&json!({"class": "Whatever", "desc": "x"})).unwrap();
        assert_eq!(odd.class, ErrorClass::GenericError);
        assert!(QmpError::from_value(&json!({"class": "GenericError"})).is_none());
        assert_eq!(err.to_string(), "no");
    }
}
