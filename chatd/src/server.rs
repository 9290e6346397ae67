//! The TCP chat listeners: binding, accepting (through [`crate::admission`]) and spawning a
//! session per admitted connection.
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

use crate::admission::{Admission, Refusal, Ticket};
use crate::session::Session;
use crate::shared::{LimitCounters, Shared};
use chat_proto::protocol;

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

/// One listener's accepts, with the back-off every listener needs: running out of file
/// descriptors or memory must slow accepting down (and say so), never end it.
pub(crate) struct Acceptor {
    listener: TcpListener,
    /// What kind of listener, for the log.
    kind: &'static str,
    backoff: Duration,
}

impl Acceptor {
    /// Accepts on `listener`.
    pub(crate) fn new(listener: TcpListener, kind: &'static str) -> Self {
        Acceptor {
            listener,
            kind,
            backoff: Duration::from_millis(10),
        }
    }

    /// The next connection, or `None` once `shutdown` fires.
    pub(crate) async fn next(
        &mut self,
        shared: &Shared,
        shutdown: &CancellationToken,
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = self.listener.accept() => r,
            };
            match accepted {
                Ok(conn) => {
                    self.backoff = Duration::from_millis(10);
                    return Some(conn);
                }
                Err(e) if is_resource_exhaustion(&e) => {
                    LimitCounters::bump(&shared.limits.accept_backoffs);
                    error!(error = %e, retry_in = ?self.backoff, listener = self.kind,
                        "cannot accept connections: out of resources");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(self.backoff) => {}
                    }
                    self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    debug!(error = %e, listener = self.kind, "accept failed for one connection")
                }
            }
        }
    }
}

/// Accepts connections on `listener` until `shutdown`, spawning a session for each one that
/// `admission` lets stay.
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut acceptor = Acceptor::new(listener, "TCP");
    while let Some((stream, peer)) = acceptor.next(&shared, &shutdown).await {
        if shared.live.load().config.server.proxy_protocol {
            // The header is read in the connection's own task: a slow proxy must not hold up
            // accepting everyone else.
            tracker.spawn(proxied(
                stream,
                peer,
                shared.clone(),
                admission.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
            continue;
        }
        admit(stream, peer, None, &shared, &admission, &shutdown, &tracker);
    }
}

/// A connection on a PROXY protocol listener: the real client from its header (within
/// `limits.name-timeout`), then admission by that address.
async fn proxied(
    mut stream: TcpStream,
    proxy: SocketAddr,
    shared: Arc<Shared>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    // An owned snapshot, not the ArcSwap guard, since it lives across the read.
    let live = shared.live.load_full();
    let deadline = tokio::time::Instant::now() + live.config.limits.name_timeout;
    let settings = live.config.server.proxy();
    let client = tokio::select! {
        _ = shutdown.cancelled() => return,
        c = crate::proxy::real_peer(&mut stream, proxy, settings, deadline, &shared) => c,
    };
    if let Some(client) = client {
        admit(
            stream,
            client,
            Some(proxy),
            &shared,
            &admission,
            &shutdown,
            &tracker,
        );
    }
}

/// Admits the connection from `peer` (the real client; `proxy` is the balancer it came
/// through, if any) and spawns its session, or tells it the refusal.
fn admit(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Option<SocketAddr>,
    shared: &Arc<Shared>,
    admission: &Arc<Admission>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    let ticket = match admission.admit(peer) {
        Ok(ticket) => ticket,
        Err(refusal) => {
            tracker.spawn(refuse(stream, refusal));
            return;
        }
    };
    // Only connections that stay get tuned; a refusal is one line and a close.
    tune(&stream, shared.live.load().config.limits.keepalive);
    debug!(%peer, ?proxy, "connection accepted");
    let mut session = Session::new(stream, peer, shared.clone());
    if proxy.is_some() {
        // Its header is read; what follows is the client's, whatever it looks like.
        session.header_read();
    }
    let open = OpenTcp::new(shared.clone(), ticket);
    // The session's future is the task, with nothing around it: see `Session::run`.
    tracker.spawn(session.run(shutdown.clone(), open));
}

/// What an admitted TCP connection holds while its session runs: its admission ticket and its
/// place in the open-connections count, both given back when the session ends (or its task is
/// dropped).
struct OpenTcp {
    shared: Arc<Shared>,
    _ticket: Ticket,
}

impl OpenTcp {
    fn new(shared: Arc<Shared>, ticket: Ticket) -> Self {
        shared.activity.open_tcp.fetch_add(1, Ordering::Relaxed);
        OpenTcp {
            shared,
            _ticket: ticket,
        }
    }
}

impl Drop for OpenTcp {
    fn drop(&mut self) {
        self.shared
            .activity
            .open_tcp
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Low latency (no Nagle) and keepalive, so half-open peers are found and their slots freed.
pub(crate) fn tune(stream: &TcpStream, idle: Duration) {
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

/// Tells a refused client why (one `*** ERR` line), then closes; the refusal keeps its
/// connection slot until then.
async fn refuse(mut stream: TcpStream, refusal: Refusal) {
    let line = protocol::error_line(refusal.code, &refusal.text);
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

/// Whether an accept error means "out of descriptors or memory" (back off and retry).
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
