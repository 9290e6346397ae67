//! The conversation with one client, without any I/O: it takes the client's lines (already
//! framed by the transport) and the time, and answers through the client's [`Outbox`] and the
//! room. Naming (every line is a name attempt) → joining (the name is being claimed) →
//! chatting → closed (the outbox is closed with a last line). Each transport (TCP in `tcp.rs`,
//! TLS through `stream.rs`, WebSocket in `ws.rs`) drives one of these, so every way into the room shares one set of
//! rules: flood limits, name rules, bans at naming, commands.
//!
//! # What a driver must do
//!
//! Most lines are handled at once. A few need the engine's word, which a cluster gets from NATS
//! (a join, `/reclaim`, `/nick`, `/token`): the conversation then *waits* on a step it keeps
//! itself, and no runtime thread is held meanwhile. On a single node every step is finished
//! inside [`handle_frame`](Conversation::handle_frame) and nothing waits. A driver:
//!
//! 1. hands no frame to [`handle_frame`](Conversation::handle_frame) while
//!    [`is_waiting`](Conversation::is_waiting) is true: it stops reading the client (its lines
//!    stay in the driver's decoder, in order) but keeps writing the outbox and keeps watching
//!    for shutdown and close deadlines;
//! 2. while waiting, awaits [`step`](Conversation::step) beside its other events (dropping that
//!    future loses nothing) and gives what it yields to [`resume`](Conversation::resume);
//! 3. then hands over the complete lines it already holds before reading more.
//!
//! A driver with several complete lines at once (one read's) hands them over with
//! [`handle_frames`](Conversation::handle_frames), so that their chat lines reach the room
//! together (one push per recipient for a frame of them, not one per line); one at a time,
//! [`handle_frame`](Conversation::handle_frame) does the same for a single line.
//!
//! A conversation dropped while it waits finishes the step on its own (a spawned task) and then
//! leaves the room, so a claim in flight never leaves a name or member behind.

use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tracing::{debug, info, warn};

use crate::engine::{ClientId, Newcomer, Said, Transport};
use crate::limits::FloodWindow;
use crate::outbox::{Close, Outbox};
use crate::room::RoomError;
use crate::shared::{LimitCounters, Shared};
use chat_proto::codec::Frame;
use chat_proto::command::{self, Input, Naming};
use chat_proto::flood::TokenBucket;
use chat_proto::names::NameError;
use chat_proto::protocol::{self, code, kind};

enum Phase {
    Naming,
    /// A name was accepted here and is being claimed and joined (a step is waiting).
    Joining,
    Chatting,
}

/// A step waiting for the engine; owns everything it uses, so it can outlive its session.
type Waiting = Pin<Box<dyn Future<Output = Done> + Send>>;

/// What a finished step did, for [`Conversation::resume`].
pub struct Done(Outcome);

enum Outcome {
    /// A join or reclaim under `name`.
    Joined {
        result: Result<usize, NameError>,
        name: String,
        reclaimed: bool,
    },
    /// A `/nick`: (old, new) display names.
    Renamed(Result<(String, String), RoomError>),
    /// The answer to `/token`, once the engine keeps the token's digest.
    Token(Bytes),
}

/// One client's side of the room, whatever carries its bytes.
pub struct Conversation {
    id: ClientId,
    peer: SocketAddr,
    /// What carries the client's bytes (recorded on its room member).
    transport: Transport,
    shared: Arc<Shared>,
    /// Frames for this client; the room and the conversation push, the transport drains.
    outbox: Arc<Outbox>,
    phase: Phase,
    /// The name while chatting, for logs.
    name: String,
    /// Why the member leaves the room, announced when the conversation ends.
    leave_reason: &'static str,
    /// Flood control: one token per line received.
    bucket: TokenBucket,
    /// Refused lines in the current window; too many disconnect the client.
    flood: FloodWindow,
    /// The step being waited for, if any. Only this session's task touches it; the lock lets
    /// [`step`](Self::step) borrow the conversation shared, beside the driver's other futures.
    waiting: Mutex<Option<Waiting>>,
    /// Whether `waiting` holds a step (read without the lock on every turn of the driver).
    is_waiting: bool,
    /// Chat lines handled but not yet given to the room: consecutive messages and actions of
    /// one batch of frames ([`handle_frames`](Self::handle_frames)), given to the room together
    /// before anything else happens. Empty whenever a public method returns.
    said: Said,
}

/// Text held in [`Conversation::said`] past which it goes to the room without waiting for the
/// end of the batch: about what one read brings.
const SAID_FLUSH: usize = 4096;

impl Conversation {
    /// A new conversation with the client at `peer`, reached over `transport`; its outbox is
    /// bounded by `limits.max-queue-bytes`.
    pub fn new(peer: SocketAddr, transport: Transport, shared: Arc<Shared>) -> Self {
        let live = shared.live.load();
        let outbox = Arc::new(Outbox::new(live.config.limits.max_queue_bytes.get()));
        let bucket = TokenBucket::new(
            live.config.limits.message_rate.0,
            live.config.limits.message_burst.0,
            std::time::Instant::now(),
        );
        drop(live);
        Conversation {
            id: shared.next_client_id(),
            peer,
            transport,
            shared,
            outbox,
            phase: Phase::Naming,
            name: String::new(),
            leave_reason: "connection lost",
            bucket,
            flood: FloodWindow::new(std::time::Instant::now()),
            waiting: Mutex::new(None),
            is_waiting: false,
            said: Said::default(),
        }
    }

    /// Whether a step waits for the engine: until [`resume`](Self::resume), the driver hands
    /// over no frames (see the module's documentation).
    pub fn is_waiting(&self) -> bool {
        self.is_waiting
    }

    /// Resolves once the waiting step is done; give the result to [`resume`](Self::resume).
    /// Pending forever when nothing waits. Dropping it loses nothing.
    pub fn step(&self) -> impl Future<Output = Done> + '_ {
        poll_fn(move |cx| {
            let mut slot = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let Some(step) = slot.as_mut() else {
                return Poll::Pending;
            };
            let done = std::task::ready!(step.as_mut().poll(cx));
            *slot = None;
            Poll::Ready(done)
        })
    }

    /// Applies what a finished step did; the driver may hand over frames again.
    pub fn resume(&mut self, done: Done) {
        self.is_waiting = false;
        self.apply(done.0);
    }

    /// Runs `step` as far as it goes now: a single node's finishes here, and its outcome is
    /// applied at once; one that waits (for NATS) is kept for the driver to await.
    fn start(&mut self, step: impl Future<Output = Outcome> + Send + 'static) {
        let mut step: Waiting = Box::pin(async move { Done(step.await) });
        // Polled here with a waker that does nothing; the driver polls it again with its own
        // (through `step`) before it sleeps, and a future heeds only its latest waker.
        match step.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(done) => self.apply(done.0),
            Poll::Pending => {
                *self.waiting.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(step);
                self.is_waiting = true;
            }
        }
    }

    /// The end of a step: the conversation moves on as its outcome says.
    fn apply(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Joined {
                result: Ok(users),
                name,
                reclaimed,
            } => {
                self.phase = Phase::Chatting;
                info!(peer = %self.peer, user = %name, users, reclaimed, "user joined");
                self.name = name;
            }
            Outcome::Joined { result: Err(e), .. } => {
                self.phase = Phase::Naming;
                self.name_refused(&e);
            }
            Outcome::Renamed(Ok((old, new))) => {
                info!(peer = %self.peer, user = %new, old = %old, "user renamed");
                self.name = new;
            }
            Outcome::Renamed(Err(RoomError::Name(e))) => self.name_refused(&e),
            Outcome::Renamed(Err(e)) => {
                self.reply(protocol::error_line(code::NO_SUCH_USER, &e.to_string()));
            }
            Outcome::Token(line) => self.reply(line),
        }
    }

    /// The client's outbox, which the transport drains onto its connection.
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The client's name once it has one (empty while naming), for logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shared daemon state (config, counters), for the transport's own limits.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Whether the client has not chosen a name yet (the naming deadline applies; not while a
    /// name it chose is being claimed).
    pub fn is_naming(&self) -> bool {
        matches!(self.phase, Phase::Naming)
    }

    /// The first line a client gets; returns when it must have chosen a name by
    /// (`limits.name-timeout` from now).
    pub fn greet(&self) -> std::time::Instant {
        self.reply(protocol::server_line(
            kind::HELLO,
            &format!(
                "chatd {} - welcome! Please send your name.",
                env!("CARGO_PKG_VERSION")
            ),
        ));
        std::time::Instant::now() + self.shared.live.load().config.limits.name_timeout
    }

    /// The naming deadline passed without a name.
    pub fn name_timed_out(&mut self) {
        LimitCounters::bump(&self.shared.limits.name_timeouts);
        info!(peer = %self.peer, "closing: no name in time (limits.name-timeout)");
        self.leave_now(
            "no name in time",
            protocol::error_line(
                code::NAME_TIMEOUT,
                "no name was chosen in time (limits.name-timeout), goodbye",
            ),
        );
    }

    /// The connection's first bytes are a PROXY protocol header, on a listener that does not
    /// expect one: a misconfigured balancer, whose header must not become a name. Counted and
    /// logged; the transport closes the connection.
    /// `section` holds the listener's keys (`server`, `tls`).
    pub fn unexpected_proxy_header(&mut self, section: &'static str) {
        let e = crate::proxy::ProxyError::Unexpected;
        crate::proxy::refused(&self.shared, self.peer, section, &e);
        self.outbox.close_with(None, Close::Quit);
    }

    /// The transport closes the connection for what the client sent at its own level (a
    /// WebSocket's binary, oversized or malformed frame, a flood of pings): `last` is the
    /// client's final line, and the member leaves at once with `reason`.
    pub fn refuse_input(&mut self, reason: &'static str, last: Bytes) {
        self.leave_now(reason, last);
    }

    /// The server is stopping: the client's last line says so.
    pub fn shut_down(&mut self) {
        self.leave_reason = "server shutting down";
        self.outbox.close_with(
            Some(protocol::server_line(
                kind::SHUTDOWN,
                "the server is stopping, goodbye",
            )),
            Close::Shutdown,
        );
    }

    /// The client stopped reading and its outbox overflowed: it is disconnected.
    pub fn overflowed(&mut self) {
        self.leave_reason = "too slow: outbound queue full";
        LimitCounters::bump(&self.shared.limits.slow_disconnects);
        warn!(peer = %self.peer, user = %self.name,
            limit = self.shared.live.load().config.limits.max_queue_bytes.get(),
            "disconnecting a client that does not read (limits.max-queue-bytes)");
    }

    /// The connection is over: the member leaves the room, and everyone is told why.
    pub fn finish(&mut self) {
        // Every way the server ends a connection closes its outbox first (and is counted
        // there); an open one means the peer went away.
        if self.outbox.closed().is_none() {
            LimitCounters::bump(&self.shared.activity.lost);
        }
        if self.is_waiting {
            return; // Left once the step is done (see `Drop`).
        }
        if let Some(name) = self.shared.room.leave(self.id, self.leave_reason) {
            info!(peer = %self.peer, user = %name, reason = self.leave_reason, "user left");
        }
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

    /// Handles one frame from the client: a name attempt while naming, then chat lines and
    /// commands. Everything it answers goes to the outbox.
    pub fn handle_frame(&mut self, frame: Frame) {
        self.take_frame(frame);
        self.flush_said();
    }

    /// Handles the frames `next` gives, in order, like [`handle_frame`](Self::handle_frame),
    /// until it gives none, the outbox closes or a step waits; returns `true` in the last two
    /// cases, when the driver must stop handing frames over (those not taken stay with it).
    /// Consecutive chat lines among them reach the room together: one fan-out, in which every
    /// other member gets them one after the other, as if sent one by one.
    pub fn handle_frames(&mut self, mut next: impl FnMut() -> Option<Frame>) -> bool {
        let stopped = loop {
            if self.is_waiting || self.outbox.closed().is_some() {
                break true;
            }
            let Some(frame) = next() else {
                break false;
            };
            self.take_frame(frame);
        };
        self.flush_said();
        stopped
    }

    /// Holds a chat line (or, with `action`, a `/me`) for the room, which gets it with the
    /// others of its batch, or at once past [`SAID_FLUSH`].
    fn hold_said(&mut self, action: bool, text: &str) {
        self.said.push(action, &protocol::sanitize(text));
        if self.said.text_len() >= SAID_FLUSH {
            self.flush_said();
        }
    }

    /// Gives the chat lines held to the room.
    fn flush_said(&mut self) {
        if !self.said.is_empty() {
            self.shared.room.say_all(self.id, &self.said);
            self.said.clear();
        }
    }

    /// [`handle_frame`](Self::handle_frame) without giving the chat lines to the room yet.
    fn take_frame(&mut self, frame: Frame) {
        if self.is_waiting {
            // A driver holds lines back while a step waits (the module's documentation); one
            // handed over anyway cannot be answered in order.
            debug!(peer = %self.peer, "dropping a line handed over while a step waits");
            return;
        }
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
            Phase::Joining => {} // Not reached: no frames while a step waits.
        }
    }

    fn choose_name(&mut self, text: &str) {
        // `/reclaim NAME TOKEN` takes NAME back from a dead connection (reclaim.rs).
        let (text, token) = match command::parse_naming(text) {
            Naming::Quit => return self.quit(),
            Naming::Reclaim { name, token } => (name, Some(token)),
            Naming::Usage(usage) => {
                return self.reply(protocol::error_line(code::BAD_ARGUMENTS, usage));
            }
            Naming::Name(text) => (text, None),
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
            LimitCounters::bump(&self.shared.activity.ban_disconnects);
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
        drop(live);
        let shared = self.shared.clone();
        let (id, addr, transport, outbox) =
            (self.id, self.peer, self.transport, self.outbox.clone());
        let token = token.map(str::to_owned);
        self.phase = Phase::Joining;
        self.start(async move {
            let name_shown = name.display.clone();
            let who = Newcomer {
                id,
                name,
                addr,
                transport,
                outbox,
                welcome: &welcome,
            };
            let result = match &token {
                None => shared.room.join(who).await,
                Some(token) => shared.room.reclaim(who, token).await,
            };
            Outcome::Joined {
                result,
                name: name_shown,
                reclaimed: token.is_some(),
            }
        });
    }

    fn name_refused(&self, e: &NameError) {
        self.reply(protocol::error_line(
            e.code(),
            &format!("{e}; send another name"),
        ));
    }

    fn quit(&mut self) {
        LimitCounters::bump(&self.shared.activity.quits);
        self.leave_now("quit", protocol::server_line(kind::BYE, "goodbye"));
    }

    /// Ends the session on the server's side: `last` is the client's final line, and the room
    /// is told at once rather than when the socket is finally closed.
    fn leave_now(&mut self, reason: &'static str, last: Bytes) {
        // Lines taken before the one that ends the session are said before the leave.
        self.flush_said();
        self.leave_reason = reason;
        self.outbox.close_with(Some(last), Close::Quit);
        if let Some(name) = self.shared.room.leave(self.id, reason) {
            info!(peer = %self.peer, user = %name, reason, "user left");
        }
    }

    fn chat(&mut self, line: &str) {
        let input = command::parse(line);
        // Anything but a chat line happens after the lines before it reached the room: a
        // private message, a rename or a quit is never seen before them.
        if !matches!(input, Input::Say(_) | Input::Me(_) | Input::Blank) {
            self.flush_said();
        }
        let room = &self.shared.room;
        match input {
            Input::Say(text) => self.hold_said(false, text),
            Input::Me(text) => self.hold_said(true, text),
            Input::Blank => {}
            Input::Token => {
                let (shared, id) = (self.shared.clone(), self.id);
                self.start(async move { Outcome::Token(shared.room.token_line(id).await) });
            }
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
                let name = self.shared.live.load().name_rules.validate(new);
                match name {
                    Ok(name) => {
                        let (shared, id) = (self.shared.clone(), self.id);
                        self.start(async move {
                            let display = name.display.clone();
                            let result = shared.room.rename(id, name).await;
                            Outcome::Renamed(
                                result.map(|old| (old, display)).map_err(RoomError::from),
                            )
                        });
                    }
                    Err(e) => self.name_refused(&e),
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

/// However a conversation ends, a panic in its transport included, the member leaves the room,
/// so no ghost member keeps a name and an outbox nobody drains. A step still waiting (a claim
/// in flight) is finished first, on its own task, so what it claims is released, not lost.
impl Drop for Conversation {
    fn drop(&mut self) {
        let step = self
            .waiting
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let (shared, id, reason) = (self.shared.clone(), self.id, self.leave_reason);
        let leave = move || {
            if let Some(name) = shared.room.leave(id, reason) {
                info!(user = %name, reason, "user left");
            }
            shared.room.reclaims.forget(id);
        };
        match (step, tokio::runtime::Handle::try_current()) {
            (Some(step), Ok(runtime)) => {
                runtime.spawn(async move {
                    step.await;
                    leave();
                });
            }
            _ => leave(),
        }
    }
}
