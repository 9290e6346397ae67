//! A client's bounded outbound queue: the only way frames reach a session's socket.
//!
//! The room pushes already-encoded frames while holding its lock; the session's writer drains
//! everything queued at once and writes it with one call. The queue is bounded in bytes: a push
//! that would exceed the bound closes the outbox as [`Close::Overflow`] instead of growing
//! memory or making the sender wait, so one stalled reader can never slow the room down.
//!
//! Two ways to queue and drain, chosen by the session's driver:
//!
//! - **Frames** (the default): every frame is queued as it was pushed, a shared `Bytes`, and
//!   [`Outbox::drain_into`] hands them over one by one, so a driver that needs each line on its
//!   own (TLS records, one WebSocket message per line) gets exactly what was pushed.
//! - **Bytes** ([`Outbox::copy_small_frames`], the TCP driver): frames of up to [`COPY_MAX`]
//!   bytes are copied into one contiguous buffer, longer ones (storm batches, history) still
//!   queued shared; [`Outbox::drain_bytes`] swaps the whole queue into the writer's
//!   [`ByteQueue`], which writes it with one `write` (or one `writev` around shared frames).
//!   Copying a chat line of ~50 bytes costs less than what sharing it costs per recipient: an
//!   atomic increment on the frame's one reference count, which every recipient's push and
//!   every writer's drop on both workers touch, and a queue entry of 32 bytes per line.
//!
//! The byte bound is the same in both: the sum of the queued frames' lengths. In the bytes way
//! the buffer's capacity never exceeds the bound either (it grows by doubling up to it).

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use bytes::{Buf, Bytes};
use futures::task::AtomicWaker;
use tokio::sync::Notify;

/// Longest frame a byte-queue outbox ([`Outbox::copy_small_frames`]) copies; longer frames
/// are queued shared. Chat lines are ~30-200 bytes; presence batches and history are longer.
pub const COPY_MAX: usize = 512;

/// The largest byte buffer a busy member keeps between wake-ups (see [`ByteQueue::trim`]).
pub const KEEP_MAX: usize = 64 * 1024;

/// Smallest capacity of a byte queue's buffer once it holds anything: a greeting plus a line
/// or two, without a reallocation per line.
const MIN_BUFFER: usize = 128;

/// Why an outbox was closed; the session ends once it has flushed what was queued before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// The client asked to leave.
    Quit,
    /// An admin kicked the client.
    Kicked,
    /// An admin banned the client while it was online.
    Banned,
    /// Its name was reclaimed by a new connection (with the reclaim token).
    Replaced,
    /// The client did not read and its queue exceeded the limit.
    Overflow,
    /// The server is shutting down.
    Shutdown,
    /// A clustered room lost the member: this server was cut off from the others for longer
    /// than `cluster.node-timeout` and its name was taken meanwhile.
    Lost,
}

#[derive(Debug, Default)]
struct State {
    /// Frames queued shared, in order; in the bytes way all of them come before `copied`.
    frames: VecDeque<Bytes>,
    /// The bytes way: small frames copied, after everything in `frames`.
    copied: Vec<u8>,
    /// Sum of the queued frames' lengths (`frames` and `copied`).
    bytes: usize,
    closed: Option<Close>,
    /// Whether small frames are copied into `copied` ([`Outbox::copy_small_frames`]).
    copy: bool,
}

impl State {
    fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.copied.is_empty()
    }

    /// Appends `frame` (no bound check): copied if small and the outbox copies, else shared.
    fn enqueue(&mut self, frame: &Bytes, limit: usize) {
        self.bytes += frame.len();
        if self.copy && frame.len() <= COPY_MAX {
            grow_within(&mut self.copied, frame.len(), limit);
            self.copied.extend_from_slice(frame);
        } else {
            self.seal();
            self.frames.push_back(frame.clone());
        }
    }

    /// Moves the copied bytes to the end of `frames` (as one frame), so that a frame queued
    /// after them stays after them.
    fn seal(&mut self) {
        if !self.copied.is_empty() {
            let chunk = std::mem::take(&mut self.copied);
            self.frames.push_back(Bytes::from(chunk));
        }
    }
}

/// Makes room in `buf` for `more` bytes: at least doubling (from [`MIN_BUFFER`]) to keep
/// appends amortised, but never past `limit`, the outbox's byte bound (a push past it is refused
/// before this is reached, except a closing frame, which may exceed it by its own length).
fn grow_within(buf: &mut Vec<u8>, more: usize, limit: usize) {
    let need = buf.len() + more;
    if need <= buf.capacity() {
        return;
    }
    let target = (buf.capacity() * 2).max(MIN_BUFFER).min(limit).max(need);
    buf.reserve_exact(target - buf.len());
}

/// Drops the first `n` bytes of `frames` (they were written), whole frames and then part of
/// the next; returns how many of the `n` were past the last frame.
pub fn advance_frames(frames: &mut VecDeque<Bytes>, mut n: usize) -> usize {
    while n > 0 {
        let Some(front) = frames.front_mut() else {
            break;
        };
        if n >= front.len() {
            n -= front.len();
            frames.pop_front();
        } else {
            front.advance(n);
            n = 0;
        }
    }
    n
}

/// What a byte-queue writer holds between [`Outbox::drain_bytes`] and the socket: shared frames,
/// then copied bytes, in the order they were queued, with what is already written removed.
#[derive(Debug, Default)]
pub struct ByteQueue {
    frames: VecDeque<Bytes>,
    copied: Vec<u8>,
    /// How much of `copied` is already written.
    written: usize,
    /// How many copied bytes the last drain brought (none: the member keeps no buffer).
    last_drain: usize,
}

impl ByteQueue {
    /// Whether everything drained has been written.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty() && self.written == self.copied.len()
    }

    /// Bytes still to write.
    pub fn len(&self) -> usize {
        self.frames.iter().map(Bytes::len).sum::<usize>() + self.copied.len() - self.written
    }

    /// Fills `out` with the next bytes to write, in order; returns how many slices it filled.
    pub fn io_slices<'a>(&'a self, out: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        let rest = &self.copied[self.written..];
        let copied = (!rest.is_empty()).then_some(rest);
        for slice in self.frames.iter().map(|f| &f[..]).chain(copied) {
            let Some(slot) = out.get_mut(n) else { break };
            *slot = IoSlice::new(slice);
            n += 1;
        }
        n
    }

    /// Drops the first `n` bytes (they were written).
    pub fn advance(&mut self, n: usize) {
        let rest = advance_frames(&mut self.frames, n);
        if rest > 0 {
            self.written = (self.written + rest).min(self.copied.len());
        }
        if self.frames.is_empty() && self.written == self.copied.len() {
            self.copied.clear();
            self.written = 0;
        }
    }

    /// Once everything is written, gives back buffers grown past `frames` queue entries, the
    /// byte buffer of a member whose last drain brought no copied bytes,
    /// and a byte buffer larger than both `bytes` and twice what the last drain brought (or
    /// than [`KEEP_MAX`]); other ones are kept, since the next drain hands them to the outbox
    /// (a swap) and the room's next push to this member then needs no allocation. A busy
    /// member's buffer thus follows what its wake-ups carry: giving back every buffer past a
    /// fixed 4 KiB made a member whose wake-ups bring more grow a new one from 128 bytes on
    /// every burst, six reallocations under the room's lock (7 % of a 1,000-member fan-out's
    /// CPU on a quiet machine).
    pub fn trim(&mut self, frames: usize, bytes: usize) {
        if !self.is_empty() {
            return;
        }
        if self.frames.capacity() > frames {
            self.frames = VecDeque::new();
        }
        let keep = bytes.max(2 * self.last_drain).min(KEEP_MAX);
        if self.copied.capacity() > keep || self.last_drain == 0 {
            self.copied = Vec::new();
        }
    }

    /// Moves what is left of the copied bytes to the end of `frames` (one copy), leaving
    /// `copied` empty.
    fn seal(&mut self) {
        if self.written < self.copied.len() {
            let rest = Bytes::copy_from_slice(&self.copied[self.written..]);
            self.frames.push_back(rest);
        }
        self.copied.clear();
        self.written = 0;
    }
}

/// The bounded queue between the room and one session's writer.
#[derive(Debug)]
pub struct Outbox {
    // A std mutex: every critical section is a few pointer moves and never awaits.
    state: Mutex<State>,
    notify: Notify,
    limit: usize,
    /// Set when the waker of [`Outbox::signal_waker`] is woken; see there.
    signalled: AtomicBool,
    /// The writer waiting in [`Outbox::poll_ready`], woken by the push that makes the queue
    /// non-empty, by a close and by the signal. Outside the mutex, with the two flags below,
    /// so that the writer's wait takes no lock the room's pushes need.
    waker: AtomicWaker,
    /// Whether the queue holds anything: set by the push into an empty queue, cleared by a
    /// drain (both under the mutex); read without it by [`Outbox::poll_ready`].
    queued: AtomicBool,
    /// Whether the outbox is closed (set under the mutex, read without it).
    is_closed: AtomicBool,
}

impl Outbox {
    /// An empty outbox holding at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            limit,
            signalled: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            queued: AtomicBool::new(false),
            is_closed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves the queue itself consistent (push and drain
        // are a few moves and appends, and only an allocation failure, which aborts, can stop
        // one half-way), so a poisoned lock is safe to keep using.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Copies small frames into one contiguous buffer from now on, for a writer that drains
    /// with [`Outbox::drain_bytes`] (see the module documentation). Call it before the first
    /// push; frames already queued keep their place.
    pub fn copy_small_frames(&self) {
        self.lock().copy = true;
    }

    /// Queues a frame. Returns `false` if the frame was not queued: the outbox is closed, or
    /// this push overflowed it (it is then closed as [`Close::Overflow`]).
    pub fn push(&self, frame: Bytes) -> bool {
        self.push_ref(&frame)
    }

    /// [`Outbox::push`] for a frame the caller keeps (a broadcast's): it is cloned only if it is
    /// queued shared, so a copying outbox takes a small frame without touching its reference
    /// count.
    pub fn push_ref(&self, frame: &Bytes) -> bool {
        let mut st = self.lock();
        if st.closed.is_some() {
            return false;
        }
        if st.bytes + frame.len() > self.limit {
            st.closed = Some(Close::Overflow);
            self.is_closed.store(true, Ordering::Release);
            drop(st);
            self.notify();
            return false;
        }
        let first = st.is_empty();
        st.enqueue(frame, self.limit);
        if first {
            self.queued.store(true, Ordering::Release);
        }
        drop(st);
        // Only the push that makes the queue non-empty needs to wake the writer: the writer
        // drains the whole queue, so later pushes are picked up by that same drain.
        if first {
            self.notify();
        }
        true
    }

    /// Wakes the writer: through its waker if it waits in [`Outbox::poll_ready`], else through
    /// the `Notify` that [`Outbox::ready`] waits on (which keeps a permit if nobody waits yet).
    /// Called after the flag that says why is set.
    fn notify(&self) {
        match self.waker.take() {
            Some(w) => w.wake(),
            None => self.notify.notify_one(),
        }
    }

    /// Queues a last frame (even past the byte limit) and closes the outbox. A second close
    /// keeps the first reason and drops the frame.
    pub fn close_with(&self, last: Option<Bytes>, reason: Close) {
        let mut st = self.lock();
        if st.closed.is_some() {
            return;
        }
        if let Some(frame) = last {
            // Past the bound by at most this frame: grow the buffer for it alone.
            let limit = st.bytes + frame.len();
            st.enqueue(&frame, limit);
        }
        st.closed = Some(reason);
        self.is_closed.store(true, Ordering::Release);
        drop(st);
        self.notify();
    }

    /// Moves every queued frame into `out` and reports whether the outbox is closed. Each
    /// frame comes out as it was pushed (a driver that needs lines one by one relies on it);
    /// on an outbox that copies small frames, the copied ones come out joined, as one frame.
    pub fn drain_into(&self, out: &mut VecDeque<Bytes>) -> Option<Close> {
        let mut st = self.lock();
        st.bytes = 0;
        self.queued.store(false, Ordering::Relaxed);
        st.seal();
        if out.is_empty() {
            // The usual case: hand the whole queue over (no copy), keeping `out`'s allocation
            // (none, once the writer has given it back) for the next frames.
            std::mem::swap(out, &mut st.frames);
        } else {
            out.append(&mut st.frames);
        }
        st.closed.clone()
    }

    /// Moves everything queued into `out`, after what `out` still holds, and reports whether
    /// the outbox is closed: the byte-queue writer's drain ([`Outbox::copy_small_frames`]).
    /// When `out` is empty (the writer wrote everything) this is two swaps: the writer takes
    /// the queue and gives its emptied buffers back for the next pushes.
    pub fn drain_bytes(&self, out: &mut ByteQueue) -> Option<Close> {
        let mut st = self.lock();
        st.bytes = 0;
        self.queued.store(false, Ordering::Relaxed);
        if out.is_empty() {
            std::mem::swap(&mut out.frames, &mut st.frames);
        } else {
            // Rare (the TCP driver drains only once the socket took everything): keep the
            // order, what `out` holds first, by turning its unwritten bytes into a frame.
            out.seal();
            out.frames.append(&mut st.frames);
        }
        let drained = st.copied.len();
        out.copied.clear();
        out.written = 0;
        out.last_drain = drained;
        std::mem::swap(&mut out.copied, &mut st.copied);
        if drained == 0 {
            // Nothing was copied (only shared frames: a storm's batches, history): no byte
            // buffer is kept on either side. Any copied line keeps both, swapped between the
            // outbox and the writer: with a threshold of 512 bytes, a member whose writer
            // keeps up (a few lines per wake-up, as a quiet machine gives at 1,000 members)
            // gave them back after every write and the room grew a new one from 128 bytes,
            // under its lock, on the next push (7-10 % of a 1,000-member fan-out's CPU). The
            // price is up to two small buffers (~400 bytes) kept by an idle member that was
            // last sent a line.
            st.copied = Vec::new();
            out.copied = Vec::new();
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

    /// Ready once the outbox is closed, or signalled ([`Outbox::signal_waker`]), or, with
    /// `frames`, once it holds something to drain; otherwise keeps `cx`'s waker, which the next
    /// push into the empty queue (or a close, or the signal) wakes. Unlike [`Outbox::ready`]
    /// this is level-triggered and needs no `Notify` waiter list, and it takes no lock (an
    /// atomic waker and three flags), so the writer's waits never contend with the room's
    /// pushes for the queue's mutex. Meant for one writer task; a writer that waits here must
    /// not also wait in [`Outbox::ready`] (a push wakes one of them).
    pub fn poll_ready(&self, cx: &mut Context<'_>, frames: bool) -> Poll<()> {
        // Register first, then look: a change made after the look wakes the waker registered
        // before it (the changing side sets its flag, then takes the waker).
        self.waker.register(cx.waker());
        if self.is_closed.load(Ordering::Acquire)
            || self.signalled.load(Ordering::Acquire)
            || (frames && self.queued.load(Ordering::Acquire))
        {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// A waker that marks this outbox signalled and wakes the writer waiting in
    /// [`Outbox::poll_ready`]. A writer polls a rare event's future (the shutdown token) with it
    /// once, and then again only when [`Outbox::take_signal`] says it was woken, instead of on
    /// every turn of its loop: the token's check takes its lock, this one reads a flag on a line
    /// the writer touches anyway. Costs no allocation (the waker is this outbox's `Arc`).
    pub fn signal_waker(self: &Arc<Self>) -> Waker {
        Waker::from(Arc::clone(self))
    }

    /// Whether the waker of [`Outbox::signal_waker`] was woken since the last call.
    pub fn take_signal(&self) -> bool {
        self.signalled.load(Ordering::Relaxed) && self.signalled.swap(false, Ordering::Acquire)
    }
}

impl Wake for Outbox {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.signalled.store(true, Ordering::Release);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
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

    /// Everything a byte-queue writer would write, in order, and how many slices it takes.
    fn written(q: &ByteQueue) -> (Vec<u8>, usize) {
        let mut slices = [IoSlice::new(&[]); 64];
        let n = q.io_slices(&mut slices);
        (
            slices[..n].iter().flat_map(|s| s.iter().copied()).collect(),
            n,
        )
    }

    fn copying(limit: usize) -> Outbox {
        let o = Outbox::new(limit);
        o.copy_small_frames();
        o
    }

    #[test]
    fn small_frames_are_copied_into_one_slice_and_large_ones_keep_their_place() {
        let o = copying(1 << 16);
        let big = Bytes::from(vec![b'x'; COPY_MAX + 1]);
        for f in [&b"a: 1\n"[..], b"b: 2\n"] {
            assert!(o.push(Bytes::copy_from_slice(f)));
        }
        assert!(o.push_ref(&big));
        assert!(o.push(Bytes::from_static(b"c: 3\n")));
        let mut q = ByteQueue::default();
        assert_eq!(o.drain_bytes(&mut q), None);
        let (bytes, slices) = written(&q);
        let mut want = b"a: 1\nb: 2\n".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"c: 3\n");
        assert_eq!(bytes, want);
        // The two copied lines before the large frame, the frame itself (shared), the last line.
        assert_eq!(slices, 3);
        assert_eq!(q.len(), want.len());
        assert_eq!(o.queued_bytes(), 0);
    }

    #[test]
    fn a_copied_frame_is_not_shared() {
        let o = copying(1 << 16);
        let line = Bytes::from(b"alice: hi\n".to_vec());
        assert!(o.push_ref(&line));
        // Copied, not cloned: the broadcast's frame is still the only handle on its bytes.
        assert!(line.is_unique());
        let frames = Outbox::new(1 << 16);
        assert!(frames.push_ref(&line));
        assert!(!line.is_unique());
    }

    #[test]
    fn the_byte_bound_is_the_same_when_copying_and_the_buffer_never_exceeds_it() {
        for copy in [false, true] {
            let o = Outbox::new(1000);
            if copy {
                o.copy_small_frames();
            }
            let line = Bytes::from_static(b"0123456789012345678\n");
            let mut pushed = 0;
            while o.push_ref(&line) {
                pushed += 1;
            }
            assert_eq!(pushed, 50, "copy={copy}");
            assert_eq!(o.closed(), Some(Close::Overflow));
            assert_eq!(o.queued_bytes(), 1000);
            assert!(o.lock().copied.capacity() <= 1000, "copy={copy}");
            // Closed: nothing more is taken, and the writer is told why.
            assert!(!o.push_ref(&line));
            let mut q = ByteQueue::default();
            assert_eq!(o.drain_bytes(&mut q), Some(Close::Overflow));
            assert_eq!(q.len(), 1000);
        }
    }

    #[test]
    fn drain_into_still_gives_each_frame_as_pushed() {
        // The line-preserving drain other drivers (TLS, WebSocket) use: unchanged.
        let o = Outbox::new(1 << 16);
        let lines = [&b"*** JOIN a joined\n"[..], b"a: hi\n", b"a: there\n"];
        for l in lines {
            assert!(o.push_ref(&Bytes::copy_from_slice(l)));
        }
        let mut out = VecDeque::new();
        assert_eq!(o.drain_into(&mut out), None);
        assert_eq!(out.iter().map(|b| &b[..]).collect::<Vec<_>>(), lines);
        // On a copying outbox, copied lines come out joined but in order.
        let c = copying(1 << 16);
        let big = Bytes::from(vec![b'y'; COPY_MAX + 10]);
        c.push_ref(&Bytes::from_static(b"1\n"));
        c.push_ref(&big);
        c.push_ref(&Bytes::from_static(b"2\n"));
        c.push_ref(&Bytes::from_static(b"3\n"));
        let mut out = VecDeque::new();
        c.drain_into(&mut out);
        assert_eq!(out.len(), 3);
        assert_eq!((&out[0][..], &out[2][..]), (&b"1\n"[..], &b"2\n3\n"[..]));
        assert_eq!(out[1], big);
    }

    #[test]
    fn partial_writes_and_a_drain_into_a_busy_queue_keep_the_order() {
        let o = copying(1 << 16);
        let big = Bytes::from(vec![b'z'; COPY_MAX + 3]);
        let mut want = Vec::new();
        let mut q = ByteQueue::default();
        let mut got = Vec::new();
        for round in 0..20u8 {
            let line = Bytes::from(format!("u{round}: {}\n", "m".repeat(round as usize)));
            o.push_ref(&line);
            want.extend_from_slice(&line);
            if round % 7 == 3 {
                o.push_ref(&big);
                want.extend_from_slice(&big);
            }
            // Drained while the writer still holds unwritten bytes, in most rounds.
            o.drain_bytes(&mut q);
            // The socket takes 7 bytes at a time.
            let (bytes, _) = written(&q);
            let take = bytes.len().min(7);
            got.extend_from_slice(&bytes[..take]);
            q.advance(take);
        }
        o.drain_bytes(&mut q);
        while !q.is_empty() {
            let (bytes, _) = written(&q);
            let take = bytes.len().min(7);
            got.extend_from_slice(&bytes[..take]);
            q.advance(take);
        }
        assert_eq!(got, want);
    }

    #[test]
    fn a_member_sent_nothing_copied_keeps_no_buffer_and_a_busy_one_keeps_two() {
        let o = copying(1 << 16);
        let mut q = ByteQueue::default();
        // A greeting, written: its small buffer is kept for the next line.
        o.push(Bytes::from_static(b"hello\n"));
        o.drain_bytes(&mut q);
        q.advance(6);
        q.trim(8, 4096);
        assert!(q.is_empty());
        assert_eq!(
            (q.copied.capacity(), o.lock().copied.capacity()),
            (MIN_BUFFER, 0)
        );
        // A storm's shared batch copies nothing: no byte buffer is kept anywhere.
        o.push(Bytes::from(vec![b'j'; COPY_MAX + 1]));
        o.drain_bytes(&mut q);
        q.advance(q.len());
        q.trim(8, 4096);
        assert_eq!((q.copied.capacity(), o.lock().copied.capacity()), (0, 0));
        // Busy: every wake-up brings a copied line; the two buffers are kept and
        // swapped, so the pushes of the next rounds allocate nothing.
        let line = Bytes::from_static(b"0123456789012345678\n");
        let mut caps = Vec::new();
        for _ in 0..4 {
            o.push_ref(&line);
            o.drain_bytes(&mut q);
            q.advance(q.len());
            q.trim(8, 4096);
            caps.push((q.copied.capacity(), o.lock().copied.capacity()));
        }
        assert!(caps[1..].iter().all(|&(w, b)| w > 0 && b > 0), "{caps:?}");
        // A burst past 4 KiB: its buffer, grown to fit, is kept while wake-ups bring that
        // much, so the next such burst grows nothing under the room's lock...
        for _ in 0..300 {
            o.push_ref(&line);
        }
        o.drain_bytes(&mut q);
        q.advance(q.len());
        q.trim(8, 4096);
        let big = q.copied.capacity();
        assert!((6000..=12_000).contains(&big), "{big}");
        assert!(q.frames.capacity() <= 8);
        // ...and given back once they bring much less: two wake-ups later (the buffers swap
        // at each drain) neither side holds more than 4 KiB.
        for _ in 0..2 {
            o.push_ref(&line);
            o.drain_bytes(&mut q);
            q.advance(q.len());
            q.trim(8, 4096);
        }
        let (w, b) = (q.copied.capacity(), o.lock().copied.capacity());
        assert!(w <= 4096 && b <= 4096, "{w} {b}");
        // However much a wake-up brings, no buffer past KEEP_MAX is kept.
        let o = copying(1 << 20);
        let mut q = ByteQueue::default();
        for _ in 0..(2 * KEEP_MAX / line.len()) {
            o.push_ref(&line);
        }
        o.drain_bytes(&mut q);
        q.advance(q.len());
        q.trim(8, 4096);
        assert_eq!(q.copied.capacity(), 0);
    }

    /// A waker that counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn poll_ready_is_woken_by_the_first_push_and_by_a_close() {
        use std::sync::atomic::Ordering::SeqCst;
        let count = Arc::new(Count(0.into()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let o = copying(100);
        assert!(o.poll_ready(&mut cx, true).is_pending());
        assert!(o.push(Bytes::from_static(b"1\n")));
        assert_eq!(count.0.load(SeqCst), 1);
        // Only the push into an empty queue wakes; the writer drains everything at once.
        assert!(o.push(Bytes::from_static(b"2\n")));
        assert_eq!(count.0.load(SeqCst), 1);
        assert!(o.poll_ready(&mut cx, true).is_ready());
        // A writer still busy with earlier bytes is not ready for more, but is for a close.
        assert!(o.poll_ready(&mut cx, false).is_pending());
        o.close_with(None, Close::Kicked);
        assert_eq!(count.0.load(SeqCst), 2);
        assert!(o.poll_ready(&mut cx, false).is_ready());
        // An overflow wakes too.
        let o = copying(4);
        assert!(o.poll_ready(&mut cx, true).is_pending());
        assert!(!o.push(Bytes::from_static(b"12345")));
        assert_eq!(count.0.load(SeqCst), 3);
        assert!(o.poll_ready(&mut cx, false).is_ready());
    }

    #[test]
    fn a_signal_wakes_the_writer_and_is_taken_once() {
        use std::sync::atomic::Ordering::SeqCst;
        let count = Arc::new(Count(0.into()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let o = Arc::new(copying(100));
        assert!(!o.take_signal());
        assert!(o.poll_ready(&mut cx, true).is_pending());
        // What a cancelled token does with the waker it was polled with.
        o.signal_waker().wake();
        assert_eq!(count.0.load(SeqCst), 1);
        // The writer's wait ends, so that its loop comes round and takes the signal.
        assert!(o.poll_ready(&mut cx, false).is_ready());
        assert!(o.take_signal());
        assert!(!o.take_signal());
        // Nothing was queued or closed by it.
        assert!(o.poll_ready(&mut cx, true).is_pending());
        assert_eq!(o.closed(), None);
    }

    #[tokio::test]
    async fn a_cancelled_token_reaches_the_writer_through_its_outbox() {
        let o = Arc::new(copying(100));
        let token = tokio_util::sync::CancellationToken::new();
        let cancelled = token.cancelled();
        tokio::pin!(cancelled);
        let signal = o.signal_waker();
        let mut cx = Context::from_waker(&signal);
        assert!(cancelled.as_mut().poll(&mut cx).is_pending());
        let o2 = o.clone();
        let writer = tokio::spawn(async move {
            std::future::poll_fn(|cx| o2.poll_ready(cx, true)).await;
        });
        tokio::task::yield_now().await;
        token.cancel();
        let woke = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            // The writer is woken (ready() does not say why; the signal does).
            loop {
                if o.take_signal() {
                    break;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(woke.is_ok());
        assert!(cancelled.as_mut().poll(&mut cx).is_ready());
        writer.abort();
    }

    /// The TCP driver's loop in miniature: the token is polled only at the top of the loop
    /// and only after its waker fired, while the task waits in `poll_ready`, which must then
    /// return so that the loop comes round.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_token_reaches_a_writer_waiting_in_poll_ready() {
        let o = Arc::new(copying(100));
        let parent = tokio_util::sync::CancellationToken::new();
        let p2 = parent.clone();
        let o2 = o.clone();
        let task = tokio::spawn(async move {
            let shutdown = p2.child_token();
            let cancelled = shutdown.cancelled();
            tokio::pin!(cancelled);
            let signal = o2.signal_waker();
            let mut first = true;
            loop {
                if (std::mem::take(&mut first) | o2.take_signal())
                    && cancelled
                        .as_mut()
                        .poll(&mut Context::from_waker(&signal))
                        .is_ready()
                {
                    return "cancelled";
                }
                tokio::select! {
                    _ = std::future::poll_fn(|cx| o2.poll_ready(cx, true)) => {}
                    _ = tokio::time::sleep(std::time::Duration::from_secs(100)) => {}
                }
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        parent.cancel();
        let r = tokio::time::timeout(std::time::Duration::from_secs(3), task).await;
        assert!(matches!(r, Ok(Ok("cancelled"))), "{r:?}");
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
