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

use bytes::{BufMut, Bytes, BytesMut};

/// Every server line starts with this.
pub const SERVER_PREFIX: &str = "*** ";

/// The kinds of server line, as sent after [`SERVER_PREFIX`].
pub mod kind {
    /// Greeting on connect; asks for a name.
    pub const HELLO: &str = "HELLO";
    /// An error: `*** ERR <code> <text>`.
    pub const ERR: &str = "ERR";
    /// Name accepted: `*** WELCOME <name> <text>`.
    pub const WELCOME: &str = "WELCOME";
    /// One line of the message of the day.
    pub const MOTD: &str = "MOTD";
    /// A past message: `*** HISTORY <rfc3339-utc> <line>`.
    pub const HISTORY: &str = "HISTORY";
    /// `*** JOIN <name> joined`.
    pub const JOIN: &str = "JOIN";
    /// `*** LEAVE <name> left (<reason>)`.
    pub const LEAVE: &str = "LEAVE";
    /// `*** NICK <old> is now known as <new>`.
    pub const NICK: &str = "NICK";
    /// `*** KICK <name> was kicked (<reason>)`, to everyone else.
    pub const KICK: &str = "KICK";
    /// `*** KICKED <reason>`, to the user being kicked, just before the server closes.
    pub const KICKED: &str = "KICKED";
    /// An announcement from the operators: `*** NOTICE <text>`.
    pub const NOTICE: &str = "NOTICE";
    /// `*** WHO <count> <name> <name> ...`.
    pub const WHO: &str = "WHO";
    /// A reply to a command: `*** INFO <text>`.
    pub const INFO: &str = "INFO";
    /// The server closes after a `quit`: `*** BYE <text>`.
    pub const BYE: &str = "BYE";
    /// The server is stopping: `*** SHUTDOWN <text>`.
    pub const SHUTDOWN: &str = "SHUTDOWN";
    /// Answer to `/token`: `*** TOKEN <token> <text>`, this connection's reclaim token.
    pub const TOKEN: &str = "TOKEN";
}

/// Every server line kind, for documentation checks and clients.
pub const ALL_KINDS: &[&str] = &[
    kind::HELLO,
    kind::ERR,
    kind::WELCOME,
    kind::MOTD,
    kind::HISTORY,
    kind::JOIN,
    kind::LEAVE,
    kind::NICK,
    kind::KICK,
    kind::KICKED,
    kind::NOTICE,
    kind::WHO,
    kind::INFO,
    kind::BYE,
    kind::SHUTDOWN,
    kind::TOKEN,
];

/// Every error code, for documentation checks and clients.
pub const ALL_CODES: &[&str] = &[
    code::NAME_INVALID,
    code::NAME_RESERVED,
    code::NAME_TAKEN,
    code::LINE_TOO_LONG,
    code::BAD_UTF8,
    code::UNKNOWN_COMMAND,
    code::BAD_ARGUMENTS,
    code::NO_SUCH_USER,
    code::SERVER_FULL,
    code::NAME_TIMEOUT,
    code::TOO_SLOW,
    code::RATE_LIMITED,
    code::FLOODING,
    code::TOO_MANY_CONNECTIONS,
    code::BANNED,
    code::RECLAIM_REFUSED,
];

/// Error codes sent in `*** ERR <code> <text>`.
pub mod code {
    /// The name has characters outside the allowed set, is empty or too long.
    pub const NAME_INVALID: &str = "name-invalid";
    /// The name is reserved for the server or staff.
    pub const NAME_RESERVED: &str = "name-reserved";
    /// Someone online has the name.
    pub const NAME_TAKEN: &str = "name-taken";
    /// The line was longer than `limits.max-line-length`.
    pub const LINE_TOO_LONG: &str = "line-too-long";
    /// The line was not valid UTF-8 and was dropped.
    pub const BAD_UTF8: &str = "bad-utf8";
    /// An unknown `/command`.
    pub const UNKNOWN_COMMAND: &str = "unknown-command";
    /// A command with missing or bad arguments.
    pub const BAD_ARGUMENTS: &str = "bad-arguments";
    /// `/msg` to a name that is not online.
    pub const NO_SUCH_USER: &str = "no-such-user";
    /// No more connections are accepted right now.
    pub const SERVER_FULL: &str = "server-full";
    /// No name was chosen within `limits.name-timeout`.
    pub const NAME_TIMEOUT: &str = "name-timeout";
    /// The client did not read fast enough and its queue overflowed.
    pub const TOO_SLOW: &str = "too-slow";
    /// More lines than `limits.message-rate` allows; the line was not sent.
    pub const RATE_LIMITED: &str = "rate-limited";
    /// Refused too often for flooding; the server closes right after.
    pub const FLOODING: &str = "flooding";
    /// Too many connections from one address.
    pub const TOO_MANY_CONNECTIONS: &str = "too-many-connections";
    /// The address or name is banned; the text says until when and why.
    pub const BANNED: &str = "banned";
    /// `/reclaim NAME TOKEN` with a token not issued to the connection holding NAME.
    pub const RECLAIM_REFUSED: &str = "reclaim-refused";
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

/// `NAME: text`, a message to the room.
pub fn chat_line(name: &str, text: &str) -> Bytes {
    frame(&[name, ": ", text])
}

/// `* NAME text`, an action.
pub fn action_line(name: &str, text: &str) -> Bytes {
    frame(&["* ", name, " ", text])
}

/// `NAME (private): text`, as the recipient sees it.
pub fn private_line(from: &str, text: &str) -> Bytes {
    frame(&[from, " (private): ", text])
}

/// `-> NAME (private): text`, the sender's copy.
pub fn private_echo_line(to: &str, text: &str) -> Bytes {
    frame(&["-> ", to, " (private): ", text])
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

/// A line received from the server, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// `*** KIND rest`.
    Server {
        /// The kind, e.g. `JOIN`.
        kind: &'a str,
        /// Everything after the kind (may be empty).
        rest: &'a str,
    },
    /// `* NAME text`.
    Action {
        /// Who acted.
        name: &'a str,
        /// What they did.
        text: &'a str,
    },
    /// `NAME (private): text`.
    Private {
        /// The sender.
        from: &'a str,
        /// The message.
        text: &'a str,
    },
    /// `-> NAME (private): text`.
    PrivateEcho {
        /// The recipient.
        to: &'a str,
        /// The message.
        text: &'a str,
    },
    /// `NAME: text`.
    Chat {
        /// The sender.
        name: &'a str,
        /// The message.
        text: &'a str,
    },
    /// Anything else (a server of another kind, or a protocol violation).
    Other(&'a str),
}

impl<'a> Incoming<'a> {
    /// Classifies one line (without its terminator).
    pub fn parse(line: &'a str) -> Incoming<'a> {
        if let Some(body) = line.strip_prefix(SERVER_PREFIX) {
            let (kind, rest) = body.split_once(' ').unwrap_or((body, ""));
            return Incoming::Server { kind, rest };
        }
        if let Some(body) = line.strip_prefix("* ")
            && let Some((name, text)) = body.split_once(' ')
        {
            return Incoming::Action { name, text };
        }
        if let Some(body) = line.strip_prefix("-> ")
            && let Some((to, text)) = body.split_once(" (private): ")
        {
            return Incoming::PrivateEcho { to, text };
        }
        if let Some((from, text)) = line.split_once(" (private): ")
            && !from.contains(' ')
        {
            return Incoming::Private { from, text };
        }
        if let Some((name, text)) = line.split_once(": ")
            && !name.is_empty()
            && !name.contains(' ')
        {
            return Incoming::Chat { name, text };
        }
        Incoming::Other(line)
    }
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

/// The first field of a server line's rest and the remainder: `("alice", "joined")`.
pub fn split_subject(rest: &str) -> (&str, &str) {
    rest.split_once(' ').unwrap_or((rest, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn encodes_each_shape() {
        assert_eq!(s(&chat_line("alice", "hi")), "alice: hi\n");
        assert_eq!(s(&action_line("alice", "waves")), "* alice waves\n");
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
    }

    #[test]
    fn parses_what_it_encodes() {
        let cases = [
            (
                chat_line("alice", "a: b"),
                Incoming::Chat {
                    name: "alice",
                    text: "a: b",
                },
            ),
            (
                action_line("al", "x y"),
                Incoming::Action {
                    name: "al",
                    text: "x y",
                },
            ),
            (
                private_line("al", "x"),
                Incoming::Private {
                    from: "al",
                    text: "x",
                },
            ),
            (
                private_echo_line("bo", "x"),
                Incoming::PrivateEcho {
                    to: "bo",
                    text: "x",
                },
            ),
            (
                server_line(kind::LEAVE, "bo left (quit)"),
                Incoming::Server {
                    kind: "LEAVE",
                    rest: "bo left (quit)",
                },
            ),
        ];
        for (bytes, want) in cases {
            let line = s(&bytes).trim_end_matches('\n').to_owned();
            assert_eq!(Incoming::parse(&line), want);
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

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(10_000))]

        /// Whatever a user sends, what reaches another terminal has no unsafe character, and
        /// clean text passes through untouched.
        #[test]
        fn sanitized_text_is_terminal_safe(text in "\\PC*|[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}\\u{200b}-\\u{202e}\\u{2060}-\\u{2069}a ]{0,40}") {
            let out = sanitize(&text);
            proptest::prop_assert!(!out.chars().any(is_unsafe_char), "{out:?}");
            if !text.chars().any(is_unsafe_char) {
                proptest::prop_assert_eq!(out.as_ref(), text.as_str());
            }
            let _ = Incoming::parse(&text);
        }
    }
}
