//! A client's bounded outbound queue: the only way frames reach a session's socket.
//!
//! The room pushes shared, already-encoded frames (`Bytes`, a refcount bump per recipient) while
//! holding its lock; the session's writer drains everything queued at once and writes it with one
//! vectored call. The queue is bounded in bytes: a push that would exceed the bound closes the
//! outbox as [`Close::Overflow`] instead of growing memory or making the sender wait, so one
//! stalled reader can never slow the room down.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::Notify;

/// Why an outbox was closed; the session ends once it has flushed what was queued before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// The client asked to leave.
    Quit,
    /// An admin kicked the client.
    Kicked,
    /// The client did not read and its queue exceeded the limit.
    Overflow,
    /// The server is shutting down.
    Shutdown,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Bytes>,
    /// Sum of `frames`' lengths.
    bytes: usize,
    closed: Option<Close>,
}

/// The bounded queue between the room and one session's writer.
#[derive(Debug)]
pub struct Outbox {
    // A std mutex: every critical section is a few pointer moves and never awaits.
    state: Mutex<State>,
    notify: Notify,
    limit: usize,
}

impl Outbox {
    /// An empty outbox holding at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves the queue itself consistent (push and drain
        // are single VecDeque operations), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame. Returns `false` if the frame was not queued: the outbox is closed, or
    /// this push overflowed it (it is then closed as [`Close::Overflow`]).
    pub fn push(&self, frame: Bytes) -> bool {
        let mut st = self.lock();
        if st.closed.is_some() {
            return false;
        }
        if st.bytes + frame.len() > self.limit {
            st.closed = Some(Close::Overflow);
            drop(st);
            self.notify.notify_one();
            return false;
        }
        st.bytes += frame.len();
        st.frames.push_back(frame);
        let first = st.frames.len() == 1;
        drop(st);
        // Only the push that makes the queue non-empty needs to wake the writer: the writer
        // drains the whole queue, so later pushes are picked up by that same drain.
        if first {
            self.notify.notify_one();
        }
        true
    }

    /// Queues a last frame (even past the byte limit) and closes the outbox. A second close
    /// keeps the first reason and drops the frame.
    pub fn close_with(&self, last: Option<Bytes>, reason: Close) {
        let mut st = self.lock();
        if st.closed.is_some() {
            return;
        }
        if let Some(frame) = last {
            st.bytes += frame.len();
            st.frames.push_back(frame);
        }
        st.closed = Some(reason);
        drop(st);
        self.notify.notify_one();
    }

    /// Moves every queued frame into `out` and reports whether the outbox is closed.
    pub fn drain_into(&self, out: &mut VecDeque<Bytes>) -> Option<Close> {
        let mut st = self.lock();
        st.bytes = 0;
        if out.is_empty() {
            // The usual case: hand the whole queue over (no copy), keeping `out`'s allocation
            // (none, once the writer has given it back) for the next frames.
            std::mem::swap(out, &mut st.frames);
        } else {
            out.append(&mut st.frames);
        }
        st.closed.clone()
    }

    /// Bytes waiting in the queue (for the send-queue gauges).
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Whether the outbox has been closed (the session should end).
    pub fn closed(&self) -> Option<Close> {
        self.lock().closed.clone()
    }

    /// Waits until a frame is pushed or the outbox is closed (may wake spuriously).
    pub async fn ready(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_closes_and_keeps_what_was_queued() {
        let o = Outbox::new(10);
        assert!(o.push(Bytes::from_static(b"12345")));
        assert!(o.push(Bytes::from_static(b"12345")));
        assert!(!o.push(Bytes::from_static(b"1")));
        let mut out = VecDeque::new();
        assert_eq!(o.drain_into(&mut out), Some(Close::Overflow));
        assert_eq!(out.len(), 2);
        assert!(!o.push(Bytes::from_static(b"1")));
    }

    #[test]
    fn close_with_keeps_first_reason() {
        let o = Outbox::new(10);
        o.close_with(Some(Bytes::from_static(b"bye")), Close::Kicked);
        o.close_with(Some(Bytes::from_static(b"later")), Close::Shutdown);
        let mut out = VecDeque::new();
        assert_eq!(o.drain_into(&mut out), Some(Close::Kicked));
        assert_eq!(out, vec![Bytes::from_static(b"bye")]);
    }

    #[tokio::test]
    async fn push_wakes_a_waiting_writer() {
        let o = std::sync::Arc::new(Outbox::new(100));
        let o2 = o.clone();
        let waiter = tokio::spawn(async move { o2.ready().await });
        tokio::task::yield_now().await;
        o.push(Bytes::from_static(b"x"));
        let woke = tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await;
        assert!(matches!(woke, Ok(Ok(()))));
    }
}
