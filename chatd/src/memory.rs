//! Giving freed memory back to the system after a burst.
//!
//! glibc's allocator keeps memory that has been freed mapped and resident, and returns it on its
//! own only from the top of a heap. After a join storm whose readers fell behind (each member's
//! queue briefly holds hundreds of entries) or a mass disconnect, tens to hundreds of megabytes
//! can stay resident with nothing using them, scattered between long-lived allocations
//! (docs/performance.md, "Memory per connection"). So once a second [`trim_task`] asks the
//! allocator how much it holds free; when that has grown past its lowest point by an eighth of
//! the heap in use (at least [`TRIM_MIN`], at most [`TRIM_AFTER`]), it calls `malloc_trim(0)`,
//! which hands every whole free page of every arena back (`MADV_DONTNEED`). Steady traffic
//! frees and reuses about as much as it allocates, so it never reaches the threshold; a burst
//! that has drained does, once. The threshold follows the heap's size because what is waste
//! depends on it: a storm of 5,000 joins leaves 3-12 MB free in a daemon using 15-25 MB, which
//! a fixed 16 MiB never reached.
//!
//! On allocators other than glibc's the task does nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::debug;

/// The most the allocator's free memory must grow past its low point before a trim (a large
/// heap's eighth is more than that).
pub const TRIM_AFTER: usize = 16 << 20;

/// The least growth of free memory that triggers a trim, however small the heap: below it a
/// trim gives back too little to be worth the page faults of using that memory again.
pub const TRIM_MIN: usize = 1 << 20;

/// How much free memory, grown past its low point, is worth a trim in a heap with `in_use`
/// bytes allocated: an eighth of it, within [`TRIM_MIN`] and [`TRIM_AFTER`].
pub fn threshold(in_use: usize) -> usize {
    (in_use / 8).clamp(TRIM_MIN, TRIM_AFTER)
}

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

/// When to trim: the allocator's free memory has grown [`threshold`] past its lowest value
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

    /// Takes the allocator's current free and in-use memory; says whether to trim now.
    pub fn observe(&mut self, free: usize, in_use: usize) -> bool {
        self.low = self.low.min(free);
        if free - self.low >= threshold(in_use) {
            self.low = free;
            return true;
        }
        false
    }
}

/// Trims whenever [`TrimPolicy`] says so, for the daemon's life; cancel it by dropping it.
pub async fn trim_task(stats: &TrimStats) {
    let Some(Heap { free, .. }) = heap() else {
        return;
    };
    let mut policy = TrimPolicy::new(free);
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(Heap { free, in_use }) = heap() else {
            return;
        };
        if !policy.observe(free, in_use) {
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

/// What the allocator holds, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Heap {
    /// Free, on its arenas' free lists.
    pub free: usize,
    /// Allocated and not freed (in arenas; large blocks mapped on their own are not counted,
    /// since freeing them unmaps them at once).
    pub in_use: usize,
}

/// What the allocator holds, or `None` on other allocators.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn heap() -> Option<Heap> {
    // SAFETY: mallinfo2 takes no arguments, only reads the allocator's bookkeeping under its
    // own locks, and returns a plain struct by value (glibc 2.33 and later).
    #[allow(unsafe_code)]
    let info = unsafe { nix::libc::mallinfo2() };
    Some(Heap {
        free: info.fordblks,
        in_use: info.uordblks,
    })
}

/// What the allocator holds, or `None` on other allocators.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn heap() -> Option<Heap> {
    None
}

/// Bytes the allocator holds free (its arenas' free lists), or `None` on other allocators.
pub fn heap_free() -> Option<usize> {
    heap().map(|h| h.free)
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
        let big = 1 << 30;
        let mut p = TrimPolicy::new(40 * mb);
        // Reuse lowers the low point; growth short of the threshold is left alone.
        assert!(!p.observe(10 * mb, big));
        assert!(!p.observe(10 * mb + TRIM_AFTER - 1, big));
        assert!(p.observe(10 * mb + TRIM_AFTER, big));
        // The trimmed pages still count as free: no second trim for the same memory.
        assert!(!p.observe(10 * mb + TRIM_AFTER, big));
        assert!(!p.observe(20 * mb + TRIM_AFTER, big));
        assert!(p.observe(10 * mb + 2 * TRIM_AFTER, big));
    }

    #[test]
    fn the_threshold_follows_the_heap_within_bounds() {
        let mb = 1 << 20;
        assert_eq!(threshold(0), TRIM_MIN);
        assert_eq!(threshold(20 * mb), 20 * mb / 8);
        assert_eq!(threshold(1 << 30), TRIM_AFTER);
        // A storm that leaves 3 MB free in a 20 MB heap is trimmed; 2 MB is not.
        let mut p = TrimPolicy::new(mb);
        assert!(!p.observe(3 * mb, 20 * mb));
        assert!(p.observe(4 * mb, 20 * mb));
    }

    #[test]
    fn the_allocator_and_rss_can_be_read_here() {
        assert!(rss_bytes().is_some_and(|r| r > 0));
        if cfg!(target_env = "gnu") {
            assert!(heap_free().is_some());
        }
    }
}
