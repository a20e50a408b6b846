//! Two "hosts" for migration tests: network namespaces joined by a veth pair.
//!
//! The pair itself lives in [`vmm::hostpair`] (shared with `ferry demo`); this
//! module re-exports it and adds what tests need around it.

use std::sync::{Mutex, MutexGuard};

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
/// compete for them make timings (convergence, rates) meaningless.
pub fn one_guest_test_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}
