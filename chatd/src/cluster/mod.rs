//! A room served by several chatd nodes, joined through NATS JetStream: the clustered
//! [`Engine`]. No node-to-node protocol of our own: the engine's shared state lives in NATS.
//!
//! - **Order**: every room event is one message of the JetStream stream `CHAT_<room>`; its
//!   stream sequence is the room's one order. A node publishes each event once (with a
//!   `Nats-Msg-Id`, so a retried publish is stored once) and consumes the stream once, then
//!   fans out to its own members as a single node does (`Room::deliver`). Its own events reach
//!   its own members the same way, so every member on every node sees one order.
//! - **Names**: the KV bucket `chat_<room>_names` maps each name key to its holder. A join or
//!   rename claims with KV `create` (atomic: one winner), a reclaim hands over with
//!   compare-and-set, a leave deletes with the revision it claimed.
//! - **Liveness**: each node refreshes its lease in `chat_<room>_nodes`; a node whose lease has
//!   not changed for `cluster.node-timeout` is dead. Each survivor that finds one of its names
//!   publishes that member's leave under a message id derived from the member (the stream keeps
//!   one copy), and then deletes the name (compare-and-set again); either step that fails is
//!   tried again at the next scan, so the leave is announced once and never lost.
//! - **History**: a starting node reads the stream's last messages for newcomers.
//!
//! Sessions wait on NATS only to take a name: a join claims it and then waits until its own
//! join comes back from the stream (so what the newcomer sends next is ordered after it on every
//! node), `/nick` claims the new name and `/token` stores its digest. Those waits are futures
//! the session awaits (`engine::Pending`): no runtime thread is held, so a join storm costs no
//! threads. Everything else goes to one publisher task through a bounded queue, and a line that
//! cannot be published within the bus's deadline is answered `*** ERR not-delivered`.

pub mod bus;
pub mod wire;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::bans::{Ban, Bans, Target};
use crate::config::ClusterConfig;
use crate::engine::{
    Claim, ClientId, Deliver, Delivered, Engine, Event, Newcomer, Pending, Seq, Transport,
};
use crate::outbox::Outbox;
use crate::room::{Origin, RECLAIMED_REASON, Remote, Room, is_remote};
use chat_proto::names::{Name, NameError};
use chat_proto::protocol::{self, code, kind};
use wire::{Envelope, Lease, MemberRef, NameHolder, WireEvent};

use self::bus::{Bus, BusError};

/// Events waiting for the publisher; a full queue refuses the line (the sender is told).
const PUBLISH_QUEUE: usize = 65_536;

/// Longest a join or `/nick` waits for the names bucket.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);

/// Below this, a `cluster.node-timeout` can run out during a NATS leader election (4-9 s with
/// nats-server 2.9), when no node refreshes its lease: it is allowed, and warned about.
const ELECTION_BOUND: Duration = Duration::from_secs(10);

/// How long a claim that meets a name on its way out (its holder left or renamed a moment ago,
/// here or on another node) waits for the entry's deletion before refusing. A name held by
/// someone who stays is refused after this on other nodes.
const RELEASE_GRACE: Duration = Duration::from_millis(500);

/// How often a waiting claim reads the entry again.
const RELEASE_POLL: Duration = Duration::from_millis(20);

/// Most stream messages a starting node reads to find the room's recent history.
const HISTORY_SCAN: u64 = 5_000;

/// How often leases are checked and dead nodes' names reaped.
const REAP_EVERY: Duration = Duration::from_millis(500);

/// Names of dead nodes reaped at once (each a publish and a delete).
const REAP_PARALLEL: usize = 32;

/// Longest a member of this node that the cluster took for gone tries to take its name back.
const RESEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long such a member waits between two tries when the names cannot be reached.
const RESEAT_RETRY: Duration = Duration::from_millis(200);

/// Longest between two refreshes of a node's lease, whatever its `cluster.node-timeout`: the
/// lease is as fresh as this when the node's link dies, and the rest of the node timeout is
/// what the node has to notice and to reach another server.
const BEAT_MAX: Duration = Duration::from_secs(1);

/// A gap between two reads of the leases longer than this is time this node could not see
/// them (its own link was down or slow) and is not counted against the others' leases.
const BLIND_AFTER: Duration = Duration::from_secs(2);

/// How often the whole names bucket is read even when no known node died, for names whose
/// holder's node this one never saw alive (an earlier run of a node that restarted before
/// this one started).
const FULL_SCAN_EVERY: Duration = Duration::from_secs(30);

/// One stream message on its way: an event, or a batch of one lane's events.
struct Outgoing {
    /// The event's JSON, or a batch's, one per line (`wire::decode_message`).
    payload: Bytes,
    /// A batch goes under its first event's id: an id no other message had, and the same one
    /// if it is retried.
    msg_id: String,
    /// Who is told if it cannot be published.
    sender: Option<Arc<Outbox>>,
    /// The senders of a batch's later events, each told too.
    also: Vec<Option<Arc<Outbox>>>,
    /// Events of one lane reach the stream in the order they were queued: at most one message
    /// of a lane is in flight. A member of this node is its own lane (its id); events about no
    /// member of this node (announcements, kicks and leaves of other nodes' members) share
    /// lane 0.
    lane: ClientId,
    /// Its place in the queue (`Cluster::queued` when its last event was queued).
    queued: u64,
}

impl Outgoing {
    /// How many events it carries.
    fn events(&self) -> usize {
        1 + self.also.len()
    }

    /// The events of `queue` (one lane's, in order) that fit one stream message, as one.
    fn batch(queue: &mut VecDeque<Outgoing>) -> Option<Outgoing> {
        let mut first = queue.pop_front()?;
        if queue.is_empty() {
            return Some(first);
        }
        let mut payload = BytesMut::from(&first.payload[..]);
        while let Some(next) = queue.front() {
            if first.events() >= wire::MAX_BATCH
                || payload.len() + 1 + next.payload.len() > wire::MAX_MESSAGE
            {
                break;
            }
            let Some(next) = queue.pop_front() else { break };
            payload.put_u8(b'\n');
            payload.extend_from_slice(&next.payload);
            first.also.push(next.sender);
            first.queued = next.queued;
        }
        first.payload = payload.freeze();
        Some(first)
    }

    /// Tells every sender of its events that they did not reach the room, and why.
    fn refuse(&self, why: &str) {
        not_delivered(self.sender.as_deref(), why);
        for sender in &self.also {
            not_delivered(sender.as_deref(), why);
        }
    }
}

/// A member of this node whose join is published but not yet delivered back.
struct PendingJoin {
    outbox: Arc<Outbox>,
    /// Its welcome lines, sent when it is seated (before the history, as on a single node).
    welcome: Vec<Bytes>,
    /// Tells the joining session it is seated.
    seated: tokio::sync::oneshot::Sender<()>,
    /// How it is connected (`chatctl list`).
    transport: Transport,
}

/// The engine's books: which names this node holds for whom, and the joins and renames of its
/// members on their way. Who is a member, here or on other nodes, is the room's to know
/// (`Room::seated`, `Room::remote_id`): nothing is kept per member twice.
#[derive(Default)]
struct Book {
    /// Joins published, waiting for their delivery.
    pending: HashMap<ClientId, PendingJoin>,
    /// Name keys this node holds for its members: key → (holder, revision).
    claims: HashMap<String, (ClientId, u64)>,
    /// Digests of the reclaim tokens issued to members connected here.
    tokens: HashMap<ClientId, String>,
    /// Members of this node whose rename is published but not yet delivered → the new display
    /// name, which their messages carry meanwhile.
    renaming: HashMap<ClientId, String>,
    /// Members of this node whose own leave is published but not yet delivered. A leave of a
    /// member of this node that is not here came from another node that took this one for
    /// dead, while the member is still connected (see `Cluster::reseat`).
    leaving: HashSet<ClientId>,
}

/// Where the member `who` is connected, as the room's table of other nodes' members keys it.
fn origin(who: &MemberRef) -> Origin<'_> {
    Origin {
        node: &who.node,
        boot: who.boot,
        conn: who.id,
    }
}

/// What a node gives its cluster engine: the room it delivers to, and its own rules.
pub trait Host: Send + Sync {
    /// This node's room.
    fn room(&self) -> &Room;
    /// Validates a name from the bus by this node's name rules.
    fn validate_name(&self, name: &str) -> Result<Name, NameError>;
    /// How many recent messages newcomers are shown.
    fn history(&self) -> usize;
    /// This node's ban list, which mirrors the cluster's.
    fn bans(&self) -> &Bans;
    /// `cluster.node-timeout` as configured now (it changes on reload).
    fn node_timeout(&self) -> Option<Duration>;
}

/// The link to NATS as `chatctl status` shows it.
#[derive(Debug, Clone, Default)]
pub struct LinkStatus {
    /// Connected to a NATS server now.
    pub connected: bool,
    /// The server connected to (`host:port`).
    pub server: Option<String>,
    /// What the node is waiting for, while it is not ready.
    pub waiting: Option<String>,
    /// Nodes whose lease is live, this one included, sorted.
    pub live_nodes: Vec<String>,
}

/// The clustered engine of one node.
pub struct Cluster {
    /// This node's name.
    node: String,
    /// This run of the node: members of an earlier run are told apart from ours.
    boot: u64,
    config: ClusterConfig,
    /// Set once connected and set up; until then joins are refused as unavailable.
    bus: OnceLock<Bus>,
    publish: mpsc::Sender<Outgoing>,
    /// Taken by the publisher task when it starts.
    publish_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    /// Members of this node that another node took for gone, to seat again (`reseat`).
    reseat: mpsc::UnboundedSender<ClientId>,
    /// Taken by the reseat task when it starts.
    reseat_rx: Mutex<Option<mpsc::UnboundedReceiver<ClientId>>>,
    /// The node's room and rules, set when it starts following the cluster (before `bus`).
    host: OnceLock<Arc<dyn Host>>,
    book: Mutex<Book>,
    /// Events published by this run (the numbering of its message ids).
    published: AtomicU64,
    /// Events queued for the publisher so far (their `Outgoing::queued`).
    queued: AtomicU64,
    /// Events queued and not yet acknowledged or refused (a stop waits for them).
    unpublished: AtomicUsize,
    /// The stream sequence of the last event delivered here.
    applied: AtomicU64,
    link: watch::Sender<LinkStatus>,
    /// Fires once the bus is connected, the room's history loaded and the stream followed.
    ready: tokio::sync::Notify,
    ready_flag: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .field("boot", &self.boot)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The engine for `config`, not yet connected (see [`Cluster::run`]).
    pub fn new(config: &ClusterConfig) -> Arc<Cluster> {
        let (publish, rx) = mpsc::channel(PUBLISH_QUEUE);
        let (reseat, reseat_rx) = mpsc::unbounded_channel();
        let boot = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let (link, _) = watch::channel(LinkStatus {
            waiting: Some(format!("connecting to NATS at {}", config.nats.join(", "))),
            ..LinkStatus::default()
        });
        Arc::new(Cluster {
            node: config.node_name(),
            boot,
            config: config.clone(),
            bus: OnceLock::new(),
            publish,
            publish_rx: Mutex::new(Some(rx)),
            reseat,
            reseat_rx: Mutex::new(Some(reseat_rx)),
            host: OnceLock::new(),
            book: Mutex::new(Book::default()),
            published: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            unpublished: AtomicUsize::new(0),
            applied: AtomicU64::new(0),
            link,
            ready: tokio::sync::Notify::new(),
            ready_flag: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The link's state now.
    pub fn link(&self) -> LinkStatus {
        self.link.borrow().clone()
    }

    /// The stream sequence of the last room event delivered here.
    pub fn position(&self) -> Seq {
        self.applied.load(Ordering::Acquire)
    }

    /// Whether the node is connected and follows the room.
    pub fn is_ready(&self) -> bool {
        self.ready_flag.load(Ordering::Acquire)
    }

    /// Waits until the node is connected and follows the room.
    pub async fn wait_ready(&self) {
        loop {
            let notified = self.ready.notified();
            if self.is_ready() {
                return;
            }
            notified.await;
        }
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // Each operation leaves the maps consistent before it could panic.
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn me(&self, id: ClientId) -> MemberRef {
        MemberRef {
            node: self.node.clone(),
            boot: self.boot,
            id,
        }
    }

    fn is_me(&self, who: &MemberRef) -> bool {
        who.node == self.node && who.boot == self.boot
    }

    /// `event` as this node puts it on the stream.
    fn encode(&self, event: WireEvent) -> Bytes {
        let env = Envelope {
            v: wire::VERSION,
            from: self.node.clone(),
            event,
        };
        Bytes::from(env.encode())
    }

    /// Queues `event` for the stream; when the queue is full the sender is told at once.
    fn send(&self, event: WireEvent, sender: Option<Arc<Outbox>>) {
        let n = self.published.fetch_add(1, Ordering::Relaxed);
        let msg_id = format!("{}.{}.{n}", self.node, self.boot);
        let lane = event
            .who()
            .filter(|who| self.is_me(who))
            .map_or(0, |who| who.id);
        let out = Outgoing {
            payload: self.encode(event),
            msg_id,
            sender,
            also: Vec::new(),
            lane,
            queued: self.queued.fetch_add(1, Ordering::Relaxed) + 1,
        };
        self.unpublished.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.publish.try_send(out) {
            let out = match e {
                mpsc::error::TrySendError::Full(o) | mpsc::error::TrySendError::Closed(o) => o,
            };
            warn!("cluster publish queue full; refusing a line");
            out.refuse("the room is overloaded");
            self.unpublished.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Connects, loads the room, and then follows it until `stop`: the consumer, the publisher,
    /// the lease and the link watcher. Retries the connection for as long as it takes.
    pub async fn run(self: Arc<Self>, host: Arc<dyn Host>, stop: CancellationToken) {
        let _ = self.host.set(host.clone());
        let bus = loop {
            let credentials = (!self.config.credentials.as_os_str().is_empty())
                .then_some(&*self.config.credentials);
            let attempt = Bus::connect(
                &self.config.nats,
                credentials,
                &self.config.name.0,
                &self.node,
                self.config.replicas.get(),
            );
            let result = tokio::select! {
                r = attempt => r,
                _ = stop.cancelled() => return,
            };
            match result {
                Ok(bus) => break bus,
                Err(e) => {
                    warn!(error = %e, servers = ?self.config.nats, "cannot reach the cluster's NATS yet; retrying");
                    self.link.send_modify(|l| {
                        l.waiting = Some(format!("NATS at {}: {e}", self.config.nats.join(", ")));
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        };
        // The lease first: our names are never older than our lease.
        if let Err(e) = bus.heartbeat(&self.node, lease(self.boot)).await {
            warn!(error = %e, "cannot write this node's lease yet");
        }
        // The stream holds joins, leaves and the rest between the messages: read far enough
        // back to find `room.history` of them in all but the quietest-chatting rooms, bounded
        // so a start never reads more than HISTORY_SCAN messages (the room keeps the last
        // `room.history` it is given).
        let scan = (host.history() as u64).saturating_mul(50).min(HISTORY_SCAN);
        let start = match bus.history(scan).await {
            Ok((lines, last)) => {
                for d in lines {
                    self.remember(host.room(), &d.payload);
                }
                last
            }
            Err(e) => {
                warn!(error = %e, "cannot read the room's history");
                bus.last_seq().await.unwrap_or(0)
            }
        };
        self.applied.store(start, Ordering::Release);
        match bus.names().await {
            Ok(names) => {
                for (_, value, _) in names {
                    if let Ok(holder) = NameHolder::decode(&value)
                        && !self.is_me(&holder.who)
                    {
                        self.seat_remote(
                            &*host,
                            &holder.who,
                            &holder.name,
                            holder.addr,
                            holder.at,
                            true,
                        );
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot read the room's members"),
        }
        // The cluster's bans before the first join (joins wait for `bus`): `follow_bans`
        // applies them too, but on a task of its own that a newcomer could overtake.
        match bus.bans().await {
            Ok(bans) => {
                for (_, value, _) in bans {
                    self.apply_ban(&*host, &value);
                }
            }
            Err(e) => warn!(error = %e, "cannot read the cluster's bans"),
        }
        let _ = self.bus.set(bus.clone());
        let consumer = tokio::spawn(self.clone().consume(host.clone(), bus.clone(), start + 1));
        let publisher = tokio::spawn(self.clone().publisher(bus.clone()));
        let heartbeat = tokio::spawn(self.clone().heartbeat(host.clone(), bus.clone()));
        let reaper = tokio::spawn(self.clone().reaper(host.clone(), bus.clone()));
        let link = tokio::spawn(self.clone().watch_link(host.clone(), bus.clone()));
        let bans = tokio::spawn(self.clone().follow_bans(host.clone(), bus.clone()));
        let reseat = tokio::spawn(self.clone().reseat(host.clone(), bus.clone()));
        self.link.send_modify(|l| l.waiting = None);
        self.ready_flag.store(true, Ordering::Release);
        self.ready.notify_waiters();
        info!(node = %self.node, room = %self.config.name.0, position = start, "following the cluster's room");
        stop.cancelled().await;
        consumer.abort();
        reaper.abort();
        // No lease refresh may follow the lease's removal below: a put already sent reaches
        // the server before the delete (one connection keeps its order).
        heartbeat.abort();
        let _ = heartbeat.await;
        link.abort();
        bans.abort();
        reseat.abort();
        // Let the leaves of this node's members (queued as sessions closed) reach the stream.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.unpublished.load(Ordering::Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        publisher.abort();
        let _ = tokio::time::timeout(Duration::from_secs(2), bus.leave(&self.node)).await;
    }

    /// Publishes queued events in the order they were queued, many acknowledgements in flight
    /// at once but at most one message per lane (see `Outgoing::lane`): the events of a lane
    /// queued while its message is in flight wait (others go on), and once it is acknowledged
    /// they go together, as one message (`Outgoing::batch`): a member who sends faster than a
    /// round trip to the stream costs one publish per round trip, not one per line. A message
    /// not acknowledged is retried under the same message id (stored once); were the next one
    /// of its lane already sent, the retry would be stored after it (a later stream sequence),
    /// and every node would show that member's lines swapped. One that still fails is reported
    /// to its senders, and so is every event of its lane queued before that failure was known
    /// (its fate is unknown, so nothing of its lane may overtake it).
    async fn publisher(self: Arc<Self>, bus: Bus) {
        let Some(mut rx) = take_once(&self.publish_rx) else {
            return;
        };
        // Lanes with a message in flight → their events queued behind it, in order.
        let mut busy: HashMap<ClientId, VecDeque<Outgoing>> = HashMap::new();
        // Events in `busy`'s queues: at most a publish queue's worth is taken in.
        let mut waiting = 0usize;
        // Lanes whose message failed: events of theirs queued up to then (by
        // `Outgoing::queued`) are refused.
        let mut failed: HashMap<ClientId, u64> = HashMap::new();
        let mut in_flight = futures::stream::FuturesUnordered::new();
        // While the link is down nothing is handed to the client (it would buffer the message
        // and may send it after its sender was told it failed): each message waits for the
        // link (bounded by the bus's publish deadline), and once the link has been down that
        // long, messages fail at once instead of each waiting in turn.
        let mut down_since: Option<Instant> = None;
        let mut open = true;
        let behind = "a line before it did not reach the room";
        loop {
            // The message to hand to the bus after this turn (not inside `select!`, which
            // borrows `in_flight`).
            let mut next: Option<Outgoing> = None;
            tokio::select! {
                out = rx.recv(), if open && waiting < PUBLISH_QUEUE => match out {
                    Some(out) if failed.get(&out.lane).is_some_and(|&upto| out.queued <= upto) => {
                        warn!(msg_id = %out.msg_id, "an event queued behind one that was not delivered is refused");
                        out.refuse(behind);
                        self.unpublished.fetch_sub(1, Ordering::Relaxed);
                    }
                    Some(out) => match busy.get_mut(&out.lane) {
                        Some(queue) => {
                            queue.push_back(out);
                            waiting += 1;
                        }
                        None => {
                            failed.remove(&out.lane);
                            busy.insert(out.lane, VecDeque::new());
                            next = Some(out);
                        }
                    },
                    None => open = false,
                },
                Some((lane, events, delivered)) = in_flight.next() => {
                    self.unpublished.fetch_sub(events, Ordering::Relaxed);
                    let mut queue = busy.remove(&lane).unwrap_or_default();
                    waiting -= queue.len();
                    if delivered {
                        // The link worked since it was last seen down.
                        down_since = None;
                        next = Outgoing::batch(&mut queue);
                        if next.is_some() {
                            waiting += queue.len();
                            busy.insert(lane, queue);
                        }
                    } else {
                        for out in queue {
                            out.refuse(behind);
                            self.unpublished.fetch_sub(out.events(), Ordering::Relaxed);
                        }
                        let now = self.queued.load(Ordering::Relaxed);
                        // Events queued longer ago than the queue holds are all handled.
                        if failed.len() >= 1024 {
                            failed.retain(|_, upto| *upto + PUBLISH_QUEUE as u64 >= now);
                        }
                        failed.insert(lane, now);
                    }
                }
                else => break,
            }
            if let Some(out) = next {
                let sent = self.publish_one(&bus, out, &mut down_since).await;
                in_flight.push(sent);
            }
        }
    }

    /// Hands `out` to the bus and returns what resolves to (its lane, whether it reached the
    /// stream); one that does not is reported to its sender and logged.
    async fn publish_one(
        &self,
        bus: &Bus,
        out: Outgoing,
        down_since: &mut Option<Instant>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = (ClientId, usize, bool)> + Send>> {
        let lane = out.lane;
        let events = out.events();
        if bus.is_connected() {
            *down_since = None;
            let ack = bus.send(out.payload.clone(), &out.msg_id).await;
            let bus = bus.clone();
            return Box::pin(async move {
                if ack.await.is_ok() {
                    return (lane, events, true);
                }
                publish_or_refuse(&bus, out, "the room's message bus did not take it").await
            });
        }
        let since = *down_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= bus::PUBLISH_DEADLINE {
            warn!(msg_id = %out.msg_id, down = ?since.elapsed(), "the room's message bus is unreachable; an event is refused");
            out.refuse("the room's message bus is unreachable");
            return Box::pin(async move { (lane, events, false) });
        }
        let bus = bus.clone();
        Box::pin(async move {
            publish_or_refuse(&bus, out, "the room's message bus is unreachable").await
        })
    }

    /// Follows the stream from `from` and delivers every event to the room.
    async fn consume(self: Arc<Self>, host: Arc<dyn Host>, bus: Bus, from: Seq) {
        let mut sub = bus.subscribe_from(from);
        while let Some(d) = sub.next().await {
            for event in wire::decode_message(&d.payload) {
                match event {
                    Ok(env) => self.apply(&*host, env),
                    Err(e) => warn!(seq = d.seq, error = %e, "skipping a stream message"),
                }
            }
            self.applied.store(d.seq, Ordering::Release);
        }
        // The subscription ends only with its task (a panic): this node no longer follows
        // the room, which must not go unsaid.
        error!("the room's subscription ended; this node no longer delivers the room's events");
    }

    /// Keeps this node's lease fresh: a put every quarter of the node timeout (at most
    /// [`BEAT_MAX`] apart), on a task of its own, so that nothing else the cluster waits for (a
    /// slow listing, a reap of many names) delays it and makes this node look dead to the
    /// others. A put is made again as soon as the link comes back: one sent on the connection
    /// that died waits out its request's timeout, seconds in which the lease, already stale by
    /// the outage, would run out.
    async fn heartbeat(self: Arc<Self>, host: Arc<dyn Host>, bus: Bus) {
        let mut state = bus.state_watch();
        loop {
            // Read each round: `cluster.node-timeout` changes on reload.
            let timeout = host.node_timeout().unwrap_or(self.config.node_timeout);
            let beat = (timeout / 4).clamp(Duration::from_millis(250), BEAT_MAX);
            let next = tokio::time::Instant::now() + beat;
            tokio::select! {
                r = bus.heartbeat(&self.node, lease(self.boot)) => if let Err(e) = r {
                    debug!(error = %e, "lease refresh failed");
                },
                () = reconnected(&mut state) => continue,
            }
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = reconnected(&mut state) => {}
            }
        }
    }

    /// Watches the other nodes' leases, and reaps the names of nodes whose lease stopped.
    async fn reaper(self: Arc<Self>, host: Arc<dyn Host>, bus: Bus) {
        // (node, boot) → (the lease's revision, when this node saw it change). A lease that
        // has not changed for node-timeout is dead, measured on this node's clock only.
        let mut seen: HashMap<(String, u64), (u64, Instant)> = HashMap::new();
        // The names bucket holds an entry per member of the room: it is read while a dead run
        // has names no read since its death has finished reaping, at start, and every
        // FULL_SCAN_EVERY; not every round (at 5,000 members that was a continuous stream of
        // reads and allocations on every node).
        let mut last_scan: Option<Instant> = None;
        let mut reaped: HashSet<(String, u64)> = HashSet::new();
        let mut warned_for = None;
        // When the leases were last read.
        let mut last_read: Option<Instant> = None;
        loop {
            let timeout = host.node_timeout().unwrap_or(self.config.node_timeout);
            if timeout < ELECTION_BOUND && warned_for != Some(timeout) {
                warn!(
                    node_timeout = ?timeout,
                    "cluster.node-timeout is shorter than a NATS leader election (4-9 s): while one runs no lease is refreshed, and the nodes may take each other's users for gone; 10s or more is safe"
                );
            }
            warned_for = Some(timeout);
            tokio::time::sleep(REAP_EVERY).await;
            let leases = match bus.leases().await {
                Ok(leases) => leases,
                Err(e) => {
                    debug!(error = %e, "cannot read the nodes' leases");
                    continue;
                }
            };
            let now = Instant::now();
            // A node that could not read the leases for a while saw none of them change, which
            // says nothing about the others (its own link was down, most likely also their
            // way to it): that time is not counted against them. Without this, both nodes
            // behind a server that hung took each other for gone once they reconnected.
            if let Some(blind) = last_read
                .map(|t| now.duration_since(t))
                .filter(|gap| *gap > BLIND_AFTER)
            {
                debug!(
                    ?blind,
                    "the leases were unreadable for a while; that time is not counted"
                );
                for (_, at) in seen.values_mut() {
                    *at = (*at + blind).min(now);
                }
            }
            last_read = Some(now);
            for (node, value, rev) in leases {
                let Ok(l) = serde_json::from_slice::<Lease>(&value) else {
                    continue;
                };
                let entry = seen.entry((node, l.boot)).or_insert((rev, now));
                if entry.0 != rev {
                    *entry = (rev, now);
                }
            }
            let mut nodes: Vec<String> = seen
                .iter()
                .filter(|(_, (_, at))| now.duration_since(*at) < timeout)
                .map(|((n, _), _)| n.clone())
                .chain(std::iter::once(self.node.clone()))
                .collect();
            nodes.sort();
            nodes.dedup();
            self.link.send_modify(|l| l.live_nodes = nodes);
            let dead = |at: &Instant| now.duration_since(*at) >= timeout;
            let unreaped = seen
                .iter()
                .any(|(run, (_, at))| dead(at) && !reaped.contains(run));
            if !unreaped && last_scan.is_some_and(|t| t.elapsed() < FULL_SCAN_EVERY) {
                continue;
            }
            let names = match bus.names().await {
                Ok(names) => names,
                Err(e) => {
                    debug!(error = %e, "cannot read the room's names");
                    continue;
                }
            };
            last_scan = Some(Instant::now());
            let mut gone = Vec::new();
            for (key, value, rev) in names {
                let Ok(holder) = NameHolder::decode(&value) else {
                    continue;
                };
                let who = &holder.who;
                if self.is_me(who) {
                    continue;
                }
                // A run this node never saw is given a node-timeout from now to show a lease.
                let (_, at) = seen.entry((who.node.clone(), who.boot)).or_insert((0, now));
                if dead(at) {
                    gone.push((key, holder, rev));
                }
            }
            // Runs with a name whose leave or release failed this time: read again next round.
            let unfinished: HashSet<(String, u64)> = futures::stream::iter(gone)
                .map(|(key, holder, rev)| {
                    let (this, bus) = (&self, &bus);
                    async move {
                        let run = (holder.who.node.clone(), holder.who.boot);
                        let done = this.reap(bus, &key, holder, rev).await;
                        (!done).then_some(run)
                    }
                })
                .buffer_unordered(REAP_PARALLEL)
                .filter_map(std::future::ready)
                .collect()
                .await;
            reaped = seen
                .iter()
                .filter(|(run, (_, at))| dead(at) && !unfinished.contains(*run))
                .map(|(run, _)| run.clone())
                .collect();
        }
    }

    /// Announces that `holder`, a user of a dead node, left, then frees its name (if still at
    /// `rev`); true once both are done, false if either failed (the next scan tries again).
    /// The leave goes first, under a message id derived from who left: every survivor may
    /// publish it and the stream keeps one copy, and a failure of either step is simply tried
    /// again. Freeing the name first would lose the leave for good if its publish then failed,
    /// since no later scan would find the name.
    async fn reap(&self, bus: &Bus, key: &str, holder: NameHolder, rev: u64) -> bool {
        let msg_id = format!(
            "reap.{}.{}.{}",
            holder.who.node, holder.who.boot, holder.who.id
        );
        let leave = self.encode(WireEvent::Leave {
            reason: format!("node {} lost", holder.who.node),
            who: holder.who.clone(),
        });
        if let Err(e) = bus.publish(leave, msg_id).await {
            warn!(user = %holder.name, node = %holder.who.node, error = %e, "a dead node's user's leave was not published; trying again");
            return false;
        }
        match bus.release_name(key, rev).await {
            Ok(true) => {
                info!(user = %holder.name, node = %holder.who.node, "a dead node's user leaves");
                true
            }
            // Freed (or taken) by another survivor, which published the same leave.
            Ok(false) => true,
            Err(e) => {
                warn!(user = %holder.name, node = %holder.who.node, error = %e, "a dead node's user's name was not freed; trying again");
                false
            }
        }
    }

    /// Seats again, on every node, members of this node that another node took for gone: this
    /// node's lease lapsed while it was cut off from NATS (longer than `cluster.node-timeout`),
    /// a survivor announced their leaves and freed their names, and they are still connected
    /// here. Each takes its name back and joins again (the others see it leave and come back,
    /// and it is told why); one whose name someone else took meanwhile is told and closed. A
    /// member left alone would be seated here and nowhere else: what it says would reach the
    /// others under a name they no longer reserve, and their lines would still reach it.
    async fn reseat(self: Arc<Self>, host: Arc<dyn Host>, bus: Bus) {
        let Some(rx) = take_once(&self.reseat_rx) else {
            return;
        };
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|id| (id, rx)) },
        )
        .for_each_concurrent(REAP_PARALLEL, |id| self.seat_again(&*host, &bus, id))
        .await;
    }

    /// Takes member `id`'s name back and publishes its join again, or closes it when the name
    /// is someone else's now (or the names cannot be reached in time).
    async fn seat_again(&self, host: &dyn Host, bus: &Bus, id: ClientId) {
        let room = host.room();
        let Some(member) = room.seated(id) else {
            return; // Gone meanwhile: its own leave is on its way.
        };
        let key = wire::kv_key(&chat_proto::names::lookup_key(&member.name));
        let me = self.me(id);
        let value = NameHolder {
            who: me.clone(),
            name: member.name.clone(),
            addr: member.addr,
            at: wire::millis(SystemTime::now()),
            token: self.book().tokens.get(&id).cloned(),
        }
        .encode();
        let deadline = Instant::now() + RESEAT_TIMEOUT;
        // The name's new revision once it is this member's again; `None` once it is lost.
        let held = loop {
            // The survivor that announced the leave deletes the name after it (with the
            // revision it read): the entry is either still ours, gone, or someone else's.
            let step = match bus.name(&key).await {
                Ok(Some((current, rev))) => match NameHolder::decode(&current) {
                    Ok(holder) if holder.who == me => {
                        bus.update_name(&key, value.clone(), rev).await.map(Some)
                    }
                    _ => break None,
                },
                Ok(None) => match bus.claim_name(&key, value.clone()).await {
                    Ok(rev) => Ok(Some(rev)),
                    Err(BusError::Taken(_)) => Ok(None),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            match step {
                Ok(Some(rev)) => break Some(rev),
                // Claimed a moment ago: read it again.
                Ok(None) => {}
                Err(e) if Instant::now() + RESEAT_RETRY < deadline => {
                    debug!(error = %e, "cannot take a member's name back yet");
                    tokio::time::sleep(RESEAT_RETRY).await;
                }
                Err(e) => {
                    warn!(user = %member.name, error = %e, "a member's name could not be taken back in time");
                    break None;
                }
            }
        };
        let Some(rev) = held else {
            warn!(user = %member.name, "a member taken for gone by the cluster lost its name meanwhile; closing it");
            self.drop_claims(id);
            member.outbox.close_with(
                Some(protocol::error_line(
                    code::UNAVAILABLE,
                    "this server was cut off from the other servers for too long; they took \
                     you for gone and your name is no longer yours: reconnect",
                )),
                crate::outbox::Close::Lost,
            );
            room.deliver(Event::Leave {
                id,
                reason: "this server was cut off from the cluster",
            });
            return;
        };
        {
            // Under the books' lock: a leave of this member queued before this check is
            // honoured (the name goes back), one queued after it follows this join in its lane.
            let mut book = self.book();
            if book.leaving.contains(&id) {
                drop(book);
                self.release_keys(vec![(key, rev)]);
                return;
            }
            book.claims.insert(key, (id, rev));
            info!(user = %member.name, "a member taken for gone by the cluster joins again");
            self.send(
                WireEvent::Join {
                    who: me,
                    name: member.name,
                    addr: member.addr,
                    at: wire::millis(SystemTime::now()),
                },
                Some(member.outbox.clone()),
            );
        }
        member.outbox.push(protocol::server_line(
            kind::NOTICE,
            "this server was cut off from the other servers for too long and they took you for \
             gone; you are back in the room, but you missed what was said meanwhile",
        ));
    }

    /// Tells this node's members once when the link to the bus is lost, and once when it is
    /// back; keeps the status current.
    async fn watch_link(self: Arc<Self>, host: Arc<dyn Host>, bus: Bus) {
        let mut state = bus.state_watch();
        let mut degraded = false;
        loop {
            let s = bus.state();
            self.link.send_modify(|l| {
                l.connected = s.connected;
                l.server = s.server.clone();
            });
            if !s.connected && !degraded {
                degraded = true;
                warn!("lost the connection to NATS; the room is degraded");
                host.room().notice_local(
                    "the room is degraded: this server lost its link to the other servers; \
                     messages are not delivered until it is back",
                );
            } else if s.connected && degraded {
                degraded = false;
                info!(server = ?s.server, "connection to NATS is back");
                host.room()
                    .notice_local("the room is back: messages are delivered again");
            }
            tokio::select! {
                r = state.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Writes `ban` to the cluster's ban list, so every node applies it and it outlives every
    /// node's restart. Waits for NATS (bounded); says why when it could not.
    pub fn share_ban(&self, ban: &Ban) -> Result<(), String> {
        let bus = self.bus.get().ok_or("the cluster is not reachable")?;
        let key = wire::kv_key(&ban.target.to_text());
        let value = Bytes::from(serde_json::to_vec(ban).map_err(|e| e.to_string())?);
        match self.wait(bus.ban(&key, value)) {
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("NATS did not answer in time".to_owned()),
        }
    }

    /// Removes the ban on `target` from the cluster's ban list.
    pub fn share_unban(&self, target: &Target) -> Result<(), String> {
        let bus = self.bus.get().ok_or("the cluster is not reachable")?;
        let key = wire::kv_key(&target.to_text());
        match self.wait(bus.unban(&key)) {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("NATS did not answer in time".to_owned()),
        }
    }

    /// Applies the cluster's ban list to this node's: every ban made on any node (also
    /// before this node started), and every ban lifted.
    async fn follow_bans(self: Arc<Self>, host: Arc<dyn Host>, bus: Bus) {
        loop {
            let mut watch = match bus.watch_bans().await {
                Ok(w) => w,
                Err(e) => {
                    debug!(error = %e, "cannot watch the cluster's bans yet");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(entry) = watch.next().await {
                let Ok(entry) = entry else {
                    break;
                };
                match entry.operation {
                    bus::Operation::Put => self.apply_ban(&*host, &entry.value),
                    _ => {
                        let target =
                            wire::from_kv_key(&entry.key).and_then(|t| Target::parse(&t).ok());
                        if let Some(target) = target
                            && let Err(e) = host.bans().remove(&target)
                        {
                            warn!(error = %e, "cannot save a lifted ban from the cluster");
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Adds a ban of the cluster's list to this node's, unless it has it already.
    fn apply_ban(&self, host: &dyn Host, value: &[u8]) {
        match wire::decode_ban(value) {
            Ok(ban) => {
                let known = host.bans().active().contains(&ban);
                if !known && let Err(e) = host.bans().add(ban) {
                    warn!(error = %e, "cannot save a ban from the cluster");
                }
            }
            Err(e) => warn!(error = %e, "skipping a malformed ban from the cluster"),
        }
    }

    /// Remembers one stream message for newcomers, if it is a message or an action.
    fn remember(&self, room: &Room, payload: &[u8]) {
        for env in wire::decode_message(payload).flatten() {
            self.remember_event(room, &env);
        }
    }

    /// Remembers one event for newcomers, if it is a message or an action.
    fn remember_event(&self, room: &Room, env: &Envelope) {
        let (line, at) = match &env.event {
            WireEvent::Say { name, text, at, .. } => (
                protocol::chat_line(&protocol::sanitize(name), &protocol::sanitize(text)),
                *at,
            ),
            WireEvent::Act { name, text, at, .. } => (
                protocol::action_line(&protocol::sanitize(name), &protocol::sanitize(text)),
                *at,
            ),
            _ => return,
        };
        room.remember(wire::time_of(at), line);
    }

    /// This node's identity for a member of another node, seating it if it is new.
    fn seat_remote(
        &self,
        host: &dyn Host,
        who: &MemberRef,
        name: &str,
        addr: SocketAddr,
        at: u64,
        quiet: bool,
    ) -> Option<ClientId> {
        let room = host.room();
        if let Some(id) = room.remote_id(origin(who)) {
            return Some(id);
        }
        let name = match host.validate_name(name) {
            Ok(n) => n,
            Err(e) => {
                warn!(node = %who.node, error = %e, "ignoring a member with an invalid name from the cluster");
                return None;
            }
        };
        room.arrive(
            Remote {
                origin: origin(who),
                name,
                addr,
                joined_at: wire::time_of(at),
            },
            quiet,
        )
    }

    /// This node's identity for `who`, if it is known here.
    fn local_id(&self, host: &dyn Host, who: &MemberRef) -> Option<ClientId> {
        if self.is_me(who) {
            return Some(who.id);
        }
        host.room().remote_id(origin(who))
    }

    /// Where the member `id` of this node's room is connected, for an event about it.
    fn member_ref(&self, id: ClientId) -> Option<MemberRef> {
        if !is_remote(id) {
            return Some(self.me(id));
        }
        let (node, boot, conn) = self.host.get()?.room().remote_origin(id)?;
        Some(MemberRef {
            node: node.to_string(),
            boot,
            id: conn,
        })
    }

    /// Delivers one event from the stream to this node's room.
    fn apply(&self, host: &dyn Host, env: Envelope) {
        let room = host.room();
        let action = matches!(env.event, WireEvent::Act { .. });
        match env.event {
            WireEvent::Join {
                who,
                name,
                addr,
                at,
            } => {
                if self.is_me(&who) {
                    let pending = {
                        let mut book = self.book();
                        let pending = book.pending.remove(&who.id);
                        // A join storm's table is given back once it has drained.
                        if book.pending.is_empty() && book.pending.capacity() > 64 {
                            book.pending = HashMap::new();
                        }
                        pending
                    };
                    let Some(p) = pending else {
                        return; // Left before its join came back: its leave follows.
                    };
                    let Ok(name) = host.validate_name(&name) else {
                        return;
                    };
                    room.deliver(Event::Join(Newcomer {
                        id: who.id,
                        name,
                        addr,
                        transport: p.transport,
                        outbox: p.outbox,
                        welcome: &p.welcome,
                    }));
                    let _ = p.seated.send(());
                } else {
                    self.seat_remote(host, &who, &name, addr, at, false);
                }
            }
            WireEvent::Say {
                who,
                name,
                text,
                at,
            }
            | WireEvent::Act {
                who,
                name,
                text,
                at,
            } => {
                if let Some(id) = self.sender(host, &who, &name, at) {
                    let text = &protocol::sanitize(&text);
                    room.deliver(if action {
                        Event::Act { id, text }
                    } else {
                        Event::Say { id, text }
                    });
                }
            }
            WireEvent::Private { who, to, text } => {
                let Some(from) = self.local_id(host, &who) else {
                    return;
                };
                let text = protocol::sanitize(&text);
                let done = room.deliver(Event::Private {
                    from,
                    to: &to,
                    text: &text,
                });
                if done == Delivered::NoSuchMember
                    && self.is_me(&who)
                    && let Some(o) = room.seated(who.id).map(|m| m.outbox)
                {
                    o.push(protocol::error_line(
                        code::NO_SUCH_USER,
                        &format!(
                            "no user named {:?} is online; your message was not delivered",
                            protocol::sanitize(&to)
                        ),
                    ));
                }
            }
            WireEvent::Rename { who, name } => {
                let Some(id) = self.local_id(host, &who) else {
                    return;
                };
                if self.is_me(&who) {
                    let mut book = self.book();
                    if book.renaming.get(&who.id) == Some(&name) {
                        book.renaming.remove(&who.id);
                    }
                }
                if let Ok(name) = host.validate_name(&name) {
                    room.deliver(Event::Rename { id, name });
                }
            }
            WireEvent::Leave { who, reason } => {
                if self.is_me(&who)
                    && !self.book().leaving.remove(&who.id)
                    && room.seated(who.id).is_some()
                {
                    // Another node took this one for dead (its lease lapsed while it was cut
                    // off from NATS) and announced this member's leave; it is still here.
                    warn!(id = who.id, %reason, "another node announced the leave of a member still connected here; seating it again");
                    let _ = self.reseat.send(who.id);
                    return;
                }
                self.remove(host, &who, |id| Event::Leave {
                    id,
                    reason: &reason,
                });
            }
            WireEvent::Kick { who, reason, ban } => {
                self.remove(host, &who, |id| Event::Kick {
                    id,
                    reason: &reason,
                    ban,
                });
                if self.is_me(&who) {
                    self.forget_local(who.id);
                }
            }
            WireEvent::Replaced { who, why } => {
                self.remove(host, &who, |id| Event::Replaced { id, why: &why });
                if self.is_me(&who) {
                    // Its name now belongs to the reclaiming connection: forget the claim
                    // without releasing it, and do not announce a leave when it closes.
                    self.drop_claims(who.id);
                }
            }
            WireEvent::Announce { text } => {
                room.deliver(Event::Announce {
                    text: &protocol::sanitize(&text),
                });
            }
        }
    }

    /// The sender of a message, seated quietly if this node missed its join.
    fn sender(&self, host: &dyn Host, who: &MemberRef, name: &str, at: u64) -> Option<ClientId> {
        match self.local_id(host, who) {
            Some(id) => Some(id),
            None => self.seat_remote(
                host,
                who,
                name,
                SocketAddr::from(([0, 0, 0, 0], 0)),
                at,
                true,
            ),
        }
    }

    /// Delivers the removal of `who` (the room forgets a member of another node with it).
    fn remove<'e>(
        &self,
        host: &dyn Host,
        who: &MemberRef,
        event: impl FnOnce(ClientId) -> Event<'e>,
    ) {
        if let Some(id) = self.local_id(host, who) {
            host.room().deliver(event(id));
        }
    }

    /// Forgets what the books hold for member `id` without releasing any name (its names are
    /// someone else's, or free, already).
    fn drop_claims(&self, id: ClientId) {
        let mut book = self.book();
        book.pending.remove(&id);
        book.tokens.remove(&id);
        book.renaming.remove(&id);
        book.claims.retain(|_, (holder, _)| *holder != id);
    }

    /// A member of this node is gone (left or kicked): its names are released.
    fn forget_local(&self, id: ClientId) {
        let released: Vec<(String, u64)> = {
            let mut book = self.book();
            book.pending.remove(&id);
            book.renaming.remove(&id);
            book.tokens.remove(&id);
            let keys: Vec<String> = book
                .claims
                .iter()
                .filter(|(_, (holder, _))| *holder == id)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| book.claims.remove(&k).map(|(_, rev)| (k, rev)))
                .collect()
        };
        self.release_keys(released);
    }

    fn release_keys(&self, keys: Vec<(String, u64)>) {
        if keys.is_empty() {
            return;
        }
        let Some(bus) = self.bus.get().cloned() else {
            return;
        };
        tokio::spawn(async move {
            let mut failed = None;
            for (key, rev) in keys {
                if let Err(e) = bus.release_name(&key, rev).await {
                    failed.get_or_insert(e);
                }
            }
            // One line per batch, not per name: a mass disconnect while NATS is away would
            // otherwise log thousands.
            if let Some(e) = failed {
                warn!(error = %e, "cannot release names in the cluster; they are freed when this node's lease ends");
            }
        });
    }

    /// Books `who` as joining and publishes its join; the receiver fires once the join came
    /// back from the stream and the member is seated here.
    fn publish_join(&self, who: Newcomer<'_>) -> tokio::sync::oneshot::Receiver<()> {
        let Newcomer {
            id,
            name,
            addr,
            transport,
            outbox,
            welcome,
        } = who;
        let (seated, is_seated) = tokio::sync::oneshot::channel();
        self.book().pending.insert(
            id,
            PendingJoin {
                outbox: outbox.clone(),
                welcome: welcome.to_vec(),
                seated,
                transport,
            },
        );
        self.send(
            WireEvent::Join {
                who: self.me(id),
                name: name.display,
                addr,
                at: wire::millis(SystemTime::now()),
            },
            Some(outbox),
        );
        is_seated
    }

    /// Whether the name entry `key`, held at `rev`, is deleted or changes hands before
    /// `deadline`: read again every [`RELEASE_POLL`] (a read is one request, where a watch
    /// would create a consumer on every server of the bucket).
    async fn released_within(&self, bus: &Bus, key: &str, rev: u64, deadline: Instant) -> bool {
        loop {
            if Instant::now() + RELEASE_POLL > deadline {
                return false;
            }
            tokio::time::sleep(RELEASE_POLL).await;
            match bus.name(key).await {
                Ok(Some((_, now))) if now == rev => {}
                Ok(_) => return true,
                Err(_) => return false,
            }
        }
    }

    /// Runs `f` on the runtime and waits for it from synchronous code (an admin's ban): the
    /// caller's worker hands its other tasks to another thread meanwhile.
    fn wait<F: std::future::Future>(&self, f: F) -> Option<F::Output> {
        let handle = tokio::runtime::Handle::try_current().ok()?;
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return None;
        }
        tokio::task::block_in_place(|| {
            handle.block_on(async { tokio::time::timeout(CLAIM_TIMEOUT, f).await.ok() })
        })
    }
}

impl Engine for Cluster {
    fn claim<'a>(
        &'a self,
        claim: Claim<'a>,
        may_replace: &'a (dyn Fn(ClientId) -> bool + Sync),
        refusal: NameError,
    ) -> Pending<'a, Result<Option<ClientId>, NameError>> {
        Box::pin(async move {
            let Some(bus) = self.bus.get() else {
                return Err(NameError::Unavailable);
            };
            let key = wire::kv_key(&claim.name.key);
            let (mine, token) = {
                let book = self.book();
                let mine = book
                    .claims
                    .get(&key)
                    .is_some_and(|(h, _)| *h == claim.holder);
                (mine, book.tokens.get(&claim.holder).cloned())
            };
            if mine {
                return Ok(None);
            }
            let value = NameHolder {
                who: self.me(claim.holder),
                name: claim.name.display.clone(),
                addr: claim.addr,
                at: wire::millis(SystemTime::now()),
                token,
            }
            .encode();
            let proof = claim.proof;
            let attempt = async {
                let deadline = Instant::now() + RELEASE_GRACE;
                loop {
                    match bus.claim_name(&key, value.clone()).await {
                        Ok(rev) => return Ok((rev, None)),
                        Err(BusError::Taken(_)) => {}
                        Err(e) => return Err(Some(e)),
                    }
                    // Held: handed over only to a reclaim with the holder's token. A holder
                    // of this very run is checked against the token itself; one on another
                    // node (or of an earlier run of this one) against the digest its node
                    // stored beside the name.
                    let (current, rev) = match bus.name(&key).await {
                        Ok(Some(held)) => held,
                        // Released since: claim it again.
                        Ok(None) if Instant::now() < deadline => continue,
                        _ => return Err(None),
                    };
                    let Ok(holder) = NameHolder::decode(&current) else {
                        return Err(None);
                    };
                    let mine = self.is_me(&holder.who);
                    let allowed = if mine {
                        may_replace(holder.who.id)
                    } else {
                        proof.is_some() && holder.token.as_deref() == proof
                    };
                    if allowed {
                        return match bus.update_name(&key, value.clone(), rev).await {
                            Ok(new_rev) => Ok((new_rev, Some(holder.who))),
                            Err(_) => Err(None),
                        };
                    }
                    // Not ours to take, but perhaps on its way out: a name is deleted a round
                    // trip after its holder leaves or renames, and someone who hangs up on one
                    // node and comes straight back through another must not find it taken.
                    // A holder this node still books is live: refused at once.
                    let leaving = !mine || !self.book().claims.contains_key(&key);
                    if !leaving || !self.released_within(bus, &key, rev, deadline).await {
                        return Err(None);
                    }
                }
            };
            match tokio::time::timeout(CLAIM_TIMEOUT, attempt).await {
                Ok(Ok((rev, replaced))) => {
                    self.book().claims.insert(key, (claim.holder, rev));
                    match replaced {
                        // A member of this run: the room sends it off (`Event::Replaced`).
                        Some(who) if self.is_me(&who) => Ok(Some(who.id)),
                        // A member of another node (or of an earlier run of this one): its
                        // replacement is published from here, seated here or not, ahead of
                        // the newcomer's join.
                        Some(who) => {
                            self.send(
                                WireEvent::Replaced {
                                    who,
                                    why: RECLAIMED_REASON.to_owned(),
                                },
                                None,
                            );
                            Ok(None)
                        }
                        None => Ok(None),
                    }
                }
                Ok(Err(None)) => Err(refusal),
                Ok(Err(Some(e))) => {
                    warn!(error = %e, "cannot claim a name in the cluster");
                    Err(NameError::Unavailable)
                }
                Err(_) => Err(NameError::Unavailable),
            }
        })
    }

    fn join<'a>(
        &'a self,
        _room: &'a (dyn Deliver + Sync),
        who: Newcomer<'a>,
    ) -> Pending<'a, Option<Delivered>> {
        let id = who.id;
        let is_seated = self.publish_join(who);
        Box::pin(async move {
            // The session waits until its join comes back from the stream and it is seated
            // (a round trip to NATS), so what it sends next is ordered after its join on every
            // node, and what it asks is answered after its welcome and history, as on a single
            // node.
            if let Ok(Ok(())) = tokio::time::timeout(CLAIM_TIMEOUT, is_seated).await {
                return None;
            }
            // Not seated in time: take the join back everywhere, so no node keeps a member
            // this one never seated.
            warn!("a join was not delivered back by the cluster in time; refusing it");
            self.book().leaving.insert(id);
            self.send(
                WireEvent::Leave {
                    who: self.me(id),
                    reason: "the room did not answer".to_owned(),
                },
                None,
            );
            self.forget_local(id);
            Some(Delivered::NotDelivered)
        })
    }

    fn release(&self, key: &str, holder: ClientId) {
        let key = wire::kv_key(key);
        let released = {
            let mut book = self.book();
            match book.claims.get(&key) {
                Some((h, rev)) if *h == holder => {
                    let rev = *rev;
                    book.claims.remove(&key);
                    vec![(key, rev)]
                }
                _ => Vec::new(),
            }
        };
        self.release_keys(released);
    }

    fn append(&self, room: &dyn Deliver, event: Event<'_>) -> Option<Delivered> {
        let at = wire::millis(SystemTime::now());
        match event {
            Event::Join(who) => {
                // Delivered when it comes back from the stream; `join` is what waits for that.
                drop(self.publish_join(who));
            }
            Event::Say { id, text } | Event::Act { id, text } => {
                let action = matches!(event, Event::Act { .. });
                let member = room.seated(id)?;
                let name = match self.book().renaming.get(&id) {
                    Some(new) => new.clone(),
                    None => member.name,
                };
                let outbox = member.outbox;
                let (who, text) = (self.me(id), text.to_owned());
                let event = if action {
                    WireEvent::Act {
                        who,
                        name,
                        text,
                        at,
                    }
                } else {
                    WireEvent::Say {
                        who,
                        name,
                        text,
                        at,
                    }
                };
                self.send(event, Some(outbox));
            }
            Event::Private { from, to, text } => {
                let outbox = room.seated(from).map(|m| m.outbox);
                self.send(
                    WireEvent::Private {
                        who: self.me(from),
                        to: to.to_owned(),
                        text: text.to_owned(),
                    },
                    outbox,
                );
            }
            Event::Rename { id, name } => {
                let outbox = room.seated(id).map(|m| m.outbox);
                self.book().renaming.insert(id, name.display.clone());
                let new_key = wire::kv_key(&name.key);
                self.send(
                    WireEvent::Rename {
                        who: self.me(id),
                        name: name.display,
                    },
                    outbox,
                );
                // The old name is free once the rename is on its way (the room releases it
                // itself only when the engine delivers at once).
                let old: Vec<(String, u64)> = {
                    let mut book = self.book();
                    let keys: Vec<String> = book
                        .claims
                        .iter()
                        .filter(|(k, (h, _))| *h == id && **k != new_key)
                        .map(|(k, _)| k.clone())
                        .collect();
                    keys.into_iter()
                        .filter_map(|k| book.claims.remove(&k).map(|(_, rev)| (k, rev)))
                        .collect()
                };
                self.release_keys(old);
            }
            Event::Leave { id, reason } => {
                // Seated, or its join on its way (the room asks once: see `Room::leave`).
                if room.seated(id).is_some() || self.book().pending.contains_key(&id) {
                    self.book().leaving.insert(id);
                    self.send(
                        WireEvent::Leave {
                            who: self.me(id),
                            reason: reason.to_owned(),
                        },
                        None,
                    );
                    self.forget_local(id);
                }
            }
            Event::Kick { id, reason, ban } => {
                if let Some(who) = self.member_ref(id) {
                    self.send(
                        WireEvent::Kick {
                            who,
                            reason: reason.to_owned(),
                            ban,
                        },
                        None,
                    );
                }
            }
            Event::Replaced { id, why } => {
                if let Some(who) = self.member_ref(id) {
                    self.send(
                        WireEvent::Replaced {
                            who,
                            why: why.to_owned(),
                        },
                        None,
                    );
                }
            }
            Event::Announce { text } => {
                self.send(
                    WireEvent::Announce {
                        text: text.to_owned(),
                    },
                    None,
                );
            }
        }
        None
    }

    fn token_issued<'a>(
        &'a self,
        room: &'a (dyn Deliver + Sync),
        holder: ClientId,
        digest: &'a str,
    ) -> Pending<'a, ()> {
        Box::pin(async move {
            // Every name entry this member holds gets the digest, compare-and-set on the
            // revision this node claimed it at.
            let member = room.seated(holder);
            let updates: Vec<(String, u64, Bytes)> = {
                let mut book = self.book();
                book.tokens.insert(holder, digest.to_owned());
                let Some(member) = member else {
                    return;
                };
                let value = NameHolder {
                    who: self.me(holder),
                    name: member.name.clone(),
                    addr: member.addr,
                    at: wire::millis(SystemTime::now()),
                    token: Some(digest.to_owned()),
                }
                .encode();
                book.claims
                    .iter()
                    .filter(|(_, (h, _))| *h == holder)
                    .map(|(k, (_, rev))| (k.clone(), *rev, value.clone()))
                    .collect()
            };
            let Some(bus) = self.bus.get() else {
                return;
            };
            for (key, rev, value) in updates {
                let stored =
                    tokio::time::timeout(CLAIM_TIMEOUT, bus.update_name(&key, value, rev)).await;
                match stored {
                    Ok(Ok(new_rev)) => {
                        if let Some(entry) = self.book().claims.get_mut(&key)
                            && entry.1 == rev
                        {
                            entry.1 = new_rev;
                        }
                    }
                    _ => warn!(
                        "cannot store a reclaim token's digest in the cluster; this name can then be reclaimed only on this node"
                    ),
                }
            }
        })
    }
}

/// What `slot` holds, taken by the one task that consumes it (a queue's receiving end); `None`
/// for any later caller.
fn take_once<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Resolves when the link to NATS is (again) up after a change of its state; never, once the
/// bus is gone.
async fn reconnected(state: &mut watch::Receiver<bus::ConnState>) {
    loop {
        if state.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        if state.borrow_and_update().connected {
            return;
        }
    }
}

/// A lease's value.
fn lease(boot: u64) -> Bytes {
    Bytes::from(serde_json::to_vec(&Lease { boot }).unwrap_or_default())
}

/// Publishes `out` (the bus retries within its deadline); when it finally fails, logs it and
/// tells its senders `why`. Resolves to (its lane, its events, whether it reached the stream).
async fn publish_or_refuse(bus: &Bus, out: Outgoing, why: &str) -> (ClientId, usize, bool) {
    let events = out.events();
    match bus.publish(out.payload.clone(), out.msg_id.clone()).await {
        Ok(_) => (out.lane, events, true),
        Err(e) => {
            warn!(error = %e, events, "a room event was not delivered to the cluster");
            out.refuse(why);
            (out.lane, events, false)
        }
    }
}

/// Tells the sender of a line that it did not reach the room.
fn not_delivered(sender: Option<&Outbox>, why: &str) {
    if let Some(o) = sender {
        o.push(protocol::error_line(
            code::NOT_DELIVERED,
            &format!("your last line was not delivered: {why}; send it again"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(text: &str, sender: Option<Arc<Outbox>>) -> Outgoing {
        Outgoing {
            payload: Bytes::from(text.to_owned()),
            msg_id: format!("id-{text}"),
            sender,
            also: Vec::new(),
            lane: 1,
            queued: 0,
        }
    }

    fn texts(out: &Outgoing) -> Vec<String> {
        out.payload
            .split(|&b| b == b'\n')
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect()
    }

    /// A lane's queued events go as one message under the first one's id, in order, within
    /// the wire's bounds.
    #[test]
    fn a_lanes_queue_is_batched_in_order_within_bounds() {
        let outbox = Arc::new(Outbox::new(1 << 16));
        let mut queue: VecDeque<Outgoing> = ["a", "b", "c"]
            .into_iter()
            .map(|t| event(t, Some(outbox.clone())))
            .collect();
        let first = Outgoing::batch(&mut queue).unwrap_or_else(|| panic!("nothing batched"));
        assert_eq!(texts(&first), ["a", "b", "c"]);
        assert_eq!((first.msg_id.as_str(), first.events()), ("id-a", 3));
        assert!(Outgoing::batch(&mut queue).is_none());

        // Every sender of a refused batch is told.
        first.refuse("test");
        let mut told = VecDeque::new();
        outbox.drain_into(&mut told);
        assert_eq!(told.len(), 3);

        // Never more than MAX_BATCH events or MAX_MESSAGE bytes in one message.
        let mut queue: VecDeque<Outgoing> = (0..wire::MAX_BATCH + 5)
            .map(|i| event(&i.to_string(), None))
            .collect();
        let full = Outgoing::batch(&mut queue).unwrap_or_else(|| panic!("nothing"));
        assert_eq!(full.events(), wire::MAX_BATCH);
        assert_eq!(queue.len(), 5);
        let big = "x".repeat(wire::MAX_MESSAGE / 3);
        let mut queue: VecDeque<Outgoing> = (0..4).map(|_| event(&big, None)).collect();
        let some = Outgoing::batch(&mut queue).unwrap_or_else(|| panic!("nothing"));
        assert!(some.payload.len() <= wire::MAX_MESSAGE);
        assert_eq!((some.events(), queue.len()), (2, 2));
    }
}
