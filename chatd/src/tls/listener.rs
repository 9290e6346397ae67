//! The TLS listener's accept loop. It admits a connection ([`Admission::admit`]) before any
//! cryptography, so caps and address bans cost a banned or flooding peer no handshake of ours,
//! then runs a bounded handshake in the connection's own task and hands the stream to the same
//! [`session::Conversation`](crate::session::Conversation) every transport uses.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::{HANDSHAKE_TIMEOUT, TLS_BUFFER_LIMIT, Tls};
use crate::admission::Admission;
use crate::engine::Transport;
use crate::session::StreamSession;
use crate::shared::{LimitCounters, Shared};
use chat_proto::protocol;

/// Accepts TLS connections on `listener` until `shutdown`: admission first, then a bounded
/// handshake in the connection's own task, then a session.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Arc<Tls>,
    shared: Arc<Shared>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut acceptor = crate::server::Acceptor::new(listener, "TLS");
    while let Some((stream, peer)) = acceptor.next(&shared, &shutdown).await {
        let (tls, shared, token) = (tls.clone(), shared.clone(), shutdown.clone());
        let admission = admission.clone();
        tracker.spawn(async move {
            // An owned snapshot: it lives across the header read.
            let live = shared.live.load_full();
            let limit = HANDSHAKE_TIMEOUT.min(live.config.limits.name_timeout);
            let keepalive = live.config.limits.keepalive;
            let mut stream = stream;
            // Behind a balancer the real client comes first, in a PROXY header before the
            // handshake, and is admitted by that address once it is read; anywhere else the
            // connection is admitted at once (caps and bans cost us no crypto), and a PROXY
            // header is refused by name rather than as a failed handshake.
            // The peek for a stray header and the handshake share one deadline (set once the
            // connection is admitted).
            let handshake_by;
            let (peer, admitted) = match live.config.tls.as_ref().map(|t| t.proxy()) {
                Some(settings) if settings.enabled => {
                    let deadline = tokio::time::Instant::now() + live.config.limits.name_timeout;
                    let client = tokio::select! {
                        _ = token.cancelled() => return,
                        c = crate::proxy::real_peer(&mut stream, peer, settings, deadline, &shared) => c,
                    };
                    let Some(client) = client else {
                        return;
                    };
                    handshake_by = tokio::time::Instant::now() + limit;
                    (client, admission.admit(client))
                }
                _ => {
                    let admitted = admission.admit(peer);
                    handshake_by = tokio::time::Instant::now() + limit;
                    let mut first = [0u8; 12];
                    let peeked = tokio::select! {
                        _ = token.cancelled() => return,
                        p = tokio::time::timeout_at(handshake_by, stream.peek(&mut first)) => p,
                    };
                    if let Ok(Ok(n)) = peeked
                        && crate::proxy::looks_like_header(&first[..n])
                    {
                        let e = crate::proxy::ProxyError::Unexpected;
                        crate::proxy::refused(&shared, peer, "tls", &e);
                        return;
                    }
                    (peer, admitted)
                }
            };
            drop(live);
            if admitted.is_ok() {
                crate::server::tune(&stream, keepalive);
            }
            let handshake = tokio::time::timeout_at(handshake_by, tls.acceptor.accept(stream));
            let stream = tokio::select! {
                _ = token.cancelled() => return,
                r = handshake => match r {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        LimitCounters::bump(&shared.limits.tls_handshakes_failed);
                        debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        LimitCounters::bump(&shared.limits.tls_handshakes_failed);
                        LimitCounters::bump(&shared.limits.tls_handshake_timeouts);
                        info!(%peer, timeout = ?limit, "closing: TLS handshake not finished in time");
                        return;
                    }
                },
            };
            let mut stream = stream;
            stream.get_mut().1.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
            match admitted {
                Ok(ticket) => {
                    debug!(%peer, "TLS connection accepted");
                    shared.activity.open_tls.fetch_add(1, Ordering::Relaxed);
                    StreamSession::new(stream, peer, Transport::Tls, shared.clone())
                        .run(token)
                        .await;
                    shared.activity.open_tls.fetch_sub(1, Ordering::Relaxed);
                    drop(ticket);
                }
                Err(refusal) => {
                    // Told in its own framing: inside TLS, one line, then close_notify.
                    let line = protocol::error_line(refusal.code, &refusal.text);
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        stream.write_all(&line).await?;
                        stream.shutdown().await
                    })
                    .await;
                    drop(refusal);
                }
            }
        });
    }
}
