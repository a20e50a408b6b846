//! A process's memory as the kernel accounts it: the fields of `/proc/PID/status`.
//!
//! `VmRSS = RssAnon + RssFile + RssShmem`. Guest RAM in a memfd mapped
//! MAP_SHARED (Ferry's default backing) is shared memory, so the pages the
//! guest has touched show up in `RssShmem`; the VMM's own heap, stacks and
//! page tables of its threads are `RssAnon`, and its binary and libraries are
//! `RssFile`. That split is how `ferry bench boot` tells guest memory from VMM
//! overhead.

use std::path::Path;

use serde::Serialize;

/// Memory figures of one process, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ProcMemory {
    /// Resident set size.
    pub vm_rss_kib: u64,
    /// Peak resident set size.
    pub vm_hwm_kib: u64,
    /// Resident anonymous memory (heap, stacks).
    pub rss_anon_kib: u64,
    /// Resident file mappings (the binary, shared libraries).
    pub rss_file_kib: u64,
    /// Resident shared memory (a memfd guest's touched RAM).
    pub rss_shmem_kib: u64,
    /// Number of threads.
    pub threads: u64,
}

impl ProcMemory {
    /// Parses the text of a `/proc/PID/status` file; `None` when `VmRSS` is missing
    /// (a kernel thread, or a process that has exited).
    pub fn parse(text: &str) -> Option<ProcMemory> {
        let field = |name: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        };
        Some(ProcMemory {
            vm_rss_kib: field("VmRSS")?,
            vm_hwm_kib: field("VmHWM").unwrap_or(0),
            rss_anon_kib: field("RssAnon").unwrap_or(0),
            rss_file_kib: field("RssFile").unwrap_or(0),
            rss_shmem_kib: field("RssShmem").unwrap_or(0),
            threads: field("Threads").unwrap_or(0),
        })
    }

    /// Reads `/proc/<pid>/status`.
    pub fn of_pid(pid: u32) -> std::io::Result<ProcMemory> {
        let path = Path::new("/proc").join(pid.to_string()).join("status");
        let text = std::fs::read_to_string(&path)?;
        ProcMemory::parse(&text).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} has no VmRSS line", path.display()),
            )
        })
    }

    /// What the VMM itself occupies when guest RAM is a memfd: everything resident but the
    /// shared memory (`RssAnon + RssFile`, which is `VmRSS - RssShmem`).
    pub fn overhead_beyond_shmem_kib(&self) -> u64 {
        self.rss_anon_kib + self.rss_file_kib
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Name:\tferry\nUmask:\t0022\nState:\tS (sleeping)\n\
        VmPeak:\t  640000 kB\nVmHWM:\t   20480 kB\nVmRSS:\t   18432 kB\n\
        RssAnon:\t    2048 kB\nRssFile:\t    4096 kB\nRssShmem:\t   12288 kB\n\
        VmData:\t   10000 kB\nThreads:\t4\n";

    #[test]
    fn parses_the_memory_fields() {
        let m = ProcMemory::parse(SAMPLE).unwrap();
        assert_eq!(
            m,
            ProcMemory {
                vm_rss_kib: 18432,
                vm_hwm_kib: 20480,
                rss_anon_kib: 2048,
                rss_file_kib: 4096,
                rss_shmem_kib: 12288,
                threads: 4,
            }
        );
        assert_eq!(m.overhead_beyond_shmem_kib(), 6144);
        assert_eq!(
            m.vm_rss_kib,
            m.rss_anon_kib + m.rss_file_kib + m.rss_shmem_kib
        );
    }

    #[test]
    fn a_status_without_vm_rss_is_refused() {
        assert!(ProcMemory::parse("Name:\tkthreadd\nThreads:\t1\n").is_none());
    }

    #[test]
    fn field_names_match_whole_words_only() {
        // "VmRSSx" must not be read as VmRSS.
        assert!(ProcMemory::parse("VmRSSx:\t5 kB\n").is_none());
    }

    #[test]
    fn reads_this_process() {
        let m = ProcMemory::of_pid(std::process::id()).unwrap();
        assert!(m.vm_rss_kib > 0 && m.threads >= 1, "{m:?}");
    }
}
