//! Per-client flood control in the daemon: the token bucket (shared with chat-client, in
//! `chat_proto::flood`) says whether a line may pass, and the window below counts refusals so a
//! client that keeps flooding is disconnected. Pure state over explicit instants.

use std::time::{Duration, Instant};

/// How long refusals are counted before the count starts again.
pub const FLOOD_WINDOW: Duration = Duration::from_secs(10);

/// Counts refusals in a fixed window.
#[derive(Debug, Clone)]
pub struct FloodWindow {
    start: Instant,
    refused: u64,
}

impl FloodWindow {
    /// An empty window starting at `now`.
    pub fn new(now: Instant) -> Self {
        FloodWindow {
            start: now,
            refused: 0,
        }
    }

    /// Records a refusal; returns `true` when `limit` refusals fell in the current window.
    pub fn refuse(&mut self, now: Instant, limit: u64) -> bool {
        if now.saturating_duration_since(self.start) >= FLOOD_WINDOW {
            self.start = now;
            self.refused = 0;
        }
        self.refused += 1;
        self.refused >= limit
    }

    /// Refusals in the current window (1 right after the first one).
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flood_window_counts_within_ten_seconds() {
        let t0 = Instant::now();
        let mut w = FloodWindow::new(t0);
        assert!(!w.refuse(t0, 3));
        assert!(!w.refuse(t0 + Duration::from_secs(1), 3));
        assert!(w.refuse(t0 + Duration::from_secs(2), 3));
        let mut w = FloodWindow::new(t0);
        w.refuse(t0, 3);
        w.refuse(t0, 3);
        assert!(!w.refuse(t0 + FLOOD_WINDOW, 3), "a new window starts over");
    }
}
