//! A guest control device restored from a migration stream or a snapshot file refuses a
//! workload layout whose numbers do not fit, instead of overflowing.
//!
//! Regression: found with the `snapshot_restore` fuzz target (fuzz/): a STATE document whose
//! vCPU slice has `first_page` near `u64::MAX` overflowed `first_page + pages` (a panic with
//! overflow checks; without them the sum wrapped and the slice was accepted).

use std::sync::Arc;

use devices::guest_control::{ControlError, GuestControl, VcpuSlice, WorkloadLayout};
use ram::{Backend, GuestRam, MemoryConfig};

fn ram() -> Arc<GuestRam> {
    Arc::new(
        GuestRam::new(&MemoryConfig {
            size: 4 << 20,
            backend: Backend::AnonymousPrivate,
            ..MemoryConfig::default()
        })
        .expect("guest RAM"),
    )
}

/// The layout of the 4 MiB seed snapshot, with the slice's first page and size given.
fn layout(first_page: u64, pages: u64) -> WorkloadLayout {
    WorkloadLayout {
        ws_ram_offset: 2 << 20,
        ws_pages: 16,
        slices: vec![VcpuSlice {
            mailbox_gpa: 0x8_0000,
            slice_va: 0x80_0000_0000,
            first_page,
            pages,
        }],
    }
}

#[test]
fn a_slice_whose_end_overflows_is_refused() {
    for (first, pages) in [(u64::MAX, 16), (u64::MAX - 15, 16), (1, u64::MAX)] {
        match GuestControl::new(ram(), layout(first, pages)) {
            Err(ControlError::BadLayout(why)) => assert!(why.contains("bad slice"), "{why}"),
            Err(e) => panic!("{first}+{pages}: unexpected error {e}"),
            Ok(_) => panic!("{first}+{pages}: accepted"),
        }
    }
}

#[test]
fn a_slice_inside_the_working_set_is_accepted_and_one_past_it_refused() {
    assert!(GuestControl::new(ram(), layout(0, 16)).is_ok());
    assert!(GuestControl::new(ram(), layout(8, 8)).is_ok());
    assert!(GuestControl::new(ram(), layout(8, 9)).is_err());
}
