//! Bounded waits: every wait in a test polls against a deadline, never a fixed sleep.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Default bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// How often a poll looks again.
const POLL: Duration = Duration::from_millis(20);

/// Polls `cond` until it holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Polls `get` until it returns `Some` or `timeout` passes; returns the value. On timeout it
/// panics with `what` and the text `explain` gives then (a screen, a log, output so far).
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut get: impl FnMut() -> Option<T>,
    explain: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = get() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                explain()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Waits up to `limit` for `child` to exit; kills it and returns `None` if it does not (the
/// caller panics with what it knows).
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(POLL);
    }
}
