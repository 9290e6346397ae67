//! A conversation's driver over any `AsyncRead + AsyncWrite` stream: TLS (a `tokio_rustls`
//! stream, which has no readiness API of its own to build on). It keeps the TCP driver's
//! properties (`tcp.rs`):
//!
//! - one task owns the stream without splitting it; a single `select!` waits for "stream
//!   progressed", "outbox has frames", "partial line went quiet", "naming deadline" and
//!   "shutdown";
//! - nothing is cancelled half-way: all stream I/O happens inside one `poll_fn` whose every
//!   `poll_*` call either moves bytes or registers a waker, so dropping it when another branch
//!   wins loses nothing;
//! - the outbox is drained only once the stream took the previous batch *and* flushed it (for
//!   TLS: the records left rustls's buffer for the socket), so the outbox's byte bound also
//!   bounds what a client that stopped reading holds;
//! - partial-line flush, naming deadline, `*** SHUTDOWN`, a bounded close flush and linger.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use super::{KEEP_QUEUE, LINGER, MAX_IOVECS, READ_CHUNK, Timer, on_close, sleep_opt};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::core::Conversation;
use crate::engine::Transport;
use crate::shared::Shared;
use chat_proto::codec::LineDecoder;

/// What one turn of stream I/O did.
enum Io {
    /// Bytes arrived in the decoder's buffer.
    Read,
    /// The peer closed its side.
    Eof,
    /// Output moved (written or flushed) and nothing was read.
    Wrote,
}

/// The stream with everything only I/O touches, apart from the conversation, so one future
/// can borrow it while another waits on the conversation's outbox.
struct Wire<S> {
    stream: S,
    decoder: LineDecoder,
    /// Frames taken from the outbox but not yet written; the first one is advanced past what
    /// the stream already took.
    pending: VecDeque<Bytes>,
    /// The stream took bytes it has not flushed yet (a TLS layer's records).
    unflushed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    /// Whether everything taken from the outbox has left for the socket.
    fn idle(&self) -> bool {
        self.pending.is_empty() && !self.unflushed
    }

    /// Writes and flushes what is pending, then reads if `read`; ready once something moved.
    fn poll_io(&mut self, cx: &mut Context<'_>, read: bool) -> Poll<io::Result<Io>> {
        let mut moved = false;
        while !self.pending.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (slot, frame) in slices.iter_mut().zip(&self.pending) {
                *slot = IoSlice::new(frame);
                n += 1;
            }
            match Pin::new(&mut self.stream).poll_write_vectored(cx, &slices[..n]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(wrote)) => {
                    moved = true;
                    self.unflushed = true;
                    crate::outbox::advance_frames(&mut self.pending, wrote);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if self.pending.is_empty() && self.unflushed {
            match Pin::new(&mut self.stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    moved = true;
                    self.unflushed = false;
                    // A queue grown by a burst is given back (see `tcp.rs`).
                    if self.pending.capacity() > KEEP_QUEUE {
                        self.pending = VecDeque::new();
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if read {
            // Read through a buffer on the stack and copy what came into the decoder: a read
            // polled on an idle stream waits with its buffer in hand, and reserving the
            // decoder's would keep 4 KiB per idle connection (the TCP driver reserves only once
            // the socket is readable, which a TLS stream cannot tell).
            let mut chunk = [0u8; READ_CHUNK];
            let mut buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => {
                    return Poll::Ready(Ok(Io::Eof));
                }
                Poll::Ready(Ok(())) => {
                    self.decoder.buffer_mut().extend_from_slice(buf.filled());
                    return Poll::Ready(Ok(Io::Read));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        if moved {
            Poll::Ready(Ok(Io::Wrote))
        } else {
            Poll::Pending
        }
    }
}

/// One connected client on a stream transport.
pub struct StreamSession<S> {
    wire: Wire<S>,
    /// What the client's lines mean, and its outbox.
    talk: Conversation,
    last_read: Instant,
}

impl<S: AsyncRead + AsyncWrite + Unpin> StreamSession<S> {
    /// A session for an established stream (for TLS: after the handshake).
    pub fn new(stream: S, peer: SocketAddr, transport: Transport, shared: Arc<Shared>) -> Self {
        let max_line = shared.live.load().config.limits.max_line_length.get();
        StreamSession {
            wire: Wire {
                stream,
                decoder: LineDecoder::new(max_line),
                pending: VecDeque::new(),
                unflushed: false,
            },
            talk: Conversation::new(peer, transport, shared),
            last_read: Instant::now(),
        }
    }

    /// Runs the session to its end. Never panics on peer input; I/O errors end the session.
    ///
    /// A plain function returning an `async move` block, not an `async fn`, for the reason
    /// `tcp::Session::run` gives: an `async fn` keeps `self` twice in its future, and a
    /// connected member's task is mostly this future.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would keep `self` twice in its future (see above)"
    )]
    pub fn run(mut self, shutdown: CancellationToken) -> impl Future<Output = ()> {
        async move {
            let name_deadline: Instant = self.talk.greet().into();
            let mut close_deadline: Option<Instant> = None;
            // This session's own token (why: see `tcp.rs`).
            let shutdown = shutdown.child_token();
            let cancelled = shutdown.cancelled();
            tokio::pin!(cancelled);

            let result: io::Result<()> = async {
                loop {
                    // More from the outbox only once the stream took and flushed the last batch.
                    let closed = if self.wire.idle() {
                        self.talk.outbox().drain_into(&mut self.wire.pending)
                    } else {
                        self.talk.outbox().closed()
                    };
                    if on_close(closed.as_ref(), &mut self.talk, &mut close_deadline) {
                        return Ok(());
                    }
                    if close_deadline.is_some() && self.wire.idle() {
                        // Closing: end once the last frames still in the outbox are written too.
                        self.talk.outbox().drain_into(&mut self.wire.pending);
                        if self.wire.pending.is_empty() {
                            // Boxed: its read buffer would otherwise be part of every session's
                            // future for its whole life, and it runs once, at the end.
                            Box::pin(self.linger()).await;
                            return Ok(());
                        }
                        continue;
                    }
                    let closing = close_deadline.is_some();
                    // While a step waits for the engine, the client's lines stay unread (core.rs).
                    let waiting = self.talk.is_waiting();
                    // One timer, for the nearest deadline that applies (one `Sleep` in the future
                    // instead of three).
                    let due = Timer::next(
                        close_deadline,
                        self.partial_flush_at().filter(|_| !waiting),
                        self.talk.is_naming().then_some(name_deadline),
                    );
                    let wire = &mut self.wire;
                    tokio::select! {
                        _ = &mut cancelled, if !closing => self.talk.shut_down(),
                        io = poll_fn(|cx| wire.poll_io(cx, !closing && !waiting)) => match io? {
                            Io::Eof => {
                                // A message client's last words before closing still count.
                                if let Some(frame) = self.wire.decoder.take_partial() {
                                    self.talk.handle_frame(frame);
                                }
                                return Ok(());
                            }
                            Io::Read => self.handle_input(),
                            Io::Wrote => {}
                        },
                        _ = self.talk.outbox().ready() => {}
                        _ = sleep_opt(due.map(|(at, _)| at)), if due.is_some() => {
                            if due.is_some_and(|(_, w)| w.fire(&mut self.wire.decoder, &mut self.talk)) {
                                return Ok(());
                            }
                        }
                        done = self.talk.step(), if waiting => {
                            self.talk.resume(done);
                            self.handle_input();
                        }
                    }
                }
            }
            .await;

            if let Err(e) = result {
                debug!(peer = %self.talk.peer(), user = %self.talk.name(), error = %e, "connection error");
            }
            self.talk.finish();
        }
    }

    /// Handles every complete line the last read brought (or that waited for a step).
    fn handle_input(&mut self) {
        self.last_read = Instant::now();
        let max = self
            .talk
            .shared()
            .live
            .load()
            .config
            .limits
            .max_line_length
            .get();
        self.wire.decoder.set_max_len(max);
        // The complete lines, their chat lines given to the room together.
        let decoder = &mut self.wire.decoder;
        if self.talk.handle_frames(|| decoder.next_frame()) {
            return;
        }
        self.wire.decoder.shrink_if_idle();
    }

    /// When the pending partial line of a message client is taken as complete.
    fn partial_flush_at(&self) -> Option<Instant> {
        let d = &self.wire.decoder;
        (!d.is_line_client() && d.has_partial()).then(|| {
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

    /// Ends a connection we chose to close (quit, kick, shutdown) politely: the stream's own
    /// close (TLS: close_notify, then FIN), then what the peer still sends is discarded until it
    /// closes too, for at most [`LINGER`], so its farewell line is not lost to a reset.
    async fn linger(&mut self) {
        let stream = &mut self.wire.stream;
        let _ = tokio::time::timeout(LINGER, async {
            stream.shutdown().await?;
            let mut scratch = [0u8; 1024];
            while stream.read(&mut scratch).await? > 0 {}
            Ok::<(), io::Error>(())
        })
        .await;
    }
}
