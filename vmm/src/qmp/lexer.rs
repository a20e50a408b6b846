//! The JSON lexer of QEMU's monitor (`qobject/json-lexer.c`), byte by byte.
//!
//! Bytes arrive in arbitrary chunks; the lexer keeps its state between
//! chunks and hands complete tokens to a sink. It accepts what QEMU accepts
//! (RFC 8259 plus single-quoted strings and `\'`), leaving the decoding of
//! strings, numbers and keywords to the parser.
//!
//! Error recovery works like QEMU's: an impossible byte produces one
//! [`TokenKind::Error`] token holding the text lexed so far (including the
//! offending byte); then the lexer skips input until a byte that is a
//! promising point to start over: a structural character (`{ } [ ] : ,`),
//! an ASCII control character other than tab (newlines!), or one of the
//! impossible UTF-8 bytes 0xFE/0xFF. That byte is then lexed afresh. A
//! client can therefore always resynchronize by sending a newline or 0xFF.
//!
//! A single token longer than [`MAX_TOKEN_SIZE`] is cut off and handed to
//! the sink as [`TokenKind::Oversized`]; the lexer restarts with the next
//! byte.

/// QEMU's limit on one token's length (`MAX_TOKEN_SIZE` in json-lexer.c), 64 MiB.
pub const MAX_TOKEN_SIZE: usize = 64 << 20;

/// What a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// `{`
    LCurly,
    /// `}`
    RCurly,
    /// `[`
    LSquare,
    /// `]`
    RSquare,
    /// `:`
    Colon,
    /// `,`
    Comma,
    /// An integer such as `-12`.
    Integer,
    /// A number with a fraction or an exponent.
    Float,
    /// A run of lower-case letters (`true`, `false`, `null`, or garbage the parser rejects).
    Keyword,
    /// A complete string token, quotes included, escapes not yet decoded.
    String,
    /// A lexical error: the text lexed so far, offending byte included.
    Error,
    /// A token cut off at [`MAX_TOKEN_SIZE`].
    Oversized,
    /// End of input (only from [`Lexer::flush`]).
    EndOfInput,
}

/// Lexer states (QEMU's `json_lexer_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    Sign,
    Digits,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// What one byte does to the lexer in a given state.
enum Step {
    /// The byte belongs to the current token; go to the state.
    Consume(State),
    /// The byte completes a token of this kind.
    Finish(TokenKind),
    /// The current token ended just before this byte; emit it, then lex the byte again.
    FinishBefore(TokenKind),
    /// Whitespace between tokens.
    Skip,
    /// The byte cannot occur here.
    Fail,
    /// Recovery skips this byte.
    Discard,
    /// Recovery ends before this byte; lex it again from the start state.
    Resync,
}

fn step(state: State, b: u8) -> Step {
    use State::*;
    match state {
        Start => match b {
            b'"' => Step::Consume(DqString),
            b'\'' => Step::Consume(SqString),
            b'0' => Step::Consume(Zero),
            b'1'..=b'9' => Step::Consume(Digits),
            b'-' => Step::Consume(Sign),
            b'{' => Step::Finish(TokenKind::LCurly),
            b'}' => Step::Finish(TokenKind::RCurly),
            b'[' => Step::Finish(TokenKind::LSquare),
            b']' => Step::Finish(TokenKind::RSquare),
            b',' => Step::Finish(TokenKind::Comma),
            b':' => Step::Finish(TokenKind::Colon),
            b'a'..=b'z' => Step::Consume(Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Step::Skip,
            _ => Step::Fail,
        },
        Recovery => match b {
            b'\t' => Step::Discard,
            0..=0x1F | 0xFE | 0xFF => Step::Resync,
            b'[' | b']' | b'{' | b'}' | b':' | b',' => Step::Resync,
            _ => Step::Discard,
        },
        DqString | SqString => {
            let quote = if state == DqString { b'"' } else { b'\'' };
            match b {
                b'\\' => Step::Consume(if state == DqString {
                    DqEscape
                } else {
                    SqEscape
                }),
                _ if b == quote => Step::Finish(TokenKind::String),
                0x20..=0xFD => Step::Consume(state),
                _ => Step::Fail,
            }
        }
        DqEscape | SqEscape => match b {
            0x20..=0xFD => Step::Consume(if state == DqEscape {
                DqString
            } else {
                SqString
            }),
            _ => Step::Fail,
        },
        Zero => match b {
            b'0'..=b'9' => Step::Fail,
            b'.' => Step::Consume(Mantissa),
            _ => Step::FinishBefore(TokenKind::Integer),
        },
        Sign => match b {
            b'0' => Step::Consume(Zero),
            b'1'..=b'9' => Step::Consume(Digits),
            _ => Step::Fail,
        },
        Digits => match b {
            b'0'..=b'9' => Step::Consume(Digits),
            b'e' | b'E' => Step::Consume(ExpE),
            b'.' => Step::Consume(Mantissa),
            _ => Step::FinishBefore(TokenKind::Integer),
        },
        Mantissa => match b {
            b'0'..=b'9' => Step::Consume(MantissaDigits),
            _ => Step::Fail,
        },
        MantissaDigits => match b {
            b'0'..=b'9' => Step::Consume(MantissaDigits),
            b'e' | b'E' => Step::Consume(ExpE),
            _ => Step::FinishBefore(TokenKind::Float),
        },
        ExpE => match b {
            b'-' | b'+' => Step::Consume(ExpSign),
            b'0'..=b'9' => Step::Consume(ExpDigits),
            _ => Step::Fail,
        },
        ExpSign => match b {
            b'0'..=b'9' => Step::Consume(ExpDigits),
            _ => Step::Fail,
        },
        ExpDigits => match b {
            b'0'..=b'9' => Step::Consume(ExpDigits),
            _ => Step::FinishBefore(TokenKind::Float),
        },
        Keyword => match b {
            b'a'..=b'z' => Step::Consume(Keyword),
            _ => Step::FinishBefore(TokenKind::Keyword),
        },
    }
}

/// The streaming lexer; tokens go to the closure given to [`Lexer::feed`].
#[derive(Debug)]
pub struct Lexer {
    state: State,
    token: Vec<u8>,
    max_token_size: usize,
}

impl Default for Lexer {
    fn default() -> Self {
        Lexer::new(MAX_TOKEN_SIZE)
    }
}

impl Lexer {
    /// A lexer that cuts tokens off beyond `max_token_size` bytes.
    pub fn new(max_token_size: usize) -> Lexer {
        Lexer {
            state: State::Start,
            token: Vec::new(),
            max_token_size,
        }
    }

    /// Lexes `bytes`, calling `sink(kind, text)` for every token completed.
    pub fn feed(&mut self, bytes: &[u8], sink: &mut impl FnMut(TokenKind, &[u8])) {
        let mut i = 0;
        while i < bytes.len() {
            let run = self.plain_run(&bytes[i..]);
            if run > 0 {
                i += run;
                continue;
            }
            self.feed_byte(bytes[i], sink);
            i += 1;
        }
    }

    /// Fast path with the same effect as feeding byte by byte: consumes the
    /// leading bytes that leave the state unchanged inside a string or during
    /// recovery, and returns how many. Stops before the byte that would make
    /// the token oversized, so [`Lexer::feed_byte`] reports that.
    fn plain_run(&mut self, bytes: &[u8]) -> usize {
        match self.state {
            State::DqString | State::SqString => {
                let quote = if self.state == State::DqString {
                    b'"'
                } else {
                    b'\''
                };
                let room = self.max_token_size.saturating_sub(self.token.len());
                let limit = bytes.len().min(room);
                let n = bytes[..limit]
                    .iter()
                    .position(|&b| b == quote || b == b'\\' || !(0x20..=0xFD).contains(&b))
                    .unwrap_or(limit);
                self.token.extend_from_slice(&bytes[..n]);
                n
            }
            State::Recovery => bytes
                .iter()
                .position(|&b| !matches!(step(State::Recovery, b), Step::Discard))
                .unwrap_or(bytes.len()),
            _ => 0,
        }
    }

    fn feed_byte(&mut self, b: u8, sink: &mut impl FnMut(TokenKind, &[u8])) {
        loop {
            match step(self.state, b) {
                Step::Consume(next) => {
                    self.token.push(b);
                    self.state = next;
                }
                Step::Finish(kind) => {
                    self.token.push(b);
                    self.emit(kind, sink);
                }
                Step::FinishBefore(kind) => {
                    self.emit(kind, sink);
                    continue;
                }
                Step::Skip => {}
                Step::Fail => {
                    self.token.push(b);
                    sink(TokenKind::Error, &self.token);
                    self.token.clear();
                    self.state = State::Recovery;
                }
                Step::Discard => {}
                Step::Resync => {
                    self.state = State::Start;
                    continue;
                }
            }
            break;
        }
        if self.token.len() > self.max_token_size {
            sink(TokenKind::Oversized, &self.token);
            self.token.clear();
            self.token.shrink_to_fit();
            self.state = State::Start;
        }
    }

    fn emit(&mut self, kind: TokenKind, sink: &mut impl FnMut(TokenKind, &[u8])) {
        sink(kind, &self.token);
        self.token.clear();
        self.state = State::Start;
    }

    /// Ends the input: finishes a pending number or keyword, reports an
    /// unterminated token as an error, then signals [`TokenKind::EndOfInput`].
    pub fn flush(&mut self, sink: &mut impl FnMut(TokenKind, &[u8])) {
        match self.state {
            State::Start | State::Recovery => {}
            State::Zero | State::Digits => self.emit(TokenKind::Integer, sink),
            State::MantissaDigits | State::ExpDigits => self.emit(TokenKind::Float, sink),
            State::Keyword => self.emit(TokenKind::Keyword, sink),
            _ => {
                sink(TokenKind::Error, &self.token);
                self.token.clear();
            }
        }
        self.state = State::Start;
        sink(TokenKind::EndOfInput, &[]);
    }

    /// Bytes held for the token being lexed.
    pub fn pending_len(&self) -> usize {
        self.token.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lex(input: &[u8]) -> Vec<(TokenKind, String)> {
        let mut lexer = Lexer::default();
        let mut out = Vec::new();
        lexer.feed(input, &mut |k, t| {
            out.push((k, String::from_utf8_lossy(t).into_owned()))
        });
        out
    }

    #[test]
    fn tokens_of_a_request() {
        use TokenKind::*;
        let toks = lex(br#"{"execute": 'x', "n": [-1, 2.5e+3, 0]} true "#);
        let kinds: Vec<TokenKind> = toks.iter().map(|t| t.0).collect();
        assert_eq!(
            kinds,
            vec![
                LCurly, String, Colon, String, Comma, String, Colon, LSquare, Integer, Comma,
                Float, Comma, Integer, RSquare, RCurly, Keyword
            ]
        );
        assert_eq!(toks[3].1, "'x'");
        assert_eq!(toks[8].1, "-1");
        assert_eq!(toks[10].1, "2.5e+3");
    }

    #[test]
    fn stray_byte_is_an_error_token_with_the_text_so_far() {
        let toks = lex(b"-x");
        assert_eq!(toks, vec![(TokenKind::Error, "-x".into())]);
        let toks = lex(b"01");
        assert_eq!(toks, vec![(TokenKind::Error, "01".into())]);
    }

    #[test]
    fn recovery_skips_to_a_structural_character_or_newline() {
        use TokenKind::*;
        let toks = lex(b"@garbage \"more {}\n7 ");
        let kinds: Vec<TokenKind> = toks.iter().map(|t| t.0).collect();
        // '@' fails, everything up to '{' is skipped, then lexing resumes.
        assert_eq!(kinds, vec![Error, LCurly, RCurly, Integer]);
    }

    #[test]
    fn control_characters_inside_strings_are_errors() {
        let toks = lex(b"\"ab\ncd\"");
        assert_eq!(toks[0], (TokenKind::Error, "\"ab\n".into()));
    }

    #[test]
    fn flush_finishes_a_trailing_number_and_reports_a_cut_string() {
        let mut lexer = Lexer::default();
        let mut out = Vec::new();
        let mut sink = |k: TokenKind, t: &[u8]| out.push((k, t.to_vec()));
        lexer.feed(b"42", &mut sink);
        lexer.flush(&mut sink);
        lexer.feed(b"\"abc", &mut sink);
        lexer.flush(&mut sink);
        assert_eq!(
            out,
            vec![
                (TokenKind::Integer, b"42".to_vec()),
                (TokenKind::EndOfInput, vec![]),
                (TokenKind::Error, b"\"abc".to_vec()),
                (TokenKind::EndOfInput, vec![]),
            ]
        );
    }

    #[test]
    fn chunked_and_byte_by_byte_lexing_agree() {
        let input: &[u8] =
            b"{\"a\": \"xy\\\"z\x01q\", 'p\\'q'} @junk junk\t{[\xff\"long string here\"]}";
        for max in [4, 8, 64, MAX_TOKEN_SIZE] {
            let mut whole = Vec::new();
            Lexer::new(max).feed(input, &mut |k, t| whole.push((k, t.to_vec())));
            let mut single = Vec::new();
            let mut lexer = Lexer::new(max);
            for b in input {
                lexer.feed(std::slice::from_ref(b), &mut |k, t| {
                    single.push((k, t.to_vec()))
                });
            }
            assert_eq!(whole, single, "max {max}");
        }
    }

    #[test]
    fn oversized_token_is_cut_off() {
        let mut lexer = Lexer::new(8);
        let mut out = Vec::new();
        lexer.feed(b"\"0123456789", &mut |k, t| out.push((k, t.len())));
        assert_eq!(out, vec![(TokenKind::Oversized, 9)]);
        assert_eq!(lexer.pending_len(), 2);
    }
}
