//! One TCP client, from greeting to goodbye: reads its lines, turns them into room events, and
//! writes what its outbox collects.
//!
//! A session is one task driving one socket without splitting it: it waits for "readable",
//! "writable while output is pending", "outbox has frames", "partial line went quiet", "naming
//! deadline" and "shutdown", and does non-blocking reads and writes. Nothing is cancelled
//! half-way, since every I/O call is a synchronous `try_*`.
//!
//! States: naming (every line is a name attempt) → chatting → closing (flush what is queued,
//! bounded by a deadline, then close).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::limits::FloodWindow;
use crate::outbox::{Close, Outbox};
use crate::reclaim;
use crate::room::{ClientId, Newcomer, RoomError};
use crate::shared::LimitCounters;
use crate::shared::Shared;
use chat_proto::codec::{Frame, LineDecoder};
use chat_proto::command::{self, Input};
use chat_proto::flood::TokenBucket;
use chat_proto::names::NameError;
use chat_proto::protocol::{self, code, kind};

/// Longest a closing session waits for its peer to read what is queued (quit, kick).
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// After the farewell line and FIN, how long a session waits for the peer to close its side.
const LINGER: Duration = Duration::from_millis(500);
/// Frames written per vectored write call.
const MAX_IOVECS: usize = 64;

/// The largest emptied write queue a session keeps (in frames, 32 bytes each): enough for the
/// usual few frames between writes, small next to a connection's ~4 KB.
const KEEP_QUEUE: usize = 8;
/// Read buffer reserved when the socket is readable.
const READ_CHUNK: usize = 4096;

enum Phase {
    Naming,
    Chatting,
}

/// One connected client.
pub struct Session {
    id: ClientId,
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    /// Frames for this client; the room and the session itself push, the writer drains.
    outbox: Arc<Outbox>,
    decoder: LineDecoder,
    /// Frames taken from the outbox but not yet fully written; the first one is advanced past
    /// what is already on the wire (its own handle only: the bytes stay shared).
    pending: VecDeque<Bytes>,
    phase: Phase,
    /// The name while chatting, for logs.
    name: String,
    /// Why the member leaves the room, announced when the session ends.
    leave_reason: &'static str,
    last_read: Instant,
    /// Flood control: one token per line received.
    bucket: TokenBucket,
    /// Refused lines in the current window; too many disconnect the client.
    flood: FloodWindow,
}

impl Session {
    /// A session for an accepted connection.
    pub fn new(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) -> Self {
        let live = shared.live.load();
        let outbox = Arc::new(Outbox::new(live.config.limits.max_queue_bytes.get()));
        let decoder = LineDecoder::new(live.config.limits.max_line_length.get());
        let now = std::time::Instant::now();
        let bucket = TokenBucket::new(
            live.config.limits.message_rate.0,
            live.config.limits.message_burst.0,
            now,
        );
        drop(live);
        Session {
            id: shared.next_client_id(),
            stream,
            peer,
            shared,
            outbox,
            decoder,
            pending: VecDeque::new(),
            phase: Phase::Naming,
            name: String::new(),
            leave_reason: "connection lost",
            last_read: Instant::now(),
            bucket,
            flood: FloodWindow::new(now),
        }
    }

    /// Runs the session to its end. Never panics on peer input; I/O errors end the session.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let _guard = LeaveOnDrop {
            shared: self.shared.clone(),
            id: self.id,
        };
        let live = self.shared.live.load_full();
        self.outbox.push(protocol::server_line(
            kind::HELLO,
            &format!(
                "chatd {} - welcome! Please send your name.",
                env!("CARGO_PKG_VERSION")
            ),
        ));
        let name_deadline = Instant::now() + live.config.limits.name_timeout;
        drop(live);
        let mut close_deadline: Option<Instant> = None;
        // This session's own token, waited on by one future for the whole session. Every
        // wake-up polls it, and polling the server-wide token takes that token's locks, shared
        // by every session on both workers: a worker that stalls holding one (preempted, or its
        // virtual CPU descheduled) stalls the other one's writers too. A child token's locks
        // are this session's alone; shutdown still reaches it through the parent.
        let shutdown = shutdown.child_token();
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);

        let result: io::Result<()> = async {
            loop {
                // Take more from the outbox only once the socket has taken everything drained
                // before: the outbox's byte bound then also bounds `pending`, so a client that
                // stops reading holds at most two queues' worth before its outbox overflows.
                let closed = if self.pending.is_empty() {
                    self.outbox.drain_into(&mut self.pending)
                } else {
                    self.outbox.closed()
                };
                match closed {
                    Some(Close::Overflow) => {
                        self.leave_reason = "too slow: outbound queue full";
                        LimitCounters::bump(&self.shared.limits.slow_disconnects);
                        warn!(peer = %self.peer, user = %self.name,
                            limit = self.shared.live.load().config.limits.max_queue_bytes.get(),
                            "disconnecting a client that does not read (limits.max-queue-bytes)");
                        return Ok(());
                    }
                    Some(_) if close_deadline.is_none() => {
                        close_deadline = Some(Instant::now() + CLOSE_FLUSH_TIMEOUT);
                    }
                    _ => {}
                }
                self.write_pending()?;
                if close_deadline.is_some() && self.pending.is_empty() {
                    // Closing: end once the last frames still in the outbox are written too.
                    self.outbox.drain_into(&mut self.pending);
                    if self.pending.is_empty() {
                        self.linger().await;
                        return Ok(());
                    }
                    continue;
                }
                let closing = close_deadline.is_some();
                let flush_at = self.partial_flush_at();
                let naming = matches!(self.phase, Phase::Naming);
                tokio::select! {
                    _ = &mut cancelled, if !closing => {
                        self.leave_reason = "server shutting down";
                        self.outbox.close_with(
                            Some(protocol::server_line(kind::SHUTDOWN, "the server is stopping, goodbye")),
                            Close::Shutdown,
                        );
                    }
                    ready = self.stream.readable(), if !closing => {
                        ready?;
                        if !self.read_available()? {
                            return Ok(());
                        }
                    }
                    ready = self.stream.writable(), if !self.pending.is_empty() => ready?,
                    _ = self.outbox.ready() => {}
                    _ = sleep_opt(flush_at), if flush_at.is_some() && !closing => {
                        if let Some(frame) = self.decoder.take_partial() {
                            self.handle_frame(frame);
                        }
                    }
                    _ = sleep_opt(Some(name_deadline)), if naming && !closing => {
                        LimitCounters::bump(&self.shared.limits.name_timeouts);
                        info!(peer = %self.peer, "closing: no name in time (limits.name-timeout)");
                        self.leave_now("no name in time", protocol::error_line(code::NAME_TIMEOUT,
                            "no name was chosen in time (limits.name-timeout), goodbye"));
                    }
                    _ = sleep_opt(close_deadline), if closing => {
                        return Ok(());
                    }
                }
            }
        }
        .await;

        if let Err(e) = result {
            debug!(peer = %self.peer, user = %self.name, error = %e, "connection error");
        }
        if let Some(name) = self.shared.room.leave(self.id, self.leave_reason) {
            info!(peer = %self.peer, user = %name, reason = self.leave_reason, "user left");
        }
    }

    /// When the pending partial line of a message client is taken as complete.
    fn partial_flush_at(&self) -> Option<Instant> {
        (!self.decoder.is_line_client() && self.decoder.has_partial())
            .then(|| self.last_read + self.shared.live.load().config.server.partial_line_flush)
    }

    /// Reads what the socket has and handles every complete line. Returns `false` at EOF.
    fn read_available(&mut self) -> io::Result<bool> {
        self.decoder
            .set_max_len(self.shared.live.load().config.limits.max_line_length.get());
        // Bounded per wake-up so one fast sender cannot monopolise this worker thread.
        for _ in 0..16 {
            let buf = self.decoder.buffer_mut();
            buf.reserve(READ_CHUNK);
            match self.stream.try_read_buf(buf) {
                Ok(0) => {
                    // A message client's last words before closing still count.
                    if let Some(frame) = self.decoder.take_partial() {
                        self.handle_frame(frame);
                    }
                    return Ok(false);
                }
                Ok(_) => {
                    self.last_read = Instant::now();
                    while let Some(frame) = self.decoder.next_frame() {
                        self.handle_frame(frame);
                        if self.outbox.closed().is_some() {
                            return Ok(true);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        self.decoder.shrink_if_idle();
        Ok(true)
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
            let mut n = 0;
            for (slot, frame) in slices.iter_mut().zip(&self.pending) {
                *slot = IoSlice::new(frame);
                n += 1;
            }
            match self.stream.try_write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(mut wrote) => {
                    while wrote > 0 {
                        let Some(front) = self.pending.front_mut() else {
                            break;
                        };
                        if wrote >= front.len() {
                            wrote -= front.len();
                            self.pending.pop_front();
                        } else {
                            front.advance(wrote);
                            wrote = 0;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        // Everything is written. This queue goes back to the outbox on the next drain (a swap),
        // so keeping a small one spares the room a queue allocation, under its lock, on the
        // next push to this member; a queue grown by a burst is given back.
        if self.pending.capacity() > KEEP_QUEUE {
            self.pending = VecDeque::new();
        }
        Ok(())
    }

    /// Queues a line for this client only.
    fn reply(&self, frame: Bytes) {
        self.outbox.push(frame);
    }

    /// Flood control: takes a token for this line, or refuses it (and past
    /// `limits.flood-disconnect` refusals in a window, disconnects). Returns whether to go on.
    fn admit(&mut self) -> bool {
        let live = self.shared.live.load();
        let limits = &live.config.limits;
        self.bucket
            .set(limits.message_rate.0, limits.message_burst.0);
        let now = std::time::Instant::now();
        let Err(retry) = self.bucket.take(now) else {
            return true;
        };
        LimitCounters::bump(&self.shared.limits.rate_limited);
        if self.flood.refuse(now, limits.flood_disconnect.0) {
            LimitCounters::bump(&self.shared.limits.flood_disconnects);
            warn!(peer = %self.peer, user = %self.name, limit = limits.flood_disconnect.0,
                "disconnecting a flooding client (limits.flood-disconnect)");
            let last = protocol::error_line(
                code::FLOODING,
                &format!(
                    "disconnected for flooding: {} lines refused within {}s (limits.flood-disconnect)",
                    limits.flood_disconnect.0,
                    crate::limits::FLOOD_WINDOW.as_secs()
                ),
            );
            drop(live);
            self.leave_now("flooding", last);
            return false;
        }
        // Logged once per flood window, not per line: the log must not become the flood.
        if self.flood.refused() == 1 {
            info!(peer = %self.peer, user = %self.name, rate = limits.message_rate.0,
                burst = limits.message_burst.0, "rate limiting a client (limits.message-rate)");
        }
        self.reply(protocol::error_line(
            code::RATE_LIMITED,
            &protocol::rate_limited_text(
                limits.message_rate.0,
                limits.message_burst.0,
                u64::try_from(retry.as_millis()).unwrap_or(u64::MAX).max(1),
            ),
        ));
        false
    }

    fn handle_frame(&mut self, frame: Frame) {
        if self.outbox.closed().is_some() || !self.admit() {
            return;
        }
        let line = match frame {
            Frame::TooLong => {
                LimitCounters::bump(&self.shared.limits.line_too_long);
                let max = self.shared.live.load().config.limits.max_line_length.get();
                info!(peer = %self.peer, user = %self.name, max,
                    "refused a line (limits.max-line-length)");
                self.reply(protocol::error_line(
                    code::LINE_TOO_LONG,
                    &format!("line longer than {max} bytes (limits.max-line-length) was not sent"),
                ));
                return;
            }
            Frame::Line(line) => line,
        };
        let Ok(text) = std::str::from_utf8(&line) else {
            LimitCounters::bump(&self.shared.limits.bad_utf8);
            info!(peer = %self.peer, user = %self.name, "refused a line that is not UTF-8");
            self.reply(protocol::error_line(
                code::BAD_UTF8,
                "line is not valid UTF-8 and was not sent",
            ));
            return;
        };
        match self.phase {
            Phase::Naming => self.choose_name(text),
            Phase::Chatting => self.chat(text),
        }
    }

    fn choose_name(&mut self, text: &str) {
        if matches!(command::parse(text), Input::Quit) {
            self.quit();
            return;
        }
        // `/reclaim NAME TOKEN` takes NAME back from a dead connection (reclaim.rs).
        let (text, token) = match reclaim::parse(text) {
            Some(reclaim::Request::Reclaim { name, token }) => (name, Some(token)),
            Some(reclaim::Request::Usage) => {
                return self.reply(protocol::error_line(
                    code::BAD_ARGUMENTS,
                    "usage: /reclaim NAME TOKEN",
                ));
            }
            _ => (text, None),
        };
        let live = self.shared.live.load_full();
        let name = match live.name_rules.validate(text) {
            Ok(name) => name,
            Err(e) => return self.name_refused(&e),
        };
        // Bans made after this connection was accepted, and bans on the name itself.
        let ban = self.shared.bans.find(self.peer.ip(), Some(&name.key));
        if let Some(ban) = ban {
            LimitCounters::bump(&self.shared.limits.refused_banned);
            info!(peer = %self.peer, name = %name.display, ban = %ban.target.to_text(), "refused a banned user");
            return self.leave_now("banned", protocol::error_line(code::BANNED, &ban.refusal()));
        }
        let mut welcome = vec![protocol::server_line(
            kind::WELCOME,
            &format!(
                "{} you are chatting as {}; type /help for commands; {}",
                name.display,
                name.display,
                protocol::flood_limits_text(
                    live.config.limits.message_rate.0,
                    live.config.limits.message_burst.0
                )
            ),
        )];
        welcome.extend(
            live.config
                .room
                .motd
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| protocol::server_line(kind::MOTD, &protocol::sanitize(l))),
        );
        let shown = name.display.clone();
        let room = &self.shared.room;
        let who = Newcomer {
            id: self.id,
            name,
            addr: self.peer,
            outbox: self.outbox.clone(),
            welcome: &welcome,
        };
        let joined = match token {
            None => room.join(who),
            Some(token) => reclaim::join(room, token, who),
        };
        match joined {
            Ok(users) => {
                self.phase = Phase::Chatting;
                info!(peer = %self.peer, user = %shown, users, reclaimed = token.is_some(), "user joined");
                self.name = shown;
            }
            Err(e) => self.name_refused(&e),
        }
    }

    fn name_refused(&self, e: &NameError) {
        self.reply(protocol::error_line(
            e.code(),
            &format!("{e}; send another name"),
        ));
    }

    fn quit(&mut self) {
        self.leave_now("quit", protocol::server_line(kind::BYE, "goodbye"));
    }

    /// Ends the session on the server's side: `last` is the client's final line, and the room
    /// is told at once rather than when the socket is finally closed.
    fn leave_now(&mut self, reason: &'static str, last: Bytes) {
        self.leave_reason = reason;
        self.outbox.close_with(Some(last), Close::Quit);
        if let Some(name) = self.shared.room.leave(self.id, reason) {
            info!(peer = %self.peer, user = %name, reason, "user left");
        }
    }

    fn chat(&mut self, line: &str) {
        let room = &self.shared.room;
        match command::parse(line) {
            Input::Token => self.reply(room.reclaims.token_line(self.id)),
            Input::Blank => {}
            Input::Say(text) => room.say(self.id, &protocol::sanitize(text)),
            Input::Me(text) => room.act(self.id, &protocol::sanitize(text)),
            Input::Quit => self.quit(),
            Input::Who => {
                let names = room.names();
                self.reply(protocol::server_line(
                    kind::WHO,
                    &format!("{} {}", names.len(), names.join(" ")),
                ));
            }
            Input::Msg { to, text } => {
                let text = protocol::sanitize(text);
                match room.private(self.id, to, &text) {
                    Ok(to) => self.reply(protocol::private_echo_line(&to, &text)),
                    Err(e) => self.reply(protocol::error_line(
                        code::NO_SUCH_USER,
                        &protocol::sanitize(&e.to_string()),
                    )),
                }
            }
            Input::Nick(new) => {
                let live = self.shared.live.load_full();
                let result = live
                    .name_rules
                    .validate(new)
                    .map_err(RoomError::from)
                    .and_then(|name| {
                        let display = name.display.clone();
                        room.rename(self.id, name)
                            .map(|old| (old, display))
                            .map_err(RoomError::from)
                    });
                match result {
                    Ok((old, new)) => {
                        info!(peer = %self.peer, user = %new, old = %old, "user renamed");
                        self.name = new;
                    }
                    Err(RoomError::Name(e)) => self.name_refused(&e),
                    Err(e) => self.reply(protocol::error_line(code::NO_SUCH_USER, &e.to_string())),
                }
            }
            Input::Help => {
                for line in command::HELP {
                    self.reply(protocol::server_line(kind::INFO, line));
                }
            }
            Input::Usage(usage) => self.reply(protocol::error_line(code::BAD_ARGUMENTS, usage)),
            Input::Unknown(cmd) => self.reply(protocol::error_line(
                code::UNKNOWN_COMMAND,
                &format!(
                    "unknown command /{}; type /help for the list",
                    protocol::sanitize(cmd)
                ),
            )),
        }
    }
}

/// Sleeps until `at`, or forever without a deadline. `select!` builds the future of every
/// branch on each turn, disabled ones included, and a `Sleep` built there costs a clock read
/// and a clone of the runtime handle even when it is never polled; this costs nothing until
/// polled.
async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Removes the member from the room however the session ends, a panic included, so no ghost
/// member keeps a name and an outbox nobody drains.
struct LeaveOnDrop {
    shared: Arc<Shared>,
    id: ClientId,
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        self.shared.room.leave(self.id, "connection lost");
        self.shared.room.reclaims.forget(self.id);
    }
}
