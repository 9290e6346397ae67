//! chatd: a chatroom daemon. The binary (`main.rs`) parses arguments, loads the config, sets up
//! logging and binds sockets; [`run`] serves them until told to stop.
//!
//! Data flows one way: listener (`server`, asking `admission`) → `session` → `room` → every other member's
//! `outbox` → that member's session writer. The room never touches a socket and a session never
//! reaches into another session.

pub mod admin;
pub mod admission;
pub mod bans;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod limits;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod outbox;
pub mod proxy;
/// The PROXY protocol keys of a listener's config (trusted proxies), without I/O.
pub mod proxy_keys;
pub mod reclaim;
pub mod room;
pub mod server;
pub mod session;
pub mod shared;
pub mod signals;
pub mod systemd;
pub mod tls;
pub mod web;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use admin::AdminListener;
use shared::Shared;
use signals::Event;

/// Serves the chat `listeners`, the `tls_listeners` (with `shared.tls`; none without it), the
/// `web_listeners` (the browser client, `[web]`) and the `admin` socket until a shutdown event arrives (or the
/// event stream ends), then stops accepting, tells every user, and waits up to
/// `server.shutdown-grace` for their queues to drain. The admin socket file is removed on return.
pub async fn run(
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
    tls_listeners: Vec<TcpListener>,
    web_listeners: Vec<TcpListener>,
    admin: AdminListener,
    mut events: mpsc::Receiver<Event>,
) {
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    // One admission for every listener, so the caps count connections on all of them.
    let admission = Arc::new(admission::Admission::new(shared.clone()));
    for listener in listeners {
        tracker.spawn(server::accept_loop(
            listener,
            shared.clone(),
            admission.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    if let Some(tls) = &shared.tls {
        for listener in tls_listeners {
            tracker.spawn(tls::listener::accept_loop(
                listener,
                tls.clone(),
                shared.clone(),
                admission.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        for addr in &shared.tls_listen {
            info!(%addr, "listening for TLS chat clients");
        }
    }
    for listener in web_listeners {
        tracker.spawn(web::accept_loop(
            listener,
            shared.clone(),
            admission.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    for addr in &shared.web_listen {
        info!(%addr, "serving the web client (HTTP and WebSocket)");
    }
    let admin = Arc::new(admin);
    {
        let (admin, shared, shutdown, inner) = (
            admin.clone(),
            shared.clone(),
            shutdown.clone(),
            tracker.clone(),
        );
        tracker.spawn(async move { admin::serve(&admin, shared, shutdown, inner).await });
    }
    server::log_bound(&shared.listen);
    info!(socket = %admin.path().display(), "admin socket ready");
    // A cluster node follows the room from its own task; it stops only after every session
    // has ended, so their leaves reach the other nodes.
    let cluster_stop = CancellationToken::new();
    let cluster = shared.cluster.clone().map(|c| {
        tokio::spawn(c.run(
            shared.clone() as Arc<dyn cluster::Host>,
            cluster_stop.clone(),
        ))
    });
    // Only now, with every listener accepting and the admin socket up (and the SIGHUP handler
    // installed by the caller), may systemd consider the service started; a cluster node
    // also waits until it follows the room (its status line says what it waits for).
    let ready = tokio::spawn({
        let shared = shared.clone();
        async move {
            if let Some(c) = &shared.cluster {
                systemd::notify_status(&systemd::status_line(&shared));
                c.wait_ready().await;
            }
            systemd::notify_ready(&shared);
        }
    });
    // Not in `tracker`: these run until aborted below, after the drain, so the watchdog keeps
    // being fed while clients are told goodbye.
    let status = tokio::spawn(systemd::status_task(shared.clone()));
    let watchdog = tokio::spawn(systemd::watchdog_task());
    // Sends a join or leave storm's batched announcements when they are due. `Room::close`
    // flushes the last batch, so stopping it with the others below loses nothing.
    let presence = tokio::spawn({
        let shared = shared.clone();
        async move { shared.room.flush_when_due().await }
    });
    // Gives the memory a drained burst leaves behind back to the system (memory.rs).
    let trimmer = tokio::spawn({
        let shared = shared.clone();
        async move { memory::trim_task(&shared.trims).await }
    });

    while let Some(event) = events.recv().await {
        match event {
            Event::Reload => match systemd::reload(&shared) {
                Ok(diff) => info!(%diff, "config reloaded (SIGHUP)"),
                Err(e) => {
                    error!(error = %e, "config reload failed (SIGHUP), keeping the running config: {e}")
                }
            },
            Event::Shutdown => break,
        }
    }

    let users = shared.room.len();
    info!(users, "shutting down");
    systemd::notify_stopping(users);
    // Order: stop announcing leaves, stop accepting and tell every session (one token), then
    // wait for the drain.
    shared.room.close();
    shutdown.cancel();
    tracker.close();
    let grace = shared.live.load().config.server.shutdown_grace;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            connections = shared
                .connections
                .load(std::sync::atomic::Ordering::Relaxed),
            ?grace,
            "some connections did not drain in time (server.shutdown-grace); closing them"
        );
    }
    ready.abort();
    cluster_stop.cancel();
    if let Some(cluster) = cluster {
        let _ = cluster.await;
    }
    status.abort();
    watchdog.abort();
    presence.abort();
    trimmer.abort();
    drop(admin);
    info!("stopped");
}
