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

/// The server's default flood limit (`limits.message-rate`, `limits.message-burst`), assumed
/// when a server does not announce its own.
const SERVER_DEFAULT: (u64, u64) = (5, 10);

/// How much stricter than the server's limit the client paces itself: it sends at
/// `MARGIN_RATE` (numerator, denominator) of the server's rate, and bursts `MARGIN_BURST` lines
/// fewer. This trades the speed of a paste against the risk of a refusal: the server's bucket
/// and ours refill on different clocks, and the network can bunch lines that left us evenly
/// spaced, so pacing at exactly the server's limit gets lines refused now and then, and a
/// refused line is lost (the server reports it; the client does not send it again). With the
/// defaults (5/s, bursts of 10) it sends 4/s in bursts of 8.
///
/// Not a config key: the limit itself comes from the server, a smaller margin can only lose
/// lines, a larger one only slows pastes, and after a refusal the client adopts what the server
/// says anyway.
const MARGIN_RATE: (u64, u64) = (4, 5);
/// See [`MARGIN_RATE`].
const MARGIN_BURST: u64 = 2;
/// How long to wait after a refusal that does not say (an older or other server).
const DEFAULT_RETRY: Duration = Duration::from_secs(1);
/// The longest wait a refusal can impose, so a garbled retry time cannot stall sending.
const MAX_RETRY: Duration = Duration::from_secs(60);

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
        let (rate, burst) = announced.unwrap_or(SERVER_DEFAULT);
        let (rate, burst) = stricter(rate, burst);
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
        // A refusal that names no limits came although we paced below the defaults: go
        // below our own default pace.
        let ours = stricter(SERVER_DEFAULT.0, SERVER_DEFAULT.1);
        let (rate, burst) = stricter(rate.unwrap_or(ours.0), burst.unwrap_or(ours.1));
        let retry = retry.map_or(DEFAULT_RETRY, Duration::from_millis);
        let now = Instant::now();
        self.bucket = TokenBucket::new(rate, burst, now);
        while self.bucket.take(now).is_ok() {}
        self.hold_until = now + retry.min(MAX_RETRY);
    }
}

/// A bucket a little stricter than the server's ([`MARGIN_RATE`], [`MARGIN_BURST`]), so the
/// server always has a token when ours does; never below one line.
fn stricter(rate: u64, burst: u64) -> (u64, u64) {
    let (num, den) = MARGIN_RATE;
    (
        (rate.saturating_mul(num) / den).max(1),
        burst.saturating_sub(MARGIN_BURST).max(1),
    )
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
        // The default burst of 10, less the margin of 2, less the 2 lines already sent.
        assert_eq!(sent, 6);
        let at = p.next_at().expect("queued");
        assert!(at > Instant::now());
        assert_eq!(p.len(), 10 - sent);
    }

    #[test]
    fn margin_is_what_docs_client_md_says() {
        // docs/client.md, "Sending pace": 4/5 of the rate, the burst less 2.
        assert_eq!(stricter(5, 10), (4, 8));
        assert_eq!(stricter(2, 3), (1, 1));
        assert_eq!(stricter(1, 1), (1, 1));
        assert_eq!(stricter(u64::MAX, 0), (u64::MAX / 5, 1));
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
