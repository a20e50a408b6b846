//! Fuzzes QMP input: the JSON splitter/lexer/parser (QEMU's rules) and request validation,
//! fed in arbitrary chunks as a socket would deliver them.
//!
//! Checked: no panic, every message ends as a request or a QEMU-style error, memory
//! bounded by the limits.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::qmp::framing::{JsonStreamer, Limits};
use vmm::qmp::request::parse_request;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut s = JsonStreamer::new(Limits {
        max_token_size: 64 << 10,
        max_token_count: 4096,
        max_nesting: 64,
    });
    let mut messages = Vec::new();
    for piece in rest.chunks(chunk) {
        messages.extend(s.feed(piece));
    }
    messages.extend(s.flush());
    for m in messages.into_iter().flatten() {
        let _ = parse_request(m, true);
    }
});
