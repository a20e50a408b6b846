//! Helpers for Ferry's end-to-end tests: the `ferry` binary, processes, QMP, skips.
//!
//! Tests here start real `ferry` processes (built by `cargo build --release`,
//! found through `$FERRY_BIN` or next to the test executable), talk to them over
//! QMP, and need `/dev/kvm`. When the host truly lacks a feature a test prints
//! why and returns early ([`skip_unless`]).

pub mod certs;
pub mod leaks;
pub mod netns;
pub mod process;
pub mod proxy;
pub mod watchdog;

pub use netns::{host_pair_or_skip, one_guest_test_at_a_time, HostPair};
pub use process::{Ferry, FerryOptions};
pub use proxy::{Faults, Proxy};

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// The `ferry` binary under test.
pub fn ferry_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_BIN") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-exe> -> target/<profile>/ferry
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    let candidate = profile_dir.join("ferry");
    if candidate.exists() {
        return candidate;
    }
    panic!(
        "the ferry binary was not found at {}: run `cargo build --release --bins` first \
         (scripts/test.sh does) or set FERRY_BIN",
        candidate.display()
    );
}

/// Why the host cannot run KVM tests, if it cannot.
pub fn kvm_missing() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm is not usable: {e}")),
    }
}

/// Why the host cannot create network namespaces, if it cannot.
pub fn netns_missing() -> Option<String> {
    let name = format!("ferry-probe-{}", std::process::id());
    let ok = std::process::Command::new("ip")
        .args(["netns", "add", &name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .output();
        None
    } else {
        Some("cannot create network namespaces (needs root and iproute2)".into())
    }
}

/// Returns true (and prints why) when a test must skip because `missing` names a lack.
pub fn skip_unless(test: &str, missing: Option<String>) -> bool {
    match missing {
        Some(why) => {
            eprintln!("SKIP {test}: {why}");
            true
        }
        None => false,
    }
}

/// A fresh scratch directory under /tmp, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `/tmp/ferry-test-<pid>-<n>-<tag>`.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = PathBuf::from(format!("/tmp/ferry-test-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", p.display()));
        TempDir(p)
    }

    /// The directory.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("FERRY_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A file system mounted on a fresh directory (root only); unmounted (lazily) on drop,
/// before the directory goes.
pub struct Mount(TempDir);

impl Mount {
    /// Mounts a `fstype` with mount `options` (if any) on a fresh directory named after
    /// `tag`, or says why it cannot.
    pub fn new(tag: &str, fstype: &str, options: Option<&str>) -> Result<Mount, String> {
        let dir = TempDir::new(tag);
        let mut cmd = std::process::Command::new("mount");
        cmd.args(["-t", fstype]);
        if let Some(o) = options {
            cmd.args(["-o", o]);
        }
        let out = cmd
            .arg(fstype)
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t {fstype} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Mount(dir))
    }

    /// The mount point.
    pub fn path(&self) -> &std::path::Path {
        self.0.path()
    }

    /// A path inside the mounted file system.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .output();
    }
}

/// Free and total 2 MiB huge pages of the host (/proc/meminfo).
pub fn huge_pages() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| {
                v.trim_start_matches(':')
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    (field("HugePages_Free"), field("HugePages_Total"))
}

/// A free TCP port on 127.0.0.1 (bound then released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}
