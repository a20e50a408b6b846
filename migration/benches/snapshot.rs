//! Background-snapshot costs measured in this process (no KVM: a host thread plays the
//! guest, so these are the userfaultfd and writer costs alone; `ferry bench snapshot` has
//! the end-to-end figures with a real guest).
//!
//! Printed first:
//! - write-fault service latency as the faulting thread sees it (from its store to the
//!   store completing: the kernel's fault, the handler's copy and claim, the unprotect and
//!   wake-up), p50/p90/p99/max over every page of 64 MiB, memfd and anonymous memory;
//! - a writer thread's throughput (pages/s) while the snapshot runs, as a ratio to
//!   without one.
//!
//! Then criterion times: a whole snapshot of 256 MiB (128 MiB of data) to a file on disk
//! (bytes/s), and the setup steps inside the guest's stall (write-protecting 1 GiB).
//!
//! `CARGO_TARGET_DIR=/work/target-h8 cargo bench -p migration --bench snapshot`

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use migration::events::NoMigrationEvents;
use migration::info::MigrationStatus;
use migration::options::{
    Capability, CapabilityStatus, FixedHostSupport, MigrationOptions, ParametersUpdate,
};
use migration::snapshot::fault::{FaultContext, FaultHandler, FaultStats};
use migration::snapshot::{BackgroundSnapshot, LatencyHistogram, PageClaims, WriteProtector};
use migration::transport::MigrationUri;
use migration::vm::{DirtyTracker, SourceVm};
use ram::{AtomicBitmap, Backend, GuestRam, MemoryConfig, PAGE_SIZE};

fn ram(size: u64, backend: Backend) -> Arc<GuestRam> {
    Arc::new(
        GuestRam::new(&MemoryConfig {
            size,
            backend,
            ..MemoryConfig::default()
        })
        .expect("guest RAM"),
    )
}

fn fill(ram: &GuestRam, pages: u64) {
    let mut page = vec![0u8; PAGE_SIZE];
    for p in 0..pages {
        for (i, w) in page.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&(p * 512 + i as u64 + 1).to_le_bytes());
        }
        ram.write_page(p, &page).expect("write");
    }
}

/// Every page of `ram` protected and served by a fault handler; the faulting thread times
/// each first write.
fn fault_latency(backend: Backend) -> (LatencyHistogram, Arc<FaultStats>) {
    let ram = ram(64 << 20, backend);
    fill(&ram, ram.page_count());
    let protector = Arc::new(WriteProtector::new(&ram).expect("userfaultfd"));
    protector.populate_if_needed();
    protector.protect_all().expect("protect");
    let claims = Arc::new(PageClaims::new(ram.page_count()));
    let stats = Arc::new(FaultStats::default());
    let (tx, rx) = crossbeam_channel::unbounded();
    let handler = FaultHandler::spawn(FaultContext {
        protector: protector.clone(),
        ram: ram.clone(),
        claims,
        copies: tx,
        stats: stats.clone(),
    })
    .expect("handler");
    let drain = std::thread::spawn(move || rx.iter().count());
    let seen = LatencyHistogram::new();
    for p in 0..ram.page_count() {
        let ptr = ram.page_ptr(p).expect("page");
        let t0 = Instant::now();
        // SAFETY: `ptr` is the first byte of a page of guest RAM owned by `ram`; nothing
        // else writes it.
        unsafe { std::ptr::write_volatile(ptr, 0x5a) };
        seen.record(t0.elapsed());
    }
    handler.stop();
    drop(protector);
    let _ = drain.join();
    (seen, stats)
}

struct BenchVm {
    ram: Arc<GuestRam>,
}

struct NoTracker;

impl DirtyTracker for NoTracker {
    fn name(&self) -> &str {
        "none"
    }
    fn start(&self) -> Result<(), String> {
        Ok(())
    }
    fn sync(&self, _: &AtomicBitmap) -> Result<u64, String> {
        Ok(0)
    }
    fn stop(&self) {}
}

impl SourceVm for BenchVm {
    fn ram(&self) -> Arc<GuestRam> {
        self.ram.clone()
    }
    fn vcpus(&self) -> u32 {
        1
    }
    fn uuid(&self) -> [u8; 16] {
        [0; 16]
    }
    fn dirty_tracker(&self) -> Arc<dyn DirtyTracker> {
        Arc::new(NoTracker)
    }
    fn is_running(&self) -> bool {
        // As a running guest: the snapshot protects memory and serves faults.
        true
    }
    fn stop_vcpus(&self) -> Result<(), String> {
        Ok(())
    }
    fn resume_vcpus(&self) -> Result<(), String> {
        Ok(())
    }
    fn set_throttle(&self, _: u8) {}
    fn save_state(&self) -> Result<Vec<u8>, String> {
        Ok(b"{}".to_vec())
    }
    fn migrated_away(&self) {}
}

fn options() -> Arc<MigrationOptions> {
    let o = MigrationOptions::new();
    o.set_capabilities(
        &[CapabilityStatus::new(Capability::BackgroundSnapshot, true)],
        &FixedHostSupport::capable(),
    )
    .expect("capability");
    o.set_parameters(&ParametersUpdate {
        max_bandwidth: Some(0),
        ..ParametersUpdate::default()
    })
    .expect("unlimited");
    Arc::new(o)
}

fn snapshot_file() -> PathBuf {
    PathBuf::from(format!(
        "/var/tmp/ferry-bench-snapshot-{}",
        std::process::id()
    ))
}

fn take_snapshot(vm: &Arc<BenchVm>) -> Duration {
    let path = snapshot_file();
    let t0 = Instant::now();
    let s = BackgroundSnapshot::start(
        MigrationUri::File {
            path: path.clone(),
            offset: 0,
        },
        vm.clone(),
        options(),
        Arc::new(NoMigrationEvents),
    )
    .expect("start");
    s.join();
    let d = t0.elapsed();
    assert_eq!(s.status(), MigrationStatus::Completed, "{:?}", s.error());
    let _ = std::fs::remove_file(&path);
    d
}

/// A thread rewriting the first `pages` pages flat out; returns its pages/s over `run`
/// while `during` runs (or idles).
fn writer_rate(ram: &Arc<GuestRam>, pages: u64, during: impl FnOnce()) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let (r, s, c) = (ram.clone(), stop.clone(), count.clone());
    let t = std::thread::spawn(move || {
        let buf = vec![7u8; PAGE_SIZE];
        let mut n = 0u64;
        while !s.load(Ordering::Relaxed) {
            r.write_page(n % pages, &buf).expect("write");
            n += 1;
            c.store(n, Ordering::Relaxed);
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let (c0, t0) = (count.load(Ordering::Relaxed), Instant::now());
    during();
    let (c1, t1) = (count.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    let _ = t.join();
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}

fn print_figures() {
    if WriteProtector::new(&ram(2 << 20, Backend::SharedMemfd)).is_err() {
        eprintln!("no userfaultfd write-protect here: nothing to measure");
        return;
    }
    println!("write-fault service latency (the faulting thread's view, 16384 faults):");
    for (name, backend) in [
        ("memfd", Backend::SharedMemfd),
        ("anon", Backend::AnonymousPrivate),
    ] {
        let (seen, stats) = fault_latency(backend);
        let s = seen.summary();
        let h = stats.latency.summary();
        println!(
            "  {name:<6} p50 {:>6.1} µs  p90 {:>6.1} µs  p99 {:>6.1} µs  max {:>7.1} µs  (handler: p50 {:.1} µs, p99 {:.1} µs){}",
            s.p50_us,
            s.p90_us,
            s.p99_us,
            s.max_us,
            h.p50_us,
            h.p99_us,
            if s.p99_us < 1000.0 { "" } else { "  p99 goal (< 1 ms) NOT met" }
        );
    }
    let r = ram(256 << 20, Backend::SharedMemfd);
    fill(&r, 32768);
    let vm = Arc::new(BenchVm { ram: r.clone() });
    let idle = writer_rate(&r, 16384, || std::thread::sleep(Duration::from_millis(500)));
    let mut took = Duration::ZERO;
    let during = writer_rate(&r, 16384, || took = take_snapshot(&vm));
    println!(
        "a thread rewriting 64 MiB: {during:.0} pages/s during a {:.0} ms snapshot of 256 MiB, {idle:.0} without = {:.2}",
        took.as_secs_f64() * 1e3,
        during / idle
    );
}

fn benches(c: &mut Criterion) {
    if WriteProtector::new(&ram(2 << 20, Backend::SharedMemfd)).is_err() {
        return;
    }
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(10);
    let r = ram(256 << 20, Backend::SharedMemfd);
    fill(&r, 32768);
    let vm = Arc::new(BenchVm { ram: r });
    g.throughput(Throughput::Bytes(128 << 20));
    g.bench_function("256MiB_with_128MiB_data_to_disk_file", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| take_snapshot(&vm)).sum())
    });
    g.throughput(Throughput::Bytes(1 << 30));
    let big = ram(1 << 30, Backend::SharedMemfd);
    fill(&big, 4096);
    g.bench_function("write_protect_1GiB_memfd", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let p = WriteProtector::new(&big).expect("protector");
                let t0 = Instant::now();
                p.protect_all().expect("protect");
                total += t0.elapsed();
                black_box(&p);
            }
            total
        })
    });
    g.bench_function("data_ranges_1GiB_memfd", |b| {
        b.iter(|| black_box(big.data_ranges()))
    });
    g.finish();
}

fn main() {
    print_figures();
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
}
