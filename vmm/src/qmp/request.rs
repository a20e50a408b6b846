//! Validating one parsed message as a QMP command, QEMU's
//! `qmp_dispatch_check_obj()` (`qapi/qmp-dispatch.c`).
//!
//! A request is a JSON object with exactly one of `execute` (or, once the
//! client enabled the `oob` capability, `exec-oob`) naming the command as a
//! string, optional `arguments` (an object) and optional `id` (any JSON
//! value, echoed verbatim in the response). Anything else is refused with
//! QEMU's text; members are checked in QEMU's `QDict` order, so with several
//! problems the one reported is the one QEMU reports.

use serde_json::{Map, Value};

use super::error::QmpError;
use super::writer::qdict_order;

/// A valid command request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The command name.
    pub command: String,
    /// The `arguments` object (empty when absent).
    pub arguments: Map<String, Value>,
    /// The `id` to echo, if the client sent one.
    pub id: Option<Value>,
    /// Whether the command came as `exec-oob` (to run out of band).
    pub oob: bool,
}

/// A refused request: the error and the `id` to echo with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    /// What was wrong.
    pub error: QmpError,
    /// The request's `id`, if it was an object with one.
    pub id: Option<Value>,
}

/// Whether `message` asks for out-of-band execution (QEMU's `qmp_is_oob()`):
/// an object with `exec-oob` and without `execute`.
pub fn is_oob(message: &Value) -> bool {
    match message {
        Value::Object(map) => map.contains_key("exec-oob") && !map.contains_key("execute"),
        _ => false,
    }
}

/// Checks `message` as a request; `allow_oob` is whether the session enabled `oob`.
pub fn parse_request(message: Value, allow_oob: bool) -> Result<Request, Rejected> {
    let Value::Object(mut map) = message else {
        return Err(Rejected {
            error: QmpError::generic("QMP input must be a JSON object"),
            id: None,
        });
    };
    let id = map.get("id").cloned();
    let reject = |desc: String| Rejected {
        error: QmpError::generic(desc),
        id: id.clone(),
    };
    let mut exec_key: Option<&'static str> = None;
    for key in qdict_order(&map) {
        let member = &map[key];
        if key == "execute" || (key == "exec-oob" && allow_oob) {
            if !member.is_string() {
                return Err(reject(format!("QMP input member '{key}' must be a string")));
            }
            if let Some(other) = exec_key {
                return Err(reject(format!(
                    "QMP input member '{key}' clashes with '{other}'"
                )));
            }
            exec_key = Some(if key == "execute" {
                "execute"
            } else {
                "exec-oob"
            });
        } else if key == "arguments" {
            if !member.is_object() {
                return Err(reject(
                    "QMP input member 'arguments' must be an object".into(),
                ));
            }
        } else if key != "id" {
            return Err(reject(format!("QMP input member '{key}' is unexpected")));
        }
    }
    let Some(exec_key) = exec_key else {
        return Err(reject("QMP input lacks member 'execute'".into()));
    };
    let oob = exec_key == "exec-oob";
    let command = match map.remove(exec_key) {
        Some(Value::String(command)) => command,
        _ => return Err(reject("QMP input lacks member 'execute'".into())),
    };
    let arguments = match map.remove("arguments") {
        Some(Value::Object(arguments)) => arguments,
        _ => Map::new(),
    };
    Ok(Request {
        command,
        arguments,
        id,
        oob,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn desc(message: Value, allow_oob: bool) -> (String, Option<Value>) {
        let rejected = parse_request(message, allow_oob).unwrap_err();
        (rejected.error.desc, rejected.id)
    }

    #[test]
    fn valid_request_with_arguments_and_id() {
        let req = parse_request(
            json!({"execute": "stop", "arguments": {"a": 1}, "id": {"n": [1]}}),
            false,
        )
        .unwrap();
        assert_eq!(req.command, "stop");
        assert_eq!(req.arguments, json!({"a": 1}).as_object().unwrap().clone());
        assert_eq!(req.id, Some(json!({"n": [1]})));
        assert!(!req.oob);
        let bare = parse_request(json!({"execute": "cont"}), false).unwrap();
        assert!(bare.arguments.is_empty() && bare.id.is_none());
    }

    #[test]
    fn every_validation_message_is_qemus() {
        assert_eq!(
            desc(json!([1]), false),
            ("QMP input must be a JSON object".into(), None)
        );
        assert_eq!(desc(json!("x"), false).0, "QMP input must be a JSON object");
        assert_eq!(
            desc(json!({"execute": 1, "id": 5}), false),
            (
                "QMP input member 'execute' must be a string".into(),
                Some(json!(5))
            )
        );
        assert_eq!(
            desc(json!({"id": "a"}), false),
            ("QMP input lacks member 'execute'".into(), Some(json!("a")))
        );
        assert_eq!(desc(json!({}), false).0, "QMP input lacks member 'execute'");
        assert_eq!(
            desc(json!({"execute": "x", "arguments": [1]}), false).0,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            desc(json!({"execute": "x", "foo": 1}), false).0,
            "QMP input member 'foo' is unexpected"
        );
    }

    #[test]
    fn exec_oob_without_the_capability_is_unexpected() {
        assert_eq!(
            desc(json!({"exec-oob": "migrate-pause"}), false).0,
            "QMP input member 'exec-oob' is unexpected"
        );
        assert!(is_oob(&json!({"exec-oob": "migrate-pause"})));
        assert!(!is_oob(&json!({"exec-oob": "a", "execute": "b"})));
        assert!(!is_oob(&json!([1])));
    }

    #[test]
    fn exec_oob_with_the_capability() {
        let req = parse_request(json!({"exec-oob": "migrate-pause", "id": 1}), true).unwrap();
        assert!(req.oob);
        assert_eq!(req.command, "migrate-pause");
        // "exec-oob" comes before "execute" in QEMU's dictionary order.
        assert_eq!(
            desc(json!({"exec-oob": "a", "execute": "b"}), true).0,
            "QMP input member 'execute' clashes with 'exec-oob'"
        );
        assert_eq!(
            desc(json!({"exec-oob": 3}), true).0,
            "QMP input member 'exec-oob' must be a string"
        );
    }

    #[test]
    fn members_are_checked_in_qdict_order() {
        // "execute" (bucket 447) is visited before "arguments" (486).
        assert_eq!(
            desc(json!({"execute": 1, "arguments": 2}), false).0,
            "QMP input member 'execute' must be a string"
        );
    }
}
