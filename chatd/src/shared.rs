//! State every task of the daemon shares: the room, the live config and the counters, plus the
//! reload step itself (SIGHUP and `chatctl reload` both reach it through `systemd::reload`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;

use crate::bans::Bans;
use crate::cluster::Cluster;
use crate::config::{Config, ConfigDiff, ConfigError};
use crate::room::Room;
use chat_proto::names::NameRules;

/// Where the config came from, so a reload reads the same place.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The file to (re-)read.
    pub path: PathBuf,
    /// Given with `--config`: a missing file is an error. Otherwise (the default path) a missing
    /// file means "built-in defaults".
    pub explicit: bool,
}

impl ConfigSource {
    /// Loads the config from this source; `Ok(None)` means the default file does not exist and
    /// the built-in defaults apply.
    pub fn load(&self) -> Result<Option<Config>, ConfigError> {
        if !self.explicit && !self.path.exists() {
            return Ok(None);
        }
        Config::load(&self.path).map(Some)
    }
}

/// The config as tasks read it, with what is derived from it computed once per reload.
#[derive(Debug)]
pub struct Live {
    /// The config in force.
    pub config: Config,
    /// Name rules built from `config.names`.
    pub name_rules: NameRules,
    /// Whether the config came from a file (false: built-in defaults).
    pub from_file: bool,
}

impl Live {
    /// Derives the live view of `config`.
    pub fn new(config: Config, from_file: bool) -> Self {
        let name_rules = NameRules::new(config.names.max_length.get(), &config.names.reserved);
        Live {
            config,
            name_rules,
            from_file,
        }
    }
}

/// Applies the side effects of a new config outside the room (log level, admin socket mode).
pub type ApplyHook = Box<dyn Fn(&Config) -> Result<(), String> + Send + Sync>;

/// How often each limit fired since start (`chatctl status`).
#[derive(Debug, Default)]
pub struct LimitCounters {
    /// Lines refused for exceeding `limits.max-line-length`.
    pub line_too_long: AtomicU64,
    /// Lines refused for not being UTF-8.
    pub bad_utf8: AtomicU64,
    /// Lines refused by the flood limit (`limits.message-rate`).
    pub rate_limited: AtomicU64,
    /// Clients disconnected for flooding (`limits.flood-disconnect`).
    pub flood_disconnects: AtomicU64,
    /// Clients disconnected because their outbound queue overflowed (`limits.max-queue-bytes`).
    pub slow_disconnects: AtomicU64,
    /// Connections refused because `limits.max-clients` were open.
    pub refused_full: AtomicU64,
    /// Connections refused by `limits.max-connections-per-ip`.
    pub refused_per_ip: AtomicU64,
    /// Connections closed for not choosing a name in time (`limits.name-timeout`).
    pub name_timeouts: AtomicU64,
    /// Connections or names refused by a ban.
    pub refused_banned: AtomicU64,
    /// Times accepting stalled for lack of resources (EMFILE and kin).
    pub accept_backoffs: AtomicU64,
    /// TLS connections closed because their handshake failed (plaintext or garbage on the TLS
    /// port, an aborted or timed-out handshake).
    pub tls_handshakes_failed: AtomicU64,
    /// Of those, handshakes not finished within their bound (`tls::HANDSHAKE_TIMEOUT`).
    pub tls_handshake_timeouts: AtomicU64,
    /// Connections refused for their PROXY protocol header: an untrusted sender, a missing,
    /// malformed or late header, or one sent to a listener without `proxy-protocol`.
    pub refused_proxy: AtomicU64,
    /// WebSocket upgrades refused for a missing or foreign `Origin` (`web.allowed-origins`).
    pub refused_origin: AtomicU64,
    /// WebSocket sessions closed for what they sent (binary, oversized or malformed frames,
    /// too many pings).
    pub ws_bad_frames: AtomicU64,
}

impl LimitCounters {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters as `chatctl status` reports them.
    pub fn snapshot(&self) -> chat_proto::admin::LimitStats {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        chat_proto::admin::LimitStats {
            line_too_long: load(&self.line_too_long),
            bad_utf8: load(&self.bad_utf8),
            rate_limited: load(&self.rate_limited),
            flood_disconnects: load(&self.flood_disconnects),
            slow_disconnects: load(&self.slow_disconnects),
            refused_full: load(&self.refused_full),
            refused_per_ip: load(&self.refused_per_ip),
            name_timeouts: load(&self.name_timeouts),
            refused_banned: load(&self.refused_banned),
            accept_backoffs: load(&self.accept_backoffs),
            tls_handshakes_failed: load(&self.tls_handshakes_failed),
            tls_handshake_timeouts: load(&self.tls_handshake_timeouts),
            refused_proxy: load(&self.refused_proxy),
            refused_origin: load(&self.refused_origin),
            ws_bad_frames: load(&self.ws_bad_frames),
        }
    }
}

/// Activity numbers that `chatctl status` and `/metrics` both read (metrics.rs), beside the
/// room's [`crate::room::Counters`] and the [`LimitCounters`]: one set of atomics, two views.
#[derive(Debug, Default)]
pub struct Activity {
    /// Bytes written to chat clients (one add per write call, not per frame).
    pub bytes_sent: AtomicU64,
    /// Clients that left with `/quit`.
    pub quits: AtomicU64,
    /// Connections closed at naming because the address or name is banned (a ban made while a
    /// user is online disconnects them as a kick).
    pub ban_disconnects: AtomicU64,
    /// Connections that ended without the server closing them: EOF, reset, I/O error, or a
    /// peer the keepalive found gone.
    pub lost: AtomicU64,
    /// Reloads rejected (the running config stayed).
    pub reload_failures: AtomicU64,
    /// Admitted connections open on the plain TCP listeners.
    pub open_tcp: AtomicUsize,
    /// Admitted connections open on the TLS listeners.
    pub open_tls: AtomicUsize,
    /// Admitted WebSocket sessions open on the web listeners (ws and wss).
    pub open_ws: AtomicUsize,
}

/// Everything the daemon's tasks share.
pub struct Shared {
    /// The chatroom.
    pub room: Room,
    /// This node's place in a room served by several nodes (`[cluster]`); `None` for a single
    /// node, whose room is ordered in process.
    pub cluster: Option<Arc<Cluster>>,
    /// The config in force. Readers `load()` it when they need a value and never hold the guard
    /// across an `.await`.
    pub live: ArcSwap<Live>,
    /// Where reloads read from.
    pub source: ConfigSource,
    /// Addresses actually bound (known after binding).
    pub listen: Vec<SocketAddr>,
    /// TLS addresses actually bound (empty without `[tls]`).
    pub tls_listen: Vec<SocketAddr>,
    /// The TLS certificate in force, when a TLS listener runs; reloads rotate it.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// Web (HTTP/HTTPS) addresses actually bound (empty without `[web]`).
    pub web_listen: Vec<SocketAddr>,
    /// The admin socket's path.
    pub admin_socket: PathBuf,
    /// Start time, for uptime.
    pub started: Instant,
    /// Wall-clock start time.
    pub started_at: SystemTime,
    /// Next client id; ids are never reused.
    next_id: AtomicU64,
    /// Open chat connections (named or not, refused ones until they are told); kept by
    /// `admission`, which is the only writer.
    pub connections: AtomicUsize,
    /// Successful reloads.
    pub reloads: AtomicU64,
    /// How often each limit fired.
    pub limits: LimitCounters,
    /// Traffic, disconnects by reason, reload failures, connections by listener.
    pub activity: Activity,
    /// Bans, persisted in the state directory.
    pub bans: Bans,
    /// What giving freed memory back to the system has done (memory.rs).
    pub trims: crate::memory::TrimStats,
    /// Serialises reloads so two never interleave their swaps and hooks.
    reload_lock: Mutex<()>,
    /// Side effects of a reload beyond the room (log filter, admin socket permissions).
    apply_hooks: Vec<ApplyHook>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("listen", &self.listen)
            .field("admin_socket", &self.admin_socket)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Shared state for a daemon that loaded `config` (None: built-in defaults) from `source`.
    pub fn new(
        config: Option<Config>,
        source: ConfigSource,
        listen: Vec<SocketAddr>,
        admin_socket: PathBuf,
        bans: Bans,
        apply_hooks: Vec<ApplyHook>,
    ) -> Self {
        let from_file = config.is_some();
        let live = Live::new(config.unwrap_or_default(), from_file);
        let history = live.config.room.history.get();
        let cluster = live.config.cluster.as_ref().map(Cluster::new);
        let room = match &cluster {
            Some(c) => Room::with_engine(history, c.clone()),
            None => Room::new(history),
        };
        Shared {
            room,
            cluster,
            live: ArcSwap::from_pointee(live),
            source,
            listen,
            tls_listen: Vec::new(),
            tls: None,
            web_listen: Vec::new(),
            admin_socket,
            started: Instant::now(),
            started_at: SystemTime::now(),
            next_id: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            reloads: AtomicU64::new(0),
            limits: LimitCounters::default(),
            activity: Activity::default(),
            bans,
            trims: crate::memory::TrimStats::default(),
            reload_lock: Mutex::new(()),
            apply_hooks,
        }
    }

    /// The same state with a TLS listener on `addrs` serving `tls`'s certificate.
    pub fn with_tls(mut self, tls: Arc<crate::tls::Tls>, addrs: Vec<SocketAddr>) -> Self {
        self.tls = Some(tls);
        self.tls_listen = addrs;
        self
    }

    /// The same state with the web listener on `addrs`.
    pub fn with_web(mut self, addrs: Vec<SocketAddr>) -> Self {
        self.web_listen = addrs;
        self
    }

    /// A fresh client id.
    pub fn next_client_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The config file in force, if any.
    pub fn config_path(&self) -> Option<&Path> {
        self.live
            .load()
            .from_file
            .then_some(self.source.path.as_path())
    }

    /// Re-reads the config and applies what can change live. On any error the running config
    /// stays exactly as it was. Callers go through `systemd::reload`, which tells the service
    /// manager around this, so every reload path looks the same to `systemctl`.
    pub(crate) fn reload(&self) -> Result<ConfigDiff, ConfigError> {
        let result = self.reload_now();
        if result.is_err() {
            self.activity
                .reload_failures
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn reload_now(&self) -> Result<ConfigDiff, ConfigError> {
        let _serial = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let loaded = self.source.load()?;
        let from_file = loaded.is_some();
        let new = loaded.unwrap_or_default();
        let old = self.live.load_full();
        let mut diff = ConfigDiff::between(&old.config, &new);
        // The certificate is read (and checked) before anything changes, so a bad one rejects
        // the reload with its file named and the old certificate stays in use.
        let certificate = match (&self.tls, &new.tls) {
            (Some(tls), Some(files)) => {
                Some(tls.load(files).map_err(|e| ConfigError::Invalid {
                    path: self.source.path.clone(),
                    message: format!("{e}; keeping the certificate in use"),
                })?)
            }
            _ => None,
        };
        if self.tls.is_none() {
            // No TLS listener runs: a new [tls] table as a whole waits for a restart.
            let (tls, rest): (Vec<String>, Vec<String>) =
                diff.applied.drain(..).partition(|k| k.starts_with("tls."));
            diff.applied = rest;
            diff.needs_restart.extend(tls);
            diff.needs_restart.sort();
        }
        if self.web_listen.is_empty() {
            // No web listener runs: a new [web] table as a whole waits for a restart.
            let (web, rest): (Vec<String>, Vec<String>) =
                diff.applied.drain(..).partition(|k| k.starts_with("web."));
            diff.applied = rest;
            diff.needs_restart.extend(web);
            diff.needs_restart.sort();
        }
        for hook in &self.apply_hooks {
            if let Err(message) = hook(&new) {
                // Hooks validate before they change anything, so nothing was applied yet;
                // undo the ones that ran by re-applying the old config.
                for undo in &self.apply_hooks {
                    let _ = undo(&old.config);
                }
                return Err(ConfigError::Invalid {
                    path: self.source.path.clone(),
                    message,
                });
            }
        }
        self.room.set_history_cap(new.room.history.get());
        self.live.store(Arc::new(Live::new(new, from_file)));
        if let (Some(tls), Some(certificate)) = (&self.tls, certificate) {
            tls.install(certificate);
        }
        self.reloads.fetch_add(1, Ordering::Relaxed);
        Ok(diff)
    }
}

#[cfg(test)]
impl Shared {
    /// Shared state for unit tests: `config`, bans kept in `dir`, no hooks, nothing bound.
    pub(crate) fn for_test(dir: &Path, config: Config) -> Shared {
        let bans = Bans::load(dir).unwrap_or_else(|e| panic!("{e}"));
        let source = ConfigSource {
            path: dir.join("chatd.toml"),
            explicit: false,
        };
        Shared::new(
            Some(config),
            source,
            Vec::new(),
            dir.join("admin.sock"),
            bans,
            Vec::new(),
        )
    }
}

/// A cluster node's engine reaches the room, the name rules and the ban list through this.
impl crate::cluster::Host for Shared {
    fn room(&self) -> &Room {
        &self.room
    }

    fn validate_name(
        &self,
        name: &str,
    ) -> Result<chat_proto::names::Name, chat_proto::names::NameError> {
        self.live.load().name_rules.validate(name)
    }

    fn history(&self) -> usize {
        self.live.load().config.room.history.get()
    }

    fn bans(&self) -> &Bans {
        &self.bans
    }

    fn node_timeout(&self) -> Option<std::time::Duration> {
        self.live
            .load()
            .config
            .cluster
            .as_ref()
            .map(|c| c.node_timeout)
    }
}
