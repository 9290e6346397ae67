//! The client's life: find the server, connect, get a name, chat, and on a lost connection
//! reconnect and reclaim the name (see docs/client.md for the reasoning).

use std::sync::Arc;
use std::time::Duration;

use chat_proto::command::{self, Input as Cmd};
use chat_proto::protocol::{Event, code};
use tokio::time::{Instant, sleep_until};

use crate::cli::Cli;
use crate::config::ClientConfig;
use crate::net::{Connection, FromServer};
use crate::pace::Pacer;
use crate::roster::Roster;
use crate::ui::{Input, Ui};
use rustls::ClientConfig as TlsSettings;

/// Offered at the address prompt.
const DEFAULT_HOST: &str = "127.0.0.1";
/// Offered at the port prompt.
const DEFAULT_PORT: u16 = 42069;
/// How long to wait for the server's `*** BYE` after sending `quit`.
const BYE_TIMEOUT: Duration = Duration::from_secs(10);
/// First wait before reconnecting; doubled after each failure up to [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest wait between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a reconnecting client keeps retrying its old name while the server still holds it
/// for the dead connection.
const RECLAIM_FOR: Duration = Duration::from_secs(60);

/// Process exit codes (documented in docs/client.md).
pub mod exit {
    /// Left normally.
    pub const OK: i32 = 0;
    /// Could not connect, the connection was lost, or bad configuration.
    pub const ERROR: i32 = 1;
    /// Missing arguments with nobody to ask.
    pub const USAGE: i32 = 2;
    /// Kicked by the operators.
    pub const KICKED: i32 = 3;
    /// The server refused the name and there was no other to try.
    pub const NAME_REFUSED: i32 = 4;
}

/// Why a chat ended.
enum End {
    /// The user left (quit, `/quit`, Ctrl-D, end of piped input).
    Quit,
    /// The server kicked us, with its reason.
    Kicked(String),
    /// The connection went away without a goodbye.
    Lost(String),
}

/// How a name attempt went.
enum Naming {
    /// Accepted under this (normalised) name.
    Welcome(String),
    /// Refused with this code and text.
    Refused(String, String),
    /// The user gave up (end of input or quit).
    Quit,
    /// The connection ended while naming.
    Lost(String),
}

/// Where the name attempts come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum NameSource {
    /// `--name`: tried once; afterwards asked for when interactive.
    Given,
    /// Asked at a prompt.
    Prompt,
    /// Read from piped standard input, one line per attempt.
    Stdin,
}

/// Runs the client to its end and returns the exit code.
pub async fn run(cli: Cli, config: ClientConfig, mut ui: Ui) -> i32 {
    let code = run_inner(cli, config, &mut ui).await;
    ui.finish();
    code
}

/// The TLS port chatd listens on by default (`tls.listen`), for `chats://HOST` without a port.
const DEFAULT_TLS_PORT: u16 = 42070;

/// `chats://HOST[:PORT]` → (HOST, PORT, TLS); `chat://` the same without TLS; anything else is
/// a plain host name or address.
fn parse_target(text: &str) -> (String, Option<u16>, bool) {
    let (rest, tls) = if let Some(r) = text.strip_prefix("chats://") {
        (r, true)
    } else if let Some(r) = text.strip_prefix("chat://") {
        (r, false)
    } else {
        return (text.to_owned(), None, false);
    };
    let rest = rest.trim_end_matches('/');
    // `[v6]:port`, `host:port`, or a bare host (a bare IPv6 address has several colons).
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => match p.parse::<u16>() {
            Ok(p) => (h, Some(p)),
            Err(_) => (rest, None),
        },
        _ => (rest, None),
    };
    let port = port.or(tls.then_some(DEFAULT_TLS_PORT));
    (
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
        tls,
    )
}

/// The TLS settings, built on first need; a failure (no trusted roots, a bad --ca file) is
/// told and ends the client.
fn tls_settings(
    ui: &mut Ui,
    cli: &Cli,
    tls: &mut Option<Arc<TlsSettings>>,
) -> Result<Option<Arc<TlsSettings>>, i32> {
    if tls.is_none() {
        match crate::net::tls_config(cli.ca.as_deref()) {
            Ok(c) => *tls = Some(c),
            Err(e) => {
                ui.status(&format!("{e:#}"));
                return Err(exit::ERROR);
            }
        }
    }
    Ok(tls.clone())
}

async fn run_inner(cli: Cli, config: ClientConfig, ui: &mut Ui) -> i32 {
    let mut host = cli.host.clone().or(config.server.host.clone());
    let mut port = cli.port.or(config.server.port);
    // TLS when asked for (--tls, --ca, or a chats:// address); never a fallback to plaintext.
    let mut use_tls = cli.tls || cli.ca.is_some();
    let mut tls: Option<Arc<TlsSettings>> = None;
    if let Some(h) = host.take() {
        let (h, p, t) = parse_target(&h);
        host = Some(h);
        port = p.or(port);
        use_tls |= t;
    }
    if !ui.interactive && (host.is_none() || port.is_none()) {
        ui.status(
            "no server given: use chat-client HOST PORT (standard input is not a terminal, so \
             nothing is asked)",
        );
        return exit::USAGE;
    }

    // Connect, asking again on a terminal when it fails.
    let mut conn = loop {
        let h = match host.clone() {
            Some(h) => h,
            None => match ui.ask("server address", Some(DEFAULT_HOST)).await {
                Some(h) => {
                    let (h, p, t) = parse_target(&h);
                    port = p.or(port);
                    use_tls |= t;
                    h
                }
                None => return exit::OK,
            },
        };
        let p = match port {
            Some(p) => p,
            None => match ask_port(ui).await {
                Some(p) => p,
                None => return exit::OK,
            },
        };
        if ui.is_editor() {
            ui.status(&format!("connecting to {h}:{p} ..."));
        }
        let settings = if use_tls {
            match tls_settings(ui, &cli, &mut tls) {
                Ok(t) => t,
                Err(code) => return code,
            }
        } else {
            None
        };
        match Connection::open(&h, p, settings.as_ref()).await {
            Ok(mut c) if ui.is_editor() => match greeting(ui, &mut c, &h, p).await {
                Ok(()) => {
                    host = Some(h);
                    port = Some(p);
                    break c;
                }
                Err(why) => {
                    ui.status(&format!("{h}:{p} {why}; try another address"));
                    host = None;
                    port = None;
                }
            },
            Ok(c) => {
                host = Some(h);
                port = Some(p);
                break c;
            }
            Err(e) if ui.interactive => {
                ui.status(&format!("{e:#}; try another address"));
                host = None;
                port = None;
            }
            Err(e) => {
                ui.status(&format!("{e:#}"));
                return exit::ERROR;
            }
        }
    };
    let (host, port) = (host.unwrap_or_default(), port.unwrap_or(DEFAULT_PORT));

    let source = if cli.name.is_some() {
        NameSource::Given
    } else if ui.interactive {
        NameSource::Prompt
    } else {
        NameSource::Stdin
    };
    let mut roster = Roster::default();
    let mut name = match choose_name(ui, &mut conn, source, cli.name.clone(), &config).await {
        Ok(n) => n,
        Err(code) => return code,
    };
    ui.set_name(&name);
    roster.insert(&name);
    let reconnect = ui.is_editor() && !cli.no_reconnect;
    // The reclaim token of the current connection (docs/protocol.md), asked for only when it
    // may be used.
    let mut token: Option<String> = None;

    loop {
        let end = chat(
            ui,
            &mut conn,
            &mut roster,
            &mut name,
            reconnect.then_some(&mut token),
        )
        .await;
        match end {
            End::Quit => return exit::OK,
            End::Kicked(reason) => {
                ui.status(&format!("kicked by the server: {reason}"));
                return exit::KICKED;
            }
            End::Lost(why) => {
                ui.status(&format!("connection to server lost ({why})"));
                if !reconnect {
                    return exit::ERROR;
                }
            }
        }
        ui.set_prompt("(offline)> ");
        match reconnect_and_reclaim(ui, &host, port, tls.as_ref(), &name, token.take(), &config)
            .await
        {
            Some((c, n)) => {
                conn = c;
                name = n;
                roster.clear();
                roster.insert(&name);
                ui.set_name(&name);
            }
            None => return exit::OK,
        }
    }
}

/// Longest wait for the server's greeting before the name is asked for anyway.
const GREETING_TIMEOUT: Duration = Duration::from_secs(5);

/// Shows the server's first line before asking for a name, so a server that refuses at once
/// (`server-full`, `banned`, ...) counts as a failed connection and another address is asked
/// for. `Err` says why the connection is no good.
async fn greeting(ui: &mut Ui, conn: &mut Connection, host: &str, port: u16) -> Result<(), String> {
    ui.status(&format!("connected to {host}:{port}"));
    match tokio::time::timeout(GREETING_TIMEOUT, conn.recv()).await {
        // A server that does not greet may still take a name.
        Err(_) => Ok(()),
        Ok(FromServer::Line(line)) => {
            let event = Event::parse(&line);
            ui.show_incoming(&line, &event);
            match event {
                Event::Err { code, .. } => Err(format!("refused the connection ({code})")),
                _ => Ok(()),
            }
        }
        Ok(FromServer::Closed(e)) => Err(format!("closed the connection: {}", describe_close(e))),
    }
}

/// Asks for the port until it is a number (or input ends).
async fn ask_port(ui: &mut Ui) -> Option<u16> {
    loop {
        let answer = ui.ask("port", Some(&DEFAULT_PORT.to_string())).await?;
        match answer.parse::<u16>() {
            Ok(p) if p != 0 => return Some(p),
            _ => ui.status(&format!("{answer:?} is not a port number (1-65535)")),
        }
    }
}

/// Gets a name accepted, asking again (or reading the next piped line) after a refusal.
/// `Err` carries the exit code.
async fn choose_name(
    ui: &mut Ui,
    conn: &mut Connection,
    mut source: NameSource,
    mut given: Option<String>,
    config: &ClientConfig,
) -> Result<String, i32> {
    loop {
        let attempt = match source {
            NameSource::Given => given.take(),
            NameSource::Prompt => ui.ask("your name", config.name.as_deref()).await,
            NameSource::Stdin => match ui.next().await {
                Input::Line(l) => Some(l.trim().to_owned()),
                Input::Eof => None,
            },
        };
        let Some(attempt) = attempt else {
            let _ = conn.send("quit").await;
            // Ctrl-D at the name prompt is leaving, as at the address prompt.
            if source == NameSource::Prompt {
                return Err(exit::OK);
            }
            ui.status("no name was accepted before the end of input");
            return Err(exit::NAME_REFUSED);
        };
        if attempt.is_empty() {
            continue;
        }
        match try_name(ui, conn, &attempt).await {
            Naming::Welcome(n) => return Ok(n),
            Naming::Refused(code, text) => {
                ui.status(&format!(
                    "the server refused the name {attempt:?} ({code}): {text}"
                ));
                match source {
                    NameSource::Given if ui.interactive => source = NameSource::Prompt,
                    NameSource::Given => {
                        let _ = conn.send("quit").await;
                        return Err(exit::NAME_REFUSED);
                    }
                    _ => {}
                }
            }
            Naming::Quit => return Err(exit::OK),
            Naming::Lost(why) => {
                ui.status(&format!("connection to server lost ({why})"));
                return Err(exit::ERROR);
            }
        }
    }
}

/// Sends one name and waits for the verdict, showing whatever else arrives.
async fn try_name(ui: &mut Ui, conn: &mut Connection, name: &str) -> Naming {
    if command::parse_naming(name) == command::Naming::Quit {
        let _ = conn.send("quit").await;
        return Naming::Quit;
    }
    if let Err(e) = conn.send(name).await {
        return Naming::Lost(e.to_string());
    }
    loop {
        let line = match conn.recv().await {
            FromServer::Line(line) => line,
            FromServer::Closed(e) => return Naming::Lost(describe_close(e)),
        };
        let event = Event::parse(&line);
        match event {
            Event::Welcome { name: accepted, .. } => {
                conn.limits = event.flood_limits();
                ui.renderer.me = accepted.to_owned();
                ui.show_incoming(&line, &event);
                return Naming::Welcome(accepted.to_owned());
            }
            Event::Err { code, text }
                if matches!(
                    code,
                    code::NAME_TAKEN
                        | code::NAME_INVALID
                        | code::NAME_RESERVED
                        | code::RECLAIM_REFUSED
                ) =>
            {
                if !ui.is_editor() {
                    ui.show_incoming(&line, &event);
                }
                return Naming::Refused(code.to_owned(), text.to_owned());
            }
            _ => ui.show_incoming(&line, &event),
        }
    }
}

fn describe_close(e: Option<std::io::Error>) -> String {
    match e {
        Some(e) => e.to_string(),
        None => "the server closed the connection".to_owned(),
    }
}

/// Chats until the connection ends or the user leaves. With `token`, this connection's reclaim
/// token is asked for and kept there.
async fn chat(
    ui: &mut Ui,
    conn: &mut Connection,
    roster: &mut Roster,
    name: &mut String,
    mut token: Option<&mut Option<String>>,
) -> End {
    let mut kicked: Option<String> = None;
    let mut bye = false;
    let mut shutdown = false;
    let mut quit_deadline: Option<Instant> = None;
    // Set once a quit is queued: later input is not taken.
    let mut leaving = false;
    let mut awaiting_token = false;
    if token.is_some() {
        awaiting_token = conn.send("/token").await.is_ok();
    }
    // Who is online, for the user and for Tab completion.
    if ui.is_editor() {
        let _ = conn.send("/who").await;
    }
    // The name line, `/token` and a `/who` after reconnecting went out unpaced.
    let mut pacer = Pacer::new(conn.limits, 3);
    // The roster generation the editor's completion list was last built from.
    let mut names_shown: Option<u64> = None;
    loop {
        let send_at = pacer.next_at().map(Instant::from_std);
        tokio::select! {
            ev = conn.recv() => match ev {
                FromServer::Line(line) => {
                    let event = Event::parse(&line);
                    if let Some((old, new)) = roster.observe(&event)
                        && old.eq_ignore_ascii_case(name)
                    {
                        *name = new;
                        ui.set_name(name);
                    }
                    if names_shown != Some(roster.generation())
                        && let Some(t) = ui.terminal()
                    {
                        t.set_names(roster.names());
                        names_shown = Some(roster.generation());
                    }
                    match event {
                        Event::Kicked { reason } => kicked = Some(reason.to_owned()),
                        Event::Bye { .. } => bye = true,
                        Event::Shutdown { .. } => shutdown = true,
                        // Our own request: kept, never shown (it is a secret).
                        Event::Token { token: t, .. } if awaiting_token => {
                            awaiting_token = false;
                            if let Some(slot) = token.as_deref_mut() {
                                *slot = Some(t.to_owned());
                            }
                            continue;
                        }
                        Event::Err { code, text } => {
                            if code == code::RATE_LIMITED {
                                pacer.refused(text);
                            } else if awaiting_token && code == code::UNKNOWN_COMMAND {
                                // A server without reclaim tokens: reclaim by retrying.
                                awaiting_token = false;
                                continue;
                            }
                        }
                        _ => {}
                    }
                    ui.show_incoming(&line, &event);
                }
                FromServer::Closed(e) => {
                    if let Some(reason) = kicked {
                        return End::Kicked(reason);
                    }
                    if bye || quit_deadline.is_some() {
                        return End::Quit;
                    }
                    match pacer.len() {
                        0 => {}
                        1 => ui.status("1 typed line was not sent"),
                        n => ui.status(&format!("{n} typed lines were not sent")),
                    }
                    if shutdown {
                        return End::Lost("the server is shutting down".to_owned());
                    }
                    return End::Lost(describe_close(e));
                }
            },
            input = ui.next(), if !leaving => match input {
                Input::Line(line) => match command::parse(&line) {
                    // The server ignores blank lines; they would only use up the pace.
                    Cmd::Blank => {}
                    parsed => {
                        leaving = matches!(parsed, Cmd::Quit);
                        pacer.push(line);
                    }
                },
                Input::Eof => {
                    // Leave politely (after what is queued) so the room sees "quit".
                    leaving = true;
                    pacer.push("quit".to_owned());
                }
            },
            _ = sleep_until(send_at.unwrap_or_else(Instant::now)), if send_at.is_some() && quit_deadline.is_none() => {
                if let Some(line) = pacer.pop_ready() {
                    match user_line(ui, conn, &line).await {
                        Ok(true) => quit_deadline = Some(Instant::now() + BYE_TIMEOUT),
                        Ok(false) => {}
                        Err(_) if leaving && pacer.len() == 0 => return End::Quit,
                        Err(e) => return End::Lost(e.to_string()),
                    }
                }
            }
            _ = sleep_until(quit_deadline.unwrap_or_else(Instant::now)), if quit_deadline.is_some() => {
                ui.status("the server did not say goodbye in time; leaving anyway");
                return End::Quit;
            }
        }
    }
}

/// Sends a line the user typed and echoes it as the room will see it (the server does not send
/// our own messages back). Returns whether it was a quit.
async fn user_line(ui: &mut Ui, conn: &mut Connection, line: &str) -> std::io::Result<bool> {
    let parsed = command::parse(line);
    if matches!(parsed, Cmd::Help) && ui.is_editor() {
        for l in crate::editor::HELP {
            ui.status(l);
        }
    }
    conn.send(line).await?;
    if ui.is_editor() {
        match parsed {
            Cmd::Say(text) => ui.show(&ui.renderer.own_message(text)),
            Cmd::Me(text) => ui.show(&ui.renderer.own_action(text)),
            _ => {}
        }
    }
    Ok(matches!(parsed, Cmd::Quit))
}

/// The old name could not be had back: the user picks another on this same connection.
async fn choose_other_name(
    ui: &mut Ui,
    mut conn: Connection,
    config: &ClientConfig,
) -> Option<(Connection, String)> {
    choose_name(ui, &mut conn, NameSource::Prompt, None, config)
        .await
        .ok()
        .map(|n| (conn, n))
}

/// After a lost connection: reconnects with backoff, then reclaims `name` (retrying while the
/// server still holds it for our dead connection). `None` when the user leaves meanwhile.
async fn reconnect_and_reclaim(
    ui: &mut Ui,
    host: &str,
    port: u16,
    tls: Option<&Arc<TlsSettings>>,
    name: &str,
    mut token: Option<String>,
    config: &ClientConfig,
) -> Option<(Connection, String)> {
    let mut backoff = BACKOFF_START;
    loop {
        let mut conn = loop {
            ui.status(&format!(
                "reconnecting to {host}:{port} in {:.1}s (type /quit or press Ctrl-D to give up)",
                backoff.as_secs_f64()
            ));
            if !wait_or_quit(ui, backoff).await {
                return None;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            match Connection::open(host, port, tls).await {
                Ok(c) => break c,
                Err(e) => ui.status(&format!("{e:#}")),
            }
        };
        ui.status(&format!(
            "reconnected to {host}:{port}; reclaiming the name {name}"
        ));
        // With a token the name comes back at once, even while the server still holds it for
        // the dead connection; without one, retry until the server notices that connection died.
        if let Some(t) = token.take() {
            match try_name(ui, &mut conn, &format!("/reclaim {name} {t}")).await {
                Naming::Welcome(n) => {
                    ui.status(&format!("reclaimed the name {n}"));
                    return Some((conn, n));
                }
                Naming::Refused(code, text) => {
                    ui.status(&format!(
                        "could not reclaim {name} ({code}): {text}; choose another name"
                    ));
                    return choose_other_name(ui, conn, config).await;
                }
                Naming::Quit => return None,
                Naming::Lost(why) => {
                    ui.status(&format!("connection to server lost again ({why})"));
                    token = Some(t);
                    continue;
                }
            }
        }
        let started = Instant::now();
        let mut retry = BACKOFF_START;
        loop {
            match try_name(ui, &mut conn, name).await {
                Naming::Welcome(n) => return Some((conn, n)),
                Naming::Refused(code, _)
                    if code == code::NAME_TAKEN && started.elapsed() < RECLAIM_FOR =>
                {
                    ui.status(&format!(
                        "the server still holds {name} for the old connection; retrying in {:.1}s",
                        retry.as_secs_f64()
                    ));
                    if !wait_or_quit(ui, retry).await {
                        let _ = conn.send("quit").await;
                        return None;
                    }
                    retry = (retry * 2).min(Duration::from_secs(5));
                }
                Naming::Refused(..) => {
                    ui.status(&format!("could not reclaim {name}; choose another name"));
                    return choose_other_name(ui, conn, config).await;
                }
                Naming::Quit => return None,
                Naming::Lost(why) => {
                    ui.status(&format!("connection to server lost again ({why})"));
                    break;
                }
            }
        }
    }
}

/// Waits `d`, while the user may type; `false` if they chose to leave. Other lines are not sent
/// (there is no connection) and the user is told so.
async fn wait_or_quit(ui: &mut Ui, d: Duration) -> bool {
    let until = Instant::now() + d;
    loop {
        tokio::select! {
            _ = sleep_until(until) => return true,
            input = ui.next() => match input {
                Input::Eof => return false,
                Input::Line(l) if matches!(command::parse(&l), Cmd::Quit) => return false,
                Input::Line(_) => ui.status("not connected: the line was not sent"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_target;

    #[test]
    fn chats_urls_give_host_port_and_tls() {
        let t = |s: &str| parse_target(s);
        assert_eq!(
            t("chats://chat.example.org:7000"),
            ("chat.example.org".into(), Some(7000), true)
        );
        assert_eq!(
            t("chats://chat.example.org/"),
            ("chat.example.org".into(), Some(42070), true)
        );
        assert_eq!(t("chats://[::1]:7000"), ("::1".into(), Some(7000), true));
        assert_eq!(
            t("chat://10.0.0.1:42069"),
            ("10.0.0.1".into(), Some(42069), false)
        );
        assert_eq!(t("chat://10.0.0.1"), ("10.0.0.1".into(), None, false));
        assert_eq!(t("::1"), ("::1".into(), None, false));
        assert_eq!(t("example.org"), ("example.org".into(), None, false));
    }
}
