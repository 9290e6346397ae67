//! The chat listeners: binding, the accept loop, and the connection limit.
//!
//! Accept errors never end the server: per-connection errors are skipped, and resource
//! exhaustion (EMFILE, ENFILE, ENOBUFS, ENOMEM) backs off, logs, and retries, so a flood of
//! connections degrades service instead of spinning or crashing.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::session::Session;
use crate::shared::Shared;
use chat_proto::protocol::{self, code};

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

/// Open connections per client address. IPv4 addresses count one by one; IPv6 addresses count
/// per /64, the block one subscriber usually gets, so a single host cannot dodge the limit by
/// rotating through its own addresses.
#[derive(Debug, Default)]
pub struct PerIp {
    // A std mutex: one hash-map update per connect and disconnect, never across an await.
    open: std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>,
}

impl PerIp {
    fn key(ip: IpAddr) -> IpAddr {
        // IPv4-mapped IPv6 counts as the IPv4 address, the same rule bans use.
        match crate::bans::canonical(ip) {
            IpAddr::V6(v6) => {
                let s = v6.segments();
                IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
            }
            v4 => v4,
        }
    }

    /// Counts a connection from `ip` unless `max` are already open; returns whether it may stay.
    fn try_add(&self, ip: IpAddr, max: usize) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(Self::key(ip)).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    fn remove(&self, ip: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let key = Self::key(ip);
        if let Some(n) = open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&key);
            }
        }
    }
}

/// Counts an open connection (globally and for its address) for as long as it lives.
struct ConnectionSlot {
    shared: Arc<Shared>,
    ip: Option<IpAddr>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.ip {
            self.shared.per_ip.remove(ip);
        }
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
                crate::shared::LimitCounters::bump(&shared.limits.accept_backoffs);
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
        let live = shared.live.load_full();
        let max = live.config.limits.max_clients.get();
        let open = shared.connections.fetch_add(1, Ordering::Relaxed);
        let mut slot = ConnectionSlot {
            shared: shared.clone(),
            ip: None,
        };
        if open >= max {
            crate::shared::LimitCounters::bump(&shared.limits.refused_full);
            warn!(%peer, max_clients = max, "refusing connection: server full (limits.max-clients)");
            let text =
                format!("server full ({max} connections, limits.max-clients), try again later");
            tracker.spawn(refuse(stream, slot, code::SERVER_FULL, text));
            continue;
        }
        if let Some(ban) = shared.bans.find(peer.ip(), None) {
            crate::shared::LimitCounters::bump(&shared.limits.refused_banned);
            info!(%peer, ban = %ban.target.to_text(), "refusing connection: banned address");
            tracker.spawn(refuse(stream, slot, code::BANNED, ban.refusal()));
            continue;
        }
        let per_ip = live.config.limits.max_connections_per_ip.get();
        if !shared.per_ip.try_add(peer.ip(), per_ip) {
            crate::shared::LimitCounters::bump(&shared.limits.refused_per_ip);
            warn!(%peer, max_connections_per_ip = per_ip,
                "refusing connection: too many from this address (limits.max-connections-per-ip)");
            let text = format!(
                "too many connections from your address ({per_ip}, limits.max-connections-per-ip)"
            );
            tracker.spawn(refuse(stream, slot, code::TOO_MANY_CONNECTIONS, text));
            continue;
        }
        slot.ip = Some(peer.ip());
        // Only connections that stay get tuned; a refusal is one line and a close.
        tune(&stream, live.config.limits.keepalive);
        drop(live);
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
fn tune(stream: &TcpStream, idle: Duration) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "cannot set TCP_NODELAY");
    }
    let interval = (idle / 6).max(Duration::from_secs(1));
    let keepalive = TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(KEEPALIVE_PROBES);
    let sock = SockRef::from(stream);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        debug!(error = %e, "cannot set TCP keepalive");
    }
    // Keepalive probes only run while nothing is in flight. A dead peer that we are still
    // sending room traffic to would otherwise be retransmitted to for ~15 minutes; the user
    // timeout bounds unacknowledged data by the same budget as the probes.
    let budget = idle + interval * KEEPALIVE_PROBES;
    if let Err(e) = sock.set_tcp_user_timeout(Some(budget)) {
        debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
    }
}

/// Unanswered keepalive probes after which a peer is considered gone.
const KEEPALIVE_PROBES: u32 = 3;

/// Tells a refused client why (one `*** ERR` line), then closes.
async fn refuse(mut stream: TcpStream, _slot: ConnectionSlot, code: &str, text: String) {
    let line = protocol::error_line(code, &text);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        stream.write_all(&line).await?;
        stream.shutdown().await
    })
    .await;
}

/// Raises this process's soft open-files limit to the hard one, since every client is a file
/// descriptor. Returns the new limit if it was raised, `None` if it already was the hard one.
pub fn raise_fd_limit() -> nix::Result<Option<u64>> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= hard {
        return Ok(None);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(Some(hard))
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
