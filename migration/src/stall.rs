//! Progress-aware timeouts: a wait fails only after a progress measure (bytes received,
//! bytes still unacknowledged) stayed the same for the whole limit, however long the
//! wait as a whole takes.

use std::time::{Duration, Instant};

/// Watches one progress measure for a stall.
#[derive(Debug)]
pub struct StallClock<T> {
    last: T,
    since: Instant,
    limit: Duration,
}

impl<T: PartialEq> StallClock<T> {
    /// Starts watching at `value`, allowing `limit` without change.
    pub fn new(value: T, limit: Duration) -> Self {
        StallClock {
            last: value,
            since: Instant::now(),
            limit,
        }
    }

    /// Looks at the measure again: true when it has not changed for the limit.
    pub fn stalled(&mut self, value: T) -> bool {
        if value != self.last {
            self.last = value;
            self.since = Instant::now();
            false
        } else {
            self.since.elapsed() >= self.limit
        }
    }

    /// The value last seen.
    pub fn last(&self) -> &T {
        &self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unchanged_measure_stalls() {
        let mut c = StallClock::new(0u64, Duration::from_millis(50));
        assert!(!c.stalled(0));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!c.stalled(1), "a change restarts the clock");
        assert!(!c.stalled(1));
        std::thread::sleep(Duration::from_millis(60));
        assert!(c.stalled(1));
        assert_eq!(*c.last(), 1);
    }
}
