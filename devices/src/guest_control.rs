//! The host side of the test guest's control device: mailboxes, events, verify.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ram::{GuestRam, PAGE_SIZE};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::guest_abi::{self, mailbox, GuestEvent, MAILBOX_MAGIC};

/// Where one vCPU's part of the workload lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuSlice {
    /// Guest physical address of the vCPU's mailbox page.
    pub mailbox_gpa: u64,
    /// Guest-virtual address of the slice's first page.
    pub slice_va: u64,
    /// Working-set page number of the slice's first page.
    pub first_page: u64,
    /// Pages in the slice.
    pub pages: u64,
}

/// Where the working set lives and how it is split between vCPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadLayout {
    /// RAM offset of working-set page 0 (pages are contiguous in RAM-offset space).
    pub ws_ram_offset: u64,
    /// Pages in the working set.
    pub ws_pages: u64,
    /// One slice per vCPU.
    pub slices: Vec<VcpuSlice>,
}

impl WorkloadLayout {
    /// RAM page number (RAM offset / 4 KiB) of working-set page `page`.
    pub fn ram_page(&self, page: u64) -> u64 {
        self.ws_ram_offset / PAGE_SIZE as u64 + page
    }
}

/// The result of checking the guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VerifyReport {
    /// Pages checked.
    pub pages_checked: u64,
    /// Pages whose contents were not what their position requires.
    pub bad_pages: u64,
}

/// One vCPU's workload progress, as the guest reports it in its mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VcpuProgress {
    /// Current generation.
    pub generation: u64,
    /// Next page to write in the slice.
    pub index: u64,
    /// Pages written since boot.
    pub pages_written: u64,
    /// Full passes since boot.
    pub passes: u64,
}

/// Errors from the control device.
#[derive(Debug, Error)]
pub enum ControlError {
    /// Guest memory could not be accessed.
    #[error("guest memory: {0}")]
    Ram(#[from] ram::RamError),
    /// The guest did not answer in time.
    #[error("the guest did not finish verifying its memory within {0:?}")]
    Timeout(Duration),
    /// The layout does not fit in guest memory.
    #[error("workload layout does not fit guest memory: {0}")]
    BadLayout(String),
}

/// The control device.
#[derive(Debug)]
pub struct GuestControl {
    ram: Arc<GuestRam>,
    layout: WorkloadLayout,
    events: Mutex<u64>,
    event_cond: Condvar,
    started: AtomicU64,
    passes_signalled: AtomicU64,
}

/// Saved state of the control device (the layout; everything else lives in guest memory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    /// The workload layout.
    pub layout: WorkloadLayout,
}

impl GuestControl {
    /// A control device for a guest with this layout.
    pub fn new(ram: Arc<GuestRam>, layout: WorkloadLayout) -> Result<Self, ControlError> {
        let end = layout
            .ws_ram_offset
            .checked_add(layout.ws_pages.saturating_mul(PAGE_SIZE as u64))
            .ok_or_else(|| ControlError::BadLayout("working set overflows".into()))?;
        if end > ram.size() {
            return Err(ControlError::BadLayout(format!(
                "working set ends at {end:#x}, guest RAM is {:#x} bytes",
                ram.size()
            )));
        }
        for s in &layout.slices {
            // Checked: the layout comes from a migration stream or a snapshot file.
            if ram.gpa_to_offset(s.mailbox_gpa).is_none()
                || s.first_page
                    .checked_add(s.pages)
                    .is_none_or(|end| end > layout.ws_pages)
            {
                return Err(ControlError::BadLayout(format!("bad slice {s:?}")));
            }
        }
        Ok(GuestControl {
            ram,
            layout,
            events: Mutex::new(0),
            event_cond: Condvar::new(),
            started: AtomicU64::new(0),
            passes_signalled: AtomicU64::new(0),
        })
    }

    /// The workload layout.
    pub fn layout(&self) -> &WorkloadLayout {
        &self.layout
    }

    /// Writes the host-owned mailbox fields for a fresh boot.
    pub fn init_mailboxes(
        &self,
        ticks_per_page: u64,
        max_skew_ticks: u64,
        sleep_min_ticks: u64,
        pattern: guest_abi::Pattern,
        banner: Option<(u64, u64)>,
    ) -> Result<(), ControlError> {
        for (i, s) in self.layout.slices.iter().enumerate() {
            let mb = s.mailbox_gpa;
            let w = |off: u64, v: u64| self.ram.write_u64(mb + off, v);
            w(mailbox::MAGIC, MAILBOX_MAGIC)?;
            w(mailbox::VCPU_ID, i as u64)?;
            w(mailbox::SLICE_VA, s.slice_va)?;
            w(mailbox::SLICE_PAGES, s.pages)?;
            w(mailbox::FIRST_PAGE, s.first_page)?;
            w(mailbox::TICKS_PER_PAGE, ticks_per_page)?;
            w(mailbox::MAX_SKEW, max_skew_ticks)?;
            w(mailbox::VERIFY_REQ, 0)?;
            w(mailbox::VERIFY_ACK, 0)?;
            w(mailbox::VERIFY_FIRST_BAD, u64::MAX)?;
            let (va, len) = if i == 0 {
                banner.unwrap_or((0, 0))
            } else {
                (0, 0)
            };
            w(mailbox::BANNER_VA, va)?;
            w(mailbox::BANNER_LEN, len)?;
            w(mailbox::REPORT_PASSES, 1)?;
            w(mailbox::SLEEP_MIN_TICKS, sleep_min_ticks)?;
            w(
                mailbox::SPARSE,
                u64::from(pattern == guest_abi::Pattern::Sparse),
            )?;
        }
        Ok(())
    }

    /// Changes the pacing of every vCPU (TSC ticks between page writes; 0 = unpaced).
    pub fn set_ticks_per_page(&self, ticks: u64) -> Result<(), ControlError> {
        for s in &self.layout.slices {
            self.ram
                .write_u64(s.mailbox_gpa + mailbox::TICKS_PER_PAGE, ticks)?;
        }
        Ok(())
    }

    /// Handles `out CONTROL_PORT, value` from vCPU `vcpu`.
    pub fn port_write(&self, vcpu: usize, value: u32) {
        match GuestEvent::from_code(value) {
            Some(GuestEvent::Started) => {
                self.started.fetch_or(1 << (vcpu % 64), Ordering::AcqRel);
            }
            Some(GuestEvent::PassDone) => {
                self.passes_signalled.fetch_add(1, Ordering::AcqRel);
            }
            Some(GuestEvent::VerifyDone) | None => {}
        }
        if let Ok(mut n) = self.events.lock() {
            *n += 1;
        }
        self.event_cond.notify_all();
    }

    /// Bitmask of vCPUs that signalled [`GuestEvent::Started`] in this process.
    pub fn started_mask(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }

    fn read(&self, vcpu: usize, off: u64) -> Result<u64, ControlError> {
        let s = self
            .layout
            .slices
            .get(vcpu)
            .ok_or_else(|| ControlError::BadLayout(format!("no vCPU {vcpu}")))?;
        Ok(self.ram.read_u64(s.mailbox_gpa + off)?)
    }

    /// Progress of every vCPU.
    pub fn progress(&self) -> Result<Vec<VcpuProgress>, ControlError> {
        (0..self.layout.slices.len())
            .map(|i| {
                Ok(VcpuProgress {
                    generation: self.read(i, mailbox::GEN)?,
                    index: self.read(i, mailbox::INDEX)?,
                    pages_written: self.read(i, mailbox::PAGES_WRITTEN)?,
                    passes: self.read(i, mailbox::PASSES)?,
                })
            })
            .collect()
    }

    /// Total pages written by all vCPUs since boot.
    pub fn pages_written(&self) -> Result<u64, ControlError> {
        Ok(self.progress()?.iter().map(|p| p.pages_written).sum())
    }

    /// Asks every vCPU to verify its slice and waits for all answers.
    ///
    /// The vCPUs must be running; a paused guest times out.
    pub fn guest_verify(&self, timeout: Duration) -> Result<VerifyReport, ControlError> {
        let n = self.layout.slices.len();
        let mut want = Vec::with_capacity(n);
        for (i, s) in self.layout.slices.iter().enumerate() {
            let seq = self.read(i, mailbox::VERIFY_REQ)?.wrapping_add(1);
            self.ram
                .write_u64(s.mailbox_gpa + mailbox::VERIFY_REQ, seq)?;
            want.push(seq);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let mut done = true;
            for (i, seq) in want.iter().enumerate() {
                if self.read(i, mailbox::VERIFY_ACK)? != *seq {
                    done = false;
                }
            }
            if done {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ControlError::Timeout(timeout));
            }
            let wait = (deadline - now).min(Duration::from_millis(20));
            if let Ok(guard) = self.events.lock() {
                let _ = self.event_cond.wait_timeout(guard, wait);
            }
        }
        let mut report = VerifyReport::default();
        for i in 0..n {
            // The guest writes these: saturate rather than overflow.
            report.pages_checked = report
                .pages_checked
                .saturating_add(self.read(i, mailbox::VERIFY_CHECKED)?);
            report.bad_pages = report
                .bad_pages
                .saturating_add(self.read(i, mailbox::VERIFY_BAD)?);
        }
        Ok(report)
    }

    /// Checks the working set from the host, without the guest (it should be paused, or the
    /// memory a copy): every page must hold what its slice's position requires.
    ///
    /// The position comes from each mailbox's PAGES_WRITTEN counter, which the guest stores
    /// with one instruction after each page; the page at the current index may be half
    /// written when the vCPU stopped, so it is skipped (the in-guest verify has no such gap).
    pub fn host_verify(&self) -> Result<VerifyReport, ControlError> {
        let mut report = VerifyReport::default();
        for (i, s) in self.layout.slices.iter().enumerate() {
            if s.pages == 0 {
                continue;
            }
            let pos = self.read(i, mailbox::PAGES_WRITTEN)?;
            let pattern = if self.read(i, mailbox::SPARSE)? != 0 {
                guest_abi::Pattern::Sparse
            } else {
                guest_abi::Pattern::Full
            };
            let gen = pos / s.pages + 1;
            let index = pos % s.pages;
            for j in (0..s.pages).filter(|&j| j != index) {
                let page_no = s.first_page + j;
                let expect = guest_abi::expected_generation(j, index, gen);
                let ok = self
                    .ram
                    .page(self.layout.ram_page(page_no))
                    .is_some_and(|bytes| guest_abi::page_matches(page_no, expect, pattern, bytes));
                report.pages_checked += 1;
                if !ok {
                    report.bad_pages += 1;
                }
            }
        }
        Ok(report)
    }

    /// State for a migration stream.
    pub fn save(&self) -> ControlState {
        ControlState {
            layout: self.layout.clone(),
        }
    }
}
