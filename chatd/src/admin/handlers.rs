//! One function per admin command. Each does its unit of work against the shared state and
//! returns a [`Response`] or a [`CommandError`]; only the dispatcher in `admin/mod.rs` touches
//! the socket.
//! To add a command: a `Request` variant in `chat_proto::admin`, a function here, a line in
//! `handle`.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use tracing::{info, warn};

use crate::bans::{self, Ban, BanError, Target, TargetError};
use crate::config::ConfigError;
use crate::room::RoomError;
use crate::shared::Shared;
use chat_proto::admin::{
    AdminError, BanInfo, ClusterStatus, ErrorCode, MemoryStats, Request, Response, StatusInfo,
    UserInfo,
};
use chat_proto::protocol;

/// Longest kick reason or announcement, in bytes.
const MAX_TEXT: usize = 1024;

/// Why an admin command failed. Each kind has one stable protocol code ([`CommandError::code`]);
/// the message is the `Display` text.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A reason or announcement with nothing in it.
    #[error("{0} must not be empty")]
    EmptyText(&'static str),
    /// A reason or announcement over [`MAX_TEXT`] bytes.
    #[error("{0} is longer than {MAX_TEXT} bytes")]
    TextTooLong(&'static str),
    /// A reason or announcement with a line break in it.
    #[error("{0} must be a single line")]
    MultiLineText(&'static str),
    /// A ban target that is neither a name, an address nor a block.
    #[error(transparent)]
    BadTarget(#[from] TargetError),
    /// `duration_secs: 0`.
    #[error("a ban's duration must be more than zero")]
    ZeroDuration,
    /// The room refused (no such user online).
    #[error(transparent)]
    Room(#[from] RoomError),
    /// `unban` of a target that is not banned.
    #[error("no ban on {0:?}")]
    NoSuchBan(String),
    /// The ban list could not be written; the list in force is unchanged.
    #[error("{what} not saved: {source}")]
    StateWrite {
        /// What was not saved.
        what: &'static str,
        /// The file and the OS error.
        source: BanError,
    },
    /// The new config was rejected; the old one stays.
    #[error(transparent)]
    Reload(#[from] ConfigError),
    /// The cluster's ban list could not be written; this node's list has the change, the
    /// other nodes do not.
    #[error("ban list not shared with the cluster: {0}")]
    ClusterWrite(String),
}

impl CommandError {
    /// The protocol code chatctl (and scripts) tell this failure by.
    pub fn code(&self) -> ErrorCode {
        match self {
            CommandError::EmptyText(_)
            | CommandError::TextTooLong(_)
            | CommandError::MultiLineText(_)
            | CommandError::BadTarget(_)
            | CommandError::ZeroDuration
            | CommandError::Room(RoomError::Name(_)) => ErrorCode::InvalidArgument,
            CommandError::Room(RoomError::NoSuchUser(_)) => ErrorCode::NoSuchUser,
            CommandError::NoSuchBan(_) => ErrorCode::NoSuchBan,
            CommandError::StateWrite { .. } | CommandError::ClusterWrite(_) => {
                ErrorCode::StateWriteFailed
            }
            CommandError::Reload(_) => ErrorCode::ReloadFailed,
        }
    }
}

impl From<CommandError> for AdminError {
    fn from(e: CommandError) -> Self {
        AdminError::new(e.code(), e.to_string())
    }
}

/// Carries out one authorised request from the admin user `uid`.
pub fn handle(shared: &Shared, uid: u32, request: Request) -> Response {
    let outcome = match request {
        Request::List {} => Ok(list(shared)),
        Request::Kick { name, reason } => kick(shared, uid, &name, reason.as_deref()),
        Request::Announce { text } => announce(shared, uid, &text),
        Request::Status {} => Ok(status(shared)),
        Request::Reload {} => reload(shared, uid),
        Request::Ban {
            target,
            duration_secs,
            reason,
        } => ban(shared, uid, &target, duration_secs, reason.as_deref()),
        Request::Unban { target } => unban(shared, uid, &target),
        Request::Bans {} => Ok(Response::BanList {
            bans: shared.bans.active().iter().map(ban_info).collect(),
        }),
    };
    outcome.unwrap_or_else(|e| Response::Error(e.into()))
}

/// Text an admin wants users to see: one line, not empty, not huge, terminal-safe.
fn user_text<'a>(what: &'static str, text: &'a str) -> Result<Cow<'a, str>, CommandError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(CommandError::EmptyText(what));
    }
    if text.len() > MAX_TEXT {
        return Err(CommandError::TextTooLong(what));
    }
    if text.contains(['\n', '\r']) {
        return Err(CommandError::MultiLineText(what));
    }
    Ok(protocol::sanitize(text))
}

/// The admin's reason checked as [`user_text`], or `default` when none was given.
fn reason_or<'a>(
    reason: Option<&'a str>,
    default: &'static str,
) -> Result<Cow<'a, str>, CommandError> {
    reason.map_or(Ok(Cow::Borrowed(default)), |r| user_text("reason", r))
}

fn list(shared: &Shared) -> Response {
    let users = shared
        .room
        .members()
        .into_iter()
        .map(|m| UserInfo {
            name: m.name,
            addr: m.addr.to_string(),
            connected_since: m
                .joined_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            idle_secs: m.idle.as_secs(),
            node: m
                .node
                .or_else(|| shared.cluster.as_ref().map(|c| c.node().to_owned())),
            transport: m.transport.map(|t| t.as_str().to_owned()),
        })
        .collect();
    Response::Users { users }
}

fn kick(
    shared: &Shared,
    uid: u32,
    name: &str,
    reason: Option<&str>,
) -> Result<Response, CommandError> {
    let reason = reason_or(reason, "kicked by an administrator")?;
    let (name, addr) = shared.room.kick(name, &reason)?;
    info!(user = %name, peer = %addr, reason = %reason, admin_uid = uid, "user kicked");
    Ok(Response::Kicked {
        name,
        addr: addr.to_string(),
    })
}

fn announce(shared: &Shared, uid: u32, text: &str) -> Result<Response, CommandError> {
    let text = user_text("announcement", text)?;
    let recipients = shared.room.announce(&text);
    info!(text = %text, recipients, admin_uid = uid, "announcement sent");
    Ok(Response::Announced { recipients })
}

fn status(shared: &Shared) -> Response {
    let c = &shared.room.counters;
    let l = &shared.limits;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    Response::Status(Box::new(StatusInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_secs: shared.started.elapsed().as_secs(),
        users: shared.room.len(),
        connections: shared.connections.load(Ordering::Relaxed),
        messages: c.messages.load(Ordering::Relaxed),
        deliveries: c.deliveries.load(Ordering::Relaxed),
        kicks: c.kicks.load(Ordering::Relaxed),
        // Kept at the top level as well as in `limits` for version-1 clients that read them
        // there (fields are never removed within a version).
        slow_disconnects: load(&l.slow_disconnects),
        refused_full: load(&l.refused_full),
        reloads: shared.reloads.load(Ordering::Relaxed),
        limits: l.snapshot(),
        memory: MemoryStats {
            rss_bytes: crate::memory::rss_bytes().unwrap_or(0),
            heap_free_bytes: crate::memory::heap_free().map_or(0, |b| b as u64),
            trims: load(&shared.trims.trims),
            trimmed_bytes: load(&shared.trims.trimmed_bytes),
        },
        activity: crate::metrics::activity(shared),
        config_path: shared.config_path().map(|p| p.display().to_string()),
        listen: shared.listen.iter().map(ToString::to_string).collect(),
        tls_listen: shared.tls_listen.iter().map(ToString::to_string).collect(),
        web_listen: shared.web_listen.iter().map(ToString::to_string).collect(),
        admin_socket: shared.admin_socket.display().to_string(),
        cluster: shared.cluster.as_ref().map(|c| {
            let link = c.link();
            ClusterStatus {
                node: c.node().to_owned(),
                connected: link.connected,
                ready: c.is_ready(),
                server: link.server,
                waiting: link.waiting,
                position: c.position(),
                live_nodes: link.live_nodes,
            }
        }),
    }))
}

/// `chatctl reload`: the same reload as SIGHUP, systemd told around it.
fn reload(shared: &Shared, uid: u32) -> Result<Response, CommandError> {
    match crate::systemd::reload(shared) {
        Ok(diff) => {
            info!(admin_uid = uid, %diff, "config reloaded");
            Ok(Response::Reloaded {
                applied: diff.applied,
                needs_restart: diff.needs_restart,
            })
        }
        Err(e) => {
            warn!(admin_uid = uid, error = %e, "config reload failed (chatctl reload), keeping the running config: {e}");
            Err(e.into())
        }
    }
}

fn ban_info(b: &Ban) -> BanInfo {
    BanInfo {
        kind: match b.target {
            Target::Name(_) => "name",
            Target::Net(_) => "net",
        }
        .to_owned(),
        target: b.target.to_text(),
        reason: b.reason.clone(),
        created: b.created,
        expires: b.expires,
    }
}

fn ban(
    shared: &Shared,
    uid: u32,
    target: &str,
    duration_secs: Option<u64>,
    reason: Option<&str>,
) -> Result<Response, CommandError> {
    let target = Target::parse(target)?;
    if duration_secs == Some(0) {
        return Err(CommandError::ZeroDuration);
    }
    let reason = reason_or(reason, "banned by an administrator")?.into_owned();
    let now = bans::now_secs();
    let ban = Ban {
        target,
        reason,
        created: now,
        expires: duration_secs.map(|d| now.saturating_add(d)),
    };
    shared.bans.add(ban.clone()).map_err(|source| {
        warn!(error = %source, "cannot save ban list");
        CommandError::StateWrite {
            what: "ban",
            source,
        }
    })?;
    if let Some(cluster) = &shared.cluster {
        cluster
            .share_ban(&ban)
            .map_err(CommandError::ClusterWrite)?;
    }
    let kick_reason = format!("banned {}: {}", ban.until_text(), ban.reason);
    let disconnected: Vec<String> = shared.room.kick_where(
        |key, addr| ban.target.matches(addr.ip(), Some(key)),
        &kick_reason,
    );
    info!(target = %ban.target.to_text(), reason = %ban.reason, until = %ban.until_text(),
        disconnected = disconnected.len(), admin_uid = uid, "ban added");
    Ok(Response::Banned {
        ban: ban_info(&ban),
        disconnected,
    })
}

fn unban(shared: &Shared, uid: u32, target: &str) -> Result<Response, CommandError> {
    let parsed = Target::parse(target)?;
    let removed = shared
        .bans
        .remove(&parsed)
        .map_err(|source| CommandError::StateWrite {
            what: "ban list",
            source,
        })?;
    if let Some(cluster) = &shared.cluster {
        cluster
            .share_unban(&parsed)
            .map_err(CommandError::ClusterWrite)?;
    }
    if !removed {
        return Err(CommandError::NoSuchBan(parsed.to_text()));
    }
    info!(target = %parsed.to_text(), admin_uid = uid, "ban lifted");
    Ok(Response::Unbanned {
        target: parsed.to_text(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn ban_request(target: &str) -> Request {
        Request::Ban {
            target: target.to_owned(),
            duration_secs: None,
            reason: None,
        }
    }

    fn error_code(response: &Response) -> Option<ErrorCode> {
        match response {
            Response::Error(e) => Some(e.code),
            _ => None,
        }
    }

    /// A ban list that cannot be written is the daemon's problem, not the admin's argument:
    /// `state-write-failed`, and the bans in force stay as they were. The state directory is
    /// replaced by a regular file, which stops root as well as anyone else.
    #[test]
    fn an_unwritable_state_dir_is_state_write_failed() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let state = dir.path().join("state");
        let shared = Shared::for_test(&state, Config::default());
        let ok = handle(&shared, 0, ban_request("mallory"));
        assert!(matches!(ok, Response::Banned { .. }), "{ok:?}");

        std::fs::remove_dir_all(&state).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&state, b"not a directory").unwrap_or_else(|e| panic!("{e}"));
        let failed = handle(&shared, 0, ban_request("eve"));
        assert_eq!(error_code(&failed), Some(ErrorCode::StateWriteFailed));
        let unban = handle(
            &shared,
            0,
            Request::Unban {
                target: "mallory".into(),
            },
        );
        assert_eq!(error_code(&unban), Some(ErrorCode::StateWriteFailed));
        let names: Vec<String> = shared
            .bans
            .active()
            .iter()
            .map(|b| b.target.to_text())
            .collect();
        assert_eq!(names, ["mallory"]);
    }

    #[test]
    fn bad_arguments_keep_their_codes_and_messages() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let shared = Shared::for_test(dir.path(), Config::default());
        let cases = [
            (
                ban_request("10.1.2"),
                ErrorCode::InvalidArgument,
                "\"10.1.2\" is not a valid IP address",
            ),
            (
                Request::Ban {
                    target: "bob".into(),
                    duration_secs: Some(0),
                    reason: None,
                },
                ErrorCode::InvalidArgument,
                "a ban's duration must be more than zero",
            ),
            (
                Request::Announce { text: " ".into() },
                ErrorCode::InvalidArgument,
                "announcement must not be empty",
            ),
            (
                Request::Kick {
                    name: "bob".into(),
                    reason: Some("a\nb".into()),
                },
                ErrorCode::InvalidArgument,
                "reason must be a single line",
            ),
            (
                Request::Kick {
                    name: "bob".into(),
                    reason: None,
                },
                ErrorCode::NoSuchUser,
                "no user named \"bob\" is online",
            ),
            (
                Request::Unban {
                    target: "bob".into(),
                },
                ErrorCode::NoSuchBan,
                "no ban on \"bob\"",
            ),
        ];
        for (request, code, message) in cases {
            let response = handle(&shared, 0, request);
            let Response::Error(e) = response else {
                panic!("expected an error, got {response:?}");
            };
            assert_eq!((e.code, e.message.as_str()), (code, message));
        }
    }
}
