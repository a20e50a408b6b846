//! Applies a migration stream to the destination's memory and state.

use std::io::Read;

use ram::{is_zero_page, AtomicBitmap, GuestRam, PAGE_SHIFT};

use crate::error::{MigrationError, Result};
use crate::stream::frame::{FrameKind, FrameReader};
use crate::stream::header::{Header, FEATURE_VALIDATE_UUID};
use crate::stream::ram::{RamRecord, RamRecordReader};
use crate::stream::StreamError;
use crate::vm::DestVm;

/// What the loader reports as it goes.
pub trait LoadProgress {
    /// A pass ended (PASS_END frame).
    fn pass_end(&mut self, pass: u64) -> Result<()>;
}

/// Checks the stream header against this VM.
pub fn check_header(header: &Header, vm: &dyn DestVm, validate_uuid: bool) -> Result<()> {
    let ram = vm.ram();
    if header.ram_size != ram.size() {
        return Err(StreamError::Mismatch(format!(
            "the source's guest has {} MiB of RAM, this VM {} MiB: start the destination with --memory {}M",
            header.ram_size >> 20,
            ram.size() >> 20,
            header.ram_size >> 20
        ))
        .into());
    }
    if header.vcpus != vm.vcpus() {
        return Err(StreamError::Mismatch(format!(
            "the source's guest has {} vCPUs, this VM {}: start the destination with --vcpus {}",
            header.vcpus,
            vm.vcpus(),
            header.vcpus
        ))
        .into());
    }
    // QEMU checks the UUID when the source sends it (validate-uuid on the source).
    let _ = validate_uuid;
    if header.has(FEATURE_VALIDATE_UUID) && header.uuid != vm.uuid() {
        return Err(StreamError::Mismatch(format!(
            "UUID received is {} and local is {}",
            uuid::Uuid::from_bytes(header.uuid),
            uuid::Uuid::from_bytes(vm.uuid())
        ))
        .into());
    }
    Ok(())
}

/// Applies RAM records to guest memory.
pub struct RamLoader<'a> {
    ram: &'a GuestRam,
    /// Pages written by this migration so far (a zero record for a page never written
    /// into fresh memory needs no work at all).
    received: AtomicBitmap,
    fresh: bool,
    /// Pages applied.
    pub pages: u64,
}

impl<'a> RamLoader<'a> {
    /// A loader for `ram`; `fresh` when the memory is known to be all zeros.
    pub fn new(ram: &'a GuestRam, fresh: bool) -> Self {
        RamLoader {
            ram,
            received: AtomicBitmap::new(ram.page_count()),
            fresh,
            pages: 0,
        }
    }

    /// Applies one RAM frame payload.
    pub fn apply(&mut self, payload: &[u8]) -> Result<()> {
        for rec in RamRecordReader::new(payload, self.ram.size()) {
            match rec? {
                RamRecord::Page { offset, data } => {
                    let page = offset >> PAGE_SHIFT;
                    self.ram
                        .write_page(page, data)
                        .map_err(|e| MigrationError::Vm(e.to_string()))?;
                    self.received.set(page);
                    self.pages += 1;
                }
                RamRecord::Zero { offset, count } => {
                    let first = offset >> PAGE_SHIFT;
                    for page in first..first + u64::from(count) {
                        let untouched = self.fresh && !self.received.get(page);
                        if !untouched && !self.ram.page(page).is_some_and(is_zero_page) {
                            self.ram
                                .zero_page(page)
                                .map_err(|e| MigrationError::Vm(e.to_string()))?;
                        }
                        self.received.set(page);
                    }
                    self.pages += u64::from(count);
                }
                RamRecord::Xbzrle { offset, data } => {
                    let page = offset >> PAGE_SHIFT;
                    let ptr = self
                        .ram
                        .page_ptr(page)
                        .ok_or_else(|| MigrationError::Vm(format!("page {page} outside RAM")))?;
                    // SAFETY: `ptr` is a page of guest RAM; the guest is not running on the
                    // destination, and nothing else writes guest memory during the load.
                    let dst = unsafe { std::slice::from_raw_parts_mut(ptr, ram::PAGE_SIZE) };
                    crate::xbzrle::decode(data, dst).map_err(|e| {
                        StreamError::Invalid(format!("XBZRLE page at {offset:#x}: {e}"))
                    })?;
                    self.received.set(page);
                    self.pages += 1;
                }
                RamRecord::Compressed { offset, .. } => {
                    return Err(StreamError::Invalid(format!(
                        "compressed page at {offset:#x}, but this stream did not announce compression"
                    ))
                    .into());
                }
            }
        }
        Ok(())
    }
}

/// Reads frames until END; returns the state payload.
pub fn load_stream<R: Read>(
    reader: &mut FrameReader<R>,
    loader: &mut RamLoader<'_>,
    progress: &mut dyn LoadProgress,
) -> Result<Vec<u8>> {
    let mut state: Option<Vec<u8>> = None;
    loop {
        let (kind, payload) = reader.next_frame()?;
        match kind {
            FrameKind::Ram => loader.apply(payload)?,
            FrameKind::PassEnd => {
                let pass = payload
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .ok_or(StreamError::Truncated("in a PASS_END frame"))?;
                progress.pass_end(pass)?;
            }
            FrameKind::State => {
                if state.is_some() {
                    return Err(StreamError::Invalid("two STATE frames".into()).into());
                }
                state = Some(payload.to_vec());
            }
            FrameKind::End => {
                return state.ok_or_else(|| {
                    StreamError::Invalid("the stream ended without vCPU and device state".into())
                        .into()
                });
            }
        }
    }
}
