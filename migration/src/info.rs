//! query-migrate's reply, the live counters behind it, and the MIGRATION events,
//! with QEMU's QMP names.
//!
//! Which members appear follows QEMU 8.1's `fill_source_migration_info` and
//! `fill_destination_migration_info` (`migration/migration.c`):
//!
//! | source status | members |
//! |---|---|
//! | `none` | none (only `blocked-reasons`, and what the destination side reports) |
//! | `setup` | `status` |
//! | `active`, `cancelling`, `pre-switchover`, `device` | `status`, `ram`, `total-time`, `expected-downtime`, `setup-time` |
//! | `postcopy-active`, `postcopy-paused`, `postcopy-recover` | as `active` but `downtime` instead of `expected-downtime` |
//! | `completed` | `status`, `ram` (with `remaining` and `dirty-pages-rate` 0), `total-time`, `downtime`, `setup-time` |
//! | `failed`, `cancelled`, `colo`, `wait-unplug` | `status` |
//!
//! Wherever `ram` appears, `xbzrle-cache` appears too when XBZRLE is on, `compression`
//! when `compress` is on, and `cpu-throttle-percentage` while vCPUs are throttled.
//! `error-desc` appears whenever an error was recorded, `blocked-reasons`
//! whenever something blocks migration. Members are serialised in QAPI's order. QEMU members for
//! features Ferry does not have (`disk`, `vfio`, dirty-limit
//! times) are not modelled.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// A migration's state, with QEMU's `MigrationStatus` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration has happened.
    #[default]
    None,
    /// Connecting and setting up.
    Setup,
    /// Cancel requested, not yet finished.
    Cancelling,
    /// Cancelled by the user.
    Cancelled,
    /// Precopy in progress.
    Active,
    /// Postcopy in progress.
    PostcopyActive,
    /// Postcopy stopped by a network failure, waiting for recovery.
    PostcopyPaused,
    /// Postcopy recovering after a pause.
    PostcopyRecover,
    /// Finished successfully.
    Completed,
    /// Finished with an error.
    Failed,
    /// In COLO fault-tolerance mode.
    Colo,
    /// Paused before switchover (`pause-before-switchover`).
    PreSwitchover,
    /// Saving device state during switchover.
    Device,
    /// Waiting for a failover device to be unplugged.
    WaitUnplug,
}

impl MigrationStatus {
    /// Every status, in QAPI's order.
    pub const ALL: [Self; 14] = [
        Self::None,
        Self::Setup,
        Self::Cancelling,
        Self::Cancelled,
        Self::Active,
        Self::PostcopyActive,
        Self::PostcopyPaused,
        Self::PostcopyRecover,
        Self::Completed,
        Self::Failed,
        Self::Colo,
        Self::PreSwitchover,
        Self::Device,
        Self::WaitUnplug,
    ];

    /// The QMP name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Active => "active",
            Self::PostcopyActive => "postcopy-active",
            Self::PostcopyPaused => "postcopy-paused",
            Self::PostcopyRecover => "postcopy-recover",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Colo => "colo",
            Self::PreSwitchover => "pre-switchover",
            Self::Device => "device",
            Self::WaitUnplug => "wait-unplug",
        }
    }

    /// Whether a migration is in progress: a new one cannot start and
    /// capabilities cannot change (QEMU 8.1's `migration_is_running`; `colo` is not).
    pub fn is_running(self) -> bool {
        matches!(
            self,
            Self::Active
                | Self::PostcopyActive
                | Self::PostcopyPaused
                | Self::PostcopyRecover
                | Self::Setup
                | Self::PreSwitchover
                | Self::Device
                | Self::WaitUnplug
                | Self::Cancelling
        )
    }

    /// Whether pages are being sent (QEMU's `migration_is_active`).
    pub fn is_active(self) -> bool {
        matches!(self, Self::Active | Self::PostcopyActive)
    }

    /// Whether the migration is in postcopy (QEMU's `migration_in_postcopy`).
    pub fn in_postcopy(self) -> bool {
        matches!(
            self,
            Self::PostcopyActive | Self::PostcopyPaused | Self::PostcopyRecover
        )
    }

    /// Whether the migration ended without success (QEMU's `migration_has_failed`).
    pub fn has_failed(self) -> bool {
        matches!(self, Self::Cancelled | Self::Failed)
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a `MigrationStatus`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a migration status")]
pub struct UnknownStatus(pub String);

impl FromStr for MigrationStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// query-migrate's `ram` member (QAPI `MigrationStats`; every member is mandatory).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStats {
    /// Bytes sent by every channel.
    pub transferred: u64,
    /// Bytes still dirty (0 once completed).
    pub remaining: u64,
    /// Guest RAM size in bytes.
    pub total: u64,
    /// Zero pages sent as a flag only.
    pub duplicate: u64,
    /// Always 0 (deprecated in QEMU).
    pub skipped: u64,
    /// Pages sent with their contents.
    pub normal: u64,
    /// `normal * page-size`.
    pub normal_bytes: u64,
    /// Pages dirtied per second (0 once completed).
    pub dirty_pages_rate: u64,
    /// Throughput in Mbit/s.
    pub mbps: f64,
    /// Dirty-log syncs so far.
    pub dirty_sync_count: u64,
    /// Postcopy page requests served.
    pub postcopy_requests: u64,
    /// Guest page size in bytes.
    pub page_size: u64,
    /// Bytes sent by multifd channels.
    pub multifd_bytes: u64,
    /// Pages sent per second.
    pub pages_per_second: u64,
    /// Bytes sent while the guest ran (precopy).
    pub precopy_bytes: u64,
    /// Bytes sent while the guest was stopped.
    pub downtime_bytes: u64,
    /// Bytes sent during postcopy.
    pub postcopy_bytes: u64,
    /// Syncs in which zero-copy sending fell back to copying.
    pub dirty_sync_missed_zero_copy: u64,
}

/// query-migrate's `xbzrle-cache` member (QAPI `XBZRLECacheStats`), kept by the XBZRLE encoder.
pub use crate::xbzrle::XbzrleCacheStats;

/// query-migrate's `compression` member (QAPI `CompressionStats`), when `compress` is on.
pub use crate::compress::CompressionStats;

/// A socket address as QAPI's `SocketAddress` union serialises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SocketAddress {
    /// TCP.
    Inet {
        /// Host name or address.
        host: String,
        /// Port, as a string (QAPI's type).
        port: String,
    },
    /// Unix domain socket.
    Unix {
        /// Socket path.
        path: String,
    },
    /// vsock.
    Vsock {
        /// Context id, as a string.
        cid: String,
        /// Port, as a string.
        port: String,
    },
    /// A file descriptor passed by name or number.
    Fd {
        /// The descriptor's name or number.
        str: String,
    },
}

/// query-migrate's reply (QAPI `MigrationInfo`); absent members are omitted.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// The state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<MigrationStatus>,
    /// RAM statistics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ram: Option<MigrationStats>,
    /// XBZRLE statistics, when XBZRLE is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache: Option<XbzrleCacheStats>,
    /// Milliseconds since the start (the final total once completed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_time: Option<u64>,
    /// Expected downtime in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_downtime: Option<u64>,
    /// Measured downtime in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    /// Setup time in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_time: Option<u64>,
    /// vCPU throttle in percent, while throttling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_percentage: Option<u8>,
    /// What went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
    /// Why migration is blocked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_reasons: Option<Vec<String>>,
    /// Total postcopy blocktime in milliseconds (destination).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy_blocktime: Option<u32>,
    /// Postcopy blocktime per vCPU in milliseconds (destination).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy_vcpu_blocktime: Option<Vec<u32>>,
    /// Legacy compression statistics, when `compress` is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionStats>,
    /// Addresses the destination listens on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_address: Option<Vec<SocketAddress>>,
}

/// What the outgoing side knows, for [`MigrationInfo::query`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceState {
    /// Outgoing migration state.
    pub status: MigrationStatus,
    /// Setup time in milliseconds.
    pub setup_time_ms: u64,
    /// Milliseconds since the start while running; the final total once completed.
    pub total_time_ms: u64,
    /// Expected downtime in milliseconds.
    pub expected_downtime_ms: u64,
    /// Measured downtime in milliseconds.
    pub downtime_ms: u64,
    /// RAM statistics (see [`MigrationCounters::ram_stats`]).
    pub ram: MigrationStats,
    /// XBZRLE statistics when XBZRLE is on.
    pub xbzrle_cache: Option<XbzrleCacheStats>,
    /// Legacy compression statistics when `compress` is on.
    pub compression: Option<CompressionStats>,
    /// vCPU throttle in percent, `0` when not throttling.
    pub cpu_throttle_percentage: u8,
    /// The recorded error, if any.
    pub error_desc: Option<String>,
    /// Why migration is blocked; empty when it is not.
    pub blocked_reasons: Vec<String>,
}

/// What the incoming side knows, for [`MigrationInfo::query`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DestinationState {
    /// Incoming migration state.
    pub status: MigrationStatus,
    /// Addresses listened on; empty when none.
    pub socket_address: Vec<SocketAddress>,
    /// Total postcopy blocktime in milliseconds, when measured.
    pub postcopy_blocktime: Option<u32>,
    /// Postcopy blocktime per vCPU, when measured.
    pub postcopy_vcpu_blocktime: Option<Vec<u32>>,
    /// The recorded error, if any.
    pub error_desc: Option<String>,
}

impl MigrationInfo {
    /// The reply of query-migrate on the source (QEMU's `fill_source_migration_info`).
    pub fn source(src: &SourceState) -> Self {
        Self::query(src, None)
    }

    /// The reply of query-migrate: destination first, then source (QEMU's `qmp_query_migrate`).
    pub fn query(src: &SourceState, dest: Option<&DestinationState>) -> Self {
        let mut info = Self::default();
        if let Some(dest) = dest {
            info.fill_destination(dest);
        }
        info.fill_source(src);
        info
    }

    fn fill_destination(&mut self, dest: &DestinationState) {
        use MigrationStatus as S;
        if !dest.socket_address.is_empty() {
            self.socket_address = Some(dest.socket_address.clone());
        }
        match dest.status {
            S::Setup
            | S::Cancelling
            | S::Cancelled
            | S::Active
            | S::PostcopyActive
            | S::PostcopyPaused
            | S::PostcopyRecover
            | S::Failed
            | S::Colo => {}
            S::Completed => {
                self.postcopy_blocktime = dest.postcopy_blocktime;
                self.postcopy_vcpu_blocktime = dest.postcopy_vcpu_blocktime.clone();
            }
            S::None | S::PreSwitchover | S::Device | S::WaitUnplug => return,
        }
        self.status = Some(dest.status);
        if self.error_desc.is_none() {
            self.error_desc = dest.error_desc.clone();
        }
    }

    fn fill_source(&mut self, src: &SourceState) {
        use MigrationStatus as S;
        if !src.blocked_reasons.is_empty() {
            self.blocked_reasons = Some(src.blocked_reasons.clone());
        }
        match src.status {
            // No outgoing migration ever: leave the destination's view alone.
            S::None => return,
            S::Setup => self.total_time = None,
            S::Active
            | S::Cancelling
            | S::PostcopyActive
            | S::PreSwitchover
            | S::Device
            | S::PostcopyPaused
            | S::PostcopyRecover
            | S::Completed => {
                self.fill_times(src);
                self.fill_ram(src);
            }
            S::Colo | S::Failed | S::Cancelled | S::WaitUnplug => {}
        }
        self.status = Some(src.status);
        if let Some(error) = &src.error_desc {
            self.error_desc = Some(error.clone());
        }
    }

    fn fill_times(&mut self, src: &SourceState) {
        self.setup_time = Some(src.setup_time_ms);
        self.total_time = Some(src.total_time_ms);
        if src.status == MigrationStatus::Completed || src.status.in_postcopy() {
            self.downtime = Some(src.downtime_ms);
        } else {
            self.expected_downtime = Some(src.expected_downtime_ms);
        }
    }

    fn fill_ram(&mut self, src: &SourceState) {
        let mut ram = src.ram.clone();
        ram.skipped = 0;
        if src.status == MigrationStatus::Completed {
            ram.remaining = 0;
            ram.dirty_pages_rate = 0;
        }
        self.ram = Some(ram);
        self.xbzrle_cache = src.xbzrle_cache;
        self.compression = src.compression;
        if src.cpu_throttle_percentage != 0 {
            self.cpu_throttle_percentage = Some(src.cpu_throttle_percentage);
        }
    }
}

/// The `MIGRATION` event's data: emitted on every status change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MigrationEvent {
    /// The new status.
    pub status: MigrationStatus,
}

impl MigrationEvent {
    /// The QMP event name.
    pub const NAME: &'static str = "MIGRATION";
}

/// The `MIGRATION_PASS` event's data: emitted after each dirty-log sync
/// when the `events` capability is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MigrationPassEvent {
    /// The dirty-sync count after the sync.
    pub pass: u64,
}

impl MigrationPassEvent {
    /// The QMP event name.
    pub const NAME: &'static str = "MIGRATION_PASS";
}

/// A channel of one migration: the main stream or a multifd channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// The main migration stream.
    Main,
    /// Multifd channel `n` (0-based).
    Multifd(usize),
}

/// When bytes were sent, for the precopy/downtime/postcopy split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The guest was running.
    Precopy,
    /// The guest was stopped for the switchover.
    Downtime,
    /// After the switchover, in postcopy.
    Postcopy,
}

/// Figures the counters do not hold, for [`MigrationCounters::ram_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RamTotals {
    /// Guest RAM size in bytes.
    pub total_bytes: u64,
    /// Bytes still dirty.
    pub remaining_bytes: u64,
    /// Guest page size in bytes.
    pub page_size: u64,
    /// Throughput in Mbit/s.
    pub mbps: f64,
    /// Pages per second.
    pub pages_per_second: u64,
}

/// The live counters of one migration, updated concurrently by the
/// migration thread and the multifd channel threads (QEMU's `mig_stats`).
#[derive(Debug, Default)]
pub struct MigrationCounters {
    main_bytes: AtomicU64,
    multifd_bytes: Box<[AtomicU64]>,
    precopy_bytes: AtomicU64,
    downtime_bytes: AtomicU64,
    postcopy_bytes: AtomicU64,
    normal_pages: AtomicU64,
    zero_pages: AtomicU64,
    dirty_sync_count: AtomicU64,
    dirty_pages_rate: AtomicU64,
    dirty_bytes_last_sync: AtomicU64,
    postcopy_requests: AtomicU64,
    dirty_sync_missed_zero_copy: AtomicU64,
}

impl MigrationCounters {
    /// Zeroed counters for a migration with `multifd_channels` multifd channels.
    pub fn new(multifd_channels: usize) -> Self {
        Self {
            multifd_bytes: (0..multifd_channels).map(|_| AtomicU64::new(0)).collect(),
            ..Self::default()
        }
    }

    /// Number of multifd channels counted separately.
    pub fn multifd_channels(&self) -> usize {
        self.multifd_bytes.len()
    }

    /// Records `bytes` sent on `channel` during `phase`.
    ///
    /// A multifd channel number beyond those given to [`new`](Self::new) is
    /// counted on the main stream, so totals stay right.
    pub fn add_sent(&self, channel: Channel, phase: Phase, bytes: u64) {
        let counter = match channel {
            Channel::Main => &self.main_bytes,
            Channel::Multifd(n) => self.multifd_bytes.get(n).unwrap_or(&self.main_bytes),
        };
        counter.fetch_add(bytes, Ordering::Relaxed);
        let phase_counter = match phase {
            Phase::Precopy => &self.precopy_bytes,
            Phase::Downtime => &self.downtime_bytes,
            Phase::Postcopy => &self.postcopy_bytes,
        };
        phase_counter.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Records pages sent with their contents.
    pub fn add_normal_pages(&self, pages: u64) {
        self.normal_pages.fetch_add(pages, Ordering::Relaxed);
    }

    /// Records zero pages sent as a flag only.
    pub fn add_zero_pages(&self, pages: u64) {
        self.zero_pages.fetch_add(pages, Ordering::Relaxed);
    }

    /// Counts a dirty-log sync; returns the new count (the `MIGRATION_PASS` number).
    pub fn inc_dirty_sync_count(&self) -> u64 {
        self.dirty_sync_count.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Stores the dirty-pages rate of the last closed period.
    pub fn set_dirty_pages_rate(&self, pages_per_sec: u64) {
        self.dirty_pages_rate
            .store(pages_per_sec, Ordering::Relaxed);
    }

    /// Stores the dirty bytes found pending at the last sync.
    pub fn set_dirty_bytes_last_sync(&self, bytes: u64) {
        self.dirty_bytes_last_sync.store(bytes, Ordering::Relaxed);
    }

    /// Records served postcopy page requests.
    pub fn add_postcopy_requests(&self, requests: u64) {
        self.postcopy_requests
            .fetch_add(requests, Ordering::Relaxed);
    }

    /// Counts a sync in which zero-copy sending fell back to copying.
    pub fn inc_dirty_sync_missed_zero_copy(&self) {
        self.dirty_sync_missed_zero_copy
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes sent by every channel (QEMU's `migration_transferred_bytes`).
    pub fn transferred(&self) -> u64 {
        self.main_bytes().saturating_add(self.multifd_bytes())
    }

    /// Bytes sent on the main stream.
    pub fn main_bytes(&self) -> u64 {
        self.main_bytes.load(Ordering::Relaxed)
    }

    /// Bytes sent by all multifd channels.
    pub fn multifd_bytes(&self) -> u64 {
        self.multifd_bytes
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .fold(0, u64::saturating_add)
    }

    /// Bytes sent on one channel (0 for an unknown multifd channel).
    pub fn channel_bytes(&self, channel: Channel) -> u64 {
        match channel {
            Channel::Main => self.main_bytes(),
            Channel::Multifd(n) => self
                .multifd_bytes
                .get(n)
                .map_or(0, |c| c.load(Ordering::Relaxed)),
        }
    }

    /// Bytes sent during `phase`.
    pub fn phase_bytes(&self, phase: Phase) -> u64 {
        match phase {
            Phase::Precopy => &self.precopy_bytes,
            Phase::Downtime => &self.downtime_bytes,
            Phase::Postcopy => &self.postcopy_bytes,
        }
        .load(Ordering::Relaxed)
    }

    /// Pages sent with their contents.
    pub fn normal_pages(&self) -> u64 {
        self.normal_pages.load(Ordering::Relaxed)
    }

    /// Zero pages sent.
    pub fn zero_pages(&self) -> u64 {
        self.zero_pages.load(Ordering::Relaxed)
    }

    /// Normal plus zero pages (add XBZRLE pages for QEMU's total).
    pub fn total_pages(&self) -> u64 {
        self.normal_pages().saturating_add(self.zero_pages())
    }

    /// Dirty-log syncs so far.
    pub fn dirty_sync_count(&self) -> u64 {
        self.dirty_sync_count.load(Ordering::Relaxed)
    }

    /// Dirty-pages rate of the last closed period.
    pub fn dirty_pages_rate(&self) -> u64 {
        self.dirty_pages_rate.load(Ordering::Relaxed)
    }

    /// Dirty bytes found pending at the last sync.
    pub fn dirty_bytes_last_sync(&self) -> u64 {
        self.dirty_bytes_last_sync.load(Ordering::Relaxed)
    }

    /// The `ram` member of query-migrate (QEMU's `populate_ram_info`).
    pub fn ram_stats(&self, totals: &RamTotals) -> MigrationStats {
        let normal = self.normal_pages();
        MigrationStats {
            transferred: self.transferred(),
            remaining: totals.remaining_bytes,
            total: totals.total_bytes,
            duplicate: self.zero_pages(),
            skipped: 0,
            normal,
            normal_bytes: normal.saturating_mul(totals.page_size),
            dirty_pages_rate: self.dirty_pages_rate(),
            mbps: totals.mbps,
            dirty_sync_count: self.dirty_sync_count(),
            postcopy_requests: self.postcopy_requests.load(Ordering::Relaxed),
            page_size: totals.page_size,
            multifd_bytes: self.multifd_bytes(),
            pages_per_second: totals.pages_per_second,
            precopy_bytes: self.phase_bytes(Phase::Precopy),
            downtime_bytes: self.phase_bytes(Phase::Downtime),
            postcopy_bytes: self.phase_bytes(Phase::Postcopy),
            dirty_sync_missed_zero_copy: self.dirty_sync_missed_zero_copy.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::sync::Arc;
    use std::thread;

    const RAM_MEMBERS: [&str; 18] = [
        "transferred",
        "remaining",
        "total",
        "duplicate",
        "skipped",
        "normal",
        "normal-bytes",
        "dirty-pages-rate",
        "mbps",
        "dirty-sync-count",
        "postcopy-requests",
        "page-size",
        "multifd-bytes",
        "pages-per-second",
        "precopy-bytes",
        "downtime-bytes",
        "postcopy-bytes",
        "dirty-sync-missed-zero-copy",
    ];

    fn to_json(info: &MigrationInfo) -> Value {
        serde_json::to_value(info).unwrap()
    }

    fn keys(v: &Value) -> Vec<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    /// Member names in serialisation order (serde_json's map is sorted, so parse the text).
    fn ordered_keys(info: &MigrationInfo) -> Vec<String> {
        let text = serde_json::to_string(info).unwrap();
        // Top-level keys in text order: `"name":` at depth 1 (no escaped quotes here).
        let mut out = Vec::new();
        let mut depth = 0;
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'{' | b'[' => depth += 1,
                b'}' | b']' => depth -= 1,
                b'"' => {
                    let end = i + 1 + text[i + 1..].find('"').unwrap();
                    if depth == 1 && bytes.get(end + 1) == Some(&b':') {
                        out.push(text[i + 1..end].to_owned());
                    }
                    i = end;
                }
                _ => {}
            }
            i += 1;
        }
        out
    }

    fn running(status: MigrationStatus) -> SourceState {
        SourceState {
            status,
            setup_time_ms: 12,
            total_time_ms: 3456,
            expected_downtime_ms: 300,
            downtime_ms: 45,
            ram: MigrationStats {
                transferred: 1000,
                remaining: 2000,
                total: 1 << 30,
                dirty_pages_rate: 77,
                page_size: 4096,
                ..MigrationStats::default()
            },
            ..SourceState::default()
        }
    }

    #[test]
    fn status_names_are_qemus() {
        let names: Vec<&str> = MigrationStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "none",
                "setup",
                "cancelling",
                "cancelled",
                "active",
                "postcopy-active",
                "postcopy-paused",
                "postcopy-recover",
                "completed",
                "failed",
                "colo",
                "pre-switchover",
                "device",
                "wait-unplug"
            ]
        );
        for status in MigrationStatus::ALL {
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                json!(status.as_str())
            );
            let back: MigrationStatus = serde_json::from_value(json!(status.as_str())).unwrap();
            assert_eq!(back, status);
            assert_eq!(status.as_str().parse::<MigrationStatus>(), Ok(status));
            assert_eq!(status.to_string(), status.as_str());
        }
        assert_eq!(
            "postcopy_active".parse::<MigrationStatus>(),
            Err(UnknownStatus("postcopy_active".into()))
        );
    }

    #[test]
    fn is_running_matches_qemu_8_1() {
        use MigrationStatus as S;
        let running: Vec<_> = S::ALL.into_iter().filter(|s| s.is_running()).collect();
        assert_eq!(
            running,
            [
                S::Setup,
                S::Cancelling,
                S::Active,
                S::PostcopyActive,
                S::PostcopyPaused,
                S::PostcopyRecover,
                S::PreSwitchover,
                S::Device,
                S::WaitUnplug
            ]
        );
        assert!(S::Active.is_active() && S::PostcopyActive.is_active() && !S::Device.is_active());
        assert!(S::PostcopyPaused.in_postcopy() && !S::Active.in_postcopy());
        assert!(S::Failed.has_failed() && S::Cancelled.has_failed() && !S::Completed.has_failed());
    }

    #[test]
    fn never_migrated_replies_empty_object() {
        let info = MigrationInfo::source(&SourceState::default());
        assert_eq!(to_json(&info), json!({}));
        let blocked = SourceState {
            blocked_reasons: vec!["device 'x' is not migratable".into()],
            ..SourceState::default()
        };
        assert_eq!(
            to_json(&MigrationInfo::source(&blocked)),
            json!({"blocked-reasons": ["device 'x' is not migratable"]})
        );
    }

    #[test]
    fn setup_shows_only_status() {
        let info = MigrationInfo::source(&running(MigrationStatus::Setup));
        assert_eq!(to_json(&info), json!({"status": "setup"}));
    }

    #[test]
    fn active_states_show_times_and_ram_in_qapi_order() {
        use MigrationStatus as S;
        for status in [S::Active, S::Cancelling, S::PreSwitchover, S::Device] {
            let info = MigrationInfo::source(&running(status));
            assert_eq!(
                ordered_keys(&info),
                [
                    "status",
                    "ram",
                    "total-time",
                    "expected-downtime",
                    "setup-time"
                ],
                "{status}"
            );
            let v = to_json(&info);
            assert_eq!(v["status"], json!(status.as_str()));
            assert_eq!(v["total-time"], json!(3456));
            assert_eq!(v["expected-downtime"], json!(300));
            assert_eq!(v["setup-time"], json!(12));
            assert_eq!(v["ram"]["remaining"], json!(2000));
            assert_eq!(v["ram"]["dirty-pages-rate"], json!(77));
        }
        let ram_text = serde_json::to_string(&MigrationStats::default()).unwrap();
        let positions: Vec<usize> = RAM_MEMBERS
            .iter()
            .map(|m| ram_text.find(&format!("\"{m}\":")).unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{ram_text}");
        let ram = to_json(&MigrationInfo::source(&running(S::Active)))["ram"].clone();
        assert_eq!(keys(&ram).len(), RAM_MEMBERS.len());
    }

    #[test]
    fn xbzrle_and_throttle_appear_with_ram_only_when_in_use() {
        let mut src = running(MigrationStatus::Active);
        src.xbzrle_cache = Some(XbzrleCacheStats {
            cache_size: 64 << 20,
            pages: 5,
            ..XbzrleCacheStats::default()
        });
        src.cpu_throttle_percentage = 30;
        let info = MigrationInfo::source(&src);
        assert_eq!(
            ordered_keys(&info),
            [
                "status",
                "ram",
                "xbzrle-cache",
                "total-time",
                "expected-downtime",
                "setup-time",
                "cpu-throttle-percentage"
            ]
        );
        let v = to_json(&info);
        assert_eq!(
            v["xbzrle-cache"],
            json!({"cache-size": 64 << 20, "bytes": 0, "pages": 5, "cache-miss": 0,
                   "cache-miss-rate": 0.0, "encoding-rate": 0.0, "overflow": 0})
        );
        assert_eq!(v["cpu-throttle-percentage"], json!(30));
        // Not shown where ram is not shown.
        src.status = MigrationStatus::Setup;
        assert_eq!(
            to_json(&MigrationInfo::source(&src)),
            json!({"status": "setup"})
        );
    }

    #[test]
    fn postcopy_shows_downtime_instead_of_expected() {
        use MigrationStatus as S;
        for status in [S::PostcopyActive, S::PostcopyPaused, S::PostcopyRecover] {
            let v = to_json(&MigrationInfo::source(&running(status)));
            assert_eq!(v["downtime"], json!(45), "{status}");
            assert!(v.get("expected-downtime").is_none(), "{status}");
        }
    }

    #[test]
    fn completed_shows_downtime_and_zeroes_remaining_and_dirty_rate() {
        let info = MigrationInfo::source(&running(MigrationStatus::Completed));
        assert_eq!(
            ordered_keys(&info),
            ["status", "ram", "total-time", "downtime", "setup-time"]
        );
        let v = to_json(&info);
        assert_eq!(v["status"], json!("completed"));
        assert_eq!(v["downtime"], json!(45));
        assert_eq!(v["ram"]["remaining"], json!(0));
        assert_eq!(v["ram"]["dirty-pages-rate"], json!(0));
        assert_eq!(v["ram"]["transferred"], json!(1000));
    }

    #[test]
    fn ended_states_show_status_and_error_only() {
        use MigrationStatus as S;
        let mut src = running(S::Failed);
        src.error_desc = Some("Unable to write to socket: Broken pipe".into());
        assert_eq!(
            to_json(&MigrationInfo::source(&src)),
            json!({"status": "failed", "error-desc": "Unable to write to socket: Broken pipe"})
        );
        for status in [S::Cancelled, S::Colo, S::WaitUnplug] {
            let v = to_json(&MigrationInfo::source(&running(status)));
            assert_eq!(v, json!({"status": status.as_str()}));
        }
    }

    #[test]
    fn destination_view_shows_status_and_listen_address() {
        let dest = DestinationState {
            status: MigrationStatus::Active,
            socket_address: vec![SocketAddress::Inet {
                host: "198.18.0.2".into(),
                port: "4444".into(),
            }],
            ..DestinationState::default()
        };
        let info = MigrationInfo::query(&SourceState::default(), Some(&dest));
        assert_eq!(
            to_json(&info),
            json!({"status": "active",
                   "socket-address": [{"type": "inet", "host": "198.18.0.2", "port": "4444"}]})
        );
        let done = DestinationState {
            status: MigrationStatus::Completed,
            socket_address: vec![SocketAddress::Unix {
                path: "/tmp/m.sock".into(),
            }],
            postcopy_blocktime: Some(7),
            postcopy_vcpu_blocktime: Some(vec![3, 4]),
            error_desc: None,
        };
        let v = to_json(&MigrationInfo::query(&SourceState::default(), Some(&done)));
        assert_eq!(v["postcopy-blocktime"], json!(7));
        assert_eq!(v["postcopy-vcpu-blocktime"], json!([3, 4]));
        assert_eq!(
            v["socket-address"],
            json!([{"type": "unix", "path": "/tmp/m.sock"}])
        );
        // Blocktime only once completed.
        let active = DestinationState {
            status: MigrationStatus::Active,
            ..done
        };
        let v = to_json(&MigrationInfo::query(
            &SourceState::default(),
            Some(&active),
        ));
        assert!(v.get("postcopy-blocktime").is_none());
    }

    #[test]
    fn source_status_overrides_destination_status() {
        let dest = DestinationState {
            status: MigrationStatus::Failed,
            ..DestinationState::default()
        };
        let v = to_json(&MigrationInfo::query(
            &running(MigrationStatus::Active),
            Some(&dest),
        ));
        assert_eq!(v["status"], json!("active"));
    }

    #[test]
    fn events_carry_qemu_names_and_data() {
        assert_eq!(MigrationEvent::NAME, "MIGRATION");
        assert_eq!(
            serde_json::to_value(MigrationEvent {
                status: MigrationStatus::PostcopyActive
            })
            .unwrap(),
            json!({"status": "postcopy-active"})
        );
        assert_eq!(MigrationPassEvent::NAME, "MIGRATION_PASS");
        assert_eq!(
            serde_json::to_value(MigrationPassEvent { pass: 3 }).unwrap(),
            json!({"pass": 3})
        );
    }

    #[test]
    fn counters_sum_channels_and_phases_across_threads() {
        let counters = Arc::new(MigrationCounters::new(3));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let c = Arc::clone(&counters);
                thread::spawn(move || {
                    let channel = if t == 3 {
                        Channel::Main
                    } else {
                        Channel::Multifd(t)
                    };
                    for _ in 0..10_000 {
                        c.add_sent(channel, Phase::Precopy, 10);
                        c.add_normal_pages(1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        counters.add_sent(Channel::Main, Phase::Downtime, 5);
        counters.add_sent(Channel::Multifd(9), Phase::Postcopy, 7);
        assert_eq!(counters.channel_bytes(Channel::Multifd(0)), 100_000);
        assert_eq!(counters.channel_bytes(Channel::Multifd(9)), 0);
        assert_eq!(
            counters.main_bytes(),
            100_012,
            "unknown channel counted on main"
        );
        assert_eq!(counters.multifd_bytes(), 300_000);
        assert_eq!(counters.transferred(), 400_012);
        assert_eq!(counters.phase_bytes(Phase::Precopy), 400_000);
        assert_eq!(counters.phase_bytes(Phase::Downtime), 5);
        assert_eq!(counters.phase_bytes(Phase::Postcopy), 7);
        assert_eq!(counters.normal_pages(), 40_000);
    }

    #[test]
    fn counters_fill_the_ram_member() {
        let c = MigrationCounters::new(2);
        c.add_sent(Channel::Main, Phase::Precopy, 1000);
        c.add_sent(Channel::Multifd(1), Phase::Precopy, 8192);
        c.add_normal_pages(2);
        c.add_zero_pages(30);
        assert_eq!(c.inc_dirty_sync_count(), 1);
        assert_eq!(c.inc_dirty_sync_count(), 2);
        c.set_dirty_pages_rate(123);
        c.set_dirty_bytes_last_sync(4096);
        c.add_postcopy_requests(4);
        c.inc_dirty_sync_missed_zero_copy();
        assert_eq!(c.total_pages(), 32);
        assert_eq!(c.dirty_bytes_last_sync(), 4096);
        let ram = c.ram_stats(&RamTotals {
            total_bytes: 1 << 30,
            remaining_bytes: 4096,
            page_size: 4096,
            mbps: 1.5,
            pages_per_second: 10,
        });
        assert_eq!(
            serde_json::to_value(&ram).unwrap(),
            json!({
                "transferred": 9192, "remaining": 4096, "total": 1u64 << 30,
                "duplicate": 30, "skipped": 0, "normal": 2, "normal-bytes": 8192,
                "dirty-pages-rate": 123, "mbps": 1.5, "dirty-sync-count": 2,
                "postcopy-requests": 4, "page-size": 4096, "multifd-bytes": 8192,
                "pages-per-second": 10, "precopy-bytes": 9192, "downtime-bytes": 0,
                "postcopy-bytes": 0, "dirty-sync-missed-zero-copy": 1
            })
        );
    }
}
