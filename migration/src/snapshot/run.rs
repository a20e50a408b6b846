//! The snapshot thread: setup while the guest is stopped, streaming while it runs, the
//! end frames — and cleanup on failure (the guest keeps running, nothing stays protected).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ram::{BackingKind, GuestRam, PAGE_SIZE};

use super::claims::PageClaims;
use super::digest::{page_digest_of_ranges, PageDigest};
use super::fault::{FaultContext, FaultHandler, FaultStats};
use super::pagemap;
use super::protect::{UnpopulatedStrategy, WriteProtector};
use super::writer::SnapshotWriter;
use super::{Result, Shared, SnapshotError};
use crate::info::{MigrationStatus, Phase};
use crate::stream::frame::{FrameKind, FrameWriter};
use crate::stream::header::{Header, FEATURE_SNAPSHOT, HEADER_LEN, STREAM_VERSION};
use crate::transport::{self, Channel, MigrationUri};

/// Fault copies the handler may queue ahead of the writer (64 MiB); beyond that a faulting
/// vCPU waits for the writer.
const FAULT_QUEUE_PAGES: usize = 16 << 10;
/// Pages written between two checks of the file and the handler (64 MiB).
const CHECK_EVERY_PAGES: u64 = 16 << 10;

/// Entry point of the snapshot thread.
pub(super) fn run(shared: Arc<Shared>, path: PathBuf, offset: u64) {
    let mut stopped_vcpus = false;
    let mut file_id = None;
    let result = snapshot(&shared, &path, offset, &mut stopped_vcpus, &mut file_id);
    // Every protection is lifted by now (the protector is dropped inside `snapshot`).
    shared.options.clear_hooks();
    let status = match result {
        Ok(()) => MigrationStatus::Completed,
        Err(e) => {
            if stopped_vcpus {
                if let Err(r) = shared.vm.resume_vcpus() {
                    eprintln!("ferry: could not resume the guest after a failed snapshot: {r}");
                }
            }
            remove_partial(&path, offset, file_id);
            if shared.cancelled() || matches!(e, SnapshotError::Cancelled) {
                MigrationStatus::Cancelled
            } else {
                eprintln!("ferry: background snapshot failed: {e}");
                shared.set_error(&e);
                MigrationStatus::Failed
            }
        }
    };
    // Settings are free again before the final state is announced (see source::precopy).
    shared.options.set_running(false);
    shared.set_status(status);
}

/// Removes what a failed snapshot wrote: the file, or what follows `offset` in it — only
/// while `path` still names the file this snapshot opened.
fn remove_partial(path: &Path, offset: u64, file_id: Option<(u64, u64)>) {
    let Some(id) = file_id else { return };
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if (meta.dev(), meta.ino()) != id || !meta.is_file() {
        return;
    }
    if offset == 0 {
        let _ = std::fs::remove_file(path);
    } else if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
        let _ = f.set_len(offset);
    }
}

fn channel_id(ch: &Channel) -> Option<(u64, u64)> {
    match ch {
        Channel::File(f) => f.metadata().ok().map(|m| (m.dev(), m.ino())),
        _ => None,
    }
}

/// Fails when `path` no longer names the file being written.
fn check_file(path: &Path, id: Option<(u64, u64)>) -> Result<()> {
    let Some(id) = id else { return Ok(()) };
    match std::fs::metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == id => Ok(()),
        _ => Err(SnapshotError::FileRemoved(path.to_path_buf())),
    }
}

/// Merges two sorted lists of page ranges.
fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b).copied().filter(|r| r.0 < r.1).collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(all.len());
    for (s, e) in all {
        match out.last_mut() {
            Some((_, end)) if *end >= s => *end = (*end).max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Pages that may hold data at the start instant; everything else is known zero.
///
/// Taken with the vCPUs stopped: once before protecting (for anonymous memory, where a
/// protection marker later looks like a swapped page in pagemap) and once after (so that
/// a VMM thread writing a never-touched page in between is not missed).
fn data_ranges_after_protect(
    ram: &GuestRam,
    before: &[(u64, u64)],
    strategy: UnpopulatedStrategy,
) -> Result<Vec<(u64, u64)>> {
    if !matches!(
        ram.backing_kind(),
        BackingKind::AnonymousPrivate | BackingKind::SharedShmem
    ) {
        // A private mapping of a file reads the file where it was never written: not zero.
        return Ok(vec![(0, ram.page_count())]);
    }
    let after = match strategy {
        UnpopulatedStrategy::WpUnpopulated => pagemap::present_pages(ram)?,
        UnpopulatedStrategy::ShmemMarkers => ram.data_ranges(),
        // Every page was populated (read) before protecting: `before` is all we know.
        UnpopulatedStrategy::TouchPages => Vec::new(),
    };
    Ok(union(before, &after))
}

/// Calls `hole` and `data` for the alternating ranges of `[0, pages)`, in order.
fn for_each_segment(
    pages: u64,
    data: &[(u64, u64)],
    mut f: impl FnMut(bool, u64, u64) -> Result<()>,
) -> Result<()> {
    let mut at = 0;
    for &(s, e) in data {
        let (s, e) = (s.min(pages), e.min(pages));
        if s > at {
            f(false, at, s)?;
        }
        if e > s.max(at) {
            f(true, s.max(at), e)?;
        }
        at = at.max(e);
    }
    if at < pages {
        f(false, at, pages)?;
    }
    Ok(())
}

fn snapshot(
    shared: &Arc<Shared>,
    path: &Path,
    offset: u64,
    stopped_vcpus: &mut bool,
    file_id: &mut Option<(u64, u64)>,
) -> Result<()> {
    let ram = shared.vm.ram();
    let uri = MigrationUri::File {
        path: path.to_path_buf(),
        offset,
    };
    let ch = transport::connect(&uri, Duration::from_secs(10))?;
    *file_id = channel_id(&ch);
    let header = Header {
        version: STREAM_VERSION,
        features: FEATURE_SNAPSHOT,
        uuid: shared.vm.uuid(),
        ram_size: ram.size(),
        page_size: PAGE_SIZE as u32,
        vcpus: shared.vm.vcpus(),
        multifd_channels: 0,
        multifd_compression: 0,
    };
    let mut out = FrameWriter::new(ch);
    header.write_to(out.get_mut())?;
    out.count_extra(HEADER_LEN as u64);
    shared.counters.add_sent(
        crate::info::Channel::Main,
        Phase::Precopy,
        HEADER_LEN as u64,
    );

    // A paused guest stays paused until the snapshot ends (`cont` is refused meanwhile):
    // its memory needs no write protection, and is saved like Firecracker saves it.
    let watch = shared.vm.is_running();
    // Registering protects nothing yet: do it before stopping the guest.
    let protector = match watch {
        true => Some(Arc::new(WriteProtector::new(&ram)?)),
        false => None,
    };
    if shared.cancelled() {
        return Err(SnapshotError::Cancelled);
    }

    // --- The stall: the guest is stopped from here ...
    let stall_start = Instant::now();
    let was_running = shared.vm.is_running();
    if was_running != watch {
        return Err(SnapshotError::Vm(
            "the guest was started or stopped while the snapshot was set up".into(),
        ));
    }
    if was_running {
        shared.vm.stop_vcpus().map_err(SnapshotError::Vm)?;
        *stopped_vcpus = true;
    }
    let state = shared.vm.save_state().map_err(SnapshotError::Vm)?;
    let before = ram.data_ranges();
    let data = match &protector {
        Some(p) => {
            p.populate_if_needed();
            p.protect_all()?;
            data_ranges_after_protect(&ram, &before, p.strategy())?
        }
        None => data_ranges_after_protect(&ram, &before, UnpopulatedStrategy::TouchPages)?,
    };
    let pages = ram.page_count();
    let claims = Arc::new(PageClaims::new(pages));
    let mut holes = 0;
    for_each_segment(pages, &data, |is_data, s, e| {
        if !is_data {
            holes += claims.claim_range(s, e - s);
        }
        Ok(())
    })?;
    // Memory cannot change now (vCPUs stopped, pages protected): the reference digest.
    let stall_digest = shared
        .settings
        .verify_digest
        .then(|| page_digest_of_ranges(&ram, &data));
    let stats = Arc::new(FaultStats::default());
    let (tx, rx) = crossbeam_channel::bounded(FAULT_QUEUE_PAGES);
    let mut _idle_sender = None;
    let handler = match &protector {
        Some(p) => Some(
            FaultHandler::spawn(FaultContext {
                protector: p.clone(),
                ram: ram.clone(),
                claims: claims.clone(),
                copies: tx,
                stats: stats.clone(),
            })
            .map_err(SnapshotError::Thread)?,
        ),
        // Nobody copies pages for the writer: keep the channel open until the end.
        None => {
            _idle_sender = Some(tx);
            None
        }
    };
    if was_running {
        shared.vm.resume_vcpus().map_err(SnapshotError::Vm)?;
        *stopped_vcpus = false;
    }
    // --- ... to here.
    let stall = stall_start.elapsed();
    {
        let mut s = shared.lock_status();
        s.stall_ms = stall.as_secs_f64() * 1e3;
        s.setup_time_ms = shared.start.elapsed().as_millis() as u64;
    }
    {
        let mut d = shared.details();
        d.unpopulated = protector.as_ref().map(|p| p.strategy());
        d.guest_running = watch;
        d.hole_pages = holes;
        d.stall_digest = stall_digest;
    }
    *shared.faults.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats.clone());
    shared.set_status(MigrationStatus::Active);

    // Stream every page, after what may hold data (a restore allocates nothing else).
    out.frame(
        FrameKind::DataRanges,
        &crate::stream::ranges::data_ranges_payload(&data),
    )?;
    let mut digest = PageDigest::new(pages);
    let mut last_file_check = Instant::now();
    let id = *file_id;
    let mut check = || -> Result<()> {
        if let Some(e) = stats.error() {
            return Err(SnapshotError::Fault(e));
        }
        if shared.cancelled() {
            return Err(SnapshotError::Cancelled);
        }
        if !watch && shared.vm.is_running() {
            return Err(SnapshotError::Vm(
                "the guest was resumed during the snapshot of its paused state".into(),
            ));
        }
        if last_file_check.elapsed() > Duration::from_millis(500) {
            last_file_check = Instant::now();
            check_file(path, id)?;
        }
        Ok(())
    };
    {
        let mut writer = SnapshotWriter::new(
            &ram,
            &mut out,
            &claims,
            protector.as_deref(),
            &rx,
            &mut digest,
            &shared.counters,
            &shared.limiter,
            &shared.cancel,
            &shared.progress,
        );
        for_each_segment(pages, &data, |is_data, s, e| {
            if !is_data {
                return writer.save_hole(s, e - s);
            }
            let mut at = s;
            while at < e {
                let end = (at + CHECK_EVERY_PAGES).min(e);
                writer.save_range(at, end)?;
                writer.write_pending_faults()?;
                check()?;
                at = end;
            }
            Ok(())
        })?;
        writer.drain_until_complete(&mut check)?;
    }

    // Every page is in the file: the guest no longer needs to be watched.
    if let Some(h) = handler {
        h.stop();
    }
    drop(rx);
    drop(protector); // lifts what is left and unregisters RAM
    check()?;
    if let Some(e) = stats.error() {
        return Err(SnapshotError::Fault(e));
    }
    let start_digest = digest.finish();
    shared.details().start_digest = Some(start_digest);
    if let Some(live) = stall_digest.filter(|&l| l != start_digest) {
        return Err(SnapshotError::DigestMismatch {
            written: start_digest,
            live,
        });
    }

    let before_end = out.bytes_written();
    out.frame(FrameKind::State, &state)?;
    let mut end = Vec::with_capacity(16);
    end.extend_from_slice(&pages.to_le_bytes());
    end.extend_from_slice(&0u64.to_le_bytes());
    out.frame(FrameKind::End, &end)?;
    out.flush()?;
    if let Channel::File(f) = out.get_mut() {
        f.sync_data()?;
    }
    shared.counters.add_sent(
        crate::info::Channel::Main,
        Phase::Precopy,
        out.bytes_written() - before_end,
    );
    check_file(path, id)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_merges_overlaps_and_neighbours() {
        assert_eq!(
            union(&[(0, 2), (5, 7)], &[(1, 3), (7, 9), (20, 21)]),
            vec![(0, 3), (5, 9), (20, 21)]
        );
        assert_eq!(union(&[], &[]), vec![]);
        assert_eq!(union(&[(4, 4)], &[(2, 3)]), vec![(2, 3)]);
    }

    #[test]
    fn segments_alternate_and_cover_everything() {
        let mut seen = Vec::new();
        for_each_segment(10, &[(2, 4), (4, 5), (8, 12)], |d, s, e| {
            seen.push((d, s, e));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (false, 0, 2),
                (true, 2, 4),
                (true, 4, 5),
                (false, 5, 8),
                (true, 8, 10)
            ]
        );
        let mut seen = Vec::new();
        for_each_segment(4, &[], |d, s, e| {
            seen.push((d, s, e));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(false, 0, 4)]);
    }
}
