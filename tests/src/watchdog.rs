//! A per-test watchdog: a test that runs far too long gets its child processes
//! killed (so its waits end and it fails with its own messages) and, if even that
//! does not end it, the whole test binary exits: CI fails loudly instead of hanging.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a test may run before its processes are killed, unless
/// `FERRY_TEST_TIMEOUT_SECS` says otherwise.
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(300);

/// How long after the kill the test may take to fail on its own before the binary exits.
const GRACE: Duration = Duration::from_secs(60);

/// Armed until dropped.
pub struct Watchdog {
    done: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Arms a watchdog for the calling test with the default (or configured) limit.
pub fn arm() -> Watchdog {
    let limit = std::env::var("FERRY_TEST_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_LIMIT);
    arm_for(limit)
}

/// Arms a watchdog that fires after `limit`.
pub fn arm_for(limit: Duration) -> Watchdog {
    let test = std::thread::current()
        .name()
        .unwrap_or("an unnamed test")
        .to_string();
    let (done, rx) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        if rx.recv_timeout(limit) != Err(RecvTimeoutError::Timeout) {
            return;
        }
        let killed = kill_descendants();
        eprintln!(
            "WATCHDOG: {test} has run for over {limit:?}: killed its {killed} child \
             process(es) so that it fails instead of hanging"
        );
        if rx.recv_timeout(GRACE) == Err(RecvTimeoutError::Timeout) {
            eprintln!("WATCHDOG: {test} still runs {GRACE:?} later: exiting the test binary");
            std::process::exit(101);
        }
    });
    Watchdog {
        done: Some(done),
        thread: Some(thread),
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// SIGKILLs every descendant of this process; returns how many were signalled.
fn kill_descendants() -> usize {
    let me = std::process::id();
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name may hold spaces and parentheses: fields follow the last ')'.
            let rest = &stat[stat.rfind(')')? + 1..];
            let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut family = vec![me];
    let mut i = 0;
    while i < family.len() {
        let parent = family[i];
        family.extend(
            parents
                .iter()
                .filter(|&&(_, ppid)| ppid == parent)
                .map(|&(pid, _)| pid),
        );
        i += 1;
    }
    let mut killed = 0;
    for &pid in &family[1..] {
        let Ok(pid) = i32::try_from(pid) else {
            continue;
        };
        // SAFETY: kill(2) with a pid read from /proc and a valid signal number touches no memory.
        if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
            killed += 1;
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Instant;

    // One test: the watchdog kills every child of the test binary, so a second test
    // spawning processes in parallel could be hit.
    #[test]
    fn a_test_within_its_limit_is_left_alone_and_one_over_it_has_its_children_killed() {
        let dog = arm_for(Duration::from_secs(30));
        let status = Command::new("true").status().expect("run true");
        drop(dog);
        assert!(status.success());

        let mut child = Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let start = Instant::now();
        let dog = arm_for(Duration::from_millis(200));
        let status = child.wait().expect("wait for sleep");
        drop(dog);
        assert!(!status.success(), "sleep was killed: {status:?}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }
}
