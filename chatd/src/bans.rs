//! Bans by name or by address (an IP or a CIDR block), with optional expiry, kept in a JSON
//! state file that survives restarts.
//!
//! The file is replaced atomically (write a temporary file, fsync, rename, fsync the directory),
//! so a crash mid-write leaves either the old list or the new one, never a torn file. A file that
//! does not parse stops the daemon at startup rather than silently forgetting every ban.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use chat_proto::names;

/// File name of the ban list inside the state directory.
pub const BANS_FILE: &str = "bans.json";

/// What a ban applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "kebab-case")]
pub enum Target {
    /// A name (matched by its uniqueness key, so look-alikes are banned too).
    Name(String),
    /// An address block; a single IP is a /32 or /128.
    Net(IpNet),
}

/// Why an admin's ban target was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Nothing but blanks.
    #[error("a ban needs a name, an IP address or a CIDR block")]
    Empty,
    /// Has a `/` but is not `IP/PREFIX`.
    #[error("{raw:?} is not a valid CIDR block: {source}")]
    BadCidr {
        /// The target as typed.
        raw: String,
        /// What the parser objected to.
        source: ipnet::AddrParseError,
    },
    /// Looks like an address (digits and dots, or a colon) but is not one.
    #[error("{raw:?} is not a valid IP address", raw = .0)]
    BadIp(String),
}

impl Target {
    /// Reads `NAME`, `IP` or `IP/PREFIX` as typed by an admin.
    pub fn parse(raw: &str) -> Result<Target, TargetError> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(TargetError::Empty);
        }
        if let Ok(ip) = raw.parse::<IpAddr>() {
            return Ok(Target::Net(IpNet::from(ip)));
        }
        if raw.contains('/') {
            return raw
                .parse::<IpNet>()
                .map(|n| Target::Net(n.trunc()))
                .map_err(|source| TargetError::BadCidr {
                    raw: raw.to_owned(),
                    source,
                });
        }
        if raw.contains(':') || raw.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(TargetError::BadIp(raw.to_owned()));
        }
        Ok(Target::Name(raw.to_owned()))
    }

    /// Whether this target covers a client at `ip` whose name has uniqueness key `name_key`
    /// (`None` before it has chosen one). The one ban-matching rule: a name ban matches by key,
    /// so look-alike spellings are covered; an address ban matches IPv4-mapped IPv6 addresses as
    /// the IPv4 address they carry.
    pub fn matches(&self, ip: IpAddr, name_key: Option<&str>) -> bool {
        match self {
            Target::Name(n) => name_key.is_some_and(|key| names::lookup_key(n) == key),
            Target::Net(net) => net.contains(&canonical(ip)),
        }
    }

    /// The ban's target as shown to people: the name, or the address block.
    pub fn to_text(&self) -> String {
        match self {
            Target::Name(n) => n.clone(),
            Target::Net(net) if net.prefix_len() == net.max_prefix_len() => net.addr().to_string(),
            Target::Net(net) => net.to_string(),
        }
    }

    fn same_as(&self, other: &Target) -> bool {
        match (self, other) {
            (Target::Name(a), Target::Name(b)) => names::lookup_key(a) == names::lookup_key(b),
            (a, b) => a == b,
        }
    }
}

/// One ban.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ban {
    /// What is banned.
    pub target: Target,
    /// Shown to the banned user.
    pub reason: String,
    /// When it was made, Unix seconds.
    pub created: u64,
    /// When it ends, Unix seconds; `None` is permanent.
    pub expires: Option<u64>,
}

impl Ban {
    /// Whether the ban is in force at `now` (Unix seconds).
    pub fn active(&self, now: u64) -> bool {
        self.expires.is_none_or(|e| now < e)
    }

    /// "until 2026-11-25T12:00:00Z" or "permanently", for messages.
    pub fn until_text(&self) -> String {
        chat_proto::admin::until_text(self.expires)
    }

    /// The line a banned user is shown.
    pub fn refusal(&self) -> String {
        format!("you are banned {}: {}", self.until_text(), self.reason)
    }
}

/// Errors reading or writing the ban list.
#[derive(Debug, thiserror::Error)]
pub enum BanError {
    /// The file could not be read or written.
    #[error("{path}: {action}: {source}")]
    Io {
        /// The ban file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file exists but is not a valid ban list.
    #[error("{path}: not a valid ban list ({source}); fix or remove it")]
    Corrupt {
        /// The ban file.
        path: PathBuf,
        /// The JSON error, with line and column.
        source: serde_json::Error,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct BanFile {
    version: u32,
    bans: Vec<Ban>,
}

/// The ban list and where it is kept.
#[derive(Debug)]
pub struct Bans {
    path: PathBuf,
    // Held while the file is rewritten, so two admin commands never interleave their writes;
    // ban changes are rare and the file is small.
    list: Mutex<Vec<Ban>>,
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Bans {
    /// Loads the ban list from `dir/bans.json` (none yet: an empty list), creating `dir`.
    pub fn load(dir: &Path) -> Result<Bans, BanError> {
        let path = dir.join(BANS_FILE);
        std::fs::create_dir_all(dir).map_err(|source| BanError::Io {
            path: dir.to_owned(),
            action: "creating state directory (server.state-dir)",
            source,
        })?;
        let list = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<BanFile>(&bytes)
                    .map_err(|source| BanError::Corrupt {
                        path: path.clone(),
                        source,
                    })?
                    .bans
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(BanError::Io {
                    path,
                    action: "reading ban list",
                    source,
                });
            }
        };
        Ok(Bans {
            path,
            list: Mutex::new(list),
        })
    }

    /// The ban file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Ban>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds (or replaces) a ban and saves the list; on a write error nothing changes.
    pub fn add(&self, ban: Ban) -> Result<(), BanError> {
        let mut list = self.lock();
        let mut next: Vec<Ban> = list
            .iter()
            .filter(|b| !b.target.same_as(&ban.target))
            .cloned()
            .collect();
        next.push(ban);
        self.save(&next)?;
        *list = next;
        Ok(())
    }

    /// Removes the ban on `target`; `Ok(false)` if there was none.
    pub fn remove(&self, target: &Target) -> Result<bool, BanError> {
        let mut list = self.lock();
        let next: Vec<Ban> = list
            .iter()
            .filter(|b| !b.target.same_as(target))
            .cloned()
            .collect();
        if next.len() == list.len() {
            return Ok(false);
        }
        self.save(&next)?;
        *list = next;
        Ok(true)
    }

    /// Bans in force, expired ones dropped.
    pub fn active(&self) -> Vec<Ban> {
        let now = now_secs();
        self.lock()
            .iter()
            .filter(|b| b.active(now))
            .cloned()
            .collect()
    }

    /// The ban in force on a client at `ip` with name key `name_key` (`None`: not named yet),
    /// if any. When both an address ban and a name ban apply, the address ban is the one
    /// reported: it is the one the client cannot step around by picking another name.
    pub fn find(&self, ip: IpAddr, name_key: Option<&str>) -> Option<Ban> {
        let now = now_secs();
        self.lock()
            .iter()
            .filter(|b| b.active(now) && b.target.matches(ip, name_key))
            // `min_by_key` keeps the first of equals, so among bans of one kind the oldest wins.
            .min_by_key(|b| matches!(b.target, Target::Name(_)))
            .cloned()
    }

    /// Writes `list` atomically: temp file, fsync, rename over the old file, fsync the directory.
    fn save(&self, list: &[Ban]) -> Result<(), BanError> {
        let io = |action| {
            let path = self.path.clone();
            move |source| BanError::Io {
                path,
                action,
                source,
            }
        };
        let now = now_secs();
        let file = BanFile {
            version: 1,
            // Expired bans are dropped from the file the next time it is written.
            bans: list.iter().filter(|b| b.active(now)).cloned().collect(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file)
            .map_err(|e| io("encoding ban list")(std::io::Error::other(e)))?;
        bytes.push(b'\n');
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io("creating temporary ban file"))?;
        f.write_all(&bytes).map_err(io("writing ban list"))?;
        f.sync_all().map_err(io("syncing ban list"))?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(io("replacing ban list"))?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// IPv4-mapped IPv6 addresses are matched as the IPv4 address they carry.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The default state directory: `$STATE_DIRECTORY` (systemd), `/var/lib/chatd` as root, else
/// `$XDG_STATE_HOME/chatd` or `~/.local/state/chatd`.
pub fn default_state_dir(root: bool) -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY")
        && let Some(first) = dir.to_string_lossy().split(':').next()
        && !first.is_empty()
    {
        return PathBuf::from(first);
    }
    if root {
        return PathBuf::from("/var/lib/chatd");
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("chatd");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/state/chatd"),
        None => std::env::temp_dir().join("chatd-state"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(target: &str, expires: Option<u64>) -> Ban {
        Ban {
            target: Target::parse(target).unwrap_or(Target::Name("x".into())),
            reason: "test".into(),
            created: now_secs(),
            expires,
        }
    }

    #[test]
    fn parses_targets() {
        assert_eq!(Target::parse("bob"), Ok(Target::Name("bob".into())));
        assert_eq!(Target::parse(" "), Err(TargetError::Empty));
        assert_eq!(
            Target::parse("10.1.2").map_err(|e| e.to_string()),
            Err("\"10.1.2\" is not a valid IP address".to_owned())
        );
        assert!(matches!(Target::parse("10.1.2.3"), Ok(Target::Net(n)) if n.prefix_len() == 32));
        assert!(
            matches!(Target::parse("10.1.2.3/8"), Ok(Target::Net(n)) if n.to_string() == "10.0.0.0/8")
        );
        assert!(matches!(Target::parse("2001:db8::/32"), Ok(Target::Net(_))));
        assert!(Target::parse("10.1.2").is_err());
        assert!(Target::parse("10.0.0.0/40").is_err());
        assert!(Target::parse(" ").is_err());
    }

    #[test]
    fn matches_ips_names_and_expiry() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let bans = Bans::load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        bans.add(ban("192.0.2.0/24", None)).ok();
        bans.add(ban("Mallory", None)).ok();
        bans.add(ban("198.51.100.7", Some(1))).ok(); // long expired
        let ip = |s: &str| s.parse().unwrap_or(IpAddr::from([0; 4]));
        assert!(bans.find(ip("192.0.2.99"), None).is_some());
        assert!(bans.find(ip("::ffff:192.0.2.1"), None).is_some());
        assert!(bans.find(ip("198.51.100.7"), None).is_none());
        let mallory = names::lookup_key("MALLORY");
        assert!(bans.find(ip("203.0.113.1"), Some(&mallory)).is_some());
        assert!(bans.find(ip("203.0.113.1"), None).is_none());
        // Banned by name and by address: the address ban is reported, even when younger.
        bans.add(ban("eve", None)).ok();
        bans.add(ban("203.0.113.9", None)).ok();
        let both = bans.find(ip("203.0.113.9"), Some(&names::lookup_key("eve")));
        assert!(matches!(both.map(|b| b.target), Some(Target::Net(_))));
        assert_eq!(bans.active().len(), 4);
        assert_eq!(
            bans.remove(&Target::Name("mallory".into())).ok(),
            Some(true)
        );
        assert_eq!(
            bans.remove(&Target::Name("mallory".into())).ok(),
            Some(false)
        );
    }

    #[test]
    fn survives_reload_and_refuses_a_corrupt_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let bans = Bans::load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        bans.add(ban("eve", Some(now_secs() + 3600))).ok();
        drop(bans);
        let again = Bans::load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.active().len(), 1);
        assert!(!dir.path().join("bans.json.tmp").exists());
        std::fs::write(dir.path().join(BANS_FILE), b"{\"version\":1,\"bans\":[").ok();
        let err = Bans::load(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("not a valid ban list"), "{err}");
    }

    /// A crash between writing the temporary file and renaming it leaves a torn `.tmp` beside
    /// the intact old list: loading ignores it, and the next change replaces it.
    #[test]
    fn a_crash_mid_write_loses_nothing() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let bans = Bans::load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        bans.add(ban("eve", None)).ok();
        drop(bans);
        std::fs::write(dir.path().join("bans.json.tmp"), b"{\"version\":1,\"ba").ok();
        let bans = Bans::load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bans.active().len(), 1);
        bans.add(ban("mallory", None)).ok();
        drop(bans);
        let again = Bans::load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.active().len(), 2);
        assert!(!dir.path().join("bans.json.tmp").exists());
    }
}
