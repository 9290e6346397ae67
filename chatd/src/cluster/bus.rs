//! `bus`: joins several chatd nodes into one chat room through NATS JetStream.
//!
//! One room = one JetStream stream (`CHAT_<room>`, subject `chat.<room>.events`) that gives every
//! message a single, total order (its stream sequence), plus three KV buckets:
//!
//! * `chat_<room>_names`: nickname registry. `create` is atomic, so claiming a name is a race with
//!   exactly one winner; a release deletes only if the revision is still ours.
//! * `chat_<room>_nodes`: node leases. Each node `put`s its own key periodically; the bucket's
//!   `max_age` eventually removes dead nodes' keys, but NATS 2.9 sends **no watch event on
//!   expiry**, so readers age entries themselves from their timestamps (`live_nodes`).
//! * `chat_<room>_bans`: ban list, put/delete/list/watch.
//!
//! Written against async-nats 0.52 and Debian's nats-server 2.9.10. On 2.9,
//! `Context::create_key_value` fails (account-info parse error), so buckets are created by
//! creating their `KV_<bucket>` stream by hand and then opening them with `get_key_value`.
//!
//! Delivery: `subscribe_from` drives a durable, replicated pull consumer (ack none) and checks
//! the consumer sequence of every delivery, like an "ordered consumer" but under our control.
//! Anything at or below the last applied sequence is dropped, so the caller sees each stream
//! message exactly once and in order. When a NATS server dies, three things keep the room
//! moving (docs/cluster.md, "Failures"):
//!
//! * a pull whose heartbeat stops (its consumer's leader died with it) or that no leader takes
//!   is issued again on the same consumer ("resuming the pull"), so the consumer delivers as
//!   soon as its new leader is elected;
//! * whenever the consumer has been quiet for `watchdog_idle` (nothing delivered; errors the
//!   pull recovers from by itself do not count), the stream's messages after the
//!   last applied one are read directly by sequence, which any replica answers without a
//!   leader ("resuming from a replica directly"), or, when the replicas have nothing, from the
//!   stream's leader if its last sequence is beyond ("resuming from the stream's leader"): a
//!   lagging replica must not hide what the stream has; a consumer-sequence gap (deliveries
//!   lost with a dying server) is filled from the replicas the same way;
//! * a consumer that stays behind for `watchdog_checks` such rounds, a gap that cannot be
//!   filled, or a consumer error, replaces the consumer with a new one at `last applied + 1`
//!   ("recreating").
//!
//! Publishing: every message carries a `Nats-Msg-Id`; retries reuse it, so the stream's
//! duplicate window (default 2 min) stores it only once even if the first attempt had in fact
//! been stored before its ack was lost.

use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self, consumer, context::PublishErrorKind, kv, message::PublishMessage as Publish, stream,
};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

pub use async_nats::jetstream::kv::Operation;

/// How long one event is retried before its sender is told it was not delivered.
pub const PUBLISH_DEADLINE: Duration = Duration::from_secs(10);

/// Longest a bucket listing waits for its next entry.
const LIST_IDLE: Duration = Duration::from_secs(5);

/// How long the client waits, after the last thing its server sent, before it pings. The
/// client gives a connection up when a third ping is due with two unanswered, so a server that
/// hangs, or a link that goes silent without a reset, is left for another server after about
/// three of these (async-nats's default, 60 s, made that three minutes, all the while the
/// node's users waited). It must also be well inside `cluster.node-timeout` (10 s is the
/// smallest safe one): while this node's link is silent its lease is not refreshed, and at
/// 3 s (9 s to notice) the other nodes took a node whose server hung for gone. A live server is
/// never quiet that long: the pull's heartbeat arrives every second, and a ping is answered at
/// once.
const PING_INTERVAL: Duration = Duration::from_millis(1500);

/// An in-flight publish's acknowledgement: the stream sequence, or why there is none.
pub type AckFuture = Pin<Box<dyn std::future::Future<Output = Result<u64>> + Send>>;

/// Errors of the bus. Every variant carries enough text to be logged as is.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Connecting (or reading the credentials file) failed.
    #[error("nats connect: {0}")]
    Connect(String),
    /// Stream / bucket setup did not succeed within the setup timeout.
    #[error("setting up {what} failed after {elapsed:?}: {last}")]
    Setup {
        /// The stream or bucket.
        what: String,
        /// How long it was tried.
        elapsed: Duration,
        /// The last attempt's error.
        last: String,
    },
    /// A publish was retried (same Nats-Msg-Id) until its deadline and never acknowledged.
    /// The message may or may not be in the stream (if it is, it is there exactly once).
    #[error("publish {msg_id} not acknowledged after {attempts} attempts in {elapsed:?}: {last}")]
    PublishFailed {
        /// The message id.
        msg_id: String,
        /// Attempts made.
        attempts: u32,
        /// How long it was tried.
        elapsed: Duration,
        /// The last attempt's error.
        last: String,
    },
    /// A publish that retrying cannot fix (payload too large, ...).
    #[error("publish {msg_id} rejected: {reason}")]
    PublishRejected {
        /// The message id.
        msg_id: String,
        /// What the server said.
        reason: String,
    },
    /// `claim_name`: somebody else holds the key.
    #[error("name {0:?} is taken")]
    Taken(String),
    /// Any other JetStream / KV failure.
    #[error("{op}: {err}")]
    Nats {
        /// What was being done.
        op: &'static str,
        /// What went wrong.
        err: String,
    },
}

fn nerr(op: &'static str, e: impl std::fmt::Display) -> BusError {
    BusError::Nats {
        op,
        err: e.to_string(),
    }
}

/// The bus's results.
pub type Result<T, E = BusError> = std::result::Result<T, E>;

/// Tunables. `BusConfig::new` gives the defaults used by `Bus::connect`.
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// NATS servers of one cluster.
    pub servers: Vec<String>,
    /// A credentials file, if any.
    pub credentials: Option<std::path::PathBuf>,
    /// Room name: `[A-Za-z0-9-]+` (it becomes part of stream and subject names).
    pub room: String,
    /// This node's name (connection name, log lines).
    pub node: String,
    /// Stream / bucket replicas (1 for a single server, 3 for a 3-server cluster).
    pub replicas: usize,
    /// Limits of the chat stream (oldest messages are discarded beyond them).
    pub max_msgs: i64,
    /// Bytes the chat stream keeps at most.
    pub max_bytes: i64,
    /// De-duplication window of the chat stream (how long a retried Msg-Id is recognised).
    pub duplicate_window: Duration,
    /// `max_age` of the node lease bucket: unrefreshed leases vanish after this.
    pub lease_max_age: Duration,
    /// How long `connect` keeps trying to create/open the stream and buckets
    /// (the server may still be starting, or a cluster still electing its meta leader).
    pub setup_timeout: Duration,
    /// Total time `publish` keeps retrying one message.
    pub publish_timeout: Duration,
    /// Time one publish attempt waits for its ack before retrying with the same Msg-Id.
    pub publish_attempt_timeout: Duration,
    /// Max publish acks in flight on this connection (publishers wait beyond it).
    pub max_ack_inflight: usize,
    /// Subscriber: how long the consumer may deliver nothing before the stream is read
    /// directly for what it may be holding back (one idle round).
    pub watchdog_idle: Duration,
    /// Consecutive idle rounds that found messages the consumer had not delivered before the
    /// consumer is recreated (meanwhile the room follows the stream by direct reads).
    pub watchdog_checks: u32,
    /// Durable (replicated) subscriber consumers instead of R1 ephemeral ones: after a
    /// fail-over a durable consumer comes back by itself, while creating a new ephemeral one
    /// needs the meta leader and was seen to time out for 5-30 s.
    pub sub_durable: bool,
}

impl BusConfig {
    /// The defaults for a room on `servers`.
    pub fn new(servers: &[String], room: &str, node: &str, replicas: usize) -> Self {
        BusConfig {
            servers: servers.to_vec(),
            credentials: None,
            room: room.to_string(),
            node: node.to_string(),
            replicas: replicas.max(1),
            max_msgs: 1_000_000,
            max_bytes: 1 << 30,
            duplicate_window: Duration::from_secs(120),
            lease_max_age: Duration::from_secs(60),
            setup_timeout: Duration::from_secs(5),
            publish_timeout: PUBLISH_DEADLINE,
            publish_attempt_timeout: Duration::from_secs(2),
            max_ack_inflight: 20_000,
            watchdog_idle: Duration::from_secs(1),
            watchdog_checks: 5,
            sub_durable: true,
        }
    }
}

/// Connection state as seen by this client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnState {
    /// Connected to a server now.
    pub connected: bool,
    /// `host:port` of the server this connection talks to (from its INFO), when connected.
    pub server: Option<String>,
    /// Server name (`-n`) of that server, when connected.
    pub server_name: Option<String>,
    /// Number of `Connected` events seen (1 after the first connect, +1 per reconnect).
    pub connects: u64,
}

/// A message delivered by `subscribe_from` / `history`.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// Stream sequence: the room's global order.
    pub seq: u64,
    /// The message.
    pub payload: Bytes,
}

impl From<async_nats::jetstream::message::StreamMessage> for Delivered {
    fn from(m: async_nats::jetstream::message::StreamMessage) -> Delivered {
        Delivered {
            seq: m.sequence,
            payload: m.payload,
        }
    }
}

/// The chat-room bus. Cheap to clone (all handles are shared).
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    /// Keeps the connection state current; stops when the last clone of the bus is dropped.
    _state_task: Arc<AbortOnDrop>,
    js: jetstream::Context,
    stream: stream::Stream,
    subject: String,
    names: kv::Store,
    nodes: kv::Store,
    bans: kv::Store,
    cfg: Arc<BusConfig>,
    state: watch::Receiver<ConnState>,
}

/// What a credentials file holds, by its content: a NATS `.creds` file (a user JWT and its
/// nkey seed), one line `user:password`, or one line that is a token.
#[derive(Debug, PartialEq, Eq)]
enum Credentials {
    Creds(String),
    UserPassword(String, String),
    Token(String),
}

impl Credentials {
    fn parse(text: &str) -> Option<Credentials> {
        if text.contains("-----BEGIN NATS USER JWT-----") {
            return Some(Credentials::Creds(text.to_owned()));
        }
        let line = text.trim();
        if line.is_empty() || line.contains('\n') {
            return None;
        }
        Some(match line.split_once(':') {
            Some((user, pass)) if !user.is_empty() => {
                Credentials::UserPassword(user.to_owned(), pass.to_owned())
            }
            _ => Credentials::Token(line.to_owned()),
        })
    }
}

/// Connect options carrying the credentials in `path` (never logged: only the path is).
fn credentials(path: &Path) -> Result<async_nats::ConnectOptions> {
    let bad = |why: String| BusError::Connect(format!("credentials {}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    match Credentials::parse(&text) {
        Some(Credentials::Creds(c)) => {
            async_nats::ConnectOptions::with_credentials(&c).map_err(|e| bad(e.to_string()))
        }
        Some(Credentials::UserPassword(u, p)) => {
            Ok(async_nats::ConnectOptions::with_user_and_password(u, p))
        }
        Some(Credentials::Token(t)) => Ok(async_nats::ConnectOptions::with_token(t)),
        None => Err(bad(
            "expected a .creds file, one line user:password, or one line token".to_owned(),
        )),
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Bus {
    /// Connects and makes sure the room's stream and buckets exist (see module docs).
    ///
    /// The connection is made with `retry_on_initial_connect` and unlimited reconnects, so this
    /// may be called before NATS is up: it then waits (up to `setup_timeout`, 5 s by default,
    /// for the stream and the buckets together) for the server and for JetStream (a cluster's
    /// meta leader) before giving up; the caller says why and tries again.
    pub async fn connect(
        servers: &[String],
        credentials: Option<&Path>,
        name: &str,
        node: &str,
        replicas: usize,
    ) -> Result<Bus> {
        let mut cfg = BusConfig::new(servers, name, node, replicas);
        cfg.credentials = credentials.map(|p| p.to_path_buf());
        Bus::connect_with(cfg).await
    }

    /// `connect` with every tunable exposed.
    pub async fn connect_with(cfg: BusConfig) -> Result<Bus> {
        let room = cfg.room.clone();
        // The same rule as the config's `cluster.name` (config::is_cluster_token).
        if !crate::config::is_cluster_token(&room) {
            return Err(BusError::Connect(format!(
                "room name {room:?} must be [A-Za-z0-9_-]+"
            )));
        }
        let (state_tx, state_rx) = watch::channel(ConnState {
            connected: false,
            server: None,
            server_name: None,
            connects: 0,
        });
        let state_tx = Arc::new(state_tx);
        // The event callback fires on the client's own task; it only records the event. The
        // server address is filled in below, from a task that holds the client.
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<async_nats::Event>();
        let mut opts = match &cfg.credentials {
            Some(p) => credentials(p)?,
            None => async_nats::ConnectOptions::new(),
        };
        opts = opts
            .name(format!("chatd-{}-{}", cfg.room, cfg.node))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(PING_INTERVAL)
            // Bound the back-off between reconnect attempts (default grows to 4 s+).
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(1000))
            })
            .event_callback(move |ev| {
                let ev_tx = ev_tx.clone();
                async move {
                    let _ = ev_tx.send(ev);
                }
            });
        let client = opts
            .connect(cfg.servers.clone())
            .await
            .map_err(|e| BusError::Connect(e.to_string()))?;
        // The task holds a client handle; it must end with the bus (or with a failed setup),
        // or every retried connect would leave a client reconnecting forever.
        let state_task = {
            let client = client.clone();
            let state_tx = state_tx.clone();
            let node = cfg.node.clone();
            AbortOnDrop(tokio::spawn(async move {
                // The connection whose server's INFO was read last (a server's id for it).
                let mut read_for = None;
                // Also poll once in case the first Connected event raced the subscription.
                loop {
                    let ev = tokio::time::timeout(Duration::from_secs(1), ev_rx.recv()).await;
                    let ev = match ev {
                        Ok(None) => break,
                        Ok(Some(ev)) => Some(ev),
                        Err(_) => None,
                    };
                    if matches!(ev, Some(async_nats::Event::Connected)) {
                        // async-nats reports a reconnection before it stores the new server's
                        // INFO: wait (briefly) for the new connection's, or the status and the
                        // "back" notice would name the server just left.
                        let deadline = Instant::now() + Duration::from_secs(1);
                        while read_for == Some(client.server_info().client_id)
                            && Instant::now() < deadline
                        {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    let connected = matches!(
                        client.connection_state(),
                        async_nats::connection::State::Connected
                    );
                    let info = client.server_info();
                    read_for = Some(info.client_id);
                    state_tx.send_modify(|s| {
                        if matches!(ev, Some(async_nats::Event::Connected)) {
                            s.connects += 1;
                        }
                        s.connected = connected;
                        if connected && !info.host.is_empty() {
                            s.server = Some(format!("{}:{}", info.host, info.port));
                            s.server_name = Some(info.server_name.clone());
                        } else if !connected {
                            s.server = None;
                            s.server_name = None;
                        }
                    });
                    if let Some(ev) = ev {
                        info!(node = %node, server = ?state_tx.borrow().server, "nats event: {ev}");
                    }
                }
            }))
        };

        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .max_ack_inflight(cfg.max_ack_inflight)
            .backpressure_on_inflight(true)
            .build(client.clone());

        let deadline = Instant::now() + cfg.setup_timeout;
        let subject = format!("chat.{}.events", cfg.room);
        let stream_cfg = stream::Config {
            name: format!("CHAT_{}", cfg.room),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_messages: cfg.max_msgs,
            max_bytes: cfg.max_bytes,
            duplicate_window: cfg.duplicate_window,
            num_replicas: cfg.replicas,
            allow_direct: true,
            ..Default::default()
        };
        let stream = ensure_stream(&js, stream_cfg, deadline).await?;
        let names = ensure_kv(
            &js,
            &format!("chat_{}_names", cfg.room),
            1,
            Duration::ZERO,
            &cfg,
            deadline,
        )
        .await?;
        let nodes = ensure_kv(
            &js,
            &format!("chat_{}_nodes", cfg.room),
            1,
            cfg.lease_max_age,
            &cfg,
            deadline,
        )
        .await?;
        let bans = ensure_kv(
            &js,
            &format!("chat_{}_bans", cfg.room),
            1,
            Duration::ZERO,
            &cfg,
            deadline,
        )
        .await?;
        info!(room = %cfg.room, node = %cfg.node, "bus ready");
        Ok(Bus {
            client,
            _state_task: Arc::new(state_task),
            js,
            stream,
            subject,
            names,
            nodes,
            bans,
            cfg: Arc::new(cfg),
            state: state_rx,
        })
    }

    /// True while the client has a live connection to a server.
    pub fn is_connected(&self) -> bool {
        matches!(
            self.client.connection_state(),
            async_nats::connection::State::Connected
        )
    }

    /// Current connection state (connected? to which server?).
    pub fn state(&self) -> ConnState {
        let mut s = self.state.borrow().clone();
        // The callback-driven view can lag by a moment; the client's own flag is authoritative.
        s.connected = matches!(
            self.client.connection_state(),
            async_nats::connection::State::Connected
        );
        s
    }

    /// Watch connection state changes (updated from async-nats' event callback).
    pub fn state_watch(&self) -> watch::Receiver<ConnState> {
        self.state.clone()
    }

    /// Current stream state (first/last sequence, message count, cluster leader).
    pub async fn stream_info(&self) -> Result<stream::Info> {
        self.stream
            .get_info()
            .await
            .map_err(|e| nerr("stream info", e))
    }

    /// Last sequence of the room stream (0 when empty).
    pub async fn last_seq(&self) -> Result<u64> {
        Ok(self.stream_info().await?.state.last_sequence)
    }

    // ------------------------------------------------------------------ publish

    /// Publishes one room event and returns its stream sequence.
    ///
    /// On `PublishFailed` the outcome is unknown: a copy the client buffered while disconnected
    /// may still be delivered at reconnect (stored once thanks to the Msg-Id). Re-publishing the
    /// same id within `duplicate_window` is always safe.
    ///
    /// Retries (no responders / stream not found during a leader election, ack time-outs,
    /// broken pipe while reconnecting, JetStream 503s) with the **same** `msg_id`, so the stream
    /// keeps it once. Gives up after `publish_timeout` (10 s) with `BusError::PublishFailed`.
    /// If the msg id was already stored (a retry whose first attempt got in), returns the
    /// sequence of the stored copy.
    pub async fn publish(&self, payload: Bytes, msg_id: String) -> Result<u64> {
        self.publish_until(payload, msg_id, Instant::now() + self.cfg.publish_timeout)
            .await
    }

    async fn publish_until(
        &self,
        payload: Bytes,
        msg_id: String,
        deadline: Instant,
    ) -> Result<u64> {
        let start = Instant::now();
        let mut attempts = 0u32;
        let mut last = String::from("deadline reached before the first attempt");
        let mut backoff = Duration::from_millis(50);
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(BusError::PublishFailed {
                    msg_id,
                    attempts,
                    elapsed: start.elapsed(),
                    last,
                });
            }
            // While disconnected, do not queue more copies into the client's reconnect buffer
            // (they would all be flushed at reconnect): wait for the connection instead.
            if !self.is_connected() {
                let since = Instant::now();
                while !self.is_connected() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if !self.is_connected() {
                    last = format!("not connected to NATS (waited {:?})", since.elapsed());
                    continue;
                }
            }
            attempts += 1;
            let attempt_timeout = self.cfg.publish_attempt_timeout.min(deadline - now);
            let msg = Publish::build()
                .payload(payload.clone())
                .message_id(&msg_id);
            let res = tokio::time::timeout(attempt_timeout, async {
                self.js.send_publish(self.subject.clone(), msg).await?.await
            })
            .await;
            match res {
                Ok(Ok(ack)) => {
                    if attempts > 1 || ack.duplicate {
                        debug!(%msg_id, attempts, dup = ack.duplicate, seq = ack.sequence, "publish acked after retry");
                    }
                    return Ok(ack.sequence);
                }
                Ok(Err(e)) => {
                    match e.kind() {
                        PublishErrorKind::MaxPayloadExceeded
                        | PublishErrorKind::WrongLastMessageId
                        | PublishErrorKind::WrongLastSequence => {
                            return Err(BusError::PublishRejected {
                                msg_id,
                                reason: e.to_string(),
                            });
                        }
                        _ => {}
                    }
                    last = format!("{e:?}: {e}");
                }
                Err(_) => last = format!("no ack within {attempt_timeout:?}"),
            }
            debug!(%msg_id, attempts, %last, "publish attempt failed; retrying");
            let sleep = backoff.min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(sleep).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    // ------------------------------------------------------------------ subscribe

    /// Every stream message with `seq >= start_seq`, in order, once each (see module docs for
    /// how restarts and fail-overs are survived). Dropping the returned `Subscription` stops it.
    pub fn subscribe_from(&self, start_seq: u64) -> Subscription {
        let (tx, rx) = mpsc::channel(4096);
        let stats = Arc::new(SubStats::default());
        let task = tokio::spawn(sub_loop(
            self.clone(),
            start_seq.max(1) - 1,
            tx,
            stats.clone(),
        ));
        Subscription { rx, stats, task }
    }

    // ------------------------------------------------------------------ history

    /// The last `n` stored messages (fewer if the stream holds fewer), oldest first, for a
    /// newcomer; returns them with the last sequence so the caller can `subscribe_from(last+1)`.
    pub async fn history(&self, n: u64) -> Result<(Vec<Delivered>, u64)> {
        let st = self.stream_info().await?.state;
        if st.messages == 0 || n == 0 {
            return Ok((Vec::new(), st.last_sequence));
        }
        let from = st
            .first_sequence
            .max(st.last_sequence.saturating_sub(n - 1))
            .max(1);
        let stream = self.stream.clone();
        let got: Vec<Option<Delivered>> = futures::stream::iter(from..=st.last_sequence)
            .map(|seq| {
                let stream = stream.clone();
                async move {
                    match stream.get_raw_message(seq).await {
                        Ok(m) => Some(Delivered::from(m)),
                        Err(e) => {
                            // Deleted / aged out between the info and the get.
                            debug!(seq, "history get: {e}");
                            None
                        }
                    }
                }
            })
            .buffered(64)
            .collect()
            .await;
        Ok((got.into_iter().flatten().collect(), st.last_sequence))
    }

    /// Sends one event without waiting for its acknowledgement (the publisher keeps many in
    /// flight, in order, on this one connection); await the returned future for the ack.
    pub async fn send(&self, payload: Bytes, msg_id: &str) -> AckFuture {
        let msg = Publish::build().payload(payload).message_id(msg_id);
        let sent = self.js.send_publish(self.subject.clone(), msg).await;
        let attempt = self.cfg.publish_attempt_timeout;
        Box::pin(async move {
            let ack = sent.map_err(|e| nerr("publish", e))?;
            match tokio::time::timeout(attempt, ack).await {
                Ok(Ok(a)) => Ok(a.sequence),
                Ok(Err(e)) => Err(nerr("publish ack", e)),
                Err(_) => Err(nerr("publish ack", format!("none within {attempt:?}"))),
            }
        })
    }

    // ------------------------------------------------------------------ names

    /// Claims `key` (use `encode_key` for arbitrary nicknames) atomically: exactly one of any
    /// number of racing claimers gets `Ok(revision)`, the others `Err(BusError::Taken)`.
    /// Keep the revision to `release_name` later.
    pub async fn claim_name(&self, key: &str, value: Bytes) -> Result<u64> {
        match self.names.create(key, value).await {
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                Err(BusError::Taken(key.to_string()))
            }
            Err(e) => Err(nerr("claim name", e)),
        }
    }

    /// Releases `key` only if it is still at `expected_rev` (still ours). Returns false when
    /// someone else's claim (or a later update) is there, which is then left alone.
    pub async fn release_name(&self, key: &str, expected_rev: u64) -> Result<bool> {
        match self
            .names
            .delete_expect_revision(key, Some(expected_rev))
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(nerr("release name", e)),
        }
    }

    /// The current holder of `key` and its revision, if any.
    pub async fn name(&self, key: &str) -> Result<Option<(Bytes, u64)>> {
        match self.names.entry(key).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => Ok(Some((e.value, e.revision))),
            Ok(_) => Ok(None),
            Err(e) => Err(nerr("read name", e)),
        }
    }

    /// Hands `key` to a new holder if it is still at `expected_rev` (compare-and-set).
    pub async fn update_name(&self, key: &str, value: Bytes, expected_rev: u64) -> Result<u64> {
        self.names
            .update(key, value, expected_rev)
            .await
            .map_err(|e| nerr("hand over name", e))
    }

    /// All claimed names: (key, value, revision).
    pub async fn names(&self) -> Result<Vec<(String, Bytes, u64)>> {
        list_bucket(&self.names).await
    }

    // ------------------------------------------------------------------ leases

    /// Refreshes this node's lease (a plain `put`; call every few seconds, well within
    /// `lease_max_age`). `value` is free-form (e.g. JSON with the node's address).
    pub async fn heartbeat(&self, node: &str, value: Bytes) -> Result<u64> {
        self.nodes
            .put(node, value)
            .await
            .map_err(|e| nerr("heartbeat", e))
    }

    /// Every node's lease: (node, value, revision).
    pub async fn leases(&self) -> Result<Vec<(String, Bytes, u64)>> {
        list_bucket(&self.nodes).await
    }

    /// Removes this node's lease at clean shutdown.
    pub async fn leave(&self, node: &str) -> Result<()> {
        self.nodes.delete(node).await.map_err(|e| nerr("leave", e))
    }

    // ------------------------------------------------------------------ bans

    /// Writes a ban to the ban list.
    pub async fn ban(&self, key: &str, value: Bytes) -> Result<u64> {
        self.bans.put(key, value).await.map_err(|e| nerr("ban", e))
    }

    /// Removes a ban from the ban list.
    pub async fn unban(&self, key: &str) -> Result<()> {
        self.bans.delete(key).await.map_err(|e| nerr("unban", e))
    }

    /// Every ban in the list now: (key, value, revision).
    pub async fn bans(&self) -> Result<Vec<(String, Bytes, u64)>> {
        list_bucket(&self.bans).await
    }

    /// Every ban in the list (the latest value of every key), then every change to it.
    pub async fn watch_bans(&self) -> Result<kv::Watch> {
        self.bans
            .watch_with_history(">")
            .await
            .map_err(|e| nerr("watch bans", e))
    }
}

/// Live keys of a bucket with value and revision. One ordered consumer streams the latest entry
/// of every key, up to the bucket's last revision when the listing began: no request per key,
/// which for the names bucket would be one round trip per member of the room.
async fn list_bucket(store: &kv::Store) -> Result<Vec<(String, Bytes, u64)>> {
    let info = store
        .stream
        .get_info()
        .await
        .map_err(|e| nerr("kv info", e))?;
    let mut out = Vec::new();
    if info.state.messages == 0 {
        return Ok(out);
    }
    let last = info.state.last_sequence;
    let mut entries = store
        .watch_with_history(">")
        .await
        .map_err(|e| nerr("kv list", e))?;
    loop {
        let next = tokio::time::timeout(LIST_IDLE, entries.next())
            .await
            .map_err(|_| nerr("kv list", "no entry in time"))?;
        let Some(entry) = next else {
            break;
        };
        let entry = entry.map_err(|e| nerr("kv list", e))?;
        if entry.operation == kv::Operation::Put {
            // A copy: the value shares the client's read buffer, which it would keep whole.
            out.push((
                entry.key,
                Bytes::copy_from_slice(&entry.value),
                entry.revision,
            ));
        }
        if entry.delta == 0 || entry.revision >= last {
            break;
        }
    }
    Ok(out)
}

/// Get-or-create a stream, tolerating creation races and a JetStream that is not ready yet.
async fn ensure_stream(
    js: &jetstream::Context,
    cfg: stream::Config,
    deadline: Instant,
) -> Result<stream::Stream> {
    let start = Instant::now();
    let mut last;
    let mut delay = Duration::from_millis(100);
    loop {
        // Each request is bounded by what is left of the deadline: while no server is reachable
        // a request waits out the context's 5 s timeout, and a get and a create in a row made
        // a 5 s setup take 10 s before its caller could say why it waits.
        match before(deadline, js.get_stream(&cfg.name)).await {
            Ok(s) => {
                let c = &s.cached_info().config;
                if c.subjects != cfg.subjects || c.num_replicas != cfg.num_replicas {
                    warn!(stream = %cfg.name, "existing stream differs from the wanted config (subjects {:?}, replicas {}); using it as is", c.subjects, c.num_replicas);
                }
                return Ok(s);
            }
            Err(e) => {
                last = format!("get: {e}");
                // Not found (or not reachable yet): try to create; a racing creator with the
                // same config makes ours succeed too, or fail with "already in use", after
                // which the next get finds it.
                match before(deadline, js.create_stream(cfg.clone())).await {
                    Ok(s) => {
                        info!(stream = %cfg.name, "created stream");
                        return Ok(s);
                    }
                    Err(e) => last = format!("{last}; create: {e}"),
                }
            }
        }
        if Instant::now() + delay >= deadline {
            return Err(BusError::Setup {
                what: format!("stream {}", cfg.name),
                elapsed: start.elapsed(),
                last,
            });
        }
        debug!(stream = %cfg.name, %last, "stream not ready; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// `request`, given at most until `deadline`; its error as text.
async fn before<T, E: std::fmt::Display>(
    deadline: Instant,
    request: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> std::result::Result<T, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, request).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("no answer before the setup's deadline".to_owned()),
    }
}

/// Creates (if needed) and opens a KV bucket the way that works on nats-server 2.9: its
/// `KV_<bucket>` stream by hand, then `get_key_value`.
async fn ensure_kv(
    js: &jetstream::Context,
    bucket: &str,
    history: i64,
    max_age: Duration,
    cfg: &BusConfig,
    deadline: Instant,
) -> Result<kv::Store> {
    // The duplicate window may not exceed max_age.
    let dup = if max_age.is_zero() {
        Duration::from_secs(120)
    } else {
        max_age.min(Duration::from_secs(120))
    };
    let scfg = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: history,
        max_age,
        duplicate_window: dup,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        storage: stream::StorageType::File,
        num_replicas: cfg.replicas,
        ..Default::default()
    };
    ensure_stream(js, scfg, deadline).await?;
    js.get_key_value(bucket)
        .await
        .map_err(|e| nerr("get_key_value", e))
}

// ---------------------------------------------------------------------- subscription

/// Counters of one subscription (for tests, metrics and logs).
#[derive(Debug, Default)]
pub struct SubStats {
    /// Consumers created (1 + recreations).
    pub consumers: AtomicU64,
    /// Deliveries dropped because their seq was at or below the last applied one.
    pub dropped_dups: AtomicU64,
    /// Recreations triggered by the idle watchdog.
    pub watchdog_fires: AtomicU64,
    /// Recreations triggered by a consumer-sequence gap.
    pub gaps: AtomicU64,
    /// Recreations triggered by a consumer / pull error.
    pub errors: AtomicU64,
    /// Last applied stream sequence.
    pub last_applied: AtomicU64,
    /// Messages lost to the stream's own limits (stream seq jumped with no consumer gap).
    pub skipped_by_limits: AtomicU64,
    /// Pulls issued again on the same consumer (no heartbeat, or no leader took the pull).
    pub resumes: AtomicU64,
    /// Messages read from the stream directly while the consumer was behind or had lost them.
    pub read_directly: AtomicU64,
}

/// Stream of `Delivered` returned by `Bus::subscribe_from`. Stops its task when dropped.
pub struct Subscription {
    rx: mpsc::Receiver<Delivered>,
    stats: Arc<SubStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscription {
    /// The subscription's counters.
    pub fn stats(&self) -> Arc<SubStats> {
        self.stats.clone()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stream for Subscription {
    type Item = Delivered;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Delivered>> {
        self.rx.poll_recv(cx)
    }
}

/// Idle heartbeat the server is asked for while a pull waits. async-nats reports a missed one
/// after twice this without any traffic, and that is how a pull lost with its server (the
/// consumer's leader, or the server this client talked to) is noticed: async-nats itself pulls
/// again only at the pull's expiry + 5 s, and not at all while its reconnect handling is still
/// asking a leaderless consumer for its info.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);

/// Lifetime of one pull request: the server then ends it and the client pulls again.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// Longest one consumer creation may take; meanwhile the stream is read directly.
const CREATE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest one direct read of a stream message may take.
const DIRECT_GET_TIMEOUT: Duration = Duration::from_secs(1);

/// Most messages one catch-up reads before the consumer is looked at again.
const CATCH_UP_MAX: u64 = 4096;

/// Direct reads in flight at once during a catch-up.
const CATCH_UP_PARALLEL: u64 = 32;

/// Why a pull on a consumer ended.
enum Restart {
    /// The consumer is unusable (deleted, a malformed delivery, ...): create a new one.
    Error(String),
    /// A delivery was lost and could not be read from the stream instead: create a new one.
    Gap,
    /// The consumer stayed behind the stream for `watchdog_checks` idle rounds: create a new
    /// one.
    Watchdog,
    /// The pull went silent (no heartbeat) or no consumer leader took it: pull again on the
    /// same consumer.
    Resume(String),
}

/// The subscriber dropped its end of the subscription.
struct Closed;

/// The state of one subscription: what it has handed over so far and where to.
struct Follower {
    bus: Bus,
    tx: mpsc::Sender<Delivered>,
    stats: Arc<SubStats>,
    /// Last stream sequence handed to the subscriber; nothing at or below it is handed again.
    applied: u64,
}

async fn sub_loop(bus: Bus, applied: u64, tx: mpsc::Sender<Delivered>, stats: Arc<SubStats>) {
    let mut f = Follower {
        bus,
        tx,
        stats,
        applied,
    };
    let mut current = None;
    let Err(Closed) = f.follow(&mut current).await;
    // Nobody reads any more: remove the consumer rather than leave it to its inactivity timer.
    if let Some(name) = current {
        let _ =
            tokio::time::timeout(Duration::from_secs(2), f.bus.stream.delete_consumer(&name)).await;
    }
}

impl Follower {
    /// Hands `d` to the subscriber.
    async fn deliver(&mut self, d: Delivered) -> Result<(), Closed> {
        let seq = d.seq;
        self.tx.send(d).await.map_err(|_| Closed)?;
        self.applied = seq;
        self.stats.last_applied.store(seq, Ordering::Relaxed);
        Ok(())
    }

    /// Reads the stream's messages after `applied` by sequence, up to `upto` or the first
    /// sequence that is not answered (not stored yet, or not reachable), and hands them over.
    /// From `Source::Replica`, every replica answers (the stream allows direct gets), so this
    /// needs neither the consumer nor any leader: it keeps the room moving while the consumer
    /// waits for a leader election. Returns how many it handed over.
    async fn catch_up(&mut self, upto: u64, source: Source) -> Result<u64, Closed> {
        let start = self.applied;
        while self.applied < upto {
            let from = self.applied + 1;
            // One read first: the usual answer is that there is nothing new.
            let width = if self.applied == start {
                1
            } else {
                CATCH_UP_PARALLEL
            };
            let to = from.saturating_add(width - 1).min(upto);
            let stream = self.bus.stream.clone();
            let mut reads = futures::stream::iter(from..=to)
                .map(|seq| source.get(stream.clone(), seq))
                .buffered(CATCH_UP_PARALLEL as usize);
            let mut complete = true;
            while let Some(read) = reads.next().await {
                match read {
                    Some(d) if d.seq == self.applied + 1 => self.deliver(d).await?,
                    _ => {
                        complete = false;
                        break;
                    }
                }
            }
            if !complete {
                break;
            }
        }
        let read = self.applied - start;
        self.stats.read_directly.fetch_add(read, Ordering::Relaxed);
        Ok(read)
    }

    /// One idle round: the consumer delivered nothing for `watchdog_idle`. Reads whatever the
    /// stream has beyond `applied`; `behind` counts the consecutive rounds that found some.
    /// Returns whether the consumer has been behind long enough to be replaced.
    ///
    /// The replica that answers a direct read is usually the one on this node's server, which
    /// after a server's loss may lag behind the stream for as long as the consumer's own
    /// leader does (both read the store of a replica); then both say "nothing new" while the
    /// room goes on without this node. So when the replicas have nothing, the stream's leader
    /// is asked for its last sequence, and what it has beyond `applied` is read from it.
    async fn idle_round(&mut self, consumer: &str, behind: &mut u32) -> Result<bool, Closed> {
        let upto = self.applied + CATCH_UP_MAX;
        let mut read = self.catch_up(upto, Source::Replica).await?;
        let mut from = "a replica";
        if read == 0 {
            let last = tokio::time::timeout(DIRECT_GET_TIMEOUT, self.bus.stream.get_info()).await;
            match last {
                Ok(Ok(info)) if info.state.last_sequence > self.applied => {
                    let upto = upto.min(info.state.last_sequence);
                    read = self.catch_up(upto, Source::Leader).await?;
                    from = "the stream's leader";
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => debug!(node = %self.bus.cfg.node, "subscriber: stream info: {e}"),
                Err(_) => debug!(node = %self.bus.cfg.node, "subscriber: stream info timed out"),
            }
        }
        if read == 0 {
            *behind = 0;
            return Ok(false);
        }
        *behind += 1;
        let node = &self.bus.cfg.node;
        if *behind == 1 {
            info!(%node, %consumer, read, applied = self.applied, "subscriber: the consumer is behind the stream; resuming from {from} directly until it catches up");
        } else {
            debug!(%node, %consumer, read, applied = self.applied, rounds = *behind, "subscriber: still reading the stream directly from {from}");
        }
        Ok(*behind >= self.bus.cfg.watchdog_checks)
    }

    /// Follows the stream for as long as the subscriber reads; see the module docs.
    async fn follow(&mut self, current: &mut Option<String>) -> Result<Infallible, Closed> {
        let idle = self.bus.cfg.watchdog_idle;
        let durable = self.bus.cfg.sub_durable;
        let node = self.bus.cfg.node.clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            // Best effort: remove the consumer we are abandoning (it would time out anyway).
            if let Some(name) = current.take() {
                let s = self.bus.stream.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(2), s.delete_consumer(&name))
                        .await;
                });
            }
            let consumer = self.create_consumer(&node, durable, idle).await?;
            let name = consumer.cached_info().name.clone();
            *current = Some(name.clone());
            self.stats.consumers.fetch_add(1, Ordering::Relaxed);
            info!(%node, consumer = %name, from = self.applied + 1, "subscriber: consumer created");
            let mut expect_cseq = 1u64;
            let mut behind = 0u32;
            let mut resumes = 0u32;
            let why = 'pulls: loop {
                // Bounded like every wait here: starting a pull subscribes through the client,
                // which waits while the client cannot take commands (reconnecting, say).
                let msgs = tokio::time::timeout(
                    CREATE_TIMEOUT,
                    consumer
                        .stream()
                        .max_messages_per_batch(1000)
                        .expires(PULL_EXPIRES)
                        .heartbeat(PULL_HEARTBEAT)
                        .messages(),
                )
                .await;
                let mut msgs = match msgs {
                    Ok(Ok(m)) => m,
                    Ok(Err(e)) => break 'pulls Restart::Error(format!("messages(): {e}")),
                    Err(_) => break 'pulls Restart::Error("messages(): timed out".into()),
                };
                // The next idle round is due `idle` after the last delivery or round, whatever
                // the pull reports meanwhile: errors it recovers from by itself (`continue`
                // below) must not put the round off, or a pull that kept reporting them would
                // never let this node read the stream directly, and its room would stop.
                let mut quiet_until = tokio::time::Instant::now() + idle;
                let why = loop {
                    let m = match tokio::time::timeout_at(quiet_until, msgs.next()).await {
                        Ok(Some(Ok(m))) => m,
                        Ok(Some(Err(e))) => {
                            use consumer::pull::MessagesErrorKind as K;
                            match e.kind() {
                                // A durable consumer outlives its leader: pull again once one
                                // is elected (an ephemeral one died with its server).
                                K::MissingHeartbeat if durable => {
                                    break Restart::Resume(format!(
                                        "no heartbeat for {:?}",
                                        PULL_HEARTBEAT * 2
                                    ));
                                }
                                K::NoResponders if durable => {
                                    break Restart::Resume(
                                        "no leader took the pull request".into(),
                                    );
                                }
                                // async-nats pulls again by itself after these; the heartbeat
                                // and the idle rounds decide.
                                K::Pull | K::Other if durable => {
                                    debug!(%node, "subscriber: {e} (waiting)");
                                    continue;
                                }
                                _ => break Restart::Error(e.to_string()),
                            }
                        }
                        Ok(None) => break Restart::Error("message stream ended".into()),
                        Err(_) => {
                            if self.tx.is_closed() {
                                return Err(Closed);
                            }
                            if self.idle_round(&name, &mut behind).await? {
                                break Restart::Watchdog;
                            }
                            quiet_until = tokio::time::Instant::now() + idle;
                            continue;
                        }
                    };
                    quiet_until = tokio::time::Instant::now() + idle;
                    behind = 0;
                    resumes = 0;
                    let (sseq, cseq) = match m.info() {
                        Ok(i) => (i.stream_sequence, i.consumer_sequence),
                        Err(e) => break Restart::Error(format!("bad reply subject: {e}")),
                    };
                    if cseq > expect_cseq && sseq > self.applied + 1 {
                        // Deliveries were lost (with a dying server): read what they held
                        // from the stream; only if that fails is the consumer replaced.
                        self.catch_up(sseq - 1, Source::Replica).await?;
                        if self.applied + 1 < sseq {
                            break Restart::Gap;
                        }
                        debug!(%node, consumer = %name, expected = expect_cseq, got = cseq, "subscriber: lost deliveries read from the stream");
                    } else if cseq < expect_cseq && sseq > self.applied {
                        // Delivered again or skipped ahead with nothing to show for it: the
                        // consumer's count no longer tells whether anything is missing.
                        break Restart::Gap;
                    }
                    // Redeliveries (a new leader replaying what we have) are dropped below.
                    expect_cseq = cseq + 1;
                    if sseq <= self.applied {
                        self.stats.dropped_dups.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if sseq > self.applied + 1 {
                        // The consumer's sequence is contiguous and its previous delivery was
                        // at or below `applied`, so the stream itself has nothing in between
                        // (removed by its limits).
                        self.stats
                            .skipped_by_limits
                            .fetch_add(sseq - self.applied - 1, Ordering::Relaxed);
                        warn!(
                            from = self.applied + 1,
                            to = sseq - 1,
                            "messages no longer in the stream"
                        );
                    }
                    self.deliver(Delivered {
                        seq: sseq,
                        payload: m.payload.clone(),
                    })
                    .await?;
                    backoff = Duration::from_millis(100);
                };
                match why {
                    Restart::Resume(reason) => {
                        resumes += 1;
                        self.stats.resumes.fetch_add(1, Ordering::Relaxed);
                        info!(%node, consumer = %name, applied = self.applied, "subscriber: {reason}; resuming the pull");
                        // The room keeps moving while the consumer has no leader; a pull no
                        // leader takes fails at once, so the next one waits a little.
                        if self.idle_round(&name, &mut behind).await? {
                            break 'pulls Restart::Watchdog;
                        }
                        if resumes > 1 {
                            tokio::time::sleep(Duration::from_millis(250) * resumes.min(4)).await;
                        }
                    }
                    other => break 'pulls other,
                }
            };
            match &why {
                Restart::Error(e) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    info!(%node, applied = self.applied, "subscriber: consumer error ({e}); recreating");
                }
                Restart::Gap => {
                    self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                    info!(%node, applied = self.applied, "subscriber: consumer sequence gap; recreating");
                }
                Restart::Watchdog => {
                    self.stats.watchdog_fires.fetch_add(1, Ordering::Relaxed);
                    info!(%node, applied = self.applied, "subscriber: consumer behind the stream for {} idle rounds; recreating", self.bus.cfg.watchdog_checks);
                }
                Restart::Resume(_) => {}
            }
            if matches!(why, Restart::Error(_)) {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }

    /// Creates this subscription's consumer at `applied + 1`, retrying until it exists; the
    /// stream is read directly meanwhile (creating one needs the meta leader, which may be in
    /// an election).
    async fn create_consumer(
        &mut self,
        node: &str,
        durable: bool,
        idle: Duration,
    ) -> Result<consumer::PullConsumer, Closed> {
        let mut backoff = Duration::from_millis(100);
        loop {
            // Unique per consumer: a node's run never resumes another run's consumer.
            let started = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            let cname = format!(
                "sub_{}_{started:x}",
                node.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
            );
            let ccfg = consumer::pull::Config {
                // Durable (replicated like the stream) survives the loss of its server; an
                // ephemeral one is R1 and must be recreated after a fail-over, which needs the
                // meta leader and was seen to time out repeatedly for 5-30 s.
                durable_name: durable.then(|| cname.clone()),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: self.applied + 1,
                },
                ack_policy: consumer::AckPolicy::None,
                // Abandoned consumers (node died) are removed by the server after this.
                inactive_threshold: Duration::from_secs(if durable { 120 } else { 30 }),
                memory_storage: !durable,
                num_replicas: if durable { self.bus.cfg.replicas } else { 1 },
                ..Default::default()
            };
            let stream = self.bus.stream.clone();
            let mut create = std::pin::pin!(tokio::time::timeout(
                CREATE_TIMEOUT,
                stream.create_consumer(ccfg)
            ));
            let mut behind = 0u32;
            let created = loop {
                tokio::select! {
                    created = &mut create => break created,
                    _ = tokio::time::sleep(idle) => {
                        if self.tx.is_closed() {
                            return Err(Closed);
                        }
                        self.idle_round("(being created)", &mut behind).await?;
                    }
                }
            };
            match created {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => info!(%node, "subscriber: create consumer: {e}"),
                Err(_) => info!(%node, "subscriber: create consumer timed out"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

/// Where a catch-up reads the stream's messages from.
#[derive(Clone, Copy)]
enum Source {
    /// Any replica (a direct get): needs no leader, but a lagging replica has less.
    Replica,
    /// The stream's leader: has everything stored, when there is one.
    Leader,
}

impl Source {
    /// Stream message `seq`, if it is answered in time.
    async fn get(self, stream: stream::Stream, seq: u64) -> Option<Delivered> {
        let read = async {
            match self {
                Source::Replica => stream.direct_get(seq).await.ok(),
                Source::Leader => stream.get_raw_message(seq).await.ok(),
            }
        };
        let m = tokio::time::timeout(DIRECT_GET_TIMEOUT, read)
            .await
            .ok()??;
        Some(Delivered::from(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_files_are_told_apart_by_content() {
        assert_eq!(
            Credentials::parse("chat:s3cr:et\n"),
            Some(Credentials::UserPassword("chat".into(), "s3cr:et".into()))
        );
        assert_eq!(
            Credentials::parse("  t0ken  \n"),
            Some(Credentials::Token("t0ken".into()))
        );
        let creds = "-----BEGIN NATS USER JWT-----\nabc\n------END NATS USER JWT------\n";
        assert!(matches!(
            Credentials::parse(creds),
            Some(Credentials::Creds(_))
        ));
        assert_eq!(Credentials::parse(""), None);
        assert_eq!(Credentials::parse("two\nlines"), None);
    }
}
