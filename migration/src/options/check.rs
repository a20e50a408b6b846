//! QEMU's two whole-set checks: `migrate_caps_check` (capabilities, old and
//! new) and `migrate_params_check` (a complete, merged parameter set).
//!
//! Both run their rules in QEMU's order and stop at the first that fails, so
//! the message a user sees is the one QEMU would print.

use super::bitmap_mapping::check_mapping;
use super::capabilities::{Capabilities, Capability};
use super::error::OptionsError;
use super::parameters::{MultiFdCompression, Parameters};
use crate::uffd::WriteTrackingSupport;

/// The target page size Ferry migrates in (x86: 4 KiB).
pub const TARGET_PAGE_SIZE: u64 = 4096;
/// Highest `downtime-limit`: 2000 seconds in ms (`MAX_MIGRATE_DOWNTIME`).
pub const MAX_MIGRATE_DOWNTIME: u64 = 2000 * 1000;

/// Capabilities `background-snapshot` excludes, in the order QEMU checks them
/// (`check_caps_background_snapshot`).
pub const BACKGROUND_SNAPSHOT_CONFLICTS: [Capability; 15] = [
    Capability::PostcopyRam,
    Capability::DirtyBitmaps,
    Capability::PostcopyBlocktime,
    Capability::LateBlockActivate,
    Capability::ReturnPath,
    Capability::Multifd,
    Capability::PauseBeforeSwitchover,
    Capability::AutoConverge,
    Capability::ReleaseRam,
    Capability::RdmaPinAll,
    Capability::Compress,
    Capability::Xbzrle,
    Capability::XColo,
    Capability::ValidateUuid,
    Capability::ZeroCopySend,
];

/// Host facts the capability check asks for, only when a rule needs them
/// (the probes are expensive, as QEMU notes).
pub trait HostSupport {
    /// QEMU's `postcopy_ram_supported_by_host()`: `Err(reason)` when the
    /// incoming side cannot do postcopy.
    fn postcopy_supported(&self) -> Result<(), String>;

    /// QEMU's `migrate_query_write_tracking()`.
    fn write_tracking(&self) -> WriteTrackingSupport;
}

/// A [`HostSupport`] with fixed answers (for tests, and for callers that probed already).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedHostSupport {
    /// Answer to [`HostSupport::postcopy_supported`].
    pub postcopy: Result<(), String>,
    /// Answer to [`HostSupport::write_tracking`].
    pub write_tracking: WriteTrackingSupport,
}

impl FixedHostSupport {
    /// A host that supports everything.
    pub fn capable() -> Self {
        FixedHostSupport {
            postcopy: Ok(()),
            write_tracking: WriteTrackingSupport::Compatible,
        }
    }
}

impl HostSupport for FixedHostSupport {
    fn postcopy_supported(&self) -> Result<(), String> {
        self.postcopy.clone()
    }

    fn write_tracking(&self) -> WriteTrackingSupport {
        self.write_tracking
    }
}

/// What the capability check reads besides the capabilities themselves.
#[derive(Clone, Copy)]
pub struct CapsCheckContext<'a> {
    /// The current parameters (zero-copy looks at multifd-compression and TLS).
    pub params: &'a Parameters,
    /// Whether this process is the incoming side (QEMU's `RUN_STATE_INMIGRATE`).
    pub incoming: bool,
    /// Host probes.
    pub host: &'a dyn HostSupport,
}

/// QEMU's `migrate_caps_check`: may the capabilities go from `old` to `new`?
pub fn check_capabilities(
    old: &Capabilities,
    new: &Capabilities,
    ctx: &CapsCheckContext<'_>,
) -> Result<(), OptionsError> {
    use Capability as C;

    if new.get(C::Block) {
        return Err(OptionsError::BlockMigrationUnsupported);
    }
    if new.get(C::XColo) {
        return Err(OptionsError::ColoUnsupported);
    }

    if new.get(C::PostcopyRam) {
        // Expensive, so only when first set, and only the destination needs it.
        if !old.get(C::PostcopyRam) && ctx.incoming {
            ctx.host
                .postcopy_supported()
                .map_err(OptionsError::PostcopyUnsupported)?;
        }
        if new.get(C::XIgnoreShared) {
            return Err(OptionsError::PostcopyIgnoreShared);
        }
        if new.get(C::Multifd) {
            return Err(OptionsError::PostcopyMultifd);
        }
    }

    if new.get(C::BackgroundSnapshot) {
        // The probe registers all guest memory with userfaultfd, which stalls a large
        // guest's vCPUs for a moment: only when the capability is being switched on (the
        // memory layout does not change while it stays on).
        if !old.get(C::BackgroundSnapshot) {
            let support = ctx.host.write_tracking();
            if support < WriteTrackingSupport::Available {
                return Err(OptionsError::BackgroundSnapshotNoKernelSupport);
            }
            if support < WriteTrackingSupport::Compatible {
                return Err(OptionsError::BackgroundSnapshotMemory);
            }
        }
        if let Some(conflict) = BACKGROUND_SNAPSHOT_CONFLICTS
            .into_iter()
            .find(|c| new.get(*c))
        {
            return Err(OptionsError::BackgroundSnapshotConflict(conflict));
        }
    }

    // QEMU's Linux branch; the other one ("only available on Linux") cannot fire here.
    if new.get(C::ZeroCopySend)
        && (!new.get(C::Multifd)
            || new.get(C::Compress)
            || new.get(C::Xbzrle)
            || ctx.params.multifd_compression != MultiFdCompression::None
            || ctx.params.tls())
    {
        return Err(OptionsError::ZeroCopyConflict);
    }

    if new.get(C::PostcopyPreempt) {
        if !new.get(C::PostcopyRam) {
            return Err(OptionsError::PostcopyPreemptWithoutPostcopy);
        }
        if new.get(C::Compress) {
            return Err(OptionsError::PostcopyPreemptCompress);
        }
    }

    if new.get(C::Multifd) && new.get(C::Compress) {
        return Err(OptionsError::MultifdCompress);
    }

    if new.get(C::SwitchoverAck) && !new.get(C::ReturnPath) {
        return Err(OptionsError::SwitchoverAckWithoutReturnPath);
    }

    Ok(())
}

/// Range texts, exactly as QEMU builds them (`stringify()` expands macros,
/// so `MAX_MIGRATE_DOWNTIME` prints as `(2000 * 1000)` and `SIZE_MAX` as
/// glibc's `(18446744073709551615UL)`).
pub mod ranges {
    /// compress_level, multifd_zlib_level.
    pub const ZERO_TO_NINE: &str = "a value between 0 and 9";
    /// compress_threads, decompress_threads, multifd_channels.
    pub const ONE_TO_255: &str = "a value between 1 and 255";
    /// throttle_trigger_threshold.
    pub const ONE_TO_100: &str = "an integer in the range of 1 to 100";
    /// cpu_throttle_initial, cpu_throttle_increment.
    pub const ONE_TO_99: &str = "an integer in the range of 1 to 99";
    /// max_bandwidth.
    pub const MAX_BANDWIDTH: &str =
        "an integer in the range of 0 to (18446744073709551615UL) bytes/second";
    /// downtime_limit.
    pub const DOWNTIME_LIMIT: &str = "an integer in the range of 0 to (2000 * 1000) ms";
    /// multifd_zstd_level.
    pub const ZERO_TO_20: &str = "a value between 0 and 20";
    /// xbzrle_cache_size.
    pub const XBZRLE_CACHE_SIZE: &str = "a power of two no less than the target page size";
    /// max_cpu_throttle.
    pub const MAX_CPU_THROTTLE: &str = "an integer in the range of cpu_throttle_initial to 99";
    /// announce_initial, announce_max.
    pub const ZERO_TO_100000: &str = "a value between 0 and 100000";
    /// announce_rounds.
    pub const ZERO_TO_1000: &str = "a value between 0 and 1000";
    /// announce_step (QEMU says 0 although 0 is refused).
    pub const ANNOUNCE_STEP: &str = "a value between 0 and 10000";
}

fn invalid(name: &'static str, expects: &'static str) -> OptionsError {
    OptionsError::InvalidParameterValue { name, expects }
}

/// QEMU's `migrate_params_check` on a complete parameter set; `caps` are the
/// current capabilities (the zero-copy rule reads them).
pub fn check_parameters(p: &Parameters, caps: &Capabilities) -> Result<(), OptionsError> {
    if p.compress_level > 9 {
        return Err(invalid("compress_level", ranges::ZERO_TO_NINE));
    }
    if p.compress_threads < 1 {
        return Err(invalid("compress_threads", ranges::ONE_TO_255));
    }
    if p.decompress_threads < 1 {
        return Err(invalid("decompress_threads", ranges::ONE_TO_255));
    }
    if !(1..=100).contains(&p.throttle_trigger_threshold) {
        return Err(invalid("throttle_trigger_threshold", ranges::ONE_TO_100));
    }
    if !(1..=99).contains(&p.cpu_throttle_initial) {
        return Err(invalid("cpu_throttle_initial", ranges::ONE_TO_99));
    }
    if !(1..=99).contains(&p.cpu_throttle_increment) {
        return Err(invalid("cpu_throttle_increment", ranges::ONE_TO_99));
    }
    // max_bandwidth > SIZE_MAX: cannot happen where size_t is 64 bits.
    if usize::try_from(p.max_bandwidth).is_err() {
        return Err(invalid("max_bandwidth", ranges::MAX_BANDWIDTH));
    }
    if p.downtime_limit > MAX_MIGRATE_DOWNTIME {
        return Err(invalid("downtime_limit", ranges::DOWNTIME_LIMIT));
    }
    // x_checkpoint_delay: any uint32 is fine.
    if p.multifd_channels < 1 {
        return Err(invalid("multifd_channels", ranges::ONE_TO_255));
    }
    if p.multifd_zlib_level > 9 {
        return Err(invalid("multifd_zlib_level", ranges::ZERO_TO_NINE));
    }
    if p.multifd_zstd_level > 20 {
        return Err(invalid("multifd_zstd_level", ranges::ZERO_TO_20));
    }
    if p.xbzrle_cache_size < TARGET_PAGE_SIZE || !p.xbzrle_cache_size.is_power_of_two() {
        return Err(invalid("xbzrle_cache_size", ranges::XBZRLE_CACHE_SIZE));
    }
    if p.max_cpu_throttle < p.cpu_throttle_initial || p.max_cpu_throttle > 99 {
        return Err(invalid("max_cpu_throttle", ranges::MAX_CPU_THROTTLE));
    }
    if p.announce_initial > 100_000 {
        return Err(invalid("announce_initial", ranges::ZERO_TO_100000));
    }
    if p.announce_max > 100_000 {
        return Err(invalid("announce_max", ranges::ZERO_TO_100000));
    }
    if p.announce_rounds > 1000 {
        return Err(invalid("announce_rounds", ranges::ZERO_TO_1000));
    }
    if !(1..=10_000).contains(&p.announce_step) {
        return Err(invalid("announce_step", ranges::ANNOUNCE_STEP));
    }
    if let Some(mapping) = &p.block_bitmap_mapping {
        check_mapping(mapping).map_err(OptionsError::BitmapMapping)?;
    }
    if caps.get(Capability::ZeroCopySend)
        && (p.multifd_compression != MultiFdCompression::None || p.tls())
    {
        return Err(OptionsError::ZeroCopyConflict);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::bitmap_mapping::NodeAlias;
    use super::*;

    fn caps(list: &[Capability]) -> Capabilities {
        list.iter().copied().collect()
    }

    fn check_new(new: &[Capability]) -> Result<(), OptionsError> {
        let p = Parameters::default();
        let host = FixedHostSupport::capable();
        let ctx = CapsCheckContext {
            params: &p,
            incoming: false,
            host: &host,
        };
        check_capabilities(&Capabilities::new(), &caps(new), &ctx)
    }

    fn text(r: Result<(), OptionsError>) -> String {
        match r {
            Ok(()) => "ok".to_string(),
            Err(e) => e.to_string(),
        }
    }

    /// A HostSupport that records whether it was asked.
    struct Recorder {
        inner: FixedHostSupport,
        asked_postcopy: std::cell::Cell<bool>,
        asked_wt: std::cell::Cell<bool>,
    }

    impl HostSupport for Recorder {
        fn postcopy_supported(&self) -> Result<(), String> {
            self.asked_postcopy.set(true);
            self.inner.postcopy_supported()
        }
        fn write_tracking(&self) -> WriteTrackingSupport {
            self.asked_wt.set(true);
            self.inner.write_tracking()
        }
    }

    fn recorder(postcopy: Result<(), String>, wt: WriteTrackingSupport) -> Recorder {
        Recorder {
            inner: FixedHostSupport {
                postcopy,
                write_tracking: wt,
            },
            asked_postcopy: Default::default(),
            asked_wt: Default::default(),
        }
    }

    #[test]
    fn no_capabilities_pass() {
        assert_eq!(text(check_new(&[])), "ok");
    }

    #[test]
    fn every_capability_alone_passes_except_the_refused_ones() {
        for c in Capability::ALL {
            let r = text(check_new(&[c]));
            let expected = match c {
                Capability::Block => {
                    "QEMU compiled without old-style (blk/-b, inc/-i) block migration"
                }
                Capability::XColo => "QEMU compiled without replication module can't enable COLO",
                Capability::ZeroCopySend => {
                    "Zero copy only available for non-compressed non-TLS multifd migration"
                }
                Capability::PostcopyPreempt => "Postcopy preempt requires postcopy-ram",
                Capability::SwitchoverAck => {
                    "Capability 'switchover-ack' requires capability 'return-path'"
                }
                _ => "ok",
            };
            assert_eq!(r, expected, "capability {c}");
        }
    }

    #[test]
    fn block_is_checked_before_colo_and_everything_else() {
        assert_eq!(
            text(check_new(&[
                Capability::XColo,
                Capability::Block,
                Capability::SwitchoverAck
            ])),
            "QEMU compiled without old-style (blk/-b, inc/-i) block migration"
        );
        assert_eq!(
            text(check_new(&[
                Capability::XColo,
                Capability::PostcopyRam,
                Capability::Multifd
            ])),
            "QEMU compiled without replication module can't enable COLO"
        );
    }

    #[test]
    fn postcopy_excludes_ignore_shared_then_multifd() {
        assert_eq!(
            text(check_new(&[
                Capability::PostcopyRam,
                Capability::XIgnoreShared
            ])),
            "Postcopy is not compatible with ignore-shared"
        );
        assert_eq!(
            text(check_new(&[Capability::PostcopyRam, Capability::Multifd])),
            "Postcopy is not yet compatible with multifd"
        );
        assert_eq!(
            text(check_new(&[
                Capability::PostcopyRam,
                Capability::Multifd,
                Capability::XIgnoreShared
            ])),
            "Postcopy is not compatible with ignore-shared"
        );
        // Each alone is fine.
        assert_eq!(
            text(check_new(&[Capability::XIgnoreShared, Capability::Multifd])),
            "ok"
        );
    }

    #[test]
    fn postcopy_host_probe_only_on_incoming_side_when_newly_set() {
        let p = Parameters::default();
        let new = caps(&[Capability::PostcopyRam]);
        let host = recorder(
            Err("Userfaultfd not available: EPERM".into()),
            WriteTrackingSupport::Compatible,
        );

        // Outgoing side: no probe, passes.
        let ctx = CapsCheckContext {
            params: &p,
            incoming: false,
            host: &host,
        };
        assert_eq!(
            text(check_capabilities(&Capabilities::new(), &new, &ctx)),
            "ok"
        );
        assert!(!host.asked_postcopy.get());

        // Incoming side, newly set: probe and refuse with the prefix.
        let ctx = CapsCheckContext {
            params: &p,
            incoming: true,
            host: &host,
        };
        assert_eq!(
            text(check_capabilities(&Capabilities::new(), &new, &ctx)),
            "Postcopy is not supported: Userfaultfd not available: EPERM"
        );
        assert!(host.asked_postcopy.get());

        // Incoming side, already on: no new probe.
        let host2 = recorder(Err("x".into()), WriteTrackingSupport::Compatible);
        let ctx = CapsCheckContext {
            params: &p,
            incoming: true,
            host: &host2,
        };
        assert_eq!(text(check_capabilities(&new, &new, &ctx)), "ok");
        assert!(!host2.asked_postcopy.get());

        // Incoming side with a capable host passes.
        let ok = FixedHostSupport::capable();
        let ctx = CapsCheckContext {
            params: &p,
            incoming: true,
            host: &ok,
        };
        assert_eq!(
            text(check_capabilities(&Capabilities::new(), &new, &ctx)),
            "ok"
        );
    }

    #[test]
    fn postcopy_probe_failure_wins_over_ignore_shared() {
        let p = Parameters::default();
        let host = FixedHostSupport {
            postcopy: Err("why".into()),
            write_tracking: WriteTrackingSupport::Compatible,
        };
        let ctx = CapsCheckContext {
            params: &p,
            incoming: true,
            host: &host,
        };
        let new = caps(&[Capability::PostcopyRam, Capability::XIgnoreShared]);
        assert_eq!(
            text(check_capabilities(&Capabilities::new(), &new, &ctx)),
            "Postcopy is not supported: why"
        );
    }

    #[test]
    fn background_snapshot_needs_kernel_then_memory_support() {
        let p = Parameters::default();
        let new = caps(&[Capability::BackgroundSnapshot]);
        for (wt, expected) in [
            (
                WriteTrackingSupport::Absent,
                "Background-snapshot is not supported by host kernel",
            ),
            (
                WriteTrackingSupport::Available,
                "Background-snapshot is not compatible with guest memory configuration",
            ),
            (WriteTrackingSupport::Compatible, "ok"),
        ] {
            let host = FixedHostSupport {
                postcopy: Ok(()),
                write_tracking: wt,
            };
            let ctx = CapsCheckContext {
                params: &p,
                incoming: false,
                host: &host,
            };
            assert_eq!(
                text(check_capabilities(&Capabilities::new(), &new, &ctx)),
                expected
            );
        }
    }

    #[test]
    fn write_tracking_probe_only_when_background_snapshot_is_asked_for() {
        let p = Parameters::default();
        let host = recorder(Ok(()), WriteTrackingSupport::Absent);
        let ctx = CapsCheckContext {
            params: &p,
            incoming: false,
            host: &host,
        };
        assert_eq!(
            text(check_capabilities(
                &Capabilities::new(),
                &caps(&[Capability::Xbzrle]),
                &ctx
            )),
            "ok"
        );
        assert!(!host.asked_wt.get());
        // Already on: setting other capabilities does not probe again.
        let on = caps(&[Capability::BackgroundSnapshot]);
        assert_eq!(text(check_capabilities(&on, &on, &ctx)), "ok");
        assert!(!host.asked_wt.get());
        // Switching it on probes (and here fails).
        assert_eq!(
            text(check_capabilities(&Capabilities::new(), &on, &ctx)),
            "Background-snapshot is not supported by host kernel"
        );
        assert!(host.asked_wt.get());
    }

    #[test]
    fn background_snapshot_conflicts_in_qemu_order() {
        // Each conflicting capability alone is named (where no earlier rule fires).
        for c in BACKGROUND_SNAPSHOT_CONFLICTS {
            let r = text(check_new(&[Capability::BackgroundSnapshot, c]));
            let expected = match c {
                Capability::XColo => {
                    "QEMU compiled without replication module can't enable COLO".to_string()
                }
                _ => format!("Background-snapshot is not compatible with {}", c.name()),
            };
            assert_eq!(r, expected);
        }
        // With several, the first in QEMU's list wins (not enum order).
        assert_eq!(
            text(check_new(&[
                Capability::BackgroundSnapshot,
                Capability::Xbzrle,
                Capability::AutoConverge,
                Capability::ReturnPath
            ])),
            "Background-snapshot is not compatible with return-path"
        );
        assert_eq!(
            text(check_new(&[
                Capability::BackgroundSnapshot,
                Capability::Xbzrle,
                Capability::AutoConverge
            ])),
            "Background-snapshot is not compatible with auto-converge"
        );
        // Compatible companions pass.
        assert_eq!(
            text(check_new(&[
                Capability::BackgroundSnapshot,
                Capability::Events
            ])),
            "ok"
        );
    }

    #[test]
    fn zero_copy_send_rules() {
        const Z: &str = "Zero copy only available for non-compressed non-TLS multifd migration";
        assert_eq!(text(check_new(&[Capability::ZeroCopySend])), Z);
        assert_eq!(
            text(check_new(&[Capability::ZeroCopySend, Capability::Multifd])),
            "ok"
        );
        assert_eq!(
            text(check_new(&[
                Capability::ZeroCopySend,
                Capability::Multifd,
                Capability::Xbzrle
            ])),
            Z
        );
        assert_eq!(
            text(check_new(&[
                Capability::ZeroCopySend,
                Capability::Multifd,
                Capability::Compress
            ])),
            Z
        );
        let host = FixedHostSupport::capable();
        let new = caps(&[Capability::ZeroCopySend, Capability::Multifd]);
        for p in [
            Parameters {
                multifd_compression: MultiFdCompression::Zstd,
                ..Default::default()
            },
            Parameters {
                tls_creds: "tls0".into(),
                ..Default::default()
            },
        ] {
            let ctx = CapsCheckContext {
                params: &p,
                incoming: false,
                host: &host,
            };
            assert_eq!(
                text(check_capabilities(&Capabilities::new(), &new, &ctx)),
                Z
            );
        }
        // A TLS host name alone is not TLS.
        let p = Parameters {
            tls_hostname: "h".into(),
            ..Default::default()
        };
        let ctx = CapsCheckContext {
            params: &p,
            incoming: false,
            host: &host,
        };
        assert_eq!(
            text(check_capabilities(&Capabilities::new(), &new, &ctx)),
            "ok"
        );
    }

    #[test]
    fn zero_copy_is_checked_before_postcopy_preempt() {
        assert_eq!(
            text(check_new(&[
                Capability::ZeroCopySend,
                Capability::PostcopyPreempt
            ])),
            "Zero copy only available for non-compressed non-TLS multifd migration"
        );
    }

    #[test]
    fn postcopy_preempt_rules() {
        assert_eq!(
            text(check_new(&[Capability::PostcopyPreempt])),
            "Postcopy preempt requires postcopy-ram"
        );
        assert_eq!(
            text(check_new(&[
                Capability::PostcopyPreempt,
                Capability::PostcopyRam,
                Capability::Compress
            ])),
            "Postcopy preempt not compatible with compress"
        );
        assert_eq!(
            text(check_new(&[
                Capability::PostcopyPreempt,
                Capability::PostcopyRam
            ])),
            "ok"
        );
    }

    #[test]
    fn postcopy_preempt_is_checked_before_multifd_compress() {
        assert_eq!(
            text(check_new(&[
                Capability::PostcopyPreempt,
                Capability::Multifd,
                Capability::Compress
            ])),
            "Postcopy preempt requires postcopy-ram"
        );
    }

    #[test]
    fn multifd_excludes_compress() {
        assert_eq!(
            text(check_new(&[Capability::Multifd, Capability::Compress])),
            "Multifd is not compatible with compress"
        );
        assert_eq!(text(check_new(&[Capability::Compress])), "ok");
    }

    #[test]
    fn switchover_ack_requires_return_path_and_is_checked_last() {
        assert_eq!(
            text(check_new(&[Capability::SwitchoverAck])),
            "Capability 'switchover-ack' requires capability 'return-path'"
        );
        assert_eq!(
            text(check_new(&[
                Capability::SwitchoverAck,
                Capability::ReturnPath
            ])),
            "ok"
        );
        assert_eq!(
            text(check_new(&[
                Capability::SwitchoverAck,
                Capability::Multifd,
                Capability::Compress
            ])),
            "Multifd is not compatible with compress"
        );
    }

    fn check_p(p: Parameters) -> String {
        text(check_parameters(&p, &Capabilities::new()))
    }

    #[test]
    fn default_parameters_pass() {
        assert_eq!(check_p(Parameters::default()), "ok");
    }

    #[test]
    fn every_range_edge_with_qemu_text() {
        let d = Parameters::default;
        let cases: Vec<(Parameters, Parameters, &str)> = vec![
            (Parameters { compress_level: 9, ..d() }, Parameters { compress_level: 10, ..d() },
             "Parameter 'compress_level' expects a value between 0 and 9"),
            (Parameters { compress_threads: 1, ..d() }, Parameters { compress_threads: 0, ..d() },
             "Parameter 'compress_threads' expects a value between 1 and 255"),
            (Parameters { decompress_threads: 1, ..d() }, Parameters { decompress_threads: 0, ..d() },
             "Parameter 'decompress_threads' expects a value between 1 and 255"),
            (Parameters { throttle_trigger_threshold: 1, ..d() }, Parameters { throttle_trigger_threshold: 0, ..d() },
             "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
            (Parameters { throttle_trigger_threshold: 100, ..d() }, Parameters { throttle_trigger_threshold: 101, ..d() },
             "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
            (Parameters { cpu_throttle_initial: 1, ..d() }, Parameters { cpu_throttle_initial: 0, ..d() },
             "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
            (Parameters { cpu_throttle_initial: 99, ..d() }, Parameters { cpu_throttle_initial: 100, ..d() },
             "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
            (Parameters { cpu_throttle_increment: 1, ..d() }, Parameters { cpu_throttle_increment: 0, ..d() },
             "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
            (Parameters { cpu_throttle_increment: 99, ..d() }, Parameters { cpu_throttle_increment: 100, ..d() },
             "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
            (Parameters { downtime_limit: 2_000_000, ..d() }, Parameters { downtime_limit: 2_000_001, ..d() },
             "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"),
            (Parameters { multifd_channels: 1, ..d() }, Parameters { multifd_channels: 0, ..d() },
             "Parameter 'multifd_channels' expects a value between 1 and 255"),
            (Parameters { multifd_zlib_level: 9, ..d() }, Parameters { multifd_zlib_level: 10, ..d() },
             "Parameter 'multifd_zlib_level' expects a value between 0 and 9"),
            (Parameters { multifd_zstd_level: 20, ..d() }, Parameters { multifd_zstd_level: 21, ..d() },
             "Parameter 'multifd_zstd_level' expects a value between 0 and 20"),
            (Parameters { xbzrle_cache_size: 4096, ..d() }, Parameters { xbzrle_cache_size: 2048, ..d() },
             "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"),
            (Parameters { xbzrle_cache_size: 1 << 40, ..d() }, Parameters { xbzrle_cache_size: 12288, ..d() },
             "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"),
            (Parameters { max_cpu_throttle: 20, ..d() }, Parameters { max_cpu_throttle: 19, ..d() },
             "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
            (Parameters { max_cpu_throttle: 99, ..d() }, Parameters { max_cpu_throttle: 100, ..d() },
             "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"),
            (Parameters { announce_initial: 100_000, ..d() }, Parameters { announce_initial: 100_001, ..d() },
             "Parameter 'announce_initial' expects a value between 0 and 100000"),
            (Parameters { announce_max: 100_000, ..d() }, Parameters { announce_max: 100_001, ..d() },
             "Parameter 'announce_max' expects a value between 0 and 100000"),
            (Parameters { announce_rounds: 1000, ..d() }, Parameters { announce_rounds: 1001, ..d() },
             "Parameter 'announce_rounds' expects a value between 0 and 1000"),
            (Parameters { announce_step: 1, ..d() }, Parameters { announce_step: 0, ..d() },
             "Parameter 'announce_step' expects a value between 0 and 10000"),
            (Parameters { announce_step: 10_000, ..d() }, Parameters { announce_step: 10_001, ..d() },
             "Parameter 'announce_step' expects a value between 0 and 10000"),
        ];
        for (inside, outside, msg) in cases {
            assert_eq!(check_p(inside), "ok", "inside edge for {msg}");
            assert_eq!(check_p(outside), msg);
        }
    }

    #[test]
    fn unchecked_parameters_accept_their_whole_type() {
        let d = Parameters::default;
        for p in [
            Parameters {
                compress_level: 0,
                ..d()
            },
            Parameters {
                compress_threads: 255,
                ..d()
            },
            Parameters {
                max_bandwidth: u64::MAX,
                ..d()
            },
            Parameters {
                max_bandwidth: 0,
                ..d()
            },
            Parameters {
                downtime_limit: 0,
                ..d()
            },
            Parameters {
                x_checkpoint_delay: u32::MAX,
                ..d()
            },
            Parameters {
                x_checkpoint_delay: 0,
                ..d()
            },
            Parameters {
                max_postcopy_bandwidth: u64::MAX,
                ..d()
            },
            Parameters {
                xbzrle_cache_size: 1 << 63,
                ..d()
            },
            Parameters {
                announce_initial: 0,
                announce_max: 0,
                announce_rounds: 0,
                ..d()
            },
        ] {
            assert_eq!(check_p(p), "ok");
        }
    }

    #[test]
    fn max_cpu_throttle_is_checked_against_the_merged_initial() {
        let p = Parameters {
            cpu_throttle_initial: 50,
            max_cpu_throttle: 49,
            ..Default::default()
        };
        assert_eq!(
            check_p(p),
            "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"
        );
        let p = Parameters {
            cpu_throttle_initial: 50,
            max_cpu_throttle: 50,
            ..Default::default()
        };
        assert_eq!(check_p(p), "ok");
    }

    #[test]
    fn first_failing_parameter_in_qemu_order_wins() {
        let p = Parameters {
            announce_step: 0,
            compress_level: 10,
            downtime_limit: u64::MAX,
            ..Default::default()
        };
        assert_eq!(
            check_p(p),
            "Parameter 'compress_level' expects a value between 0 and 9"
        );
        let p = Parameters {
            announce_step: 0,
            downtime_limit: u64::MAX,
            ..Default::default()
        };
        assert_eq!(
            check_p(p),
            "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"
        );
    }

    #[test]
    fn bitmap_mapping_errors_are_prefixed() {
        let p = Parameters {
            block_bitmap_mapping: Some(vec![NodeAlias {
                node_name: "n".into(),
                alias: "1x".into(),
                bitmaps: vec![],
            }]),
            ..Default::default()
        };
        assert_eq!(
            check_p(p),
            "Invalid mapping given for block-bitmap-mapping: The node alias '1x' is not well-formed"
        );
    }

    #[test]
    fn zero_copy_parameter_rule_reads_current_capabilities() {
        const Z: &str = "Zero copy only available for non-compressed non-TLS multifd migration";
        let zc = caps(&[Capability::ZeroCopySend, Capability::Multifd]);
        let zstd = Parameters {
            multifd_compression: MultiFdCompression::Zstd,
            ..Default::default()
        };
        let tls = Parameters {
            tls_creds: "c".into(),
            ..Default::default()
        };
        assert_eq!(text(check_parameters(&zstd, &zc)), Z);
        assert_eq!(text(check_parameters(&tls, &zc)), Z);
        assert_eq!(text(check_parameters(&zstd, &Capabilities::new())), "ok");
        assert_eq!(text(check_parameters(&Parameters::default(), &zc)), "ok");
        // Ranges are checked before the zero-copy rule.
        let both = Parameters {
            compress_level: 10,
            ..zstd
        };
        assert_eq!(
            text(check_parameters(&both, &zc)),
            "Parameter 'compress_level' expects a value between 0 and 9"
        );
    }
}
