//! Guest memory backends at boot and shutdown: hugetlb without reserved pages, a shared
//! file that holds the guest's memory after a clean shutdown, and preallocation.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use tests::{
    ferry_bin, huge_pages, kvm_missing, one_guest_test_at_a_time, skip_unless, Ferry, FerryOptions,
    TempDir,
};

#[test]
fn hugetlb_without_enough_free_pages_is_refused_with_the_numbers() {
    if skip_unless(
        "hugetlb_without_enough_free_pages_is_refused_with_the_numbers",
        kvm_missing(),
    ) {
        return;
    }
    let (free, _) = huge_pages();
    if free >= 64 {
        eprintln!("SKIP: this host has {free} free huge pages");
        return;
    }
    for memory in [
        "128M,hugepages=hugetlb",
        "128M,backend=anon,hugepages=hugetlb",
    ] {
        let out = Command::new(ferry_bin())
            .args(["run", "--memory", memory, "--serial", "none"])
            .output()
            .expect("run ferry");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{memory}: {err}");
        assert!(
            err.contains("needs 64 free 2048 KiB huge pages") && err.contains("nr_hugepages"),
            "{memory}: the error names what is missing: {err}"
        );
    }
}

#[test]
fn a_shared_file_holds_the_guests_memory_after_a_clean_shutdown() {
    if skip_unless(
        "a_shared_file_holds_the_guests_memory_after_a_clean_shutdown",
        kvm_missing(),
    ) {
        return;
    }
    let _one = one_guest_test_at_a_time();
    let dir = TempDir::new("backend-shared-file");
    let image = dir.join("guest.img");
    // Every page carries its number, so untouched parts can be checked afterwards.
    let mut bytes = vec![0u8; 64 << 20];
    for (i, page) in bytes.chunks_mut(4096).enumerate() {
        page[..8].copy_from_slice(&(i as u64 | 0xabc0_0000_0000).to_le_bytes());
    }
    std::fs::write(&image, &bytes).expect("write the image");
    let memory = format!("64M,mem-path={},share=on", image.display());
    let mut f = Ferry::start(
        "shared-file",
        &FerryOptions {
            memory: memory.clone(),
            vcpus: 1,
            workload: Some("working-set=16M,rate=20000".into()),
            ..FerryOptions::default()
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(f.pages_written() > 0);
    f.cmd("stop", json!({}));
    let digest = f.cmd("ferry-memory-digest", json!({}))["digest"].clone();
    f.cmd("quit", json!({}));
    assert_eq!(f.wait_exit(Duration::from_secs(10)), Some(0), "{}", f.log());

    // The file is the memory: a process that maps it without booting (an incoming guest
    // writes nothing) sees the same digest.
    let mut again = Ferry::start(
        "shared-file-again",
        &FerryOptions {
            memory,
            vcpus: 1,
            workload: None,
            incoming: Some("defer".into()),
            ..FerryOptions::default()
        },
    );
    assert_eq!(
        again.cmd("ferry-memory-digest", json!({}))["digest"],
        digest,
        "the file holds the guest's memory after a clean shutdown"
    );
    drop(again);
    let now = std::fs::read(&image).expect("read the image");
    assert_eq!(now.len(), 64 << 20);
    // Beyond the boot area (2 MiB) and the working set (16 MiB from 2 MiB) nothing changed;
    // the working set holds the guest's pages, not the image's.
    let page =
        |i: usize| u64::from_le_bytes(now[i * 4096..i * 4096 + 8].try_into().unwrap_or([0; 8]));
    for i in [(18 << 20) / 4096, (40 << 20) / 4096, (64 << 20) / 4096 - 1] {
        assert_eq!(
            page(i),
            i as u64 | 0xabc0_0000_0000,
            "page {i} keeps the image's bytes"
        );
    }
    assert_ne!(
        &now[2 << 20..(2 << 20) + 4096],
        &bytes[2 << 20..(2 << 20) + 4096],
        "the working set's first page was written by the guest"
    );
}

#[test]
fn preallocated_guests_boot_verify_and_say_so() {
    if skip_unless("preallocated_guests_boot_verify_and_say_so", kvm_missing()) {
        return;
    }
    let _one = one_guest_test_at_a_time();
    for memory in [
        "1G,prealloc=on",
        "1G,backend=anon,prealloc=on,hugepages=thp",
    ] {
        let mut f = Ferry::start(
            "prealloc",
            &FerryOptions {
                memory: memory.into(),
                vcpus: 1,
                workload: Some("working-set=16M,rate=20000".into()),
                ..FerryOptions::default()
            },
        );
        let log = f.log();
        assert!(
            log.contains("preallocated 1024 MiB of guest memory"),
            "{memory}: a summary line for a large guest: {log}"
        );
        std::thread::sleep(Duration::from_millis(200));
        let (checked, bad) = f.guest_verify();
        assert_eq!((checked, bad), (16 << 8, 0), "{memory}");
    }
}
