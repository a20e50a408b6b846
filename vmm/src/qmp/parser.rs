//! The JSON parser of QEMU's monitor (`qobject/json-parser.c`): tokens of
//! one message in, a `serde_json::Value` or QEMU's error text out.
//!
//! Every text below is QEMU's `parse_error()` message; the caller prefixes
//! `"JSON parse error, "`. Only the first error of a message is reported.
//! Numbers become `i64` when they fit, else `u64`, else `f64` (QEMU's
//! `QNum` rules). Strings are decoded as QEMU's "modified UTF-8": `\u0000`
//! is allowed, surrogate pairs are combined, and noncharacters, lone
//! surrogates and overlong or malformed byte sequences are refused.

use serde_json::{Map, Number, Value};

use super::lexer::TokenKind;
use super::writer::is_valid_codepoint;

/// A token of a message waiting to be parsed: its kind and where its text
/// lies in the message's text buffer (12 bytes, so 2 Mi tokens stay small).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// What the token is.
    pub kind: TokenKind,
    /// Offset of the token's first byte in the text buffer.
    pub start: u32,
    /// Offset just past the token's last byte.
    pub end: u32,
}

/// Parses one message's tokens (with their text buffer) into a value;
/// `Err` holds QEMU's message text.
pub fn parse_tokens(tokens: &[Token], text: &[u8]) -> Result<Value, String> {
    let mut parser = Parser {
        tokens,
        text,
        pos: 0,
    };
    parser.value()
}

struct Parser<'a> {
    tokens: &'a [Token],
    text: &'a [u8],
    pos: usize,
}

const PREMATURE_EOI: &str = "premature EOI";

impl<'a> Parser<'a> {
    fn text(&self, token: &Token) -> &'a [u8] {
        self.text
            .get(token.start as usize..token.end as usize)
            .unwrap_or_default()
    }

    fn peek(&self) -> Option<&'a Token> {
        self.tokens.get(self.pos)
    }

    fn pop(&mut self) -> Option<&'a Token> {
        let token = self.tokens.get(self.pos);
        if token.is_some() {
            self.pos += 1;
        }
        token
    }

    fn value(&mut self) -> Result<Value, String> {
        let token = self.peek().ok_or(PREMATURE_EOI)?;
        match token.kind {
            TokenKind::LCurly => self.object(),
            TokenKind::LSquare => self.array(),
            TokenKind::Integer | TokenKind::Float | TokenKind::String => self.literal(),
            TokenKind::Keyword => self.keyword(),
            _ => Err("expecting value".into()),
        }
    }

    fn object(&mut self) -> Result<Value, String> {
        self.pop(); // the '{'
        let mut map = Map::new();
        let peek = self.peek().ok_or(PREMATURE_EOI)?;
        if peek.kind == TokenKind::RCurly {
            self.pop();
            return Ok(Value::Object(map));
        }
        self.pair(&mut map)?;
        loop {
            let token = self.pop().ok_or(PREMATURE_EOI)?;
            match token.kind {
                TokenKind::RCurly => return Ok(Value::Object(map)),
                TokenKind::Comma => self.pair(&mut map)?,
                _ => return Err("expected separator in dict".into()),
            }
        }
    }

    fn pair(&mut self, map: &mut Map<String, Value>) -> Result<(), String> {
        if self.peek().is_none() {
            return Err(PREMATURE_EOI.into());
        }
        let key = match self.value()? {
            Value::String(key) => key,
            _ => return Err("key is not a string in object".into()),
        };
        let colon = self.pop().ok_or(PREMATURE_EOI)?;
        if colon.kind != TokenKind::Colon {
            return Err("missing : in object pair".into());
        }
        let value = self.value()?;
        if map.contains_key(&key) {
            return Err("duplicate key".into());
        }
        map.insert(key, value);
        Ok(())
    }

    fn array(&mut self) -> Result<Value, String> {
        self.pop(); // the '['
        let mut items = Vec::new();
        let peek = self.peek().ok_or(PREMATURE_EOI)?;
        if peek.kind == TokenKind::RSquare {
            self.pop();
            return Ok(Value::Array(items));
        }
        items.push(self.value()?);
        loop {
            let token = self.pop().ok_or(PREMATURE_EOI)?;
            match token.kind {
                TokenKind::RSquare => return Ok(Value::Array(items)),
                TokenKind::Comma => items.push(self.value()?),
                _ => return Err("expected separator in list".into()),
            }
        }
    }

    fn keyword(&mut self) -> Result<Value, String> {
        let token = self.pop().ok_or(PREMATURE_EOI)?;
        match self.text(token) {
            b"true" => Ok(Value::Bool(true)),
            b"false" => Ok(Value::Bool(false)),
            b"null" => Ok(Value::Null),
            other => Err(format!("invalid keyword '{}'", c_text(other))),
        }
    }

    fn literal(&mut self) -> Result<Value, String> {
        let token = self.pop().ok_or(PREMATURE_EOI)?;
        match token.kind {
            TokenKind::String => parse_string(self.text(token)).map(Value::String),
            _ => parse_number(self.text(token), token.kind == TokenKind::Integer),
        }
    }
}

/// Text as C's `%s` prints it: up to the first NUL, invalid UTF-8 replaced.
pub(crate) fn c_text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn parse_number(text: &[u8], integer: bool) -> Result<Value, String> {
    // The lexer only lets ASCII digits, signs, '.', 'e' and 'E' through.
    let text = std::str::from_utf8(text).map_err(|_| "expecting value".to_string())?;
    if integer {
        if let Ok(i) = text.parse::<i64>() {
            return Ok(Value::Number(i.into()));
        }
        if !text.starts_with('-') {
            if let Ok(u) = text.parse::<u64>() {
                return Ok(Value::Number(u.into()));
            }
        }
    }
    let f: f64 = text.parse().map_err(|_| "expecting value".to_string())?;
    // QEMU would keep an infinity (and later print "inf", which is not
    // JSON); a serde_json number cannot hold one, so refuse it here.
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| format!("number {text} is out of range"))
}

/// Four hex digits at `s`, QEMU's `cvt4hex()`: `None` if any is missing or not hex.
fn hex4(s: &[u8]) -> Option<u32> {
    if s.len() < 4 {
        return None;
    }
    let mut cp = 0;
    for &b in &s[..4] {
        cp = (cp << 4) | char::from(b).to_digit(16)?;
    }
    Some(cp)
}

/// Decodes one modified-UTF-8 sequence at the start of `s` (QEMU's
/// `mod_utf8_codepoint()`): the code point (if valid) and the length consumed.
fn mod_utf8_codepoint(s: &[u8]) -> (Option<u32>, usize) {
    let Some(&first) = s.first() else {
        return (None, 0);
    };
    if first == 0 {
        return (None, 0);
    }
    if first < 0x80 {
        return (Some(u32::from(first)), 1);
    }
    if first >= 0xFE || first & 0x40 == 0 {
        // Impossible byte, or a continuation byte where a sequence should start.
        return (None, 1);
    }
    let len = first.leading_ones() as usize; // 2..=6
    let mut cp = u32::from(first) & (0x7F >> len);
    for i in 1..len {
        match s.get(i) {
            Some(&b) if b & 0xC0 == 0x80 => cp = (cp << 6) | u32::from(b & 0x3F),
            _ => return (None, i),
        }
    }
    const MIN_CP: [u32; 5] = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];
    let overlong = cp < MIN_CP[len - 2] && !(cp == 0 && len == 2);
    if !is_valid_codepoint(cp) || overlong {
        return (None, len);
    }
    (Some(cp), len)
}

/// Decodes a string token (quotes included), QEMU's `parse_string()`.
fn parse_string(token: &[u8]) -> Result<String, String> {
    let (&quote, body) = token.split_first().ok_or("premature EOI")?;
    let mut out = String::new();
    let mut i = 0;
    loop {
        let Some(&b) = body.get(i) else {
            // The lexer only hands out terminated strings.
            return Err("premature EOI".into());
        };
        if b == quote {
            return Ok(out);
        }
        // Fast path: a run of plain ASCII is copied as it is.
        let run = body[i..]
            .iter()
            .position(|&c| c == quote || c == b'\\' || !(0x01..0x80).contains(&c))
            .unwrap_or(body.len() - i);
        if run > 0 {
            if let Ok(ascii) = std::str::from_utf8(&body[i..i + run]) {
                out.push_str(ascii);
            }
            i += run;
            continue;
        }
        if b == b'\\' {
            let start = i;
            let Some(&esc) = body.get(i + 1) else {
                return Err("invalid escape sequence in string".into());
            };
            i += 2;
            let simple = match esc {
                b'"' => Some('"'),
                b'\'' => Some('\''),
                b'\\' => Some('\\'),
                b'/' => Some('/'),
                b'b' => Some('\u{8}'),
                b'f' => Some('\u{c}'),
                b'n' => Some('\n'),
                b'r' => Some('\r'),
                b't' => Some('\t'),
                b'u' => None,
                _ => return Err("invalid escape sequence in string".into()),
            };
            if let Some(ch) = simple {
                out.push(ch);
                continue;
            }
            let mut cp = hex4(&body[i.min(body.len())..]);
            i += 4;
            if let Some(lead @ 0xD800..=0xDBFF) = cp {
                if body.get(i) == Some(&b'\\') && body.get(i + 1) == Some(&b'u') {
                    cp = match hex4(&body[(i + 2).min(body.len())..]) {
                        Some(trail @ 0xDC00..=0xDFFF) => {
                            i += 6;
                            Some(0x10000 + ((lead & 0x3FF) << 10) + (trail & 0x3FF))
                        }
                        _ => None,
                    };
                }
            }
            match cp
                .filter(|&cp| is_valid_codepoint(cp))
                .and_then(char::from_u32)
            {
                Some(ch) => out.push(ch),
                None => {
                    let shown = &body[start..i.min(body.len())];
                    return Err(format!(
                        "{} is not a valid Unicode character",
                        c_text(shown)
                    ));
                }
            }
            continue;
        }
        match mod_utf8_codepoint(&body[i..]) {
            (Some(cp), len) => {
                // Valid code points exclude surrogates, so this always succeeds.
                out.push(char::from_u32(cp).unwrap_or('\u{FFFD}'));
                i += len;
            }
            (None, _) => return Err("invalid UTF-8 sequence in string".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::lexer::Lexer;
    use serde_json::json;

    fn parse(input: &[u8]) -> Result<Value, String> {
        let mut tokens = Vec::new();
        let mut text = Vec::new();
        let mut push = |kind, t: &[u8]| {
            if kind != TokenKind::EndOfInput {
                let start = text.len() as u32;
                text.extend_from_slice(t);
                tokens.push(Token {
                    kind,
                    start,
                    end: text.len() as u32,
                });
            }
        };
        let mut lexer = Lexer::default();
        lexer.feed(input, &mut push);
        lexer.flush(&mut push);
        parse_tokens(&tokens, &text)
    }

    #[test]
    fn values_parse_like_qemu() {
        assert_eq!(
            parse(br#"{"a": [1, -2, 2.5, true, false, null, 'x"y', "\u00e9\ud83d\ude00\u0000"]}"#)
                .unwrap(),
            json!({"a": [1, -2, 2.5, true, false, null, "x\"y", "é😀\u{0}"]})
        );
        assert_eq!(
            parse(b"18446744073709551615").unwrap(),
            json!(18446744073709551615u64)
        );
        assert_eq!(
            parse(b"-9223372036854775809").unwrap(),
            json!(-9223372036854775809.0)
        );
        assert_eq!(parse(b"{}").unwrap(), json!({}));
        assert_eq!(parse(b"[]").unwrap(), json!([]));
        assert_eq!(parse("\"ü\\/\\'\"".as_bytes()).unwrap(), json!("ü/'"));
    }

    #[test]
    fn syntax_errors_use_qemu_texts() {
        let cases: &[(&[u8], &str)] = &[
            (b"{\"a\" 1}", "missing : in object pair"),
            (b"{1: 2}", "key is not a string in object"),
            (b"{\"a\": 1 \"b\": 2}", "expected separator in dict"),
            (b"[1 2]", "expected separator in list"),
            (b"[1,]", "expecting value"),
            (b"{\"a\": 1,}", "expecting value"),
            (b"{\"a\": 1, \"a\": 2}", "duplicate key"),
            (b"nul", "invalid keyword 'nul'"),
            (b"{\"a\":", "premature EOI"),
            (b"[", "premature EOI"),
            (b"}", "expecting value"),
            (b"\"\\x\"", "invalid escape sequence in string"),
            (b"\"\\ud800\"", "\\ud800 is not a valid Unicode character"),
            (
                b"\"\\ud800\\u0041\"",
                "\\ud800 is not a valid Unicode character",
            ),
            (b"\"\\uFFFF\"", "\\uFFFF is not a valid Unicode character"),
            (b"\"\\u12\"", "\\u12\" is not a valid Unicode character"),
            (b"\"\xC3\"", "invalid UTF-8 sequence in string"),
            (b"\"\xE0\x80\xAF\"", "invalid UTF-8 sequence in string"),
            (b"\"\xED\xA0\x80\"", "invalid UTF-8 sequence in string"),
            (b"1e999", "number 1e999 is out of range"),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse(input),
                Err(want.to_string()),
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn overlong_nul_is_accepted_as_modified_utf8() {
        assert_eq!(parse(b"\"a\xC0\x80b\"").unwrap(), json!("a\u{0}b"));
    }

    #[test]
    fn first_error_wins() {
        // The key's own error is reported, not "key is not a string in object".
        assert_eq!(parse(b"{nope: 1}"), Err("invalid keyword 'nope'".into()));
    }
}
