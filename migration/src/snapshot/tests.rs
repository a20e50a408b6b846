//! Whole snapshots against an in-memory VM whose "guest" is a host thread rewriting pages:
//! point in time, cancel, failures, cleanup. (With real KVM guests: tests/tests/snapshot_*.rs.)

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ram::{AtomicBitmap, Backend, GuestRam, MemoryConfig, PAGE_SIZE};

use super::pagemap::protected_pages;
use super::*;
use crate::events::NoMigrationEvents;
use crate::options::{CapabilityStatus, FixedHostSupport, ParametersUpdate};
use crate::stream::frame::{Frame, FrameKind, FrameReader};
use crate::stream::header::{Header, FEATURE_SNAPSHOT};
use crate::stream::ram::RamRecord;
use crate::uffd::features::FEATURE_PAGEFAULT_FLAG_WP;
use crate::vm::DirtyTracker;

/// The "guest": a thread writing generation-stamped pages over a working set.
struct Guest {
    stop: AtomicBool,
    pause: AtomicBool,
    paused: AtomicBool,
    pages_written: AtomicU64,
}

struct NoTracker;

impl DirtyTracker for NoTracker {
    fn name(&self) -> &str {
        "none"
    }
    fn start(&self) -> std::result::Result<(), String> {
        Ok(())
    }
    fn sync(&self, _bitmap: &AtomicBitmap) -> std::result::Result<u64, String> {
        Ok(0)
    }
    fn stop(&self) {}
}

struct TestVm {
    ram: Arc<GuestRam>,
    guest: Arc<Guest>,
    thread: Mutex<Option<JoinHandle<()>>>,
    running: AtomicBool,
    was_running: AtomicBool,
    /// Page digest of memory taken while the guest was stopped (the start instant).
    digest_at_stop: Mutex<Option<u64>>,
    fail_save: bool,
}

fn fill(page: u64, generation: u64, out: &mut [u8]) {
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let v = (page << 32) ^ (generation << 12) ^ i as u64 ^ 0x5a5a_0000_0000_0000;
        w.copy_from_slice(&v.to_le_bytes());
    }
}

impl TestVm {
    fn new(backend: Backend, size: u64, working_set: u64) -> Arc<TestVm> {
        Self::build(backend, size, working_set, false)
    }

    /// With `alias`, the guest writes through a second shared mapping of the memfd, which
    /// userfaultfd does not protect (like another process sharing guest memory).
    fn build(backend: Backend, size: u64, working_set: u64, alias: bool) -> Arc<TestVm> {
        let ram = Arc::new(
            GuestRam::new(&MemoryConfig {
                size,
                backend,
                ..MemoryConfig::default()
            })
            .unwrap(),
        );
        let guest = Arc::new(Guest {
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            pages_written: AtomicU64::new(0),
        });
        let (r, g) = (ram.clone(), guest.clone());
        let alias_at = alias.then(|| {
            let fd = std::os::fd::AsRawFd::as_raw_fd(ram.backing_file().unwrap());
            // SAFETY: a new shared mapping of the memfd, never unmapped (test process).
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            p as usize
        });
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; PAGE_SIZE];
            let mut n = 0u64;
            while !g.stop.load(Ordering::Acquire) {
                if g.pause.load(Ordering::Acquire) {
                    g.paused.store(true, Ordering::Release);
                    std::thread::sleep(Duration::from_micros(100));
                    continue;
                }
                g.paused.store(false, Ordering::Release);
                // Pages 16.. of the working set, spread over RAM (every third page).
                let page = 16 + (n % working_set) * 3 % (r.page_count() - 16);
                fill(page, n / working_set + 1, &mut buf);
                match alias_at {
                    // SAFETY: the page lies inside the alias mapping of `size` bytes.
                    Some(a) => unsafe {
                        std::ptr::copy_nonoverlapping(
                            buf.as_ptr(),
                            (a + page as usize * PAGE_SIZE) as *mut u8,
                            PAGE_SIZE,
                        )
                    },
                    None => r.write_page(page, &buf).unwrap(),
                }
                n += 1;
                g.pages_written.store(n, Ordering::Release);
            }
        });
        Arc::new(TestVm {
            ram,
            guest,
            thread: Mutex::new(Some(thread)),
            running: AtomicBool::new(true),
            was_running: AtomicBool::new(false),
            digest_at_stop: Mutex::new(None),
            fail_save: false,
        })
    }

    fn shutdown(&self) {
        self.guest.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.lock().unwrap().take() {
            t.join().unwrap();
        }
    }

    fn written(&self) -> u64 {
        self.guest.pages_written.load(Ordering::Acquire)
    }
}

impl SourceVm for TestVm {
    fn ram(&self) -> Arc<GuestRam> {
        self.ram.clone()
    }
    fn vcpus(&self) -> u32 {
        1
    }
    fn uuid(&self) -> [u8; 16] {
        [3; 16]
    }
    fn dirty_tracker(&self) -> Arc<dyn DirtyTracker> {
        Arc::new(NoTracker)
    }
    fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }
    fn stop_vcpus(&self) -> std::result::Result<(), String> {
        self.was_running
            .store(self.running.load(Ordering::Acquire), Ordering::Release);
        self.guest.pause.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.guest.paused.load(Ordering::Acquire) {
            if Instant::now() > deadline {
                return Err("guest did not pause".into());
            }
            std::thread::yield_now();
        }
        self.running.store(false, Ordering::Release);
        *self.digest_at_stop.lock().unwrap() = Some(page_digest(&self.ram));
        Ok(())
    }
    fn resume_vcpus(&self) -> std::result::Result<(), String> {
        self.guest.pause.store(false, Ordering::Release);
        self.running.store(true, Ordering::Release);
        Ok(())
    }
    fn set_throttle(&self, _pct: u8) {}
    fn save_state(&self) -> std::result::Result<Vec<u8>, String> {
        if self.fail_save {
            return Err("device state unavailable".into());
        }
        Ok(format!(
            "{{\"running\":{},\"written\":{}}}",
            self.was_running.load(Ordering::Acquire),
            self.written()
        )
        .into_bytes())
    }
    fn migrated_away(&self) {}
}

fn uffd_wp_usable() -> bool {
    match crate::uffd::query_features() {
        Ok((f, _)) if f.contains(FEATURE_PAGEFAULT_FLAG_WP) => true,
        other => {
            eprintln!("skipping: no userfaultfd write-protect: {other:?}");
            false
        }
    }
}

fn options(bandwidth: u64) -> Arc<MigrationOptions> {
    let o = MigrationOptions::new();
    o.set_capabilities(
        &[CapabilityStatus::new(Capability::BackgroundSnapshot, true)],
        &FixedHostSupport::capable(),
    )
    .unwrap();
    o.set_parameters(&ParametersUpdate {
        max_bandwidth: Some(bandwidth),
        ..ParametersUpdate::default()
    })
    .unwrap();
    Arc::new(o)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-snap-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn wait_end(s: &BackgroundSnapshot) -> MigrationStatus {
    s.join();
    s.status()
}

/// Loads a snapshot file into fresh memory with a reader of its own; returns the state.
fn load(path: &Path, into: &GuestRam) -> Vec<u8> {
    let file = std::fs::read(path).unwrap();
    let mut r = &file[..];
    let header = Header::read_from(&mut r).unwrap();
    assert!(header.has(FEATURE_SNAPSHOT));
    assert_eq!(header.ram_size, into.size());
    let mut reader = FrameReader::new(r);
    let mut seen = vec![0u8; into.page_count() as usize];
    let mut state = None;
    let mut data_ranges: Option<Vec<crate::stream::ranges::PageRange>> = None;
    loop {
        match reader.next(into.size()).unwrap() {
            Frame::Ram(dir) => {
                let mut data = vec![0u8; dir.data_len];
                let mut iov = [libc::iovec {
                    iov_base: data.as_mut_ptr().cast(),
                    iov_len: data.len(),
                }];
                // SAFETY: the iovec describes `data`, which nothing else borrows here.
                unsafe { reader.read_ram_data(&mut iov[..usize::from(!data.is_empty())]) }.unwrap();
                let mut at = 0;
                for rec in &dir.records {
                    match *rec {
                        RamRecord::Page { offset, hash } => {
                            let bytes = &data[at..at + PAGE_SIZE];
                            assert_eq!(ram::page_hash(bytes), hash);
                            let page = offset / 4096;
                            assert!(
                                data_ranges
                                    .as_ref()
                                    .expect("DATA_RANGES before the pages")
                                    .iter()
                                    .any(|r| r.pages().contains(&page)),
                                "page {page} holds data outside DATA_RANGES"
                            );
                            into.write_page(page, bytes).unwrap();
                            seen[page as usize] += 1;
                            at += PAGE_SIZE;
                        }
                        RamRecord::Zero { offset, count } => {
                            for p in offset / 4096..offset / 4096 + count {
                                into.zero_page(p).unwrap();
                                seen[p as usize] += 1;
                            }
                        }
                        other => panic!("unexpected record {other:?}"),
                    }
                }
            }
            Frame::Other(FrameKind::DataRanges, b) => {
                assert!(data_ranges.is_none(), "one DATA_RANGES frame");
                data_ranges =
                    Some(crate::stream::ranges::decode_ranges(b, into.page_count()).unwrap());
            }
            Frame::Other(FrameKind::State, s) => state = Some(s.to_vec()),
            Frame::Other(FrameKind::End, _) => break,
            Frame::Other(k, _) => panic!("unexpected frame {k:?}"),
        }
    }
    assert!(
        seen.iter().all(|&n| n == 1),
        "every page exactly once in the file"
    );
    state.expect("a STATE frame")
}

fn point_in_time(backend: Backend) {
    if !uffd_wp_usable() {
        return;
    }
    let vm = TestVm::new(backend.clone(), 64 << 20, 8192);
    // Let the guest touch its working set once.
    while vm.written() < 8192 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let path = scratch(&format!("pit-{backend:?}"));
    // 64 MiB at 64 MiB/s: about a second during which the guest keeps writing.
    let snap = BackgroundSnapshot::start_with(
        MigrationUri::File {
            path: path.clone(),
            offset: 0,
        },
        vm.clone(),
        options(64 << 20),
        Arc::new(NoMigrationEvents),
        SnapshotSettings {
            verify_digest: true,
        },
    )
    .unwrap();
    let during_start = vm.written();
    assert_eq!(
        wait_end(&snap),
        MigrationStatus::Completed,
        "{:?}",
        snap.error()
    );
    let during = vm.written() - during_start;
    let report = snap.report();
    assert!(during > 1000, "the guest kept writing: {during} pages");
    assert!(
        report.faults > 0 && report.pages_from_faults > 0,
        "guest writes were served by the fault handler: {report:?}"
    );
    assert_eq!(report.pages_done, report.pages_total);
    assert_eq!(
        protected_pages(&vm.ram).unwrap(),
        0,
        "nothing protected afterwards"
    );
    let expected = vm.digest_at_stop.lock().unwrap().expect("stopped once");
    assert_eq!(snap.start_digest(), Some(expected), "recorded digest");
    assert_eq!(
        report.stall_digest.as_deref(),
        Some(format!("{expected:016x}").as_str()),
        "self-check digest"
    );
    let fresh = GuestRam::new(&MemoryConfig {
        size: 64 << 20,
        backend: Backend::SharedMemfd,
        ..MemoryConfig::default()
    })
    .unwrap();
    let state = load(&path, &fresh);
    assert_eq!(
        page_digest(&fresh),
        expected,
        "the file holds the start instant"
    );
    assert!(String::from_utf8_lossy(&state).contains("\"running\":true"));
    let st = snap.state();
    assert_eq!(st.ram.remaining, 0);
    assert!(report.stall_ms > 0.0);
    assert_eq!(
        st.downtime_ms,
        report.stall_ms.round() as u64,
        "downtime is the stall"
    );
    eprintln!("{backend:?}: {report:?}");
    vm.shutdown();
    let _ = std::fs::remove_file(&path);
}

#[test]
fn snapshot_of_shared_memfd_holds_the_start_instant() {
    point_in_time(Backend::SharedMemfd);
}

#[test]
fn snapshot_of_anonymous_memory_holds_the_start_instant() {
    point_in_time(Backend::AnonymousPrivate);
}

/// The guest keeps running: it writes again within a generous window (a loaded machine
/// may not schedule its thread for tens of milliseconds).
fn assert_keeps_writing(vm: &TestVm) {
    let before = vm.written();
    let deadline = Instant::now() + Duration::from_secs(5);
    while vm.written() == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(vm.written() > before, "the guest keeps running");
}

#[test]
fn cancel_leaves_the_guest_running_and_nothing_protected() {
    if !uffd_wp_usable() {
        return;
    }
    let vm = TestVm::new(Backend::SharedMemfd, 64 << 20, 4096);
    let path = scratch("cancel");
    // Slow enough (8 MiB/s) to be cancelled in the middle.
    let snap = BackgroundSnapshot::start(
        MigrationUri::File {
            path: path.clone(),
            offset: 0,
        },
        vm.clone(),
        options(8 << 20),
        Arc::new(NoMigrationEvents),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while snap.status() != MigrationStatus::Active && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Mid-snapshot some pages are still protected (polled: a loaded machine may be slow
    // to get the snapshot thread through its set-up).
    let deadline = Instant::now() + Duration::from_secs(5);
    while protected_pages(&vm.ram).unwrap() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(snap.status(), MigrationStatus::Active, "still saving");
    assert!(
        protected_pages(&vm.ram).unwrap() > 0,
        "mid-snapshot, pages are protected"
    );
    snap.cancel();
    assert_eq!(wait_end(&snap), MigrationStatus::Cancelled);
    assert_eq!(protected_pages(&vm.ram).unwrap(), 0);
    assert!(!path.exists(), "the partial file is removed");
    assert!(vm.is_running());
    assert_keeps_writing(&vm);
    vm.shutdown();
}

#[test]
fn removing_the_file_fails_the_snapshot_and_lifts_protection() {
    if !uffd_wp_usable() {
        return;
    }
    let vm = TestVm::new(Backend::AnonymousPrivate, 64 << 20, 4096);
    let path = scratch("removed");
    let snap = BackgroundSnapshot::start(
        MigrationUri::File {
            path: path.clone(),
            offset: 0,
        },
        vm.clone(),
        options(8 << 20),
        Arc::new(NoMigrationEvents),
    )
    .unwrap();
    while snap.status() != MigrationStatus::Active {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::remove_file(&path).unwrap();
    assert_eq!(wait_end(&snap), MigrationStatus::Failed);
    let err = snap.error().unwrap();
    assert!(err.contains("removed or replaced"), "{err}");
    assert_eq!(protected_pages(&vm.ram).unwrap(), 0);
    assert_keeps_writing(&vm);
    vm.shutdown();
}

#[test]
fn a_failed_setup_resumes_the_guest() {
    if !uffd_wp_usable() {
        return;
    }
    let mut vm = TestVm::new(Backend::SharedMemfd, 16 << 20, 1024);
    Arc::get_mut(&mut vm).unwrap().fail_save = true;
    let path = scratch("failsave");
    let snap = BackgroundSnapshot::start(
        MigrationUri::File {
            path: path.clone(),
            offset: 0,
        },
        vm.clone(),
        options(0),
        Arc::new(NoMigrationEvents),
    )
    .unwrap();
    assert_eq!(wait_end(&snap), MigrationStatus::Failed);
    assert_eq!(snap.error().as_deref(), Some("device state unavailable"));
    assert!(vm.is_running(), "resumed after the failed setup");
    assert_eq!(protected_pages(&vm.ram).unwrap(), 0);
    assert!(!path.exists());
    vm.shutdown();
}

#[test]
fn only_file_uris_are_accepted() {
    let vm = TestVm::new(Backend::SharedMemfd, 16 << 20, 16);
    let err = BackgroundSnapshot::start(
        "tcp:127.0.0.1:1".parse().unwrap(),
        vm.clone(),
        options(0),
        Arc::new(NoMigrationEvents),
    )
    .err()
    .unwrap();
    assert!(matches!(err, SnapshotError::NotAFile(_)), "{err}");
    vm.shutdown();
}

#[test]
fn verify_digest_catches_writes_that_bypass_the_protection() {
    if !uffd_wp_usable() {
        return;
    }
    let vm = TestVm::build(Backend::SharedMemfd, 32 << 20, 4096, true);
    while vm.written() < 4096 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let path = scratch("bypass");
    let snap = BackgroundSnapshot::start_with(
        MigrationUri::File {
            path: path.clone(),
            offset: 0,
        },
        vm.clone(),
        options(16 << 20),
        Arc::new(NoMigrationEvents),
        SnapshotSettings {
            verify_digest: true,
        },
    )
    .unwrap();
    assert_eq!(wait_end(&snap), MigrationStatus::Failed);
    let err = snap.error().unwrap();
    assert!(err.contains("does not hold guest memory"), "{err}");
    assert!(
        !path.exists(),
        "a snapshot that failed its check is removed"
    );
    assert_eq!(protected_pages(&vm.ram).unwrap(), 0);
    vm.shutdown();
}

#[test]
fn a_paused_guest_is_saved_unprotected_and_must_stay_paused() {
    let vm = TestVm::new(Backend::SharedMemfd, 32 << 20, 4096);
    while vm.written() < 4096 {
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.stop_vcpus().unwrap();
    let digest = page_digest(&vm.ram);
    let path = scratch("paused");
    let snap = BackgroundSnapshot::start(
        MigrationUri::File {
            path: path.clone(),
            offset: 0,
        },
        vm.clone(),
        options(0),
        Arc::new(NoMigrationEvents),
    )
    .unwrap();
    assert_eq!(
        wait_end(&snap),
        MigrationStatus::Completed,
        "{:?}",
        snap.error()
    );
    let report = snap.report();
    assert!(
        !report.guest_running && report.unpopulated.is_none(),
        "{report:?}"
    );
    assert_eq!(snap.start_digest(), Some(digest));
    assert_eq!(report.faults, 0);

    // Resumed in the middle: the file could not hold one instant any more.
    let snap = BackgroundSnapshot::start(
        MigrationUri::File {
            path: path.clone(),
            offset: 0,
        },
        vm.clone(),
        options(4 << 20),
        Arc::new(NoMigrationEvents),
    )
    .unwrap();
    while snap.status() != MigrationStatus::Active {
        std::thread::sleep(Duration::from_millis(2));
    }
    vm.resume_vcpus().unwrap();
    assert_eq!(wait_end(&snap), MigrationStatus::Failed);
    assert!(
        snap.error().unwrap().contains("resumed"),
        "{:?}",
        snap.error()
    );
    assert!(!path.exists());
    vm.shutdown();
}
