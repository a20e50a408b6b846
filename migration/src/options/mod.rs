//! QEMU migration capabilities and parameters: names, defaults, C types,
//! compatibility rules, range checks, error texts and set semantics, as QEMU
//! 8.1's `migration/options.c` defines them, so tools that drive QEMU see
//! the same interface in Ferry.
//!
//! - [`capabilities`]: [`Capability`] (QMP names, QEMU's enum order) and [`Capabilities`].
//! - [`parameters`]: [`Parameters`] (every member with its default) and
//!   [`ParametersUpdate`] (`migrate-set-parameters` input).
//! - [`bitmap_mapping`]: the `block-bitmap-mapping` types and QEMU's alias-map check.
//! - [`check`]: `migrate_caps_check` and `migrate_params_check`, rule for rule.
//! - [`store`]: [`MigrationOptions`], the thread-safe store with check-then-apply sets.
//! - [`hooks`]: [`OptionsHooks`], how a set reaches a running migration.
//! - [`properties`]: QEMU's `-global migration.*` properties and pseudo-properties.
//! - [`qmp`]: the JSON forms of the four QMP commands.
//! - [`error`]: [`OptionsError`], every refusal in QEMU's words.
//!
//! Where Ferry departs from QEMU 8.1 on purpose:
//! - `multifd-zlib-level` and `multifd-zstd-level` set by `migrate-set-parameters`
//!   are checked and applied (QEMU 8.1 silently ignored them; fixed in 9.0).
//! - `tls-authz: null` means "" like the other TLS members (QEMU 8.1 aborts).
//! - QEMU 8.1's `dirty-limit` capability and its two parameters are not offered
//!   (the reference `options.c` predates them).

pub mod bitmap_mapping;
pub mod capabilities;
pub mod check;
pub mod error;
pub mod hooks;
pub mod parameters;
pub mod properties;
pub mod qmp;
pub mod store;

pub use bitmap_mapping::{BitmapAlias, BitmapAliasTransform, NodeAlias};
pub use capabilities::{Capabilities, Capability, CapabilityStatus, CAPABILITY_COUNT};
pub use check::{
    check_capabilities, check_parameters, CapsCheckContext, FixedHostSupport, HostSupport,
    TARGET_PAGE_SIZE,
};
pub use error::OptionsError;
pub use hooks::{HookCall, OptionsHooks, RecordingHooks};
pub use parameters::{AnnounceParameters, MultiFdCompression, Parameters, ParametersUpdate};
pub use properties::{apply_global_arg, GlobalSettings, Properties};
pub use store::MigrationOptions;
