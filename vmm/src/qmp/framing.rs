//! Splitting a byte stream into JSON messages, QEMU's `json-streamer.c`.
//!
//! Bytes arrive in arbitrary chunks; [`JsonStreamer::feed`] returns every
//! top-level JSON value completed so far, or QEMU's error for it. A message
//! ends when its braces and brackets balance (a scalar is a message on its
//! own), so objects may be split across reads, several may share a read,
//! and whitespace or newlines between them do not matter.
//!
//! Limits, as QEMU has them (all per message):
//! - [`MAX_TOKEN_SIZE`]: 64 MiB of token text (also the longest single token),
//! - [`MAX_TOKEN_COUNT`]: 2 Mi tokens,
//! - [`MAX_NESTING`]: 1024 open braces plus brackets.
//!
//! Crossing one yields an error and the message in progress is dropped, so
//! memory per client is bounded. A lexical error (`JSON parse error, stray
//! '...'`) also drops the message in progress; the lexer then skips to the
//! next structural character or control character (see [`super::lexer`]),
//! so garbage is followed by a working session without reconnecting.
//!
//! Like QEMU, after an error the rest of a broken message is lexed afresh
//! and may yield further errors (a stray `}` is "expecting value").

use serde_json::Value;
use thiserror::Error;

use super::lexer::{Lexer, TokenKind};
use super::parser::{c_text, parse_tokens, Token};

pub use super::lexer::MAX_TOKEN_SIZE;

/// QEMU's limit on tokens per message (`MAX_TOKEN_COUNT`), 2 Mi.
pub const MAX_TOKEN_COUNT: usize = 2 << 20;

/// QEMU's limit on open braces plus brackets (`MAX_NESTING`), 1024.
pub const MAX_NESTING: usize = 1 << 10;

/// Why input did not yield a message; `Display` is QEMU's `desc` text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FramingError {
    /// A byte that cannot start or continue a token (`stray '...'` holds the text lexed so far).
    #[error("JSON parse error, stray '{0}'")]
    Stray(String),
    /// The tokens do not form a JSON value (QEMU's parser message).
    #[error("JSON parse error, {0}")]
    Syntax(String),
    /// The message's tokens exceed [`Limits::max_token_size`] bytes.
    #[error("JSON token size limit exceeded")]
    TokenSize,
    /// The message has more than [`Limits::max_token_count`] tokens.
    #[error("JSON token count limit exceeded")]
    TokenCount,
    /// The message nests deeper than [`Limits::max_nesting`].
    #[error("JSON nesting depth limit exceeded")]
    Nesting,
}

/// Per-message limits; [`Limits::default`] is QEMU's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes of token text in one message (and in one token).
    pub max_token_size: usize,
    /// Most tokens in one message.
    pub max_token_count: usize,
    /// Most open braces plus brackets.
    pub max_nesting: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_token_size: MAX_TOKEN_SIZE,
            max_token_count: MAX_TOKEN_COUNT,
            max_nesting: MAX_NESTING,
        }
    }
}

/// The message splitter: state carried between chunks of one connection.
#[derive(Debug)]
pub struct JsonStreamer {
    lexer: Lexer,
    limits: Limits,
    tokens: Vec<Token>,
    /// The text of all tokens of the message, back to back.
    text: Vec<u8>,
    braces: i64,
    brackets: i64,
}

impl Default for JsonStreamer {
    fn default() -> Self {
        JsonStreamer::new(Limits::default())
    }
}

/// One completed message or the error that took its place.
pub type Message = Result<Value, FramingError>;

impl JsonStreamer {
    /// A streamer with the given limits (token text is capped below 4 GiB).
    pub fn new(limits: Limits) -> JsonStreamer {
        let limits = Limits {
            max_token_size: limits.max_token_size.min(u32::MAX as usize - 1),
            ..limits
        };
        JsonStreamer {
            lexer: Lexer::new(limits.max_token_size),
            limits,
            tokens: Vec::new(),
            text: Vec::new(),
            braces: 0,
            brackets: 0,
        }
    }

    /// Feeds a chunk of input; returns the messages (and errors) it completed, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        let mut lexer = std::mem::take(&mut self.lexer);
        lexer.feed(bytes, &mut |kind, text| self.process(kind, text, &mut out));
        self.lexer = lexer;
        out
    }

    /// Ends the input: a trailing scalar is completed, a partial message is a syntax error.
    pub fn flush(&mut self) -> Vec<Message> {
        let mut out = Vec::new();
        let mut lexer = std::mem::take(&mut self.lexer);
        lexer.flush(&mut |kind, text| self.process(kind, text, &mut out));
        self.lexer = lexer;
        out
    }

    /// Bytes buffered for the message in progress (tokens plus the token being lexed).
    pub fn buffered(&self) -> usize {
        self.text.len() + self.lexer.pending_len()
    }

    fn reset(&mut self) {
        self.tokens.clear();
        self.text.clear();
        // Give back the memory of a huge message; keep it for ordinary ones.
        if self.text.capacity() > 1 << 20 || self.tokens.capacity() > 1 << 16 {
            self.tokens = Vec::new();
            self.text = Vec::new();
        }
        self.braces = 0;
        self.brackets = 0;
    }

    fn fail(&mut self, err: FramingError, out: &mut Vec<Message>) {
        self.reset();
        out.push(Err(err));
    }

    fn process(&mut self, kind: TokenKind, text: &[u8], out: &mut Vec<Message>) {
        match kind {
            TokenKind::LCurly => self.braces += 1,
            TokenKind::RCurly => self.braces -= 1,
            TokenKind::LSquare => self.brackets += 1,
            TokenKind::RSquare => self.brackets -= 1,
            TokenKind::Error => return self.fail(FramingError::Stray(c_text(text)), out),
            TokenKind::EndOfInput => {
                if !self.tokens.is_empty() {
                    let result =
                        parse_tokens(&self.tokens, &self.text).map_err(FramingError::Syntax);
                    self.reset();
                    out.push(result);
                }
                return;
            }
            _ => {}
        }
        // Security limits: memory per message and recursion depth of the parser.
        if self.text.len() + text.len() + 1 > self.limits.max_token_size
            || kind == TokenKind::Oversized
        {
            return self.fail(FramingError::TokenSize, out);
        }
        if self.tokens.len() + 1 > self.limits.max_token_count {
            return self.fail(FramingError::TokenCount, out);
        }
        let depth = (self.braces + self.brackets).max(0) as usize;
        if depth > self.limits.max_nesting {
            return self.fail(FramingError::Nesting, out);
        }
        // Fits in u32: the text is capped by max_token_size above.
        let start = self.text.len() as u32;
        self.text.extend_from_slice(text);
        self.tokens.push(Token {
            kind,
            start,
            end: self.text.len() as u32,
        });
        let open = self.braces > 0 || self.brackets > 0;
        if open && self.braces >= 0 && self.brackets >= 0 {
            return;
        }
        let result = parse_tokens(&self.tokens, &self.text).map_err(FramingError::Syntax);
        self.reset();
        out.push(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn feed_all(streamer: &mut JsonStreamer, input: &[u8]) -> Vec<Message> {
        streamer.feed(input)
    }

    const REQUEST: &str =
        r#"{"execute": "query-status", "arguments": {"s": "a{b}[c]\"d\\"}, "id": [1, {"x": "}"}]}"#;

    #[test]
    fn split_at_every_byte_boundary_yields_the_same_message() {
        let want = serde_json::from_str::<Value>(REQUEST).unwrap();
        let bytes = REQUEST.as_bytes();
        for cut in 0..=bytes.len() {
            let mut s = JsonStreamer::default();
            let mut got = s.feed(&bytes[..cut]);
            got.extend(s.feed(&bytes[cut..]));
            assert_eq!(got, vec![Ok(want.clone())], "cut at {cut}");
        }
        // And one byte at a time.
        let mut s = JsonStreamer::default();
        let mut got = Vec::new();
        for b in bytes {
            got.extend(s.feed(std::slice::from_ref(b)));
        }
        assert_eq!(got, vec![Ok(want)]);
    }

    #[test]
    fn several_messages_in_one_chunk_with_whitespace_between() {
        let mut s = JsonStreamer::default();
        let got = feed_all(&mut s, b" {\"a\": 1}\r\n\t{\"b\": [2]}{}\n[3] 4 ");
        assert_eq!(
            got,
            vec![
                Ok(json!({"a": 1})),
                Ok(json!({"b": [2]})),
                Ok(json!({})),
                Ok(json!([3])),
                Ok(json!(4))
            ]
        );
    }

    #[test]
    fn trailing_number_waits_for_its_end() {
        let mut s = JsonStreamer::default();
        assert!(s.feed(b"12").is_empty());
        assert_eq!(s.feed(b"3\n"), vec![Ok(json!(123))]);
    }

    #[test]
    fn garbage_then_a_good_request_recovers() {
        let mut s = JsonStreamer::default();
        let got = s.feed(b"@@@ hello world\n{\"execute\": \"x\"}");
        assert_eq!(
            got,
            vec![
                Err(FramingError::Stray("@".into())),
                Ok(json!({"execute": "x"}))
            ]
        );
        assert_eq!(
            got[0].clone().unwrap_err().to_string(),
            "JSON parse error, stray '@'"
        );
    }

    #[test]
    fn stray_byte_inside_an_object_drops_it_and_recovers_at_the_next_line() {
        let mut s = JsonStreamer::default();
        let got = s.feed(b"{\"execute\": @oops\n{\"execute\": \"y\"}");
        assert_eq!(
            got,
            vec![
                Err(FramingError::Stray("@".into())),
                Ok(json!({"execute": "y"}))
            ]
        );
    }

    #[test]
    fn stray_close_brace_is_expecting_value() {
        let mut s = JsonStreamer::default();
        let got = s.feed(b"{\"a\": 1}}");
        assert_eq!(
            got,
            vec![
                Ok(json!({"a": 1})),
                Err(FramingError::Syntax("expecting value".into()))
            ]
        );
        assert_eq!(
            got[1].clone().unwrap_err().to_string(),
            "JSON parse error, expecting value"
        );
    }

    #[test]
    fn ff_byte_forces_a_reset_mid_string() {
        let mut s = JsonStreamer::default();
        let got = s.feed(b"{\"execute\": \"abc\xff{\"execute\": \"z\"}");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], Err(FramingError::Stray("\"abc\u{FFFD}".into())));
        assert_eq!(got[1], Ok(json!({"execute": "z"})));
    }

    #[test]
    fn nesting_beyond_1024_is_refused() {
        let mut s = JsonStreamer::default();
        let ok = format!("{}{}", "[".repeat(MAX_NESTING), "]".repeat(MAX_NESTING));
        assert_eq!(s.feed(ok.as_bytes()).len(), 1);
        let deep = "[".repeat(MAX_NESTING + 1);
        let got = s.feed(deep.as_bytes());
        assert_eq!(got, vec![Err(FramingError::Nesting)]);
        assert_eq!(
            got[0].clone().unwrap_err().to_string(),
            "JSON nesting depth limit exceeded"
        );
        // The streamer restarts after the error and keeps memory bounded.
        assert!(s.buffered() < 16);
    }

    #[test]
    fn too_big_message_is_refused_with_bounded_memory() {
        let limits = Limits {
            max_token_size: 1024,
            ..Limits::default()
        };
        let mut s = JsonStreamer::new(limits);
        let mut errors = 0;
        // A 100 KiB string inside an object, fed in chunks.
        let mut got = s.feed(b"{\"execute\": \"");
        for _ in 0..100 {
            got.extend(s.feed(&[b'a'; 1024]));
            assert!(s.buffered() <= 2 * 1024 + 64);
        }
        for m in &got {
            if m == &Err(FramingError::TokenSize) {
                errors += 1;
            }
        }
        assert!(errors >= 1);
        assert_eq!(got[0], Err(FramingError::TokenSize));
        assert_eq!(
            FramingError::TokenSize.to_string(),
            "JSON token size limit exceeded"
        );
    }

    #[test]
    fn too_many_tokens_are_refused() {
        let limits = Limits {
            max_token_count: 10,
            ..Limits::default()
        };
        let mut s = JsonStreamer::new(limits);
        let got = s.feed(b"[1,2,3,4,5,6,7,8]");
        assert_eq!(got[0], Err(FramingError::TokenCount));
        assert_eq!(
            FramingError::TokenCount.to_string(),
            "JSON token count limit exceeded"
        );
    }

    #[test]
    fn flush_parses_a_partial_message_as_premature_eoi() {
        let mut s = JsonStreamer::default();
        assert!(s.feed(b"{\"a\": [1").is_empty());
        assert_eq!(
            s.flush(),
            vec![Err(FramingError::Syntax("premature EOI".into()))]
        );
        assert!(s.flush().is_empty());
    }
}
