//! chat-bench: the chatd load generator. It drives a running chatd over real loopback TCP and
//! prints one JSON line of results.
//!
//! - `fanout`: C clients join; S of them send numbered, timestamped messages (at a fixed rate, or
//!   as fast as the server takes them while no receiver is more than `--window` messages
//!   behind). Every client checks every message it receives, so the report counts deliveries
//!   per second, end-to-end latency percentiles, and messages lost, duplicated or reordered.
//! - `idle`: C clients connect and join at a given rate (the join storm), then sit idle; the
//!   report gives how long seating everyone took and the server's RSS per idle connection,
//!   read once every join announcement has been delivered.
//!
//! Both modes read the server's CPU time and RSS from `/proc/<pid>` when `--pid` is given.
//!
//! `--tls` (with `--ca FILE` for a private CA) speaks TLS to chatd's TLS listener: each socket
//! gets a rustls `ClientConnection` driven by hand from the same loop (records read and written
//! on readiness, plaintext through rustls's buffers), so the report compares with a plaintext
//! run of the same case.
//!
//! `--websocket` speaks to chatd's web listener instead (`[web] listen`; with `--tls`, wss):
//! each socket first upgrades with `GET /ws` and a same-origin `Origin` header (`http://` or
//! `https://` and the address it connects to, unless `--origin` says otherwise), checks the
//! `101` answer, then sends every protocol line as one masked text frame and takes every text
//! frame it receives as one line, counted exactly as a line over TCP. Server pings are answered,
//! fragmented messages reassembled, and close frames counted by code in the report's `websocket`
//! object (the framing is in `ws.rs`). The report's `transport` says which of tcp, tls, ws and
//! wss a run used.
//!
//! Several `--addr`es spread the clients over the nodes of a cluster (client i on address
//! i mod n; `--sender-addr` puts the senders on one node), and `--pid` takes every node's pid.
//! Every client that only receives keeps a running hash of the order it got the messages in;
//! the report's `orders_seen` is how many different orders they saw, and a clean run needs one.
//!
//! Exit status: 0 for a complete, clean run; 1 when the run timed out or saw a message lost,
//! duplicated, reordered or never sent, an error or a dropped connection (the JSON line is printed
//! either way); 2 for bad arguments.
//!
//! The generator shares the machine with the server, so it is built to cost little: one thread,
//! one epoll set (mio, edge-triggered), one 256 KiB read buffer shared by all connections, and
//! per line only a newline search and, for messages, three integer parses. Message payloads are
//! `<seq> <send-time-ns>` padded to `--text-bytes`; the sender is known from the name (`b<id>`)
//! the server prefixes, and the timestamp comes from this same process's monotonic clock, so no
//! cross-process clock is involved.

mod hist;
mod procfs;
mod ws;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use clap::{Args, Parser, Subcommand};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde_json::{Value, json};

use hist::Histogram;

/// Size of the one read buffer shared by every connection.
const SCRATCH: usize = 256 * 1024;
/// Connection attempts in flight at once when connecting as fast as possible; stays well below
/// chatd's listen backlog (1024) so no SYN is dropped and retried a second later.
const MAX_CONNECTING: usize = 128;
/// A line longer than this without a newline means the peer is not speaking the chat protocol;
/// over WebSocket, it is the longest message (and frame) accepted.
const MAX_PARTIAL: usize = 64 * 1024;
/// The longest WebSocket frame header (2 bytes, a 64-bit length; the server does not mask).
const MAX_FRAME_HEADER: usize = 10;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Load generator for chatd: fan-out throughput, latency, loss and memory per \
             connection, printed as one JSON line"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// C clients join, S of them send; measures deliveries/s, latency, loss and reordering.
    Fanout(FanoutArgs),
    /// C clients join at a given rate and stay idle; measures seating time and RSS per
    /// connection.
    Idle(IdleArgs),
}

#[derive(Debug, Args)]
struct Common {
    /// The server's chat address; only loopback addresses are accepted. Several (comma
    /// separated, or the option repeated) spread the clients over the nodes of a cluster:
    /// client i connects to address i mod n.
    #[arg(long, default_value = "127.0.0.1:42069", value_delimiter = ',')]
    addr: Vec<SocketAddr>,
    /// Where the senders connect instead (e.g. one node of a cluster, with `--addr` the
    /// other, to measure latency across nodes); the receivers still use `--addr`.
    #[arg(long)]
    sender_addr: Option<SocketAddr>,
    /// The server's pid, to read its CPU time and RSS from /proc; several (a cluster's nodes)
    /// are summed.
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
    /// Hard bound on the whole run, in seconds; the report says `timed_out` if it is hit.
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
    /// Free text copied into the report (which build, which machine state).
    #[arg(long, default_value = "")]
    label: String,
    /// Speak TLS (to chatd's `tls.listen` port), verifying the server's certificate for the
    /// address's IP (or `--server-name`).
    #[arg(long)]
    tls: bool,
    /// With TLS, trust the CA certificates (PEM) in FILE instead of the system's roots.
    /// Implies --tls.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// With TLS, the name the certificate must be valid for (default: the address's IP).
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// Speak WebSocket to chatd's web listener (`[web] listen`): upgrade at `--ws-path`, then
    /// one text frame per protocol line. With --tls, wss.
    #[arg(long)]
    websocket: bool,
    /// With --websocket, the path of the upgrade request.
    #[arg(long, default_value = "/ws", value_name = "PATH")]
    ws_path: String,
    /// With --websocket, the Origin header to send (default: the page's own origin,
    /// `http://ADDR` or, with TLS, `https://ADDR`, ADDR being the `Host` sent).
    #[arg(long, value_name = "URL")]
    origin: Option<String>,
    /// Client i is named `b<N+i>`: a second run can join the room beside a first one that is
    /// still connected (whose clients are b0, b1, ...) without a name clash.
    #[arg(long, value_name = "N", default_value_t = 0)]
    first_name: u64,
}

/// What `--websocket` needs per connection attempt, or `None` for the chat protocol over the
/// stream itself.
fn ws_config(c: &Common) -> Result<Option<WsSettings>, String> {
    if !c.websocket {
        if c.origin.is_some() {
            return Err("--origin needs --websocket".to_owned());
        }
        return Ok(None);
    }
    if !c.ws_path.starts_with('/') || c.ws_path.contains(char::is_whitespace) {
        return Err(format!("--ws-path {:?} is not an absolute path", c.ws_path));
    }
    if let Some(o) = &c.origin
        && (o.contains(char::is_control) || o.is_empty())
    {
        return Err("--origin must be one non-empty line".to_owned());
    }
    Ok(Some(WsSettings {
        path: c.ws_path.clone(),
        origin: c.origin.clone(),
    }))
}

/// The `--websocket` settings.
struct WsSettings {
    path: String,
    /// The Origin header to send instead of the page's own origin.
    origin: Option<String>,
}

/// The TLS client settings for `--tls`/`--ca`, or `None` for plaintext.
fn tls_config(c: &Common) -> Result<Option<Arc<ClientConfig>>, String> {
    if !c.tls && c.ca.is_none() {
        return Ok(None);
    }
    let mut roots = RootCertStore::empty();
    match &c.ca {
        Some(file) => {
            let certs = CertificateDer::pem_file_iter(file)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("--ca {}: {e:?}", file.display()))?;
            roots.add_parsable_certificates(certs);
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    if roots.is_empty() {
        return Err("no trusted root certificates (give --ca FILE)".to_owned());
    }
    // ring, the workspace's one provider (rustls 0.23.48 deprecates it for lacking
    // post-quantum key exchange; see chatd/src/tls.rs).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

/// Writes what rustls has queued for the socket; `WouldBlock` when the socket is full.
fn flush_tls(tls: &mut ClientConnection, stream: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        if tls.write_tls(stream)? == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

/// Reads plaintext from `stream` (through `tls` when set) into `buf`: `Ok(0)` at the end of the
/// stream, `WouldBlock` when nothing more is there now.
fn read_plain(
    stream: &mut TcpStream,
    tls: Option<&mut ClientConnection>,
    buf: &mut [u8],
) -> io::Result<usize> {
    let Some(tls) = tls else {
        return stream.read(buf);
    };
    loop {
        match tls.reader().read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if tls.read_tls(stream)? == 0 {
            return Ok(0);
        }
        tls.process_new_packets().map_err(io::Error::other)?;
        // The handshake (and alerts) answer from here.
        match flush_tls(tls, stream) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes plaintext to `stream` (through `tls` when set); `WouldBlock` when nothing was taken.
fn write_plain(
    stream: &mut TcpStream,
    tls: Option<&mut ClientConnection>,
    data: &[u8],
) -> io::Result<usize> {
    let Some(tls) = tls else {
        return stream.write(data);
    };
    // rustls buffers plaintext (before the handshake ends too) up to its limit, then the
    // records go out as far as the socket takes them.
    let n = tls.writer().write(data)?;
    match flush_tls(tls, stream) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    if n == 0 {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    Ok(n)
}

#[derive(Debug, Args)]
struct FanoutArgs {
    #[command(flatten)]
    common: Common,
    /// Connected clients (each also receives).
    #[arg(long, short = 'c', default_value_t = 100)]
    clients: usize,
    /// How many of the clients send.
    #[arg(long, short = 's', default_value_t = 10)]
    senders: usize,
    /// Messages per second per sender; 0 sends as fast as the window allows.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Senders pause while any receiver is more than this many messages behind; 0 disables.
    #[arg(long, default_value_t = 64)]
    window: u64,
    /// How long the senders send, in seconds.
    #[arg(long, short = 'd', default_value_t = 10.0)]
    duration: f64,
    /// After sending stops, how long to wait for the last messages, in seconds.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Message text is padded to this many bytes (the payload itself is about 20).
    #[arg(long, default_value_t = 32)]
    text_bytes: usize,
}

#[derive(Debug, Args)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Connections to open and join.
    #[arg(long, short = 'c', default_value_t = 5000)]
    clients: usize,
    /// New connections per second (each sends its name as soon as it is connected).
    #[arg(long, default_value_t = 1000.0)]
    join_rate: f64,
    /// Pause after the join storm has drained before RSS is read, in seconds.
    #[arg(long, default_value_t = 1.0)]
    settle: f64,
    /// How long to keep the idle connections open after reading RSS, checking none is dropped.
    #[arg(long, default_value_t = 2.0)]
    hold: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Once, before any TLS: the process-wide rustls provider is ring, as in every program here.
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let common = match &cli.mode {
        Mode::Fanout(a) => &a.common,
        Mode::Idle(a) => &a.common,
    };
    if let Some(addr) = common
        .addr
        .iter()
        .chain(&common.sender_addr)
        .find(|a| !a.ip().is_loopback())
    {
        eprintln!(
            "chat-bench: {addr} is not a loopback address; this benchmark only runs against a \
             local server"
        );
        return ExitCode::from(2);
    }
    // As many clients as the hard limit allows; if it cannot be raised, connects fail and say so.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let result = match &cli.mode {
        Mode::Fanout(a) => fanout(a),
        Mode::Idle(a) => idle(a),
    };
    match result {
        Ok((report, complete)) => {
            println!("{report}");
            if complete {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("chat-bench: {e}");
            ExitCode::from(2)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    NotStarted,
    Connecting,
    Open,
    Closed,
}

/// One client connection of the generator.
struct Conn {
    stream: Option<TcpStream>,
    /// The TLS state of this socket under `--tls`.
    tls: Option<Box<ClientConnection>>,
    state: ConnState,
    seated: bool,
    /// Received bytes after the last newline.
    partial: Vec<u8>,
    /// Bytes waiting to be written (the name, then messages for senders).
    out: Vec<u8>,
    /// Whether the socket is registered for write readiness (receivers drop it once their
    /// name is out, and take it back only if a write ever has to wait).
    write_interest: bool,
    /// The WebSocket state of this socket under `--websocket`.
    ws: Option<Box<WsConn>>,
}

/// One connection's side of WebSocket.
struct WsConn {
    /// The `Sec-WebSocket-Key` sent, which the `101` answer must hash.
    key: String,
    /// Whether the `101` has arrived; until then, received bytes are the response head.
    upgraded: bool,
    decoder: ws::Decoder,
    /// A close frame has been received and answered: nothing more is sent.
    closing: bool,
}

/// How a protocol line goes on the wire: newline-terminated, or one masked WebSocket text
/// frame.
struct Framing {
    websocket: bool,
    rng: ws::Rng,
}

impl Framing {
    /// Makes the line just written at `out[start..]` (without a newline) ready to send.
    fn finish(&mut self, out: &mut Vec<u8>, start: usize) {
        if self.websocket {
            ws::frame_in_place(out, start, ws::OP_TEXT, self.rng.mask());
        } else {
            out.push(b'\n');
        }
    }
}

/// Per-message bookkeeping of a fan-out run: what was sent, what each client received.
struct Fanout {
    clients: usize,
    senders: usize,
    window: u64,
    /// Messages sent by each sender; sequence numbers run 0.. per sender.
    sent: Vec<u64>,
    sent_total: u64,
    /// Bitmap of sequence numbers received, per (receiver, sender) pair.
    seen: Vec<Vec<u64>>,
    /// One past the highest sequence number received, per pair.
    next: Vec<u64>,
    unique: u64,
    duplicated: u64,
    reordered: u64,
    /// Message lines whose sender or sequence number make no sense (never sent).
    bogus: u64,
    hist: Histogram,
    first_send_ns: Option<u64>,
    last_delivery_ns: u64,
    /// Per client: unique messages received plus messages it sent itself; a client is
    /// `sent_total - progress` messages behind.
    progress: Vec<u64>,
    gone: Vec<bool>,
    /// Smallest progress among live clients, and how many are at it.
    min_progress: u64,
    at_min: usize,
    /// Where the next send round starts, so no sender is favoured.
    round_robin: usize,
    text_bytes: usize,
    /// Per client, a running hash of the (sender, sequence) pairs in the order it received
    /// them: clients that send nothing must all end with the same one, whatever node they are
    /// on, or the room did not give everyone one order.
    order: Vec<u64>,
}

impl Fanout {
    fn new(clients: usize, senders: usize, window: u64, text_bytes: usize) -> Self {
        Fanout {
            clients,
            senders,
            window,
            sent: vec![0; senders],
            sent_total: 0,
            seen: vec![Vec::new(); clients * senders],
            next: vec![0; clients * senders],
            unique: 0,
            duplicated: 0,
            reordered: 0,
            bogus: 0,
            hist: Histogram::new(),
            first_send_ns: None,
            last_delivery_ns: 0,
            progress: vec![0; clients],
            gone: vec![false; clients],
            min_progress: 0,
            at_min: clients,
            round_robin: 0,
            text_bytes,
            order: vec![0; clients],
        }
    }

    /// How many different orders the clients that only receive saw (1 when everyone agrees;
    /// clients that dropped out are left out).
    fn orders(&self) -> usize {
        let mut seen: Vec<u64> = (self.senders..self.clients)
            .filter(|c| !self.gone[*c])
            .map(|c| self.order[c])
            .collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    }

    /// Client `r` got message `seq` of sender `s`, stamped `ts`, at `now`.
    fn deliver(&mut self, r: usize, s: usize, seq: u64, ts: u64, now: u64) {
        if s >= self.senders || s == r || seq >= self.sent[s] || ts > now {
            self.bogus += 1;
            return;
        }
        let pair = r * self.senders + s;
        let bitmap = &mut self.seen[pair];
        let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
        if bitmap.len() <= word {
            bitmap.resize(word + 1, 0);
        }
        if bitmap[word] & bit != 0 {
            self.duplicated += 1;
            return;
        }
        bitmap[word] |= bit;
        self.unique += 1;
        let h = &mut self.order[r];
        *h = (h.rotate_left(5) ^ ((s as u64) << 40 ^ seq)).wrapping_mul(0x517c_c1b7_2722_0a95);
        if seq < self.next[pair] {
            self.reordered += 1;
        } else {
            self.next[pair] = seq + 1;
        }
        self.hist.record(now - ts);
        self.last_delivery_ns = now;
        self.advance(r, 1);
    }

    fn advance(&mut self, c: usize, by: u64) {
        let old = self.progress[c];
        self.progress[c] = old + by;
        if old == self.min_progress && !self.gone[c] {
            self.at_min -= 1;
            if self.at_min == 0 {
                self.rescan();
            }
        }
    }

    fn leave(&mut self, c: usize) {
        if self.gone[c] {
            return;
        }
        self.gone[c] = true;
        if self.progress[c] == self.min_progress {
            self.at_min -= 1;
            if self.at_min == 0 {
                self.rescan();
            }
        }
    }

    /// Recomputes the minimum; runs only when the last client at the old minimum moved on.
    fn rescan(&mut self) {
        let live = self
            .progress
            .iter()
            .zip(&self.gone)
            .filter(|(_, g)| !**g)
            .map(|(p, _)| *p);
        self.min_progress = live.clone().min().unwrap_or(u64::MAX);
        self.at_min = live.filter(|p| *p == self.min_progress).count();
    }

    /// Messages that may be sent now without any receiver falling more than `window` behind.
    fn budget(&self) -> u64 {
        if self.window == 0 {
            return u64::MAX;
        }
        self.min_progress
            .saturating_add(self.window)
            .saturating_sub(self.sent_total)
    }

    /// Appends message `seq` of sender `s` to `out`, framed by `framing`.
    fn encode(&mut self, s: usize, now: u64, out: &mut Vec<u8>, framing: &mut Framing) {
        let seq = self.sent[s];
        self.sent[s] += 1;
        self.sent_total += 1;
        self.first_send_ns.get_or_insert(now);
        let start = out.len();
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{seq} {now}");
        let len = out.len() - start;
        if len < self.text_bytes {
            out.resize(start + self.text_bytes, b'.');
        }
        framing.finish(out, start);
        self.advance(s, 1);
    }

    /// Deliveries that should have happened: every message to every client but its sender.
    fn expected(&self) -> u64 {
        let clients = self.clients as u64;
        self.sent_total * (clients - 1)
    }
}

/// The event loop shared by both modes.
struct Engine {
    poll: Poll,
    events: Events,
    ready: Vec<(usize, bool, bool)>,
    /// Where clients connect: client i to `addrs[i % n]`.
    addrs: Vec<SocketAddr>,
    /// Where the senders connect, if not to `addrs`.
    sender_addr: Option<SocketAddr>,
    /// TLS settings under `--tls`, and the name to verify (default: the address's IP).
    tls: Option<Arc<ClientConfig>>,
    server_name: Option<String>,
    conns: Vec<Conn>,
    scratch: Vec<u8>,
    t0: Instant,
    /// Which clients send (they keep write interest); the first `senders` clients.
    senders: usize,
    started: usize,
    connecting: usize,
    connect_failed: usize,
    seated: usize,
    last_seated_ns: u64,
    joins: u64,
    closed: usize,
    errors: u64,
    first_error: Option<String>,
    other_lines: u64,
    fan: Option<Fanout>,
    /// The number in the first client's name (`--first-name`).
    first_name: u64,
    /// Under `--websocket`, the upgrade's settings.
    ws: Option<WsSettings>,
    framing: Framing,
    /// WebSocket: connections upgraded, pings answered, messages that came fragmented, close
    /// frames by code (1005 when the frame had none), and the first close frame's code and
    /// reason.
    ws_upgraded: usize,
    ws_pings: u64,
    ws_fragmented: u64,
    ws_closes: BTreeMap<u16, u64>,
    ws_first_close: Option<String>,
}

impl Engine {
    fn new(addrs: Vec<SocketAddr>, clients: usize, senders: usize) -> io::Result<Engine> {
        Ok(Engine {
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            ready: Vec::with_capacity(1024),
            addrs,
            sender_addr: None,
            tls: None,
            server_name: None,
            conns: (0..clients)
                .map(|_| Conn {
                    stream: None,
                    tls: None,
                    state: ConnState::NotStarted,
                    seated: false,
                    partial: Vec::new(),
                    out: Vec::new(),
                    write_interest: true,
                    ws: None,
                })
                .collect(),
            scratch: vec![0; SCRATCH],
            t0: Instant::now(),
            senders,
            started: 0,
            connecting: 0,
            connect_failed: 0,
            seated: 0,
            last_seated_ns: 0,
            joins: 0,
            closed: 0,
            errors: 0,
            first_error: None,
            other_lines: 0,
            fan: None,
            first_name: 0,
            ws: None,
            framing: Framing {
                websocket: false,
                rng: ws::Rng::seeded(),
            },
            ws_upgraded: 0,
            ws_pings: 0,
            ws_fragmented: 0,
            ws_closes: BTreeMap::new(),
            ws_first_close: None,
        })
    }

    /// Switches the engine to WebSocket (before any connection is started).
    fn set_websocket(&mut self, settings: Option<WsSettings>) {
        self.framing.websocket = settings.is_some();
        self.ws = settings;
    }

    /// `tcp`, `tls`, `ws` or `wss`.
    fn transport(&self) -> &'static str {
        match (self.ws.is_some(), self.tls.is_some()) {
            (false, false) => "tcp",
            (false, true) => "tls",
            (true, false) => "ws",
            (true, true) => "wss",
        }
    }

    /// The report's `websocket` object (null without `--websocket`).
    fn ws_json(&self) -> Value {
        if self.ws.is_none() {
            return Value::Null;
        }
        let closes: serde_json::Map<String, Value> = self
            .ws_closes
            .iter()
            .map(|(code, n)| (code.to_string(), json!(n)))
            .collect();
        let fragmented = self.ws_fragmented
            + self
                .conns
                .iter()
                .filter_map(|c| c.ws.as_ref())
                .map(|w| w.decoder.fragmented)
                .sum::<u64>();
        json!({
            "upgraded": self.ws_upgraded,
            "pings_answered": self.ws_pings,
            "fragmented_messages": fragmented,
            "close_frames": closes,
            "first_close": self.ws_first_close,
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Starts connections up to `target` in total (and at most MAX_CONNECTING in flight when
    /// `throttle` is set).
    fn start_connects(&mut self, target: usize, throttle: bool) {
        let target = target.min(self.conns.len());
        while self.started < target && (!throttle || self.connecting < MAX_CONNECTING) {
            let i = self.started;
            self.started += 1;
            let addr = match self.sender_addr {
                Some(a) if i < self.senders => a,
                _ => self.addrs[i % self.addrs.len()],
            };
            let tls = match &self.tls {
                None => Ok(None),
                Some(config) => {
                    let name = self
                        .server_name
                        .clone()
                        .unwrap_or_else(|| addr.ip().to_string());
                    ServerName::try_from(name)
                        .map_err(io::Error::other)
                        .and_then(|n| {
                            ClientConnection::new(config.clone(), n).map_err(io::Error::other)
                        })
                        .map(|c| Some(Box::new(c)))
                }
            };
            match tls.and_then(|tls| {
                let mut s = TcpStream::connect(addr)?;
                self.poll.registry().register(
                    &mut s,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                Ok((s, tls))
            }) {
                Ok((s, tls)) => {
                    self.conns[i].stream = Some(s);
                    self.conns[i].tls = tls;
                    self.conns[i].state = ConnState::Connecting;
                    self.connecting += 1;
                }
                Err(e) => {
                    self.connect_failed += 1;
                    self.note_error(|| format!("connect: {e}"));
                    self.conns[i].state = ConnState::Closed;
                    if let Some(f) = &mut self.fan {
                        f.leave(i);
                    }
                }
            }
        }
    }

    /// Counts an error; only the first is described, so `e` runs only then.
    fn note_error(&mut self, e: impl FnOnce() -> String) {
        self.errors += 1;
        self.first_error.get_or_insert_with(e);
    }

    /// Waits up to `timeout` for socket events and handles them.
    fn step(&mut self, timeout: Duration) {
        if let Err(e) = self.poll.poll(&mut self.events, Some(timeout))
            && e.kind() != io::ErrorKind::Interrupted
        {
            self.note_error(|| format!("poll: {e}"));
            return;
        }
        self.ready.clear();
        for ev in self.events.iter() {
            let failed = ev.is_error();
            self.ready.push((
                ev.token().0,
                ev.is_readable() || ev.is_read_closed() || failed,
                ev.is_writable() || failed,
            ));
        }
        for k in 0..self.ready.len() {
            let (i, readable, writable) = self.ready[k];
            if writable {
                self.on_writable(i);
            }
            if readable {
                self.on_readable(i);
            }
        }
    }

    fn on_writable(&mut self, i: usize) {
        if self.conns[i].state == ConnState::Connecting {
            match self.finish_connect(i) {
                Ok(true) => {}
                // Not connected yet (a spurious wake-up): wait for the next event.
                Ok(false) => return,
                Err(e) => {
                    self.connecting -= 1;
                    self.connect_failed += 1;
                    self.note_error(|| format!("connect: {e}"));
                    self.close(i);
                    return;
                }
            }
        }
        self.flush(i);
    }

    /// Completes a non-blocking connect: `Ok(false)` while still in progress; once connected,
    /// queues the client's name.
    fn finish_connect(&mut self, i: usize) -> io::Result<bool> {
        let conn = &mut self.conns[i];
        let Some(stream) = conn.stream.as_mut() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
        let peer = match stream.peer_addr() {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(false),
            Err(e) => return Err(e),
        };
        stream.set_nodelay(true)?;
        // A TLS receiver still writes its handshake after the name: it keeps write wake-ups
        // (edge-triggered, so they come only when a full socket drains).
        if i >= self.senders && conn.tls.is_none() {
            // Receivers never write after their name (which fits any socket buffer): stop
            // write wake-ups for them.
            self.poll
                .registry()
                .reregister(stream, Token(i), Interest::READABLE)?;
            conn.write_interest = false;
        }
        conn.state = ConnState::Open;
        self.connecting -= 1;
        match &self.ws {
            None => {
                let _ = writeln!(conn.out, "b{}", self.first_name + i as u64);
            }
            // The name follows the 101 (see `ws_received`).
            Some(settings) => {
                let host = match &self.server_name {
                    Some(name) => format!("{name}:{}", peer.port()),
                    None => peer.to_string(),
                };
                let origin = match &settings.origin {
                    Some(o) => o.clone(),
                    None if conn.tls.is_some() => format!("https://{host}"),
                    None => format!("http://{host}"),
                };
                let key = ws::new_key(&mut self.framing.rng);
                ws::write_request(&mut conn.out, &host, &settings.path, &origin, &key);
                conn.ws = Some(Box::new(WsConn {
                    key,
                    upgraded: false,
                    decoder: ws::Decoder::default(),
                    closing: false,
                }));
            }
        }
        Ok(true)
    }

    /// Writes what is queued for client `i` as far as the socket takes it.
    fn flush(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if conn.state != ConnState::Open {
            return;
        }
        let Some(stream) = conn.stream.as_mut() else {
            return;
        };
        // Records rustls still holds go first (a full socket left them there).
        if let Some(tls) = conn.tls.as_mut() {
            match flush_tls(tls, stream) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.note_error(|| format!("TLS write: {e}"));
                    self.close(i);
                    return;
                }
            }
        }
        if conn.out.is_empty() {
            return;
        }
        let mut done = 0;
        let failed = loop {
            if done == conn.out.len() {
                break None;
            }
            match write_plain(stream, conn.tls.as_deref_mut(), &conn.out[done..]) {
                Ok(0) => break Some("write returned 0".to_owned()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Some(format!("write: {e}")),
            }
        };
        conn.out.drain(..done);
        if failed.is_none() && !conn.out.is_empty() && !conn.write_interest {
            // A receiver's write (a pong, a close reply) has to wait: it needs the wake-up.
            match self.poll.registry().reregister(
                stream,
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                Ok(()) => conn.write_interest = true,
                Err(e) => {
                    self.note_error(|| format!("reregister: {e}"));
                    self.close(i);
                    return;
                }
            }
        }
        if let Some(e) = failed {
            self.note_error(|| e);
            self.close(i);
        }
    }

    fn on_readable(&mut self, i: usize) {
        let mut buf = std::mem::take(&mut self.scratch);
        loop {
            let conn = &mut self.conns[i];
            if conn.state != ConnState::Open {
                break;
            }
            let Some(stream) = conn.stream.as_mut() else {
                break;
            };
            let keep = conn.partial.len();
            buf[..keep].copy_from_slice(&conn.partial);
            conn.partial.clear();
            match read_plain(stream, conn.tls.as_deref_mut(), &mut buf[keep..]) {
                Ok(0) => {
                    self.close(i);
                    break;
                }
                Ok(n) => {
                    // One clock reading per read call: every line in it arrived by now.
                    let now = self.now();
                    let end = keep + n;
                    let mut start = 0;
                    if self.conns[i].ws.is_some() {
                        match self.ws_received(i, &buf[..end], now) {
                            Ok(used) => start = used,
                            Err(e) => {
                                self.note_error(|| format!("client {i}: WebSocket: {e}"));
                                self.close(i);
                                break;
                            }
                        }
                        if self.conns[i].state != ConnState::Open {
                            break;
                        }
                    } else {
                        for nl in memchr::memchr_iter(b'\n', &buf[..end]) {
                            self.line(i, &buf[start..nl], now);
                            start = nl + 1;
                        }
                    }
                    let rest = &buf[start..end];
                    // (The WebSocket decoder refuses longer frames before they are complete.)
                    if rest.len() > MAX_PARTIAL + MAX_FRAME_HEADER {
                        self.note_error(|| format!("client {i}: line without newline"));
                        self.close(i);
                        break;
                    }
                    let conn = &mut self.conns[i];
                    conn.partial.extend_from_slice(rest);
                    if conn.partial.is_empty() && conn.partial.capacity() > 256 {
                        conn.partial = Vec::new();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let conn = &mut self.conns[i];
                    conn.partial.extend_from_slice(&buf[..keep]);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    self.conns[i].partial.extend_from_slice(&buf[..keep]);
                }
                Err(e) => {
                    self.note_error(|| format!("read: {e}"));
                    self.close(i);
                    break;
                }
            }
        }
        self.scratch = buf;
    }

    /// Handles bytes received on WebSocket connection `i` (what was left over from the last
    /// read, then what just came): the `101` answer first, then frames. Returns how many bytes
    /// were used; the rest is an incomplete response head or frame, kept for the next read.
    fn ws_received(&mut self, i: usize, data: &[u8], now: u64) -> Result<usize, String> {
        let Some(mut w) = self.conns[i].ws.take() else {
            return Ok(data.len());
        };
        let result = self.ws_frames(i, &mut w, data, now);
        if self.conns[i].state == ConnState::Open {
            self.conns[i].ws = Some(w);
        } else {
            self.ws_fragmented += w.decoder.fragmented;
        }
        result
    }

    fn ws_frames(
        &mut self,
        i: usize,
        w: &mut WsConn,
        data: &[u8],
        now: u64,
    ) -> Result<usize, String> {
        let mut start = 0;
        if !w.upgraded {
            let Some(head) = ws::check_response(data, &w.key)? else {
                return Ok(0);
            };
            w.upgraded = true;
            self.ws_upgraded += 1;
            start = head;
            let out = &mut self.conns[i].out;
            let at = out.len();
            let _ = write!(out, "b{}", self.first_name + i as u64);
            self.framing.finish(out, at);
        }
        let mut closing = w.closing;
        let used = w.decoder.decode(&data[start..], MAX_PARTIAL, |m| match m {
            ws::Received::Text(line) => self.line(i, line, now),
            ws::Received::Binary(n) => {
                self.note_error(|| format!("client {i}: a binary message of {n} bytes"));
            }
            ws::Received::Ping(payload) => {
                if !closing {
                    let mask = self.framing.rng.mask();
                    ws::write_frame(&mut self.conns[i].out, ws::OP_PONG, payload, mask);
                    self.ws_pings += 1;
                }
            }
            ws::Received::Pong => {}
            ws::Received::Close(code, reason) => {
                *self.ws_closes.entry(code.unwrap_or(1005)).or_insert(0) += 1;
                self.ws_first_close.get_or_insert_with(|| match code {
                    Some(c) => format!("{c} {}", String::from_utf8_lossy(reason)),
                    None => "no code".to_owned(),
                });
                if !closing {
                    // Echo the code, as RFC 6455 asks; the server then ends the connection.
                    let code = code.map(u16::to_be_bytes);
                    let payload: &[u8] = match &code {
                        Some(c) => c,
                        None => &[],
                    };
                    let mask = self.framing.rng.mask();
                    ws::write_frame(&mut self.conns[i].out, ws::OP_CLOSE, payload, mask);
                    closing = true;
                }
            }
        });
        w.closing = closing;
        self.ws_fragmented += std::mem::take(&mut w.decoder.fragmented);
        if !self.conns[i].out.is_empty() {
            self.flush(i);
        }
        Ok(start + used?)
    }

    /// Handles one received line (without its newline).
    fn line(&mut self, i: usize, line: &[u8], now: u64) {
        if let Some(rest) = line.strip_prefix(b"*** ") {
            if rest.starts_with(b"JOIN ") {
                self.joins += 1;
            } else if rest.starts_with(b"WELCOME ") {
                let conn = &mut self.conns[i];
                if !conn.seated {
                    conn.seated = true;
                    self.seated += 1;
                    self.last_seated_ns = now;
                }
            } else if rest.starts_with(b"ERR ") {
                self.note_error(|| String::from_utf8_lossy(line).into_owned());
            }
            return;
        }
        let first = self.first_name;
        match (parse_message(line), &mut self.fan) {
            (Some((s, seq, ts)), Some(f)) => match s.checked_sub(first) {
                Some(s) => f.deliver(i, s as usize, seq, ts, now),
                // A sender from outside this run (never sent by it).
                None => f.bogus += 1,
            },
            _ => self.other_lines += 1,
        }
    }

    fn close(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if conn.state == ConnState::Closed {
            return;
        }
        if let Some(mut s) = conn.stream.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        conn.tls = None;
        if let Some(w) = conn.ws.take() {
            self.ws_fragmented += w.decoder.fragmented;
        }
        conn.state = ConnState::Closed;
        conn.out = Vec::new();
        conn.partial = Vec::new();
        self.closed += 1;
        if let Some(f) = &mut self.fan {
            f.leave(i);
        }
    }

    fn open(&self) -> usize {
        self.conns
            .iter()
            .filter(|c| c.state == ConnState::Open)
            .count()
    }
}

/// `b<sender>: <seq> <ts>...` → (sender's name number, seq, ts).
fn parse_message(line: &[u8]) -> Option<(u64, u64, u64)> {
    let rest = line.strip_prefix(b"b")?;
    let (s, rest) = parse_u64(rest)?;
    let rest = rest.strip_prefix(b": ")?;
    let (seq, rest) = parse_u64(rest)?;
    let rest = rest.strip_prefix(b" ")?;
    let (ts, _) = parse_u64(rest)?;
    Some((s, seq, ts))
}

/// Leading decimal digits as a number, and what follows them.
fn parse_u64(b: &[u8]) -> Option<(u64, &[u8])> {
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let mut v = 0u64;
    for &c in &b[..digits] {
        v = v * 10 + u64::from(c - b'0');
    }
    Some((v, &b[digits..]))
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn round(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}

fn us(ns: u64) -> f64 {
    round(ns as f64 / 1e3, 1)
}

fn server_json(s: Option<procfs::Sample>) -> Value {
    match s {
        Some(s) => json!({"rss_kib": s.rss_kib, "rss_peak_kib": s.hwm_kib}),
        None => Value::Null,
    }
}

/// Join announcements a storm of `clients` joins delivers: each is told of everyone after it.
fn joins_in_storm(clients: usize) -> u64 {
    (clients as u64) * (clients as u64).saturating_sub(1) / 2
}

/// Joins everyone: connects (throttled, or at `rate` per second), waits until every client is
/// seated and has seen the join of everyone after it. Returns whether that completed.
fn join_all(e: &mut Engine, rate: f64, deadline: u64) -> bool {
    let clients = e.conns.len();
    let expected_joins = joins_in_storm(clients);
    let start = e.now();
    loop {
        let now = e.now();
        if rate > 0.0 {
            let due = (secs(now - start) * rate) as usize + 1;
            e.start_connects(due, false);
        } else {
            e.start_connects(clients, true);
        }
        if e.seated == clients && e.joins >= expected_joins {
            return true;
        }
        if now >= deadline || e.started == clients && e.open() + e.connecting == 0 {
            return false;
        }
        let wait = if e.started < clients && rate > 0.0 {
            Duration::from_millis(1)
        } else {
            Duration::from_millis(10)
        };
        e.step(wait);
    }
}

fn fanout(a: &FanoutArgs) -> Result<(Value, bool), String> {
    if a.clients < 2 || a.senders == 0 || a.senders > a.clients {
        return Err("need at least 2 clients and 1 to clients senders".into());
    }
    let load = procfs::loadavg();
    let mut e =
        Engine::new(a.common.addr.clone(), a.clients, a.senders).map_err(|e| e.to_string())?;
    e.tls = tls_config(&a.common)?;
    e.set_websocket(ws_config(&a.common)?);
    e.first_name = a.common.first_name;
    e.server_name = a.common.server_name.clone();
    e.sender_addr = a.common.sender_addr;
    e.fan = Some(Fanout::new(a.clients, a.senders, a.window, a.text_bytes));
    let deadline = e.now() + (a.common.timeout * 1e9) as u64;
    let joined = join_all(&mut e, 0.0, deadline);
    let setup_s = secs(e.now());
    let pid = &a.common.pid;
    let before = procfs::sample_all(pid);
    let own_before = procfs::own_cpu();
    let ticks_before = procfs::cpu_ticks();

    let mut timed_out = !joined;
    if joined {
        let send_start = e.now();
        let send_end = send_start + (a.duration * 1e9) as u64;
        let interval = if a.rate > 0.0 {
            (1e9 / a.rate) as u64
        } else {
            0
        };
        // Fixed-rate senders start staggered across one interval so they do not send in step.
        let mut due: Vec<u64> = (0..a.senders)
            .map(|s| send_start + interval * s as u64 / a.senders as u64)
            .collect();
        loop {
            let now = e.now();
            if now >= send_end.min(deadline) {
                timed_out = now >= deadline;
                break;
            }
            let wait = if interval > 0 {
                send_due(&mut e, &mut due, interval, now);
                let next = due.iter().copied().min().unwrap_or(now);
                Duration::from_nanos(next.saturating_sub(now).min(10_000_000))
            } else {
                send_round(&mut e, now);
                Duration::from_millis(10)
            };
            e.step(wait);
        }
        // Drain: no new messages; wait until every live client has everything, or give up.
        let drain_end = (e.now() + (a.drain * 1e9) as u64).min(deadline);
        loop {
            for s in 0..a.senders {
                e.flush(s);
            }
            let pending = (0..a.senders).any(|s| !e.conns[s].out.is_empty());
            let f = e.fan.as_ref().ok_or("no fan-out state")?;
            if !pending && f.min_progress >= f.sent_total {
                break;
            }
            if e.now() >= drain_end {
                break;
            }
            e.step(Duration::from_millis(5));
        }
    }
    let after = procfs::sample_all(pid);
    let own_cpu = (procfs::own_cpu() - own_before).as_secs_f64();
    let steal = procfs::steal_pct(ticks_before, procfs::cpu_ticks());
    let f = e.fan.as_ref().ok_or("no fan-out state")?;
    let first = f.first_send_ns.unwrap_or(0);
    let elapsed = secs(f.last_delivery_ns.saturating_sub(first));
    let per_s = if elapsed > 0.0 {
        f.unique as f64 / elapsed
    } else {
        0.0
    };
    let server = match (before, after) {
        (Some(b), Some(x)) => {
            let cpu = (x.cpu.saturating_sub(b.cpu)).as_secs_f64();
            json!({
                "pid": pid,
                "cpu_s": round(cpu, 2),
                "deliveries_per_cpu_s": if cpu > 0.0 { (f.unique as f64 / cpu).round() } else { 0.0 },
                "rss_kib": x.rss_kib,
                "rss_peak_kib": x.hwm_kib,
            })
        }
        _ => Value::Null,
    };
    let lost = f.expected().saturating_sub(f.unique);
    let report = json!({
        "bench": "chat-bench",
        "mode": "fanout",
        "label": a.common.label,
        "tls": e.tls.is_some(),
        "transport": e.transport(),
        "clients": a.clients,
        "senders": a.senders,
        "rate_per_sender": a.rate,
        "window": a.window,
        "duration_s": a.duration,
        "text_bytes": a.text_bytes,
        "setup_s": round(setup_s, 3),
        "seated": e.seated,
        "sent": f.sent_total,
        "expected_deliveries": f.expected(),
        "deliveries": f.unique,
        "elapsed_s": round(elapsed, 4),
        "deliveries_per_s": per_s.round(),
        "lost": lost,
        "duplicated": f.duplicated,
        "reordered": f.reordered,
        "orders_seen": f.orders(),
        "bogus": f.bogus,
        "disconnected": e.closed,
        "errors": e.errors,
        "first_error": e.first_error,
        "other_lines": e.other_lines,
        "websocket": e.ws_json(),
        "latency_us": {
            "samples": f.hist.count(),
            "p50": us(f.hist.quantile(0.5)),
            "p99": us(f.hist.quantile(0.99)),
            "p999": us(f.hist.quantile(0.999)),
            "max": us(f.hist.max()),
        },
        "server": server,
        "loadgen_cpu_s": round(own_cpu, 2),
        "loadavg_1m_at_start": load,
        "steal_pct": steal,
        "timed_out": timed_out,
    });
    // A run only succeeds when every client kept up and got every message exactly once, in order.
    let clean = lost == 0
        && f.duplicated == 0
        && f.reordered == 0
        && f.orders() <= 1
        && f.bogus == 0
        && e.closed == 0
        && e.errors == 0;
    Ok((report, !timed_out && clean))
}

/// As-fast-as-possible mode: shares the current window among the senders, each writing its
/// share in one call.
fn send_round(e: &mut Engine, now: u64) {
    let Some(f) = e.fan.as_mut() else {
        return;
    };
    let mut left = f.budget().min(1 << 20);
    if left == 0 {
        return;
    }
    let senders = f.senders;
    let share = left.div_ceil(senders as u64);
    let first = f.round_robin;
    f.round_robin = (first + 1) % senders;
    for k in 0..senders {
        let s = (first + k) % senders;
        let conn = &mut e.conns[s];
        if left == 0 {
            break;
        }
        if conn.state != ConnState::Open || !conn.out.is_empty() {
            continue;
        }
        let n = share.min(left);
        for _ in 0..n {
            f.encode(s, now, &mut conn.out, &mut e.framing);
        }
        left -= n;
    }
    for s in 0..senders {
        e.flush(s);
    }
}

/// Fixed-rate mode: every sender sends the messages that are due (the window still applies).
fn send_due(e: &mut Engine, due: &mut [u64], interval: u64, now: u64) {
    let Some(f) = e.fan.as_mut() else {
        return;
    };
    for (s, next) in due.iter_mut().enumerate() {
        let conn = &mut e.conns[s];
        if conn.state != ConnState::Open {
            continue;
        }
        while *next <= now && f.budget() > 0 {
            f.encode(s, now, &mut conn.out, &mut e.framing);
            *next += interval;
        }
    }
    for s in 0..due.len() {
        e.flush(s);
    }
}

fn idle(a: &IdleArgs) -> Result<(Value, bool), String> {
    if a.clients == 0 || a.join_rate <= 0.0 {
        return Err("need at least 1 client and a positive --join-rate".into());
    }
    let load = procfs::loadavg();
    let pid = &a.common.pid;
    let before = procfs::sample_all(pid);
    let ticks_before = procfs::cpu_ticks();
    let mut e = Engine::new(a.common.addr.clone(), a.clients, 0).map_err(|e| e.to_string())?;
    e.tls = tls_config(&a.common)?;
    e.set_websocket(ws_config(&a.common)?);
    e.first_name = a.common.first_name;
    e.server_name = a.common.server_name.clone();
    let deadline = e.now() + (a.common.timeout * 1e9) as u64;
    let start = e.now();
    let drained = join_all(&mut e, a.join_rate, deadline);
    let drained_at = e.now();
    let storm = procfs::sample_all(pid);
    // Let the server settle (freed queues, idle writers) before its memory is read.
    let settle_end = (e.now() + (a.settle * 1e9) as u64).min(deadline);
    while e.now() < settle_end {
        e.step(Duration::from_millis(20));
    }
    let idle_sample = procfs::sample_all(pid);
    let steal = procfs::steal_pct(ticks_before, procfs::cpu_ticks());
    let hold_end = (e.now() + (a.hold * 1e9) as u64).min(deadline);
    while e.now() < hold_end {
        e.step(Duration::from_millis(20));
    }
    let still_open = e.open();
    let expected_joins = joins_in_storm(a.clients);
    let server = match (before, idle_sample) {
        (Some(b), Some(x)) => {
            let grown = x.rss_kib.saturating_sub(b.rss_kib) * 1024;
            json!({
                "pid": pid,
                "rss_kib_before": b.rss_kib,
                "rss_kib_idle": x.rss_kib,
                "rss_per_conn_bytes": (grown as f64 / a.clients as f64).round(),
                "rss_peak_kib": x.hwm_kib,
                "cpu_s_join_storm": storm.map(|s| round(s.cpu.saturating_sub(b.cpu).as_secs_f64(), 2)),
            })
        }
        _ => server_json(idle_sample),
    };
    let report = json!({
        "bench": "chat-bench",
        "mode": "idle",
        "label": a.common.label,
        "tls": e.tls.is_some(),
        "transport": e.transport(),
        "clients": a.clients,
        "join_rate": a.join_rate,
        "seated": e.seated,
        "all_seated_s": round(secs(e.last_seated_ns.saturating_sub(start)), 3),
        "joins_expected": expected_joins,
        "joins_received": e.joins,
        "drained_s": if drained { Some(round(secs(drained_at - start), 3)) } else { None },
        "still_open": still_open,
        "disconnected": e.closed,
        "connect_failed": e.connect_failed,
        "errors": e.errors,
        "first_error": e.first_error,
        "websocket": e.ws_json(),
        "server": server,
        "loadgen_cpu_s": round(procfs::own_cpu().as_secs_f64(), 2),
        "loadavg_1m_at_start": load,
        "steal_pct": steal,
        "timed_out": !drained,
    });
    Ok((report, drained && still_open == a.clients))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines() -> Framing {
        Framing {
            websocket: false,
            rng: ws::Rng::seeded(),
        }
    }

    #[test]
    fn parses_message_lines() {
        assert_eq!(parse_message(b"b12: 345 678....."), Some((12, 345, 678)));
        assert_eq!(parse_message(b"b12: 345"), None);
        assert_eq!(parse_message(b"x12: 3 4"), None);
        assert_eq!(parse_message(b"b1 (private): 3 4"), None);
    }

    #[test]
    fn detects_loss_duplicates_and_reordering() {
        let mut f = Fanout::new(3, 1, 0, 0);
        let mut out = Vec::new();
        for _ in 0..5 {
            f.encode(0, 1, &mut out, &mut lines());
        }
        // Client 1 gets 0, 2, 1 (reordered), 2 again (duplicate); 3 and 4 are lost.
        for seq in [0, 2, 1, 2] {
            f.deliver(1, 0, seq, 1, 10);
        }
        // Client 2 gets everything in order.
        for seq in 0..5 {
            f.deliver(2, 0, seq, 1, 10);
        }
        assert_eq!(f.unique, 8);
        assert_eq!(f.duplicated, 1);
        assert_eq!(f.reordered, 1);
        assert_eq!(f.expected() - f.unique, 2);
        // Its own message, or one never sent, is bogus.
        f.deliver(0, 0, 0, 1, 10);
        f.deliver(1, 0, 99, 1, 10);
        assert_eq!(f.bogus, 2);
    }

    #[test]
    fn receivers_that_disagree_on_order_are_counted() {
        // Senders 0 and 1; receivers 2 and 3, who get the two messages in `orders`.
        let seen = |orders: [[usize; 2]; 2]| {
            let mut f = Fanout::new(4, 2, 0, 32);
            f.sent = vec![1, 1];
            for (r, order) in (2..).zip(orders) {
                for s in order {
                    f.deliver(r, s, 0, 1, 10);
                }
            }
            f.orders()
        };
        assert_eq!(seen([[0, 1], [0, 1]]), 1);
        assert_eq!(seen([[0, 1], [1, 0]]), 2);
    }

    #[test]
    fn window_tracks_the_slowest_live_client() {
        let mut f = Fanout::new(3, 1, 4, 0);
        let mut out = Vec::new();
        assert_eq!(f.budget(), 4);
        for _ in 0..4 {
            f.encode(0, 1, &mut out, &mut lines());
        }
        assert_eq!(f.budget(), 0);
        for seq in 0..4 {
            f.deliver(1, 0, seq, 1, 2);
        }
        assert_eq!(f.budget(), 0, "client 2 is still 4 behind");
        f.deliver(2, 0, 0, 1, 2);
        assert_eq!(f.budget(), 1);
        f.leave(2);
        assert_eq!(f.budget(), 4);
    }

    #[test]
    fn websocket_messages_are_masked_text_frames_without_newline() {
        let mut f = Fanout::new(3, 1, 0, 32);
        let mut framing = Framing {
            websocket: true,
            rng: ws::Rng::seeded(),
        };
        let mut out = Vec::new();
        f.encode(0, 7, &mut out, &mut framing);
        f.encode(0, 8, &mut out, &mut framing);
        let mut payloads = Vec::new();
        let mut rest = &out[..];
        while let [b0, b1, m0, m1, m2, m3, tail @ ..] = rest {
            assert_eq!(*b0, 0x81, "final text frame");
            assert!(b1 & 0x80 != 0, "masked");
            let len = usize::from(b1 & 0x7F);
            let mask = [*m0, *m1, *m2, *m3];
            let p: Vec<u8> = tail[..len]
                .iter()
                .enumerate()
                .map(|(k, b)| b ^ mask[k & 3])
                .collect();
            payloads.push(String::from_utf8(p).expect("text"));
            rest = &tail[len..];
        }
        assert!(rest.is_empty());
        assert_eq!(
            payloads,
            [
                format!("0 7{}", ".".repeat(29)),
                format!("1 8{}", ".".repeat(29))
            ]
        );
    }

    /// Reads one masked client frame with a payload under 126 bytes: (first byte, payload).
    fn read_client_frame(s: &mut std::net::TcpStream) -> (u8, Vec<u8>) {
        let mut h = [0u8; 6];
        s.read_exact(&mut h).expect("frame header");
        assert!(h[1] & 0x80 != 0, "client frames are masked");
        let mut p = vec![0u8; usize::from(h[1] & 0x7F)];
        s.read_exact(&mut p).expect("frame payload");
        for (k, b) in p.iter_mut().enumerate() {
            *b ^= h[2 + (k & 3)];
        }
        (h[0], p)
    }

    /// The whole client side against a scripted server: the upgrade (key, Origin), a frame
    /// split over two writes, a fragmented welcome with a ping between its fragments (answered
    /// with a pong), then a close frame with code 4000 (echoed, counted and reported).
    #[test]
    fn websocket_client_against_a_scripted_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let expected_origin = format!("Origin: http://{addr}\r\n");
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).expect("request");
                head.push(byte[0]);
            }
            let head = String::from_utf8(head).expect("ascii request");
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .expect("a key")
                .to_owned();
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                ws::accept_for(&key)
            );
            let hello = b"\x81\x0b*** HELLO x";
            let mut first = answer.into_bytes();
            first.extend_from_slice(&hello[..3]);
            s.write_all(&first).expect("write");
            std::thread::sleep(Duration::from_millis(50));
            s.write_all(&hello[3..]).expect("write");
            let (op, name) = read_client_frame(&mut s);
            assert_eq!((op, &name[..]), (0x81, &b"b0"[..]));
            let mut welcome = b"\x01\x16*** WELCOME b0 you are".to_vec();
            welcome.extend_from_slice(b"\x89\x02p1");
            welcome.extend_from_slice(b"\x80\x0f chatting as b0");
            s.write_all(&welcome).expect("write");
            let (op, pong) = read_client_frame(&mut s);
            assert_eq!((op, &pong[..]), (0x8A, &b"p1"[..]));
            s.write_all(b"\x88\x08\x0f\xa0kicked").expect("write");
            let (op, close) = read_client_frame(&mut s);
            assert_eq!((op, &close[..]), (0x88, &[0x0f, 0xa0][..]));
            head
        });
        let cli = Cli::try_parse_from([
            "chat-bench",
            "idle",
            "--addr",
            &addr,
            "--websocket",
            "-c",
            "1",
            "--settle",
            "0.1",
            "--hold",
            "0.5",
            "--timeout",
            "10",
        ])
        .expect("arguments");
        let Mode::Idle(a) = cli.mode else {
            panic!("idle mode");
        };
        let (r, complete) = idle(&a).expect("runs");
        let head = server.join().expect("the server's checks pass");
        assert!(
            head.starts_with(&format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\n")),
            "{head}"
        );
        assert!(head.contains(&expected_origin), "{head}");
        assert!(!complete, "the server closed the connection: {r}");
        assert_eq!(r["transport"], "ws");
        assert_eq!(r["seated"], 1, "{r}");
        assert_eq!(r["disconnected"], 1, "{r}");
        assert_eq!(r["websocket"]["upgraded"], 1, "{r}");
        assert_eq!(r["errors"], 0, "{r}");
        let w = &r["websocket"];
        assert_eq!(w["pings_answered"], 1, "{r}");
        assert_eq!(w["fragmented_messages"], 1, "{r}");
        assert_eq!(w["close_frames"]["4000"], 1, "{r}");
        assert_eq!(w["first_close"], "4000 kicked", "{r}");
    }

    #[test]
    fn websocket_refusal_is_reported_with_the_reason() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 10\r\n\r\nbad Origin");
        });
        let cli = Cli::try_parse_from([
            "chat-bench",
            "idle",
            "--addr",
            &addr,
            "--websocket",
            "--origin",
            "http://evil",
            "-c",
            "1",
            "--settle",
            "0",
            "--hold",
            "0",
            "--timeout",
            "10",
        ])
        .expect("arguments");
        let Mode::Idle(a) = cli.mode else {
            panic!("idle mode");
        };
        let (r, complete) = idle(&a).expect("runs");
        server.join().expect("server");
        assert!(!complete);
        assert_eq!(r["seated"], 0, "{r}");
        assert_eq!(
            r["first_error"],
            "client 0: WebSocket: upgrade refused: HTTP/1.1 403 Forbidden: bad Origin",
            "{r}"
        );
    }
}
