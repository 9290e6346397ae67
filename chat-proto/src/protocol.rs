//! The chat wire protocol's lines, in one place for the daemon (which encodes them) and the
//! client (which parses them). `docs/protocol.md` is the written form; the tests hold both to it.
//!
//! Lines the server sends are of four shapes, told apart by their start:
//! - `*** KIND ...`   a server line (greeting, errors, joins, leaves, notices, replies);
//! - `* NAME text`    an action (`/me`);
//! - `NAME (private): text` and `-> NAME (private): text`, a private message received / sent;
//! - `NAME: text`     a message to the room (the seed's format).
//!
//! Names can contain neither spaces, `*`, `:` nor `>`, so the shapes cannot be confused.
//!
//! [`Event`] is every line a client can receive, typed, with one parser ([`Event::parse`]) and
//! one encoder ([`Event::encode`]); the encoder is built from the functions below
//! ([`server_line`], [`error_line`], [`chat_line`], ...), which the daemon calls directly, so
//! what the daemon sends and what the client reads are the same forms.

use bytes::{BufMut, Bytes, BytesMut};

/// Every server line starts with this.
pub const SERVER_PREFIX: &str = "*** ";

/// Declares a module of string constants and, from the same list, a slice of all of them, so the
/// slice cannot miss a constant (documentation checks and clients iterate over it).
macro_rules! string_set {
    (
        $(#[$mod_doc:meta])*
        pub mod $module:ident;
        $(#[$all_doc:meta])*
        pub const $all:ident;
        $( $(#[$doc:meta])* $name:ident = $value:literal, )+
    ) => {
        $(#[$mod_doc])*
        pub mod $module {
            $( $(#[$doc])* pub const $name: &str = $value; )+
        }
        $(#[$all_doc])*
        pub const $all: &[&str] = &[ $( $module::$name, )+ ];
    };
}

string_set! {
    /// The kinds of server line, as sent after [`SERVER_PREFIX`].
    pub mod kind;
    /// Every server line kind, for documentation checks and clients.
    pub const ALL_KINDS;
    /// Greeting on connect; asks for a name.
    HELLO = "HELLO",
    /// An error: `*** ERR <code> <text>`.
    ERR = "ERR",
    /// Name accepted: `*** WELCOME <name> <text>`.
    WELCOME = "WELCOME",
    /// One line of the message of the day.
    MOTD = "MOTD",
    /// A past message: `*** HISTORY <rfc3339-utc> <line>`.
    HISTORY = "HISTORY",
    /// `*** JOIN <name> joined`.
    JOIN = "JOIN",
    /// `*** LEAVE <name> left (<reason>)`.
    LEAVE = "LEAVE",
    /// `*** NICK <old> is now known as <new>`.
    NICK = "NICK",
    /// `*** KICK <name> was kicked (<reason>)`, to everyone else.
    KICK = "KICK",
    /// `*** KICKED <reason>`, to the user being kicked, just before the server closes.
    KICKED = "KICKED",
    /// An announcement from the operators: `*** NOTICE <text>`.
    NOTICE = "NOTICE",
    /// `*** WHO <count> <name> <name> ...`.
    WHO = "WHO",
    /// A reply to a command: `*** INFO <text>`.
    INFO = "INFO",
    /// The server closes after a `quit`: `*** BYE <text>`.
    BYE = "BYE",
    /// The server is stopping: `*** SHUTDOWN <text>`.
    SHUTDOWN = "SHUTDOWN",
    /// Answer to `/token`: `*** TOKEN <token> <text>`, this connection's reclaim token.
    TOKEN = "TOKEN",
}

string_set! {
    /// Error codes sent in `*** ERR <code> <text>`.
    pub mod code;
    /// Every error code, for documentation checks and clients.
    pub const ALL_CODES;
    /// The name has characters outside the allowed set, is empty or too long.
    NAME_INVALID = "name-invalid",
    /// The name is reserved for the server or staff.
    NAME_RESERVED = "name-reserved",
    /// Someone online has the name.
    NAME_TAKEN = "name-taken",
    /// The line was longer than `limits.max-line-length`.
    LINE_TOO_LONG = "line-too-long",
    /// The line was not valid UTF-8 and was dropped.
    BAD_UTF8 = "bad-utf8",
    /// An unknown `/command`.
    UNKNOWN_COMMAND = "unknown-command",
    /// A command with missing or bad arguments.
    BAD_ARGUMENTS = "bad-arguments",
    /// `/msg` to a name that is not online.
    NO_SUCH_USER = "no-such-user",
    /// No more connections are accepted right now.
    SERVER_FULL = "server-full",
    /// No name was chosen within `limits.name-timeout`.
    NAME_TIMEOUT = "name-timeout",
    /// The client did not read fast enough and its queue overflowed.
    TOO_SLOW = "too-slow",
    /// More lines than `limits.message-rate` allows; the line was not sent.
    RATE_LIMITED = "rate-limited",
    /// Refused too often for flooding; the server closes right after.
    FLOODING = "flooding",
    /// Too many connections from one address.
    TOO_MANY_CONNECTIONS = "too-many-connections",
    /// The address or name is banned; the text says until when and why.
    BANNED = "banned",
    /// `/reclaim NAME TOKEN` with a token not issued to the connection holding NAME.
    RECLAIM_REFUSED = "reclaim-refused",
    /// A clustered room's shared state cannot be reached: no name can be taken right now.
    UNAVAILABLE = "unavailable",
    /// A clustered room could not take the client's last line; it was not delivered.
    NOT_DELIVERED = "not-delivered",
}

/// Builds one encoded line; used for every frame so each is allocated exactly once.
fn frame(parts: &[&str]) -> Bytes {
    let len = parts.iter().map(|p| p.len()).sum::<usize>() + 1;
    let mut b = BytesMut::with_capacity(len);
    for p in parts {
        b.put_slice(p.as_bytes());
    }
    b.put_u8(b'\n');
    b.freeze()
}

/// `*** KIND text`.
pub fn server_line(kind: &str, text: &str) -> Bytes {
    frame(&[SERVER_PREFIX, kind, " ", text])
}

/// `*** ERR code text`.
pub fn error_line(code: &str, text: &str) -> Bytes {
    frame(&[SERVER_PREFIX, kind::ERR, " ", code, " ", text])
}

/// `*** WELCOME <name> you are chatting as <name>; ...; at most <rate> lines/s, bursts of
/// <burst>`: the name accepted, and the flood limits (see [`flood_limits_text`]).
pub fn welcome_line(name: &str, rate: u64, burst: u64) -> Bytes {
    let text = format!(
        "you are chatting as {name}; type /help for commands; {}",
        flood_limits_text(rate, burst)
    );
    frame(&[SERVER_PREFIX, kind::WELCOME, " ", name, " ", &text])
}

/// `*** JOIN <name> joined`.
pub fn join_line(name: &str) -> Bytes {
    frame(&[SERVER_PREFIX, kind::JOIN, " ", name, JOINED])
}

/// `*** LEAVE <name> left (<reason>)`.
pub fn leave_line(name: &str, reason: &str) -> Bytes {
    frame(&[SERVER_PREFIX, kind::LEAVE, " ", name, LEFT, reason, ")"])
}

/// `*** NICK <old> is now known as <new>`.
pub fn nick_line(old: &str, new: &str) -> Bytes {
    frame(&[SERVER_PREFIX, kind::NICK, " ", old, NOW_KNOWN_AS, new])
}

/// `*** KICK <name> was kicked (<reason>)`, told to everyone but the one kicked.
pub fn kick_line(name: &str, reason: &str) -> Bytes {
    frame(&[
        SERVER_PREFIX,
        kind::KICK,
        " ",
        name,
        WAS_KICKED,
        reason,
        ")",
    ])
}

/// `*** WHO <count> <name> <name> ...`.
pub fn who_line<S: AsRef<str>>(names: &[S]) -> Bytes {
    let list: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
    who_frame(list.len(), &list.join(" "))
}

/// `*** WHO <count> <names>` with the names already joined by spaces.
fn who_frame(count: usize, names: &str) -> Bytes {
    frame(&[
        SERVER_PREFIX,
        kind::WHO,
        " ",
        &count.to_string(),
        " ",
        names,
    ])
}

/// `NAME: text`, a message to the room.
pub fn chat_line(name: &str, text: &str) -> Bytes {
    frame(&[name, ": ", text])
}

/// `* NAME text`, an action.
pub fn action_line(name: &str, text: &str) -> Bytes {
    frame(&["* ", name, " ", text])
}

/// Appends a message (`NAME: text`) or, with `action`, an action (`* NAME text`) to `buf`,
/// newline included: the bytes [`chat_line`] and [`action_line`] make, for a buffer that holds
/// several lines (a member's lines that arrived together are encoded into one).
pub fn put_said_line(buf: &mut BytesMut, name: &str, action: bool, text: &str) {
    let parts: [&str; 4] = if action {
        ["* ", name, " ", text]
    } else {
        ["", name, ": ", text]
    };
    buf.reserve(parts.iter().map(|p| p.len()).sum::<usize>() + 1);
    for p in parts {
        buf.put_slice(p.as_bytes());
    }
    buf.put_u8(b'\n');
}

/// `NAME (private): text`, as the recipient sees it.
pub fn private_line(from: &str, text: &str) -> Bytes {
    frame(&[from, PRIVATE, text])
}

/// `-> NAME (private): text`, the sender's copy.
pub fn private_echo_line(to: &str, text: &str) -> Bytes {
    frame(&["-> ", to, PRIVATE, text])
}

/// `*** HISTORY <when> <line>` for a stored line (which still carries its `\n`).
pub fn history_line(when: &str, line: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(SERVER_PREFIX.len() + 9 + when.len() + line.len());
    b.put_slice(SERVER_PREFIX.as_bytes());
    b.put_slice(kind::HISTORY.as_bytes());
    b.put_u8(b' ');
    b.put_slice(when.as_bytes());
    b.put_u8(b' ');
    b.put_slice(line);
    b.freeze()
}

// The fixed words of the structured lines, shared by their encoders and `Event::parse`.
/// After the name in `JOIN`.
const JOINED: &str = " joined";
/// After the name in `LEAVE`, before the reason and its `)`.
const LEFT: &str = " left (";
/// Between the old and the new name in `NICK`.
const NOW_KNOWN_AS: &str = " is now known as ";
/// After the name in `KICK`, before the reason and its `)`.
const WAS_KICKED: &str = " was kicked (";
/// Between the name and the text of a private message and its echo.
const PRIVATE: &str = " (private): ";

/// Makes user text safe to show on any terminal: control characters (C0, C1, DEL), bidi
/// overrides and isolates, zero-width and line-separator characters are replaced by a visible
/// `\u{XXXX}` escape; a tab becomes a space. Returns the input unchanged (no copy) when clean.
pub fn sanitize(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(is_unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c == '\t' {
            out.push(' ');
        } else if is_unsafe_char(c) {
            out.push_str(&format!("\\u{{{:04x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Characters that must never reach a terminal raw.
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}'   // zero-width space/joiners, LRM, RLM
            | '\u{2028}'..='\u{202e}' // line/paragraph separators, bidi embeddings/overrides
            | '\u{2060}'..='\u{2069}' // word joiner, invisible operators, bidi isolates
            | '\u{061c}'              // Arabic letter mark
            | '\u{00ad}'              // soft hyphen
            | '\u{feff}'              // zero-width no-break space / BOM
        )
}

/// The names in a `*** WHO` line, as sent: separated by spaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameList<'a>(pub &'a str);

impl<'a> NameList<'a> {
    /// Each name, in the order the server sent them.
    pub fn iter(&self) -> impl Iterator<Item = &'a str> + use<'a> {
        self.0.split(' ').filter(|n| !n.is_empty())
    }
}

/// One line received from the server, typed by its shape (docs/protocol.md, "Line shapes").
///
/// Every field borrows from the line. [`Event::parse`] reads any line (it never fails: what fits
/// no form is [`Event::Server`] or [`Event::Other`]); [`Event::encode`] writes the line back, and
/// `Event::parse(encode(e)) == e` for every event whose names are valid names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// `*** HELLO <text>`: the greeting on connect.
    Hello {
        /// `chatd <version> - ...`.
        text: &'a str,
    },
    /// `*** WELCOME <name> <text>`: the name was accepted; the text ends with the flood limits
    /// ([`Event::flood_limits`]).
    Welcome {
        /// The name as the server will show it.
        name: &'a str,
        /// The rest of the line.
        text: &'a str,
    },
    /// `*** MOTD <text>`: one line of the message of the day.
    Motd {
        /// The line.
        text: &'a str,
    },
    /// `*** HISTORY <time> <line>`: a past message in its original shape ([`Event::inner`]).
    History {
        /// When it was said, RFC 3339 UTC.
        when: &'a str,
        /// The stored line (a chat line or an action).
        line: &'a str,
    },
    /// `*** JOIN <name> joined`.
    Join {
        /// Who joined.
        name: &'a str,
    },
    /// `*** LEAVE <name> left (<reason>)`.
    Leave {
        /// Who left.
        name: &'a str,
        /// Why: `quit`, `connection lost`, `reconnected`, ...
        reason: &'a str,
    },
    /// `*** NICK <old> is now known as <new>`.
    Nick {
        /// The name before.
        old: &'a str,
        /// The name now.
        new: &'a str,
    },
    /// `*** KICK <name> was kicked (<reason>)`: someone else was kicked.
    Kick {
        /// Who was kicked.
        name: &'a str,
        /// The operators' reason.
        reason: &'a str,
    },
    /// `*** KICKED <reason>`: we were kicked; the server closes right after.
    Kicked {
        /// The operators' reason.
        reason: &'a str,
    },
    /// `*** NOTICE <text>`: an announcement from the operators.
    Notice {
        /// The announcement.
        text: &'a str,
    },
    /// `*** WHO <count> <names...>`: the answer to `/who`.
    Who {
        /// How many are online.
        count: usize,
        /// Their names.
        names: NameList<'a>,
    },
    /// `*** INFO <text>`: a reply to a command (`/help`).
    Info {
        /// The reply.
        text: &'a str,
    },
    /// `*** ERR <code> <text>`: an error; codes are in [`code`].
    Err {
        /// The error code, e.g. [`code::NAME_TAKEN`].
        code: &'a str,
        /// The explanation.
        text: &'a str,
    },
    /// `*** BYE <text>`: the answer to `quit`; the server closes right after.
    Bye {
        /// The farewell.
        text: &'a str,
    },
    /// `*** SHUTDOWN <text>`: the server is stopping and closes right after.
    Shutdown {
        /// The explanation.
        text: &'a str,
    },
    /// `*** TOKEN <token> <text>`: this connection's reclaim token, the answer to `/token`.
    Token {
        /// The secret (32 lower-case hex digits from chatd).
        token: &'a str,
        /// The explanation.
        text: &'a str,
    },
    /// `NAME: text`, a message to the room.
    Chat {
        /// The sender.
        name: &'a str,
        /// The message.
        text: &'a str,
    },
    /// `* NAME text`, an action (`/me`).
    Action {
        /// Who acted.
        name: &'a str,
        /// What they did.
        text: &'a str,
    },
    /// `NAME (private): text`, a private message to us.
    Private {
        /// The sender.
        from: &'a str,
        /// The message.
        text: &'a str,
    },
    /// `-> NAME (private): text`, our copy of a private message we sent.
    PrivateEcho {
        /// The recipient.
        to: &'a str,
        /// The message.
        text: &'a str,
    },
    /// A server line of a kind this version does not know, or not in its kind's form.
    Server {
        /// The kind, e.g. `JOIN`.
        kind: &'a str,
        /// Everything after the kind (may be empty).
        rest: &'a str,
    },
    /// A line of no shape of the protocol (another kind of server, or a violation).
    Other(&'a str),
}

/// Whether `s` could be a name on the wire: not empty, and none of the characters that
/// separate a name from the rest of a line (names can contain none of them).
fn name_like(s: &str) -> bool {
    !s.is_empty() && !s.contains([' ', ':', '*', '>'])
}

/// `first rest` split at the first space; no space: all of it and `""`.
fn first_word(s: &str) -> (&str, &str) {
    s.split_once(' ').unwrap_or((s, ""))
}

impl<'a> Event<'a> {
    /// Reads one line (without its terminator).
    pub fn parse(line: &'a str) -> Event<'a> {
        if let Some(body) = line.strip_prefix(SERVER_PREFIX) {
            let (kind, rest) = first_word(body);
            return Event::server(kind, rest).unwrap_or(Event::Server { kind, rest });
        }
        if let Some(body) = line.strip_prefix("* ")
            && let Some((name, text)) = body.split_once(' ')
            && name_like(name)
        {
            return Event::Action { name, text };
        }
        if let Some(body) = line.strip_prefix("-> ")
            && let Some((to, text)) = body.split_once(PRIVATE)
            && name_like(to)
        {
            return Event::PrivateEcho { to, text };
        }
        if let Some((from, text)) = line.split_once(PRIVATE)
            && name_like(from)
        {
            return Event::Private { from, text };
        }
        if let Some((name, text)) = line.split_once(": ")
            && name_like(name)
        {
            return Event::Chat { name, text };
        }
        Event::Other(line)
    }

    /// A server line of a known kind in its kind's form; `None` otherwise.
    fn server(k: &str, rest: &'a str) -> Option<Event<'a>> {
        let (subject, tail) = first_word(rest);
        let name = || name_like(subject).then_some(subject);
        Some(match k {
            kind::HELLO => Event::Hello { text: rest },
            kind::WELCOME => Event::Welcome {
                name: subject,
                text: tail,
            },
            kind::MOTD => Event::Motd { text: rest },
            kind::HISTORY => Event::History {
                when: subject,
                line: tail,
            },
            kind::JOIN => Event::Join {
                name: rest.strip_suffix(JOINED).filter(|n| name_like(n))?,
            },
            kind::LEAVE => Event::Leave {
                name: name()?,
                reason: bracketed(rest, subject, LEFT)?,
            },
            kind::NICK => {
                let new = rest.strip_prefix(subject)?.strip_prefix(NOW_KNOWN_AS)?;
                Event::Nick {
                    old: name()?,
                    new: name_like(new).then_some(new)?,
                }
            }
            kind::KICK => Event::Kick {
                name: name()?,
                reason: bracketed(rest, subject, WAS_KICKED)?,
            },
            kind::KICKED => Event::Kicked { reason: rest },
            kind::NOTICE => Event::Notice { text: rest },
            kind::WHO => Event::Who {
                count: subject.parse().ok()?,
                names: NameList(tail),
            },
            kind::INFO => Event::Info { text: rest },
            kind::ERR => Event::Err {
                code: subject,
                text: tail,
            },
            kind::BYE => Event::Bye { text: rest },
            kind::SHUTDOWN => Event::Shutdown { text: rest },
            kind::TOKEN => Event::Token {
                token: subject,
                text: tail,
            },
            _ => return None,
        })
    }

    /// The line, encoded as the server sends it (with its `\n`).
    pub fn encode(&self) -> Bytes {
        match *self {
            Event::Hello { text } => server_line(kind::HELLO, text),
            Event::Welcome { name, text } => server_line(kind::WELCOME, &words(name, text)),
            Event::Motd { text } => server_line(kind::MOTD, text),
            Event::History { when, line } => history_line(when, format!("{line}\n").as_bytes()),
            Event::Join { name } => join_line(name),
            Event::Leave { name, reason } => leave_line(name, reason),
            Event::Nick { old, new } => nick_line(old, new),
            Event::Kick { name, reason } => kick_line(name, reason),
            Event::Kicked { reason } => server_line(kind::KICKED, reason),
            Event::Notice { text } => server_line(kind::NOTICE, text),
            Event::Who { count, names } => who_frame(count, names.0),
            Event::Info { text } => server_line(kind::INFO, text),
            Event::Err { code, text } => error_line(code, text),
            Event::Bye { text } => server_line(kind::BYE, text),
            Event::Shutdown { text } => server_line(kind::SHUTDOWN, text),
            Event::Token { token, text } => server_line(kind::TOKEN, &words(token, text)),
            Event::Chat { name, text } => chat_line(name, text),
            Event::Action { name, text } => action_line(name, text),
            Event::Private { from, text } => private_line(from, text),
            Event::PrivateEcho { to, text } => private_echo_line(to, text),
            Event::Server { kind, rest } => server_line(kind, rest),
            Event::Other(line) => frame(&[line]),
        }
    }

    /// The line a `HISTORY` event replays, parsed; `None` for other events.
    pub fn inner(&self) -> Option<Event<'a>> {
        match *self {
            Event::History { line, .. } => Some(Event::parse(line)),
            _ => None,
        }
    }

    /// The (rate, burst) a `WELCOME` announces (see [`flood_limits_text`]); `None` for other
    /// events or a server that does not announce them.
    pub fn flood_limits(&self) -> Option<(u64, u64)> {
        match *self {
            Event::Welcome { text, .. } => parse_flood_limits(text),
            _ => None,
        }
    }
}

/// The reason in `<subject><marker><reason>)`, the form of `LEAVE` and `KICK`.
fn bracketed<'a>(rest: &'a str, subject: &str, marker: &str) -> Option<&'a str> {
    rest.strip_prefix(subject)?
        .strip_prefix(marker)?
        .strip_suffix(')')
}

/// `first text`: a server line's subject and the rest of its text.
fn words(first: &str, text: &str) -> String {
    format!("{first} {text}")
}

/// The end of a `WELCOME` text: the flood limits, so a client can pace itself from its first
/// line. [`parse_flood_limits`] reads it back.
pub fn flood_limits_text(rate: u64, burst: u64) -> String {
    format!("at most {rate} lines/s, bursts of {burst}")
}

/// The (rate, burst) a `WELCOME` text announces (see [`flood_limits_text`]), if it does.
pub fn parse_flood_limits(welcome: &str) -> Option<(u64, u64)> {
    let rest = &welcome[welcome.rfind("at most ")? + "at most ".len()..];
    let (rate, rest) = rest.split_once(" lines/s, bursts of ")?;
    Some((rate.trim().parse().ok()?, leading_number(rest)?))
}

/// The text of `ERR rate-limited`: the limits in force and how long to wait.
/// [`parse_rate_limited`] reads it back.
pub fn rate_limited_text(rate: u64, burst: u64, retry_ms: u64) -> String {
    format!(
        "line not sent: more than {rate} lines per second (limits.message-rate, bursts of \
         limits.message-burst = {burst}); retry in {retry_ms}ms"
    )
}

/// The (rate, burst, retry in ms) an `ERR rate-limited` text names (see
/// [`rate_limited_text`]); each is `None` if the text lacks it.
pub fn parse_rate_limited(text: &str) -> (Option<u64>, Option<u64>, Option<u64>) {
    let after = |marker: &str| leading_number(&text[text.find(marker)? + marker.len()..]);
    (
        after("more than "),
        after("message-burst = "),
        after("retry in "),
    )
}

/// The decimal number at the start of `s` (after spaces).
fn leading_number(s: &str) -> Option<u64> {
    let s = s.trim_start();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    s[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn limit_texts_parse_back() {
        let welcome = format!("ann you are chatting as ann; {}", flood_limits_text(5, 10));
        assert_eq!(parse_flood_limits(&welcome), Some((5, 10)));
        assert_eq!(parse_flood_limits("ann you are chatting as ann"), None);
        assert_eq!(
            parse_rate_limited(&rate_limited_text(2, 3, 500)),
            (Some(2), Some(3), Some(500))
        );
        assert_eq!(parse_rate_limited("slow down"), (None, None, None));
    }

    fn s(b: &Bytes) -> &str {
        std::str::from_utf8(b).unwrap_or("<bad utf8>")
    }

    /// Parses an encoded line as a client would (without its terminator).
    fn parsed(b: &Bytes) -> Event<'_> {
        Event::parse(s(b).strip_suffix('\n').unwrap_or("<no newline>"))
    }

    #[test]
    fn encodes_each_shape() {
        assert_eq!(s(&chat_line("alice", "hi")), "alice: hi\n");
        assert_eq!(s(&action_line("alice", "waves")), "* alice waves\n");
        let mut both = BytesMut::new();
        put_said_line(&mut both, "alice", false, "hi");
        put_said_line(&mut both, "alice", true, "waves");
        let one_by_one = [chat_line("alice", "hi"), action_line("alice", "waves")].concat();
        assert_eq!(&both[..], &one_by_one[..]);
        assert_eq!(
            s(&server_line(kind::JOIN, "bob joined")),
            "*** JOIN bob joined\n"
        );
        assert_eq!(
            s(&error_line(code::NAME_TAKEN, "x")),
            "*** ERR name-taken x\n"
        );
        assert_eq!(s(&private_line("a", "psst")), "a (private): psst\n");
        assert_eq!(s(&private_echo_line("b", "psst")), "-> b (private): psst\n");
        let h = history_line("2026-01-01T00:00:00Z", b"a: hi\n");
        assert_eq!(s(&h), "*** HISTORY 2026-01-01T00:00:00Z a: hi\n");
        // The structured encoders write what chatd writes with `server_line` today.
        assert_eq!(join_line("bob"), server_line(kind::JOIN, "bob joined"));
        assert_eq!(
            leave_line("bo", "quit"),
            server_line(kind::LEAVE, "bo left (quit)")
        );
        assert_eq!(
            nick_line("a", "b"),
            server_line(kind::NICK, "a is now known as b")
        );
        assert_eq!(
            kick_line("a", "spam"),
            server_line(kind::KICK, "a was kicked (spam)")
        );
        assert_eq!(who_line(&["a", "b"]), server_line(kind::WHO, "2 a b"));
        assert_eq!(who_line::<&str>(&[]), server_line(kind::WHO, "0 "));
        assert_eq!(
            welcome_line("ann", 5, 10),
            server_line(
                kind::WELCOME,
                "ann you are chatting as ann; type /help for commands; at most 5 lines/s, \
                 bursts of 10"
            )
        );
    }

    #[test]
    fn parses_what_the_server_sends() {
        assert_eq!(
            parsed(&welcome_line("ann", 5, 10)).flood_limits(),
            Some((5, 10))
        );
        assert_eq!(
            parsed(&leave_line("bo", "too slow: outbound queue full")),
            Event::Leave {
                name: "bo",
                reason: "too slow: outbound queue full"
            }
        );
        assert_eq!(
            parsed(&kick_line("bo", "spam (again)")),
            Event::Kick {
                name: "bo",
                reason: "spam (again)"
            }
        );
        let who = who_line(&["ann", "Bob"]);
        let who = parsed(&who);
        assert!(
            matches!(who, Event::Who { count: 2, names } if names.iter().eq(["ann", "Bob"])),
            "{who:?}"
        );
        let h = history_line("2026-01-01T00:00:00Z", b"* al waves\n");
        assert_eq!(
            parsed(&h).inner(),
            Some(Event::Action {
                name: "al",
                text: "waves"
            })
        );
        // A chat message whose text looks like a private message's marker stays a chat line.
        assert_eq!(
            parsed(&chat_line("al", "(private): x")),
            Event::Chat {
                name: "al",
                text: "(private): x"
            }
        );
    }

    #[test]
    fn lines_out_of_form_are_kept_whole() {
        for (line, want) in [
            (
                "*** JOIN bob",
                Event::Server {
                    kind: "JOIN",
                    rest: "bob",
                },
            ),
            (
                "*** NICK a is b",
                Event::Server {
                    kind: "NICK",
                    rest: "a is b",
                },
            ),
            (
                "*** WHO x a",
                Event::Server {
                    kind: "WHO",
                    rest: "x a",
                },
            ),
            (
                "*** PING 1",
                Event::Server {
                    kind: "PING",
                    rest: "1",
                },
            ),
            ("hello there", Event::Other("hello there")),
            ("* lonely", Event::Other("* lonely")),
        ] {
            assert_eq!(Event::parse(line), want, "{line}");
        }
    }

    #[test]
    fn sanitize_neutralises_escapes_and_bidi() {
        assert!(matches!(
            sanitize("plain ünïcode"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(sanitize("a\x1b[31mb"), "a\\u{001b}[31mb");
        assert_eq!(sanitize("x\u{202e}y\u{200b}"), "x\\u{202e}y\\u{200b}");
        assert_eq!(sanitize("t\tu\r"), "t u\\u{000d}");
        assert_eq!(sanitize("\u{9b}c"), "\\u{009b}c");
    }

    #[test]
    fn kind_and_code_lists_have_no_duplicates() {
        for list in [ALL_KINDS, ALL_CODES] {
            let mut sorted = list.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), list.len(), "{list:?}");
        }
    }

    /// One event of every shape, built from the given parts.
    fn every_shape<'a>(
        name: &'a str,
        other: &'a str,
        text: &'a str,
        word: &'a str,
        names: &'a str,
        count: usize,
        stored: &'a str,
    ) -> Vec<Event<'a>> {
        vec![
            Event::Hello { text },
            Event::Welcome { name, text },
            Event::Motd { text },
            Event::History {
                when: word,
                line: stored,
            },
            Event::Join { name },
            Event::Leave { name, reason: text },
            Event::Nick {
                old: name,
                new: other,
            },
            Event::Kick { name, reason: text },
            Event::Kicked { reason: text },
            Event::Notice { text },
            Event::Who {
                count,
                names: NameList(names),
            },
            Event::Info { text },
            Event::Err { code: word, text },
            Event::Bye { text },
            Event::Shutdown { text },
            Event::Token { token: word, text },
            Event::Chat { name, text },
            Event::Action { name, text },
            Event::Private { from: name, text },
            Event::PrivateEcho { to: name, text },
        ]
    }

    /// The kind an event of a server shape is sent as.
    fn kind_of(e: &Event<'_>) -> Option<String> {
        let line = String::from_utf8_lossy(&e.encode()).into_owned();
        let body = line.strip_prefix(SERVER_PREFIX)?;
        Some(first_word(body.trim_end()).0.to_owned())
    }

    #[test]
    fn every_kind_has_its_own_event() {
        let shapes = every_shape("ann", "bob", "hi", "w", "ann bob", 2, "ann: hi");
        let mut kinds: Vec<String> = shapes.iter().filter_map(kind_of).collect();
        kinds.sort_unstable();
        let mut all: Vec<String> = ALL_KINDS.iter().map(|k| (*k).to_owned()).collect();
        all.sort_unstable();
        assert_eq!(kinds, all);
        for e in shapes {
            assert!(!matches!(e, Event::Server { .. } | Event::Other(_)));
        }
    }

    /// Names as the name rules allow them, plus the letters of other scripts.
    const NAME: &str = "[a-zA-Z0-9ä日][a-zA-Z0-9_.ä日-]{0,12}";
    /// Any text a line can carry (no line break; the server sanitises the rest).
    const TEXT: &str = "[^\n\r]{0,40}";
    /// One word: a code, a token or a time.
    const WORD: &str = "[a-z0-9:TZ-]{1,32}";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Every shape the server sends reads back as the event it was encoded from.
        #[test]
        fn every_shape_round_trips(
            name in NAME,
            other in NAME,
            text in TEXT,
            word in WORD,
            names in proptest::collection::vec(NAME, 0..6),
            stored_is_action in any::<bool>(),
        ) {
            let names = names.join(" ");
            let stored = if stored_is_action {
                format!("* {other} {text}")
            } else {
                format!("{other}: {text}")
            };
            let count = names.split(' ').filter(|n| !n.is_empty()).count();
            for event in every_shape(&name, &other, &text, &word, &names, count, &stored) {
                let bytes = event.encode();
                prop_assert_eq!(parsed(&bytes), event);
                if let Event::History { line, .. } = event {
                    prop_assert_eq!(event.inner(), Some(Event::parse(line)));
                    let replayed = matches!(
                        event.inner(),
                        Some(Event::Chat { .. } | Event::Action { .. })
                    );
                    prop_assert!(replayed, "{:?}", event);
                }
            }
            // A kind this version does not know stays a generic server line.
            let unknown = Event::Server { kind: "FUTURE", rest: &text };
            let bytes = unknown.encode();
            prop_assert_eq!(parsed(&bytes), unknown);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        /// Whatever a user sends, what reaches another terminal has no unsafe character, and
        /// clean text passes through untouched.
        #[test]
        fn sanitized_text_is_terminal_safe(text in "\\PC*|[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}\\u{200b}-\\u{202e}\\u{2060}-\\u{2069}a ]{0,40}") {
            let out = sanitize(&text);
            prop_assert!(!out.chars().any(is_unsafe_char), "{out:?}");
            if !text.chars().any(is_unsafe_char) {
                prop_assert_eq!(out.as_ref(), text.as_str());
            }
            // Any line parses, and a line of a known shape encodes back to itself.
            let event = Event::parse(&text);
            if !matches!(event, Event::Other(_) | Event::Server { .. }) && !text.contains('\n') {
                let again = event.encode();
                prop_assert_eq!(parsed(&again), event);
            }
        }
    }
}
