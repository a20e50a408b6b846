//! Migration parameters: QEMU 8.1's `MigrationParameters` (the current
//! settings, every member set) and `MigrateSetParameters` (an update, every
//! member optional), with QEMU's defaults and C types.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::bitmap_mapping::NodeAlias;
use crate::qapi::{Args, QapiError, StrOrNull};

/// Default `max-bandwidth`: 128 MiB/s (`MAX_THROTTLE`).
pub const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;
/// Default `downtime-limit` in milliseconds.
pub const DEFAULT_DOWNTIME_LIMIT: u64 = 300;
/// Default `xbzrle-cache-size`: 64 MiB.
pub const DEFAULT_XBZRLE_CACHE_SIZE: u64 = 64 << 20;
/// Default `x-checkpoint-delay` in milliseconds (`200 * 100`).
pub const DEFAULT_X_CHECKPOINT_DELAY: u32 = 200 * 100;

/// `MultiFDCompression`: how multifd channels compress pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MultiFdCompression {
    /// No compression.
    #[default]
    None,
    /// zlib.
    Zlib,
    /// zstd.
    Zstd,
}

impl MultiFdCompression {
    /// Every method, in QEMU's enum order.
    pub const ALL: [MultiFdCompression; 3] = [
        MultiFdCompression::None,
        MultiFdCompression::Zlib,
        MultiFdCompression::Zstd,
    ];

    /// The QMP name.
    pub const fn name(self) -> &'static str {
        match self {
            MultiFdCompression::None => "none",
            MultiFdCompression::Zlib => "zlib",
            MultiFdCompression::Zstd => "zstd",
        }
    }

    /// The method with QMP name `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

impl fmt::Display for MultiFdCompression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Every migration parameter, as `query-migrate-parameters` reports them.
///
/// Field order and JSON names are QEMU 8.1's `MigrationParameters`, so
/// serializing this struct prints the members in the order QEMU prints them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Parameters {
    /// Initial delay (ms) before the first self-announce after migration (`size`).
    pub announce_initial: u64,
    /// Maximum delay (ms) between announce packets (`size`).
    pub announce_max: u64,
    /// Number of announce packets (`size`).
    pub announce_rounds: u64,
    /// Delay increase (ms) between announce packets (`size`).
    pub announce_step: u64,
    /// Old-style compression level 0..9 (`uint8`).
    pub compress_level: u8,
    /// Old-style compression threads (`uint8`).
    pub compress_threads: u8,
    /// Wait for a free compression thread instead of sending uncompressed.
    pub compress_wait_thread: bool,
    /// Old-style decompression threads (`uint8`).
    pub decompress_threads: u8,
    /// Percentage of dirtied/transferred bytes that triggers auto-converge throttling (`uint8`).
    pub throttle_trigger_threshold: u8,
    /// Initial auto-converge throttle percentage (`uint8`).
    pub cpu_throttle_initial: u8,
    /// Auto-converge throttle increment percentage (`uint8`).
    pub cpu_throttle_increment: u8,
    /// Smaller throttle steps at the tail of auto-converge.
    pub cpu_throttle_tailslow: bool,
    /// ID of the TLS credentials object; empty means plain text.
    pub tls_creds: String,
    /// Host name to validate the destination's certificate against.
    pub tls_hostname: String,
    /// ID of the authz object checking the peer (QEMU reports "" when unset).
    pub tls_authz: String,
    /// Bandwidth limit in bytes per second (`size`).
    pub max_bandwidth: u64,
    /// Tolerated downtime in milliseconds (`uint64`).
    pub downtime_limit: u64,
    /// Delay between COLO checkpoints in ms (`uint32`, unstable).
    pub x_checkpoint_delay: u32,
    /// Incremental block migration.
    pub block_incremental: bool,
    /// Number of multifd channels (`uint8`).
    pub multifd_channels: u8,
    /// XBZRLE cache size in bytes (`size`).
    pub xbzrle_cache_size: u64,
    /// Background bandwidth limit during postcopy, 0 = unlimited (`size`).
    pub max_postcopy_bandwidth: u64,
    /// Highest auto-converge throttle percentage (`uint8`).
    pub max_cpu_throttle: u8,
    /// multifd compression method.
    pub multifd_compression: MultiFdCompression,
    /// multifd zlib level 0..9 (`uint8`).
    pub multifd_zlib_level: u8,
    /// multifd zstd level 0..20 (`uint8`).
    pub multifd_zstd_level: u8,
    /// Block node and bitmap aliases; absent until set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_bitmap_mapping: Option<Vec<NodeAlias>>,
}

impl Default for Parameters {
    fn default() -> Self {
        Parameters {
            announce_initial: 50,
            announce_max: 550,
            announce_rounds: 5,
            announce_step: 100,
            compress_level: 1,
            compress_threads: 8,
            compress_wait_thread: true,
            decompress_threads: 2,
            throttle_trigger_threshold: 50,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            cpu_throttle_tailslow: false,
            tls_creds: String::new(),
            tls_hostname: String::new(),
            tls_authz: String::new(),
            max_bandwidth: DEFAULT_MAX_BANDWIDTH,
            downtime_limit: DEFAULT_DOWNTIME_LIMIT,
            x_checkpoint_delay: DEFAULT_X_CHECKPOINT_DELAY,
            block_incremental: false,
            multifd_channels: 2,
            xbzrle_cache_size: DEFAULT_XBZRLE_CACHE_SIZE,
            max_postcopy_bandwidth: 0,
            max_cpu_throttle: 99,
            multifd_compression: MultiFdCompression::None,
            multifd_zlib_level: 1,
            multifd_zstd_level: 1,
            block_bitmap_mapping: None,
        }
    }
}

/// The self-announce timing (`AnnounceParameters`) taken from the parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AnnounceParameters {
    /// Initial delay in ms.
    pub initial: u64,
    /// Maximum delay in ms.
    pub max: u64,
    /// Number of rounds.
    pub rounds: u64,
    /// Delay step in ms.
    pub step: u64,
}

impl Parameters {
    /// QEMU's `migrate_tls()`: TLS is on when `tls-creds` is not empty.
    pub fn tls(&self) -> bool {
        !self.tls_creds.is_empty()
    }

    /// QEMU's `migrate_announce_params()`.
    pub fn announce(&self) -> AnnounceParameters {
        AnnounceParameters {
            initial: self.announce_initial,
            max: self.announce_max,
            rounds: self.announce_rounds,
            step: self.announce_step,
        }
    }

    /// A copy with `update` merged in (QEMU's `migrate_params_test_apply`).
    ///
    /// Unlike QEMU 8.1, which forgot `multifd-zlib-level` and
    /// `multifd-zstd-level` here and in the apply step (so setting them had
    /// no effect; fixed in QEMU 9.0), every member of the update is merged.
    /// A `null` for a TLS string means "" (QEMU rewrites it the same way;
    /// for `tls-authz` QEMU 8.1 would abort instead).
    pub fn merged(&self, update: &ParametersUpdate) -> Parameters {
        let mut p = self.clone();
        macro_rules! take {
            ($($field:ident),* $(,)?) => {
                $(if let Some(v) = update.$field { p.$field = v; })*
            };
        }
        take!(
            announce_initial,
            announce_max,
            announce_rounds,
            announce_step,
            compress_level,
            compress_threads,
            compress_wait_thread,
            decompress_threads,
            throttle_trigger_threshold,
            cpu_throttle_initial,
            cpu_throttle_increment,
            cpu_throttle_tailslow,
            max_bandwidth,
            downtime_limit,
            x_checkpoint_delay,
            block_incremental,
            multifd_channels,
            xbzrle_cache_size,
            max_postcopy_bandwidth,
            max_cpu_throttle,
            multifd_compression,
            multifd_zlib_level,
            multifd_zstd_level,
        );
        if let Some(v) = &update.tls_creds {
            p.tls_creds = v.clone().into_string_or_empty();
        }
        if let Some(v) = &update.tls_hostname {
            p.tls_hostname = v.clone().into_string_or_empty();
        }
        if let Some(v) = &update.tls_authz {
            p.tls_authz = v.clone().into_string_or_empty();
        }
        if let Some(v) = &update.block_bitmap_mapping {
            p.block_bitmap_mapping = Some(v.clone());
        }
        p
    }
}

/// `migrate-set-parameters` input: every member optional.
///
/// Parse QMP arguments with [`ParametersUpdate::from_qmp`] (QEMU's visitor
/// semantics and error texts); serialize to produce such arguments.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ParametersUpdate {
    /// `announce-initial` (`size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_initial: Option<u64>,
    /// `announce-max` (`size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_max: Option<u64>,
    /// `announce-rounds` (`size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_rounds: Option<u64>,
    /// `announce-step` (`size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub announce_step: Option<u64>,
    /// `compress-level` (`uint8`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compress_level: Option<u8>,
    /// `compress-threads` (`uint8`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compress_threads: Option<u8>,
    /// `compress-wait-thread`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compress_wait_thread: Option<bool>,
    /// `decompress-threads` (`uint8`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decompress_threads: Option<u8>,
    /// `throttle-trigger-threshold` (`uint8`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_trigger_threshold: Option<u8>,
    /// `cpu-throttle-initial` (`uint8`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_initial: Option<u8>,
    /// `cpu-throttle-increment` (`uint8`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_increment: Option<u8>,
    /// `cpu-throttle-tailslow`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_tailslow: Option<bool>,
    /// `tls-creds` (`StrOrNull`; null means "").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<StrOrNull>,
    /// `tls-hostname` (`StrOrNull`; null means "").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<StrOrNull>,
    /// `tls-authz` (`StrOrNull`; null means "").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<StrOrNull>,
    /// `max-bandwidth` (`size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// `downtime-limit` (`uint64`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// `x-checkpoint-delay` (`uint32`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x_checkpoint_delay: Option<u32>,
    /// `block-incremental`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_incremental: Option<bool>,
    /// `multifd-channels` (`uint8`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u8>,
    /// `xbzrle-cache-size` (`size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache_size: Option<u64>,
    /// `max-postcopy-bandwidth` (`size`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_postcopy_bandwidth: Option<u64>,
    /// `max-cpu-throttle` (`uint8`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_cpu_throttle: Option<u8>,
    /// `multifd-compression`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_compression: Option<MultiFdCompression>,
    /// `multifd-zlib-level` (`uint8`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_zlib_level: Option<u8>,
    /// `multifd-zstd-level` (`uint8`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_zstd_level: Option<u8>,
    /// `block-bitmap-mapping`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_bitmap_mapping: Option<Vec<NodeAlias>>,
}

impl ParametersUpdate {
    /// Reads `migrate-set-parameters` arguments with QEMU's visitor rules:
    /// members in schema order, then a check for unexpected members.
    pub fn from_qmp(
        arguments: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, QapiError> {
        let mut a = Args::new(arguments);
        let update = ParametersUpdate {
            announce_initial: a.opt_size("announce-initial")?,
            announce_max: a.opt_size("announce-max")?,
            announce_rounds: a.opt_size("announce-rounds")?,
            announce_step: a.opt_size("announce-step")?,
            compress_level: a.opt_u8("compress-level")?,
            compress_threads: a.opt_u8("compress-threads")?,
            compress_wait_thread: a.opt_bool("compress-wait-thread")?,
            decompress_threads: a.opt_u8("decompress-threads")?,
            throttle_trigger_threshold: a.opt_u8("throttle-trigger-threshold")?,
            cpu_throttle_initial: a.opt_u8("cpu-throttle-initial")?,
            cpu_throttle_increment: a.opt_u8("cpu-throttle-increment")?,
            cpu_throttle_tailslow: a.opt_bool("cpu-throttle-tailslow")?,
            tls_creds: a.opt_str_or_null("tls-creds")?,
            tls_hostname: a.opt_str_or_null("tls-hostname")?,
            tls_authz: a.opt_str_or_null("tls-authz")?,
            max_bandwidth: a.opt_size("max-bandwidth")?,
            downtime_limit: a.opt_u64("downtime-limit")?,
            x_checkpoint_delay: a.opt_u32("x-checkpoint-delay")?,
            block_incremental: a.opt_bool("block-incremental")?,
            multifd_channels: a.opt_u8("multifd-channels")?,
            xbzrle_cache_size: a.opt_size("xbzrle-cache-size")?,
            max_postcopy_bandwidth: a.opt_size("max-postcopy-bandwidth")?,
            max_cpu_throttle: a.opt_u8("max-cpu-throttle")?,
            multifd_compression: a
                .opt_enum("multifd-compression", MultiFdCompression::from_name)?,
            multifd_zlib_level: a.opt_u8("multifd-zlib-level")?,
            multifd_zstd_level: a.opt_u8("multifd-zstd-level")?,
            block_bitmap_mapping: a.opt_list("block-bitmap-mapping", NodeAlias::visit)?,
        };
        a.finish()?;
        Ok(update)
    }

    /// The arguments object for `migrate-set-parameters` (only the members that are set).
    pub fn to_qmp(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(map)) => map,
            // A struct of plain fields always serializes to an object.
            _ => serde_json::Map::new(),
        }
    }

    /// An update that sets every member to its value in `p`.
    pub fn from_parameters(p: &Parameters) -> Self {
        ParametersUpdate {
            announce_initial: Some(p.announce_initial),
            announce_max: Some(p.announce_max),
            announce_rounds: Some(p.announce_rounds),
            announce_step: Some(p.announce_step),
            compress_level: Some(p.compress_level),
            compress_threads: Some(p.compress_threads),
            compress_wait_thread: Some(p.compress_wait_thread),
            decompress_threads: Some(p.decompress_threads),
            throttle_trigger_threshold: Some(p.throttle_trigger_threshold),
            cpu_throttle_initial: Some(p.cpu_throttle_initial),
            cpu_throttle_increment: Some(p.cpu_throttle_increment),
            cpu_throttle_tailslow: Some(p.cpu_throttle_tailslow),
            tls_creds: Some(StrOrNull::Str(p.tls_creds.clone())),
            tls_hostname: Some(StrOrNull::Str(p.tls_hostname.clone())),
            tls_authz: Some(StrOrNull::Str(p.tls_authz.clone())),
            max_bandwidth: Some(p.max_bandwidth),
            downtime_limit: Some(p.downtime_limit),
            x_checkpoint_delay: Some(p.x_checkpoint_delay),
            block_incremental: Some(p.block_incremental),
            multifd_channels: Some(p.multifd_channels),
            xbzrle_cache_size: Some(p.xbzrle_cache_size),
            max_postcopy_bandwidth: Some(p.max_postcopy_bandwidth),
            max_cpu_throttle: Some(p.max_cpu_throttle),
            multifd_compression: Some(p.multifd_compression),
            multifd_zlib_level: Some(p.multifd_zlib_level),
            multifd_zstd_level: Some(p.multifd_zstd_level),
            block_bitmap_mapping: p.block_bitmap_mapping.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_are_qemus() {
        let p = Parameters::default();
        assert_eq!(p.compress_level, 1);
        assert_eq!(p.compress_threads, 8);
        assert!(p.compress_wait_thread);
        assert_eq!(p.decompress_threads, 2);
        assert_eq!(p.throttle_trigger_threshold, 50);
        assert_eq!(p.cpu_throttle_initial, 20);
        assert_eq!(p.cpu_throttle_increment, 10);
        assert!(!p.cpu_throttle_tailslow);
        assert_eq!(p.max_bandwidth, 134_217_728);
        assert_eq!(p.downtime_limit, 300);
        assert_eq!(p.x_checkpoint_delay, 20_000);
        assert!(!p.block_incremental);
        assert_eq!(p.multifd_channels, 2);
        assert_eq!(p.multifd_compression, MultiFdCompression::None);
        assert_eq!(p.multifd_zlib_level, 1);
        assert_eq!(p.multifd_zstd_level, 1);
        assert_eq!(p.xbzrle_cache_size, 67_108_864);
        assert_eq!(p.max_postcopy_bandwidth, 0);
        assert_eq!(p.max_cpu_throttle, 99);
        assert_eq!(p.announce_initial, 50);
        assert_eq!(p.announce_max, 550);
        assert_eq!(p.announce_rounds, 5);
        assert_eq!(p.announce_step, 100);
        assert_eq!(p.tls_creds, "");
        assert_eq!(p.tls_hostname, "");
        assert_eq!(p.tls_authz, "");
        assert_eq!(p.block_bitmap_mapping, None);
        assert!(!p.tls());
    }

    #[test]
    fn multifd_compression_names() {
        for m in MultiFdCompression::ALL {
            assert_eq!(MultiFdCompression::from_name(m.name()), Some(m));
            assert_eq!(serde_json::to_value(m).unwrap(), json!(m.name()));
        }
        assert_eq!(MultiFdCompression::from_name("lz4"), None);
    }

    #[test]
    fn merge_takes_only_present_members() {
        let base = Parameters::default();
        let update = ParametersUpdate {
            max_bandwidth: Some(1),
            multifd_zstd_level: Some(7),
            ..Default::default()
        };
        let m = base.merged(&update);
        assert_eq!(m.max_bandwidth, 1);
        assert_eq!(m.multifd_zstd_level, 7);
        assert_eq!(
            Parameters {
                max_bandwidth: base.max_bandwidth,
                multifd_zstd_level: base.multifd_zstd_level,
                ..m
            },
            base
        );
    }

    #[test]
    fn merge_reads_null_tls_strings_as_empty() {
        let base = Parameters {
            tls_creds: "c".into(),
            tls_hostname: "h".into(),
            tls_authz: "a".into(),
            ..Default::default()
        };
        let update = ParametersUpdate {
            tls_creds: Some(StrOrNull::Null),
            tls_hostname: Some(StrOrNull::Null),
            tls_authz: Some(StrOrNull::Null),
            ..Default::default()
        };
        let m = base.merged(&update);
        assert_eq!(
            (
                m.tls_creds.as_str(),
                m.tls_hostname.as_str(),
                m.tls_authz.as_str()
            ),
            ("", "", "")
        );
    }

    #[test]
    fn from_parameters_merges_back_to_the_same_parameters() {
        let p = Parameters {
            max_bandwidth: 5,
            tls_creds: "tls0".into(),
            multifd_compression: MultiFdCompression::Zlib,
            ..Default::default()
        };
        assert_eq!(
            Parameters::default().merged(&ParametersUpdate::from_parameters(&p)),
            p
        );
    }

    #[test]
    fn announce_params_come_from_the_announce_members() {
        let a = Parameters::default().announce();
        assert_eq!((a.initial, a.max, a.rounds, a.step), (50, 550, 5, 100));
    }

    #[test]
    fn update_from_qmp_reads_every_member() {
        let args = json!({
            "announce-initial": 1, "announce-max": 2, "announce-rounds": 3, "announce-step": 4,
            "compress-level": 5, "compress-threads": 6, "compress-wait-thread": false,
            "decompress-threads": 7, "throttle-trigger-threshold": 8, "cpu-throttle-initial": 9,
            "cpu-throttle-increment": 10, "cpu-throttle-tailslow": true, "tls-creds": "c",
            "tls-hostname": null, "tls-authz": "z", "max-bandwidth": 11, "downtime-limit": 12,
            "x-checkpoint-delay": 13, "block-incremental": true, "multifd-channels": 14,
            "xbzrle-cache-size": 8192, "max-postcopy-bandwidth": 15, "max-cpu-throttle": 16,
            "multifd-compression": "zstd", "multifd-zlib-level": 2, "multifd-zstd-level": 3,
            "block-bitmap-mapping": [{"node-name": "n", "alias": "a", "bitmaps": []}]
        });
        let u = ParametersUpdate::from_qmp(args.as_object().unwrap()).unwrap();
        assert_eq!(u.announce_initial, Some(1));
        assert_eq!(u.announce_step, Some(4));
        assert_eq!(u.compress_wait_thread, Some(false));
        assert_eq!(u.tls_creds, Some(StrOrNull::Str("c".into())));
        assert_eq!(u.tls_hostname, Some(StrOrNull::Null));
        assert_eq!(u.x_checkpoint_delay, Some(13));
        assert_eq!(u.multifd_compression, Some(MultiFdCompression::Zstd));
        assert_eq!(u.multifd_zstd_level, Some(3));
        assert_eq!(u.block_bitmap_mapping.as_ref().map(Vec::len), Some(1));
        // And it serializes back to the very same arguments.
        assert_eq!(serde_json::Value::Object(u.to_qmp()), args);
    }

    #[test]
    fn update_from_qmp_empty_is_empty() {
        let u = ParametersUpdate::from_qmp(&serde_json::Map::new()).unwrap();
        assert_eq!(u, ParametersUpdate::default());
        assert!(u.to_qmp().is_empty());
    }

    #[test]
    fn update_from_qmp_errors_are_qemus() {
        let cases = [
            (
                json!({"compress-level": 256}),
                "Parameter 'compress-level' expects uint8_t",
            ),
            (
                json!({"compress-level": -1}),
                "Parameter 'compress-level' expects uint8_t",
            ),
            (
                json!({"max-bandwidth": "1M"}),
                "Parameter 'max-bandwidth' expects uint64",
            ),
            (
                json!({"max-bandwidth": 1.5}),
                "Parameter 'max-bandwidth' expects uint64",
            ),
            (
                json!({"x-checkpoint-delay": 4294967296u64}),
                "Parameter 'x-checkpoint-delay' expects uint32_t",
            ),
            (
                json!({"compress-wait-thread": 1}),
                "Invalid parameter type for 'compress-wait-thread', expected: boolean",
            ),
            (
                json!({"tls-creds": 1}),
                "Invalid parameter type for 'tls-creds', expected: StrOrNull",
            ),
            (
                json!({"multifd-compression": "lz4"}),
                "Parameter 'multifd-compression' does not accept value 'lz4'",
            ),
            (
                json!({"multifd-compression": 1}),
                "Invalid parameter type for 'multifd-compression', expected: string",
            ),
            (
                json!({"block-bitmap-mapping": {}}),
                "Invalid parameter type for 'block-bitmap-mapping', expected: array",
            ),
            (
                json!({"block-bitmap-mapping": [{"node-name": "n"}]}),
                "Parameter 'block-bitmap-mapping[0].alias' is missing",
            ),
            (
                json!({"max-bandwidth": 1, "speed": 2}),
                "Parameter 'speed' is unexpected",
            ),
        ];
        for (args, text) in cases {
            let err = ParametersUpdate::from_qmp(args.as_object().unwrap()).unwrap_err();
            assert_eq!(err.to_string(), text, "for {args}");
        }
    }

    #[test]
    fn first_error_is_in_schema_order_not_json_order() {
        // compress-level comes before max-bandwidth in the schema.
        let args = json!({"max-bandwidth": "x", "compress-level": 300});
        let err = ParametersUpdate::from_qmp(args.as_object().unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Parameter 'compress-level' expects uint8_t"
        );
    }

    #[test]
    fn negative_size_wraps_like_qemu() {
        let args = json!({"max-bandwidth": -1});
        let u = ParametersUpdate::from_qmp(args.as_object().unwrap()).unwrap();
        assert_eq!(u.max_bandwidth, Some(u64::MAX));
    }
}
