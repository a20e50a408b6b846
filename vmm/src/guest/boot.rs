//! Writes the test guest into guest memory: GDT, TSS, page tables, code, banner, mailboxes.

use devices::guest_abi::{CONTROL_PORT, CONTROL_PORT_COUNT, SERIAL_PORT_BASE, SERIAL_PORT_COUNT};
use devices::guest_control::{ControlError, VcpuSlice, WorkloadLayout};
use devices::GuestControl;
use ram::GuestRam;
use std::sync::Arc;
use thiserror::Error;

use super::layout::*;
use super::program;

/// What the guest should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Working set in pages (split between vCPUs).
    pub ws_pages: u64,
    /// Target dirty rate in pages per second for the whole guest (0 = as fast as possible).
    pub rate: u64,
    /// Guest TSC frequency in kHz (for pacing).
    pub tsc_khz: u64,
    /// Banner printed on the serial port by vCPU 0.
    pub banner: String,
    /// How pages are rewritten.
    pub pattern: devices::guest_abi::Pattern,
}

/// Errors while loading the guest.
#[derive(Debug, Error)]
pub enum BootError {
    /// The program could not be assembled (a bug).
    #[error("assembling the test guest failed: {0}")]
    Assemble(String),
    /// Guest memory too small or not writable.
    #[error("guest memory: {0}")]
    Ram(#[from] ram::RamError),
    /// The working set or vCPU count does not fit.
    #[error("{0}")]
    Layout(String),
    /// The control device refused the layout.
    #[error(transparent)]
    Control(#[from] ControlError),
}

const P: u64 = 1; // present
const RW: u64 = 2;
const US: u64 = 4; // user-accessible: the guest runs at CPL3
const PS: u64 = 0x80; // 2 MiB page

/// Computes the workload layout of a guest (also needed by a destination that receives one).
pub fn workload_layout(cfg: &GuestConfig) -> WorkloadLayout {
    let layout = GuestLayout {
        vcpus: cfg.vcpus,
        ws_pages: cfg.ws_pages,
    };
    let slices = (0..cfg.vcpus)
        .map(|i| {
            let (first, pages) = layout.slice(i);
            VcpuSlice {
                mailbox_gpa: GuestLayout::mailbox_gpa(i),
                slice_va: WS_VA + first * 4096,
                first_page: first,
                pages,
            }
        })
        .collect();
    WorkloadLayout {
        ws_ram_offset: WS_RAM_OFFSET,
        ws_pages: cfg.ws_pages,
        slices,
    }
}

fn write_gdt(ram: &GuestRam) -> Result<(), BootError> {
    let tss_lo: u64 = {
        let base = TSS_GPA;
        let limit = u64::from(TSS_LIMIT);
        (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40) // present, type 9 (available 64-bit TSS)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56)
    };
    let tss_hi = TSS_GPA >> 32;
    let gdt: [u64; 7] = [
        0,
        0x00af_9a00_0000_ffff, // 0x08 code64 DPL0
        0x00cf_9200_0000_ffff, // 0x10 data DPL0
        0x00af_fa00_0000_ffff, // 0x18 code64 DPL3
        0x00cf_f200_0000_ffff, // 0x20 data DPL3
        tss_lo,                // 0x28 TSS (16 bytes)
        tss_hi,
    ];
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write_gpa(GDT_GPA, &bytes)?;
    Ok(())
}

fn write_tss(ram: &GuestRam) -> Result<(), BootError> {
    let mut tss = vec![0u8; TSS_LIMIT as usize + 1];
    tss[102..104].copy_from_slice(&(TSS_IOMAP_OFFSET as u16).to_le_bytes());
    // Deny every port, then allow the serial and control ports; the byte after the
    // bitmap must be 0xff.
    tss[TSS_IOMAP_OFFSET as usize..].fill(0xff);
    let ranges = [
        (SERIAL_PORT_BASE, SERIAL_PORT_COUNT),
        (CONTROL_PORT, CONTROL_PORT_COUNT),
    ];
    for (base, count) in ranges {
        for port in base..base + count {
            let bit = usize::from(port);
            tss[TSS_IOMAP_OFFSET as usize + bit / 8] &= !(1 << (bit % 8));
        }
    }
    ram.write_gpa(TSS_GPA, &tss)?;
    Ok(())
}

fn write_page_tables(ram: &GuestRam, ws_pages: u64) -> Result<(), BootError> {
    let chunks = ws_pages.div_ceil(512); // 2 MiB chunks of the window
    if chunks > PD_WS_PAGES * 512 {
        return Err(BootError::Layout(format!(
            "working set of {ws_pages} pages exceeds the guest's window"
        )));
    }
    ram.write_u64(PML4_GPA, PDPT_ID_GPA | P | RW | US)?;
    ram.write_u64(PML4_GPA + 8, PDPT_WS_GPA | P | RW | US)?;
    ram.write_u64(PDPT_ID_GPA, PD_ID_GPA | P | RW | US)?;
    ram.write_u64(PD_ID_GPA, P | RW | US | PS)?; // first 2 MiB, identity
    for gib in 0..chunks.div_ceil(512) {
        ram.write_u64(
            PDPT_WS_GPA + 8 * gib,
            (PD_WS_GPA + 4096 * gib) | P | RW | US,
        )?;
    }
    let mut pd = vec![0u8; (chunks * 8) as usize];
    for c in 0..chunks {
        let offset = WS_RAM_OFFSET + c * (2 << 20);
        let gpa = ram
            .offset_to_gpa(offset)
            .ok_or_else(|| BootError::Layout(format!("working set chunk {c} is beyond RAM")))?;
        pd[(c * 8) as usize..(c * 8 + 8) as usize]
            .copy_from_slice(&(gpa | P | RW | US | PS).to_le_bytes());
    }
    ram.write_gpa(PD_WS_GPA, &pd)?;
    Ok(())
}

/// Loads the guest into `ram` and returns its control device.
pub fn load_guest(ram: &Arc<GuestRam>, cfg: &GuestConfig) -> Result<GuestControl, BootError> {
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return Err(BootError::Layout(format!(
            "the test guest supports 1 to {MAX_VCPUS} vCPUs, not {}",
            cfg.vcpus
        )));
    }
    let max = GuestLayout::max_ws_pages(ram.size());
    if cfg.ws_pages > max {
        return Err(BootError::Layout(format!(
            "working set of {} MiB does not fit in {} MiB of guest memory (at most {} MiB)",
            (cfg.ws_pages * 4096) >> 20,
            ram.size() >> 20,
            (max * 4096) >> 20
        )));
    }
    write_gdt(ram)?;
    write_tss(ram)?;
    write_page_tables(ram, cfg.ws_pages)?;
    let code = program::assemble(CODE_GPA).map_err(|e| BootError::Assemble(e.to_string()))?;
    if code.len() as u64 > CODE_MAX {
        return Err(BootError::Assemble(format!(
            "program is {} bytes",
            code.len()
        )));
    }
    ram.write_gpa(CODE_GPA, &code)?;
    let banner = cfg.banner.as_bytes();
    let banner_len = banner.len().min(BANNER_MAX as usize);
    ram.write_gpa(BANNER_GPA, &banner[..banner_len])?;

    let control = GuestControl::new(ram.clone(), workload_layout(cfg))?;
    let ticks_per_page = ticks_per_page(cfg.rate, cfg.vcpus, cfg.tsc_khz);
    let max_skew = cfg.tsc_khz; // 1 ms: throttling must not be undone by catch-up bursts
    let sleep_min = cfg.tsc_khz / 20; // 50 us: shorter waits spin
    control.init_mailboxes(
        ticks_per_page,
        max_skew,
        sleep_min,
        cfg.pattern,
        Some((BANNER_GPA, banner_len as u64)),
    )?;
    Ok(control)
}

/// TSC ticks between two page writes of one vCPU for a whole-guest rate.
pub fn ticks_per_page(rate: u64, vcpus: usize, tsc_khz: u64) -> u64 {
    let per = rate.div_ceil(vcpus.max(1) as u64);
    (tsc_khz * 1000).checked_div(per).map_or(0, |t| t.max(1))
}
