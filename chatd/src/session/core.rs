//! The conversation with one client, without any I/O: it takes the client's lines (already
//! framed by the transport) and the time, and answers through the client's [`Outbox`] and the
//! room. Naming (every line is a name attempt) → chatting → closed (the outbox is closed with a
//! last line). Each transport (TCP in `tcp.rs`, TLS through `stream.rs`) drives one of these, so every way into the
//! room shares one set of rules: flood limits, name rules, bans at naming, commands.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use tracing::{info, warn};

use crate::engine::{ClientId, Newcomer, Transport};
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
    Chatting,
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
}

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

    /// Whether the client has not chosen a name yet (the naming deadline applies).
    pub fn is_naming(&self) -> bool {
        matches!(self.phase, Phase::Naming)
    }

    /// The first line a client gets.
    pub fn greet(&self) {
        self.reply(protocol::server_line(
            kind::HELLO,
            &format!(
                "chatd {} - welcome! Please send your name.",
                env!("CARGO_PKG_VERSION")
            ),
        ));
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
        let shown = name.display.clone();
        let room = &self.shared.room;
        let who = Newcomer {
            id: self.id,
            name,
            addr: self.peer,
            transport: self.transport,
            outbox: self.outbox.clone(),
            welcome: &welcome,
        };
        let joined = match token {
            None => room.join(who),
            Some(token) => room.reclaim(who, token),
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
        LimitCounters::bump(&self.shared.activity.quits);
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
            Input::Token => self.reply(room.token_line(self.id)),
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

/// However a conversation ends, a panic in its transport included, the member leaves the room,
/// so no ghost member keeps a name and an outbox nobody drains.
impl Drop for Conversation {
    fn drop(&mut self) {
        self.shared.room.leave(self.id, "connection lost");
        self.shared.room.reclaims.forget(self.id);
    }
}
