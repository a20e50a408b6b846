//! `postcopy-blocktime`: how long vCPUs waited for missing pages on the destination.
//!
//! As QEMU's `PostcopyBlocktimeContext`: a vCPU is blocked from its fault on a missing page
//! (known by the faulting thread's id, `UFFD_FEATURE_THREAD_ID`) until that page is placed.
//! Per vCPU the blocked intervals add up; the total (`postcopy-blocktime`) adds up the
//! intervals during which *every* vCPU was blocked at once: the time the guest made no
//! progress at all. Faults of other threads (the VMM's own accesses) are not counted.
//!
//! Times are nanoseconds on a caller-supplied monotonic clock, so the logic is testable.

/// Blocked-time accounting for a set of vCPU threads.
#[derive(Debug, Clone)]
pub struct Blocktime {
    tids: Vec<i32>,
    /// Per vCPU: since when and on which page it is blocked.
    blocked_on: Vec<Option<(u64, u64)>>,
    per_vcpu_ns: Vec<u64>,
    blocked: usize,
    all_since: Option<u64>,
    total_ns: u64,
}

/// What [`Blocktime::report`] returns, in milliseconds as query-migrate shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlocktimeReport {
    /// Time every vCPU was blocked at once.
    pub total_ms: u32,
    /// Per vCPU blocked time, in vCPU order.
    pub per_vcpu_ms: Vec<u32>,
}

fn ms(ns: u64) -> u32 {
    u32::try_from(ns / 1_000_000).unwrap_or(u32::MAX)
}

impl Blocktime {
    /// Accounting for vCPUs whose threads have ids `tids` (in vCPU order).
    pub fn new(tids: Vec<i32>) -> Self {
        let n = tids.len();
        Blocktime {
            tids,
            blocked_on: vec![None; n],
            per_vcpu_ns: vec![0; n],
            blocked: 0,
            all_since: None,
            total_ns: 0,
        }
    }

    /// The vCPU index of thread `tid`, if it is a vCPU thread.
    pub fn vcpu_of(&self, tid: i32) -> Option<usize> {
        self.tids.iter().position(|&t| t == tid && t != 0)
    }

    /// Thread `tid` faulted on `page` at `now_ns`.
    pub fn on_fault(&mut self, tid: i32, page: u64, now_ns: u64) {
        let Some(i) = self.vcpu_of(tid) else { return };
        match &mut self.blocked_on[i] {
            // A fault repeated after a signal interrupted the wait: still one interval.
            Some((_, p)) => *p = page,
            slot @ None => {
                *slot = Some((now_ns, page));
                self.blocked += 1;
                if self.blocked == self.tids.len() {
                    self.all_since = Some(now_ns);
                }
            }
        }
    }

    /// `page` was placed at `now_ns`: the vCPUs waiting for it run again.
    pub fn on_placed(&mut self, page: u64, now_ns: u64) {
        for i in 0..self.blocked_on.len() {
            let Some((since, p)) = self.blocked_on[i] else {
                continue;
            };
            if p != page {
                continue;
            }
            if let Some(all) = self.all_since.take() {
                self.total_ns += now_ns.saturating_sub(all);
            }
            self.per_vcpu_ns[i] += now_ns.saturating_sub(since);
            self.blocked_on[i] = None;
            self.blocked -= 1;
        }
    }

    /// Whether any vCPU is blocked now.
    pub fn any_blocked(&self) -> bool {
        self.blocked > 0
    }

    /// The figures so far (intervals still open are not counted).
    pub fn report(&self) -> BlocktimeReport {
        BlocktimeReport {
            total_ms: ms(self.total_ns),
            per_vcpu_ms: self.per_vcpu_ns.iter().map(|&n| ms(n)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn per_vcpu_time_runs_from_fault_to_placement() {
        let mut b = Blocktime::new(vec![100, 200]);
        b.on_fault(100, 7, 0);
        b.on_placed(8, 5 * MS); // another page: vCPU 0 still waits
        b.on_placed(7, 10 * MS);
        b.on_fault(200, 9, 20 * MS);
        b.on_placed(9, 23 * MS);
        let r = b.report();
        assert_eq!(r.per_vcpu_ms, vec![10, 3]);
        assert_eq!(r.total_ms, 0, "never both blocked at once");
        assert!(!b.any_blocked());
    }

    #[test]
    fn total_counts_only_time_when_every_vcpu_is_blocked() {
        let mut b = Blocktime::new(vec![1, 2]);
        b.on_fault(1, 10, 0);
        b.on_fault(2, 11, 4 * MS); // all blocked from 4 ms
        b.on_placed(10, 9 * MS); // ... until 9 ms
        b.on_placed(11, 12 * MS);
        let r = b.report();
        assert_eq!(r.total_ms, 5);
        assert_eq!(r.per_vcpu_ms, vec![9, 8]);
    }

    #[test]
    fn two_vcpus_on_one_page_both_wake_and_other_threads_are_ignored() {
        let mut b = Blocktime::new(vec![1, 2]);
        b.on_fault(999, 5, 0); // a VMM thread
        b.on_fault(1, 5, MS);
        b.on_fault(2, 5, 2 * MS);
        b.on_fault(2, 5, 3 * MS); // repeated after a signal: no new interval
        b.on_placed(5, 6 * MS);
        let r = b.report();
        assert_eq!(r.per_vcpu_ms, vec![5, 4]);
        assert_eq!(r.total_ms, 4);
        assert_eq!(b.vcpu_of(999), None);
    }

    #[test]
    fn one_vcpu_total_equals_its_own_time() {
        let mut b = Blocktime::new(vec![42]);
        for k in 0..10 {
            b.on_fault(42, k, k * 10 * MS);
            b.on_placed(k, k * 10 * MS + 2 * MS);
        }
        assert_eq!(
            b.report(),
            BlocktimeReport {
                total_ms: 20,
                per_vcpu_ms: vec![20]
            }
        );
    }
}
