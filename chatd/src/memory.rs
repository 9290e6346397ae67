//! Giving freed memory back to the system after a burst.
//!
//! glibc's allocator keeps memory that has been freed mapped and resident, and returns it on its
//! own only from the top of a heap. After a join storm whose readers fell behind (each member's
//! queue briefly holds hundreds of entries) or a mass disconnect, tens to hundreds of megabytes
//! can stay resident with nothing using them, scattered between long-lived allocations
//! (docs/performance.md, "Memory per connection"). So once a second [`trim_task`] asks the
//! allocator how much it holds free; when that has grown by [`TRIM_AFTER`] since its lowest
//! point, it calls `malloc_trim(0)`, which hands every whole free page of every arena back
//! (`MADV_DONTNEED`). Steady traffic frees and reuses about as much as it allocates, so it never
//! reaches the threshold; a burst that has drained does, once.
//!
//! On allocators other than glibc's the task does nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::debug;

/// How much the allocator's free memory must grow past its low point before a trim.
pub const TRIM_AFTER: usize = 16 << 20;

/// How often the allocator is asked (`mallinfo2` walks each arena's free lists under its lock:
/// microseconds for a normal heap, so it runs on the async worker).
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What the trims have done, for `chatctl status`.
#[derive(Debug, Default)]
pub struct TrimStats {
    /// Trims made since start.
    pub trims: AtomicU64,
    /// Resident memory given back by them, measured as the drop in RSS around each trim.
    pub trimmed_bytes: AtomicU64,
}

/// When to trim: the allocator's free memory has grown [`TRIM_AFTER`] past its lowest value
/// since the last trim. A trim does not shrink that figure (the pages stay on the free lists,
/// just not resident), so the low point restarts from the value at the trim.
#[derive(Debug)]
pub struct TrimPolicy {
    low: usize,
}

impl TrimPolicy {
    /// A policy whose low point is the allocator's free memory now.
    pub fn new(free: usize) -> Self {
        TrimPolicy { low: free }
    }

    /// Takes the allocator's current free memory; says whether to trim now.
    pub fn observe(&mut self, free: usize) -> bool {
        self.low = self.low.min(free);
        if free - self.low >= TRIM_AFTER {
            self.low = free;
            return true;
        }
        false
    }
}

/// Trims whenever [`TrimPolicy`] says so, for the daemon's life; cancel it by dropping it.
pub async fn trim_task(stats: &TrimStats) {
    let Some(free) = heap_free() else {
        return;
    };
    let mut policy = TrimPolicy::new(free);
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(free) = heap_free() else {
            return;
        };
        if !policy.observe(free) {
            continue;
        }
        // Off the async workers: a trim of a large heap touches every free page.
        let Ok((before, after, took)) = tokio::task::spawn_blocking(trim).await else {
            continue;
        };
        let given_back = before.saturating_sub(after);
        stats.trims.fetch_add(1, Ordering::Relaxed);
        stats.trimmed_bytes.fetch_add(given_back, Ordering::Relaxed);
        debug!(
            heap_free = free,
            rss_before = before,
            rss_after = after,
            ?took,
            "gave freed memory back to the system"
        );
    }
}

/// Bytes the allocator holds free (its arenas' free lists), or `None` on other allocators.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn heap_free() -> Option<usize> {
    // SAFETY: mallinfo2 takes no arguments, only reads the allocator's bookkeeping under its
    // own locks, and returns a plain struct by value (glibc 2.33 and later).
    #[allow(unsafe_code)]
    let info = unsafe { nix::libc::mallinfo2() };
    Some(info.fordblks)
}

/// Bytes the allocator holds free, or `None` on other allocators.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn heap_free() -> Option<usize> {
    None
}

/// Gives free pages back; returns RSS before and after, and how long it took.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> (u64, u64, Duration) {
    let before = rss_bytes().unwrap_or(0);
    let start = Instant::now();
    // SAFETY: malloc_trim only releases pages that no allocation uses; it takes each arena's
    // lock itself and has no preconditions.
    // Its result only says whether anything was released; RSS below says how much.
    #[allow(unsafe_code)]
    let _released = unsafe { nix::libc::malloc_trim(0) };
    let took = start.elapsed();
    (before, rss_bytes().unwrap_or(0), took)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> (u64, u64, Duration) {
    (0, 0, Duration::ZERO)
}

/// The process's resident memory, from `/proc/self/statm`.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()?;
    Some(pages * u64::try_from(page).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_per_growth_past_the_low_point() {
        let mb = 1 << 20;
        let mut p = TrimPolicy::new(40 * mb);
        // Reuse lowers the low point; growth short of the threshold is left alone.
        assert!(!p.observe(10 * mb));
        assert!(!p.observe(10 * mb + TRIM_AFTER - 1));
        assert!(p.observe(10 * mb + TRIM_AFTER));
        // The trimmed pages still count as free: no second trim for the same memory.
        assert!(!p.observe(10 * mb + TRIM_AFTER));
        assert!(!p.observe(20 * mb + TRIM_AFTER));
        assert!(p.observe(10 * mb + 2 * TRIM_AFTER));
    }

    #[test]
    fn the_allocator_and_rss_can_be_read_here() {
        assert!(rss_bytes().is_some_and(|r| r > 0));
        if cfg!(target_env = "gnu") {
            assert!(heap_free().is_some());
        }
    }
}
