//! What a user's line means: a message, `quit`, or a slash command while chatting
//! ([`parse`]), and a name, `quit` or `/reclaim NAME TOKEN` before a name is taken
//! ([`parse_naming`]). Pure parsing, no effects; the session carries the result out.
//!
//! [`COMMANDS`] is the one list of chat commands: [`parse`] looks a command word up there
//! before anything else, so a command missing from it is unknown to the parser too, and
//! clients complete and list commands from it.

/// A parsed input line from a user who has a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input<'a> {
    /// Text for the room. `//text` is sent as `/text`.
    Say(&'a str),
    /// A blank line: nothing to send.
    Blank,
    /// `quit` (the seed's word) or `/quit`.
    Quit,
    /// `/who`.
    Who,
    /// `/me ACTION`.
    Me(&'a str),
    /// `/msg NAME TEXT`.
    Msg {
        /// The recipient's name as typed.
        to: &'a str,
        /// The message.
        text: &'a str,
    },
    /// `/nick NEWNAME`.
    Nick(&'a str),
    /// `/help`.
    Help,
    /// `/token`: this connection's reclaim token (reclaim.rs).
    Token,
    /// A known command used wrongly; the text is its usage.
    Usage(&'static str),
    /// `/something` we do not know.
    Unknown(&'a str),
}

/// Which command a [`Command`] entry is; private so that only [`COMMANDS`] names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Quit,
    Who,
    Help,
    Token,
    Me,
    Msg,
    Nick,
}

/// One chat command: how it is typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    /// The command as typed, with its `/`, e.g. `/msg`.
    pub name: &'static str,
    /// Other words for it, without the `/` (`/m` for `/msg`).
    pub aliases: &'static [&'static str],
    verb: Verb,
}

impl Command {
    /// Whether `word` (without the `/`, any case) names this command.
    fn is_called(&self, word: &str) -> bool {
        self.name[1..].eq_ignore_ascii_case(word)
            || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(word))
    }
}

/// Every command a user who has a name may type, in alphabetical order.
pub const COMMANDS: &[Command] = &[
    Command {
        name: "/help",
        aliases: &[],
        verb: Verb::Help,
    },
    Command {
        name: "/me",
        aliases: &[],
        verb: Verb::Me,
    },
    Command {
        name: "/msg",
        aliases: &["m"],
        verb: Verb::Msg,
    },
    Command {
        name: "/nick",
        aliases: &[],
        verb: Verb::Nick,
    },
    Command {
        name: "/quit",
        aliases: &["exit"],
        verb: Verb::Quit,
    },
    Command {
        name: "/token",
        aliases: &[],
        verb: Verb::Token,
    },
    Command {
        name: "/who",
        aliases: &["names"],
        verb: Verb::Who,
    },
];

/// The reply to `/help`, one server line each.
pub const HELP: &[&str] = &[
    "commands: /who, /me ACTION, /msg NAME TEXT, /nick NEWNAME, /help, /quit (or quit)",
    "any other line is sent to everyone; start it with // to send a line beginning with /",
];

/// Classifies one line (already valid UTF-8, without its terminator).
pub fn parse(line: &str) -> Input<'_> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Input::Blank;
    }
    if trimmed.eq_ignore_ascii_case("quit") {
        return Input::Quit;
    }
    if line.starts_with("//") {
        return Input::Say(&line[1..]);
    }
    let Some(body) = trimmed.strip_prefix('/') else {
        return Input::Say(line);
    };
    let (cmd, args) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
    let args = args.trim();
    let Some(command) = COMMANDS.iter().find(|c| c.is_called(cmd)) else {
        return Input::Unknown(cmd);
    };
    match command.verb {
        Verb::Quit => Input::Quit,
        Verb::Who => Input::Who,
        Verb::Help => Input::Help,
        Verb::Token => Input::Token,
        Verb::Me if !args.is_empty() => Input::Me(args),
        Verb::Me => Input::Usage("usage: /me ACTION"),
        Verb::Msg => match args.split_once(char::is_whitespace) {
            Some((to, text)) if !text.trim().is_empty() => Input::Msg {
                to,
                text: text.trim_start(),
            },
            _ => Input::Usage("usage: /msg NAME TEXT"),
        },
        Verb::Nick if !args.is_empty() && !args.contains(char::is_whitespace) => Input::Nick(args),
        Verb::Nick => Input::Usage("usage: /nick NEWNAME"),
    }
}

/// A parsed line from a user who has no name yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming<'a> {
    /// A name to try, as sent (the name rules judge it).
    Name(&'a str),
    /// `quit` or `/quit`, as while chatting.
    Quit,
    /// `/reclaim NAME TOKEN`: take NAME back from a dead connection with its reclaim token.
    Reclaim {
        /// The name as sent.
        name: &'a str,
        /// The token as sent (not yet checked).
        token: &'a str,
    },
    /// `/reclaim` without exactly two arguments; the text is its usage ([`RECLAIM_USAGE`]).
    Usage(&'static str),
}

/// The answer (with `bad-arguments`) to a `/reclaim` without exactly two arguments.
pub const RECLAIM_USAGE: &str = "usage: /reclaim NAME TOKEN";

/// Classifies a name line: `quit`, `/reclaim NAME TOKEN` (command word in any case), or a
/// name. Any other `/word` is a name too (an invalid one), so `/token` before a name is an
/// invalid name, as docs/protocol.md says.
pub fn parse_naming(line: &str) -> Naming<'_> {
    if parse(line) == Input::Quit {
        return Naming::Quit;
    }
    let Some(body) = line.trim().strip_prefix('/') else {
        return Naming::Name(line);
    };
    let mut words = body.split_whitespace();
    if !words
        .next()
        .is_some_and(|w| w.eq_ignore_ascii_case("reclaim"))
    {
        return Naming::Name(line);
    }
    match (words.next(), words.next(), words.next()) {
        (Some(name), Some(token), None) => Naming::Reclaim { name, token },
        _ => Naming::Usage(RECLAIM_USAGE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_quit() {
        assert_eq!(parse("hello"), Input::Say("hello"));
        assert_eq!(parse("  "), Input::Blank);
        assert_eq!(parse("quit"), Input::Quit);
        assert_eq!(parse("QUIT "), Input::Quit);
        assert_eq!(parse("quit now"), Input::Say("quit now"));
        assert_eq!(parse("/quit bye"), Input::Quit);
        assert_eq!(parse("//etc/passwd"), Input::Say("/etc/passwd"));
    }

    #[test]
    fn commands() {
        assert_eq!(parse("/who"), Input::Who);
        assert_eq!(parse("/NAMES"), Input::Who);
        assert_eq!(parse("/exit"), Input::Quit);
        assert_eq!(parse("/ME waves  hi"), Input::Me("waves  hi"));
        assert_eq!(parse("/me"), Input::Usage("usage: /me ACTION"));
        assert_eq!(
            parse("/msg bob  hi there"),
            Input::Msg {
                to: "bob",
                text: "hi there"
            }
        );
        assert_eq!(
            parse("/m bob hi"),
            Input::Msg {
                to: "bob",
                text: "hi"
            }
        );
        assert_eq!(parse("/msg bob"), Input::Usage("usage: /msg NAME TEXT"));
        assert_eq!(parse("/nick carol"), Input::Nick("carol"));
        assert_eq!(parse("/nick a b"), Input::Usage("usage: /nick NEWNAME"));
        assert_eq!(parse("/dance"), Input::Unknown("dance"));
        assert_eq!(parse("/help"), Input::Help);
        assert_eq!(parse("/token"), Input::Token);
        assert_eq!(parse(" /TOKEN "), Input::Token);
        assert_eq!(parse("/tokens"), Input::Unknown("tokens"));
        assert_eq!(parse("token"), Input::Say("token"));
        assert_eq!(parse("/reclaim a b"), Input::Unknown("reclaim"));
    }

    #[test]
    fn every_listed_command_is_known_and_sorted() {
        for c in COMMANDS {
            assert!(c.name.starts_with('/'), "{c:?}");
            assert!(!matches!(parse(c.name), Input::Unknown(_)), "{c:?}");
            for a in c.aliases {
                assert!(!matches!(parse(&format!("/{a}")), Input::Unknown(_)), "{a}");
            }
        }
        assert!(COMMANDS.windows(2).all(|w| w[0].name < w[1].name));
    }

    #[test]
    fn naming_lines() {
        assert_eq!(parse_naming("alice"), Naming::Name("alice"));
        assert_eq!(parse_naming(" alice "), Naming::Name(" alice "));
        assert_eq!(parse_naming(""), Naming::Name(""));
        assert_eq!(parse_naming("quit"), Naming::Quit);
        assert_eq!(parse_naming("/QUIT"), Naming::Quit);
        assert_eq!(
            parse_naming("/reclaim alice 00ff"),
            Naming::Reclaim {
                name: "alice",
                token: "00ff"
            }
        );
        assert_eq!(
            parse_naming(" /Reclaim  alice\t00ff "),
            Naming::Reclaim {
                name: "alice",
                token: "00ff"
            }
        );
        // As chatd's reclaim::parse has read it: the command word may follow the `/` spaced.
        assert_eq!(
            parse_naming("/ reclaim a b"),
            Naming::Reclaim {
                name: "a",
                token: "b"
            }
        );
        assert_eq!(parse_naming("/reclaim alice"), Naming::Usage(RECLAIM_USAGE));
        assert_eq!(parse_naming("/reclaim"), Naming::Usage(RECLAIM_USAGE));
        assert_eq!(parse_naming("/reclaim a b c"), Naming::Usage(RECLAIM_USAGE));
        // Anything else is a name, however invalid: the name rules refuse it.
        assert_eq!(parse_naming("/token"), Naming::Name("/token"));
        assert_eq!(parse_naming("/reclaims a b"), Naming::Name("/reclaims a b"));
        assert_eq!(parse_naming("reclaim a b"), Naming::Name("reclaim a b"));
    }
}
