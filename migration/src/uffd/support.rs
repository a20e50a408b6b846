//! [`GuestRamSupport`]: the real host probes behind the capability check
//! ([`HostSupport`](crate::options::HostSupport)), for one guest's RAM.

use ram::GuestRam;

use super::postcopy::probe_postcopy;
use super::write_tracking::{probe_write_tracking, RamArea, WriteTrackingSupport};
use crate::options::HostSupport;

/// Answers the capability check's host questions by probing the kernel with this guest's RAM.
#[derive(Debug, Clone)]
pub struct GuestRamSupport {
    areas: Vec<RamArea>,
}

impl GuestRamSupport {
    /// Probes for the RAM of `ram`.
    pub fn new(ram: &GuestRam) -> Self {
        GuestRamSupport {
            areas: RamArea::from_guest_ram(ram),
        }
    }

    /// Probes for explicit areas.
    pub fn from_areas(areas: Vec<RamArea>) -> Self {
        GuestRamSupport { areas }
    }
}

impl HostSupport for GuestRamSupport {
    fn postcopy_supported(&self) -> Result<(), String> {
        probe_postcopy(&self.areas)
    }

    fn write_tracking(&self) -> WriteTrackingSupport {
        probe_write_tracking(&self.areas).support
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::{Capability, CapabilityStatus, MigrationOptions};
    use ram::{Backend, MemoryConfig};

    #[test]
    fn background_snapshot_capability_is_accepted_for_memfd_ram() {
        if let Err(e) = super::super::open::open_fd() {
            eprintln!("skipping: {e}");
            return;
        }
        let ram = GuestRam::new(&MemoryConfig {
            size: 8 << 20,
            backend: Backend::SharedMemfd,
            ..MemoryConfig::default()
        })
        .unwrap();
        let host = GuestRamSupport::new(&ram);
        let options = MigrationOptions::new();
        options
            .set_capabilities(
                &[CapabilityStatus::new(Capability::BackgroundSnapshot, true)],
                &host,
            )
            .unwrap();
        options.set_incoming(true);
        options
            .set_capabilities(
                &[
                    CapabilityStatus::new(Capability::BackgroundSnapshot, false),
                    CapabilityStatus::new(Capability::PostcopyRam, true),
                ],
                &host,
            )
            .unwrap();
        assert!(options.caps().get(Capability::PostcopyRam));
    }

    #[test]
    fn unusable_area_makes_background_snapshot_incompatible() {
        if let Err(e) = super::super::open::open_fd() {
            eprintln!("skipping: {e}");
            return;
        }
        let host = GuestRamSupport::from_areas(vec![RamArea {
            name: "hole".into(),
            host_addr: 0x1000,
            len: 4096,
            kind: ram::BackingKind::AnonymousPrivate,
        }]);
        let options = MigrationOptions::new();
        let err = options
            .set_capabilities(
                &[CapabilityStatus::new(Capability::BackgroundSnapshot, true)],
                &host,
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Background-snapshot is not compatible with guest memory configuration"
        );
    }
}
