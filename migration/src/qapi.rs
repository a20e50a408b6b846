//! QAPI input-visitor semantics over `serde_json`: typed access to a QMP
//! command's `arguments` object, with QEMU's exact error texts.
//!
//! QEMU turns a command's arguments into C values with its QObject input
//! visitor (`qapi/qobject-input-visitor.c` plus `qapi/qapi-visit-core.c`).
//! Tools that drive QEMU match on the texts it produces, so every QMP
//! command in Ferry reads its arguments through [`Args`], which behaves the
//! same way:
//!
//! | situation                                   | text                                                   |
//! |---------------------------------------------|--------------------------------------------------------|
//! | mandatory member absent                     | `Parameter 'uri' is missing`                           |
//! | wrong JSON type (str, bool, int, number, object, array, null) | `Invalid parameter type for 'x', expected: string` |
//! | not an unsigned integer (uint8..uint64, size) | `Parameter 'max-bandwidth' expects uint64`           |
//! | above the C type's range                    | `Parameter 'compress-level' expects uint8_t`           |
//! | unknown enum value                          | `Parameter 'capability' does not accept value 'foo'`   |
//! | alternate of the wrong type                 | `Invalid parameter type for 'tls-creds', expected: StrOrNull` |
//! | member nobody asked for                     | `Parameter 'foo' is unexpected`                        |
//!
//! Details that matter for fidelity:
//! - Names in most texts are *full names*, built like QEMU's `full_name()`:
//!   `capabilities[0].capability` for a member of the first element of the
//!   list `capabilities`. Three texts use the bare member name instead, as
//!   QEMU does: the C-range error of `uint8`/`uint16`/`uint32`, the unknown
//!   enum value, and the alternate type error.
//! - Unsigned integers accept negative JSON integers and wrap them to 64
//!   bits "for backward compatibility" (QEMU's own words), so `-1` for a
//!   `uint8` member ends as `Parameter 'x' expects uint8_t`. Floats (even
//!   `1.0`) and integers beyond 64 bits are refused.
//! - Members are checked in the order the caller visits them (QEMU's
//!   schema order), and unexpected members only when the whole object has
//!   been read ([`Args::finish`]), so the first error reported is the one
//!   QEMU would report.

use std::collections::BTreeSet;

use serde_json::{Map, Value};
use thiserror::Error;

/// An argument error, whose `Display` is exactly QEMU's text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QapiError {
    /// A mandatory member is absent (`QERR_MISSING_PARAMETER`).
    #[error("Parameter '{0}' is missing")]
    Missing(String),
    /// A member has the wrong JSON type (`QERR_INVALID_PARAMETER_TYPE`).
    #[error("Invalid parameter type for '{name}', expected: {expected}")]
    InvalidType {
        /// Full (or, for alternates, bare) member name.
        name: String,
        /// QEMU's name of the expected type: `integer`, `number`, `boolean`, `string`, `object`, `array`, `null`, or an alternate's name.
        expected: String,
    },
    /// A member's value is outside what its type accepts (`QERR_INVALID_PARAMETER_VALUE`).
    #[error("Parameter '{name}' expects {expects}")]
    InvalidValue {
        /// Member name (full for `uint64`, bare for the narrower C types).
        name: String,
        /// What QEMU says it expects: `uint64`, `uint8_t`, `uint16_t`, `uint32_t`.
        expects: String,
    },
    /// An enum member holds a string that is not one of the enum's values.
    #[error("Parameter '{name}' does not accept value '{value}'")]
    EnumValue {
        /// Bare member name.
        name: String,
        /// The value given.
        value: String,
    },
    /// The object has a member the command does not know.
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
}

impl QapiError {
    /// The QMP error class QEMU reports with this error (always `GenericError`).
    pub fn class(&self) -> &'static str {
        "GenericError"
    }
}

/// QAPI's `StrOrNull` alternate: a string, or JSON `null`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrOrNull {
    /// A JSON string.
    Str(String),
    /// JSON `null`.
    Null,
}

impl StrOrNull {
    /// The string, with `null` read as the empty string (what QEMU's migration parameters do).
    pub fn into_string_or_empty(self) -> String {
        match self {
            StrOrNull::Str(s) => s,
            StrOrNull::Null => String::new(),
        }
    }

    /// The JSON form of this value.
    pub fn to_json(&self) -> Value {
        match self {
            StrOrNull::Str(s) => Value::String(s.clone()),
            StrOrNull::Null => Value::Null,
        }
    }
}

impl serde::Serialize for StrOrNull {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            StrOrNull::Str(s) => serializer.serialize_str(s),
            StrOrNull::Null => serializer.serialize_unit(),
        }
    }
}

/// A cursor over one JSON object being visited, like a QAPI struct visit.
///
/// Create one with [`Args::new`] for a command's `arguments`, read members
/// with the typed getters in schema order, then call [`Args::finish`] to
/// report members that were not read.
#[derive(Debug)]
pub struct Args<'a> {
    map: &'a Map<String, Value>,
    prefix: String,
    consumed: BTreeSet<&'a str>,
}

impl<'a> Args<'a> {
    /// Starts visiting a command's top-level `arguments` object.
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Self::nested(map, String::new())
    }

    fn nested(map: &'a Map<String, Value>, prefix: String) -> Self {
        Args {
            map,
            prefix,
            consumed: BTreeSet::new(),
        }
    }

    /// The full name QEMU prints for member `name` of this object.
    pub fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Whether member `name` is present (without consuming it).
    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    fn take(&mut self, name: &str) -> Option<&'a Value> {
        let (key, value) = self.map.get_key_value(name)?;
        self.consumed.insert(key.as_str());
        Some(value)
    }

    fn require(&mut self, name: &str) -> Result<&'a Value, QapiError> {
        self.take(name)
            .ok_or_else(|| QapiError::Missing(self.full_name(name)))
    }

    fn type_error(&self, name: &str, expected: &str) -> QapiError {
        QapiError::InvalidType {
            name: self.full_name(name),
            expected: expected.to_string(),
        }
    }

    /// Reads an optional member with `read` if it is present.
    fn optional<T>(
        &mut self,
        name: &str,
        read: impl FnOnce(&mut Self, &str) -> Result<T, QapiError>,
    ) -> Result<Option<T>, QapiError> {
        if self.has(name) {
            read(self, name).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A mandatory `str` member.
    pub fn req_str(&mut self, name: &str) -> Result<String, QapiError> {
        match self.require(name)? {
            Value::String(s) => Ok(s.clone()),
            _ => Err(self.type_error(name, "string")),
        }
    }

    /// An optional `str` member.
    pub fn opt_str(&mut self, name: &str) -> Result<Option<String>, QapiError> {
        self.optional(name, Self::req_str)
    }

    /// A mandatory `bool` member.
    pub fn req_bool(&mut self, name: &str) -> Result<bool, QapiError> {
        match self.require(name)? {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.type_error(name, "boolean")),
        }
    }

    /// An optional `bool` member.
    pub fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, QapiError> {
        self.optional(name, Self::req_bool)
    }

    /// A mandatory `int` (int64) member.
    pub fn req_int(&mut self, name: &str) -> Result<i64, QapiError> {
        match self.require(name)? {
            Value::Number(n) => n.as_i64().ok_or_else(|| self.type_error(name, "integer")),
            _ => Err(self.type_error(name, "integer")),
        }
    }

    /// An optional `int` (int64) member.
    pub fn opt_int(&mut self, name: &str) -> Result<Option<i64>, QapiError> {
        self.optional(name, Self::req_int)
    }

    /// A mandatory `number` (double) member; integers are accepted too.
    pub fn req_number(&mut self, name: &str) -> Result<f64, QapiError> {
        match self.require(name)? {
            Value::Number(n) => n.as_f64().ok_or_else(|| self.type_error(name, "number")),
            _ => Err(self.type_error(name, "number")),
        }
    }

    /// An optional `number` (double) member.
    pub fn opt_number(&mut self, name: &str) -> Result<Option<f64>, QapiError> {
        self.optional(name, Self::req_number)
    }

    /// A mandatory `uint64` member (negative integers wrap, as in QEMU).
    pub fn req_u64(&mut self, name: &str) -> Result<u64, QapiError> {
        let value = self.require(name)?;
        let parsed = match value {
            Value::Number(n) => n.as_u64().or_else(|| n.as_i64().map(|v| v as u64)),
            _ => None,
        };
        parsed.ok_or_else(|| QapiError::InvalidValue {
            name: self.full_name(name),
            expects: "uint64".to_string(),
        })
    }

    /// An optional `uint64` member.
    pub fn opt_u64(&mut self, name: &str) -> Result<Option<u64>, QapiError> {
        self.optional(name, Self::req_u64)
    }

    /// A mandatory `size` member (QMP's visitor reads it as `uint64`).
    pub fn req_size(&mut self, name: &str) -> Result<u64, QapiError> {
        self.req_u64(name)
    }

    /// An optional `size` member.
    pub fn opt_size(&mut self, name: &str) -> Result<Option<u64>, QapiError> {
        self.optional(name, Self::req_size)
    }

    fn req_uint_n(&mut self, name: &str, max: u64, c_type: &str) -> Result<u64, QapiError> {
        let value = self.req_u64(name)?;
        if value > max {
            return Err(QapiError::InvalidValue {
                name: name.to_string(),
                expects: c_type.to_string(),
            });
        }
        Ok(value)
    }

    /// A mandatory `uint8` member.
    pub fn req_u8(&mut self, name: &str) -> Result<u8, QapiError> {
        // The range was checked, so the cast is exact.
        Ok(self.req_uint_n(name, u8::MAX.into(), "uint8_t")? as u8)
    }

    /// An optional `uint8` member.
    pub fn opt_u8(&mut self, name: &str) -> Result<Option<u8>, QapiError> {
        self.optional(name, Self::req_u8)
    }

    /// A mandatory `uint16` member.
    pub fn req_u16(&mut self, name: &str) -> Result<u16, QapiError> {
        // The range was checked, so the cast is exact.
        Ok(self.req_uint_n(name, u16::MAX.into(), "uint16_t")? as u16)
    }

    /// An optional `uint16` member.
    pub fn opt_u16(&mut self, name: &str) -> Result<Option<u16>, QapiError> {
        self.optional(name, Self::req_u16)
    }

    /// A mandatory `uint32` member.
    pub fn req_u32(&mut self, name: &str) -> Result<u32, QapiError> {
        // The range was checked, so the cast is exact.
        Ok(self.req_uint_n(name, u32::MAX.into(), "uint32_t")? as u32)
    }

    /// An optional `uint32` member.
    pub fn opt_u32(&mut self, name: &str) -> Result<Option<u32>, QapiError> {
        self.optional(name, Self::req_u32)
    }

    /// An optional `StrOrNull` member (an alternate: the type error names it by its bare name).
    pub fn opt_str_or_null(&mut self, name: &str) -> Result<Option<StrOrNull>, QapiError> {
        let Some(value) = self.map.get(name) else {
            return Ok(None);
        };
        match value {
            Value::String(_) => self.req_str(name).map(|s| Some(StrOrNull::Str(s))),
            Value::Null => {
                self.take(name);
                Ok(Some(StrOrNull::Null))
            }
            _ => Err(QapiError::InvalidType {
                name: name.to_string(),
                expected: "StrOrNull".to_string(),
            }),
        }
    }

    /// A mandatory enum member: a string that `parse` maps to a value.
    pub fn req_enum<T>(
        &mut self,
        name: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<T, QapiError> {
        let text = self.req_str(name)?;
        parse(&text).ok_or_else(|| QapiError::EnumValue {
            name: name.to_string(),
            value: text,
        })
    }

    /// An optional enum member.
    pub fn opt_enum<T>(
        &mut self,
        name: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, QapiError> {
        if self.has(name) {
            self.req_enum(name, parse).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A mandatory member of any JSON type (QAPI's `any`).
    pub fn req_any(&mut self, name: &str) -> Result<&'a Value, QapiError> {
        self.require(name)
    }

    /// An optional member of any JSON type.
    pub fn opt_any(&mut self, name: &str) -> Result<Option<&'a Value>, QapiError> {
        Ok(self.take(name))
    }

    /// A mandatory struct member, visited by `visit` and then checked for unexpected members.
    pub fn req_object<T>(
        &mut self,
        name: &str,
        visit: impl FnOnce(&mut Args<'a>) -> Result<T, QapiError>,
    ) -> Result<T, QapiError> {
        let full = self.full_name(name);
        match self.require(name)? {
            Value::Object(map) => visit_struct(map, full, visit),
            _ => Err(self.type_error(name, "object")),
        }
    }

    /// An optional struct member.
    pub fn opt_object<T>(
        &mut self,
        name: &str,
        visit: impl FnOnce(&mut Args<'a>) -> Result<T, QapiError>,
    ) -> Result<Option<T>, QapiError> {
        if self.has(name) {
            self.req_object(name, visit).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A mandatory list-of-structs member: each element is visited in order
    /// by `visit`, then checked for unexpected members, before the next one.
    pub fn req_list<T>(
        &mut self,
        name: &str,
        mut visit: impl FnMut(&mut Args<'a>) -> Result<T, QapiError>,
    ) -> Result<Vec<T>, QapiError> {
        let full = self.full_name(name);
        let items = match self.require(name)? {
            Value::Array(items) => items,
            _ => return Err(self.type_error(name, "array")),
        };
        let mut out = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let element = format!("{full}[{index}]");
            match item {
                Value::Object(map) => out.push(visit_struct(map, element, &mut visit)?),
                _ => {
                    return Err(QapiError::InvalidType {
                        name: element,
                        expected: "object".to_string(),
                    })
                }
            }
        }
        Ok(out)
    }

    /// An optional list-of-structs member.
    pub fn opt_list<T>(
        &mut self,
        name: &str,
        visit: impl FnMut(&mut Args<'a>) -> Result<T, QapiError>,
    ) -> Result<Option<Vec<T>>, QapiError> {
        if self.has(name) {
            self.req_list(name, visit).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Ends the visit: reports the first member that was never read.
    pub fn finish(self) -> Result<(), QapiError> {
        match self
            .map
            .keys()
            .find(|key| !self.consumed.contains(key.as_str()))
        {
            Some(key) => Err(QapiError::Unexpected(self.full_name(key))),
            None => Ok(()),
        }
    }
}

/// Visits one struct: its members through `visit`, then QEMU's check for unexpected members.
fn visit_struct<'a, T>(
    map: &'a Map<String, Value>,
    full_name: String,
    visit: impl FnOnce(&mut Args<'a>) -> Result<T, QapiError>,
) -> Result<T, QapiError> {
    let mut args = Args::nested(map, full_name);
    let value = visit(&mut args)?;
    args.finish()?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("test input must be an object"),
        }
    }

    #[test]
    fn missing_mandatory_member_names_it() {
        let map = obj(json!({}));
        let err = Args::new(&map).req_str("uri").unwrap_err();
        assert_eq!(err.to_string(), "Parameter 'uri' is missing");
    }

    #[test]
    fn wrong_json_types_name_the_expected_type_like_qemu() {
        let map = obj(json!({"s": 1, "b": "x", "i": true, "n": "1", "o": [], "a": {}}));
        let mut args = Args::new(&map);
        assert_eq!(
            args.req_str("s").unwrap_err().to_string(),
            "Invalid parameter type for 's', expected: string"
        );
        assert_eq!(
            args.req_bool("b").unwrap_err().to_string(),
            "Invalid parameter type for 'b', expected: boolean"
        );
        assert_eq!(
            args.req_int("i").unwrap_err().to_string(),
            "Invalid parameter type for 'i', expected: integer"
        );
        assert_eq!(
            args.req_number("n").unwrap_err().to_string(),
            "Invalid parameter type for 'n', expected: number"
        );
        assert_eq!(
            args.req_object("o", |_| Ok(())).unwrap_err().to_string(),
            "Invalid parameter type for 'o', expected: object"
        );
        assert_eq!(
            args.req_list("a", |_| Ok(())).unwrap_err().to_string(),
            "Invalid parameter type for 'a', expected: array"
        );
    }

    #[test]
    fn integer_member_refuses_floats_and_huge_values() {
        let map = obj(json!({"f": 1.5, "big": 18446744073709551615u64}));
        let mut args = Args::new(&map);
        assert_eq!(
            args.req_int("f").unwrap_err().to_string(),
            "Invalid parameter type for 'f', expected: integer"
        );
        assert_eq!(
            args.req_int("big").unwrap_err().to_string(),
            "Invalid parameter type for 'big', expected: integer"
        );
    }

    #[test]
    fn number_member_accepts_integers() {
        let map = obj(json!({"n": 3}));
        assert_eq!(Args::new(&map).req_number("n").unwrap(), 3.0);
    }

    #[test]
    fn uint64_refuses_strings_and_floats_with_expects_uint64() {
        let map = obj(json!({"max-bandwidth": "fast", "x": 1.0}));
        let mut args = Args::new(&map);
        assert_eq!(
            args.req_u64("max-bandwidth").unwrap_err().to_string(),
            "Parameter 'max-bandwidth' expects uint64"
        );
        assert_eq!(
            args.opt_size("x").unwrap_err().to_string(),
            "Parameter 'x' expects uint64"
        );
    }

    #[test]
    fn uint64_wraps_negative_integers_like_qemu() {
        let map = obj(json!({"v": -1}));
        assert_eq!(Args::new(&map).req_u64("v").unwrap(), u64::MAX);
    }

    #[test]
    fn uint64_accepts_its_whole_range() {
        let map = obj(json!({"v": 18446744073709551615u64}));
        assert_eq!(Args::new(&map).req_u64("v").unwrap(), u64::MAX);
    }

    #[test]
    fn uint8_range_edges() {
        let map = obj(json!({"ok": 255, "over": 256, "neg": -1}));
        let mut args = Args::new(&map);
        assert_eq!(args.req_u8("ok").unwrap(), 255);
        assert_eq!(
            args.req_u8("over").unwrap_err().to_string(),
            "Parameter 'over' expects uint8_t"
        );
        assert_eq!(
            args.req_u8("neg").unwrap_err().to_string(),
            "Parameter 'neg' expects uint8_t"
        );
    }

    #[test]
    fn uint16_and_uint32_range_edges() {
        let map = obj(json!({"a": 65535, "b": 65536, "c": 4294967295u64, "d": 4294967296u64}));
        let mut args = Args::new(&map);
        assert_eq!(args.req_u16("a").unwrap(), 65535);
        assert_eq!(
            args.req_u16("b").unwrap_err().to_string(),
            "Parameter 'b' expects uint16_t"
        );
        assert_eq!(args.req_u32("c").unwrap(), u32::MAX);
        assert_eq!(
            args.req_u32("d").unwrap_err().to_string(),
            "Parameter 'd' expects uint32_t"
        );
    }

    #[test]
    fn uint8_range_error_uses_the_bare_name_inside_lists() {
        let map = obj(json!({"l": [{"v": 300}]}));
        let err = Args::new(&map)
            .req_list("l", |a| a.req_u8("v"))
            .unwrap_err();
        assert_eq!(err.to_string(), "Parameter 'v' expects uint8_t");
    }

    #[test]
    fn unknown_enum_value_is_refused_with_bare_name() {
        let map = obj(json!({"caps": [{"capability": "warp-drive"}]}));
        let err = Args::new(&map)
            .req_list("caps", |a| {
                a.req_enum("capability", |s| (s == "xbzrle").then_some(()))
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'capability' does not accept value 'warp-drive'"
        );
    }

    #[test]
    fn enum_of_wrong_type_is_a_string_type_error_with_full_name() {
        let map = obj(json!({"caps": [{"capability": 3}]}));
        let err = Args::new(&map)
            .req_list("caps", |a| a.req_enum("capability", |_| Some(())))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid parameter type for 'caps[0].capability', expected: string"
        );
    }

    #[test]
    fn nested_names_follow_qemu_full_name() {
        let map =
            obj(json!({"capabilities": [{"capability": "a", "state": true}, {"capability": "b"}]}));
        let err = Args::new(&map)
            .req_list("capabilities", |a| {
                let c = a.req_str("capability")?;
                let s = a.req_bool("state")?;
                Ok((c, s))
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'capabilities[1].state' is missing"
        );
    }

    #[test]
    fn list_element_that_is_not_an_object() {
        let map = obj(json!({"capabilities": [{"x": 1}, 7]}));
        let err = Args::new(&map)
            .req_list("capabilities", |a| a.req_int("x"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid parameter type for 'capabilities[1]', expected: object"
        );
    }

    #[test]
    fn unexpected_member_reported_at_finish() {
        let map = obj(json!({"uri": "tcp:1:2", "foo": 1}));
        let mut args = Args::new(&map);
        assert_eq!(args.req_str("uri").unwrap(), "tcp:1:2");
        assert_eq!(
            args.finish().unwrap_err().to_string(),
            "Parameter 'foo' is unexpected"
        );
    }

    #[test]
    fn unexpected_member_in_list_element_has_full_name() {
        let map = obj(json!({"l": [{"a": 1, "zz": 2}]}));
        let err = Args::new(&map)
            .req_list("l", |a| a.req_int("a"))
            .unwrap_err();
        assert_eq!(err.to_string(), "Parameter 'l[0].zz' is unexpected");
    }

    #[test]
    fn unexpected_member_in_nested_object() {
        let map = obj(json!({"t": {"persistent": true, "x": 0}}));
        let err = Args::new(&map)
            .req_object("t", |a| a.opt_bool("persistent"))
            .unwrap_err();
        assert_eq!(err.to_string(), "Parameter 't.x' is unexpected");
    }

    #[test]
    fn every_member_read_finishes_cleanly() {
        let map = obj(json!({"a": "x", "b": null}));
        let mut args = Args::new(&map);
        assert_eq!(args.opt_str("a").unwrap(), Some("x".to_string()));
        assert_eq!(args.opt_str_or_null("b").unwrap(), Some(StrOrNull::Null));
        assert_eq!(args.opt_str("absent").unwrap(), None);
        args.finish().unwrap();
    }

    #[test]
    fn str_or_null_accepts_string_and_null_and_refuses_others_by_bare_name() {
        let map = obj(json!({"s": "creds0", "n": null, "bad": 5}));
        let mut args = Args::new(&map);
        assert_eq!(
            args.opt_str_or_null("s").unwrap(),
            Some(StrOrNull::Str("creds0".into()))
        );
        assert_eq!(args.opt_str_or_null("n").unwrap(), Some(StrOrNull::Null));
        assert_eq!(
            args.opt_str_or_null("bad").unwrap_err().to_string(),
            "Invalid parameter type for 'bad', expected: StrOrNull"
        );
        let map = obj(json!({"l": [{"bad": []}]}));
        let err = Args::new(&map)
            .req_list("l", |a| a.opt_str_or_null("bad"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid parameter type for 'bad', expected: StrOrNull"
        );
    }

    #[test]
    fn null_for_plain_optional_member_is_a_type_error() {
        let map = obj(json!({"b": null}));
        assert_eq!(
            Args::new(&map).opt_bool("b").unwrap_err().to_string(),
            "Invalid parameter type for 'b', expected: boolean"
        );
    }

    #[test]
    fn first_error_in_visit_order_wins_over_unexpected_members() {
        let map = obj(json!({"zzz": 1, "a": "no"}));
        let mut args = Args::new(&map);
        assert_eq!(
            args.opt_u8("a").unwrap_err().to_string(),
            "Parameter 'a' expects uint64"
        );
    }

    #[test]
    fn every_error_has_the_generic_error_class() {
        assert_eq!(QapiError::Missing("x".into()).class(), "GenericError");
    }

    #[test]
    fn str_or_null_serializes_to_its_json_form() {
        assert_eq!(
            serde_json::to_value(StrOrNull::Str("a".into())).unwrap(),
            json!("a")
        );
        assert_eq!(serde_json::to_value(StrOrNull::Null).unwrap(), Value::Null);
        assert_eq!(StrOrNull::Null.to_json(), Value::Null);
        assert_eq!(StrOrNull::Null.into_string_or_empty(), "");
    }
}
