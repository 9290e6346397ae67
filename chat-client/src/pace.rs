//! Pacing what the user sends to the server's flood limit, so a multi-line paste arrives as
//! separate messages, in order, and none is refused.
//!
//! chatd refuses lines beyond `limits.message-rate` per second (bursts of
//! `limits.message-burst`, by default 5/s and 10) with `*** ERR rate-limited`. The client keeps
//! a token bucket a little stricter than the server's default and queues lines until it allows
//! them. Should the server still refuse one (stricter limits there), the bucket adopts the
//! limits the refusal names and waits as long as it says.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use chatd::limits::TokenBucket;

/// Sustained lines per second; below the server's default of 5 so the server's bucket, which
/// refills faster, always has a token when ours does.
const RATE: u64 = 4;
/// Burst; below the server's default of 10 for the same reason.
const BURST: u64 = 8;

/// Lines waiting to be sent, and when the next may go.
pub struct Pacer {
    bucket: TokenBucket,
    queue: VecDeque<String>,
    /// No line goes before this (after a refusal that said when to retry).
    hold_until: Instant,
}

impl Pacer {
    /// A pacer for a new connection on which `already_sent` lines (name, `/token`, ...) went
    /// out without it.
    pub fn new(already_sent: usize) -> Pacer {
        let now = Instant::now();
        let mut bucket = TokenBucket::new(RATE, BURST, now);
        for _ in 0..already_sent {
            let _ = bucket.take(now);
        }
        Pacer {
            bucket,
            queue: VecDeque::new(),
            hold_until: now,
        }
    }

    /// Queues a line.
    pub fn push(&mut self, line: String) {
        self.queue.push_back(line);
    }

    /// Lines still queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// When the next queued line may be sent; `None` when nothing is queued.
    pub fn next_at(&self) -> Option<Instant> {
        self.queue.front()?;
        let now = Instant::now();
        let at = match self.bucket.clone().take(now) {
            Ok(()) => now,
            Err(wait) => now + wait,
        };
        Some(at.max(self.hold_until))
    }

    /// The next line, if it may be sent now (its token is taken).
    pub fn pop_ready(&mut self) -> Option<String> {
        self.queue.front()?;
        let now = Instant::now();
        if now < self.hold_until || self.bucket.take(now).is_err() {
            return None;
        }
        self.queue.pop_front()
    }

    /// The server refused a line for its rate (`text` is the `*** ERR rate-limited` text):
    /// adopt the limits it names, a little stricter, and wait as long as it says.
    pub fn refused(&mut self, text: &str) {
        let number_after = |marker: &str| -> Option<u64> {
            let rest = &text[text.find(marker)? + marker.len()..];
            let digits: String = rest
                .trim_start()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        };
        let rate = number_after("more than ").unwrap_or(RATE);
        let burst = number_after("message-burst = ").unwrap_or(BURST);
        let retry = number_after("retry in ").unwrap_or(1000);
        let now = Instant::now();
        self.bucket = TokenBucket::new((rate * 4 / 5).max(1), burst.saturating_sub(2).max(1), now);
        while self.bucket.take(now).is_ok() {}
        self.hold_until = now + Duration::from_millis(retry.min(60_000));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_paces() {
        let mut p = Pacer::new(2);
        for i in 0..10 {
            p.push(format!("line {i}"));
        }
        let mut sent = 0;
        while p.pop_ready().is_some() {
            sent += 1;
        }
        assert_eq!(sent, BURST as usize - 2);
        let at = p.next_at().expect("queued");
        assert!(at > Instant::now());
        assert_eq!(p.len(), 10 - sent);
    }

    #[test]
    fn adopts_the_limits_a_refusal_names() {
        let mut p = Pacer::new(0);
        p.push("x".into());
        p.refused(
            "line not sent: more than 2 lines per second (limits.message-rate, bursts of \
             limits.message-burst = 3); retry in 500ms",
        );
        assert!(p.pop_ready().is_none());
        let wait = p.next_at().expect("queued") - Instant::now();
        assert!(wait > Duration::from_millis(300), "{wait:?}");
    }
}
