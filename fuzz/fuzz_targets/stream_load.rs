//! Fuzzes the migration stream reader (live migrations, file migrations and background
//! snapshots all use it): header check, frames, RAM directories, scattered page reads,
//! per-page hashes, XBZRLE records, the end-of-stream checks — into 4 MiB of real guest RAM.
//!
//! Input: a control byte (see `ferry_fuzz`: bit 0 clear = reseal checksums), then the
//! stream. Checked: no panic, no hang, no write outside guest RAM (the RAM is a real
//! mapping; a stray write would fault or corrupt the allocator and be caught by the
//! sanitizer).

#![no_main]

use ferry_fuzz::{ram, stream_input, CheckedProgress, SliceSource};
use libfuzzer_sys::fuzz_target;
use migration::dest::loader::{load_stream, RamLoader};
use migration::stream::frame::FrameReader;

fuzz_target!(|data: &[u8]| {
    let Some((header, frames)) = stream_input(data) else {
        return;
    };
    let ram = ram();
    if header.ram_size != ram.size() {
        return;
    }
    let mut reader = FrameReader::new(SliceSource(&frames[..]));
    let mut loader = RamLoader::new(&ram, false);
    let _ = load_stream(
        &mut reader,
        &mut loader,
        &mut CheckedProgress {
            pages: ram.page_count(),
        },
    );
});
