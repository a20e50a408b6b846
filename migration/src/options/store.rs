//! [`MigrationOptions`]: the settings store shared by the QMP thread and the
//! migration thread, with QEMU's all-or-nothing set semantics.
//!
//! - `set_parameters(update)` merges the update into a copy of the current
//!   parameters, checks the whole copy ([`check_parameters`]) and replaces
//!   the parameters only if it passes; then it calls the running migration's
//!   [`OptionsHooks`]. Like QEMU, it is allowed while a migration runs (that
//!   is how `max-bandwidth` is changed mid-migration).
//! - `set_capabilities(list)` applies the list to a copy, checks old against
//!   new ([`check_capabilities`]) and commits only if it passes. It is
//!   refused while a migration runs (QEMU's `QERR_MIGRATION_ACTIVE`).
//!
//! Reads are snapshots: [`MigrationOptions::caps`] copies 22 booleans and
//! [`MigrationOptions::params`] clones an `Arc`, so the migration thread can
//! read the settings every iteration without contending with writers.

use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::capabilities::{Capabilities, CapabilityStatus};
use super::check::{check_capabilities, check_parameters, CapsCheckContext, HostSupport};
use super::error::OptionsError;
use super::hooks::OptionsHooks;
use super::parameters::{Parameters, ParametersUpdate};

#[derive(Default)]
struct State {
    caps: Capabilities,
    params: Arc<Parameters>,
    running: bool,
    in_postcopy: bool,
    incoming: bool,
    hooks: Option<Arc<dyn OptionsHooks>>,
}

/// The migration settings of one Ferry process (QEMU's `MigrationState`
/// capabilities and parameters), safe to share between threads.
#[derive(Default)]
pub struct MigrationOptions {
    /// Serializes setters from check to hooks, so hook calls follow the order of the sets.
    set_lock: Mutex<()>,
    state: RwLock<State>,
}

impl std::fmt::Debug for MigrationOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.read();
        f.debug_struct("MigrationOptions")
            .field("caps", &s.caps)
            .field("params", &s.params)
            .field("running", &s.running)
            .field("in_postcopy", &s.in_postcopy)
            .field("incoming", &s.incoming)
            .field("hooks", &s.hooks.is_some())
            .finish()
    }
}

impl MigrationOptions {
    /// QEMU's defaults: every capability off, every parameter at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts from the given settings after checking them as a whole (as
    /// QEMU's `migration_object_check` does for `-global migration.*`). `incoming`: the
    /// process was started to receive a migration (`--incoming`, `defer` too): QEMU is in
    /// RUN_STATE_INMIGRATE from the command line on, so postcopy-ram is probed on the host.
    pub fn with_settings(
        caps: Capabilities,
        params: Parameters,
        host: &dyn HostSupport,
        incoming: bool,
    ) -> Result<Self, OptionsError> {
        check_parameters(&params, &caps)?;
        let ctx = CapsCheckContext {
            params: &params,
            incoming,
            host,
        };
        check_capabilities(&Capabilities::new(), &caps, &ctx)?;
        Ok(MigrationOptions {
            set_lock: Mutex::new(()),
            state: RwLock::new(State {
                caps,
                params: Arc::new(params),
                incoming,
                ..State::default()
            }),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_setters(&self) -> MutexGuard<'_, ()> {
        self.set_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A copy of the capabilities.
    pub fn caps(&self) -> Capabilities {
        self.read().caps
    }

    /// A snapshot of the parameters (immutable; later sets do not change it).
    pub fn params(&self) -> Arc<Parameters> {
        Arc::clone(&self.read().params)
    }

    /// Capabilities and parameters read together, consistent with each other.
    pub fn snapshot(&self) -> (Capabilities, Arc<Parameters>) {
        let s = self.read();
        (s.caps, Arc::clone(&s.params))
    }

    /// `migrate-set-capabilities`: applies `changes` if the resulting set passes QEMU's check.
    pub fn set_capabilities(
        &self,
        changes: &[CapabilityStatus],
        host: &dyn HostSupport,
    ) -> Result<(), OptionsError> {
        let _serial = self.lock_setters();
        let mut state = self.write();
        if state.running {
            return Err(OptionsError::MigrationActive);
        }
        let new = state.caps.with_changes(changes);
        let ctx = CapsCheckContext {
            params: &state.params,
            incoming: state.incoming,
            host,
        };
        check_capabilities(&state.caps, &new, &ctx)?;
        state.caps = new;
        Ok(())
    }

    /// `migrate-set-parameters`: merges, checks the whole set, applies it, then calls the hooks.
    ///
    /// On a check failure nothing changes and no hook runs. A failing XBZRLE
    /// resize hook is reported after everything was applied (QEMU does the same).
    pub fn set_parameters(&self, update: &ParametersUpdate) -> Result<(), OptionsError> {
        let _serial = self.lock_setters();
        let (hooks, in_postcopy, applied) = {
            let mut state = self.write();
            let merged = state.params.merged(update);
            check_parameters(&merged, &state.caps)?;
            state.params = Arc::new(merged);
            (
                state.hooks.clone(),
                state.in_postcopy,
                Arc::clone(&state.params),
            )
        };
        let Some(hooks) = hooks else {
            return Ok(());
        };
        if update.max_bandwidth.is_some() && !in_postcopy {
            hooks.max_bandwidth_changed(applied.max_bandwidth);
        }
        let mut result = Ok(());
        if update.xbzrle_cache_size.is_some() {
            if let Err(message) = hooks.xbzrle_cache_size_changed(applied.xbzrle_cache_size) {
                result = Err(OptionsError::XbzrleCacheResize(message));
            }
        }
        if update.max_postcopy_bandwidth.is_some() && in_postcopy {
            hooks.max_postcopy_bandwidth_changed(applied.max_postcopy_bandwidth);
        }
        result
    }

    /// Called by the migration controller when an outgoing migration starts or stops running
    /// (QEMU's `migration_is_running`: from setup until completed, failed or cancelled).
    pub fn set_running(&self, running: bool) {
        self.write().running = running;
    }

    /// Whether an outgoing migration is running.
    pub fn is_running(&self) -> bool {
        self.read().running
    }

    /// Called by the migration controller when the migration enters or leaves postcopy.
    pub fn set_in_postcopy(&self, in_postcopy: bool) {
        self.write().in_postcopy = in_postcopy;
    }

    /// Enters postcopy and runs `apply` with the parameters then in force (to switch to
    /// `max-postcopy-bandwidth`), serialised with `migrate-set-parameters` as QEMU's big lock
    /// serialises them: a concurrent `max-bandwidth` change lands either before (and `apply`
    /// overrides it) or after (and, in postcopy, leaves the rate alone), never in between.
    pub fn enter_postcopy(&self, apply: impl FnOnce(&Parameters)) {
        let _serial = self.lock_setters();
        let params = {
            let mut state = self.write();
            state.in_postcopy = true;
            Arc::clone(&state.params)
        };
        apply(&params);
    }

    /// Whether the running migration is in postcopy.
    pub fn in_postcopy(&self) -> bool {
        self.read().in_postcopy
    }

    /// Marks this process as the incoming side (QEMU's `RUN_STATE_INMIGRATE`):
    /// enabling `postcopy-ram` then probes the host.
    pub fn set_incoming(&self, incoming: bool) {
        self.write().incoming = incoming;
    }

    /// Whether this process is waiting for or receiving an incoming migration.
    pub fn is_incoming(&self) -> bool {
        self.read().incoming
    }

    /// Registers the running migration's hooks (replacing any previous ones).
    pub fn register_hooks(&self, hooks: Arc<dyn OptionsHooks>) {
        let _serial = self.lock_setters();
        self.write().hooks = Some(hooks);
    }

    /// Removes the hooks (the migration ended); returns once no hook call is in progress.
    pub fn clear_hooks(&self) {
        let _serial = self.lock_setters();
        self.write().hooks = None;
    }

    /// Whether hooks are registered.
    pub fn has_hooks(&self) -> bool {
        self.read().hooks.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::super::capabilities::Capability;
    use super::super::check::FixedHostSupport;
    use super::super::hooks::{HookCall, RecordingHooks};
    use super::super::parameters::MultiFdCompression;
    use super::*;

    fn host() -> FixedHostSupport {
        FixedHostSupport::capable()
    }

    fn on(c: Capability) -> CapabilityStatus {
        CapabilityStatus::new(c, true)
    }

    #[test]
    fn starts_with_qemu_defaults() {
        let o = MigrationOptions::new();
        assert_eq!(o.caps(), Capabilities::new());
        assert_eq!(*o.params(), Parameters::default());
        assert!(!o.is_running() && !o.in_postcopy() && !o.is_incoming() && !o.has_hooks());
    }

    #[test]
    fn accepted_capabilities_are_applied() {
        let o = MigrationOptions::new();
        o.set_capabilities(&[on(Capability::Xbzrle), on(Capability::Events)], &host())
            .unwrap();
        assert_eq!(
            o.caps().enabled(),
            vec![Capability::Xbzrle, Capability::Events]
        );
        o.set_capabilities(&[CapabilityStatus::new(Capability::Xbzrle, false)], &host())
            .unwrap();
        assert_eq!(o.caps().enabled(), vec![Capability::Events]);
    }

    #[test]
    fn rejected_capabilities_change_nothing() {
        let o = MigrationOptions::new();
        o.set_capabilities(&[on(Capability::Compress)], &host())
            .unwrap();
        let before = o.caps();
        let err = o
            .set_capabilities(&[on(Capability::Events), on(Capability::Multifd)], &host())
            .unwrap_err();
        assert_eq!(err.to_string(), "Multifd is not compatible with compress");
        assert_eq!(o.caps(), before);
    }

    #[test]
    fn capabilities_are_checked_against_old_plus_new() {
        let o = MigrationOptions::new();
        o.set_capabilities(&[on(Capability::ReturnPath)], &host())
            .unwrap();
        // switchover-ack alone is fine because return-path is already on.
        o.set_capabilities(&[on(Capability::SwitchoverAck)], &host())
            .unwrap();
        // Turning return-path off now is refused.
        let err = o
            .set_capabilities(
                &[CapabilityStatus::new(Capability::ReturnPath, false)],
                &host(),
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Capability 'switchover-ack' requires capability 'return-path'"
        );
        assert!(o.caps().get(Capability::ReturnPath));
    }

    #[test]
    fn capabilities_refused_while_migration_runs() {
        let o = MigrationOptions::new();
        o.set_running(true);
        let err = o
            .set_capabilities(&[on(Capability::Events)], &host())
            .unwrap_err();
        assert_eq!(err.to_string(), "There's a migration process in progress");
        assert_eq!(o.caps(), Capabilities::new());
        o.set_running(false);
        o.set_capabilities(&[on(Capability::Events)], &host())
            .unwrap();
    }

    #[test]
    fn an_incoming_process_probes_postcopy_in_its_start_settings_and_later_sets() {
        let refusing = FixedHostSupport {
            postcopy: Err("Host backend files need to be TMPFS or HUGETLBFS only".into()),
            ..host()
        };
        let mut caps = Capabilities::new();
        caps.set(Capability::PostcopyRam, true);
        // Not incoming: the probe is not run (as QEMU outside RUN_STATE_INMIGRATE).
        assert!(
            MigrationOptions::with_settings(caps, Parameters::default(), &refusing, false).is_ok()
        );
        let err = MigrationOptions::with_settings(caps, Parameters::default(), &refusing, true)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Postcopy is not supported: Host backend files need to be TMPFS or HUGETLBFS only"
        );
        // Started incoming (`--incoming defer`), a later set probes too.
        let o = MigrationOptions::with_settings(
            Capabilities::new(),
            Parameters::default(),
            &refusing,
            true,
        )
        .unwrap();
        assert!(o.is_incoming());
        assert!(o
            .set_capabilities(&[on(Capability::PostcopyRam)], &refusing)
            .is_err());
    }

    #[test]
    fn incoming_flag_turns_on_the_postcopy_probe() {
        let o = MigrationOptions::new();
        let refusing = FixedHostSupport {
            postcopy: Err("Userfault on this host does not support huge pages".into()),
            ..host()
        };
        o.set_capabilities(&[on(Capability::PostcopyRam)], &refusing)
            .unwrap();
        o.set_capabilities(
            &[CapabilityStatus::new(Capability::PostcopyRam, false)],
            &refusing,
        )
        .unwrap();
        o.set_incoming(true);
        let err = o
            .set_capabilities(&[on(Capability::PostcopyRam)], &refusing)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Postcopy is not supported: Userfault on this host does not support huge pages"
        );
    }

    #[test]
    fn zero_copy_capability_reads_current_parameters() {
        let o = MigrationOptions::new();
        o.set_parameters(&ParametersUpdate {
            multifd_compression: Some(MultiFdCompression::Zlib),
            ..Default::default()
        })
        .unwrap();
        let err = o
            .set_capabilities(
                &[on(Capability::Multifd), on(Capability::ZeroCopySend)],
                &host(),
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Zero copy only available for non-compressed non-TLS multifd migration"
        );
    }

    #[test]
    fn accepted_parameters_are_applied() {
        let o = MigrationOptions::new();
        o.set_parameters(&ParametersUpdate {
            max_bandwidth: Some(1 << 30),
            downtime_limit: Some(50),
            multifd_zlib_level: Some(9),
            ..Default::default()
        })
        .unwrap();
        let p = o.params();
        assert_eq!(p.max_bandwidth, 1 << 30);
        assert_eq!(p.downtime_limit, 50);
        assert_eq!(p.multifd_zlib_level, 9);
    }

    #[test]
    fn rejected_parameters_change_nothing_and_call_no_hook() {
        let o = MigrationOptions::new();
        let hooks = Arc::new(RecordingHooks::new());
        o.register_hooks(hooks.clone());
        o.set_running(true);
        let before = o.params();
        let err = o
            .set_parameters(&ParametersUpdate {
                max_bandwidth: Some(1),
                xbzrle_cache_size: Some(8192),
                announce_step: Some(0),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'announce_step' expects a value between 0 and 10000"
        );
        assert_eq!(o.params(), before);
        assert!(hooks.calls().is_empty());
    }

    #[test]
    fn max_cpu_throttle_is_checked_against_the_merged_set() {
        let o = MigrationOptions::new();
        // Raising the initial throttle above the current max is refused ...
        let err = o
            .set_parameters(&ParametersUpdate {
                cpu_throttle_initial: Some(60),
                max_cpu_throttle: Some(50),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"
        );
        // ... and accepted when both move together.
        o.set_parameters(&ParametersUpdate {
            cpu_throttle_initial: Some(60),
            max_cpu_throttle: Some(60),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (o.params().cpu_throttle_initial, o.params().max_cpu_throttle),
            (60, 60)
        );
    }

    #[test]
    fn parameters_may_change_while_a_migration_runs() {
        let o = MigrationOptions::new();
        o.set_running(true);
        o.set_parameters(&ParametersUpdate {
            max_bandwidth: Some(42),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(o.params().max_bandwidth, 42);
    }

    #[test]
    fn hooks_follow_migrate_params_apply() {
        let o = MigrationOptions::new();
        let hooks = Arc::new(RecordingHooks::new());
        o.register_hooks(hooks.clone());
        o.set_running(true);
        let all = ParametersUpdate {
            max_bandwidth: Some(1000),
            xbzrle_cache_size: Some(1 << 20),
            max_postcopy_bandwidth: Some(77),
            downtime_limit: Some(1),
            ..Default::default()
        };
        // Precopy: max-bandwidth and the XBZRLE cache, not the postcopy limit.
        o.set_parameters(&all).unwrap();
        assert_eq!(
            hooks.calls(),
            vec![
                HookCall::MaxBandwidth(1000),
                HookCall::XbzrleCacheSize(1 << 20)
            ]
        );
        // Postcopy: the XBZRLE cache and the postcopy limit, not max-bandwidth.
        let mut seen = None;
        o.enter_postcopy(|p| seen = Some(p.max_postcopy_bandwidth));
        assert_eq!(seen, Some(77), "the switch applies the limit then in force");
        assert!(o.in_postcopy());
        o.set_parameters(&all).unwrap();
        assert_eq!(
            hooks.calls()[2..],
            [
                HookCall::XbzrleCacheSize(1 << 20),
                HookCall::MaxPostcopyBandwidth(77)
            ]
        );
        // Members not given call nothing.
        o.set_parameters(&ParametersUpdate {
            downtime_limit: Some(2),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(hooks.calls().len(), 4);
    }

    #[test]
    fn no_hooks_after_clear() {
        let o = MigrationOptions::new();
        let hooks = Arc::new(RecordingHooks::new());
        o.register_hooks(hooks.clone());
        o.clear_hooks();
        assert!(!o.has_hooks());
        o.set_parameters(&ParametersUpdate {
            max_bandwidth: Some(5),
            ..Default::default()
        })
        .unwrap();
        assert!(hooks.calls().is_empty());
    }

    #[test]
    fn failing_xbzrle_resize_is_reported_but_the_set_stays_applied() {
        let o = MigrationOptions::new();
        let hooks = Arc::new(RecordingHooks::failing_xbzrle(
            "Parameter 'cache size' expects exceeding address space",
        ));
        o.register_hooks(hooks.clone());
        let err = o
            .set_parameters(&ParametersUpdate {
                xbzrle_cache_size: Some(1 << 30),
                max_postcopy_bandwidth: Some(9),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'cache size' expects exceeding address space"
        );
        assert_eq!(o.params().xbzrle_cache_size, 1 << 30);
        assert_eq!(o.params().max_postcopy_bandwidth, 9);
    }

    #[test]
    fn snapshots_do_not_change_under_later_sets() {
        let o = MigrationOptions::new();
        let old = o.params();
        o.set_parameters(&ParametersUpdate {
            downtime_limit: Some(1),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(old.downtime_limit, 300);
        assert_eq!(o.params().downtime_limit, 1);
        let (caps, params) = o.snapshot();
        assert_eq!((caps, params.downtime_limit), (Capabilities::new(), 1));
    }

    #[test]
    fn with_settings_checks_the_initial_set() {
        let bad = Parameters {
            multifd_channels: 0,
            ..Default::default()
        };
        let err =
            MigrationOptions::with_settings(Capabilities::new(), bad, &host(), false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'multifd_channels' expects a value between 1 and 255"
        );
        let caps: Capabilities = [Capability::Block].into_iter().collect();
        assert!(
            MigrationOptions::with_settings(caps, Parameters::default(), &host(), false).is_err()
        );
        let caps: Capabilities = [Capability::Multifd].into_iter().collect();
        let o =
            MigrationOptions::with_settings(caps, Parameters::default(), &host(), false).unwrap();
        assert!(o.caps().get(Capability::Multifd));
    }

    #[test]
    fn shared_between_threads() {
        let o = Arc::new(MigrationOptions::new());
        let writer = {
            let o = Arc::clone(&o);
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    o.set_parameters(&ParametersUpdate {
                        max_bandwidth: Some(i),
                        downtime_limit: Some(i),
                        ..Default::default()
                    })
                    .unwrap();
                }
            })
        };
        for _ in 0..200 {
            let p = o.params();
            // Every snapshot is one consistent set.
            assert!(
                p.max_bandwidth == p.downtime_limit
                    || p.max_bandwidth == Parameters::default().max_bandwidth
            );
        }
        writer.join().unwrap();
        assert_eq!(o.params().max_bandwidth, 199);
    }
}
