//! [`OptionsHooks`]: how a parameter changed by `migrate-set-parameters`
//! reaches a migration that is already running.
//!
//! A running outgoing migration registers its hooks on the
//! [`MigrationOptions`](super::MigrationOptions) store and removes them when
//! it ends. After a successful set, the store calls them as QEMU's
//! `migrate_params_apply` does, in this order:
//!
//! 1. `max-bandwidth` given, and not in postcopy: [`OptionsHooks::max_bandwidth_changed`]
//!    (QEMU: `migration_rate_set`);
//! 2. `xbzrle-cache-size` given: [`OptionsHooks::xbzrle_cache_size_changed`]
//!    (QEMU: `xbzrle_cache_resize`; its error becomes the command's error,
//!    but the new size stays set, as in QEMU);
//! 3. `max-postcopy-bandwidth` given, and in postcopy:
//!    [`OptionsHooks::max_postcopy_bandwidth_changed`].
//!
//! Hooks run on the caller's thread (the QMP thread) with no lock of the
//! store held, so they may read the store; they must not set options.

/// Callbacks from the options store into a running migration.
pub trait OptionsHooks: Send + Sync {
    /// The bandwidth limit for precopy changed (bytes per second); feed the rate limiter.
    fn max_bandwidth_changed(&self, _bytes_per_second: u64) {}

    /// The background bandwidth limit for postcopy changed (bytes per second, 0 = unlimited).
    fn max_postcopy_bandwidth_changed(&self, _bytes_per_second: u64) {}

    /// The XBZRLE cache size changed; resize the cache, or say why it cannot be.
    fn xbzrle_cache_size_changed(&self, _bytes: u64) -> Result<(), String> {
        Ok(())
    }
}

/// One hook call, as recorded by [`RecordingHooks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookCall {
    /// [`OptionsHooks::max_bandwidth_changed`].
    MaxBandwidth(u64),
    /// [`OptionsHooks::max_postcopy_bandwidth_changed`].
    MaxPostcopyBandwidth(u64),
    /// [`OptionsHooks::xbzrle_cache_size_changed`].
    XbzrleCacheSize(u64),
}

/// Hooks that remember every call (for tests and diagnostics), optionally
/// failing XBZRLE resizes with a fixed message.
#[derive(Debug, Default)]
pub struct RecordingHooks {
    calls: std::sync::Mutex<Vec<HookCall>>,
    xbzrle_error: Option<String>,
}

impl RecordingHooks {
    /// Hooks that record and always succeed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Hooks whose XBZRLE resize fails with `message`.
    pub fn failing_xbzrle(message: &str) -> Self {
        RecordingHooks {
            calls: Default::default(),
            xbzrle_error: Some(message.to_string()),
        }
    }

    /// The calls so far, oldest first.
    pub fn calls(&self) -> Vec<HookCall> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn record(&self, call: HookCall) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(call);
        }
    }
}

impl OptionsHooks for RecordingHooks {
    fn max_bandwidth_changed(&self, bytes_per_second: u64) {
        self.record(HookCall::MaxBandwidth(bytes_per_second));
    }

    fn max_postcopy_bandwidth_changed(&self, bytes_per_second: u64) {
        self.record(HookCall::MaxPostcopyBandwidth(bytes_per_second));
    }

    fn xbzrle_cache_size_changed(&self, bytes: u64) -> Result<(), String> {
        self.record(HookCall::XbzrleCacheSize(bytes));
        match &self.xbzrle_error {
            Some(message) => Err(message.clone()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Silent;
    impl OptionsHooks for Silent {}

    #[test]
    fn default_methods_do_nothing_and_succeed() {
        let h = Silent;
        h.max_bandwidth_changed(1);
        h.max_postcopy_bandwidth_changed(2);
        assert_eq!(h.xbzrle_cache_size_changed(4096), Ok(()));
    }

    #[test]
    fn recording_hooks_record_in_order_and_can_fail() {
        let h = RecordingHooks::failing_xbzrle("no memory");
        h.max_bandwidth_changed(10);
        assert_eq!(
            h.xbzrle_cache_size_changed(8192),
            Err("no memory".to_string())
        );
        h.max_postcopy_bandwidth_changed(5);
        assert_eq!(
            h.calls(),
            vec![
                HookCall::MaxBandwidth(10),
                HookCall::XbzrleCacheSize(8192),
                HookCall::MaxPostcopyBandwidth(5)
            ]
        );
    }
}
