//! JSON text exactly as QEMU's monitor writes it (`qobject/json-writer.c`).
//!
//! QEMU's compact output differs from `serde_json::to_string` in three ways,
//! all reproduced here so that Ferry's wire traffic is byte-for-byte what a
//! QEMU client has seen before:
//! - separators are `": "` and `", "` (`{"return": {}, "id": 1}`);
//! - strings are pure ASCII: everything outside 0x20..0x7E is a `\uXXXX`
//!   escape with upper-case hex, beyond the BMP as a surrogate pair, and
//!   `\b \f \n \r \t` keep their short forms;
//! - object members come out in `QDict` order: QEMU's dictionary is a hash
//!   table of 512 buckets (`tdb_hash` of the key) walked bucket by bucket,
//!   which is why events start with `"timestamp"` and errors with `"id"`.
//!   Two keys in one bucket come out in the reverse of their insertion
//!   order in QEMU; a `serde_json` map does not remember insertion order, so
//!   ties are broken by byte order here (right for the greeting's
//!   `"micro", "minor"`, the only tie in Ferry's own messages).
//!
//! Floating-point numbers are printed like C's `%.17g`, as QEMU does.

use serde_json::{Map, Number, Value};

/// Number of buckets in QEMU's `QDict` (`QDICT_BUCKET_MAX`).
const QDICT_BUCKETS: u32 = 512;

/// The `QDict` bucket of `key`: QEMU's `tdb_hash(key) % QDICT_BUCKET_MAX`.
pub fn qdict_bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    // C's `strlen` stops at the first NUL; so does the hash.
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let mut value = 0x238F_13AFu32.wrapping_mul(len as u32);
    for (i, &byte) in bytes[..len].iter().enumerate() {
        let shift = (i as u32 * 5) % 24;
        value = value.wrapping_add(u32::from(byte) << shift);
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % QDICT_BUCKETS
}

/// The keys of `map` in the order QEMU's `qdict_first()`/`qdict_next()` visit them.
pub fn qdict_order(map: &Map<String, Value>) -> Vec<&str> {
    let mut keys: Vec<(u32, &str)> = map.keys().map(|k| (qdict_bucket(k), k.as_str())).collect();
    keys.sort_unstable();
    keys.into_iter().map(|(_, k)| k).collect()
}

/// Serializes `value` as one line of QEMU-style compact JSON (no trailing newline).
pub fn to_qemu_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

/// Serializes `value` and appends QEMU's line ending `"\r\n"`.
pub fn to_qemu_line(value: &Value) -> String {
    let mut out = to_qemu_json(value);
    out.push_str("\r\n");
    out
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, key) in qdict_order(map).into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_string(out, key);
                out.push_str(": ");
                if let Some(member) = map.get(key) {
                    write_value(out, member);
                }
            }
            out.push('}');
        }
    }
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(i) = n.as_i64() {
        out.push_str(&i.to_string());
    } else if let Some(u) = n.as_u64() {
        out.push_str(&u.to_string());
    } else if let Some(f) = n.as_f64() {
        out.push_str(&format_g17(f));
    } else {
        // Only reachable with serde_json's arbitrary-precision numbers.
        out.push_str(&n.to_string());
    }
}

/// Whether QEMU's `mod_utf8_codepoint()` accepts `cp` (no noncharacters, no surrogates).
pub(crate) fn is_valid_codepoint(cp: u32) -> bool {
    if cp > 0x10FFFF {
        return false;
    }
    if (0xFDD0..=0xFDEF).contains(&cp) || (cp & 0xFFFE) == 0xFFFE {
        return false;
    }
    !(0xD800..=0xDFFF).contains(&cp)
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            _ => {
                let mut cp = u32::from(ch);
                // Multi-byte noncharacters are invalid to QEMU's decoder and
                // come out as the replacement character.
                if cp >= 0x80 && !is_valid_codepoint(cp) {
                    cp = 0xFFFD;
                }
                if cp > 0xFFFF {
                    let v = cp - 0x10000;
                    out.push_str(&format!(
                        "\\u{:04X}\\u{:04X}",
                        0xD800 + (v >> 10),
                        0xDC00 + (v & 0x3FF)
                    ));
                } else if !(0x20..0x7F).contains(&cp) {
                    out.push_str(&format!("\\u{cp:04X}"));
                } else {
                    out.push(ch);
                }
            }
        }
    }
    out.push('"');
}

/// Formats `v` like C's `printf("%.17g", v)`.
pub fn format_g17(v: f64) -> String {
    const PRECISION: i32 = 17;
    if v.is_nan() {
        return if v.is_sign_negative() { "-nan" } else { "nan" }.into();
    }
    if v.is_infinite() {
        return if v < 0.0 { "-inf" } else { "inf" }.into();
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0" } else { "0" }.into();
    }
    // The exponent that style %e would print, after rounding to 17 digits.
    let sci = format!("{:.*e}", (PRECISION - 1) as usize, v);
    let (mantissa, exp) = match sci.split_once('e') {
        Some(parts) => parts,
        None => return sci,
    };
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..PRECISION).contains(&exp) {
        let decimals = (PRECISION - 1 - exp) as usize;
        strip_fraction_zeros(&format!("{v:.decimals$}"))
    } else {
        let mantissa = strip_fraction_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// Drops trailing zeros of a fraction, and the point itself if nothing is left (`%g`).
fn strip_fraction_zeros(s: &str) -> String {
    if !s.contains('.') {
        return s.to_string();
    }
    let trimmed = s.trim_end_matches('0');
    trimmed.trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn greeting_comes_out_in_qemu_member_order() {
        let greeting = json!({"QMP": {"version": {"qemu": {"major": 8, "minor": 1, "micro": 0},
            "package": "v8.1.0"}, "capabilities": ["oob"]}});
        assert_eq!(
            to_qemu_json(&greeting),
            r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 8}, "package": "v8.1.0"}, "capabilities": ["oob"]}}"#
        );
    }

    #[test]
    fn responses_and_events_match_qemu_byte_for_byte() {
        // Texts as QEMU 8.x prints them (iotests reference output, libvirt logs).
        assert_eq!(
            to_qemu_json(&json!({"return": {}, "id": "libvirt-1"})),
            r#"{"return": {}, "id": "libvirt-1"}"#
        );
        assert_eq!(
            to_qemu_json(&json!({"error": {"class": "GenericError", "desc": "x"}, "id": 7})),
            r#"{"id": 7, "error": {"class": "GenericError", "desc": "x"}}"#
        );
        let event = json!({"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"},
            "timestamp": {"seconds": 1, "microseconds": 2}});
        assert_eq!(
            to_qemu_json(&event),
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}"#
        );
    }

    #[test]
    fn strings_are_ascii_with_upper_case_escapes() {
        let s = json!("a\"b\\c/\u{8}\u{c}\n\r\t\u{1}\u{7f}é€😀\u{0}");
        assert_eq!(
            to_qemu_json(&s),
            r#""a\"b\\c/\b\f\n\r\t\u0001\u007F\u00E9\u20AC\uD83D\uDE00\u0000""#
        );
        // Noncharacters are replaced, as QEMU's decoder rejects them.
        assert_eq!(
            to_qemu_json(&json!("\u{FFFE}\u{FDD0}")),
            r#""\uFFFD\uFFFD""#
        );
    }

    #[test]
    fn numbers_print_like_percent_17g() {
        assert_eq!(format_g17(1.0), "1");
        assert_eq!(format_g17(0.1), "0.10000000000000001");
        assert_eq!(format_g17(-2.5), "-2.5");
        assert_eq!(format_g17(1e20), "1e+20");
        assert_eq!(format_g17(1.5e-5), "1.5e-05");
        assert_eq!(format_g17(268.63), "268.63");
        assert_eq!(format_g17(0.0001), "0.0001");
        assert_eq!(format_g17(123456789012345678.0), "1.2345678901234568e+17");
        assert_eq!(format_g17(12345678901234567.0), "12345678901234568");
        assert_eq!(format_g17(-0.0), "-0");
        assert_eq!(
            to_qemu_json(&json!([1, -2, 18446744073709551615u64, 0.5])),
            "[1, -2, 18446744073709551615, 0.5]"
        );
    }

    #[test]
    fn bucket_matches_known_qemu_orderings() {
        // "micro" and "minor" share a bucket; "timestamp" < "event" < "data".
        assert_eq!(qdict_bucket("micro"), qdict_bucket("minor"));
        assert!(qdict_bucket("timestamp") < qdict_bucket("event"));
        assert!(qdict_bucket("event") < qdict_bucket("data"));
        assert!(qdict_bucket("return") < qdict_bucket("id"));
        assert!(qdict_bucket("id") < qdict_bucket("error"));
    }

    #[test]
    fn lines_end_with_crlf() {
        assert_eq!(to_qemu_line(&json!({"return": {}})), "{\"return\": {}}\r\n");
    }
}
