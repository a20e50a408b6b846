//! Counting a process's threads and file descriptors, to show a failed migration
//! leaves nothing behind.
//!
//! [`Resources::of`] reads `/proc/PID/task` and `/proc/PID/fd`;
//! [`wait_back_to`] polls until both counts are at most a baseline (threads and
//! sockets take a moment to go), and otherwise reports what is left: the names
//! of the threads and the targets of the descriptors, which usually name the
//! leak (`migration-rp`, `socket:[...]`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// What a process holds at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    /// Thread names and how many threads carry each.
    pub threads: BTreeMap<String, usize>,
    /// Descriptor kinds (`socket`, `anon_inode:[eventfd]`, a file path) and their counts.
    pub fds: BTreeMap<String, usize>,
}

impl Resources {
    /// The threads and descriptors of process `pid` now (empty if it is gone).
    pub fn of(pid: u32) -> Resources {
        let mut threads = BTreeMap::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in dir.flatten() {
                let name = std::fs::read_to_string(t.path().join("comm"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "?".into());
                *threads.entry(name).or_insert(0) += 1;
            }
        }
        let mut fds = BTreeMap::new();
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            for f in dir.flatten() {
                let target = std::fs::read_link(f.path())
                    .map(|p| kind_of(&p.display().to_string()))
                    .unwrap_or_else(|_| "?".into());
                *fds.entry(target).or_insert(0) += 1;
            }
        }
        Resources { threads, fds }
    }

    /// Number of threads.
    pub fn thread_count(&self) -> usize {
        self.threads.values().sum()
    }

    /// Number of open descriptors.
    pub fn fd_count(&self) -> usize {
        self.fds.values().sum()
    }

    /// Whether this holds no more threads and descriptors than `baseline`.
    pub fn within(&self, baseline: &Resources) -> bool {
        self.thread_count() <= baseline.thread_count() && self.fd_count() <= baseline.fd_count()
    }

    /// What this holds beyond `baseline`, per thread name and descriptor kind.
    pub fn excess_over(&self, baseline: &Resources) -> String {
        let diff = |now: &BTreeMap<String, usize>, then: &BTreeMap<String, usize>| {
            now.iter()
                .filter_map(|(k, &n)| {
                    let was = then.get(k).copied().unwrap_or(0);
                    (n > was).then(|| format!("{k} +{}", n - was))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "threads {} -> {} ({}), fds {} -> {} ({})",
            baseline.thread_count(),
            self.thread_count(),
            diff(&self.threads, &baseline.threads),
            baseline.fd_count(),
            self.fd_count(),
            diff(&self.fds, &baseline.fds)
        )
    }
}

/// A descriptor's kind: sockets and pipes without their inode numbers, paths as they are.
fn kind_of(target: &str) -> String {
    match target.split_once(":[") {
        Some((kind, _)) if kind == "socket" || kind == "pipe" => kind.to_string(),
        _ => target.to_string(),
    }
}

/// Waits up to `settle` until `pid` holds no more threads and descriptors than
/// `baseline`; Err describes what is still held beyond it.
pub fn wait_back_to(pid: u32, baseline: &Resources, settle: Duration) -> Result<Resources, String> {
    let deadline = Instant::now() + settle;
    loop {
        let now = Resources::of(pid);
        if now.within(baseline) {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "process {pid} still holds more than before after {settle:?}: {}",
                now.excess_over(baseline)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_a_new_thread_and_descriptor_and_sees_them_go() {
        // Other tests of this binary run at the same time: only the probe's own thread
        // name and file are certain to come and go.
        let pid = std::process::id();
        let before = Resources::of(pid);
        assert!(before.thread_count() >= 1 && before.fd_count() >= 3);
        let path = format!("/proc/{pid}/status");
        let file = std::fs::File::open(&path).expect("open");
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("leak-probe".into())
            .spawn(move || {
                let _ = started_tx.send(());
                let _ = stop_rx.recv();
            })
            .expect("spawn");
        started_rx.recv().expect("the probe thread started");
        let during = Resources::of(pid);
        assert_eq!(during.threads.get("leak-probe"), Some(&1));
        assert_eq!(during.fds.get(&path), Some(&1));
        let excess = during.excess_over(&before);
        assert!(excess.contains("leak-probe +1"), "{excess}");
        assert!(excess.contains(&format!("{path} +1")), "{excess}");
        drop(file);
        drop(stop_tx);
        let _ = t.join();
        let after = Resources::of(pid);
        assert_eq!(after.threads.get("leak-probe"), None);
        assert_eq!(after.fds.get(&path), None);
    }

    #[test]
    fn socket_descriptors_are_counted_by_kind() {
        assert_eq!(kind_of("socket:[12345]"), "socket");
        assert_eq!(kind_of("pipe:[9]"), "pipe");
        assert_eq!(kind_of("anon_inode:[eventfd]"), "anon_inode:[eventfd]");
        assert_eq!(kind_of("/dev/kvm"), "/dev/kvm");
    }
}
