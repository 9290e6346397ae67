//! The browser client (`[web]`): an HTTP listener that serves one page compiled into the
//! binary (`GET /`, `/app.js`, `/style.css`, `/icon.svg` from `chatd/web/`) and upgrades
//! `GET /ws` to a WebSocket that joins the room like any other connection
//! (`session::WsSession`).
//!
//! Before an upgrade, in this order: the WebSocket handshake headers (else 400/426), the
//! `Origin` (`web.allowed-origins`, else 403), then the admission every listener uses
//! (bans 403, per-address cap 429, server full 503); each refusal has a plain-text body saying
//! why and a log line. With `web.tls` the listener speaks HTTPS with the `[tls]` certificate,
//! whichever is in force after the last reload.
//!
//! HTTP itself is bounded: at most [`MAX_HTTP_CONNECTIONS`] connections that have not upgraded,
//! and at most `limits.max-connections-per-ip` of them per address (more are closed at once),
//! request heads of at most [`MAX_HEAD`] bytes read within [`HEAD_TIMEOUT`], and a connection
//! that has not upgraded is closed after [`HTTP_CONNECTION_TIMEOUT`]. An upgraded connection
//! leaves those counts and is bounded as a chat connection instead.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use crate::admission::{Admission, Limit};
use crate::engine::Transport;
use crate::session::WsSession;
use crate::shared::{LimitCounters, Shared};

/// HTTP connections served at once before their upgrade.
pub const MAX_HTTP_CONNECTIONS: usize = 1024;
/// Longest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Time a client has to send a request head (and, between requests, to start the next one).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest an HTTP connection stays open without upgrading, keep-alive included.
pub const HTTP_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// The page and its parts, compiled in.
const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const STYLE_CSS: &str = include_str!("../web/style.css");
const ICON_SVG: &str = include_str!("../web/icon.svg");

/// The Content-Security-Policy of every response: only this origin's script, style, images
/// and WebSocket; no inline script or style, no frames, no forms, no base URL.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
frame-ancestors 'none'";

/// What every connection of one web listener shares.
struct Web {
    shared: Arc<Shared>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// `Wss` with `web.tls`, else `Ws`.
    transport: Transport,
    /// Connections not upgraded (yet), in total and by address (IPv6 by /64).
    // A std mutex: one map update per connect and per close, never across an await.
    http_open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// A connection's place in the HTTP counts; dropping it gives the place back.
struct HttpSlot {
    web: Arc<Web>,
    key: IpAddr,
}

impl Web {
    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, HashMap<IpAddr, usize>)> {
        self.http_open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for an HTTP connection from `peer`, unless [`MAX_HTTP_CONNECTIONS`] are open or
    /// `limits.max-connections-per-ip` from its address; the refusal is counted as the chat
    /// listeners count theirs.
    fn http_slot(self: &Arc<Self>, peer: SocketAddr) -> Option<HttpSlot> {
        let per_ip = self
            .shared
            .live
            .load()
            .config
            .limits
            .max_connections_per_ip
            .get();
        let key = crate::admission::address_key(peer.ip());
        let mut open = self.lock();
        if open.0 >= MAX_HTTP_CONNECTIONS {
            drop(open);
            LimitCounters::bump(&self.shared.limits.refused_full);
            debug!(%peer, "web: too many HTTP connections open; closing this one");
            return None;
        }
        let n = open.1.entry(key).or_insert(0);
        if *n >= per_ip {
            drop(open);
            LimitCounters::bump(&self.shared.limits.refused_per_ip);
            debug!(%peer, "web: too many HTTP connections from this address; closing this one");
            return None;
        }
        *n += 1;
        open.0 += 1;
        Some(HttpSlot {
            web: self.clone(),
            key,
        })
    }
}

impl Drop for HttpSlot {
    fn drop(&mut self) {
        let mut open = self.web.lock();
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.key);
            }
        }
    }
}

/// Serves the web listener `listener` until `shutdown`: HTTPS when `web.tls` is set (with the
/// daemon's `[tls]` certificate), else HTTP.
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    admission: Arc<Admission>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let secure = shared
        .live
        .load()
        .config
        .web
        .as_ref()
        .is_some_and(|w| w.tls);
    let tls = if secure { shared.tls.clone() } else { None };
    let web = Arc::new(Web {
        shared: shared.clone(),
        admission,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
        transport: if tls.is_some() {
            Transport::Wss
        } else {
            Transport::Ws
        },
        http_open: Mutex::new((0, HashMap::new())),
    });
    let mut acceptor = crate::server::Acceptor::new(listener, "web");
    while let Some((stream, peer)) = acceptor.next(&shared, &shutdown).await {
        // Dropping the stream closes it: no task, no buffer for a connection over the caps.
        let Some(slot) = web.http_slot(peer) else {
            continue;
        };
        crate::server::tune(&stream, shared.live.load().config.limits.keepalive);
        let (web, tls) = (web.clone(), tls.clone());
        tracker.spawn(async move {
            match tls {
                None => serve_http(stream, peer, web).await,
                Some(tls) => {
                    let handshake = tokio::time::timeout(
                        crate::tls::HANDSHAKE_TIMEOUT,
                        tls.acceptor().accept(stream),
                    );
                    let stream = tokio::select! {
                        _ = web.shutdown.cancelled() => return,
                        r = handshake => r,
                    };
                    match stream {
                        Ok(Ok(mut stream)) => {
                            stream
                                .get_mut()
                                .1
                                .set_buffer_limit(Some(crate::tls::TLS_BUFFER_LIMIT));
                            serve_http(stream, peer, web).await;
                        }
                        Ok(Err(e)) => {
                            LimitCounters::bump(&web.shared.limits.tls_handshakes_failed);
                            debug!(%peer, error = %e, "web: TLS handshake failed");
                        }
                        Err(_) => {
                            LimitCounters::bump(&web.shared.limits.tls_handshakes_failed);
                            LimitCounters::bump(&web.shared.limits.tls_handshake_timeouts);
                            debug!(%peer, "web: TLS handshake not finished in time");
                        }
                    }
                }
            }
            drop(slot);
        });
    }
}

/// Serves HTTP/1.1 on one connection until it closes, upgrades, times out or the daemon stops.
async fn serve_http<I>(io: I, peer: SocketAddr, web: Arc<Web>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let web = web.clone();
        hyper::service::service_fn(move |req| {
            let web = web.clone();
            async move { Ok::<_, Infallible>(respond(req, peer, &web)) }
        })
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD);
    // `with_upgrades`: the connection hands its socket to `hyper::upgrade::on` after a 101.
    let conn = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let served = tokio::select! {
        _ = web.shutdown.cancelled() => return,
        r = tokio::time::timeout(HTTP_CONNECTION_TIMEOUT, conn) => r,
    };
    match served {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(%peer, error = %e, "web: connection error"),
        Err(_) => debug!(%peer, "web: connection closed after its time limit"),
    }
}

/// The answer to one request.
fn respond(mut req: Request<Incoming>, peer: SocketAddr, web: &Arc<Web>) -> Response<Body> {
    let (body, content_type): (&'static str, &'static str) = match req.uri().path() {
        "/ws" => return upgrade(&mut req, peer, web),
        "/" | "/index.html" => (INDEX_HTML, "text/html; charset=utf-8"),
        "/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "/style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        "/icon.svg" | "/favicon.ico" => (ICON_SVG, "image/svg+xml; charset=utf-8"),
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut r = Response::new(Body::from(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The page comes with the binary: a new daemon may bring a new page.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure_headers(h);
    r
}

/// The security headers every response carries.
fn secure_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// A plain-text response.
fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Body::from(body.into()));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    secure_headers(h);
    r
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// `GET /ws`: checks the handshake, the origin and admission, then answers 101 and starts the
/// session once hyper hands the socket over.
fn upgrade(req: &mut Request<Incoming>, peer: SocketAddr, web: &Arc<Web>) -> Response<Body> {
    let headers = req.headers();
    if req.method() != Method::GET {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /ws opens the WebSocket\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    if !has_token(headers, header::UPGRADE, "websocket")
        || !has_token(headers, header::CONNECTION, "upgrade")
    {
        let mut r = text(
            StatusCode::UPGRADE_REQUIRED,
            "this address is the chat's WebSocket; open / in a browser\n",
        );
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return r;
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut r = text(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported WebSocket version; 13 is spoken here\n",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return r;
    }
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| k.len() == 24)
    else {
        return text(
            StatusCode::BAD_REQUEST,
            "missing or bad Sec-WebSocket-Key\n",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let shared = &web.shared;
    if let Err(why) = check_origin(headers, web) {
        LimitCounters::bump(&shared.limits.refused_origin);
        let origin = headers.get(header::ORIGIN).map(|o| o.as_bytes());
        // Peer-controlled bytes: logged escaped (Debug of the lossy text).
        let origin = origin.map(String::from_utf8_lossy);
        info!(%peer, ?origin, "refusing WebSocket: {why} (web.allowed-origins)");
        return text(StatusCode::FORBIDDEN, format!("{why}\n"));
    }
    let ticket = match web.admission.admit(peer) {
        Ok(ticket) => ticket,
        Err(refusal) => {
            // Counted and logged by admission; told here in HTTP's terms.
            let status = match refusal.limit {
                Limit::Banned => StatusCode::FORBIDDEN,
                Limit::PerAddress => StatusCode::TOO_MANY_REQUESTS,
                Limit::MaxClients => StatusCode::SERVICE_UNAVAILABLE,
            };
            return text(status, format!("{}\n", refusal.text));
        }
    };
    let on_upgrade = hyper::upgrade::on(req);
    let (shared, token, transport) = (shared.clone(), web.shutdown.clone(), web.transport);
    web.tracker.spawn(async move {
        let upgraded = tokio::select! {
            _ = token.cancelled() => return,
            u = tokio::time::timeout(HEAD_TIMEOUT, on_upgrade) => u,
        };
        let upgraded = match upgraded {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "web: upgrade failed");
                return;
            }
            Err(_) => {
                debug!(%peer, "web: upgrade not finished in time");
                return;
            }
        };
        let session = WsSession::new(TokioIo::new(upgraded), peer, transport, shared.clone()).await;
        debug!(%peer, transport = transport.as_str(), "WebSocket connection accepted");
        shared.activity.open_ws.fetch_add(1, Ordering::Relaxed);
        session.run(token).await;
        shared.activity.open_ws.fetch_sub(1, Ordering::Relaxed);
        drop(ticket);
    });
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

/// Whether the request's `Origin` may open a WebSocket: one of `web.allowed-origins`, or with
/// none listed, this page's own origin (this listener's scheme and the request's `Host`).
fn check_origin(headers: &HeaderMap, web: &Web) -> Result<(), &'static str> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return Err("a WebSocket needs an Origin header");
    };
    let origin = origin.to_ascii_lowercase();
    let live = web.shared.live.load();
    let allowed = live
        .config
        .web
        .as_ref()
        .map(|w| w.allowed_origins.as_slice())
        .unwrap_or_default();
    let ok = if allowed.is_empty() {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_ascii_lowercase);
        let scheme = match web.transport {
            Transport::Wss => "https",
            _ => "http",
        };
        host.is_some_and(|host| origin == format!("{scheme}://{host}"))
    } else {
        allowed.iter().any(|a| a.0 == origin)
    };
    if ok {
        Ok(())
    } else {
        Err("this page's origin may not open the chat's WebSocket")
    }
}

/// Binds every `web.listen` address.
pub fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<std::net::TcpListener>, String> {
    crate::server::bind_all(addrs).map_err(|e| e.replace("server.listen", "web.listen"))
}
