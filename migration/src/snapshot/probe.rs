//! A functional probe: does a write to a page that was *never populated* really fault after
//! write-protecting it? (Anonymous memory needs `WP_UNPOPULATED`; shmem needs pte markers,
//! which come with `WP_HUGETLBFS_SHMEM`.) `ferry probe` prints the answer per backend.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ram::{GuestRam, MemoryConfig, PAGE_SIZE};
use serde::Serialize;
use userfaultfd::{Event, FaultKind};

use super::protect::{UnpopulatedStrategy, WriteProtector};

/// What the probe found for one backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct UnpopulatedWpReport {
    /// How the snapshot would protect unpopulated pages.
    pub strategy: Option<UnpopulatedStrategy>,
    /// Whether a write to a protected, never-populated page faulted and resumed.
    pub works: bool,
    /// Why not, when it does not.
    pub reason: Option<String>,
}

/// Write-protects a small fresh region made like `config` (2 MiB of it) and checks that a
/// write to a page never touched before is trapped, then completes once unprotected.
pub fn probe_unpopulated_wp(config: &MemoryConfig) -> UnpopulatedWpReport {
    let fail = |strategy, reason: String| UnpopulatedWpReport {
        strategy,
        works: false,
        reason: Some(reason),
    };
    let ram = match GuestRam::new(&MemoryConfig {
        size: 2 << 20,
        prealloc: false,
        ..config.clone()
    }) {
        Ok(r) => Arc::new(r),
        Err(e) => return fail(None, e.to_string()),
    };
    let protector = match WriteProtector::new(&ram) {
        Ok(p) => p,
        Err(e) => return fail(None, e.to_string()),
    };
    let strategy = Some(protector.strategy());
    protector.populate_if_needed();
    if let Err(e) = protector.protect_all() {
        return fail(strategy, e.to_string());
    }
    // Page 5 was never written (nor read, unless populated by reading above).
    let target = 5u64;
    let done = Arc::new(AtomicBool::new(false));
    let (r, d) = (ram.clone(), done.clone());
    let writer = std::thread::spawn(move || {
        let ok = r.write_page(target, &[0x5a; PAGE_SIZE]).is_ok();
        d.store(true, Ordering::Release);
        ok
    });
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut trapped = false;
    while Instant::now() < deadline && !trapped {
        if done.load(Ordering::Acquire) {
            break;
        }
        match protector.uffd().read_event() {
            Ok(Some(Event::Pagefault {
                kind: FaultKind::WriteProtected,
                addr,
                ..
            })) if protector.page_at(addr as usize) == Some(target) => trapped = true,
            Ok(_) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => {
                drop(protector); // unprotects: the writer completes
                let _ = writer.join();
                return fail(strategy, format!("reading the fault: {e}"));
            }
        }
    }
    let written_while_protected = done.load(Ordering::Acquire);
    let unprotected = protector.unprotect(target, 1);
    drop(protector);
    let completed = writer.join().unwrap_or(false);
    if !trapped {
        return fail(
            strategy,
            if written_while_protected {
                "the write went through without a fault (the page was not protected)".into()
            } else {
                "no fault message arrived within 2 s".into()
            },
        );
    }
    if let Err(e) = unprotected {
        return fail(strategy, e.to_string());
    }
    if !completed || ram.page(target).is_none_or(|p| p[0] != 0x5a) {
        return fail(
            strategy,
            "the write did not complete after unprotecting".into(),
        );
    }
    UnpopulatedWpReport {
        strategy,
        works: true,
        reason: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ram::Backend;

    #[test]
    fn unpopulated_pages_fault_on_this_host() {
        match crate::uffd::query_features() {
            Ok((f, _)) if f.pagefault_flag_wp => {}
            other => {
                eprintln!("skipping: no userfaultfd write-protect: {other:?}");
                return;
            }
        }
        for b in [Backend::SharedMemfd, Backend::AnonymousPrivate] {
            let r = probe_unpopulated_wp(&MemoryConfig {
                backend: b.clone(),
                ..MemoryConfig::default()
            });
            eprintln!("{b:?}: {r:?}");
            assert!(r.works, "{b:?}: {r:?}");
        }
    }
}
