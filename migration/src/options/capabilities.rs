//! Migration capabilities: QEMU 8.1's `MigrationCapability` enum and the set of them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One migration capability, named and ordered as QEMU 8.1's `MigrationCapability`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    /// `xbzrle`: send XOR-delta encoded pages.
    Xbzrle,
    /// `rdma-pin-all`: pin all guest memory for RDMA up front.
    RdmaPinAll,
    /// `auto-converge`: throttle vCPUs when migration does not converge.
    AutoConverge,
    /// `zero-blocks`: encode zero blocks efficiently in block migration.
    ZeroBlocks,
    /// `compress`: the old multi-threaded page compression.
    Compress,
    /// `events`: emit MIGRATION events on every state change.
    Events,
    /// `postcopy-ram`: start the destination before all RAM arrived.
    PostcopyRam,
    /// `x-colo`: COarse-grain LOck-stepping (unstable).
    XColo,
    /// `release-ram`: free source RAM as postcopy sends it.
    ReleaseRam,
    /// `block`: old-style block migration.
    Block,
    /// `return-path`: open the destination-to-source channel for precopy too.
    ReturnPath,
    /// `pause-before-switchover`: stop in `pre-switchover` until `migrate-continue`.
    PauseBeforeSwitchover,
    /// `multifd`: send pages over several channels.
    Multifd,
    /// `dirty-bitmaps`: migrate block dirty bitmaps.
    DirtyBitmaps,
    /// `postcopy-blocktime`: measure vCPU blocking time in postcopy.
    PostcopyBlocktime,
    /// `late-block-activate`: activate block devices on the destination only at `cont`.
    LateBlockActivate,
    /// `x-ignore-shared`: do not send shared memory (unstable).
    XIgnoreShared,
    /// `validate-uuid`: check the source's UUID on the destination.
    ValidateUuid,
    /// `background-snapshot`: a snapshot of RAM at the instant migration starts.
    BackgroundSnapshot,
    /// `zero-copy-send`: send pages with MSG_ZEROCOPY.
    ZeroCopySend,
    /// `postcopy-preempt`: a separate channel for urgent postcopy pages.
    PostcopyPreempt,
    /// `switchover-ack`: wait for the destination's ACK before switching over.
    SwitchoverAck,
}

/// How many capabilities there are.
pub const CAPABILITY_COUNT: usize = 22;

impl Capability {
    /// Every capability, in QEMU's enum order.
    pub const ALL: [Capability; CAPABILITY_COUNT] = [
        Capability::Xbzrle,
        Capability::RdmaPinAll,
        Capability::AutoConverge,
        Capability::ZeroBlocks,
        Capability::Compress,
        Capability::Events,
        Capability::PostcopyRam,
        Capability::XColo,
        Capability::ReleaseRam,
        Capability::Block,
        Capability::ReturnPath,
        Capability::PauseBeforeSwitchover,
        Capability::Multifd,
        Capability::DirtyBitmaps,
        Capability::PostcopyBlocktime,
        Capability::LateBlockActivate,
        Capability::XIgnoreShared,
        Capability::ValidateUuid,
        Capability::BackgroundSnapshot,
        Capability::ZeroCopySend,
        Capability::PostcopyPreempt,
        Capability::SwitchoverAck,
    ];

    /// The QMP name (`MigrationCapability_str`).
    pub const fn name(self) -> &'static str {
        match self {
            Capability::Xbzrle => "xbzrle",
            Capability::RdmaPinAll => "rdma-pin-all",
            Capability::AutoConverge => "auto-converge",
            Capability::ZeroBlocks => "zero-blocks",
            Capability::Compress => "compress",
            Capability::Events => "events",
            Capability::PostcopyRam => "postcopy-ram",
            Capability::XColo => "x-colo",
            Capability::ReleaseRam => "release-ram",
            Capability::Block => "block",
            Capability::ReturnPath => "return-path",
            Capability::PauseBeforeSwitchover => "pause-before-switchover",
            Capability::Multifd => "multifd",
            Capability::DirtyBitmaps => "dirty-bitmaps",
            Capability::PostcopyBlocktime => "postcopy-blocktime",
            Capability::LateBlockActivate => "late-block-activate",
            Capability::XIgnoreShared => "x-ignore-shared",
            Capability::ValidateUuid => "validate-uuid",
            Capability::BackgroundSnapshot => "background-snapshot",
            Capability::ZeroCopySend => "zero-copy-send",
            Capability::PostcopyPreempt => "postcopy-preempt",
            Capability::SwitchoverAck => "switchover-ack",
        }
    }

    /// The capability with QMP name `name`, if any.
    pub fn from_name(name: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Position in QEMU's enum (`MIGRATION_CAPABILITY_*`).
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A string that names no capability.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown migration capability '{0}'")]
pub struct UnknownCapability(pub String);

impl FromStr for Capability {
    type Err = UnknownCapability;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Capability::from_name(s).ok_or_else(|| UnknownCapability(s.to_string()))
    }
}

impl Serialize for Capability {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Capability {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Capability::from_name(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "Parameter 'capability' does not accept value '{name}'"
            ))
        })
    }
}

/// `MigrationCapabilityStatus`: one capability and its state, as QMP carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityStatus {
    /// The capability.
    pub capability: Capability,
    /// On or off.
    pub state: bool,
}

impl CapabilityStatus {
    /// `capability` set to `state`.
    pub const fn new(capability: Capability, state: bool) -> Self {
        CapabilityStatus { capability, state }
    }
}

/// The state of every capability (QEMU's `bool capabilities[]`); all off by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities([bool; CAPABILITY_COUNT]);

impl Capabilities {
    /// All capabilities off (QEMU's default).
    pub const fn new() -> Self {
        Capabilities([false; CAPABILITY_COUNT])
    }

    /// Whether `cap` is on.
    pub const fn get(&self, cap: Capability) -> bool {
        self.0[cap.index()]
    }

    /// Turns `cap` on or off.
    pub fn set(&mut self, cap: Capability, on: bool) {
        self.0[cap.index()] = on;
    }

    /// A copy with `cap` set to `on`.
    pub fn with(mut self, cap: Capability, on: bool) -> Self {
        self.set(cap, on);
        self
    }

    /// Every capability with its state, in QEMU's order.
    pub fn iter(&self) -> impl Iterator<Item = (Capability, bool)> + '_ {
        Capability::ALL.into_iter().map(|c| (c, self.get(c)))
    }

    /// The capabilities that are on, in QEMU's order.
    pub fn enabled(&self) -> Vec<Capability> {
        self.iter().filter(|(_, on)| *on).map(|(c, _)| c).collect()
    }

    /// A copy with every change in `changes` applied in order (the last one for a capability wins).
    pub fn with_changes(mut self, changes: &[CapabilityStatus]) -> Self {
        for c in changes {
            self.set(c.capability, c.state);
        }
        self
    }

    /// QEMU's pseudo-capability `migrate_postcopy()`: postcopy-ram or dirty-bitmaps.
    pub const fn postcopy(&self) -> bool {
        self.get(Capability::PostcopyRam) || self.get(Capability::DirtyBitmaps)
    }
}

impl FromIterator<Capability> for Capabilities {
    fn from_iter<I: IntoIterator<Item = Capability>>(iter: I) -> Self {
        let mut caps = Capabilities::new();
        for c in iter {
            caps.set(c, true);
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_order_and_names_match_qemu_8_1() {
        let names: Vec<&str> = Capability::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(
            names,
            [
                "xbzrle",
                "rdma-pin-all",
                "auto-converge",
                "zero-blocks",
                "compress",
                "events",
                "postcopy-ram",
                "x-colo",
                "release-ram",
                "block",
                "return-path",
                "pause-before-switchover",
                "multifd",
                "dirty-bitmaps",
                "postcopy-blocktime",
                "late-block-activate",
                "x-ignore-shared",
                "validate-uuid",
                "background-snapshot",
                "zero-copy-send",
                "postcopy-preempt",
                "switchover-ack",
            ]
        );
        for (i, c) in Capability::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
    }

    #[test]
    fn names_round_trip_through_from_name_and_from_str() {
        for c in Capability::ALL {
            assert_eq!(Capability::from_name(c.name()), Some(c));
            assert_eq!(c.to_string().parse::<Capability>(), Ok(c));
        }
        assert_eq!(Capability::from_name("dirty-limit"), None);
        assert!("XBZRLE".parse::<Capability>().is_err());
    }

    #[test]
    fn every_capability_defaults_off() {
        let caps = Capabilities::default();
        assert!(caps.iter().all(|(_, on)| !on));
        assert!(caps.enabled().is_empty());
        assert_eq!(caps, Capabilities::new());
    }

    #[test]
    fn set_and_get_touch_only_one_capability() {
        let mut caps = Capabilities::new();
        caps.set(Capability::Multifd, true);
        assert!(caps.get(Capability::Multifd));
        assert_eq!(caps.enabled(), vec![Capability::Multifd]);
        caps.set(Capability::Multifd, false);
        assert_eq!(caps, Capabilities::new());
    }

    #[test]
    fn postcopy_pseudo_capability_is_postcopy_ram_or_dirty_bitmaps() {
        assert!(!Capabilities::new().postcopy());
        assert!(Capabilities::new()
            .with(Capability::PostcopyRam, true)
            .postcopy());
        assert!(Capabilities::new()
            .with(Capability::DirtyBitmaps, true)
            .postcopy());
        assert!(!Capabilities::new()
            .with(Capability::PostcopyPreempt, true)
            .postcopy());
    }

    #[test]
    fn serde_uses_qmp_names() {
        assert_eq!(
            serde_json::to_string(&Capability::XIgnoreShared).unwrap(),
            "\"x-ignore-shared\""
        );
        let c: Capability = serde_json::from_str("\"zero-copy-send\"").unwrap();
        assert_eq!(c, Capability::ZeroCopySend);
        assert!(serde_json::from_str::<Capability>("\"nope\"").is_err());
    }

    #[test]
    fn collect_builds_a_set() {
        let caps: Capabilities = [Capability::Events, Capability::Xbzrle]
            .into_iter()
            .collect();
        assert_eq!(caps.enabled(), vec![Capability::Xbzrle, Capability::Events]);
    }
}
