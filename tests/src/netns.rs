//! Two "hosts" for migration tests: network namespaces joined by a veth pair.
//!
//! The pair itself lives in [`vmm::hostpair`] (shared with `ferry demo`); this
//! module re-exports it and adds what tests need around it.

use std::sync::{Mutex, MutexGuard};

use crate::watchdog::{self, Watchdog};

pub use vmm::hostpair::{remove_stale, Host, HostPair, HostPairError, ADDR_A, ADDR_B};

use crate::netns_missing;

/// A host pair of two namespaces for `test`, or None (with the reason printed) when the
/// host cannot create namespaces.
pub fn host_pair_or_skip(test: &str) -> Option<HostPair> {
    if let Some(why) = netns_missing() {
        eprintln!("SKIP {test}: {why}");
        return None;
    }
    match HostPair::create() {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("SKIP {test}: cannot build the host pair: {e}");
            None
        }
    }
}

/// Serializes tests that boot guests: the test machines have few cores, and guests that
/// compete for them make timings (convergence, rates) meaningless. The test is also
/// watched from then on ([`watchdog`]): one that hangs is made to fail.
pub fn one_guest_test_at_a_time() -> GuestTestGuard {
    static LOCK: Mutex<()> = Mutex::new(());
    let lock = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    GuestTestGuard {
        _watchdog: watchdog::arm(),
        _lock: lock,
    }
}

/// Held by a test that boots guests: the lock on the machine plus the test's watchdog.
pub struct GuestTestGuard {
    _watchdog: Watchdog,
    _lock: MutexGuard<'static, ()>,
}
