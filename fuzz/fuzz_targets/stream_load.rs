//! Fuzzes the migration stream reader (live migrations, file migrations and background
//! snapshots all use it): header check, frames, RAM directories, scattered page reads,
//! per-page hashes, XBZRLE records, the end-of-stream checks — into 4 MiB of real guest RAM.
//!
//! Checked: no panic, no hang, no write outside guest RAM (the RAM is a real mapping; a
//! stray write would fault or corrupt the allocator and be caught by the sanitizer).

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use migration::dest::loader::{load_stream, LoadProgress, RamLoader};
use migration::stream::frame::FrameReader;
use migration::stream::header::Header;
use ram::{Backend, GuestRam, HugePages, MemoryConfig};

struct Ignore;

impl LoadProgress for Ignore {
    fn pass_end(&mut self, _pass: u64) -> migration::error::Result<()> {
        Ok(())
    }
}

fn ram() -> &'static GuestRam {
    static RAM: OnceLock<GuestRam> = OnceLock::new();
    RAM.get_or_init(|| {
        GuestRam::new(&MemoryConfig {
            size: 4 << 20,
            backend: Backend::AnonymousPrivate,
            hugepages: HugePages::None,
            prealloc: false,
        })
        .expect("guest RAM")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    let Ok(header) = Header::read_from(&mut input) else {
        return;
    };
    let ram = ram();
    if header.ram_size != ram.size() {
        return;
    }
    let mut reader = FrameReader::new(input);
    let mut loader = RamLoader::new(ram, false);
    let _ = load_stream(&mut reader, &mut loader, &mut Ignore);
});
