//! The admin socket: a Unix-domain socket `chatctl` talks to.
//!
//! Security comes in two layers: the socket file's mode and group let the kernel refuse
//! `connect()` to outsiders, and every accepted connection is then authorised by its peer
//! credentials (root, the daemon's own user, or a member of `admin.group`). Request lines are
//! capped at [`proto::MAX_FRAME`], each connection has an idle timeout, and at most
//! [`MAX_ADMIN_CONNECTIONS`] are served at once, so a stuck admin client cannot pin the daemon.
//! Unauthenticated bytes are never logged, only their size.

use chat_proto::admin as proto;

mod handlers;

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use nix::unistd::{Gid, Group, Uid};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixSocket, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::shared::Shared;
use chat_proto::codec::{Frame, LineDecoder};
use proto::{AdminError, ErrorCode, PROTOCOL_VERSION, RequestEnvelope, Response, ResponseEnvelope};

/// Admin connections served at once; more wait in the kernel's backlog.
pub const MAX_ADMIN_CONNECTIONS: usize = 16;
/// An admin connection that sends no complete request for this long is closed.
pub const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound admin socket; the socket file is removed when this is dropped.
#[derive(Debug)]
pub struct AdminListener {
    listener: UnixListener,
    path: PathBuf,
}

impl AdminListener {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminListener {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(path = %self.path.display(), error = %e, "cannot remove admin socket");
        }
    }
}

/// Errors setting up the admin socket, each naming the path and the step.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another daemon answers on the socket.
    #[error("{0}: another chatd is already running there (admin.socket)")]
    InUse(PathBuf),
    /// Something other than a socket sits at the path; we refuse to delete it.
    #[error("{0}: exists and is not a socket; refusing to replace it (admin.socket)")]
    NotASocket(PathBuf),
    /// An OS error during one step.
    #[error("{path}: {action}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> BindError + 'a {
    move |source| BindError::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

/// Creates the admin socket at `path` with `mode` and `group`.
///
/// Order matters: a stale socket from a crashed run is replaced only after checking that it is
/// a socket and that no daemon answers on it; the socket is `chmod`ed before `listen`, so it is
/// never reachable with looser permissions.
pub fn bind(path: &Path, mode: u32, group: &str) -> Result<AdminListener, BindError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(io_err(path, "removing stale socket"))?;
            info!(path = %path.display(), "replaced a stale admin socket");
        }
        Ok(_) => return Err(BindError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path, "inspecting socket path")(e)),
    }
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(io_err(path, "creating socket directory"))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    }
    let socket = UnixSocket::new_stream().map_err(io_err(path, "creating socket"))?;
    socket.bind(path).map_err(io_err(path, "binding"))?;
    apply_permissions(path, mode, group).inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })?;
    let listener = socket.listen(128).map_err(io_err(path, "listening"))?;
    Ok(AdminListener {
        listener,
        path: path.to_owned(),
    })
}

/// Sets the socket's mode and group (also on reload).
pub fn apply_permissions(path: &Path, mode: u32, group: &str) -> Result<(), BindError> {
    if let Some(gid) = resolve_group(group) {
        nix::unistd::chown(path, None, Some(gid))
            .map_err(|e| io_err(path, "setting socket group (admin.group)")(e.into()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(path, "setting socket mode (admin.mode)"))
}

/// The gid of `group`, or `None` when it is empty or does not exist (logged).
pub fn resolve_group(group: &str) -> Option<Gid> {
    if group.is_empty() {
        return None;
    }
    match Group::from_name(group) {
        Ok(Some(g)) => Some(g.gid),
        Ok(None) => {
            debug!(
                group,
                "admin group does not exist; group access disabled (admin.group)"
            );
            None
        }
        Err(e) => {
            warn!(group, error = %e, "cannot look up admin group (admin.group)");
            None
        }
    }
}

/// Serves admin connections until `shutdown`.
pub async fn serve(
    admin: &AdminListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let limit = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = admin.listener.accept() => r,
        };
        match accepted {
            Ok((stream, _)) => {
                let shared = shared.clone();
                let shutdown = shutdown.clone();
                tracker.spawn(async move {
                    handle_connection(stream, shared, shutdown).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Who is on the other end of an admin connection.
#[derive(Debug, Clone)]
struct Peer {
    uid: u32,
    gid: u32,
    pid: Option<i32>,
    /// Supplementary groups from the socket itself (`SO_PEERGROUPS`), when the kernel has it.
    groups: Option<Vec<u32>>,
}

/// Root and the daemon's own user may always administer; others must be in `admin.group`,
/// as their primary group or one of their supplementary groups.
fn authorised(peer: &Peer, group: &str) -> bool {
    if peer.uid == 0 || Uid::from_raw(peer.uid) == Uid::effective() {
        return true;
    }
    let Some(gid) = resolve_group(group) else {
        return false;
    };
    let gid = gid.as_raw();
    if peer.gid == gid {
        return true;
    }
    if let Some(groups) = &peer.groups {
        return groups.contains(&gid);
    }
    // Kernels before 4.13: the process's groups as /proc shows them now.
    peer.pid
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|g| {
                    g.split_whitespace()
                        .any(|x| x.parse::<u32>().ok() == Some(gid))
                })
        })
        .unwrap_or(false)
}

/// The peer's supplementary groups as the kernel recorded them when it connected
/// (`SO_PEERGROUPS`, Linux 4.13+). Unlike `/proc/PID/status` this cannot race with the peer
/// exiting and its PID being reused, and it still works when systemd's `ProtectProc=invisible`
/// hides other users' processes from chatd.
///
/// One of the crate's few `unsafe` calls (the others: socket adoption in `systemd.rs`, the
/// allocator calls in `memory.rs`): std, nix and socket2 have no wrapper for this option.
fn peer_groups(stream: &UnixStream) -> io::Result<Vec<u32>> {
    use nix::libc;
    use std::os::fd::AsRawFd;
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * GID)
            .map_err(|_| io::Error::other("too many groups"))?;
        // SAFETY: `groups` owns `len` bytes of writable, suitably aligned gid_t storage; the
        // kernel writes at most `len` bytes there and stores the length it wrote (or, with
        // ERANGE, the length it needs) in `len`. The fd is borrowed from a live stream.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = usize::try_from(len).unwrap_or(0) / GID;
        if r == 0 {
            groups.truncate(needed.min(groups.len()));
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= 65_536 {
            groups.resize(needed, 0);
            continue;
        }
        return Err(err);
    }
}

async fn handle_connection(
    mut stream: UnixStream,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
            groups: peer_groups(&stream).ok(),
        },
        Err(e) => {
            warn!(error = %e, "cannot read admin peer credentials; closing");
            return;
        }
    };
    let group = shared.live.load().config.admin.group.clone();
    if !authorised(&peer, &group) {
        warn!(uid = peer.uid, gid = peer.gid, pid = ?peer.pid, "refused admin connection: not authorised");
        let err = AdminError::new(
            ErrorCode::PermissionDenied,
            format!(
                "permission denied: uid {} is not root, the daemon's user, or in group {group:?} (admin.group)",
                peer.uid
            ),
        );
        let _ = write_response(&mut stream, Response::Error(err)).await;
        return;
    }
    debug!(uid = peer.uid, pid = ?peer.pid, "admin connection");
    let mut decoder = LineDecoder::new(proto::MAX_FRAME);
    loop {
        let frame = match next_frame(&mut stream, &mut decoder, &shutdown).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => {
                debug!(error = %e, "admin connection ended");
                return;
            }
        };
        let response = match frame {
            Frame::TooLong => {
                warn!(
                    uid = peer.uid,
                    max = proto::MAX_FRAME,
                    "admin request too large"
                );
                Response::Error(AdminError::new(
                    ErrorCode::BadRequest,
                    format!("request larger than {} bytes", proto::MAX_FRAME),
                ))
            }
            Frame::Line(line) => decode(&line).map_or_else(Response::Error, |req| {
                handlers::handle(&shared, peer.uid, req)
            }),
        };
        if write_response(&mut stream, response).await.is_err() {
            return;
        }
    }
}

/// Parses a request line; bad JSON, unknown commands and version mismatches become errors.
pub fn decode(line: &[u8]) -> Result<proto::Request, AdminError> {
    let env: RequestEnvelope = serde_json::from_slice(line).map_err(|e| {
        // Check the version first when the envelope parses that far, so an old or new chatctl
        // gets "unsupported version" rather than a confusing field error.
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line)
            && let Some(version) = v.get("version").and_then(serde_json::Value::as_u64)
            && version != u64::from(PROTOCOL_VERSION)
        {
            return version_error(version);
        }
        AdminError::new(ErrorCode::BadRequest, format!("malformed request: {e}"))
    })?;
    if env.version != PROTOCOL_VERSION {
        return Err(version_error(u64::from(env.version)));
    }
    Ok(env.request)
}

fn version_error(got: u64) -> AdminError {
    AdminError::new(
        ErrorCode::UnsupportedVersion,
        format!(
            "admin protocol version {got} is not supported; this chatd speaks version {PROTOCOL_VERSION}"
        ),
    )
}

async fn next_frame(
    stream: &mut UnixStream,
    decoder: &mut LineDecoder,
    shutdown: &CancellationToken,
) -> io::Result<Option<Frame>> {
    loop {
        if let Some(frame) = decoder.next_frame() {
            return Ok(Some(frame));
        }
        let buf = decoder.buffer_mut();
        buf.reserve(4096);
        let read = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            r = tokio::time::timeout(ADMIN_IDLE_TIMEOUT, tokio::io::AsyncReadExt::read_buf(stream, buf)) => r,
        };
        match read {
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "admin client idle")),
            Ok(Ok(0)) => return Ok(None),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

async fn write_response(stream: &mut UnixStream, response: Response) -> io::Result<()> {
    let env = ResponseEnvelope {
        version: PROTOCOL_VERSION,
        response,
    };
    let mut json = serde_json::to_vec(&env).map_err(io::Error::other)?;
    json.push(b'\n');
    tokio::time::timeout(ADMIN_IDLE_TIMEOUT, stream.write_all(&Bytes::from(json)))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "admin client not reading"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// JSON-shaped noise: fragments of real requests glued together, so the decoder gets deep
    /// into serde's paths instead of failing at the first byte.
    fn jsonish() -> impl Strategy<Value = Vec<u8>> {
        let parts = prop_oneof![
            Just("{".to_owned()),
            Just("}".to_owned()),
            Just("\"version\":".to_owned()),
            Just("\"request\":".to_owned()),
            Just("\"cmd\":".to_owned()),
            Just("\"kick\"".to_owned()),
            Just("\"ban\"".to_owned()),
            Just("\"list\"".to_owned()),
            Just("\"name\":".to_owned()),
            Just(",".to_owned()),
            Just("1".to_owned()),
            Just("null".to_owned()),
            Just("[".to_owned()),
            Just("]".to_owned()),
            "[a-z\\\\\"0-9 ]{0,8}",
            any::<u32>().prop_map(|n| n.to_string()),
        ];
        proptest::collection::vec(parts, 0..24).prop_map(|v| v.concat().into_bytes())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        /// Arbitrary bytes never panic the request decoder; every failure is a typed error.
        #[test]
        fn decode_never_panics_on_bytes(line in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Err(e) = decode(&line) {
                prop_assert!(matches!(e.code, ErrorCode::BadRequest | ErrorCode::UnsupportedVersion));
            }
        }

        /// Nor on near-miss JSON.
        #[test]
        fn decode_never_panics_on_jsonish(line in jsonish()) {
            if let Err(e) = decode(&line) {
                prop_assert!(!e.message.is_empty());
            }
        }
    }

    #[test]
    fn decode_reports_version_before_shape() {
        let e = decode(br#"{"version":9,"request":{"cmd":"frobnicate"}}"#).err();
        assert_eq!(e.map(|e| e.code), Some(ErrorCode::UnsupportedVersion));
        let e = decode(br#"{"version":1,"request":{"cmd":"frobnicate"}}"#).err();
        assert_eq!(e.map(|e| e.code), Some(ErrorCode::BadRequest));
        assert!(decode(br#"{"version":1,"request":{"cmd":"list"}}"#).is_ok());
    }
}
