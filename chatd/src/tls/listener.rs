//! The TLS listener's accept loop. It admits a connection ([`Admission::admit`]) before any
//! cryptography, so caps and address bans cost a banned or flooding peer no handshake of ours,
//! then runs a bounded handshake in the connection's own task and hands the stream to the same
//! [`session::Conversation`](crate::session::Conversation) every transport uses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::{HANDSHAKE_TIMEOUT, TLS_BUFFER_LIMIT, Tls};
use crate::admission::{Admission, Refusal, Ticket};
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
        let fut = connection(stream, peer, tls, shared, admission, token);
        let _ = std::fs::write(
            "/tmp/tlssize.txt",
            format!(
                "{} tlsstream {} conn {} session {}",
                std::mem::size_of_val(&fut),
                std::mem::size_of::<TlsStream<TcpStream>>(),
                std::mem::size_of::<rustls::ServerConnection>(),
                std::mem::size_of::<StreamSession<TlsStream<TcpStream>>>()
            ),
        );
        tracker.spawn(fut);
    }
}

/// A TLS connection once admitted (or refused, to be told inside TLS) and past its handshake.
type Established = (TlsStream<TcpStream>, SocketAddr, Result<Ticket, Refusal>);

/// One TLS connection, to its end. Admission and the handshake run boxed, so their state (the
/// header read, the peek, rustls's handshake future) is freed before the session starts, and
/// the session runs boxed too, in an allocation of its own size: a connected member costs
/// this small future and the session's.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Arc<Tls>,
    shared: Arc<Shared>,
    admission: Arc<Admission>,
    token: CancellationToken,
) {
    // What comes next is worked out in one statement, so the handshake's result (a TLS
    // stream of about 1.2 KB) is moved out before anything else is awaited: a local
    // keeps its place in this future until its scope ends, even once moved from.
    let next = match Box::pin(establish(stream, peer, tls, &shared, admission, &token)).await {
        None => return,
        Some((mut stream, peer, admitted)) => {
            stream.get_mut().1.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
            match admitted {
                Ok(ticket) => {
                    debug!(%peer, "TLS connection accepted");
                    let session = StreamSession::new(stream, peer, Transport::Tls, shared.clone());
                    Ok((ticket, Box::pin(session.run(token.clone()))))
                }
                Err(refusal) => Err(Box::pin(refuse(stream, refusal))),
            }
        }
    };
    match next {
        Ok((ticket, session)) => {
            shared.activity.open_tls.fetch_add(1, Ordering::Relaxed);
            session.await;
            shared.activity.open_tls.fetch_sub(1, Ordering::Relaxed);
            drop(ticket);
        }
        Err(refused) => refused.await,
    }
}

/// Tells a refused client why in its own framing: inside TLS, one line, then close_notify.
async fn refuse(mut stream: TlsStream<TcpStream>, refusal: Refusal) {
    let line = protocol::error_line(refusal.code, &refusal.text);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        stream.write_all(&line).await?;
        stream.shutdown().await
    })
    .await;
    drop(refusal);
}

/// Admits the connection and runs its bounded handshake; `None` when it ended meanwhile
/// (shutdown, a bad or missing PROXY header, a failed or late handshake: counted and logged).
async fn establish(
    mut stream: TcpStream,
    peer: SocketAddr,
    tls: Arc<Tls>,
    shared: &Arc<Shared>,
    admission: Arc<Admission>,
    token: &CancellationToken,
) -> Option<Established> {
    // An owned snapshot: it lives across the header read.
    let live = shared.live.load_full();
    let limit = HANDSHAKE_TIMEOUT.min(live.config.limits.name_timeout);
    let keepalive = live.config.limits.keepalive;
    // Behind a balancer the real client comes first, in a PROXY header before the handshake,
    // and is admitted by that address once it is read; anywhere else the connection is
    // admitted at once (caps and bans cost us no crypto), and a PROXY header is refused by
    // name rather than as a failed handshake. The peek for a stray header and the handshake
    // share one deadline (set once the connection is admitted).
    let handshake_by;
    let (peer, admitted) = match live.config.tls.as_ref().map(|t| t.proxy()) {
        Some(settings) if settings.enabled => {
            let deadline = tokio::time::Instant::now() + live.config.limits.name_timeout;
            let client = tokio::select! {
                _ = token.cancelled() => return None,
                c = crate::proxy::real_peer(&mut stream, peer, settings, deadline, shared) => c,
            };
            let client = client?;
            handshake_by = tokio::time::Instant::now() + limit;
            (client, admission.admit(client))
        }
        _ => {
            let admitted = admission.admit(peer);
            handshake_by = tokio::time::Instant::now() + limit;
            let mut first = [0u8; 12];
            let peeked = tokio::select! {
                _ = token.cancelled() => return None,
                p = tokio::time::timeout_at(handshake_by, stream.peek(&mut first)) => p,
            };
            if let Ok(Ok(n)) = peeked
                && crate::proxy::looks_like_header(&first[..n])
            {
                let e = crate::proxy::ProxyError::Unexpected;
                crate::proxy::refused(shared, peer, "tls", &e);
                return None;
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
        _ = token.cancelled() => return None,
        r = handshake => match r {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                LimitCounters::bump(&shared.limits.tls_handshakes_failed);
                debug!(%peer, error = %e, "TLS handshake failed");
                return None;
            }
            Err(_) => {
                LimitCounters::bump(&shared.limits.tls_handshakes_failed);
                LimitCounters::bump(&shared.limits.tls_handshake_timeouts);
                info!(%peer, timeout = ?limit, "closing: TLS handshake not finished in time");
                return None;
            }
        },
    };
    Some((stream, peer, admitted))
}

#[cfg(test)]
mod sizes {
    use super::*;
    use crate::config::{Config, TlsConfig};

    /// A connected TLS member costs its task, which holds this future inline, and the
    /// session's box: a guard against making them large again (the handshake's state, the
    /// stream kept twice, a buffer or timers kept for the session's whole life). Before: one
    /// 6,056-byte future (debug build); after: 200 bytes and a box of about 2,000 (release).
    #[tokio::test]
    async fn a_tls_connection_task_is_small() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .unwrap_or_else(|e| panic!("certificate: {e}"));
        let (certificate, private_key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&certificate, made.cert.pem()).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&private_key, made.signing_key.serialize_pem())
            .unwrap_or_else(|e| panic!("{e}"));
        let config = TlsConfig {
            listen: Vec::new(),
            certificate,
            private_key,
            proxy_protocol: false,
            trusted_proxies: Vec::new(),
        };
        let tls = Arc::new(Tls::new(&config).unwrap_or_else(|e| panic!("{e}")));
        let shared = Arc::new(Shared::for_test(dir.path(), Config::default()));
        let admission = Arc::new(Admission::new(shared.clone()));
        let (stream, peer, _client) = crate::session::accepted_tcp().await;
        let task = connection(
            stream,
            peer,
            tls,
            shared.clone(),
            admission,
            CancellationToken::new(),
        );
        let size = std::mem::size_of_val(&task);
        // What the session's own box holds, over an in-memory stream in place of TLS's.
        let (ours, _theirs) = tokio::io::duplex(64);
        let session =
            StreamSession::new(ours, peer, Transport::Tls, shared).run(CancellationToken::new());
        let boxed = std::mem::size_of_val(&session)
            - std::mem::size_of::<tokio::io::DuplexStream>()
            + std::mem::size_of::<TlsStream<TcpStream>>();
        eprintln!("TLS connection task {size} B, its session's box about {boxed} B");
        assert!(size <= 512, "the TLS connection's future is {size} bytes");
        assert!(
            boxed <= 2_560,
            "the TLS session's future is about {boxed} bytes"
        );
    }
}
