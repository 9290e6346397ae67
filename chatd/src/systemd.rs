//! The daemon's side of the systemd contract, written against the documented wire protocols
//! (sd_notify(3), sd_listen_fds(3)) with std sockets only, so there is no C library to link and
//! every call is a no-op when the process was not started by systemd.
//!
//! - [`Notifier`] sends `READY=1`, `RELOADING=1` + `MONOTONIC_USEC=`, `STOPPING=1`, `STATUS=`
//!   and `WATCHDOG=1` datagrams to `$NOTIFY_SOCKET` (a path, or an abstract `@name`).
//! - [`take_listeners`] adopts the listening sockets systemd passed (`$LISTEN_FDS`,
//!   `$LISTEN_FDNAMES`, checked against `$LISTEN_PID`) instead of binding them.
//! - [`watchdog_interval`] reads `$WATCHDOG_USEC` so a task can ping at half the deadline.
//!
//! The environment is never modified: `NOTIFY_SOCKET` must stay set for later notifications,
//! and removing variables is `unsafe` in edition 2024. Adoption is guarded by a process-wide
//! flag instead, so the passed descriptors are taken at most once.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socket2::{Domain, SockRef, Type};
use tracing::{debug, warn};

use crate::config::{ConfigDiff, ConfigError};
use crate::shared::Shared;

/// How often the `STATUS=` line is refreshed when the user count changed.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(2);

/// The `FileDescriptorName=` of a passed socket that serves TLS (`[tls]`); every other name
/// serves plain chat.
pub const TLS_SOCKET_NAME: &str = "tls";
/// The name (`FileDescriptorName=`) of a passed socket that serves the web client (`[web]`).
pub const WEB_SOCKET_NAME: &str = "web";

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// A connection to the service manager's notification socket; does nothing when there is none.
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: UnixAddr,
}

impl Notifier {
    /// A notifier that sends nothing (not running under systemd).
    pub fn disabled() -> Notifier {
        Notifier { target: None }
    }

    /// A notifier for `$NOTIFY_SOCKET`; disabled when it is unset or empty.
    pub fn from_env() -> io::Result<Notifier> {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(v) if !v.is_empty() => Notifier::new(&v),
            _ => Ok(Notifier::disabled()),
        }
    }

    /// A notifier for the socket named `value`: an absolute path, or `@name` for the abstract
    /// namespace (as systemd and `systemd-notify` write it).
    pub fn new(value: &OsStr) -> io::Result<Notifier> {
        let bytes = value.as_bytes();
        let addr = match bytes.first() {
            Some(b'@') => UnixAddr::from_abstract_name(&bytes[1..])?,
            Some(b'/') => UnixAddr::from_pathname(value)?,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "NOTIFY_SOCKET={}: only absolute paths and @abstract names are supported",
                        value.to_string_lossy()
                    ),
                ));
            }
        };
        // Non-blocking: a service manager that stops reading (or a full socket buffer) must
        // cost a notification, never a runtime worker; these are sent from async tasks.
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Notifier {
            target: Some(Target { socket, addr }),
        })
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one datagram of `KEY=value` lines as it is. Ok and nothing sent when disabled.
    pub fn send(&self, message: &str) -> io::Result<()> {
        let Some(t) = &self.target else {
            return Ok(());
        };
        let sent = t.socket.send_to_addr(message.as_bytes(), &t.addr)?;
        if sent != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "notification datagram truncated",
            ));
        }
        Ok(())
    }

    /// Start-up (or a reload) is complete; `status` becomes the unit's status text.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// A reload begins. `RELOADING=1` and `MONOTONIC_USEC=` must share one datagram: with
    /// `Type=notify-reload` systemd matches the timestamp against the time it sent SIGHUP,
    /// and `systemctl reload` hangs without it.
    pub fn reloading(&self) -> io::Result<()> {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=Reloading configuration",
            monotonic_usec()?
        ))
    }

    /// Shutdown begins; `status` says what is happening.
    pub fn stopping(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)))
    }

    /// Updates the unit's status text (`systemctl status` shows it).
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.send(&format!("STATUS={}", one_line(status)))
    }

    /// Tells the watchdog the daemon is alive.
    pub fn watchdog(&self) -> io::Result<()> {
        self.send("WATCHDOG=1")
    }
}

/// A status text may not contain a newline: it would start a new `KEY=` line.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares `MONOTONIC_USEC` against.
/// (`std::time::Instant` uses the same clock but does not expose its value.)
pub fn monotonic_usec() -> io::Result<u64> {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    let secs = u64::try_from(ts.tv_sec()).map_err(io::Error::other)?;
    let nanos = u64::try_from(ts.tv_nsec()).map_err(io::Error::other)?;
    Ok(secs * 1_000_000 + nanos / 1_000)
}

/// The process-wide notifier for `$NOTIFY_SOCKET`, created on first use. A bad value is
/// logged once and turns notifications off.
pub fn notifier() -> &'static Notifier {
    static NOTIFIER: OnceLock<Notifier> = OnceLock::new();
    NOTIFIER.get_or_init(|| {
        Notifier::from_env().unwrap_or_else(|e| {
            warn!(error = %e, "cannot use NOTIFY_SOCKET; systemd will not hear from chatd");
            Notifier::disabled()
        })
    })
}

/// Logs a failed notification; the daemon keeps serving either way.
fn logged(what: &str, r: io::Result<()>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    // A manager that stopped reading fails every watchdog ping: say so once until one gets
    // through again, not twice a second.
    static FULL: AtomicBool = AtomicBool::new(false);
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            if !FULL.swap(true, Ordering::Relaxed) {
                warn!(
                    notification = what,
                    "cannot notify systemd: its socket is full; dropping notifications until it reads again"
                );
            }
        }
        Err(e) => warn!(error = %e, notification = what, "cannot notify systemd"),
        Ok(()) => FULL.store(false, Ordering::Relaxed),
    }
}

/// The status text for a daemon serving `shared`: users with a name, and open connections; or,
/// for a cluster node not yet following its room, what it is waiting for.
pub fn status_line(shared: &Shared) -> String {
    if let Some(c) = shared.cluster.as_ref().filter(|c| !c.is_ready()) {
        return format!(
            "waiting for the cluster: {}",
            c.link().waiting.unwrap_or_default()
        );
    }
    let users = shared.room.len();
    let connections = shared.connections.load(Ordering::Relaxed);
    format!(
        "{users} user{} online, {connections} connection{}",
        if users == 1 { "" } else { "s" },
        if connections == 1 { "" } else { "s" }
    )
}

/// Tells systemd that start-up is complete (`READY=1` with the status line).
pub fn notify_ready(shared: &Shared) {
    logged("READY", notifier().ready(&status_line(shared)));
}

/// Sets systemd's status line (`STATUS=`), e.g. what start-up is waiting for.
pub fn notify_status(status: &str) {
    logged("STATUS", notifier().status(status));
}

/// Tells systemd that shutdown has begun (`STOPPING=1`).
pub fn notify_stopping(users: usize) {
    logged(
        "STOPPING",
        notifier().stopping(&format!(
            "Shutting down, telling {users} {}",
            if users == 1 { "user" } else { "users" }
        )),
    );
}

/// Reloads the config with systemd told around it: `RELOADING=1` + `MONOTONIC_USEC=` before,
/// `READY=1` after, whether the reload succeeded or not (a rejected config leaves the daemon
/// running on the old one, so it is ready again either way). Both SIGHUP and `chatctl reload`
/// go through here, so `systemctl status` shows every reload.
pub fn reload(shared: &Shared) -> Result<ConfigDiff, ConfigError> {
    logged("RELOADING", notifier().reloading());
    let result = shared.reload();
    logged("READY", notifier().ready(&status_line(shared)));
    result
}

/// Keeps the `STATUS=` line current: every [`STATUS_INTERVAL`], sends it if it changed.
/// Returns at once when not under systemd.
pub async fn status_task(shared: std::sync::Arc<Shared>) {
    let n = notifier();
    if !n.is_enabled() {
        return;
    }
    let mut last = status_line(&shared);
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = status_line(&shared);
        if now != last {
            logged("STATUS", n.status(&now));
            last = now;
        }
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when the watchdog is on and meant
/// for this process (`$WATCHDOG_PID`, if set, is our pid).
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_interval`] on explicit values, for tests.
pub fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

/// Pings the watchdog at half its deadline for as long as the runtime is alive; returns at once
/// when there is no watchdog. A frozen or wedged process stops pinging and systemd kills it.
pub async fn watchdog_task() {
    let Some(every) = watchdog_interval() else {
        return;
    };
    let n = notifier();
    debug!(interval = ?every, "systemd watchdog enabled");
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        logged("WATCHDOG", n.watchdog());
    }
}

/// Why the sockets systemd passed could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `$LISTEN_FDS` is not a number.
    #[error("socket activation: LISTEN_FDS={0:?} is not a number")]
    BadCount(String),
    /// The descriptors were already adopted once in this process.
    #[error("socket activation: the passed sockets were already taken")]
    AlreadyTaken,
    /// A passed descriptor is not usable as a chat listener.
    #[error("socket activation: fd {fd} ({name}): {reason}")]
    Unusable {
        /// The descriptor number.
        fd: i32,
        /// Its name from `$LISTEN_FDNAMES` (`FileDescriptorName=`).
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The passed sockets named in `$LISTEN_FDNAMES`, when systemd started this process with some:
/// `Ok(None)` means "no socket activation, bind as configured".
///
/// Every passed socket must be a listening TCP socket (IPv4 or IPv6), whatever its name:
/// `chatd.socket` names them `chat`, the optional TLS port `tls` ([`TLS_SOCKET_NAME`]) and the
/// optional web port `web` ([`WEB_SOCKET_NAME`]), which the caller routes to the TLS and web
/// listeners. The admin socket is not socket-activated because it lives in `RuntimeDirectory=`,
/// which systemd removes whenever the service stops.
pub fn take_listeners() -> Result<Option<Vec<(String, std::net::TcpListener)>>, ActivationError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    let Some(count) = passed_count(pid.as_deref(), fds.as_deref(), std::process::id())? else {
        return Ok(None);
    };
    static TAKEN: AtomicBool = AtomicBool::new(false);
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(ActivationError::AlreadyTaken);
    }
    let names: Vec<&str> = names
        .as_deref()
        .map_or(Vec::new(), |n| n.split(':').collect());
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        // `count` comes from a parsed i32, so this cannot overflow.
        let fd = LISTEN_FDS_START + i as i32;
        let name = names.get(i).copied().unwrap_or("unknown").to_owned();
        let unusable = |reason: String| ActivationError::Unusable {
            fd,
            name: name.clone(),
            reason,
        };
        // Check through /proc (safe, no ownership taken) that the descriptor is open and a
        // socket before claiming it: an OwnedFd must never wrap a closed or foreign fd.
        match std::fs::metadata(format!("/proc/self/fd/{fd}")) {
            Ok(m) if m.file_type().is_socket() => {}
            Ok(_) => return Err(unusable("not a socket".into())),
            Err(e) => return Err(unusable(format!("not open: {e}"))),
        }
        let owned = adopt_passed_fd(fd);
        out.push((name.clone(), into_tcp_listener(owned).map_err(unusable)?));
    }
    Ok(Some(out))
}

/// How many descriptors were passed to process `me`, from `$LISTEN_PID` and `$LISTEN_FDS`.
/// `None` when there are none or they are meant for another process (a parent that did not
/// clear its environment before starting us).
pub fn passed_count(
    pid: Option<&str>,
    fds: Option<&str>,
    me: u32,
) -> Result<Option<usize>, ActivationError> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(me) {
        return Ok(None);
    }
    let n: i32 = fds
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadCount(fds.to_owned()))?;
    match usize::try_from(n) {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        Err(_) => Err(ActivationError::BadCount(fds.to_owned())),
    }
}

/// Takes ownership of descriptor `fd`, which systemd passed to this process.
///
/// This is one of the crate's few `unsafe` blocks (the others read `SO_PEERGROUPS` in `admin`
/// and call the allocator in `memory`), and the reason the workspace lint is `deny` rather than `forbid`: neither std,
/// nix nor socket2 offers a safe way to turn a descriptor number
/// inherited across exec into an `OwnedFd` (reopening `/proc/self/fd/N` does not work for
/// sockets). It is sound because the caller has checked that `fd` is an open socket, `fd` lies
/// in the range `$LISTEN_PID`/`$LISTEN_FDS` hand to this very process, nothing else in chatd
/// uses descriptor numbers it did not open itself, and the `TAKEN` flag in [`take_listeners`]
/// ensures each passed descriptor is wrapped at most once, so it is owned exactly once.
#[allow(unsafe_code)]
fn adopt_passed_fd(fd: i32) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: see the function's documentation: `fd` is open, passed to us, and not owned
    // by anything else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Checks that `fd` is a listening TCP socket and prepares it for tokio.
fn into_tcp_listener(fd: OwnedFd) -> Result<std::net::TcpListener, String> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let sock = SockRef::from(&fd);
    let domain = sock.domain().map_err(|e| format!("SO_DOMAIN: {e}"))?;
    if domain != Domain::IPV4 && domain != Domain::IPV6 {
        return Err(format!(
            "not a TCP socket ({domain:?}); only chat listeners can be socket-activated"
        ));
    }
    if sock.r#type().map_err(|e| format!("SO_TYPE: {e}"))? != Type::STREAM {
        return Err("not a stream socket (use ListenStream=)".into());
    }
    if !sock
        .is_listener()
        .map_err(|e| format!("SO_ACCEPTCONN: {e}"))?
    {
        return Err("not listening (Accept=yes is not supported)".into());
    }
    // systemd passes descriptors without close-on-exec; chatd execs nothing, but a descriptor
    // that is ours should not leak into any child.
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| format!("FD_CLOEXEC: {e}"))?;
    let listener = std::net::TcpListener::from(fd);
    // systemd passes blocking sockets; tokio requires non-blocking ones.
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("O_NONBLOCK: {e}"))?;
    debug!(fd = listener.as_raw_fd(), "adopted a socket from systemd");
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    /// A fake service manager: a datagram socket the notifier sends to.
    struct FakeManager {
        socket: UnixDatagram,
        _dir: Option<tempfile::TempDir>,
    }

    impl FakeManager {
        fn abstract_name() -> (FakeManager, String) {
            let name = format!(
                "chatd-test-{}-{}",
                std::process::id(),
                monotonic_usec().expect("clock")
            );
            let addr = UnixAddr::from_abstract_name(name.as_bytes()).expect("addr");
            let socket = UnixDatagram::bind_addr(&addr).expect("bind abstract");
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            (FakeManager { socket, _dir: None }, format!("@{name}"))
        }

        fn path() -> (FakeManager, String) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("notify");
            let socket = UnixDatagram::bind(&path).expect("bind path");
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let value = path.to_str().expect("utf-8 temp path").to_owned();
            (
                FakeManager {
                    socket,
                    _dir: Some(dir),
                },
                value,
            )
        }

        fn recv(&self) -> String {
            let mut buf = [0u8; 4096];
            let n = self.socket.recv(&mut buf).expect("datagram");
            String::from_utf8(buf[..n].to_vec()).expect("utf-8")
        }
    }

    fn check_all_datagrams(manager: &FakeManager, value: &str) {
        let n = Notifier::new(OsStr::new(value)).expect("notifier");
        assert!(n.is_enabled());

        n.ready("0 users online, 0 connections").expect("ready");
        assert_eq!(
            manager.recv(),
            "READY=1\nSTATUS=0 users online, 0 connections"
        );

        let before = monotonic_usec().expect("clock");
        n.reloading().expect("reloading");
        let after = monotonic_usec().expect("clock");
        let got = manager.recv();
        let lines: Vec<&str> = got.split('\n').collect();
        assert_eq!(lines.len(), 3, "{got:?}");
        assert_eq!(lines[0], "RELOADING=1");
        let usec: u64 = lines[1]
            .strip_prefix("MONOTONIC_USEC=")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {got:?}"));
        assert!(
            before <= usec && usec <= after,
            "{before} <= {usec} <= {after}"
        );
        assert_eq!(lines[2], "STATUS=Reloading configuration");

        n.ready("2 users online, 3 connections").expect("ready");
        assert_eq!(
            manager.recv(),
            "READY=1\nSTATUS=2 users online, 3 connections"
        );

        n.status("1 user online,\n1 connection").expect("status");
        assert_eq!(manager.recv(), "STATUS=1 user online, 1 connection");

        n.watchdog().expect("watchdog");
        assert_eq!(manager.recv(), "WATCHDOG=1");

        n.stopping("Shutting down, telling 2 users")
            .expect("stopping");
        assert_eq!(
            manager.recv(),
            "STOPPING=1\nSTATUS=Shutting down, telling 2 users"
        );
    }

    #[test]
    fn datagrams_to_an_abstract_socket() {
        let (manager, value) = FakeManager::abstract_name();
        assert!(value.starts_with('@'));
        check_all_datagrams(&manager, &value);
    }

    #[test]
    fn datagrams_to_a_path_socket() {
        let (manager, value) = FakeManager::path();
        check_all_datagrams(&manager, &value);
    }

    #[test]
    fn disabled_notifier_sends_nothing_and_succeeds() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.ready("x").expect("no-op");
        n.reloading().expect("no-op");
        n.watchdog().expect("no-op");
    }

    #[test]
    fn relative_or_unsupported_addresses_are_refused() {
        assert!(Notifier::new(OsStr::new("relative/path")).is_err());
        assert!(Notifier::new(OsStr::new("vsock:2:1234")).is_err());
    }

    #[test]
    fn missing_manager_socket_is_an_error_not_a_panic() {
        let n = Notifier::new(OsStr::new("/nonexistent/chatd-notify")).expect("notifier");
        assert!(n.ready("x").is_err());
    }

    #[test]
    fn watchdog_interval_is_half_and_only_for_this_pid() {
        assert_eq!(
            watchdog_interval_from(Some("10000000"), None, 42),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            watchdog_interval_from(Some("10000000"), Some("42"), 42),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            watchdog_interval_from(Some("10000000"), Some("41"), 42),
            None
        );
        assert_eq!(watchdog_interval_from(Some("0"), None, 42), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 42), None);
        assert_eq!(watchdog_interval_from(None, None, 42), None);
    }

    #[test]
    fn passed_count_checks_pid_and_number() {
        assert_eq!(passed_count(None, None, 7).expect("ok"), None);
        assert_eq!(passed_count(Some("7"), None, 7).expect("ok"), None);
        assert_eq!(passed_count(Some("8"), Some("2"), 7).expect("ok"), None);
        assert_eq!(passed_count(Some("7"), Some("0"), 7).expect("ok"), None);
        assert_eq!(passed_count(Some("7"), Some("2"), 7).expect("ok"), Some(2));
        assert!(passed_count(Some("7"), Some("two"), 7).is_err());
        assert!(passed_count(Some("7"), Some("-1"), 7).is_err());
    }

    #[test]
    fn a_tcp_listener_is_accepted_and_made_nonblocking() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(false)
            .expect("blocking, as systemd passes it");
        let addr = l.local_addr().expect("addr");
        let l = into_tcp_listener(OwnedFd::from(l)).expect("usable");
        assert_eq!(l.local_addr().expect("addr"), addr);
        // Non-blocking: accept with nobody connecting returns WouldBlock instead of hanging.
        let e = l.accept().expect_err("nobody connected");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn non_listening_or_non_tcp_sockets_are_refused() {
        let dgram = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        assert!(into_tcp_listener(OwnedFd::from(dgram)).is_err());
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert!(into_tcp_listener(OwnedFd::from(a)).is_err());
        let s = socket2::Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        assert!(into_tcp_listener(OwnedFd::from(s)).is_err());
    }
}
