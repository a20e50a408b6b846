//! XBZRLE end to end: a guest that rewrites a few bytes of many pages, migrated through
//! a link too slow for raw pages; the cache is too small at first (nothing converges),
//! then resized during the migration, after which XBZRLE carries the re-dirtied pages in
//! a few bytes each and the migration completes with every page intact.

mod migration_support;

use std::time::{Duration, Instant};

use migration_support::{
    assert_completed_and_identical, migrate, set_caps, set_params, start_dest, start_source,
    sync_count, transferred, Guest,
};
use serde_json::{json, Value};
use tests::{kvm_missing, one_guest_test_at_a_time, skip_unless, FerryOptions};

const MIB: u64 = 1 << 20;

/// 256 MiB, 32 MiB rewritten 8 bytes per page at 20000 pages/s (78 MiB/s of raw pages).
const SPARSE: Guest = Guest {
    memory: "256M",
    vcpus: 1,
    working_set: "32M",
    rate: 20_000,
};

fn xbzrle(info: &Value, field: &str) -> u64 {
    info.pointer(&format!("/xbzrle-cache/{field}"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

#[test]
fn a_cache_resized_mid_migration_lets_xbzrle_carry_sparse_writes_and_converge() {
    let _one = one_guest_test_at_a_time();
    let test = "a_cache_resized_mid_migration_lets_xbzrle_carry_sparse_writes_and_converge";
    if skip_unless(test, kvm_missing()) {
        return;
    }
    let guest = SPARSE;
    let mut sopts: FerryOptions = guest.source(None);
    sopts.workload = Some(format!(
        "working-set={},rate={},pattern=sparse",
        guest.working_set, guest.rate
    ));
    let mut src = start_source("xbz-src", &guest, sopts);
    let mut dopts = guest.dest("tcp:127.0.0.1:0", None);
    dopts.extra.push("-S".into());
    let (mut dst, uri) = start_dest("xbz-dst", dopts);
    for f in [&mut src, &mut dst] {
        set_caps(f, &["xbzrle"]);
    }
    // 16 MiB/s carries 4096 raw pages a second: far below what the guest dirties, so
    // only XBZRLE can make this converge. A 1 MiB cache holds 256 pages of the 8192.
    set_params(
        &mut src,
        json!({"max-bandwidth": 16 * MIB, "xbzrle-cache-size": MIB, "downtime-limit": 300}),
    );
    migrate(&mut src, &uri);

    // Three passes with the small cache: nearly every re-dirtied page misses it.
    let small = src.wait_migration(Duration::from_secs(60), |i| {
        sync_count(i) >= 3 || i["status"] != "active" && i["status"] != "setup"
    });
    assert_eq!(
        small["status"], "active",
        "with a 1 MiB cache the migration must still be iterating: {small}"
    );
    assert_eq!(xbzrle(&small, "cache-size"), MIB, "{small}");
    let misses_small = xbzrle(&small, "cache-miss");
    assert!(
        misses_small > 1000,
        "pages that do not fit a 1 MiB cache miss it: {small}"
    );

    // Grow the cache while the migration runs (the encoder picks it up between batches;
    // query-migrate's figures follow at the next pass).
    set_params(&mut src, json!({"xbzrle-cache-size": 64 * MIB}));
    let grown = src.cmd("query-migrate", json!({}));
    let resized_at = transferred(&grown);
    let start = Instant::now();

    let info = assert_completed_and_identical(&mut src, &mut dst, &guest);
    let after_resize = transferred(&info) - resized_at;
    eprintln!(
        "{test}: completed {:?} after the resize; {after_resize} bytes since; {}",
        start.elapsed(),
        info["xbzrle-cache"]
    );
    assert_eq!(xbzrle(&info, "cache-size"), 64 * MIB, "{info}");
    let pages = xbzrle(&info, "pages");
    let bytes = xbzrle(&info, "bytes");
    assert!(
        pages >= guest.ws_pages() / 2,
        "most of the working set went as XBZRLE deltas once the cache held it: {info}"
    );
    assert!(
        bytes * 20 < pages * 4096,
        "8 changed bytes per page must encode in far fewer bytes than the pages: \
         {bytes} bytes for {pages} pages"
    );
    // After the resize: at most one pass of raw pages to fill the cache, then deltas.
    assert!(
        after_resize < 3 * 32 * MIB,
        "{after_resize} bytes after the resize"
    );
    let rate = info
        .pointer("/xbzrle-cache/encoding-rate")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    assert!(rate > 0.0, "encoding-rate is reported: {info}");
}
