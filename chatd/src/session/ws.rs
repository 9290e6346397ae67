//! A conversation's driver over a WebSocket (the browser client; `web.rs` admits the
//! connection and upgrades it). Every text message is one protocol line, without its newline,
//! in both directions (docs/protocol.md, "WebSocket"). It keeps the other drivers' properties
//! (`stream.rs`):
//!
//! - one task owns the socket; a single `select!` waits for "socket progressed", "outbox has
//!   frames", "naming deadline" and "shutdown", and every WebSocket call is a `poll_*` that
//!   either moves a whole message or registers a waker, so nothing is cancelled half-way;
//! - the outbox is drained only once the WebSocket took and flushed the previous batch, so the
//!   outbox's byte bound (plus one batch in tungstenite's small write buffer) bounds what a
//!   client that stopped reading holds;
//! - every end is a WebSocket close with a code saying why, after the last protocol line that
//!   explains it: 1000 quit, 1001 shutdown, 1002/1007 malformed frames, 1003 binary, 1008
//!   flooding (lines or pings), 1009 too long, 4000 kicked, 4001 banned, 4002 too slow a
//!   reader, 4003 no name in time, 4004 name reclaimed.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};
use tokio_tungstenite::tungstenite::protocol::{Message, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::core::Conversation;
use super::{CLOSE_FLUSH_TIMEOUT, KEEP_QUEUE, LINGER, sleep_opt};
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
/// Output tungstenite gathers before writing to the socket (a flush writes the rest): a batch
/// of lines goes out in few writes, and an idle connection keeps little.
const WRITE_BUFFER: usize = 2048;

/// The WebSocket settings of a session whose lines are at most `max_line` bytes: small
/// buffers, and no message or frame longer than a line.
pub fn config(max_line: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
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

/// The WebSocket and what only I/O touches, apart from the conversation, so one future can
/// borrow it while another waits on the conversation's outbox.
struct Wire<S> {
    ws: WebSocketStream<S>,
    /// Lines taken from the outbox and not yet handed to the WebSocket (each `Bytes` one or
    /// more encoded lines, each ending in `\n`).
    pending: VecDeque<Bytes>,
    /// The WebSocket took messages it has not flushed to the socket yet.
    unflushed: bool,
    /// Bytes handed to the WebSocket since they were last counted.
    sent: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    /// Whether everything taken from the outbox has left for the socket.
    fn idle(&self) -> bool {
        self.pending.is_empty() && !self.unflushed
    }

    /// Hands pending lines to the WebSocket and flushes, then reads if `read`; ready once
    /// something moved.
    fn poll_io(&mut self, cx: &mut Context<'_>, read: bool) -> Poll<Result<Io, WsError>> {
        let mut moved = false;
        while !self.pending.is_empty() {
            if !self.send_ready(cx)? {
                break;
            }
            // One text message per line: a frame holds whole lines, each ending in `\n` (one
            // without is sent as it is rather than lost).
            let Some(frame) = self.pending.front_mut() else {
                break;
            };
            let line = match frame.iter().position(|&b| b == b'\n') {
                Some(end) if end + 1 < frame.len() => {
                    let line = frame.slice(..end);
                    *frame = frame.slice(end + 1..);
                    line
                }
                Some(end) => {
                    let line = frame.slice(..end);
                    self.pending.pop_front();
                    line
                }
                None => self.pending.pop_front().unwrap_or_default(),
            };
            self.send_line(line)?;
            moved = true;
        }
        if self.pending.is_empty() && self.unflushed {
            match Pin::new(&mut self.ws).poll_flush(cx) {
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

    /// Whether the WebSocket takes another message now (else a waker is registered).
    fn send_ready(&mut self, cx: &mut Context<'_>) -> Result<bool, WsError> {
        match Pin::new(&mut self.ws).poll_ready(cx) {
            Poll::Ready(Ok(())) => Ok(true),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(false),
        }
    }

    /// Hands one line to the WebSocket as a text message. The room's lines are valid UTF-8
    /// (every line is built from checked text), so the frame is made as it is, without
    /// checking each line again for each recipient.
    fn send_line(&mut self, line: Bytes) -> Result<(), WsError> {
        self.sent += line.len() as u64 + if line.len() < 126 { 2 } else { 4 };
        let frame = Frame::message(line, OpCode::Data(Data::Text), true);
        Pin::new(&mut self.ws).start_send(Message::Frame(frame))?;
        self.unflushed = true;
        Ok(())
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
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsSession<S> {
    /// A session for an upgraded connection from `peer`, over `transport` (`Ws` or `Wss`).
    pub fn new(
        ws: WebSocketStream<S>,
        peer: SocketAddr,
        transport: Transport,
        shared: Arc<Shared>,
    ) -> Self {
        WsSession {
            wire: Wire {
                ws,
                pending: VecDeque::new(),
                unflushed: false,
                sent: 0,
            },
            talk: Conversation::new(peer, transport, shared),
            close: None,
            last_line: None,
            pings: (0, Instant::now()),
        }
    }

    /// Runs the session to its end. Never panics on peer input; I/O errors end the session.
    pub async fn run(mut self, shutdown: CancellationToken) {
        self.talk.greet();
        let name_deadline =
            Instant::now() + self.talk.shared().live.load().config.limits.name_timeout;
        let mut close_deadline: Option<Instant> = None;
        // This session's own token (why: see `tcp.rs`).
        let shutdown = shutdown.child_token();
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);

        let end = loop {
            // More from the outbox only once the WebSocket took and flushed the last batch.
            let closed = if self.wire.idle() {
                let closed = self.talk.outbox().drain_into(&mut self.wire.pending);
                self.note_last_line(closed.as_ref());
                closed
            } else {
                self.talk.outbox().closed()
            };
            self.count_sent();
            match closed {
                Some(Close::Overflow) => {
                    self.talk.overflowed();
                    break End::Close(close_code::TOO_SLOW, "too slow: send queue full".into());
                }
                Some(_) if close_deadline.is_none() => {
                    close_deadline = Some(Instant::now() + CLOSE_FLUSH_TIMEOUT);
                }
                _ => {}
            }
            if let Some(reason) = &closed
                && self.wire.idle()
            {
                // Closing: end once the last lines still in the outbox are sent too.
                let closed = self.talk.outbox().drain_into(&mut self.wire.pending);
                self.note_last_line(closed.as_ref());
                if self.wire.pending.is_empty() {
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
            let wire = &mut self.wire;
            tokio::select! {
                _ = &mut cancelled, if !closing => self.talk.shut_down(),
                io = poll_fn(|cx| wire.poll_io(cx, !closing)) => match io {
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
            }
        };
        self.count_sent();
        match end {
            End::Close(code, reason) => self.close_with(code, reason).await,
            End::PeerClosed => {
                let ws = &mut self.wire.ws;
                let _ = tokio::time::timeout(LINGER, futures::SinkExt::flush(ws)).await;
            }
            End::Gone => {}
        }
        self.talk.finish();
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
                let bytes = Bytes::from(text);
                // One line per message; a message with newlines in it is taken as the lines
                // a TCP client sending the same text would have sent.
                let mut lines = bytes.split(|&b| b == b'\n').peekable();
                while let Some(line) = lines.next() {
                    if line.is_empty() && lines.peek().is_none() && !bytes.is_empty() {
                        break;
                    }
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    self.talk.handle_frame(Line::Line(BytesMut::from(line)));
                    if self.talk.outbox().closed().is_some() {
                        break;
                    }
                }
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

    /// Sends the close frame, then waits (at most [`LINGER`] after it is out) for the peer's
    /// close, so its last lines are not lost to a reset.
    async fn close_with(&mut self, code: u16, reason: String) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: cut(&reason, 123).into(),
        };
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
        Close::Overflow => (close_code::TOO_SLOW, "too slow".to_owned()),
        Close::Kicked => {
            let why = after(&kicked).unwrap_or_default();
            if why.starts_with(crate::room::RECLAIMED_REASON) {
                (close_code::RECLAIMED, why)
            } else if why.starts_with("banned") {
                (close_code::BANNED, why)
            } else {
                (close_code::KICKED, why)
            }
        }
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
                Close::Kicked,
                "*** KICKED your name was reclaimed by a new connection\n"
            ),
            4004
        );
        assert_eq!(
            code(Close::Kicked, "*** KICKED banned for 1h: spam\n"),
            4001
        );
        assert_eq!(code(Close::Quit, "*** BYE goodbye\n"), 1000);
        assert_eq!(code(Close::Quit, "*** ERR name-timeout too late\n"), 4003);
        assert_eq!(code(Close::Quit, "*** ERR banned you are banned\n"), 4001);
        assert_eq!(code(Close::Quit, "*** ERR flooding disconnected\n"), 1008);
        assert_eq!(code(Close::Shutdown, "*** SHUTDOWN bye\n"), 1001);
        assert_eq!(close_for(&Close::Overflow, None).0, 4002);
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
