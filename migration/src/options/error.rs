//! [`OptionsError`]: why a capability or parameter change was refused, in QEMU's words.

use thiserror::Error;

use super::capabilities::Capability;
use crate::qapi::QapiError;

/// Every refusal of the options module; `Display` is QEMU's exact text.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OptionsError {
    /// The arguments of a QMP command did not visit (type, range, missing, unexpected).
    #[error(transparent)]
    Qapi(#[from] QapiError),
    /// `QERR_MIGRATION_ACTIVE`: capabilities cannot change while a migration runs.
    #[error("There's a migration process in progress")]
    MigrationActive,
    /// `block` asked for: Ferry, like QEMU built without it, has no old-style block migration.
    #[error("QEMU compiled without old-style (blk/-b, inc/-i) block migration")]
    BlockMigrationUnsupported,
    /// `x-colo` asked for: no replication module.
    #[error("QEMU compiled without replication module can't enable COLO")]
    ColoUnsupported,
    /// `postcopy-ram` on the incoming side of a host that cannot do it.
    #[error("Postcopy is not supported: {0}")]
    PostcopyUnsupported(String),
    /// `postcopy-ram` with `x-ignore-shared`.
    #[error("Postcopy is not compatible with ignore-shared")]
    PostcopyIgnoreShared,
    /// `postcopy-ram` with `multifd`.
    #[error("Postcopy is not yet compatible with multifd")]
    PostcopyMultifd,
    /// `background-snapshot` without userfaultfd write-protect in the kernel.
    #[error("Background-snapshot is not supported by host kernel")]
    BackgroundSnapshotNoKernelSupport,
    /// `background-snapshot` with guest memory that cannot be write-protected.
    #[error("Background-snapshot is not compatible with guest memory configuration")]
    BackgroundSnapshotMemory,
    /// `background-snapshot` with a capability it excludes.
    #[error("Background-snapshot is not compatible with {0}")]
    BackgroundSnapshotConflict(Capability),
    /// `zero-copy-send` without plain multifd, or with compression, XBZRLE or TLS.
    #[error("Zero copy only available for non-compressed non-TLS multifd migration")]
    ZeroCopyConflict,
    /// `postcopy-preempt` without `postcopy-ram`.
    #[error("Postcopy preempt requires postcopy-ram")]
    PostcopyPreemptWithoutPostcopy,
    /// `postcopy-preempt` with `compress`.
    #[error("Postcopy preempt not compatible with compress")]
    PostcopyPreemptCompress,
    /// `multifd` with `compress`.
    #[error("Multifd is not compatible with compress")]
    MultifdCompress,
    /// `switchover-ack` without `return-path`.
    #[error("Capability 'switchover-ack' requires capability 'return-path'")]
    SwitchoverAckWithoutReturnPath,
    /// `QERR_INVALID_PARAMETER_VALUE` from the parameter check (C names, QEMU's range text).
    #[error("Parameter '{name}' expects {expects}")]
    InvalidParameterValue {
        /// The parameter's C name (`compress_level`).
        name: &'static str,
        /// The accepted range as QEMU words it.
        expects: &'static str,
    },
    /// `block-bitmap-mapping` failed QEMU's alias-map check.
    #[error("Invalid mapping given for block-bitmap-mapping: {0}")]
    BitmapMapping(String),
    /// A running migration could not resize its XBZRLE cache (the new size stays set, as in QEMU).
    #[error("{0}")]
    XbzrleCacheResize(String),
}

impl OptionsError {
    /// The QMP error class QEMU reports (always `GenericError`).
    pub fn class(&self) -> &'static str {
        "GenericError"
    }

    /// The hint QEMU appends for a human (HMP) reader; QMP does not send it.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            OptionsError::BlockMigrationUnsupported => Some("Use drive_mirror+NBD instead.\n"),
            OptionsError::ColoUnsupported => Some("Please enable replication before COLO.\n"),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_of_messages_the_seed_lost_are_qemu_8_1s() {
        assert_eq!(
            OptionsError::BlockMigrationUnsupported.to_string(),
            "QEMU compiled without old-style (blk/-b, inc/-i) block migration"
        );
        assert_eq!(
            OptionsError::SwitchoverAckWithoutReturnPath.to_string(),
            "Capability 'switchover-ack' requires capability 'return-path'"
        );
    }

    #[test]
    fn conflict_names_the_capability_by_its_qmp_name() {
        assert_eq!(
            OptionsError::BackgroundSnapshotConflict(Capability::PauseBeforeSwitchover).to_string(),
            "Background-snapshot is not compatible with pause-before-switchover"
        );
    }

    #[test]
    fn hints_exist_only_for_block_and_colo() {
        assert_eq!(
            OptionsError::BlockMigrationUnsupported.hint(),
            Some("Use drive_mirror+NBD instead.\n")
        );
        assert_eq!(
            OptionsError::ColoUnsupported.hint(),
            Some("Please enable replication before COLO.\n")
        );
        assert_eq!(OptionsError::MigrationActive.hint(), None);
        assert_eq!(OptionsError::MigrationActive.class(), "GenericError");
    }

    #[test]
    fn qapi_errors_pass_through_unchanged() {
        let e: OptionsError = QapiError::Missing("capabilities".into()).into();
        assert_eq!(e.to_string(), "Parameter 'capabilities' is missing");
    }
}
