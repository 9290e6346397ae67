//! What a chatting user's line means: a message, `quit`, or a slash command. Pure parsing, no
//! effects; the session carries the result out.

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
    match cmd.to_ascii_lowercase().as_str() {
        "quit" | "exit" => Input::Quit,
        "who" | "names" => Input::Who,
        "help" => Input::Help,
        "token" => Input::Token,
        "me" if !args.is_empty() => Input::Me(args),
        "me" => Input::Usage("usage: /me ACTION"),
        "msg" | "m" => match args.split_once(char::is_whitespace) {
            Some((to, text)) if !text.trim().is_empty() => Input::Msg {
                to,
                text: text.trim_start(),
            },
            _ => Input::Usage("usage: /msg NAME TEXT"),
        },
        "nick" if !args.is_empty() && !args.contains(char::is_whitespace) => Input::Nick(args),
        "nick" => Input::Usage("usage: /nick NEWNAME"),
        _ => Input::Unknown(cmd),
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
        assert_eq!(parse("/ME waves  hi"), Input::Me("waves  hi"));
        assert_eq!(parse("/me"), Input::Usage("usage: /me ACTION"));
        assert_eq!(
            parse("/msg bob  hi there"),
            Input::Msg {
                to: "bob",
                text: "hi there"
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
    }
}
