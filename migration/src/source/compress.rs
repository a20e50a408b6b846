//! Starts the legacy compression threads of an outgoing migration (capability `compress`).

use std::sync::Arc;

use super::Shared;
use crate::compress::{CompressCounters, CompressPool};
use crate::error::Result;
use crate::options::Capability;

/// The compression threads when `compress` is on (never with multifd, which the capability
/// check refuses); their counters go to query-migrate.
pub(super) fn start_pool(shared: &Shared, multifd: bool) -> Result<Option<CompressPool>> {
    if !shared.caps().get(Capability::Compress) || multifd {
        return Ok(None);
    }
    let p = shared.options.params();
    let counters = Arc::new(CompressCounters::default());
    shared.set_compress_counters(counters.clone());
    Ok(Some(CompressPool::start(
        shared.vm.ram(),
        p.compress_threads,
        p.compress_level,
        p.compress_wait_thread,
        counters,
    )?))
}
