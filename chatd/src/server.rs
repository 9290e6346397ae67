//! The chat listeners: binding, the accept loop, and the connection limit.
//!
//! Accept errors never end the server: per-connection errors are skipped, and resource
//! exhaustion (EMFILE, ENFILE, ENOBUFS, ENOMEM) backs off, logs, and retries, so a flood of
//! connections degrades service instead of spinning or crashing.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::protocol::{self, code};
use crate::session::Session;
use crate::shared::Shared;

/// Binds one listening socket. An IPv6 address is bound IPv6-only, so `[::]:P` and `0.0.0.0:P`
/// can both be configured without clashing.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // A restarted daemon must be able to bind while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Binds every configured address. An IPv6 address on a host without IPv6 is skipped with a
/// warning as long as something else was bound; any other failure is an error naming the address.
pub fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<std::net::TcpListener>, String> {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for addr in addrs {
        match bind(*addr) {
            Ok(l) => out.push(l),
            Err(e)
                if addr.is_ipv6()
                    && matches!(
                        e.raw_os_error(),
                        Some(nix::libc::EAFNOSUPPORT | nix::libc::EADDRNOTAVAIL)
                    ) =>
            {
                skipped.push((addr, e));
            }
            Err(e) => return Err(format!("cannot listen on {addr} (server.listen): {e}")),
        }
    }
    if out.is_empty() {
        let detail: Vec<String> = skipped.iter().map(|(a, e)| format!("{a}: {e}")).collect();
        return Err(format!(
            "no listening address could be bound (server.listen): {}",
            detail.join("; ")
        ));
    }
    for (addr, e) in skipped {
        warn!(%addr, error = %e, "IPv6 not available here, not listening on this address");
    }
    Ok(out)
}

/// Counts an open connection for as long as it lives.
struct ConnectionSlot(Arc<Shared>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts connections on `listener` until `shutdown`, spawning a session for each.
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => {
                backoff = Duration::from_millis(10);
                conn
            }
            Err(e) if is_resource_exhaustion(&e) => {
                error!(error = %e, retry_in = ?backoff, "cannot accept connections: out of resources");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            Err(e) => {
                debug!(error = %e, "accept failed for one connection");
                continue;
            }
        };
        tune(&stream);
        let max = shared.live.load().config.limits.max_clients.get();
        let open = shared.connections.fetch_add(1, Ordering::Relaxed);
        let slot = ConnectionSlot(shared.clone());
        if open >= max {
            shared.refused_full.fetch_add(1, Ordering::Relaxed);
            warn!(%peer, max_clients = max, "refusing connection: server full (limits.max-clients)");
            tracker.spawn(refuse(stream, slot, max));
            continue;
        }
        debug!(%peer, "connection accepted");
        let session = Session::new(stream, peer, shared.clone());
        let token = shutdown.clone();
        tracker.spawn(async move {
            session.run(token).await;
            drop(slot);
        });
    }
}

/// Low latency (no Nagle) and keepalive, so half-open peers are found and their slots freed.
fn tune(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        debug!(error = %e, "cannot set TCP keepalive");
    }
}

/// Tells a client past the connection limit why it is refused, then closes.
async fn refuse(mut stream: TcpStream, _slot: ConnectionSlot, max: usize) {
    let line = protocol::error_line(
        code::SERVER_FULL,
        &format!("server full ({max} connections, limits.max-clients), try again later"),
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        stream.write_all(&line).await?;
        stream.shutdown().await
    })
    .await;
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    use nix::libc;
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Logs what was bound, once everything is up.
pub fn log_bound(addrs: &[SocketAddr]) {
    for addr in addrs {
        info!(%addr, "listening for chat clients");
    }
}
