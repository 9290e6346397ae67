//! One function per admin command. Each does its unit of work against the shared state and
//! returns a [`Response`]; only the dispatcher in `admin/mod.rs` touches the socket.
//! To add a command: a `Request` variant in `proto.rs`, a function here, a line in `handle`.

use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use tracing::{info, warn};

use super::proto::{AdminError, ErrorCode, Request, Response, StatusInfo, UserInfo};
use crate::protocol;
use crate::room::RoomError;
use crate::shared::Shared;

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
    }
}

fn invalid(message: impl Into<String>) -> Response {
    Response::Error(AdminError::new(ErrorCode::InvalidArgument, message))
}

/// Text an admin wants users to see: one line, not empty, not huge, terminal-safe.
fn user_text<'a>(what: &str, text: &'a str) -> Result<std::borrow::Cow<'a, str>, Response> {
    let text = text.trim();
    if text.is_empty() {
        return Err(invalid(format!("{what} must not be empty")));
    }
    if text.len() > MAX_TEXT {
        return Err(invalid(format!("{what} is longer than {MAX_TEXT} bytes")));
    }
    if text.contains(['\n', '\r']) {
        return Err(invalid(format!("{what} must be a single line")));
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
            Err(resp) => return resp,
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
        Err(resp) => return resp,
    };
    let recipients = shared.room.announce(&text);
    info!(text = %text, recipients, admin_uid = uid, "announcement sent");
    Response::Announced { recipients }
}

fn status(shared: &Shared) -> Response {
    let c = &shared.room.counters;
    Response::Status(StatusInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_secs: shared.started.elapsed().as_secs(),
        users: shared.room.len(),
        connections: shared.connections.load(Ordering::Relaxed),
        messages: c.messages.load(Ordering::Relaxed),
        deliveries: c.deliveries.load(Ordering::Relaxed),
        kicks: c.kicks.load(Ordering::Relaxed),
        slow_disconnects: c.slow_disconnects.load(Ordering::Relaxed),
        refused_full: shared.refused_full.load(Ordering::Relaxed),
        reloads: shared.reloads.load(Ordering::Relaxed),
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
            warn!(admin_uid = uid, error = %e, "config reload failed; keeping the running config");
            Response::Error(AdminError::new(ErrorCode::ReloadFailed, e.to_string()))
        }
    }
}
