//! The admin protocol shared by `chatd` and `chatctl`: request and response types, their framing
//! and the rules for finding the socket. `docs/admin-protocol.md` is the written form.
//!
//! Framing: each message is one JSON object on one line (`\n`-terminated), at most
//! [`MAX_FRAME`] bytes. A client sends a [`RequestEnvelope`]; the daemon answers each with one
//! [`ResponseEnvelope`]. Several requests may share a connection.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. An envelope with another version is refused with
/// [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest request or response line, in bytes (without the newline).
pub const MAX_FRAME: usize = 64 * 1024;

/// File name of the admin socket inside the runtime directory.
pub const SOCKET_FILE: &str = "chatd.sock";

/// A request with the protocol version it is written in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestEnvelope {
    /// Must equal [`PROTOCOL_VERSION`].
    pub version: u32,
    /// What is asked.
    pub request: Request,
}

/// One admin command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Users online.
    // Unit-like variants are written `{}` so that `deny_unknown_fields` applies to them too.
    List {},
    /// Disconnect a user, telling them and everyone else why.
    Kick {
        /// The user's name (case-insensitive).
        name: String,
        /// Shown to the user and the room; a default is used when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A server notice to every user.
    Announce {
        /// The notice (one line).
        text: String,
    },
    /// Daemon status and counters.
    Status {},
    /// Re-read the config file, as SIGHUP does, and report the outcome.
    Reload {},
    /// Ban a name, an IP address or a CIDR block; matching users online are disconnected.
    Ban {
        /// `NAME`, `IP` or `IP/PREFIX`.
        target: String,
        /// How long, in seconds; absent means permanent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_secs: Option<u64>,
        /// Shown to the banned user; a default is used when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Lift the ban on a target, written as it was banned.
    Unban {
        /// `NAME`, `IP` or `IP/PREFIX`.
        target: String,
    },
    /// Bans in force.
    Bans {},
}

/// A response with the protocol version it is written in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    /// The daemon's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The outcome.
    pub response: Response,
}

/// The outcome of one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Response {
    /// Answer to [`Request::List`].
    Users {
        /// Everyone online, sorted by name.
        users: Vec<UserInfo>,
    },
    /// Answer to [`Request::Kick`].
    Kicked {
        /// The kicked user's name as it was shown.
        name: String,
        /// Their address.
        addr: String,
    },
    /// Answer to [`Request::Announce`].
    Announced {
        /// How many users it was sent to.
        recipients: usize,
    },
    /// Answer to [`Request::Status`].
    Status(Box<StatusInfo>),
    /// Answer to [`Request::Reload`] when the new config was accepted.
    Reloaded {
        /// Changed keys now in effect.
        applied: Vec<String>,
        /// Changed keys that wait for a restart.
        needs_restart: Vec<String>,
    },
    /// Answer to [`Request::Ban`].
    Banned {
        /// The ban now in force.
        ban: BanInfo,
        /// Users disconnected by it.
        disconnected: Vec<String>,
    },
    /// Answer to [`Request::Unban`].
    Unbanned {
        /// The target whose ban was lifted.
        target: String,
    },
    /// Answer to [`Request::Bans`].
    BanList {
        /// Bans in force, oldest first.
        bans: Vec<BanInfo>,
    },
    /// The request failed.
    Error(AdminError),
}

/// One ban in [`Response::Banned`] and [`Response::BanList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanInfo {
    /// `name`, or `net` for an address or block.
    pub kind: String,
    /// The name, address or CIDR block.
    pub target: String,
    /// Why.
    pub reason: String,
    /// When it was made, Unix seconds.
    pub created: u64,
    /// When it ends, Unix seconds; `null` for permanent.
    pub expires: Option<u64>,
}

/// A ban's end as people read it: `until 2026-11-25T12:00:00Z` (UTC), or `permanently` when
/// `expires` is `None`. Both the banned user's refusal and chatctl's listing say it this way.
pub fn until_text(expires: Option<u64>) -> String {
    match expires {
        Some(e) => format!(
            "until {}",
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(e)
            )
        ),
        None => "permanently".to_owned(),
    }
}

/// One user in [`Response::Users`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// Display name.
    pub name: String,
    /// Peer address (`ip:port`).
    pub addr: String,
    /// When the user joined, as Unix seconds.
    pub connected_since: u64,
    /// Seconds since the user's last message (or join).
    pub idle_secs: u64,
    /// The cluster node the user is connected to (absent for a single node, and from daemons
    /// older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// What carries the user's bytes: `tcp`, `tls`, `ws` or `wss` (absent for a user of another cluster
    /// node, and from daemons older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

/// Payload of [`Response::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Daemon version.
    pub version: String,
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Users in the room (named).
    pub users: usize,
    /// Open TCP connections (named or still choosing a name).
    pub connections: usize,
    /// Room messages accepted since start.
    pub messages: u64,
    /// Lines queued to recipients since start.
    pub deliveries: u64,
    /// Users kicked since start.
    pub kicks: u64,
    /// Users disconnected because they did not read fast enough.
    pub slow_disconnects: u64,
    /// Connections refused because the server was full.
    pub refused_full: u64,
    /// Successful reloads since start.
    pub reloads: u64,
    /// How often each limit fired since start (absent from daemons older than this field).
    #[serde(default)]
    pub limits: LimitStats,
    /// The daemon's memory (absent from daemons older than this field).
    #[serde(default)]
    pub memory: MemoryStats,
    /// Traffic, disconnects and reloads beyond the counters above (absent from older daemons).
    #[serde(default)]
    pub activity: ActivityStats,
    /// The config file, or `null` when running on built-in defaults.
    pub config_path: Option<String>,
    /// Addresses actually bound.
    pub listen: Vec<String>,
    /// TLS addresses actually bound (absent without `[tls]`, and from older daemons).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls_listen: Vec<String>,
    /// Web (HTTP or HTTPS) addresses actually bound (absent without `[web]`, and from older
    /// daemons).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub web_listen: Vec<String>,
    /// The admin socket's path.
    pub admin_socket: String,
    /// This node's place in a cluster; absent for a single node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// A cluster node's view of the cluster, in [`StatusInfo`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This node's name.
    pub node: String,
    /// Whether it is connected to a NATS server now.
    pub connected: bool,
    /// Whether it follows the room (connected once, history and members loaded).
    pub ready: bool,
    /// The NATS server it is connected to (`host:port`).
    pub server: Option<String>,
    /// What it is waiting for, while it is not ready.
    pub waiting: Option<String>,
    /// The stream sequence of the last room event delivered here.
    pub position: u64,
    /// Nodes whose lease is live, this one included.
    pub live_nodes: Vec<String>,
}

/// Activity counters in [`StatusInfo`]; `/metrics` serves the same numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ActivityStats {
    /// Bytes written to chat clients.
    pub bytes_sent: u64,
    /// Clients that left with `/quit`.
    pub quits: u64,
    /// Connections closed at naming because of a ban.
    pub ban_disconnects: u64,
    /// Connections that ended without the server closing them (EOF, reset, error, keepalive).
    pub lost: u64,
    /// Reloads rejected (the running config stayed).
    pub reload_failures: u64,
    /// Admitted connections open on the TCP listeners.
    pub open_tcp: u64,
    /// Admitted connections open on the TLS listeners.
    pub open_tls: u64,
    /// Admitted WebSocket sessions open on the web listeners (ws and wss).
    pub open_ws: u64,
    /// Bytes queued for clients in all outboxes now.
    pub queued_bytes: u64,
    /// Bytes queued in the fullest outbox now.
    pub max_queued_bytes: u64,
    /// Fan-outs timed: one per room message, or per batch of chat lines one read brought.
    pub fanout_count: u64,
    /// Total time those fan-outs took, in microseconds.
    pub fanout_micros: u64,
}

/// The daemon's memory, in [`StatusInfo`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStats {
    /// Resident memory now, in bytes.
    pub rss_bytes: u64,
    /// Memory the allocator holds free (resident or not), in bytes; 0 where it cannot tell.
    pub heap_free_bytes: u64,
    /// Times freed memory was given back to the system after a burst.
    pub trims: u64,
    /// Resident memory those trims gave back, in bytes.
    pub trimmed_bytes: u64,
}

/// How often each limit fired, in [`StatusInfo`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitStats {
    /// Lines refused for exceeding `limits.max-line-length`.
    pub line_too_long: u64,
    /// Lines refused for not being UTF-8.
    pub bad_utf8: u64,
    /// Lines refused by `limits.message-rate`.
    pub rate_limited: u64,
    /// Clients disconnected for flooding.
    pub flood_disconnects: u64,
    /// Clients disconnected because their outbound queue overflowed.
    pub slow_disconnects: u64,
    /// Connections refused by `limits.max-clients`.
    pub refused_full: u64,
    /// Connections refused by `limits.max-connections-per-ip`.
    pub refused_per_ip: u64,
    /// Connections closed by `limits.name-timeout`.
    pub name_timeouts: u64,
    /// Connections or names refused by a ban.
    pub refused_banned: u64,
    /// Times accepting stalled for lack of file descriptors or memory.
    pub accept_backoffs: u64,
    /// TLS connections closed because the handshake failed or timed out (absent from daemons
    /// older than this field).
    #[serde(default)]
    pub tls_handshakes_failed: u64,
    /// Of those, handshakes that did not finish in time.
    #[serde(default)]
    pub tls_handshake_timeouts: u64,
    /// Connections refused for their PROXY protocol header (absent from older daemons).
    #[serde(default)]
    pub refused_proxy: u64,
    /// WebSocket upgrades refused for a missing or foreign `Origin` (`web.allowed-origins`;
    /// absent from older daemons).
    #[serde(default)]
    pub refused_origin: u64,
    /// WebSocket sessions closed for what they sent: binary, oversized or malformed frames,
    /// too many pings (absent from older daemons).
    #[serde(default)]
    pub ws_bad_frames: u64,
}

/// A failed request: a stable code for programs and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct AdminError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl AdminError {
    /// An error of kind `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        AdminError {
            code,
            message: message.into(),
        }
    }
}

/// Stable error codes of the admin protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The peer is not root, the daemon's user, or in the admin group.
    PermissionDenied,
    /// No user of that name is online.
    NoSuchUser,
    /// No ban on that target.
    NoSuchBan,
    /// An argument is empty, too long or malformed.
    InvalidArgument,
    /// The request line is not a valid request (bad JSON, unknown command, too large).
    BadRequest,
    /// The envelope's version is not [`PROTOCOL_VERSION`].
    UnsupportedVersion,
    /// The new config was rejected; the old one stays in force.
    ReloadFailed,
    /// The daemon could not save its state (the ban list in `server.state-dir`); nothing was
    /// changed. The request was fine: fix the directory and retry.
    StateWriteFailed,
    /// Client-side only (chatctl `--json`): no daemon could be reached.
    DaemonUnreachable,
}

/// Where the admin socket may be, in order of preference: `$RUNTIME_DIRECTORY` (set by systemd's
/// `RuntimeDirectory=`), `/run/chatd` (the packaged location), `$XDG_RUNTIME_DIR` (a user's
/// own daemon), then the temporary directory (a user's daemon without a runtime directory).
/// The daemon binds the first that applies to it; `chatctl` uses the first that exists.
pub fn socket_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") {
        // systemd separates several runtime directories with ':'; ours is the first.
        if let Some(first) = dir.to_string_lossy().split(':').next()
            && !first.is_empty()
        {
            out.push(PathBuf::from(first).join(SOCKET_FILE));
        }
    }
    out.push(PathBuf::from("/run/chatd").join(SOCKET_FILE));
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR")
        && !dir.is_empty()
    {
        out.push(PathBuf::from(dir).join(SOCKET_FILE));
    }
    out.push(std::env::temp_dir().join(SOCKET_FILE));
    out
}

/// The socket path a daemon running as `euid` binds when the config leaves it empty.
pub fn default_socket_path(euid_is_root: bool) -> PathBuf {
    let candidates = socket_candidates();
    let from_systemd = std::env::var_os("RUNTIME_DIRECTORY").is_some();
    if from_systemd || euid_is_root {
        return candidates[0].clone();
    }
    // Not root and not under systemd: /run/chatd is not ours to create. The list always ends
    // with the temporary directory, so the fallback below is never reached.
    candidates
        .into_iter()
        .find(|p| !p.starts_with("/run/chatd"))
        .unwrap_or_else(|| std::env::temp_dir().join(SOCKET_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_form_is_stable() {
        let req = RequestEnvelope {
            version: 1,
            request: Request::Kick {
                name: "bob".into(),
                reason: Some("spam".into()),
            },
        };
        let json = serde_json::to_string(&req).unwrap_or_default();
        assert_eq!(
            json,
            r#"{"version":1,"request":{"cmd":"kick","name":"bob","reason":"spam"}}"#
        );
        let list: Result<RequestEnvelope, _> =
            serde_json::from_str(r#"{"version":1,"request":{"cmd":"list"}}"#);
        assert_eq!(list.ok().map(|e| e.request), Some(Request::List {}));
    }

    #[test]
    fn unknown_commands_and_fields_are_rejected() {
        for bad in [
            r#"{"version":1,"request":{"cmd":"explode"}}"#,
            r#"{"version":1,"request":{"cmd":"list","x":1}}"#,
            r#"{"version":1,"request":{"cmd":"kick"}}"#,
            r#"{"request":{"cmd":"list"}}"#,
        ] {
            assert!(
                serde_json::from_str::<RequestEnvelope>(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn ban_ends_read_the_same_everywhere() {
        assert_eq!(until_text(None), "permanently");
        assert_eq!(until_text(Some(0)), "until 1970-01-01T00:00:00Z");
    }

    #[test]
    fn error_codes_are_kebab_case_on_the_wire() {
        let code = serde_json::to_string(&ErrorCode::StateWriteFailed).unwrap_or_default();
        assert_eq!(code, r#""state-write-failed""#);
    }

    #[test]
    fn error_response_wire_form_is_stable() {
        let resp = ResponseEnvelope {
            version: 1,
            response: Response::Error(AdminError::new(ErrorCode::NoSuchUser, "no user")),
        };
        let json = serde_json::to_string(&resp).unwrap_or_default();
        assert_eq!(
            json,
            r#"{"version":1,"response":{"type":"error","code":"no-such-user","message":"no user"}}"#
        );
    }
}
