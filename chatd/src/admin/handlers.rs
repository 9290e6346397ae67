//! One function per admin command. Each does its unit of work against the shared state and
//! returns a [`Response`]; only the dispatcher in `admin/mod.rs` touches the socket.
//! To add a command: a `Request` variant in `proto.rs`, a function here, a line in `handle`.

use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use tracing::{info, warn};

use crate::bans::{self, Ban, Target};
use crate::room::RoomError;
use crate::shared::Shared;
use chat_proto::admin::{
    AdminError, BanInfo, ErrorCode, MemoryStats, Request, Response, StatusInfo, UserInfo,
};
use chat_proto::protocol;

/// Longest kick reason or announcement, in bytes.
const MAX_TEXT: usize = 1024;

/// Carries out one authorised request from the admin user `uid`.
pub fn handle(shared: &Shared, uid: u32, request: Request) -> Response {
    match request {
        Request::List {} => list(shared),
        Request::Kick { name, reason } => kick(shared, uid, &name, reason.as_deref()),
        Request::Announce { text } => announce(shared, uid, &text),
        Request::Status {} => status(shared),
        Request::Reload {} => reload(shared, uid),
        Request::Ban {
            target,
            duration_secs,
            reason,
        } => ban(shared, uid, &target, duration_secs, reason.as_deref()),
        Request::Unban { target } => unban(shared, uid, &target),
        Request::Bans {} => Response::BanList {
            bans: shared.bans.active().iter().map(ban_info).collect(),
        },
    }
}

fn invalid(message: impl Into<String>) -> Response {
    Response::Error(AdminError::new(ErrorCode::InvalidArgument, message))
}

/// Text an admin wants users to see: one line, not empty, not huge, terminal-safe.
///
/// The error is the message for an `invalid-argument` response (kept small: a `Response`
/// is a large enum and clippy rightly objects to it as an error type).
fn user_text<'a>(what: &str, text: &'a str) -> Result<std::borrow::Cow<'a, str>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if text.len() > MAX_TEXT {
        return Err(format!("{what} is longer than {MAX_TEXT} bytes"));
    }
    if text.contains(['\n', '\r']) {
        return Err(format!("{what} must be a single line"));
    }
    Ok(protocol::sanitize(text))
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
        })
        .collect();
    Response::Users { users }
}

fn kick(shared: &Shared, uid: u32, name: &str, reason: Option<&str>) -> Response {
    let reason = match reason {
        Some(r) => match user_text("reason", r) {
            Ok(r) => r,
            Err(msg) => return invalid(msg),
        },
        None => "kicked by an administrator".into(),
    };
    match shared.room.kick(name, &reason) {
        Ok((name, addr)) => {
            info!(user = %name, peer = %addr, reason = %reason, admin_uid = uid, "user kicked");
            Response::Kicked {
                name,
                addr: addr.to_string(),
            }
        }
        Err(RoomError::NoSuchUser(n)) => Response::Error(AdminError::new(
            ErrorCode::NoSuchUser,
            format!("no user named {n:?} is online"),
        )),
        Err(e) => invalid(e.to_string()),
    }
}

fn announce(shared: &Shared, uid: u32, text: &str) -> Response {
    let text = match user_text("announcement", text) {
        Ok(t) => t,
        Err(msg) => return invalid(msg),
    };
    let recipients = shared.room.announce(&text);
    info!(text = %text, recipients, admin_uid = uid, "announcement sent");
    Response::Announced { recipients }
}

fn status(shared: &Shared) -> Response {
    let c = &shared.room.counters;
    let l = &shared.limits;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    Response::Status(StatusInfo {
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
        config_path: shared.config_path().map(|p| p.display().to_string()),
        listen: shared.listen.iter().map(ToString::to_string).collect(),
        admin_socket: shared.admin_socket.display().to_string(),
    })
}

fn reload(shared: &Shared, uid: u32) -> Response {
    match shared.reload() {
        Ok(diff) => {
            info!(admin_uid = uid, %diff, "config reloaded");
            Response::Reloaded {
                applied: diff.applied,
                needs_restart: diff.needs_restart,
            }
        }
        Err(e) => {
            warn!(admin_uid = uid, error = %e, "config reload failed (chatctl reload), keeping the running config: {e}");
            Response::Error(AdminError::new(ErrorCode::ReloadFailed, e.to_string()))
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
) -> Response {
    let target = match Target::parse(target) {
        Ok(t) => t,
        Err(e) => return invalid(e.to_string()),
    };
    if duration_secs == Some(0) {
        return invalid("a ban's duration must be more than zero");
    }
    let reason = match reason {
        Some(r) => match user_text("reason", r) {
            Ok(r) => r.into_owned(),
            Err(msg) => return invalid(msg),
        },
        None => "banned by an administrator".to_owned(),
    };
    let now = bans::now_secs();
    let ban = Ban {
        target,
        reason,
        created: now,
        expires: duration_secs.map(|d| now.saturating_add(d)),
    };
    if let Err(e) = shared.bans.add(ban.clone()) {
        warn!(error = %e, "cannot save ban list");
        return Response::Error(AdminError::new(
            ErrorCode::InvalidArgument,
            format!("ban not saved: {e}"),
        ));
    }
    let kick_reason = format!("banned {}: {}", ban.until_text(), ban.reason);
    let disconnected: Vec<String> = shared
        .room
        .kick_where(
            |key, addr| ban.target.matches(addr.ip(), Some(key)),
            &kick_reason,
        )
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    info!(target = %ban.target.to_text(), reason = %ban.reason, until = %ban.until_text(),
        disconnected = disconnected.len(), admin_uid = uid, "ban added");
    Response::Banned {
        ban: ban_info(&ban),
        disconnected,
    }
}

fn unban(shared: &Shared, uid: u32, target: &str) -> Response {
    let parsed = match Target::parse(target) {
        Ok(t) => t,
        Err(e) => return invalid(e.to_string()),
    };
    match shared.bans.remove(&parsed) {
        Ok(true) => {
            info!(target = %parsed.to_text(), admin_uid = uid, "ban lifted");
            Response::Unbanned {
                target: parsed.to_text(),
            }
        }
        Ok(false) => Response::Error(AdminError::new(
            ErrorCode::NoSuchBan,
            format!("no ban on {:?}", parsed.to_text()),
        )),
        Err(e) => Response::Error(AdminError::new(
            ErrorCode::InvalidArgument,
            format!("ban list not saved: {e}"),
        )),
    }
}
