//! Turns what the server sent (and what the client itself has to say) into lines to show.
//!
//! Every field that came from the network goes through [`sanitize`] here before it is shown, so
//! no byte from the wire can reach the terminal as a control sequence: server lines in
//! [`Renderer::incoming`], and the client's own status lines (which may quote the server) in
//! [`Renderer::status`], or in `Ui::status` on standard error in pipe mode. The editor's own
//! notes sanitise too. Colour codes are added afterwards by [`Renderer::paint`] around
//! already-sanitised text.

use chat_proto::protocol::{ALL_KINDS, Event, sanitize};

use crate::config::UiSection;

/// How one span of a shown line looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    /// Default terminal colours.
    Plain,
    /// The timestamp.
    Time,
    /// Your own name.
    Own,
    /// Someone else's name, with the SGR colour picked for it.
    Name(u8),
    /// Joins, leaves, replies and other server chatter.
    Notice,
    /// An announcement from the operators.
    Announce,
    /// An error from the server or the client.
    Error,
    /// A message that mentions your name.
    Mention,
    /// A private message.
    Private,
    /// The client's own status lines (connecting, lost, ...).
    Status,
}

/// A line ready to show: spans of sanitised text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shown {
    /// The pieces, in order.
    pub spans: Vec<(Tone, String)>,
    /// Whether the line deserves the bell (your name was mentioned).
    pub bell: bool,
}

impl Shown {
    fn push(&mut self, tone: Tone, text: impl Into<String>) {
        self.spans.push((tone, text.into()));
    }

    /// Server chatter: `--- ` and the text, dimmed.
    fn notice(&mut self, text: std::fmt::Arguments<'_>) {
        self.push(Tone::Notice, format!("--- {text}"));
    }

    /// The text without any styling.
    pub fn plain(&self) -> String {
        self.spans.iter().map(|(_, t)| t.as_str()).collect()
    }
}

/// Formats lines for one output.
#[derive(Debug, Clone)]
pub struct Renderer {
    /// Pretty (timestamps, symbols) rather than the wire's own shapes, for people not scripts.
    pub pretty: bool,
    /// Whether [`paint`](Self::paint) adds colour codes.
    pub color: bool,
    /// Settings from the config file.
    pub ui: UiSection,
    /// The name we chat as (for "own" styling and mentions); empty before the welcome.
    pub me: String,
}

impl Renderer {
    /// Formats a line from the server received now; `event` is `line` parsed.
    pub fn incoming(&self, line: &str, event: &Event<'_>) -> Shown {
        if !self.pretty {
            let mut s = Shown::default();
            s.push(Tone::Plain, sanitize(line));
            return s;
        }
        self.shown(event)
    }

    /// An empty shown line, starting with the time when timestamps are shown.
    fn stamped(&self) -> Shown {
        let mut s = Shown::default();
        if self.pretty && self.ui.timestamps {
            s.push(
                Tone::Time,
                format!("{} ", chrono::Local::now().format("%H:%M")),
            );
        }
        s
    }

    /// Formats the client's own copy of a message it sent (the server does not echo them).
    pub fn own_message(&self, text: &str) -> Shown {
        self.shown(&Event::Chat {
            name: &self.me,
            text,
        })
    }

    /// Formats the client's own copy of an action it sent.
    pub fn own_action(&self, text: &str) -> Shown {
        self.shown(&Event::Action {
            name: &self.me,
            text,
        })
    }

    /// Formats an event for people: timestamp, then the line in its pretty form.
    fn shown(&self, event: &Event<'_>) -> Shown {
        let mut s = self.stamped();
        self.body(&mut s, event);
        s
    }

    /// A line from the client itself about the connection or a mistake.
    pub fn status(&self, text: &str) -> Shown {
        let mut s = self.stamped();
        s.push(Tone::Status, format!("-!- {}", sanitize(text)));
        s
    }

    fn name_tone(&self, name: &str) -> Tone {
        if !self.me.is_empty() && name.eq_ignore_ascii_case(&self.me) || name == self.me {
            return Tone::Own;
        }
        let palette = &self.ui.name_colors;
        let pick = (fnv1a(&name.to_lowercase()) % palette.len().max(1) as u64) as usize;
        Tone::Name(palette.get(pick).map_or(0, |c| c.sgr()))
    }

    fn mentions_me(&self, from: &str, text: &str) -> bool {
        !self.me.is_empty() && !from.eq_ignore_ascii_case(&self.me) && mentions(text, &self.me)
    }

    fn body(&self, s: &mut Shown, event: &Event<'_>) {
        match *event {
            Event::Chat { name, text } => {
                let mention = self.mentions_me(name, text);
                s.push(self.name_tone(name), sanitize(name));
                s.push(Tone::Plain, ": ");
                s.push(
                    if mention { Tone::Mention } else { Tone::Plain },
                    sanitize(text),
                );
                s.bell |= mention;
            }
            Event::Action { name, text } => {
                let mention = self.mentions_me(name, text);
                s.push(Tone::Plain, "* ");
                s.push(self.name_tone(name), sanitize(name));
                s.push(
                    if mention { Tone::Mention } else { Tone::Plain },
                    format!(" {}", sanitize(text)),
                );
                s.bell |= mention;
            }
            Event::Private { from, text } => {
                s.push(Tone::Private, "[private] ");
                s.push(self.name_tone(from), sanitize(from));
                s.push(Tone::Private, format!(": {}", sanitize(text)));
                s.bell |= !self.me.is_empty();
            }
            Event::PrivateEcho { to, text } => {
                s.push(Tone::Private, "[private] -> ");
                s.push(self.name_tone(to), sanitize(to));
                s.push(Tone::Private, format!(": {}", sanitize(text)));
            }
            Event::History { when, .. } => {
                // Show the stored line at its own time.
                if self.ui.timestamps
                    && let Some((Tone::Time, t)) = s.spans.last_mut()
                    && let Ok(at) = chrono::DateTime::parse_from_rfc3339(when)
                {
                    *t = format!("{} ", at.with_timezone(&chrono::Local).format("%H:%M"));
                }
                let mut inner = Shown::default();
                if let Some(line) = event.inner() {
                    self.body(&mut inner, &line);
                }
                // History is context, not news: no bell, dimmed.
                for (tone, text) in inner.spans {
                    s.push(
                        if tone == Tone::Mention {
                            Tone::Notice
                        } else {
                            tone
                        },
                        text,
                    );
                }
            }
            Event::Err { text, .. } => s.push(Tone::Error, format!("!!! {}", sanitize(text))),
            Event::Notice { text } => {
                s.push(Tone::Announce, format!("*** NOTICE: {}", sanitize(text)));
            }
            Event::Kicked { reason } => s.push(
                Tone::Error,
                format!("!!! you were kicked: {}", sanitize(reason)),
            ),
            Event::Who { count, names } => {
                let names: Vec<_> = names.iter().collect();
                s.push(
                    Tone::Notice,
                    format!("--- online ({count}): {}", sanitize(&names.join(", "))),
                );
            }
            Event::Welcome { text, .. }
            | Event::Hello { text }
            | Event::Motd { text }
            | Event::Info { text }
            | Event::Bye { text }
            | Event::Shutdown { text } => s.notice(format_args!("{}", sanitize(text))),
            Event::Join { name } => s.notice(format_args!("{} joined", sanitize(name))),
            Event::Leave { name, reason } => s.notice(format_args!(
                "{} left ({})",
                sanitize(name),
                sanitize(reason)
            )),
            Event::Nick { old, new } => s.notice(format_args!(
                "{} is now known as {}",
                sanitize(old),
                sanitize(new)
            )),
            Event::Kick { name, reason } => s.notice(format_args!(
                "{} was kicked ({})",
                sanitize(name),
                sanitize(reason)
            )),
            // Never shown when the client asked for it (it is a secret); shown as sent when
            // the user typed `/token` themselves.
            Event::Token { token, text } => {
                s.notice(format_args!("TOKEN {} {}", sanitize(token), sanitize(text)))
            }
            // A known kind out of its form reads as the server wrote it; an unknown kind keeps
            // its name in front.
            Event::Server { kind, rest } if ALL_KINDS.contains(&kind) => {
                s.notice(format_args!("{}", sanitize(rest)));
            }
            Event::Server { kind, rest } => {
                s.notice(format_args!("{} {}", sanitize(kind), sanitize(rest)));
            }
            Event::Other(text) => s.push(Tone::Plain, sanitize(text)),
        }
    }

    /// The line as terminal text: SGR colour codes around spans when colour is on.
    pub fn paint(&self, shown: &Shown) -> String {
        if !self.color {
            return shown.plain();
        }
        use std::fmt::Write;
        let mut out = String::new();
        for (tone, text) in &shown.spans {
            // Writing into a String cannot fail.
            let _ = match *tone {
                Tone::Plain => {
                    out.push_str(text);
                    continue;
                }
                Tone::Time => write!(out, "\x1b[2m"),
                Tone::Own => write!(out, "\x1b[1;{}m", self.ui.own_color.sgr()),
                Tone::Name(c) => write!(out, "\x1b[{c}m"),
                Tone::Notice => write!(out, "\x1b[{}m", self.ui.notice_color.sgr()),
                Tone::Announce => write!(out, "\x1b[1;33m"),
                Tone::Error => write!(out, "\x1b[1;31m"),
                Tone::Mention => write!(out, "\x1b[1;{}m", self.ui.mention_color.sgr()),
                Tone::Private => write!(out, "\x1b[35m"),
                Tone::Status => write!(out, "\x1b[36m"),
            };
            out.push_str(text);
            out.push_str("\x1b[0m");
        }
        out
    }
}

/// Whether `text` contains `name` as a whole word, ignoring case.
pub fn mentions(text: &str, name: &str) -> bool {
    let text = text.to_lowercase();
    let name = name.to_lowercase();
    if name.is_empty() {
        return false;
    }
    let is_word = |c: char| c.is_alphanumeric() || matches!(c, '_' | '-' | '.');
    let mut from = 0;
    while let Some(i) = text[from..].find(&name) {
        let start = from + i;
        let end = start + name.len();
        let before_ok = text[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !is_word(c));
        // A trailing '.' ends a sentence more often than it continues a name.
        let after_ok = text[end..]
            .chars()
            .next()
            .is_none_or(|c| !is_word(c) || c == '.');
        if before_ok && after_ok {
            return true;
        }
        from = start + name.len().max(1);
    }
    false
}

/// A small stable hash, so a name keeps its colour across runs and machines.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Formats `line` as received from the server.
    fn incoming(r: &Renderer, line: &str) -> Shown {
        r.incoming(line, &Event::parse(line))
    }

    fn pretty(me: &str) -> Renderer {
        Renderer {
            pretty: true,
            color: true,
            ui: UiSection {
                timestamps: false,
                ..UiSection::default()
            },
            me: me.into(),
        }
    }

    #[test]
    fn plain_mode_keeps_wire_shape_but_sanitises() {
        let r = Renderer {
            pretty: false,
            ..pretty("")
        };
        let s = incoming(&r, "bob: hi \x1b[2J there");
        assert_eq!(s.plain(), "bob: hi \\u{001b}[2J there");
    }

    #[test]
    fn escapes_never_reach_painted_output_raw() {
        let r = pretty("ann");
        for line in [
            "b\x1bob: x\x07",
            "* bob \x1b]0;title\x07",
            "*** KICKED \x1b[31mred",
            "*** HISTORY 2026-01-01T00:00:00Z bob: \x1bx",
            "\u{9b}31m",
        ] {
            let painted = r.paint(&incoming(&r, line));
            let stripped = painted
                .replace("\x1b[0m", "")
                .split("\x1b[")
                .enumerate()
                .map(|(i, p)| {
                    if i == 0 {
                        p
                    } else {
                        p.split_once('m').map_or(p, |x| x.1)
                    }
                })
                .collect::<String>();
            assert!(
                !stripped.chars().any(chat_proto::protocol::is_unsafe_char),
                "{line:?} -> {painted:?}"
            );
        }
    }

    #[test]
    fn names_have_stable_colours_and_own_name_stands_out() {
        let r = pretty("ann");
        assert_eq!(r.name_tone("bob"), r.name_tone("BOB"));
        assert_eq!(r.name_tone("Ann"), Tone::Own);
        let s = incoming(&r, "bob: hey ann, look");
        assert!(s.bell);
        assert!(s.spans.iter().any(|(t, _)| *t == Tone::Mention));
        assert!(!incoming(&r, "bob: banner").bell);
    }

    #[test]
    fn mention_word_boundaries() {
        assert!(mentions("hi Ann!", "ann"));
        assert!(mentions("ann.", "ann"));
        assert!(!mentions("joanna", "ann"));
        assert!(!mentions("ann_x", "ann"));
    }

    #[test]
    fn shapes_are_readable() {
        let r = Renderer {
            color: false,
            ..pretty("ann")
        };
        let show = |l: &str| r.paint(&incoming(&r, l));
        assert_eq!(show("* bob waves"), "* bob waves");
        assert_eq!(show("*** JOIN bob joined"), "--- bob joined");
        assert_eq!(show("*** WHO 2 ann bob"), "--- online (2): ann, bob");
        assert_eq!(show("*** KICKED spam"), "!!! you were kicked: spam");
        assert_eq!(show("*** ERR name-taken in use"), "!!! in use");
        assert_eq!(show("bob (private): psst"), "[private] bob: psst");
        assert_eq!(show("-> bob (private): psst"), "[private] -> bob: psst");
        assert_eq!(show("*** HELLO chatd 1 - hi"), "--- chatd 1 - hi");
        assert_eq!(show("*** WELCOME ann you are ann"), "--- you are ann");
        assert_eq!(show("*** LEAVE bob left (quit)"), "--- bob left (quit)");
        assert_eq!(
            show("*** NICK bob is now known as rob"),
            "--- bob is now known as rob"
        );
        assert_eq!(
            show("*** KICK cy was kicked (spam)"),
            "--- cy was kicked (spam)"
        );
        assert_eq!(show("*** NOTICE at noon"), "*** NOTICE: at noon");
        assert_eq!(show("*** TOKEN 00ff keep it"), "--- TOKEN 00ff keep it");
        assert_eq!(show("*** HISTORY 2026-01-01T00:00:00Z bob: hi"), "bob: hi");
        // Out of form or of an unknown kind: shown as sent.
        assert_eq!(show("*** JOIN bob"), "--- bob");
        assert_eq!(show("*** PING 1"), "--- PING 1");
        assert_eq!(show("no shape"), "no shape");
        // Our own lines look like everyone else's.
        assert_eq!(r.paint(&r.own_message("hi")), "ann: hi");
        assert_eq!(r.paint(&r.own_action("waves")), "* ann waves");
    }
}
