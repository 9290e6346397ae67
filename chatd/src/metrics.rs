//! `/metrics`: the daemon's numbers in the Prometheus text format (0.0.4), over HTTP, when
//! `[metrics] listen` is set (docs/configuration.md; loopback in the shipped config).
//!
//! There is one set of numbers: a scrape reads the same atomics `chatctl status` reads (the
//! room's `Counters`, `LimitCounters`, `Activity`, the trim stats), through a
//! `prometheus_client` collector that encodes them at scrape time. Nothing is counted twice and
//! the hot path gains no metrics-only work.
//!
//! The server is bounded: at most [`MAX_CONNECTIONS`] scrapers at once (others wait in the
//! backlog), request heads of at most [`MAX_HEAD`] bytes read within [`HEAD_TIMEOUT`], and every
//! connection closed after [`CONNECTION_TIMEOUT`]. Only `GET /metrics` is served; anything else
//! is 404 (405 for another method).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::room::FANOUT_BUCKETS_NS;
use crate::shared::Shared;

/// Scrapes served at once.
pub const MAX_CONNECTIONS: usize = 8;
/// Longest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
/// Time a scraper has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a scrape connection stays open, keep-alive included.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the shared counters at each scrape.
#[derive(Debug)]
struct Numbers(Arc<Shared>);

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    ConstCounter::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let v = i64::try_from(v).unwrap_or(i64::MAX);
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A family of one metric type with one label (`label`), a value per label value.
fn family(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    label: &str,
    values: &[(&str, u64)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for (value, n) in values {
        let labels = [(label, *value)];
        let f = m.encode_family(&labels)?;
        match kind {
            MetricType::Gauge => {
                ConstGauge::new(i64::try_from(*n).unwrap_or(i64::MAX)).encode(f)?;
            }
            _ => ConstCounter::new(*n).encode(f)?,
        }
    }
    Ok(())
}

impl Collector for Numbers {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (c, l) = (&s.room.counters, &s.limits);
        // The numbers status shows, from the same function.
        let status = activity(s);

        gauge(
            &mut e,
            "chatd_users",
            "Users in the room (named).",
            s.room.len() as u64,
        )?;
        family(
            &mut e,
            "chatd_connections",
            "Admitted chat connections open now, by listener.",
            MetricType::Gauge,
            "listener",
            &[
                ("tcp", status.open_tcp),
                ("tls", status.open_tls),
                ("ws", status.open_ws),
            ],
        )?;
        counter(
            &mut e,
            "chatd_messages",
            "Room messages and actions accepted from this node's users.",
            load(&c.messages),
        )?;
        counter(
            &mut e,
            "chatd_deliveries",
            "Lines queued to recipients (one message to N others counts N).",
            load(&c.deliveries),
        )?;
        counter(
            &mut e,
            "chatd_sent_bytes",
            "Bytes written to chat clients.",
            status.bytes_sent,
        )?;
        family(
            &mut e,
            "chatd_disconnects",
            "Connections ended, by reason.",
            MetricType::Counter,
            "reason",
            &[
                ("quit", status.quits),
                ("kick", load(&c.kicks)),
                ("flood", load(&l.flood_disconnects)),
                ("send_queue_overflow", load(&l.slow_disconnects)),
                ("name_timeout", load(&l.name_timeouts)),
                ("ban", status.ban_disconnects),
                ("error", status.lost),
                ("ws_bad_frames", load(&l.ws_bad_frames)),
            ],
        )?;
        family(
            &mut e,
            "chatd_connections_refused",
            "Connections refused at accept, by reason (banned also counts names refused by a ban).",
            MetricType::Counter,
            "reason",
            &[
                ("full", load(&l.refused_full)),
                ("per_ip", load(&l.refused_per_ip)),
                ("banned", load(&l.refused_banned)),
                ("proxy", load(&l.refused_proxy)),
                ("origin", load(&l.refused_origin)),
            ],
        )?;
        family(
            &mut e,
            "chatd_lines_refused",
            "Client lines refused, by limit.",
            MetricType::Counter,
            "reason",
            &[
                ("line_too_long", load(&l.line_too_long)),
                ("bad_utf8", load(&l.bad_utf8)),
                ("rate_limited", load(&l.rate_limited)),
            ],
        )?;
        counter(
            &mut e,
            "chatd_accept_backoffs",
            "Times accepting stalled for lack of file descriptors or memory.",
            load(&l.accept_backoffs),
        )?;
        family(
            &mut e,
            "chatd_reloads",
            "Config reloads, by result.",
            MetricType::Counter,
            "result",
            &[("ok", load(&s.reloads)), ("failed", status.reload_failures)],
        )?;
        counter(
            &mut e,
            "chatd_tls_handshake_failures",
            "TLS handshakes that failed (plaintext or garbage on the TLS port, aborted, timed out).",
            load(&l.tls_handshakes_failed),
        )?;
        // The same atomics as status's fanout_count and fanout_micros, in full.
        let fanout = &c.fanout;
        let buckets: Vec<(f64, u64)> = FANOUT_BUCKETS_NS
            .iter()
            .map(|&ns| ns as f64 / 1e9)
            .chain(std::iter::once(f64::INFINITY))
            .zip(fanout.buckets.iter().map(load))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        e.encode_descriptor(
            "chatd_fanout_duration_seconds",
            "Time to push one room message (or the chat lines of one read of a member, sent together) to every member's queue, per fan-out.",
            None,
            MetricType::Histogram,
        )?
        .encode_histogram::<NoLabelSet>(
            load(&fanout.sum_ns) as f64 / 1e9,
            count,
            &buckets,
            None,
        )?;
        gauge(
            &mut e,
            "chatd_send_queue_bytes",
            "Bytes queued for clients in all send queues now.",
            status.queued_bytes,
        )?;
        gauge(
            &mut e,
            "chatd_send_queue_max_bytes",
            "Bytes queued in the fullest client send queue now.",
            status.max_queued_bytes,
        )?;
        gauge(
            &mut e,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            crate::memory::rss_bytes().unwrap_or(0),
        )?;
        gauge(
            &mut e,
            "chatd_uptime_seconds",
            "Seconds since the daemon started.",
            s.started.elapsed().as_secs(),
        )?;
        Ok(())
    }
}

/// The activity numbers of `chatctl status`, from the atomics a scrape reads too.
pub fn activity(shared: &Shared) -> chat_proto::admin::ActivityStats {
    let a = &shared.activity;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let queued = shared.room.queued_bytes();
    let fanout = &shared.room.counters.fanout;
    chat_proto::admin::ActivityStats {
        bytes_sent: load(&a.bytes_sent),
        quits: load(&a.quits),
        ban_disconnects: load(&a.ban_disconnects),
        lost: load(&a.lost),
        reload_failures: load(&a.reload_failures),
        open_tcp: a.open_tcp.load(Ordering::Relaxed) as u64,
        open_tls: a.open_tls.load(Ordering::Relaxed) as u64,
        open_ws: a.open_ws.load(Ordering::Relaxed) as u64,
        queued_bytes: queued.total,
        max_queued_bytes: queued.max,
        fanout_count: fanout.count(),
        fanout_micros: load(&fanout.sum_ns) / 1000,
    }
}

/// The text a scrape returns now.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(8 * 1024);
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)?;
    Ok(out)
}

/// The registry for `shared`: one collector over its counters.
pub fn registry(shared: Arc<Shared>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Numbers(shared)));
    registry
}

async fn metrics(State(registry): State<Arc<Registry>>) -> Response {
    match render(&registry) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The HTTP routes: `GET /metrics`, 404 for everything else.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(Arc::new(registry(shared)))
}

/// Binds the metrics listener (`metrics.listen`).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    crate::server::bind(addr)
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving metrics at /metrics");
    }
    let service = hyper_util::service::TowerToHyperService::new(router(shared));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Wait for a free slot before accepting, so excess scrapers wait in the backlog
        // instead of holding tasks and buffers here.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(error = %e, "metrics: accept failed");
                    // EMFILE and kin: give the chat listeners the descriptors first.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = service.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_HEAD);
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let served = tokio::select! {
                _ = shutdown.cancelled() => Ok(Ok(())),
                r = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => r,
            };
            match served {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics: connection error"),
                Err(_) => debug!(%peer, "metrics: connection closed after its time limit"),
            }
            drop(slot);
        });
    }
}
