//! The TCP transport of a conversation: one task driving one socket without splitting it. It
//! waits for "readable", "writable while output is pending", "outbox has frames", "partial line
//! went quiet", "naming deadline" and "shutdown", and does non-blocking reads and writes, so
//! nothing is cancelled half-way (every I/O call is a synchronous `try_*`). What the lines mean
//! is the conversation's business (`core.rs`); this file only moves bytes and keeps time.

use std::future::{Future, poll_fn};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep, sleep_until};

use super::{KEEP_BYTES, KEEP_QUEUE, LINGER, MAX_IOVECS, READ_CHUNK, Timer, on_close};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::core::Conversation;
use crate::engine::Transport;
use crate::outbox::ByteQueue;
use crate::shared::Shared;
use chat_proto::codec::LineDecoder;

/// Polls the session's timer; pending forever without one.
fn poll_timer(timer: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> Poll<()> {
    match timer {
        Some(sleep) => sleep.as_mut().poll(cx),
        None => Poll::Pending,
    }
}

/// One connected TCP client.
pub struct Session {
    stream: TcpStream,
    /// What the client's lines mean, and its outbox.
    talk: Conversation,
    decoder: LineDecoder,
    /// What was taken from the outbox but not yet written: the outbox copies small frames into
    /// one buffer for this driver (`Outbox::copy_small_frames`), so a wake-up's lines usually go
    /// out in one `write`.
    pending: ByteQueue,
    last_read: Instant,
    /// Whether the first bytes are still to be checked for a PROXY protocol header, which a
    /// listener without `proxy-protocol` refuses.
    check_header: bool,
}

impl Session {
    /// A session for an accepted connection.
    pub fn new(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) -> Self {
        let max_line = shared.live.load().config.limits.max_line_length.get();
        let talk = Conversation::new(peer, Transport::Tcp, shared);
        talk.outbox().copy_small_frames();
        Session {
            stream,
            talk,
            decoder: LineDecoder::new(max_line),
            pending: ByteQueue::default(),
            last_read: Instant::now(),
            check_header: true,
        }
    }

    /// The connection's PROXY protocol header was already read by its listener.
    pub fn header_read(&mut self) {
        self.check_header = false;
    }

    /// Runs the session to its end, then drops `held` (what the connection holds while it
    /// lasts: its admission ticket, the open-connections count). Never panics on peer input;
    /// I/O errors end the session.
    ///
    /// A plain function returning an `async move` block, not an `async fn`: an `async fn` keeps
    /// its by-value arguments twice in its future (as passed, and moved into the body), and a
    /// wrapper `async` block that calls it keeps a third copy, while an idle connection's whole
    /// cost is mostly this future. `held` is taken here for the same reason: awaiting this in
    /// another `async` block to drop it afterwards would copy the whole future once more.
    /// `sizes::idle_session_task_is_small` holds the future's size down.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would keep `self` twice in its future (see above)"
    )]
    pub fn run<H: Send + 'static>(
        mut self,
        shutdown: CancellationToken,
        held: H,
    ) -> impl Future<Output = ()> + Send + 'static {
        async move {
            self.drive(shutdown).await;
            self.talk.finish();
            drop(held);
        }
    }

    /// The session's loop, until the connection ends (an error is logged here).
    async fn drive(&mut self, shutdown: CancellationToken) {
        let name_deadline: Instant = self.talk.greet().into();
        let mut close_deadline: Option<Instant> = None;
        // This session's own token, waited on by one future for the whole session. Polling
        // the server-wide token takes that token's locks, shared by every session on both
        // workers: a worker that stalls holding one (preempted, or its virtual CPU
        // descheduled) stalls the other one's writers too. A child token's locks are this
        // session's alone; shutdown still reaches it through the parent.
        let shutdown = shutdown.child_token();
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        // Even a child token costs two lock round trips per poll (its flag, then its `Notify`),
        // and a `select!` branch is polled on most turns: 3-4 % of the CPU of a busy fan-out.
        // So the token is polled outside the `select!`, with a waker that marks the outbox
        // signalled and wakes this task through it: once at the start (which registers it),
        // then only on a turn after that waker fired.
        let signal = self.talk.outbox().signal_waker();
        let mut poll_shutdown = true;
        // The session's one timer, set for the nearest deadline that applies (naming, a quiet
        // partial line, closing). Boxed, and there only while a deadline applies: a chatting
        // member, idle or busy, has none, and its future keeps no room for one.
        let mut timer: Option<Pin<Box<Sleep>>> = None;

        let result: io::Result<()> = async {
            loop {
                // Take more from the outbox only once the socket has taken everything drained
                // before: the outbox's byte bound then also bounds `pending`, so a client that
                // stops reading holds at most two queues' worth before its outbox overflows.
                let closed = if self.pending.is_empty() {
                    self.talk.outbox().drain_bytes(&mut self.pending)
                } else {
                    self.talk.outbox().closed()
                };
                if on_close(closed.as_ref(), &mut self.talk, &mut close_deadline) {
                    return Ok(());
                }
                self.write_pending()?;
                if close_deadline.is_some() && self.pending.is_empty() {
                    // Closing: end once the last frames still in the outbox are written too.
                    self.talk.outbox().drain_bytes(&mut self.pending);
                    if self.pending.is_empty() {
                        // Boxed: its read buffer and timer would otherwise be part of every
                        // session's future for its whole life, and it runs once, at the end.
                        Box::pin(self.linger()).await;
                        return Ok(());
                    }
                    continue;
                }
                let closing = close_deadline.is_some();
                // Taken on every turn, closing or not: a signal left set would keep
                // `poll_ready` ready, and this loop would spin.
                let signalled = self.talk.outbox().take_signal();
                if !closing
                    && (std::mem::take(&mut poll_shutdown) || signalled)
                    && cancelled
                        .as_mut()
                        .poll(&mut Context::from_waker(&signal))
                        .is_ready()
                {
                    self.talk.shut_down();
                    continue;
                }
                // While a step waits for the engine, the client's lines stay unread (core.rs).
                let waiting = self.talk.is_waiting();
                // One timer for the nearest of this turn's deadlines.
                let due = Timer::next(
                    close_deadline,
                    self.partial_flush_at().filter(|_| !waiting),
                    self.talk.is_naming().then_some(name_deadline),
                );
                let which = match due {
                    Some((at, which)) => {
                        match timer.as_mut() {
                            Some(sleep) if sleep.deadline() == at => {}
                            Some(sleep) => sleep.as_mut().reset(at),
                            None => timer = Some(Box::pin(sleep_until(at))),
                        }
                        Some(which)
                    }
                    None => {
                        timer = None;
                        None
                    }
                };
                // The outbox wakes this task itself (a waker kept under the lock its pushes
                // take anyway, not a `Notify` waiter registered and removed on every turn). It
                // is level-triggered, so it is waited on only while that can end: for new
                // frames once `pending` is written, and for a close or the shutdown signal
                // until closing (a closing session waits for its socket or its deadline; a
                // closed outbox would be ready on every turn).
                let idle = self.pending.is_empty();
                // One readiness wait for both directions: reading unless closing or waiting,
                // writing while output is pending.
                let reading = !closing && !waiting;
                let interest = match (reading, idle) {
                    (true, true) => Some(Interest::READABLE),
                    (true, false) => Some(Interest::READABLE | Interest::WRITABLE),
                    (false, false) => Some(Interest::WRITABLE),
                    (false, true) => None,
                };
                tokio::select! {
                    ready = self.stream.ready(interest.unwrap_or(Interest::READABLE)), if interest.is_some() => {
                        // Writable: the next turn writes. Readable (or the peer's end of
                        // file, or an error, which the read reports): read now.
                        let ready = ready?;
                        if reading && ready.is_readable() && !self.read_available()? {
                            return Ok(());
                        }
                    }
                    _ = poll_fn(|cx| self.talk.outbox().poll_ready(cx, idle)), if !closing => {}
                    _ = poll_fn(|cx| poll_timer(&mut timer, cx)), if which.is_some() => {
                        if which.is_some_and(|w| w.fire(&mut self.decoder, &mut self.talk)) {
                            return Ok(());
                        }
                    }
                    done = self.talk.step(), if waiting => {
                        self.talk.resume(done);
                        self.handle_held();
                    }
                }
            }
        }
        .await;

        if let Err(e) = result {
            debug!(peer = %self.talk.peer(), user = %self.talk.name(), error = %e, "connection error");
        }
    }

    /// When the pending partial line of a message client is taken as complete.
    fn partial_flush_at(&self) -> Option<Instant> {
        (!self.decoder.is_line_client() && self.decoder.has_partial()).then(|| {
            self.last_read
                + self
                    .talk
                    .shared()
                    .live
                    .load()
                    .config
                    .server
                    .partial_line_flush
        })
    }

    /// Reads what the socket has and handles every complete line. Returns `false` at EOF.
    fn read_available(&mut self) -> io::Result<bool> {
        self.decoder.set_max_len(
            self.talk
                .shared()
                .live
                .load()
                .config
                .limits
                .max_line_length
                .get(),
        );
        // Bounded per wake-up so one fast sender cannot monopolise this worker thread.
        for _ in 0..16 {
            let buf = self.decoder.buffer_mut();
            buf.reserve(READ_CHUNK);
            match self.stream.try_read_buf(buf) {
                Ok(0) => {
                    // A message client's last words before closing still count.
                    if let Some(frame) = self.decoder.take_partial() {
                        self.talk.handle_frame(frame);
                    }
                    return Ok(false);
                }
                Ok(_) => {
                    self.last_read = Instant::now();
                    if std::mem::take(&mut self.check_header)
                        && crate::proxy::looks_like_header(self.decoder.buffer_mut())
                    {
                        self.talk.unexpected_proxy_header("server");
                        return Ok(false);
                    }
                    // The read's complete lines, its chat lines given to the room together.
                    let decoder = &mut self.decoder;
                    if self.talk.handle_frames(|| decoder.next_frame()) {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        self.decoder.shrink_if_idle();
        Ok(true)
    }

    /// Hands over the complete lines read while a step waited, until the next one waits.
    fn handle_held(&mut self) {
        let decoder = &mut self.decoder;
        self.talk.handle_frames(|| decoder.next_frame());
    }

    /// Ends a connection we chose to close (quit, kick, shutdown) politely. Closing a socket
    /// with unread input makes the kernel send a reset, and a reset can make the peer lose the
    /// farewell line still in its receive buffer. So: FIN after the last frame, then discard
    /// what the peer still sends until it closes too, for at most [`LINGER`].
    async fn linger(&mut self) {
        if socket2::SockRef::from(&self.stream)
            .shutdown(std::net::Shutdown::Write)
            .is_err()
        {
            return;
        }
        let deadline = Instant::now() + LINGER;
        let mut scratch = [0u8; 1024];
        loop {
            tokio::select! {
                ready = self.stream.readable() => {
                    if ready.is_err() {
                        return;
                    }
                    match self.stream.try_read(&mut scratch) {
                        Ok(0) => return,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
                _ = sleep_until(deadline) => return,
            }
        }
    }

    /// Writes as much pending output as the socket takes without blocking.
    fn write_pending(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let n = self.pending.io_slices(&mut slices);
            // Usually one slice (the copied lines): a plain `write`.
            let result = match &slices[..n] {
                [one] => self.stream.try_write(one),
                many => self.stream.try_write_vectored(many),
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(wrote) => {
                    self.talk
                        .shared()
                        .activity
                        .bytes_sent
                        .fetch_add(wrote as u64, std::sync::atomic::Ordering::Relaxed);
                    self.pending.advance(wrote);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        // Everything is written. These buffers go back to the outbox on the next drain (a
        // swap), so keeping small ones spares the room an allocation, under its lock, on the
        // next push to this member; buffers grown by a burst are given back.
        self.pending.trim(KEEP_QUEUE, KEEP_BYTES);
        Ok(())
    }
}

#[cfg(test)]
mod sizes {
    use super::*;
    use crate::config::Config;

    /// An idle connection costs little more than its task, which holds this future inline: a
    /// guard against making it large again (a buffer, a timer or an awaited call kept across
    /// the session's wait; see `Session::run`). About 2.3 KB before this guard, with the
    /// wrapper that spawned it 2.7 KB.
    #[tokio::test]
    async fn idle_session_task_is_small() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let shared = Arc::new(Shared::for_test(dir.path(), Config::default()));
        let (stream, peer, _client) = crate::session::accepted_tcp().await;
        let session = Session::new(stream, peer, shared);
        let held = [0u64; 5]; // the size of what the listener hands over (`OpenTcp`)
        let task = session.run(CancellationToken::new(), held);
        let size = std::mem::size_of_val(&task);
        eprintln!(
            "session {} B, its task's future {size} B",
            std::mem::size_of::<Session>()
        );
        assert!(size <= 1024, "the TCP session's future is {size} bytes");
    }
}
