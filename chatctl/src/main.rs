//! chatctl: administer a running chatd over its Unix admin socket.
//!
//! Speaks the typed protocol in `chat_proto::admin` (the same types the daemon uses) and maps
//! every failure to a message a person understands and a distinct exit code.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;

mod cli;
use cli::{Cli, Command};

use chat_proto::admin::{
    self as admin, AdminError, BanInfo, ErrorCode, PROTOCOL_VERSION, Request, RequestEnvelope,
    Response, ResponseEnvelope, StatusInfo, UserInfo,
};

/// How long chatctl waits for the daemon to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Exit codes, documented in `chatctl --help` and docs/admin-protocol.md.
mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const NOT_RUNNING: u8 = 3;
    pub const PERMISSION_DENIED: u8 = 4;
    pub const NO_SUCH_USER: u8 = 5;
    pub const INVALID_ARGUMENT: u8 = 6;
    pub const RELOAD_FAILED: u8 = 7;
    pub const PROTOCOL: u8 = 8;
    pub const STATE_WRITE_FAILED: u8 = 9;
}

/// Writes one line to standard output. A reader that went away (`chatctl list | head -1`)
/// ends chatctl quietly, as it would `ls`; any other write error is reported. (`println!`
/// panics on both.)
fn emit(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(line).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        let _ = writeln!(std::io::stderr(), "chatctl: cannot write output: {e}");
        std::process::exit(i32::from(exit::FAILURE));
    }
}

/// `println!` that never panics: see [`emit`].
macro_rules! outln {
    ($($arg:tt)*) => {
        emit(format_args!($($arg)*))
    };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let request = match &cli.command {
        Command::List => Request::List {},
        Command::Kick { name, reason } => Request::Kick {
            name: name.clone(),
            reason: reason.clone(),
        },
        Command::Announce { text } => Request::Announce {
            text: text.join(" "),
        },
        Command::Status => Request::Status {},
        Command::Reload => Request::Reload {},
        Command::Ban {
            target,
            duration,
            reason,
        } => {
            let duration_secs = match duration.as_deref().map(humantime::parse_duration) {
                None => None,
                Some(Ok(d)) => Some(d.as_secs().max(1)),
                Some(Err(e)) => {
                    eprintln!("chatctl: invalid --duration: {e} (write it like 30m, 2h or 7d)");
                    return ExitCode::from(exit::INVALID_ARGUMENT);
                }
            };
            Request::Ban {
                target: target.clone(),
                duration_secs,
                reason: reason.clone(),
            }
        }
        Command::Unban { target } => Request::Unban {
            target: target.clone(),
        },
        Command::Bans => Request::Bans {},
    };
    let result = find_socket(cli.socket.as_deref()).and_then(|path| call(&path, request));
    match result {
        Ok(env) => {
            let code = match &env.response {
                Response::Error(e) => exit_code(e.code),
                _ => exit::OK,
            };
            if cli.json {
                match serde_json::to_string(&env) {
                    Ok(json) => outln!("{json}"),
                    Err(e) => eprintln!("chatctl: cannot encode answer: {e}"),
                }
            } else {
                render(&env.response);
            }
            ExitCode::from(code)
        }
        Err(fail) => {
            if cli.json {
                let env = ResponseEnvelope {
                    version: PROTOCOL_VERSION,
                    response: Response::Error(AdminError::new(fail.code, fail.message.clone())),
                };
                if let Ok(json) = serde_json::to_string(&env) {
                    outln!("{json}");
                }
            }
            eprintln!("chatctl: {}", fail.message);
            ExitCode::from(fail.exit)
        }
    }
}

/// A failure before a response arrived.
struct Failure {
    code: ErrorCode,
    exit: u8,
    message: String,
}

fn exit_code(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::PermissionDenied => exit::PERMISSION_DENIED,
        ErrorCode::NoSuchUser | ErrorCode::NoSuchBan => exit::NO_SUCH_USER,
        ErrorCode::InvalidArgument => exit::INVALID_ARGUMENT,
        ErrorCode::ReloadFailed => exit::RELOAD_FAILED,
        ErrorCode::StateWriteFailed => exit::STATE_WRITE_FAILED,
        ErrorCode::UnsupportedVersion | ErrorCode::BadRequest => exit::PROTOCOL,
        ErrorCode::DaemonUnreachable => exit::NOT_RUNNING,
    }
}

fn find_socket(explicit: Option<&Path>) -> Result<PathBuf, Failure> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    let candidates = admin::socket_candidates();
    if let Some(p) = candidates.iter().find(|p| p.exists()) {
        return Ok(p.clone());
    }
    let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    Err(Failure {
        code: ErrorCode::DaemonUnreachable,
        exit: exit::NOT_RUNNING,
        message: format!(
            "chatd is not running: no admin socket found (tried {}); is the service started? (use --socket to point elsewhere)",
            tried.join(", ")
        ),
    })
}

fn call(path: &Path, request: Request) -> Result<ResponseEnvelope, Failure> {
    let mut stream = UnixStream::connect(path).map_err(|e| connect_failure(path, &e))?;
    let io_fail = |what: &str, e: std::io::Error| Failure {
        code: ErrorCode::DaemonUnreachable,
        exit: exit::FAILURE,
        message: format!("{}: {what}: {e}", path.display()),
    };
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| io_fail("setting timeouts", e))?;
    let env = RequestEnvelope {
        version: PROTOCOL_VERSION,
        request,
    };
    let mut line = serde_json::to_vec(&env).map_err(|e| Failure {
        code: ErrorCode::BadRequest,
        exit: exit::FAILURE,
        message: format!("cannot encode request: {e}"),
    })?;
    line.push(b'\n');
    // The daemon may refuse an unauthorised peer before reading; its answer still follows.
    let _ = stream.write_all(&line);
    let mut reader = BufReader::new(stream.take_limit());
    let mut answer = String::new();
    match reader.read_line(&mut answer) {
        Ok(0) => {
            return Err(Failure {
                code: ErrorCode::DaemonUnreachable,
                exit: exit::PROTOCOL,
                message: format!(
                    "{}: chatd closed the connection without answering",
                    path.display()
                ),
            });
        }
        Ok(_) => {}
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            return Err(Failure {
                code: ErrorCode::DaemonUnreachable,
                exit: exit::FAILURE,
                message: format!(
                    "{}: chatd did not answer within {}s",
                    path.display(),
                    TIMEOUT.as_secs()
                ),
            });
        }
        Err(e) => return Err(io_fail("reading answer", e)),
    }
    serde_json::from_str::<ResponseEnvelope>(&answer).map_err(|e| Failure {
        code: ErrorCode::BadRequest,
        exit: exit::PROTOCOL,
        message: format!("unexpected answer from chatd (is it a compatible version?): {e}"),
    })
}

/// Bounds what chatctl reads from the socket, whatever the peer sends.
trait TakeLimit {
    fn take_limit(self) -> std::io::Take<UnixStream>;
}

impl TakeLimit for UnixStream {
    fn take_limit(self) -> std::io::Take<UnixStream> {
        std::io::Read::take(self, 16 * 1024 * 1024)
    }
}

fn connect_failure(path: &Path, e: &std::io::Error) -> Failure {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => Failure {
            code: ErrorCode::DaemonUnreachable,
            exit: exit::NOT_RUNNING,
            message: format!(
                "chatd is not running: cannot connect to {} ({e})",
                path.display()
            ),
        },
        ErrorKind::PermissionDenied => Failure {
            code: ErrorCode::PermissionDenied,
            exit: exit::PERMISSION_DENIED,
            message: format!(
                "permission denied: {} (run as root or as a member of chatd's admin group)",
                path.display()
            ),
        },
        _ => Failure {
            code: ErrorCode::DaemonUnreachable,
            exit: exit::FAILURE,
            message: format!("cannot connect to {}: {e}", path.display()),
        },
    }
}

fn render(response: &Response) {
    match response {
        Response::Users { users } => print_users(users),
        Response::Kicked { name, addr } => outln!("kicked {name} ({addr})"),
        Response::Announced { recipients } => {
            outln!("announced to {recipients} user{}", plural(*recipients));
        }
        Response::Status(s) => print_status(s),
        Response::Reloaded {
            applied,
            needs_restart,
        } => {
            outln!("config reloaded");
            outln!("applied: {}", list_or_none(applied));
            outln!("needs restart: {}", list_or_none(needs_restart));
        }
        Response::Banned { ban, disconnected } => {
            outln!(
                "banned {} {}: {}",
                ban.target,
                admin::until_text(ban.expires),
                ban.reason
            );
            if !disconnected.is_empty() {
                outln!("disconnected: {}", disconnected.join(", "));
            }
        }
        Response::Unbanned { target } => outln!("unbanned {target}"),
        Response::BanList { bans } => print_bans(bans),
        Response::Error(e) => eprintln!("chatctl: {}", e.message),
    }
}

fn print_bans(bans: &[BanInfo]) {
    if bans.is_empty() {
        outln!("no bans");
        return;
    }
    let width = bans
        .iter()
        .map(|b| b.target.len())
        .max()
        .unwrap_or(6)
        .max(6);
    outln!(
        "{:<width$}  {:<4}  {:<27}  REASON",
        "TARGET",
        "KIND",
        "EXPIRES"
    );
    for b in bans {
        outln!(
            "{:<width$}  {:<4}  {:<27}  {}",
            b.target,
            b.kind,
            admin::until_text(b.expires),
            b.reason
        );
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn list_or_none(keys: &[String]) -> String {
    if keys.is_empty() {
        "nothing".to_owned()
    } else {
        keys.join(", ")
    }
}

fn print_users(users: &[UserInfo]) {
    if users.is_empty() {
        outln!("no users online");
        return;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // The NODE column only for a cluster, so a single node's list reads as it always did.
    let clustered = users.iter().any(|u| u.node.is_some());
    // The TRANSPORT column only once someone is on TLS or a WebSocket, for the same reason.
    let secure = users
        .iter()
        .any(|u| u.transport.as_deref().is_some_and(|t| t != "tcp"));
    let rows: Vec<Vec<String>> = users
        .iter()
        .map(|u| {
            let since = UNIX_EPOCH + Duration::from_secs(u.connected_since);
            let mut row = vec![
                u.name.clone(),
                u.addr.clone(),
                format!(
                    "{} ({} ago)",
                    humantime::format_rfc3339_seconds(since),
                    short_duration(now.saturating_sub(u.connected_since))
                ),
                short_duration(u.idle_secs),
            ];
            if secure {
                row.insert(2, u.transport.clone().unwrap_or_else(|| "-".to_owned()));
            }
            if clustered {
                row.insert(1, u.node.clone().unwrap_or_default());
            }
            row
        })
        .collect();
    let mut header = vec!["NAME", "ADDRESS", "CONNECTED SINCE", "IDLE"];
    if secure {
        header.insert(2, "TRANSPORT");
    }
    if clustered {
        header.insert(1, "NODE");
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let print_row = |cells: &[&str]| {
        let last = cells.len() - 1;
        let mut line = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        outln!("{line}");
    };
    print_row(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        print_row(&cells);
    }
    outln!("{} user{} online", users.len(), plural(users.len()));
}

/// `3d4h`, `2h5m`, `4m12s`, `9s`: the two largest units.
fn short_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// Bytes as MiB with one decimal, the unit RSS is usually read in.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

fn print_status(s: &StatusInfo) {
    outln!("chatd {} up {}", s.version, short_duration(s.uptime_secs));
    outln!("users:            {}", s.users);
    outln!("connections:      {}", s.connections);
    outln!("messages:         {}", s.messages);
    outln!("deliveries:       {}", s.deliveries);
    outln!("kicks:            {}", s.kicks);
    outln!("slow disconnects: {}", s.slow_disconnects);
    outln!("refused (full):   {}", s.refused_full);
    outln!("reloads:          {}", s.reloads);
    let l = &s.limits;
    outln!(
        "limits fired:     line-too-long {}, bad-utf8 {}, rate-limited {}, flood-disconnects {}, \
         slow-disconnects {}, refused-full {}, refused-per-ip {}, name-timeouts {}, \
         refused-banned {}, accept-backoffs {}, tls-handshakes-failed {} ({} timed out), \
         refused-proxy {}, refused-origin {}, ws-bad-frames {}",
        l.line_too_long,
        l.bad_utf8,
        l.rate_limited,
        l.flood_disconnects,
        l.slow_disconnects,
        l.refused_full,
        l.refused_per_ip,
        l.name_timeouts,
        l.refused_banned,
        l.accept_backoffs,
        l.tls_handshakes_failed,
        l.tls_handshake_timeouts,
        l.refused_proxy,
        l.refused_origin,
        l.ws_bad_frames
    );
    let a = &s.activity;
    outln!(
        "activity:         {} bytes sent; open tcp {}, tls {}, ws {}; quits {}, lost {}, \
         ban-disconnects {}; reload failures {}",
        a.bytes_sent,
        a.open_tcp,
        a.open_tls,
        a.open_ws,
        a.quits,
        a.lost,
        a.ban_disconnects,
        a.reload_failures
    );
    outln!(
        "send queues:      {} queued, {} in the fullest; fan-out {} messages, {} µs",
        a.queued_bytes,
        a.max_queued_bytes,
        a.fanout_count,
        a.fanout_micros
    );
    let m = &s.memory;
    outln!(
        "memory:           {} resident, {} free in the allocator; {} trims gave back {}",
        mib(m.rss_bytes),
        mib(m.heap_free_bytes),
        m.trims,
        mib(m.trimmed_bytes)
    );
    outln!(
        "config:           {}",
        s.config_path.as_deref().unwrap_or("(built-in defaults)")
    );
    outln!("listening on:     {}", s.listen.join(", "));
    if !s.tls_listen.is_empty() {
        outln!("TLS on:           {}", s.tls_listen.join(", "));
    }
    if !s.web_listen.is_empty() {
        outln!("web on:           {}", s.web_listen.join(", "));
    }
    outln!("admin socket:     {}", s.admin_socket);
    if let Some(c) = &s.cluster {
        let link = match (&c.server, c.connected) {
            (Some(server), true) => format!("connected to NATS at {server}"),
            _ => "not connected to NATS".to_owned(),
        };
        outln!("cluster node:     {} ({link})", c.node);
        match &c.waiting {
            Some(w) if !c.ready => outln!("cluster state:    waiting: {w}"),
            _ => outln!(
                "cluster state:    following the room at position {}",
                c.position
            ),
        }
        outln!("live nodes:       {}", c.live_nodes.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_in_mib() {
        assert_eq!(mib(0), "0.0 MiB");
        assert_eq!(mib(3 << 19), "1.5 MiB");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(short_duration(9), "9s");
        assert_eq!(short_duration(252), "4m12s");
        assert_eq!(short_duration(7500), "2h5m");
        assert_eq!(short_duration(360_000), "4d4h");
    }

    #[test]
    fn every_error_code_has_its_documented_exit_status() {
        let codes = [
            (ErrorCode::DaemonUnreachable, 3),
            (ErrorCode::PermissionDenied, 4),
            (ErrorCode::NoSuchUser, 5),
            (ErrorCode::NoSuchBan, 5),
            (ErrorCode::InvalidArgument, 6),
            (ErrorCode::ReloadFailed, 7),
            (ErrorCode::BadRequest, 8),
            (ErrorCode::UnsupportedVersion, 8),
            (ErrorCode::StateWriteFailed, 9),
        ];
        for (code, exit) in codes {
            assert_eq!(exit_code(code), exit, "{code:?}");
            assert!(
                cli::AFTER_HELP.contains(&format!("\n  {exit}  ")),
                "--help does not explain exit {exit}"
            );
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
