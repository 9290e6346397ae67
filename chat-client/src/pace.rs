//! Pacing what the user sends to the server's flood limit, so a multi-line paste arrives as
//! separate messages, in order, and none is refused.
//!
//! chatd refuses lines beyond `limits.message-rate` per second (bursts of
//! `limits.message-burst`, by default 5/s and 10) with `*** ERR rate-limited`, and announces
//! both at the end of its `*** WELCOME` line ("at most 5 lines/s, bursts of 10"). The client
//! keeps a token bucket a little stricter than the announced limits (or the defaults, from a
//! server that does not announce them) and queues lines until it allows them. Should the server
//! still refuse one (its limits were lowered by a reload since), the bucket adopts the limits
//! the refusal names and waits as long as it says.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use chat_proto::flood::TokenBucket;

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
    pub fn new(announced: Option<(u64, u64)>, already_sent: usize) -> Pacer {
        let now = Instant::now();
        let (rate, burst) = match announced {
            Some((rate, burst)) => stricter(rate, burst),
            None => (RATE, BURST),
        };
        let mut bucket = TokenBucket::new(rate, burst, now);
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
        let (rate, burst, retry) = chat_proto::protocol::parse_rate_limited(text);
        let (rate, burst, retry) = (
            rate.unwrap_or(RATE),
            burst.unwrap_or(BURST),
            retry.unwrap_or(1000),
        );
        let now = Instant::now();
        let (rate, burst) = stricter(rate, burst);
        self.bucket = TokenBucket::new(rate, burst, now);
        while self.bucket.take(now).is_ok() {}
        self.hold_until = now + Duration::from_millis(retry.min(60_000));
    }
}

/// A bucket a little stricter than the server's, so the server always has a token when ours
/// does (its refill and ours drift apart by scheduling).
fn stricter(rate: u64, burst: u64) -> (u64, u64) {
    ((rate * 4 / 5).max(1), burst.saturating_sub(2).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_paces() {
        let mut p = Pacer::new(None, 2);
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
        let mut p = Pacer::new(None, 0);
        p.push("x".into());
        p.refused(
            "line not sent: more than 2 lines per second (limits.message-rate, bursts of \
             limits.message-burst = 3); retry in 500ms",
        );
        assert!(p.pop_ready().is_none());
        let wait = p.next_at().expect("queued") - Instant::now();
        assert!(wait > Duration::from_millis(300), "{wait:?}");
    }

    #[test]
    fn reads_the_limits_the_welcome_announces() {
        let text =
            "you are chatting as ann; type /help for commands; at most 2 lines/s, bursts of 3";
        assert_eq!(chat_proto::protocol::parse_flood_limits(text), Some((2, 3)));
        assert_eq!(
            chat_proto::protocol::parse_flood_limits("you are chatting as ann"),
            None
        );
        // Paced stricter than announced: a burst of 1 after the name line went out.
        let mut p = Pacer::new(chat_proto::protocol::parse_flood_limits(text), 0);
        p.push("a".into());
        p.push("b".into());
        assert!(p.pop_ready().is_some());
        assert!(p.pop_ready().is_none());
    }
}
