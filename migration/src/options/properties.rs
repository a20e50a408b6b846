//! QEMU's `-global migration.NAME=VALUE` properties (the seed's `migration_properties`
//! table): every capability and parameter under its property name, plus the
//! pseudo-properties that are neither, with QEMU's spellings of values.
//!
//! | property | sets | effect in Ferry |
//! |---|---|---|
//! | `store-global-state` (on) | | off: the destination starts the guest whatever the source's run state |
//! | `send-configuration` (on) | | none: Ferry's stream header always carries the configuration and the destination always checks it |
//! | `send-section-footer` (on) | | none: every Ferry frame is checksummed |
//! | `decompress-error-check` (on) | | legacy `compress`: a page that fails to decompress fails the migration (off: it is zeroed, as QEMU does) |
//! | `multifd-flush-after-each-section` (off) | | multifd: flush the channels after each pass segment rather than once per pass |
//! | `x-clear-bitmap-shift` (18) | | pages per dirty-log clear chunk, as a power of two (clamped to 6..=31 as QEMU does) |
//! | `x-preempt-pre-7-2` (off) | | none: Ferry's postcopy preempt channel has one layout |
//! | `x-xbzrle`, `x-auto-converge`, ... | the capability | |
//! | `x-compress-level`, `x-max-bandwidth`, `multifd-channels`, ... | the parameter | |

use serde::Serialize;

use super::capabilities::{Capabilities, Capability};
use super::parameters::{MultiFdCompression, Parameters};

/// QEMU's default for `x-clear-bitmap-shift` (2^18 pages = 1 GiB of 4 KiB pages).
pub const CLEAR_BITMAP_SHIFT_DEFAULT: u8 = 18;
/// Smallest clear chunk QEMU accepts (64 pages).
pub const CLEAR_BITMAP_SHIFT_MIN: u8 = 6;
/// Largest clear chunk QEMU accepts.
pub const CLEAR_BITMAP_SHIFT_MAX: u8 = 31;

/// The migration object's pseudo-properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Properties {
    /// `store-global-state`.
    pub store_global_state: bool,
    /// `send-configuration`.
    pub send_configuration: bool,
    /// `send-section-footer`.
    pub send_section_footer: bool,
    /// `decompress-error-check`.
    pub decompress_error_check: bool,
    /// `multifd-flush-after-each-section`.
    pub multifd_flush_after_each_section: bool,
    /// `x-clear-bitmap-shift`.
    #[serde(rename = "x-clear-bitmap-shift")]
    pub clear_bitmap_shift: u8,
    /// `x-preempt-pre-7-2`.
    #[serde(rename = "x-preempt-pre-7-2")]
    pub preempt_pre_7_2: bool,
}

impl Default for Properties {
    fn default() -> Self {
        Properties {
            store_global_state: true,
            send_configuration: true,
            send_section_footer: true,
            decompress_error_check: true,
            multifd_flush_after_each_section: false,
            clear_bitmap_shift: CLEAR_BITMAP_SHIFT_DEFAULT,
            preempt_pre_7_2: false,
        }
    }
}

impl Properties {
    /// The clear chunk shift actually used, clamped as QEMU's ram.c does, with the
    /// warning QEMU prints when it had to clamp.
    pub fn effective_clear_bitmap_shift(&self) -> (u8, Option<String>) {
        let s = self.clear_bitmap_shift;
        if s > CLEAR_BITMAP_SHIFT_MAX {
            (
                CLEAR_BITMAP_SHIFT_MAX,
                Some(format!(
                    "clear_bitmap_shift ({s}) too big, using max value ({CLEAR_BITMAP_SHIFT_MAX})"
                )),
            )
        } else if s < CLEAR_BITMAP_SHIFT_MIN {
            (
                CLEAR_BITMAP_SHIFT_MIN,
                Some(format!(
                    "clear_bitmap_shift ({s}) too small, using min value ({CLEAR_BITMAP_SHIFT_MIN})"
                )),
            )
        } else {
            (s, None)
        }
    }
}

/// Everything `-global migration.*` can set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GlobalSettings {
    /// Capabilities.
    pub caps: Capabilities,
    /// Parameters.
    pub params: Parameters,
    /// Pseudo-properties.
    pub props: Properties,
}

#[derive(Clone, Copy)]
enum Kind {
    Cap(Capability),
    Bool(fn(&mut GlobalSettings, bool)),
    U8(fn(&mut GlobalSettings, u8)),
    U32(fn(&mut GlobalSettings, u32)),
    U64(fn(&mut GlobalSettings, u64)),
    Size(fn(&mut GlobalSettings, u64)),
    Str(fn(&mut GlobalSettings, String)),
    Compression,
}

/// The seed's `migration_properties`, in its order.
const TABLE: &[(&str, Kind)] = &[
    (
        "store-global-state",
        Kind::Bool(|s, v| s.props.store_global_state = v),
    ),
    (
        "send-configuration",
        Kind::Bool(|s, v| s.props.send_configuration = v),
    ),
    (
        "send-section-footer",
        Kind::Bool(|s, v| s.props.send_section_footer = v),
    ),
    (
        "decompress-error-check",
        Kind::Bool(|s, v| s.props.decompress_error_check = v),
    ),
    (
        "multifd-flush-after-each-section",
        Kind::Bool(|s, v| s.props.multifd_flush_after_each_section = v),
    ),
    (
        "x-clear-bitmap-shift",
        Kind::U8(|s, v| s.props.clear_bitmap_shift = v),
    ),
    (
        "x-preempt-pre-7-2",
        Kind::Bool(|s, v| s.props.preempt_pre_7_2 = v),
    ),
    (
        "x-compress-level",
        Kind::U8(|s, v| s.params.compress_level = v),
    ),
    (
        "x-compress-threads",
        Kind::U8(|s, v| s.params.compress_threads = v),
    ),
    (
        "x-compress-wait-thread",
        Kind::Bool(|s, v| s.params.compress_wait_thread = v),
    ),
    (
        "x-decompress-threads",
        Kind::U8(|s, v| s.params.decompress_threads = v),
    ),
    (
        "x-throttle-trigger-threshold",
        Kind::U8(|s, v| s.params.throttle_trigger_threshold = v),
    ),
    (
        "x-cpu-throttle-initial",
        Kind::U8(|s, v| s.params.cpu_throttle_initial = v),
    ),
    (
        "x-cpu-throttle-increment",
        Kind::U8(|s, v| s.params.cpu_throttle_increment = v),
    ),
    (
        "x-cpu-throttle-tailslow",
        Kind::Bool(|s, v| s.params.cpu_throttle_tailslow = v),
    ),
    (
        "x-max-bandwidth",
        Kind::Size(|s, v| s.params.max_bandwidth = v),
    ),
    (
        "x-downtime-limit",
        Kind::U64(|s, v| s.params.downtime_limit = v),
    ),
    (
        "x-checkpoint-delay",
        Kind::U32(|s, v| s.params.x_checkpoint_delay = v),
    ),
    (
        "multifd-channels",
        Kind::U8(|s, v| s.params.multifd_channels = v),
    ),
    ("multifd-compression", Kind::Compression),
    (
        "multifd-zlib-level",
        Kind::U8(|s, v| s.params.multifd_zlib_level = v),
    ),
    (
        "multifd-zstd-level",
        Kind::U8(|s, v| s.params.multifd_zstd_level = v),
    ),
    (
        "xbzrle-cache-size",
        Kind::Size(|s, v| s.params.xbzrle_cache_size = v),
    ),
    (
        "max-postcopy-bandwidth",
        Kind::Size(|s, v| s.params.max_postcopy_bandwidth = v),
    ),
    (
        "max-cpu-throttle",
        Kind::U8(|s, v| s.params.max_cpu_throttle = v),
    ),
    (
        "announce-initial",
        Kind::Size(|s, v| s.params.announce_initial = v),
    ),
    ("announce-max", Kind::Size(|s, v| s.params.announce_max = v)),
    (
        "announce-rounds",
        Kind::Size(|s, v| s.params.announce_rounds = v),
    ),
    (
        "announce-step",
        Kind::Size(|s, v| s.params.announce_step = v),
    ),
    ("tls-creds", Kind::Str(|s, v| s.params.tls_creds = v)),
    ("tls-hostname", Kind::Str(|s, v| s.params.tls_hostname = v)),
    ("tls-authz", Kind::Str(|s, v| s.params.tls_authz = v)),
    ("x-xbzrle", Kind::Cap(Capability::Xbzrle)),
    ("x-rdma-pin-all", Kind::Cap(Capability::RdmaPinAll)),
    ("x-auto-converge", Kind::Cap(Capability::AutoConverge)),
    ("x-zero-blocks", Kind::Cap(Capability::ZeroBlocks)),
    ("x-compress", Kind::Cap(Capability::Compress)),
    ("x-events", Kind::Cap(Capability::Events)),
    ("x-postcopy-ram", Kind::Cap(Capability::PostcopyRam)),
    ("x-postcopy-preempt", Kind::Cap(Capability::PostcopyPreempt)),
    ("x-colo", Kind::Cap(Capability::XColo)),
    ("x-release-ram", Kind::Cap(Capability::ReleaseRam)),
    ("x-block", Kind::Cap(Capability::Block)),
    ("x-return-path", Kind::Cap(Capability::ReturnPath)),
    ("x-multifd", Kind::Cap(Capability::Multifd)),
    (
        "x-background-snapshot",
        Kind::Cap(Capability::BackgroundSnapshot),
    ),
    ("x-zero-copy-send", Kind::Cap(Capability::ZeroCopySend)),
    ("x-switchover-ack", Kind::Cap(Capability::SwitchoverAck)),
];

/// Every property name, in QEMU's order.
pub fn property_names() -> impl Iterator<Item = &'static str> {
    TABLE.iter().map(|(n, _)| *n)
}

/// QEMU's boolean spellings (qapi_bool_parse).
fn parse_bool(name: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{name}' expects 'on' or 'off'")),
    }
}

/// An unsigned integer as QEMU's string input visitor reads it (`qemu_strtou64`, base 0:
/// decimal, 0x hex, 0 octal; a minus sign wraps, as strtoull does, so `-1` is 2^64-1).
fn parse_uint(name: &str, v: &str, max: u64, ctype: &str) -> Result<u64, String> {
    let t = v.trim();
    let (negative, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let parsed = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8)
    } else {
        t.parse::<u64>()
    };
    match parsed.map(|n| if negative { n.wrapping_neg() } else { n }) {
        Ok(n) if n <= max => Ok(n),
        Ok(_) => Err(format!("Parameter '{name}' expects {ctype}")),
        // The visitor's own words (QERR_INVALID_PARAMETER_VALUE with "uint64").
        Err(_) => Err(format!("Parameter '{name}' expects uint64")),
    }
}

/// Applies `-global migration.NAME=VALUE` (given `NAME` and `VALUE`) to `s`.
///
/// The message on failure is QEMU's ("can't apply global migration.NAME=VALUE: ...").
pub fn apply_global(s: &mut GlobalSettings, name: &str, value: &str) -> Result<(), String> {
    let prefix = |why: String| format!("can't apply global migration.{name}={value}: {why}");
    let Some((_, kind)) = TABLE.iter().find(|(n, _)| *n == name) else {
        return Err(prefix(format!("Property 'migration.{name}' not found")));
    };
    match *kind {
        Kind::Cap(cap) => s.caps.set(cap, parse_bool(name, value).map_err(prefix)?),
        Kind::Bool(set) => set(s, parse_bool(name, value).map_err(prefix)?),
        Kind::U8(set) => set(
            s,
            parse_uint(name, value, u64::from(u8::MAX), "uint8_t").map_err(prefix)? as u8,
        ),
        Kind::U32(set) => set(
            s,
            parse_uint(name, value, u64::from(u32::MAX), "uint32_t").map_err(prefix)? as u32,
        ),
        Kind::U64(set) => set(s, parse_uint(name, value, u64::MAX, "uint64_t").map_err(prefix)?),
        Kind::Size(set) => set(
            s,
            ram::parse_size(value)
                .map_err(|_| {
                    format!(
                        "Parameter '{name}' expects a non-negative number below 2^64\n\
                         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                         and exabytes, respectively."
                    )
                })
                .map_err(prefix)?,
        ),
        Kind::Str(set) => set(s, value.to_string()),
        Kind::Compression => {
            s.params.multifd_compression = MultiFdCompression::ALL
                .into_iter()
                .find(|c| c.name() == value)
                .ok_or_else(|| prefix(format!("Parameter '{name}' does not accept value '{value}'")))?;
        }
    }
    Ok(())
}

/// Parses a whole `-global` argument (`migration.NAME=VALUE`) into `s`.
pub fn apply_global_arg(s: &mut GlobalSettings, arg: &str) -> Result<(), String> {
    let (lhs, value) = arg
        .split_once('=')
        .ok_or_else(|| format!("-global {arg}: expected DRIVER.PROPERTY=VALUE"))?;
    let (driver, name) = lhs
        .split_once('.')
        .ok_or_else(|| format!("-global {arg}: expected DRIVER.PROPERTY=VALUE"))?;
    if driver != "migration" {
        return Err(format!(
            "-global {arg}: Ferry has no device '{driver}' (only migration.* properties exist)"
        ));
    }
    apply_global(s, name, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_covers_every_capability_property_of_the_seed_and_is_unique() {
        let names: Vec<_> = property_names().collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "duplicate property");
        assert_eq!(names.len(), 48);
    }

    #[test]
    fn every_property_parses_and_lands_where_it_belongs() {
        let mut s = GlobalSettings::default();
        for (arg, check) in [
            (
                "migration.x-multifd=on",
                Box::new(|s: &GlobalSettings| s.caps.get(Capability::Multifd))
                    as Box<dyn Fn(&GlobalSettings) -> bool>,
            ),
            (
                "migration.x-max-bandwidth=64M",
                Box::new(|s: &GlobalSettings| s.params.max_bandwidth == 64 << 20),
            ),
            (
                "migration.store-global-state=off",
                Box::new(|s: &GlobalSettings| !s.props.store_global_state),
            ),
            (
                "migration.x-clear-bitmap-shift=0x10",
                Box::new(|s: &GlobalSettings| s.props.clear_bitmap_shift == 16),
            ),
            (
                "migration.multifd-compression=zstd",
                Box::new(|s: &GlobalSettings| {
                    s.params.multifd_compression == MultiFdCompression::Zstd
                }),
            ),
            (
                "migration.x-downtime-limit=100",
                Box::new(|s: &GlobalSettings| s.params.downtime_limit == 100),
            ),
            (
                "migration.tls-hostname=h",
                Box::new(|s: &GlobalSettings| s.params.tls_hostname == "h"),
            ),
            (
                "migration.x-cpu-throttle-tailslow=yes",
                Box::new(|s: &GlobalSettings| s.params.cpu_throttle_tailslow),
            ),
        ] {
            apply_global_arg(&mut s, arg).unwrap();
            assert!(check(&s), "{arg}");
        }
        // Every name in the table accepts a value of its kind.
        for (name, kind) in TABLE {
            let mut s = GlobalSettings::default();
            let v = match kind {
                Kind::Cap(_) | Kind::Bool(_) => "on",
                Kind::Compression => "zlib",
                Kind::Str(_) => "x",
                Kind::Size(_) => "4k",
                Kind::U8(_) | Kind::U32(_) | Kind::U64(_) => "7",
            };
            apply_global(&mut s, name, v).unwrap_or_else(|e| panic!("{name}={v}: {e}"));
            if s == GlobalSettings::default() {
                // A boolean whose default is on: switching it off must change it.
                apply_global(&mut s, name, "off").unwrap_or_else(|e| panic!("{name}=off: {e}"));
            }
            assert_ne!(s, GlobalSettings::default(), "{name} changed nothing");
        }
    }

    #[test]
    fn bad_names_and_values_get_qemus_messages() {
        let mut s = GlobalSettings::default();
        let before = s.clone();
        assert_eq!(
            apply_global_arg(&mut s, "migration.nope=1").unwrap_err(),
            "can't apply global migration.nope=1: Property 'migration.nope' not found"
        );
        assert_eq!(
            apply_global_arg(&mut s, "migration.x-multifd=maybe").unwrap_err(),
            "can't apply global migration.x-multifd=maybe: Parameter 'x-multifd' expects 'on' or 'off'"
        );
        assert_eq!(
            apply_global_arg(&mut s, "migration.multifd-channels=300").unwrap_err(),
            "can't apply global migration.multifd-channels=300: Parameter 'multifd-channels' expects uint8_t"
        );
        assert!(
            apply_global_arg(&mut s, "migration.multifd-compression=lz4")
                .unwrap_err()
                .ends_with("Parameter 'multifd-compression' does not accept value 'lz4'")
        );
        for v in ["abc", "08", "1x", "--1"] {
            assert_eq!(
                apply_global_arg(&mut s, &format!("migration.x-compress-level={v}")).unwrap_err(),
                format!(
                    "can't apply global migration.x-compress-level={v}: Parameter 'x-compress-level' expects uint64"
                )
            );
        }
        // strtoull wraps a minus sign: -1 is 2^64-1, too big for a uint8_t.
        assert_eq!(
            apply_global_arg(&mut s, "migration.x-compress-level=-1").unwrap_err(),
            "can't apply global migration.x-compress-level=-1: Parameter 'x-compress-level' expects uint8_t"
        );
        assert!(apply_global_arg(&mut s, "migration.xbzrle-cache-size=lots").is_err());
        assert!(apply_global_arg(&mut s, "virtio-net.mac=1").is_err());
        assert!(apply_global_arg(&mut s, "migration.x-xbzrle").is_err());
        assert_eq!(s, before, "a refused -global changes nothing");
    }

    #[test]
    fn clear_bitmap_shift_is_clamped_like_qemu() {
        let p = Properties {
            clear_bitmap_shift: 40,
            ..Properties::default()
        };
        assert_eq!(p.effective_clear_bitmap_shift().0, 31);
        let p = Properties {
            clear_bitmap_shift: 2,
            ..Properties::default()
        };
        assert_eq!(p.effective_clear_bitmap_shift().0, 6);
        assert_eq!(
            Properties::default().effective_clear_bitmap_shift(),
            (18, None)
        );
    }
}
