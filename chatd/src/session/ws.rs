//! A conversation's driver over a WebSocket (the browser client; `web.rs` admits the
//! connection and upgrades it). Every text message is one protocol line, without its newline,
//! in both directions (docs/protocol.md, "WebSocket"). It keeps the other drivers' properties
//! (`stream.rs`):
//!
//! - one task owns the socket; a single `select!` waits for "socket progressed", "outbox has
//!   frames", "naming deadline" and "shutdown", and every WebSocket call is a `poll_*` that
//!   either moves a whole message or registers a waker, so nothing is cancelled half-way;
//! - a drained batch of lines is encoded at once into one reusable per-session buffer, each
//!   line behind its own text-frame header, and written from there; tungstenite parses what
//!   the client sends and writes only control frames (pongs, the close), which [`Tap`] holds
//!   until the frame being written is complete;
//! - the outbox is drained only once the socket took the previous batch, so the outbox's byte
//!   bound bounds what a client that stopped reading holds;
//! - every end is a WebSocket close with a code saying why, after the last protocol line that
//!   explains it: 1000 quit, 1001 shutdown, 1002/1007 malformed frames, 1003 binary, 1008
//!   flooding (lines or pings), 1009 too long, 4000 kicked, 4001 banned, 4002 too slow a
//!   reader, 4003 no name in time, 4004 name reclaimed.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Message, Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::core::Conversation;
use super::{CLOSE_FLUSH_TIMEOUT, KEEP_QUEUE, LINGER, on_close, sleep_opt};
use crate::engine::Transport;
use crate::outbox::Close;
use crate::shared::{LimitCounters, Shared};
use chat_proto::codec::Frame as Line;
use chat_proto::protocol::{self, code, kind};

/// Pings and pongs a client may send per [`PING_WINDOW`]; more close the connection (1008).
/// Browsers send none; a keepalive every few seconds stays far below.
pub const MAX_PINGS: u32 = 20;
/// The window [`MAX_PINGS`] counts in.
pub const PING_WINDOW: Duration = Duration::from_secs(10);
/// Bytes read from the socket at a time (tungstenite keeps a buffer this size per connection).
const READ_BUFFER: usize = 1024;
/// The largest emptied control-frame buffer a session keeps.
const CONTROL_KEEP: usize = 256;

/// The WebSocket settings of a session whose lines are at most `max_line` bytes: a small read
/// buffer, control frames passed on at once (lines do not go through tungstenite), and no
/// message or frame longer than a line.
pub fn config(max_line: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(max_line))
        .max_frame_size(Some(max_line))
}

/// Close codes beyond RFC 6455's, as the page reads them (docs/protocol.md).
pub mod close_code {
    /// Kicked by an operator (after `*** KICKED <reason>`).
    pub const KICKED: u16 = 4000;
    /// Banned (a ban made while online, or found when the name was chosen).
    pub const BANNED: u16 = 4001;
    /// The client did not read and its send queue overflowed.
    pub const TOO_SLOW: u16 = 4002;
    /// No name was chosen within `limits.name-timeout`.
    pub const NAME_TIMEOUT: u16 = 4003;
    /// The name was reclaimed by a newer connection.
    pub const RECLAIMED: u16 = 4004;
}

/// Every close code a session sends (docs/protocol.md lists each; `tests/docs.rs` checks).
pub const CLOSE_CODES: &[u16] = &[
    1000,
    1001,
    1002,
    1003,
    1007,
    1008,
    1009,
    1011,
    close_code::KICKED,
    close_code::BANNED,
    close_code::TOO_SLOW,
    close_code::NAME_TIMEOUT,
    close_code::RECLAIMED,
];

/// What one turn of WebSocket I/O did.
enum Io {
    /// A message arrived.
    Message(Message),
    /// The peer's stream ended.
    Eof,
    /// Output moved and nothing was read.
    Wrote,
}

/// How the session ends.
enum End {
    /// Send this close frame (code and reason), then linger for the peer's.
    Close(u16, String),
    /// The peer sent its close: flush tungstenite's reply, then end.
    PeerClosed,
    /// The connection broke: nothing more to send.
    Gone,
}

/// The socket under the WebSocket. tungstenite reads through it; what tungstenite writes
/// (pongs, its close frame) is kept in `control` and put on the socket only between two data
/// frames, so it never lands inside a frame the session's writer has sent half of.
struct Tap<S> {
    io: S,
    /// Frames tungstenite wrote, not yet on the socket.
    control: Vec<u8>,
    /// The writer has sent part of a data frame: control bytes wait for its end.
    mid_frame: bool,
}

impl<S: AsyncWrite + Unpin> Tap<S> {
    /// Puts the control bytes on the socket; ready once they are all out.
    fn poll_control(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.control.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.control) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.control.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.control.capacity() > CONTROL_KEEP {
            self.control = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tap<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tap<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Bounded by what tungstenite writes on its own: a pong per ping (pings are limited
        // to MAX_PINGS per window) and one close frame.
        self.get_mut().control.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.mid_frame {
            // The writer sends them once its frame is out.
            return Poll::Ready(Ok(()));
        }
        match this.poll_control(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.mid_frame {
            match this.poll_control(cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// The header of an unmasked, final text frame of `len` payload bytes; returns its length.
fn text_header(len: usize, out: &mut [u8; 10]) -> usize {
    out[0] = 0x81;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if let Ok(len) = u16::try_from(len) {
        out[1] = 126;
        out[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// The length of the frame header starting `at` in `buf` (as [`text_header`] wrote it) and
/// the frame's whole length; `None` if `buf` ends inside the header.
fn frame_len(buf: &[u8], at: usize) -> Option<usize> {
    let head = buf.get(at..)?;
    let (hl, pl) = match head.get(1)? & 0x7f {
        126 => (
            4,
            usize::from(u16::from_be_bytes([*head.get(2)?, *head.get(3)?])),
        ),
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(head.get(2..10)?);
            (10, usize::try_from(u64::from_be_bytes(b)).ok()?)
        }
        n => (2, usize::from(n)),
    };
    Some(hl + pl)
}

/// The WebSocket and what only I/O touches, apart from the conversation, so one future can
/// borrow it while another waits on the conversation's outbox.
///
/// A drained batch of lines is encoded at once into one per-session buffer, each line behind
/// its 2-byte (4 for long lines) text-frame header, and the room's shared frames are dropped
/// right away: one copy of a few bytes per line, against the per-line frame handles, splits
/// and iovecs a write straight from the queue needs (a profile's top cost). The buffer goes
/// out in plain writes; a buffer grown by a burst is given back once it is out, so an idle
/// connection keeps at most [`OUT_KEEP`] bytes of it. tungstenite parses what the client
/// sends and writes only control frames, through [`Tap`], which go out between two frames.
struct Wire<S> {
    ws: WebSocketStream<Tap<S>>,
    /// Where the outbox's frames are drained to; emptied into `out` at once, so the next
    /// drain is a swap of queues (see `Outbox::drain_into`).
    pending: VecDeque<Bytes>,
    /// The encoded batch: whole text frames, one per line.
    out: Vec<u8>,
    /// Bytes of `out` already on the socket.
    out_sent: usize,
    /// The start of a frame in `out` at or before `out_sent`; moved forward only when a
    /// control frame waits for the end of the frame being written.
    frame_start: usize,
    /// The socket took bytes it has not flushed yet (a TLS layer's records).
    unflushed: bool,
    /// Bytes written since they were last counted.
    sent: u64,
}

/// The largest emptied batch buffer a session keeps (see [`Wire`]).
const OUT_KEEP: usize = 1024;

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    /// A wire over the upgraded socket, nothing pending.
    fn new(ws: WebSocketStream<Tap<S>>) -> Self {
        Wire {
            ws,
            pending: VecDeque::new(),
            out: Vec::new(),
            out_sent: 0,
            frame_start: 0,
            unflushed: false,
            sent: 0,
        }
    }

    /// Whether everything taken from the outbox has left for the socket and was flushed.
    fn idle(&self) -> bool {
        self.taken() && !self.unflushed && self.ws.get_ref().control.is_empty()
    }

    /// Whether the socket took every byte of the last batch, so the next one can be taken:
    /// what a client that stopped reading holds stays bounded by one outbox's bytes.
    fn taken(&self) -> bool {
        self.out.is_empty() && self.pending.is_empty()
    }

    /// Encodes the drained frames into `out`: each line (a frame may hold several, each
    /// ending in `\n`; one without a newline is a line as it is) becomes one text frame.
    fn encode(&mut self) {
        for frame in self.pending.drain(..) {
            let mut rest = &frame[..];
            loop {
                let (line, more) = match memchr::memchr(b'\n', rest) {
                    Some(i) => (&rest[..i], &rest[i + 1..]),
                    None => (rest, &[][..]),
                };
                let mut header = [0u8; 10];
                let hl = text_header(line.len(), &mut header);
                self.out.extend_from_slice(&header[..hl]);
                self.out.extend_from_slice(line);
                if more.is_empty() {
                    break;
                }
                rest = more;
            }
        }
        // A queue grown by a burst is given back (see `tcp.rs`).
        if self.pending.capacity() > KEEP_QUEUE {
            self.pending = VecDeque::new();
        }
    }

    /// Where the frame being written ends, moving `frame_start` up to it; `None` when
    /// `out_sent` is at a frame boundary (or `out` is malformed, which it never is).
    fn frame_end(&mut self) -> Option<usize> {
        while self.frame_start < self.out_sent {
            let end = self.frame_start + frame_len(&self.out, self.frame_start)?;
            if end > self.out_sent {
                return Some(end.min(self.out.len()));
            }
            self.frame_start = end;
        }
        None
    }

    /// Writes control frames and the encoded batch until the socket would block; returns
    /// whether anything moved.
    fn poll_write_lines(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        let mut moved = false;
        loop {
            // A control frame waits for the end of the frame being written, then goes first.
            let mut end = self.out.len();
            if !self.ws.get_ref().control.is_empty() {
                match self.frame_end() {
                    Some(frame_end) => end = frame_end,
                    None => {
                        let tap = self.ws.get_mut();
                        tap.mid_frame = false;
                        match tap.poll_control(cx) {
                            Poll::Ready(Ok(())) => {
                                moved = true;
                                self.unflushed = true;
                            }
                            Poll::Ready(Err(e)) => return Err(e),
                            Poll::Pending => return Ok(moved),
                        }
                    }
                }
            }
            if self.out_sent == self.out.len() {
                return Ok(moved);
            }
            let tap = self.ws.get_mut();
            let chunk = &self.out[self.out_sent..end];
            let wrote = match Pin::new(&mut tap.io).poll_write(cx, chunk) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(w)) => w.min(chunk.len()),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(moved),
            };
            moved = true;
            self.unflushed = true;
            self.sent += wrote as u64;
            self.out_sent += wrote;
            if self.out_sent == self.out.len() {
                // The batch is out: keep a small buffer for the next, give a burst's back.
                self.out.clear();
                self.out_sent = 0;
                self.frame_start = 0;
                if self.out.capacity() > OUT_KEEP {
                    self.out = Vec::new();
                }
                tap.mid_frame = false;
                return Ok(moved);
            }
            // Possibly inside a frame: tungstenite's own flushes leave control frames to
            // this writer, which sends them at the next frame boundary.
            tap.mid_frame = true;
        }
    }

    /// Writes the rest of the frame being written, if one is half-way out, and drops what
    /// follows it: a session ending before its batch is out (a slow reader's 4002) ends its
    /// last frame so the close frame can follow it.
    fn poll_finish_frame(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(end) = self.frame_end() {
            let chunk = &self.out[self.out_sent..end];
            match Pin::new(&mut self.ws.get_mut().io).poll_write(cx, chunk) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(w)) => {
                    let w = w.min(chunk.len());
                    self.out_sent += w;
                    self.sent += w as u64;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.out = Vec::new();
        self.out_sent = 0;
        self.frame_start = 0;
        self.ws.get_mut().mid_frame = false;
        Poll::Ready(Ok(()))
    }

    /// Writes and flushes what is pending, then reads if `read`; ready once something moved.
    fn poll_io(&mut self, cx: &mut Context<'_>, read: bool) -> Poll<Result<Io, WsError>> {
        let mut moved = self.poll_write_lines(cx)?;
        if self.out.is_empty() && self.unflushed {
            match Pin::new(&mut self.ws.get_mut().io).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    moved = true;
                    self.unflushed = false;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => {}
            }
        }
        if read {
            match Pin::new(&mut self.ws).poll_next(cx) {
                Poll::Ready(Some(Ok(message))) => return Poll::Ready(Ok(Io::Message(message))),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(Io::Eof)),
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

/// One connected browser (or other WebSocket) client.
pub struct WsSession<S> {
    wire: Wire<S>,
    /// What the client's lines mean, and its outbox.
    talk: Conversation,
    /// The close code and reason chosen by this driver (bad input), over the one the last
    /// line implies.
    close: Option<(u16, String)>,
    /// The last line the outbox held when it was closed: it explains the close.
    last_line: Option<Bytes>,
    /// Pings and pongs in the current window, and when the window started.
    pings: (u32, Instant),
    /// The rest of a message whose lines were cut short by a step that waits for the engine
    /// (a cluster's name claim): handed over once the step is done (rules in `core.rs`).
    held: Option<Bytes>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsSession<S> {
    /// A session for the upgraded connection `io` from `peer`, over `transport` (`Ws` or
    /// `Wss`); its message and frame caps are `limits.max-line-length` now.
    pub async fn new(io: S, peer: SocketAddr, transport: Transport, shared: Arc<Shared>) -> Self {
        let max_line = shared.live.load().config.limits.max_line_length.get();
        let tap = Tap {
            io,
            control: Vec::new(),
            mid_frame: false,
        };
        let ws = WebSocketStream::from_raw_socket(tap, Role::Server, Some(config(max_line))).await;
        WsSession {
            wire: Wire::new(ws),
            talk: Conversation::new(peer, transport, shared),
            close: None,
            last_line: None,
            pings: (0, Instant::now()),
            held: None,
        }
    }

    /// Runs the session to its end. Never panics on peer input; I/O errors end the session.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let name_deadline: Instant = self.talk.greet().into();
        let mut close_deadline: Option<Instant> = None;
        // This session's own token (why: see `tcp.rs`).
        let shutdown = shutdown.child_token();
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);

        let end = loop {
            // More from the outbox as soon as the socket took the last batch.
            let closed = if self.wire.taken() {
                self.take_batch()
            } else {
                self.talk.outbox().closed()
            };
            self.count_sent();
            if on_close(closed.as_ref(), &mut self.talk, &mut close_deadline) {
                break End::Close(close_code::TOO_SLOW, "too slow: send queue full".into());
            }
            if let Some(reason) = &closed
                && self.wire.idle()
            {
                // Closing: end once the last lines still in the outbox are sent too.
                self.take_batch();
                if self.wire.out.is_empty() {
                    let (code, text) = self
                        .close
                        .take()
                        .unwrap_or_else(|| close_for(reason, self.last_line.as_deref()));
                    break End::Close(code, text);
                }
                continue;
            }
            let closing = close_deadline.is_some();
            let naming = self.talk.is_naming();
            // While a step waits for the engine, the client's messages stay unread (core.rs).
            let waiting = self.talk.is_waiting();
            let wire = &mut self.wire;
            tokio::select! {
                _ = &mut cancelled, if !closing => self.talk.shut_down(),
                io = poll_fn(|cx| wire.poll_io(cx, !closing && !waiting)) => match io {
                    Ok(Io::Message(message)) => {
                        if let Some(end) = self.handle(message) {
                            break end;
                        }
                    }
                    Ok(Io::Eof) => break End::Gone,
                    Ok(Io::Wrote) => {}
                    Err(e) => {
                        if let Some(end) = self.input_error(e) {
                            break end;
                        }
                    }
                },
                _ = self.talk.outbox().ready() => {}
                _ = sleep_opt(Some(name_deadline)), if naming && !closing => {
                    self.talk.name_timed_out();
                }
                _ = sleep_opt(close_deadline), if closing => break End::Gone,
                done = self.talk.step(), if waiting => {
                    self.talk.resume(done);
                    self.handle_held();
                }
            }
        };
        self.count_sent();
        match end {
            End::Close(code, reason) => self.close_with(code, reason).await,
            End::PeerClosed => {
                let wire = &mut self.wire;
                let _ = tokio::time::timeout(LINGER, async {
                    poll_fn(|cx| wire.poll_finish_frame(cx)).await?;
                    futures::SinkExt::flush(&mut wire.ws).await
                })
                .await;
                self.count_sent();
            }
            End::Gone => {}
        }
        self.talk.finish();
    }

    /// Drains the outbox into the wire's buffer; reports whether the outbox is closed.
    fn take_batch(&mut self) -> Option<Close> {
        let closed = self.talk.outbox().drain_into(&mut self.wire.pending);
        self.note_last_line(closed.as_ref());
        self.wire.encode();
        closed
    }

    /// Adds what was handed to the WebSocket to the daemon's byte count.
    fn count_sent(&mut self) {
        if self.wire.sent > 0 {
            let sent = std::mem::take(&mut self.wire.sent);
            self.talk
                .shared()
                .activity
                .bytes_sent
                .fetch_add(sent, Ordering::Relaxed);
        }
    }

    /// Keeps the line that explains a close: the last one queued before the outbox closed
    /// (a close and its last line are one step, so the first drain that sees the close holds
    /// that line).
    fn note_last_line(&mut self, closed: Option<&Close>) {
        if closed.is_some() && self.last_line.is_none() {
            self.last_line = self.wire.pending.back().cloned();
        }
    }

    /// Handles one message from the client; returns how the session ends if it does now.
    fn handle(&mut self, message: Message) -> Option<End> {
        match message {
            Message::Text(text) => {
                let max = self
                    .talk
                    .shared()
                    .live
                    .load()
                    .config
                    .limits
                    .max_line_length
                    .get();
                if text.len() > max {
                    // The frame cap was set when the connection opened; a reload may have
                    // lowered the line cap since.
                    self.too_long(max);
                    return None;
                }
                self.held = Some(Bytes::from(text));
                self.handle_held();
            }
            Message::Binary(_) => {
                self.refuse(
                    "binary frame",
                    1003,
                    "binary messages are not accepted",
                    protocol::error_line(
                        code::BAD_UTF8,
                        "binary WebSocket messages are not accepted: send each line as text",
                    ),
                );
            }
            Message::Ping(_) | Message::Pong(_) => {
                let now = Instant::now();
                if now.duration_since(self.pings.1) > PING_WINDOW {
                    self.pings = (0, now);
                }
                self.pings.0 += 1;
                if self.pings.0 > MAX_PINGS {
                    self.refuse(
                        "ping flood",
                        1008,
                        "too many pings",
                        protocol::error_line(
                            code::FLOODING,
                            &format!(
                                "disconnected for flooding: more than {MAX_PINGS} pings within {}s",
                                PING_WINDOW.as_secs()
                            ),
                        ),
                    );
                }
            }
            // The peer closes: tungstenite queued the reply, which the end of the session
            // flushes; the peer went away like an EOF.
            Message::Close(_) => {
                debug!(peer = %self.talk.peer(), user = %self.talk.name(),
                    "WebSocket closed by the client");
                return Some(End::PeerClosed);
            }
            Message::Frame(_) => {}
        }
        None
    }

    /// Hands the lines of the held message to the conversation, until one starts a step that
    /// waits or closes the outbox. One line per message; a message with newlines in it is
    /// taken as the lines a TCP client sending the same text would have sent (a trailing
    /// newline ends the last line, it does not add an empty one), its chat lines given to the
    /// room together as a TCP read's are.
    fn handle_held(&mut self) {
        let held = &mut self.held;
        self.talk.handle_frames(|| {
            let mut rest = held.take()?;
            let line = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let line = rest.split_to(i);
                    rest.advance(1);
                    if !rest.is_empty() {
                        *held = Some(rest);
                    }
                    line
                }
                None => rest,
            };
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            Some(Line::Line(BytesMut::from(line)))
        });
    }

    /// A message longer than `limits.max-line-length`: refused with 1009.
    fn too_long(&mut self, max: usize) {
        LimitCounters::bump(&self.talk.shared().limits.line_too_long);
        self.refuse(
            "message too long",
            1009,
            "message too long",
            protocol::error_line(
                code::LINE_TOO_LONG,
                &format!(
                    "message longer than {max} bytes (limits.max-line-length); closing the connection"
                ),
            ),
        );
    }

    /// Closes the session for what the client sent: counted, logged, the member leaves with
    /// `last` as its final line, then the close frame `code`/`reason`.
    fn refuse(&mut self, what: &'static str, code: u16, reason: &str, last: Bytes) {
        let shared = self.talk.shared();
        LimitCounters::bump(&shared.limits.ws_bad_frames);
        warn!(peer = %self.talk.peer(), user = %self.talk.name(), close_code = code,
            "closing a WebSocket: {what}");
        self.close = Some((code, reason.to_owned()));
        self.talk.refuse_input(what, last);
    }

    /// A read or write failed. Returns how the session ends, or `None` to go on flushing the
    /// last line first (a refusal of malformed input).
    fn input_error(&mut self, e: WsError) -> Option<End> {
        let max = self
            .wire
            .ws
            .get_config()
            .max_message_size
            .unwrap_or(usize::MAX);
        match e {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
                self.too_long(max);
                None
            }
            WsError::Utf8(_) => {
                self.refuse(
                    "invalid UTF-8 in a text message",
                    1007,
                    "invalid UTF-8",
                    protocol::error_line(code::BAD_UTF8, "a text message was not valid UTF-8"),
                );
                None
            }
            WsError::Protocol(p) => {
                let why = p.to_string();
                self.refuse(
                    "malformed WebSocket frames",
                    1002,
                    "protocol error",
                    protocol::error_line(code::BAD_ARGUMENTS, &protocol::sanitize(&why)),
                );
                None
            }
            other => {
                debug!(peer = %self.talk.peer(), user = %self.talk.name(), error = %other,
                    "WebSocket connection error");
                Some(End::Gone)
            }
        }
    }

    /// Ends the frame being written, sends the close frame, then waits (at most [`LINGER`]
    /// after it is out) for the peer's close, so its last lines are not lost to a reset.
    async fn close_with(&mut self, code: u16, reason: String) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: cut(&reason, 123).into(),
        };
        let wire = &mut self.wire;
        let finished = tokio::time::timeout(
            CLOSE_FLUSH_TIMEOUT,
            poll_fn(|cx| wire.poll_finish_frame(cx)),
        )
        .await;
        self.count_sent();
        if !matches!(finished, Ok(Ok(()))) {
            return;
        }
        let ws = &mut self.wire.ws;
        let sent = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, ws.close(Some(frame))).await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
        let _ = tokio::time::timeout(LINGER, async {
            while let Some(Ok(message)) = futures::StreamExt::next(ws).await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// The close code and reason for an outbox closed for `reason`, whose last line was `last`.
fn close_for(reason: &Close, last: Option<&[u8]>) -> (u16, String) {
    let last = last
        .map(|l| String::from_utf8_lossy(l.strip_suffix(b"\n").unwrap_or(l)).into_owned())
        .unwrap_or_default();
    let after = |prefix: &str| last.strip_prefix(prefix).map(str::to_owned);
    let kicked = format!("{}{} ", protocol::SERVER_PREFIX, kind::KICKED);
    let err = |c: &str| format!("{}{} {c} ", protocol::SERVER_PREFIX, kind::ERR);
    match reason {
        Close::Shutdown => (1001, "server stopping".to_owned()),
        Close::Lost => (1011, "lost by the cluster".to_owned()),
        Close::Overflow => (close_code::TOO_SLOW, "too slow".to_owned()),
        // The code comes from why the room sent the member away, never from the reason's
        // text, which an operator writes.
        Close::Kicked => (close_code::KICKED, after(&kicked).unwrap_or_default()),
        Close::Banned => (close_code::BANNED, after(&kicked).unwrap_or_default()),
        Close::Replaced => (close_code::RECLAIMED, after(&kicked).unwrap_or_default()),
        // The session's own last words: the protocol's error codes, not free text.
        Close::Quit => {
            if let Some(why) = after(&err(code::NAME_TIMEOUT)) {
                (close_code::NAME_TIMEOUT, why)
            } else if let Some(why) = after(&err(code::BANNED)) {
                (close_code::BANNED, why)
            } else if let Some(why) = after(&err(code::FLOODING)) {
                (1008, why)
            } else {
                (1000, "goodbye".to_owned())
            }
        }
    }
}

/// `s` cut to at most `max` bytes at a character boundary (a close reason's limit is 123).
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_follow_the_last_line() {
        let code = |reason: Close, last: &str| close_for(&reason, Some(last.as_bytes())).0;
        assert_eq!(code(Close::Kicked, "*** KICKED spamming\n"), 4000);
        assert_eq!(
            close_for(&Close::Kicked, Some(b"*** KICKED spamming\n")).1,
            "spamming"
        );
        assert_eq!(
            code(
                Close::Replaced,
                "*** KICKED your name was reclaimed by a new connection\n"
            ),
            4004
        );
        assert_eq!(
            code(Close::Banned, "*** KICKED banned for 1h: spam\n"),
            4001
        );
        // An operator's reason that reads like a ban or a reclaim is still a kick.
        assert_eq!(
            code(Close::Kicked, "*** KICKED banned words in your nick\n"),
            4000
        );
        assert_eq!(
            code(
                Close::Kicked,
                "*** KICKED your name was reclaimed by a new connection (joke)\n"
            ),
            4000
        );
        assert_eq!(code(Close::Quit, "*** BYE goodbye\n"), 1000);
        assert_eq!(code(Close::Quit, "*** ERR name-timeout too late\n"), 4003);
        assert_eq!(code(Close::Quit, "*** ERR banned you are banned\n"), 4001);
        assert_eq!(code(Close::Quit, "*** ERR flooding disconnected\n"), 1008);
        assert_eq!(code(Close::Shutdown, "*** SHUTDOWN bye\n"), 1001);
        assert_eq!(
            code(Close::Lost, "*** ERR unavailable this server was cut off\n"),
            1011
        );
        assert_eq!(close_for(&Close::Overflow, None).0, 4002);
    }

    /// A socket that takes at most `per_call` bytes per write, would block every other
    /// write, and never has input.
    struct Trickle {
        out: Vec<u8>,
        per_call: usize,
        block: bool,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            _buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.block = !this.block;
            if this.block {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(this.per_call);
            this.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The frames in `wire` as (opcode byte, payload); unmasked, as a server sends them.
    fn frames(mut wire: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while wire.len() >= 2 {
            let (op, len7) = (wire[0], usize::from(wire[1] & 0x7f));
            let (len, at) = match len7 {
                126 => (usize::from(u16::from_be_bytes([wire[2], wire[3]])), 4),
                127 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&wire[2..10]);
                    (usize::try_from(u64::from_be_bytes(b)).unwrap_or(0), 10)
                }
                n => (n, 2),
            };
            out.push((op, wire[at..at + len].to_vec()));
            wire = &wire[at + len..];
        }
        assert!(wire.is_empty(), "trailing bytes: {wire:?}");
        out
    }

    #[tokio::test]
    async fn lines_become_whole_text_frames_and_control_frames_never_split_them() {
        let tap = Tap {
            io: Trickle {
                out: Vec::new(),
                per_call: 7,
                block: false,
            },
            control: Vec::new(),
            mid_frame: false,
        };
        let ws = WebSocketStream::from_raw_socket(tap, Role::Server, Some(config(100_000))).await;
        let mut wire = Wire::new(ws);
        let long = "x".repeat(200);
        let huge = "y".repeat(70_000);
        wire.pending.push_back(Bytes::from_static(b"a\n"));
        wire.pending.push_back(Bytes::from_static(b"b\nc\n"));
        wire.pending.push_back(Bytes::from(format!("{long}\n")));
        wire.pending.push_back(Bytes::from(format!("{huge}\n")));
        wire.encode();
        let pong = [0x8a, 0x02, b'h', b'i'];
        let mut turns = 0;
        while !wire.idle() {
            turns += 1;
            assert!(turns < 100_000, "the writer does not finish");
            // A pong queued by tungstenite half-way through the first long frame.
            if turns == 3 {
                wire.ws.get_mut().control.extend_from_slice(&pong);
            }
            let _ = poll_fn(|cx| Poll::Ready(wire.poll_io(cx, false))).await;
        }
        let out = std::mem::take(&mut wire.ws.get_mut().io.out);
        // Lines are counted as sent bytes; tungstenite's control frames are not.
        assert_eq!(wire.sent, (out.len() - pong.len()) as u64);
        let got = frames(&out);
        let texts: Vec<Vec<u8>> = got
            .iter()
            .filter(|(op, _)| *op == 0x81)
            .map(|(_, p)| p.clone())
            .collect();
        assert_eq!(
            texts,
            vec![
                b"a".to_vec(),
                b"b".to_vec(),
                b"c".to_vec(),
                long.into_bytes(),
                huge.into_bytes()
            ]
        );
        assert!(got.contains(&(0x8a, b"hi".to_vec())), "{:?}", got.len());
    }

    #[test]
    fn reasons_are_cut_at_a_character_boundary() {
        assert_eq!(cut("abc", 123), "abc");
        let long = "é".repeat(100);
        let c = cut(&long, 123);
        assert_eq!(c.len(), 122);
        assert!(c.chars().all(|ch| ch == 'é'));
    }
}
