//! Guest memory backends end to end: each boots and verifies, migrates to a different
//! backend and back (0 bad pages, equal memory digests), and takes a background snapshot
//! where the backend supports write protection (and says clearly where it does not).

use std::time::Duration;

use serde_json::json;
use tests::{
    free_port, huge_pages, kvm_missing, one_guest_test_at_a_time, skip_unless, Ferry, FerryOptions,
    Mount, TempDir,
};

/// Small guests: a 16 MiB working set rewritten at 20000 pages/s.
const WORKLOAD: &str = "working-set=16M,rate=20000";

fn options(memory: &str) -> FerryOptions {
    FerryOptions {
        memory: memory.into(),
        vcpus: 1,
        workload: Some(WORKLOAD.into()),
        ..FerryOptions::default()
    }
}

fn wait_progress(f: &mut Ferry) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while f.pages_written() < 4096 {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest does not write: {}",
            f.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A destination with `memory` listening on a free loopback port, its guest kept paused
/// after the migration (`-S`); returns it and the port.
fn paused_destination(tag: &str, memory: &str) -> (Ferry, u16) {
    let port = free_port();
    let dst = Ferry::start(
        tag,
        &FerryOptions {
            memory: memory.into(),
            vcpus: 1,
            workload: None,
            incoming: Some(format!("tcp:127.0.0.1:{port}")),
            extra: vec!["-S".into()],
            ..FerryOptions::default()
        },
    );
    (dst, port)
}

/// Migrates the running `src` into a new destination with `memory`; checks the digests,
/// the host-side verify and the guest's own verify there; returns the destination, running.
fn migrate_to(src: &mut Ferry, tag: &str, memory: &str) -> Ferry {
    migrate_to_at(src, tag, memory, 0)
}

/// [`migrate_to`] with max-bandwidth `bandwidth` (bytes/s, 0: unlimited).
fn migrate_to_at(src: &mut Ferry, tag: &str, memory: &str, bandwidth: u64) -> Ferry {
    let (mut dst, port) = paused_destination(tag, memory);
    let before = src.pages_written();
    src.cmd(
        "migrate-set-parameters",
        json!({ "max-bandwidth": bandwidth }),
    );
    src.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = src.wait_migration_end(Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{tag}: {info}\n{}", src.log());
    let d = dst.wait_migration_end(Duration::from_secs(10));
    assert_eq!(d["status"], "completed", "{tag}: {d}\n{}", dst.log());
    assert_eq!(
        src.cmd("ferry-memory-digest", json!({}))["digest"],
        dst.cmd("ferry-memory-digest", json!({}))["digest"],
        "{tag}: destination memory equals the source's at switchover"
    );
    let host = dst.cmd("ferry-host-verify", json!({}));
    assert_eq!(host["bad-pages"], 0, "{tag}: {host}");
    dst.cmd("cont", json!({}));
    let (checked, bad) = dst.guest_verify();
    assert_eq!(bad, 0, "{tag}: the guest found bad pages");
    assert_eq!(
        checked,
        16 << 8,
        "{tag}: the guest checked its whole working set"
    );
    assert!(dst.pages_written() >= before, "{tag}: progress continues");
    dst
}

/// Local migration (`x-ignore-shared` over a unix socket) of a guest with `memory`: the
/// destination maps the source's memory instead of receiving it, so no page travels; the
/// guest verifies there with 0 bad pages and keeps running.
fn local_migration(tag: &str, memory: &str) {
    let ignore_shared = json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]});
    let mut src = Ferry::start(&format!("{tag}-src"), &options(memory));
    let mut dst = Ferry::start(
        &format!("{tag}-dst"),
        &FerryOptions {
            workload: None,
            incoming: Some("defer".into()),
            ..options(memory)
        },
    );
    wait_progress(&mut src);
    src.cmd("migrate-set-capabilities", ignore_shared.clone());
    dst.cmd("migrate-set-capabilities", ignore_shared);
    let uri = format!("unix:{}", dst.dir.join("migration.sock").display());
    dst.cmd("migrate-incoming", json!({ "uri": uri }));
    let before = src.pages_written();
    src.cmd("migrate", json!({ "uri": uri }));
    let info = src.wait_migration_end(Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{tag}: {info}\n{}", src.log());
    assert_eq!(info["ram"]["normal"], 0, "{tag}: no page was sent: {info}");
    let d = dst.wait_migration_end(Duration::from_secs(10));
    assert_eq!(d["status"], "completed", "{tag}: {d}\n{}", dst.log());
    assert_eq!(dst.status(), "running");
    let (checked, bad) = dst.guest_verify();
    assert_eq!(bad, 0, "{tag}: the guest found bad pages");
    assert_eq!(checked, 16 << 8, "{tag}: the guest checked its working set");
    assert!(dst.pages_written() >= before, "{tag}: progress continues");
}

/// Boots `a`, migrates it to `b`, and back to `a` again.
fn round_trip(tag: &str, a: &str, b: &str, a_again: &str) {
    let mut src = Ferry::start(&format!("{tag}-a"), &options(a));
    wait_progress(&mut src);
    let (_, bad) = src.guest_verify();
    assert_eq!(bad, 0, "{tag}: {a} boots and verifies");
    let mut mid = migrate_to(&mut src, &format!("{tag}-b"), b);
    wait_progress(&mut mid);
    drop(src);
    let _back = migrate_to(&mut mid, &format!("{tag}-a2"), a_again);
}

#[test]
fn memfd_and_anonymous_memory_migrate_both_ways() {
    if skip_unless(
        "memfd_and_anonymous_memory_migrate_both_ways",
        kvm_missing(),
    ) {
        return;
    }
    let _one = one_guest_test_at_a_time();
    round_trip("memfd-anon", "64M", "64M,backend=anon", "64M");
}

/// The `T` of the destination's "populated N of T MiB ahead of the receiver" line.
fn populate_total_mib(log: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains("ahead of the receiver"))?;
    let rest = line.split(" of ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn the_destination_allocates_only_the_memory_the_source_guest_uses() {
    if skip_unless(
        "the_destination_allocates_only_the_memory_the_source_guest_uses",
        kvm_missing(),
    ) {
        return;
    }
    let _one = one_guest_test_at_a_time();
    // A 1 GiB guest whose workload writes 16 MiB: the pages it never touched read as zero
    // and must not be allocated on the destination either (QEMU allocates what it
    // receives), populate ahead or not.
    // At 16 MiB/s the migration lasts long enough for a populate of all RAM to finish.
    for (tag, memory, field) in [
        ("sparse-memfd", "1G", "RssShmem"),
        ("sparse-anon", "1G,backend=anon", "RssAnon"),
    ] {
        let mut src = Ferry::start(&format!("{tag}-src"), &options(memory));
        wait_progress(&mut src);
        // 4 MB/s of writes, so that 16 MiB/s converges.
        src.cmd("ferry-guest-set-rate", json!({"rate": 1000}));
        let used = src.status_kib(field);
        let dst = migrate_to_at(&mut src, &format!("{tag}-dst"), memory, 16 << 20);
        let got = dst.status_kib(field);
        let log = dst.log();
        eprintln!("{tag}: source {field} {used} KiB, destination {got} KiB\n{log}");
        assert!(
            got < 256 << 10,
            "{tag}: the destination holds {got} KiB of a 1 GiB guest that uses {used} KiB"
        );
        // Beyond what the source holds, at most the 64 MiB populated before the source
        // said what holds data, and a little of the VMM's own.
        assert!(
            got <= used + (80 << 10),
            "{tag}: the destination holds {got} KiB, the source {used} KiB"
        );
        if let Some(total) = populate_total_mib(&log) {
            assert!(
                total < 256,
                "{tag}: populated ahead over {total} MiB of a guest that uses {used} KiB"
            );
        }
    }
}

#[test]
fn file_backed_memory_migrates_to_and_from_other_backends() {
    if skip_unless(
        "file_backed_memory_migrates_to_and_from_other_backends",
        kvm_missing(),
    ) {
        return;
    }
    let _one = one_guest_test_at_a_time();
    let dir = TempDir::new("backend-files");
    // A plain file shared -> preallocated memfd -> a private mapping of another file.
    round_trip(
        "file-prealloc",
        &format!("64M,mem-path={},share=on", dir.join("a.img").display()),
        "64M,prealloc=on",
        &format!("64M,mem-path={},share=off", dir.join("c.img").display()),
    );
    // /dev/shm (tmpfs) shared -> anonymous with transparent huge pages -> /dev/shm again.
    let shm = format!("/dev/shm/ferry-test-{}", std::process::id());
    round_trip(
        "shm-thp",
        &format!("64M,mem-path={shm}-a,share=on"),
        "64M,backend=anon,hugepages=thp",
        &format!("64M,mem-path={shm}-b,share=on"),
    );
    let _ = std::fs::remove_file(format!("{shm}-a"));
    let _ = std::fs::remove_file(format!("{shm}-b"));
}

#[test]
fn memfd_with_transparent_huge_pages_migrates_or_says_why_it_cannot_use_them() {
    if skip_unless(
        "memfd_with_transparent_huge_pages_migrates_or_says_why_it_cannot_use_them",
        kvm_missing(),
    ) {
        return;
    }
    let _one = one_guest_test_at_a_time();
    let shmem = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    let mut f = Ferry::start("memfd-thp-boot", &options("64M,hugepages=thp"));
    wait_progress(&mut f);
    let log = f.log();
    let off = shmem.contains("[never]") || shmem.contains("[deny]") || shmem.is_empty();
    assert_eq!(
        log.contains("transparent huge pages for shared (memfd/tmpfs) memory are off"),
        off,
        "shmem_enabled is {shmem:?}; the warning says so exactly then:\n{log}"
    );
    drop(f);
    round_trip(
        "memfd-thp",
        "64M,hugepages=thp",
        "64M,backend=anon,hugepages=thp",
        "64M,hugepages=thp",
    );
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Huge pages reserved for a test; the host's count comes back on drop.
struct HugePageReservation {
    before: u64,
}

impl HugePageReservation {
    /// Reserves `pages` more huge pages (root only), or says why not.
    fn reserve(pages: u64) -> Result<Self, String> {
        let (_, before) = huge_pages();
        std::fs::write(NR_HUGEPAGES, (before + pages).to_string())
            .map_err(|e| format!("cannot write {NR_HUGEPAGES}: {e}"))?;
        let me = HugePageReservation { before };
        let (free, _) = huge_pages();
        if free < pages {
            return Err(format!(
                "the host reserved only {free} free huge pages of {pages} asked for"
            ));
        }
        Ok(me)
    }
}

impl Drop for HugePageReservation {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.before.to_string());
    }
}

#[test]
fn hugetlb_memory_migrates_both_ways_and_locally_and_refuses_background_snapshots() {
    let test = "hugetlb_memory_migrates_both_ways_and_locally_and_refuses_background_snapshots";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let _one = one_guest_test_at_a_time();
    // Two 64 MiB guests at a time, with room to spare.
    let _pages = match HugePageReservation::reserve(96) {
        Ok(r) => r,
        Err(why) => {
            eprintln!("SKIP {test}: {why}");
            return;
        }
    };
    let fs = match Mount::new("hugetlbfs", "hugetlbfs", None) {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIP {test}: {why}");
            return;
        }
    };
    // memfd with hugetlb pages -> default memfd -> a file on hugetlbfs.
    round_trip(
        "hugetlb",
        "64M,hugepages=hugetlb",
        "64M",
        &format!("64M,mem-path={},share=on", fs.join("guest").display()),
    );
    // A local migration hands the hugetlb memfd over instead of copying it.
    local_migration("hugetlb-local", "64M,hugepages=hugetlb");
    // Background snapshots of hugetlb memory are refused when the capability is set.
    let dir = TempDir::new("hugetlb-snap");
    snapshot_case("hugetlb", "64M,hugepages=hugetlb", &dir);
}

#[test]
fn a_file_image_is_the_guests_memory_and_migrates_with_it() {
    if skip_unless(
        "a_file_image_is_the_guests_memory_and_migrates_with_it",
        kvm_missing(),
    ) {
        return;
    }
    let _one = one_guest_test_at_a_time();
    let dir = TempDir::new("backend-image");
    let image = dir.join("image.img");
    // 64 MiB whose every page past the guest's working set carries a pattern.
    let mut bytes = vec![0u8; 64 << 20];
    for (i, page) in bytes.chunks_mut(4096).enumerate() {
        page[..8].copy_from_slice(&(i as u64 ^ 0xfeed_0000).to_le_bytes());
    }
    std::fs::write(&image, &bytes).expect("write the image");
    let mut src = Ferry::start(
        "image-src",
        &FerryOptions {
            memory: format!("64M,mem-path={},share=off", image.display()),
            vcpus: 1,
            workload: Some("working-set=0".into()),
            ..FerryOptions::default()
        },
    );
    // The pattern pages were never touched by the guest: the migration must still carry
    // them (they are the file's, not zero), so the memfd destination ends up equal.
    let dst = migrate_to_paused(&mut src, "image-dst", "64M");
    drop(dst);
    assert_eq!(
        std::fs::read(&image).expect("read the image"),
        bytes,
        "share=off never writes to the file"
    );
}

/// Migrates into a paused destination and compares digests only (a guest without a
/// working set has nothing to verify).
fn migrate_to_paused(src: &mut Ferry, tag: &str, memory: &str) -> Ferry {
    let (mut dst, port) = paused_destination(tag, memory);
    src.cmd("migrate-set-parameters", json!({"max-bandwidth": 0}));
    src.cmd("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let info = src.wait_migration_end(Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{tag}: {info}");
    assert!(
        info["ram"]["normal"].as_u64().unwrap_or(0) >= 15_000,
        "{tag}: the image's pages went as data, not as zero pages: {info}"
    );
    let d = dst.wait_migration_end(Duration::from_secs(10));
    assert_eq!(d["status"], "completed", "{tag}: {d}");
    assert_eq!(
        src.cmd("ferry-memory-digest", json!({}))["digest"],
        dst.cmd("ferry-memory-digest", json!({}))["digest"],
        "{tag}: destination memory equals the source's"
    );
    dst
}

#[test]
fn background_snapshots_work_where_the_backend_allows_and_are_refused_clearly_elsewhere() {
    if skip_unless(
        "background_snapshots_work_where_the_backend_allows_and_are_refused_clearly_elsewhere",
        kvm_missing(),
    ) {
        return;
    }
    let _one = one_guest_test_at_a_time();
    let dir = TempDir::new("backend-snap");
    let cases = [
        ("memfd", "64M".to_string()),
        ("anon", "64M,backend=anon".to_string()),
        ("anon-thp", "64M,backend=anon,hugepages=thp".to_string()),
        (
            "disk-file",
            format!("64M,mem-path={},share=on", dir.join("disk.img").display()),
        ),
    ];
    for (name, memory) in cases {
        snapshot_case(name, &memory, &dir);
    }
}

/// Takes a background snapshot of a guest with `memory` into `dir` and restores it (0 bad
/// pages, the memory of the snapshot's start); a plain disk file and hugetlb memory must be
/// refused.
fn snapshot_case(name: &str, memory: &str, dir: &TempDir) {
    let mut src = Ferry::start(&format!("snap-{name}"), &options(memory));
    wait_progress(&mut src);
    let set = src.try_cmd(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
    );
    let err = match set {
        Ok(_) => None,
        Err(tests_err) => Some(tests_err.to_string()),
    };
    if name == "disk-file" || name == "hugetlb" {
        // Userfaultfd cannot write-protect a file on a disk file system; Ferry's snapshot
        // tracks 4 KiB pages only. Refused up front, with QEMU's words.
        let e = err.unwrap_or_default();
        assert!(
            e.contains("Background-snapshot is not compatible with guest memory configuration"),
            "{name}: background-snapshot must be refused: {e:?}"
        );
        assert_eq!(
            src.cmd("query-migrate", json!({})).get("status"),
            None,
            "{name}: no migration ran"
        );
        return;
    }
    if let Some(e) = err {
        // A host without userfaultfd write protection refuses for every backend.
        eprintln!("SKIP snapshot of {name}: {e}");
        return;
    }
    let file = dir.join(&format!("{name}.snap"));
    src.cmd(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    let info = src.wait_migration_end(Duration::from_secs(60));
    assert_eq!(info["status"], "completed", "{name}: {info}\n{}", src.log());
    assert_eq!(src.status(), "running", "{name}: the guest runs on");
    let snap = src.cmd("ferry-query-snapshot", json!({}));
    let mut restored = Ferry::start(
        &format!("snap-{name}-restored"),
        &FerryOptions {
            memory: "64M".into(),
            vcpus: 1,
            workload: None,
            incoming: Some(format!("file:{}", file.display())),
            extra: vec!["-S".into()],
            ..FerryOptions::default()
        },
    );
    let d = restored.wait_migration_end(Duration::from_secs(30));
    assert_eq!(d["status"], "completed", "{name}: {d}\n{}", restored.log());
    if let Some(digest) = snap.get("digest").filter(|d| d.is_string()) {
        assert_eq!(
            &restored.cmd("ferry-memory-page-digest", json!({}))["digest"],
            digest,
            "{name}: the restored memory is the memory at the snapshot's start"
        );
    }
    let host = restored.cmd("ferry-host-verify", json!({}));
    assert_eq!(host["bad-pages"], 0, "{name}: {host}");
}
