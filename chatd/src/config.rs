//! The daemon's TOML configuration: typed sections with built-in defaults, strict parsing
//! (unknown keys are errors, every error names `file:line:col`), and the diff that tells a reload
//! which changes apply live and which need a restart.
//!
//! Range checks live in the types (`Bounded`, `FileMode`, `LogLevel`) so that serde reports them
//! with the span of the offending value; only checks that involve two keys run afterwards.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the packaged daemon looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/chatd/chatd.toml";

/// Keys whose change only takes effect after a restart. Everything else applies on reload.
/// Kept as data so `docs/configuration.md`, the shipped config and the reload report agree.
pub const RESTART_KEYS: &[&str] = &[
    "server.listen",
    "server.state-dir",
    "admin.socket",
    "cluster.nats",
    "cluster.node",
    "cluster.name",
    "cluster.credentials",
    "cluster.replicas",
    "tls.listen",
    "metrics.listen",
    "web.listen",
    "web.tls",
];

/// The whole configuration. `Default` is the built-in configuration the daemon runs on when no
/// config file exists.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Listening sockets and connection handling.
    pub server: ServerConfig,
    /// What newcomers see.
    pub room: RoomConfig,
    /// Which names users may take.
    pub names: NameConfig,
    /// Per-client and global limits.
    pub limits: LimitsConfig,
    /// The Unix-domain admin socket.
    pub admin: AdminConfig,
    /// Logging.
    pub log: LogConfig,
    /// Several nodes serving one room through NATS JetStream; absent means a single node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    /// A TLS listener beside the plain one; absent means none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Prometheus metrics over HTTP; absent means off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// The browser client: a web page and its WebSocket over HTTP(S); absent means off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub web: Option<WebConfig>,
}

/// `[web]`: the page served at `/` and the WebSocket at `/ws` that joins the room from a
/// browser (docs/protocol.md, "WebSocket").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct WebConfig {
    /// TCP addresses of the HTTP listener, bound like `server.listen`. (restart)
    pub listen: Vec<SocketAddr>,
    /// Serve HTTPS and WSS with the `[tls]` certificate (and its rotation). (restart)
    pub tls: bool,
    /// Origins whose pages may open the WebSocket (`https://chat.example.org`); empty means the
    /// page's own origin only (the scheme of this listener and the request's `Host`).
    pub allowed_origins: Vec<WebOrigin>,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            listen: vec![
                SocketAddr::from(([0, 0, 0, 0], 8080)),
                SocketAddr::from(([0u16; 8], 8080)),
            ],
            tls: false,
            allowed_origins: Vec::new(),
        }
    }
}

/// A web origin as browsers send it in `Origin`: `http://` or `https://`, a host and an
/// optional port, nothing else (no path, no trailing slash); kept in lower case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WebOrigin(pub String);

impl TryFrom<String> for WebOrigin {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let bad = || {
            format!(
                "{s:?} is not a web origin: write scheme://host[:port] with http or https and \
                 nothing after, e.g. \"https://chat.example.org\""
            )
        };
        let lower = s.to_ascii_lowercase();
        let rest = lower
            .strip_prefix("https://")
            .or_else(|| lower.strip_prefix("http://"))
            .ok_or_else(bad)?;
        let ok = !rest.is_empty()
            && rest.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
            });
        if ok { Ok(WebOrigin(lower)) } else { Err(bad()) }
    }
}

impl From<WebOrigin> for String {
    fn from(o: WebOrigin) -> String {
        o.0
    }
}

/// `[tls]`: the chat protocol over TLS 1.2/1.3 on its own port (docs/security.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsConfig {
    /// TCP addresses for TLS clients, bound like `server.listen`. (restart)
    #[serde(default = "TlsConfig::default_listen")]
    pub listen: Vec<SocketAddr>,
    /// The certificate chain in PEM, leaf first (certbot's `fullchain.pem`); re-read at reload.
    pub certificate: PathBuf,
    /// The certificate's private key in PEM (PKCS#8, PKCS#1 or SEC1); re-read at reload.
    pub private_key: PathBuf,
    /// Every TLS connection starts with a PROXY protocol header (before the handshake) naming
    /// the real client; `false` refuses connections that send one.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Addresses and CIDR blocks of the proxies allowed to send that header.
    #[serde(default)]
    pub trusted_proxies: Vec<crate::proxy_keys::ProxyNet>,
}

impl TlsConfig {
    /// The PROXY protocol keys of the TLS listeners.
    pub fn proxy(&self) -> crate::proxy_keys::Settings<'_> {
        crate::proxy_keys::Settings {
            section: "tls",
            enabled: self.proxy_protocol,
            trusted: &self.trusted_proxies,
        }
    }

    /// Port 42070 on every IPv4 and IPv6 address.
    pub fn default_listen() -> Vec<SocketAddr> {
        vec![
            SocketAddr::from(([0, 0, 0, 0], 42070)),
            SocketAddr::from(([0u16; 8], 42070)),
        ]
    }
}

/// `[metrics]`: where `/metrics` is served (docs/configuration.md, docs/security.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct MetricsConfig {
    /// Address of the HTTP listener; keep it on loopback or a private network. (restart)
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9469)),
        }
    }
}

/// `[cluster]`: this node's place in a room served by several chatd nodes (docs/cluster.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterConfig {
    /// Servers of one NATS cluster (`nats://host:port`, `tls://host:port`). (restart)
    pub nats: Vec<String>,
    /// This node's name, unique in the cluster; empty means the host name. (restart)
    pub node: String,
    /// The room's name in NATS: the prefix of its stream, buckets and subjects. (restart)
    pub name: ClusterName,
    /// A NATS credentials file (`.creds`), or a file holding `user:password` or a token; empty
    /// means none. (restart)
    pub credentials: PathBuf,
    /// A node silent this long is dead: its users leave and their names are freed.
    #[serde(with = "humantime_serde")]
    pub node_timeout: Duration,
    /// Copies of the stream and buckets (3 on a 3-server NATS cluster). (restart)
    pub replicas: Bounded<1, 5>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats: vec!["nats://127.0.0.1:4222".to_owned()],
            node: String::new(),
            name: ClusterName("main".to_owned()),
            credentials: PathBuf::new(),
            node_timeout: Duration::from_secs(10),
            replicas: Bounded(1),
        }
    }
}

impl ClusterConfig {
    /// This node's name: `node`, else the host name.
    pub fn node_name(&self) -> String {
        if !self.node.is_empty() {
            return self.node.clone();
        }
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .map(|h| {
                h.chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                    .collect::<String>()
            })
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "chatd".to_owned())
    }
}

/// A room or node name usable in NATS subjects and bucket names: 1 to 32 of `A-Z a-z 0-9 - _`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterName(pub String);

impl TryFrom<String> for ClusterName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if is_cluster_token(&s) {
            Ok(ClusterName(s))
        } else {
            Err(format!(
                "{s:?} is not a valid name here: use 1 to 32 of A-Z, a-z, 0-9, '-' and '_'"
            ))
        }
    }
}

impl From<ClusterName> for String {
    fn from(n: ClusterName) -> String {
        n.0
    }
}

/// Whether `s` can name a room or node in NATS subjects, streams and buckets.
pub fn is_cluster_token(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `[server]`: where the chat listens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerConfig {
    /// TCP addresses to listen on. An IPv6 wildcard is bound IPv6-only so it can sit beside
    /// `0.0.0.0` on the same port. (restart)
    pub listen: Vec<SocketAddr>,
    /// How long a partial line from a client that never sent a newline may sit before it is
    /// taken as a whole message (clients that `send()` each message without a terminator).
    #[serde(with = "humantime_serde")]
    pub partial_line_flush: Duration,
    /// How long shutdown waits for queued messages to reach clients before closing anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Where state that must survive a restart (bans) is kept; empty means `$STATE_DIRECTORY`,
    /// else `/var/lib/chatd` as root, else `$XDG_STATE_HOME/chatd`. (restart)
    pub state_dir: PathBuf,
    /// Every connection starts with a PROXY protocol header (v1 or v2) naming the real client;
    /// `false` refuses connections that send one.
    pub proxy_protocol: bool,
    /// Addresses and CIDR blocks of the proxies allowed to send that header.
    pub trusted_proxies: Vec<crate::proxy_keys::ProxyNet>,
}

impl ServerConfig {
    /// The PROXY protocol keys of the TCP listeners.
    pub fn proxy(&self) -> crate::proxy_keys::Settings<'_> {
        crate::proxy_keys::Settings {
            section: "server",
            enabled: self.proxy_protocol,
            trusted: &self.trusted_proxies,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec![
                SocketAddr::from(([0, 0, 0, 0], 42069)),
                SocketAddr::from(([0u16; 8], 42069)),
            ],
            partial_line_flush: Duration::from_millis(200),
            shutdown_grace: Duration::from_secs(3),
            state_dir: PathBuf::new(),
            proxy_protocol: false,
            trusted_proxies: Vec::new(),
        }
    }
}

/// `[room]`: the shared chatroom.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RoomConfig {
    /// Message of the day, shown to each newcomer after the welcome; may span lines.
    pub motd: String,
    /// How many recent messages a newcomer is shown; 0 turns history off.
    pub history: Bounded<0, 10_000>,
}

impl Default for RoomConfig {
    fn default() -> Self {
        RoomConfig {
            motd: "Welcome to chatd. Be kind; type /help for commands.".to_owned(),
            history: Bounded(20),
        }
    }
}

/// `[names]`: the rules a name must pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct NameConfig {
    /// Longest name, in characters.
    pub max_length: Bounded<1, 64>,
    /// Names nobody may take, in addition to the built-in ones (server, admin, ...).
    pub reserved: Vec<String>,
}

impl Default for NameConfig {
    fn default() -> Self {
        NameConfig {
            max_length: Bounded(24),
            reserved: Vec::new(),
        }
    }
}

/// `[limits]`: what one client or all of them may use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitsConfig {
    /// Most simultaneous connections, named or not; more get "server full".
    pub max_clients: Bounded<1, 1_000_000>,
    /// Longest line a client may send, in bytes without the terminator.
    pub max_line_length: Bounded<16, 65_536>,
    /// Bytes that may wait in one client's outbound queue before it is disconnected as too slow.
    pub max_queue_bytes: Bounded<4_096, 1_073_741_824>,
    /// How long a new connection has to choose an accepted name.
    #[serde(with = "humantime_serde")]
    pub name_timeout: Duration,
    /// Most simultaneous connections from one IPv4 address or one IPv6 /64.
    pub max_connections_per_ip: Bounded<1, 1_000_000>,
    /// Lines per second a client may send, sustained (token bucket refill rate).
    pub message_rate: Bounded<1, 1_000_000>,
    /// Lines a client may send in a burst above the sustained rate (token bucket size).
    pub message_burst: Bounded<1, 1_000_000>,
    /// A client whose lines are refused this many times within 10 seconds is disconnected.
    pub flood_disconnect: Bounded<1, 1_000_000>,
    /// Idle time before TCP keepalive probes start; a peer that answers none of 3 probes is
    /// dropped, so half-open connections free their slots.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_clients: Bounded(10_000),
            max_line_length: Bounded(2048),
            max_queue_bytes: Bounded(1 << 20),
            name_timeout: Duration::from_secs(60),
            max_connections_per_ip: Bounded(20),
            message_rate: Bounded(5),
            message_burst: Bounded(10),
            flood_disconnect: Bounded(20),
            keepalive: Duration::from_secs(60),
        }
    }
}

/// `[admin]`: the admin socket `chatctl` talks to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AdminConfig {
    /// Socket path; empty means the standard location (see `admin::proto::default_socket_path`).
    /// (restart)
    pub socket: PathBuf,
    /// File mode of the socket; the kernel refuses `connect()` to anyone it does not allow.
    pub mode: FileMode,
    /// Members of this group may administer the daemon (besides root and the daemon's own user).
    /// Empty disables group access.
    pub group: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            socket: PathBuf::new(),
            mode: FileMode(0o660),
            group: "chatadm".to_owned(),
        }
    }
}

/// `[log]`: what gets logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct LogConfig {
    /// A level (`info`) or `tracing` filter directives (`info,chatd::admin=debug`);
    /// `RUST_LOG` overrides it.
    pub level: LogLevel,
}

/// An integer that must lie in `MIN..=MAX`; checked while parsing so the error points at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Bounded<const MIN: u64, const MAX: u64>(pub u64);

impl<const MIN: u64, const MAX: u64> Bounded<MIN, MAX> {
    /// The value as a `usize` (every bound we use fits).
    pub fn get(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl<const MIN: u64, const MAX: u64> TryFrom<i64> for Bounded<MIN, MAX> {
    type Error = String;
    fn try_from(v: i64) -> Result<Self, String> {
        match u64::try_from(v) {
            Ok(u) if (MIN..=MAX).contains(&u) => Ok(Bounded(u)),
            _ => Err(format!("{v} is out of range, expected {MIN} to {MAX}")),
        }
    }
}

impl<const MIN: u64, const MAX: u64> From<Bounded<MIN, MAX>> for i64 {
    fn from(b: Bounded<MIN, MAX>) -> i64 {
        i64::try_from(b.0).unwrap_or(i64::MAX)
    }
}

/// A Unix permission mode (at most `0o777`); write it as `0o660` in TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct FileMode(pub u32);

impl TryFrom<i64> for FileMode {
    type Error = String;
    fn try_from(v: i64) -> Result<Self, String> {
        match u32::try_from(v) {
            Ok(m) if m <= 0o777 => Ok(FileMode(m)),
            _ => Err(format!(
                "{v} is not a file mode; write it in octal, e.g. 0o660"
            )),
        }
    }
}

impl From<FileMode> for i64 {
    fn from(m: FileMode) -> i64 {
        i64::from(m.0)
    }
}

/// Validated `tracing` filter directives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LogLevel(String);

impl LogLevel {
    /// The directives as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for LogLevel {
    fn default() -> Self {
        LogLevel("info".to_owned())
    }
}

impl TryFrom<String> for LogLevel {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        tracing_subscriber::EnvFilter::builder()
            .parse(&s)
            .map_err(|e| format!("invalid log level {s:?}: {e}"))?;
        Ok(LogLevel(s))
    }
}

impl From<LogLevel> for String {
    fn from(l: LogLevel) -> String {
        l.0
    }
}

/// Why a config could not be used; `Display` gives `file:line:col: message` where known.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config: {source}")]
    Io {
        /// The config file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type or range.
    #[error("{path}:{line}:{col}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the offending text.
        line: usize,
        /// 1-based column (in characters) of the offending text.
        col: usize,
        /// What is wrong.
        message: String,
    },
    /// Values that are fine one by one but not together.
    #[error("{path}: {message}")]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// What is wrong, naming the keys involved.
        message: String,
    },
}

impl Config {
    /// Reads and validates the config at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                col,
                message: e.message().trim().to_owned(),
            }
        })?;
        config.check().map_err(|message| {
            // A check's message starts with the key it is about; point at that key where the
            // file writes it (else at the file as a whole).
            let key = message.split_once(':').map_or("", |(k, _)| k);
            match locate_key(text, key) {
                Some((line, col)) => ConfigError::Parse {
                    path: path.to_owned(),
                    line,
                    col,
                    message,
                },
                None => ConfigError::Invalid {
                    path: path.to_owned(),
                    message,
                },
            }
        })?;
        Ok(config)
    }

    /// Checks that involve more than one value.
    fn check(&self) -> Result<(), String> {
        if self.server.listen.is_empty() {
            return Err("server.listen: at least one address is needed".to_owned());
        }
        let mut seen = std::collections::HashSet::new();
        for addr in &self.server.listen {
            if !seen.insert(addr) {
                return Err(format!("server.listen: {addr} is listed twice"));
            }
        }
        if let Some(tls) = &self.tls {
            if tls.listen.is_empty() {
                return Err("tls.listen: at least one address is needed".to_owned());
            }
            let mut seen = std::collections::HashSet::new();
            for addr in &tls.listen {
                if !seen.insert(addr) {
                    return Err(format!("tls.listen: {addr} is listed twice"));
                }
                // Port 0 (any free port) cannot clash; tests use it on both.
                if addr.port() != 0 && self.server.listen.contains(addr) {
                    return Err(format!(
                        "tls.listen: {addr} is also in server.listen; TLS needs its own port"
                    ));
                }
            }
            for (key, path) in [
                ("tls.certificate", &tls.certificate),
                ("tls.private-key", &tls.private_key),
            ] {
                if path.as_os_str().is_empty() {
                    return Err(format!("{key}: a file is needed"));
                }
            }
        }
        if let Some(web) = &self.web {
            if web.listen.is_empty() {
                return Err("web.listen: at least one address is needed".to_owned());
            }
            let mut seen = std::collections::HashSet::new();
            let tls_listen = self
                .tls
                .as_ref()
                .map(|t| t.listen.as_slice())
                .unwrap_or(&[]);
            for addr in &web.listen {
                if !seen.insert(addr) {
                    return Err(format!("web.listen: {addr} is listed twice"));
                }
                if addr.port() != 0
                    && (self.server.listen.contains(addr) || tls_listen.contains(addr))
                {
                    return Err(format!(
                        "web.listen: {addr} is also a chat listener (server.listen or tls.listen); \
                         the web page needs its own port"
                    ));
                }
            }
            if web.tls && self.tls.is_none() {
                return Err(
                    "web.tls: HTTPS needs the [tls] table (certificate and private-key)".to_owned(),
                );
            }
        }
        self.server.proxy().check()?;
        if let Some(tls) = &self.tls {
            tls.proxy().check()?;
        }
        if self.limits.keepalive < Duration::from_secs(1) {
            return Err("limits.keepalive: must be at least 1s".to_owned());
        }
        for name in &self.names.reserved {
            if name.trim().is_empty() {
                return Err("names.reserved: empty names are not allowed".to_owned());
            }
        }
        if let Some(cluster) = &self.cluster {
            if cluster.nats.is_empty() {
                return Err("cluster.nats: at least one NATS server is needed".to_owned());
            }
            for url in &cluster.nats {
                let scheme_ok = ["nats://", "tls://", "ws://", "wss://"]
                    .iter()
                    .any(|p| url.starts_with(p));
                if !scheme_ok || url.contains(char::is_whitespace) {
                    return Err(format!(
                        "cluster.nats: {url:?} is not a NATS server address (nats://host:port)"
                    ));
                }
            }
            if !cluster.node.is_empty() && !is_cluster_token(&cluster.node) {
                return Err(format!(
                    "cluster.node: {:?} must be 1 to 32 of A-Z, a-z, 0-9, '-' and '_'",
                    cluster.node
                ));
            }
            if cluster.node_timeout < Duration::from_secs(2) {
                return Err("cluster.node-timeout: must be at least 2s".to_owned());
            }
        }
        Ok(())
    }

    /// The config as TOML, with every default filled in (for `chatd --check-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Where `section.key` is written in `text` (1-based line and column of the key), if it is
/// written as `key = ...` under a `[section]` header.
fn locate_key(text: &str, dotted: &str) -> Option<(usize, usize)> {
    let (section, key) = dotted.split_once('.')?;
    let mut current = "";
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if let Some(header) = trimmed.strip_prefix('[') {
            current = header.split(']').next().unwrap_or("").trim();
            continue;
        }
        if current == section
            && let Some(rest) = trimmed.strip_prefix(key)
            && rest.trim_start().starts_with('=')
        {
            let col = line.chars().count() - trimmed.chars().count() + 1;
            return Some((i + 1, col));
        }
    }
    None
}

/// 1-based line and character column of byte offset `at` in `text`.
fn line_col(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

/// What a reload changed: keys applied at once and keys that wait for a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDiff {
    /// Changed keys now in effect.
    pub applied: Vec<String>,
    /// Changed keys that only take effect after a restart.
    pub needs_restart: Vec<String>,
}

impl ConfigDiff {
    /// Compares two configs key by key (dotted TOML paths).
    pub fn between(old: &Config, new: &Config) -> ConfigDiff {
        let (old, new) = (flatten(old), flatten(new));
        let mut diff = ConfigDiff::default();
        let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
        for key in keys {
            if old.get(key) != new.get(key) {
                if RESTART_KEYS.contains(&key.as_str()) {
                    diff.needs_restart.push(key.clone());
                } else {
                    diff.applied.push(key.clone());
                }
            }
        }
        diff
    }
}

impl fmt::Display for ConfigDiff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "nothing".to_owned()
            } else {
                v.join(", ")
            }
        };
        write!(
            f,
            "applied: {}; needs restart: {}",
            list(&self.applied),
            list(&self.needs_restart)
        )
    }
}

/// The config as `section.key → value`, for comparing configs without listing every field.
fn flatten(config: &Config) -> BTreeMap<String, toml::Value> {
    let mut out = BTreeMap::new();
    if let Ok(toml::Value::Table(sections)) = toml::Value::try_from(config) {
        for (section, value) in sections {
            match value {
                toml::Value::Table(keys) => {
                    for (key, v) in keys {
                        out.insert(format!("{section}.{key}"), v);
                    }
                }
                other => {
                    out.insert(section, other);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/chatd/chatd.toml"))
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").ok(), Some(Config::default()));
    }

    #[test]
    fn shipped_config_parses_and_equals_defaults() {
        let text = include_str!("../../config/chatd.toml");
        let parsed = parse(text).map_err(|e| e.to_string());
        assert_eq!(parsed.ok(), Some(Config::default()));
    }

    #[test]
    fn unknown_key_names_file_line_col() {
        let err = parse("[room]\nhistory = 5\nmotdd = \"x\"\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("/etc/chatd/chatd.toml:3:1: "), "{err}");
        assert!(err.contains("unknown field `motdd`"), "{err}");
    }

    #[test]
    fn out_of_range_value_points_at_the_value() {
        let err = parse("[limits]\nmax-line-length = 5\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("/etc/chatd/chatd.toml:2:19: "), "{err}");
        assert!(err.contains("out of range"), "{err}");
    }

    #[test]
    fn bad_log_level_is_rejected() {
        assert!(parse("[log]\nlevel = \"loud=?=\"\n").is_err());
    }

    #[test]
    fn octal_mode_and_durations_parse() {
        let c = parse("[admin]\nmode = 0o600\n[limits]\nname-timeout = \"5s\"\n").ok();
        let c = c.unwrap_or_default();
        assert_eq!(c.admin.mode, FileMode(0o600));
        assert_eq!(c.limits.name_timeout, Duration::from_secs(5));
    }

    #[test]
    fn diff_separates_live_and_restart_keys() {
        let old = Config::default();
        let mut new = old.clone();
        new.room.motd = "hi".into();
        new.server.listen = vec![SocketAddr::from(([127, 0, 0, 1], 1))];
        let d = ConfigDiff::between(&old, &new);
        assert_eq!(d.applied, vec!["room.motd".to_owned()]);
        assert_eq!(d.needs_restart, vec!["server.listen".to_owned()]);
        assert_eq!(
            d.to_string(),
            "applied: room.motd; needs restart: server.listen"
        );
    }

    #[test]
    fn tls_table_parses_with_default_listen_and_reports_its_classes() {
        let c = parse("[tls]\ncertificate = \"/c.pem\"\nprivate-key = \"/k.pem\"\n")
            .map_err(|e| e.to_string());
        let tls = c.ok().and_then(|c| c.tls);
        assert_eq!(
            tls.as_ref().map(|t| t.listen.clone()),
            Some(TlsConfig::default_listen())
        );
        let old = Config {
            tls,
            ..Config::default()
        };
        let mut new = old.clone();
        if let Some(t) = new.tls.as_mut() {
            t.certificate = "/new.pem".into();
            t.listen = vec![SocketAddr::from(([127, 0, 0, 1], 1))];
        }
        let d = ConfigDiff::between(&old, &new);
        assert_eq!(d.applied, vec!["tls.certificate".to_owned()]);
        assert_eq!(d.needs_restart, vec!["tls.listen".to_owned()]);
    }

    #[test]
    fn tls_errors_name_file_line_col_or_key() {
        let err = |text: &str| parse(text).err().map(|e| e.to_string()).unwrap_or_default();
        let e = err("[tls]\ncertificate = \"/c.pem\"\n");
        assert!(e.starts_with("/etc/chatd/chatd.toml:1:1: "), "{e}");
        assert!(e.contains("private-key"), "{e}");
        let e = err("[tls]\ncertificate = \"/c\"\nprivate-key = \"/k\"\nlisten = [\"x\"]\n");
        assert!(e.starts_with("/etc/chatd/chatd.toml:4:"), "{e}");
        let e = err("[tls]\ncertificate = \"/c\"\nprivate-key = \"/k\"\ncert = 1\n");
        assert!(e.starts_with("/etc/chatd/chatd.toml:4:1: "), "{e}");
        let e = err("[tls]\ncertificate = \"\"\nprivate-key = \"/k\"\n");
        assert!(e.contains("tls.certificate: a file is needed"), "{e}");
        let e = err(
            "[server]\nlisten = [\"127.0.0.1:5000\"]\n[tls]\nlisten = [\"127.0.0.1:5000\"]\n\
             certificate = \"/c\"\nprivate-key = \"/k\"\n",
        );
        assert!(
            e.contains("tls.listen: 127.0.0.1:5000 is also in server.listen"),
            "{e}"
        );
    }

    #[test]
    fn web_table_parses_checks_origins_and_reports_its_classes() {
        let c = parse("[web]\nallowed-origins = [\"HTTPS://Chat.example.org:8443\"]\n")
            .map_err(|e| e.to_string());
        let web = c.ok().and_then(|c| c.web);
        let web = web.unwrap_or_else(|| panic!("no [web]"));
        assert_eq!(web.listen, WebConfig::default().listen);
        assert_eq!(
            web.allowed_origins,
            vec![WebOrigin("https://chat.example.org:8443".into())]
        );
        let err = |text: &str| parse(text).err().map(|e| e.to_string()).unwrap_or_default();
        for bad in [
            "chat.example.org",
            "https://x.org/",
            "ftp://x.org",
            "https://",
        ] {
            let e = err(&format!("[web]\nallowed-origins = [\"{bad}\"]\n"));
            assert!(e.starts_with("/etc/chatd/chatd.toml:2:"), "{bad}: {e}");
            assert!(e.contains("not a web origin"), "{e}");
        }
        let e = err("[web]\nlisten = []\n");
        assert!(
            e.starts_with("/etc/chatd/chatd.toml:2:1: web.listen: at least one"),
            "{e}"
        );
        let old = Config {
            web: Some(web),
            ..Config::default()
        };
        let mut new = old.clone();
        if let Some(w) = new.web.as_mut() {
            w.tls = true;
            w.allowed_origins.clear();
        }
        let d = ConfigDiff::between(&old, &new);
        assert_eq!(d.applied, vec!["web.allowed-origins".to_owned()]);
        assert_eq!(d.needs_restart, vec!["web.tls".to_owned()]);
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\nçd", 5), (2, 2));
        assert_eq!(line_col("", 0), (1, 1));
    }
}
