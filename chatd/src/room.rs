//! The chatroom: who is in it, their names, recent history, and fan-out.
//!
//! This is the room's whole interface: events come in as method calls (`join`, `say_all`,
//! `leave`, `kick`, ...) and every effect goes out as encoded frames pushed into members'
//! [`Outbox`]es.
//! The room never touches a socket, so a message bus or another protocol can drive it or listen
//! to it by being one more caller or one more outbox.
//!
//! Ordering: every broadcast is pushed into all outboxes while the room lock is held, so all
//! members receive room lines in one global order. The lock is a std mutex held only for those
//! pushes (each a short copy into the member's byte queue, or a refcount bump and a queue
//! append, see `outbox`); no I/O and no `.await` happen under it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};

use crate::engine::{
    Claim, ClientId, Deliver, Delivered, Engine, Event, Local, Newcomer, Said, Seated, Transport,
};
use crate::outbox::{COPY_MAX, Close, Outbox};
use crate::reclaim::Token;
use chat_proto::names::{Name, NameError};
use chat_proto::protocol::{self, kind};

mod remote;

use remote::Remotes;
pub use remote::{Origin, REMOTE_IDS, is_remote};

/// The `*** KICKED` reason of a member whose name a newer connection reclaimed (a WebSocket
/// client is closed with its own code for it).
pub const RECLAIMED_REASON: &str = "your name was reclaimed by a new connection";

/// A member of the room connected to this node (members of other nodes of a cluster are in
/// the compact table of `remote.rs`).
#[derive(Debug)]
struct Member {
    name: Name,
    /// Where its lines go.
    outbox: Arc<Outbox>,
    /// Its place in [`State::fanout`].
    slot: usize,
    addr: SocketAddr,
    /// What carries its bytes.
    transport: Transport,
    /// Its leave is on its way (a cluster delivers it later): asked to leave again, it does
    /// not leave twice.
    leaving: bool,
    joined_at: SystemTime,
    last_active: Instant,
}

/// Presence changes (joins and leaves) closer together than this are a storm: their
/// `*** JOIN` and `*** LEAVE` lines are collected and sent together, as one shared frame per
/// member, [`batch_window`] later (or earlier, before any other room line, so the order everyone
/// sees is unchanged). A lone join or leave is sent at once. Without this a storm of n joins, or
/// n clients dropping at once (a network blip, a proxy restart), costs n² queue pushes and
/// writer wake-ups, and as many queue entries in the outboxes of sessions that have not yet
/// noticed they are gone.
pub const PRESENCE_COALESCE: Duration = Duration::from_millis(20);

/// How long a storm's announcements are collected: every flush wakes every member's writer, so
/// the window grows with the room (5 µs of wake-ups per member, from 20 ms for up to 4,000
/// members to at most 250 ms), keeping a storm's writer wake-ups near 200,000 a second however
/// large the room is.
pub fn batch_window(members: usize) -> Duration {
    let per_member = Duration::from_micros(5);
    per_member
        .saturating_mul(u32::try_from(members).unwrap_or(u32::MAX))
        .clamp(PRESENCE_COALESCE, Duration::from_millis(250))
}

/// How many presence changes in a row, each within [`PRESENCE_COALESCE`] of the one before, are
/// still announced at once; the next one opens a batch (which then takes every join and leave
/// until it is sent). A few friends arriving or leaving together are never delayed.
const STORM_STREAK: u32 = 8;

/// The `*** JOIN` and `*** LEAVE` lines of a storm not yet sent.
#[derive(Debug)]
struct PresenceBatch {
    /// The lines, in the order the changes happened.
    lines: BytesMut,
    /// How many lines `lines` holds.
    count: usize,
    /// Members who joined during this batch → (where their own line ends, how many lines up to
    /// and including it): they are sent only the lines after theirs, as if each had been sent
    /// at once. (Members who leave during the batch are no longer members, so they get nothing.)
    newcomers: HashMap<ClientId, (usize, usize)>,
    /// When the batch must be sent at the latest.
    due: Instant,
}

/// A member connected to another node of a cluster, as that node announced it.
#[derive(Debug, Clone)]
pub struct Remote<'a> {
    /// Where it is connected: its node, the node's run and its connection there.
    pub origin: Origin<'a>,
    /// Its name, validated here too.
    pub name: Name,
    /// Its peer address, for `chatctl list` and bans.
    pub addr: SocketAddr,
    /// When it joined.
    pub joined_at: SystemTime,
}

/// A stored message, for newcomers.
#[derive(Debug)]
struct HistoryEntry {
    at: SystemTime,
    /// The frame as it was broadcast (shared, not copied).
    line: Bytes,
}

#[derive(Debug, Default)]
struct State {
    /// Members connected to this node.
    members: HashMap<ClientId, Member>,
    /// The outboxes of `members`, packed: what every fan-out walks. A broadcast reads 16 bytes
    /// per recipient here instead of a whole map entry (~130 bytes: name, address, times), so
    /// at 10,000 members it streams 160 KB rather than 1.3 MB through the cache, which the
    /// recipients' own queues and the kernel's sockets need too. `Member::slot` indexes it.
    fanout: Vec<(ClientId, Arc<Outbox>)>,
    /// Members connected to other nodes of a cluster (no outbox here), with their own index
    /// by name.
    remote: Remotes,
    /// Name key → member of this node, for lookups by name.
    by_key: HashMap<String, ClientId>,
    history: VecDeque<HistoryEntry>,
    history_cap: usize,
    /// When membership last changed, and how many changes in a row came that close together:
    /// a storm, or a lone join or leave.
    last_change: Option<Instant>,
    streak: u32,
    /// Joins and leaves not yet announced; every other room line sends them first.
    presence: Option<PresenceBatch>,
    /// The server is shutting down: everyone is told once (`*** SHUTDOWN`), so members who
    /// leave now are not announced; with n members that would be n² lines at the worst moment.
    closing: bool,
}

impl State {
    /// Keeps `line` as the newest history entry, dropping the oldest past the cap (none kept
    /// when history is off).
    fn remember(&mut self, at: SystemTime, line: Bytes) {
        if self.history_cap == 0 {
            return;
        }
        if self.history.len() == self.history_cap {
            self.history.pop_front();
        }
        self.history.push_back(HistoryEntry { at, line });
    }

    /// Members on this node and on others.
    fn len(&self) -> usize {
        self.members.len() + self.remote.len()
    }

    /// Every member's name key, display name and address, on this node and on others.
    fn everyone(&self) -> impl Iterator<Item = (ClientId, &str, &str, SocketAddr)> {
        let local = self
            .members
            .iter()
            .map(|(id, m)| (*id, &*m.name.key, &*m.name.display, m.addr));
        let remote = self
            .remote
            .iter()
            .map(|(id, m)| (id, m.key, m.display, m.addr));
        local.chain(remote)
    }

    /// The display name and address of member `id`, wherever it is connected.
    fn member(&self, id: ClientId) -> Option<(&str, SocketAddr)> {
        match self.members.get(&id) {
            Some(m) => Some((&m.name.display, m.addr)),
            None => self.remote.get(id).map(|m| (m.display, m.addr)),
        }
    }

    /// Seats a member of this node: in the map, and its outbox in the fan-out list.
    fn seat_local(&mut self, id: ClientId, mut member: Member) {
        member.slot = self.fanout.len();
        self.fanout.push((id, member.outbox.clone()));
        self.members.insert(id, member);
    }

    /// The member with name key `key`: of this node first (a name handed over between nodes
    /// is briefly both until the old holder's removal is delivered).
    fn by_name(&self, key: &str) -> Option<ClientId> {
        self.by_key
            .get(key)
            .copied()
            .or_else(|| self.remote.find(key))
    }

    /// Removes member `id` wherever it is connected: its name, address and (for a member of
    /// this node) outbox.
    fn take(&mut self, id: ClientId) -> Option<(Name, SocketAddr, Option<Arc<Outbox>>)> {
        if let Some(m) = self.members.remove(&id) {
            if self.by_key.get(&m.name.key) == Some(&id) {
                self.by_key.remove(&m.name.key);
            }
            // The last outbox moves into the freed place; its member learns where it went.
            self.fanout.swap_remove(m.slot);
            if let Some((moved, _)) = self.fanout.get(m.slot)
                && let Some(other) = self.members.get_mut(moved)
            {
                other.slot = m.slot;
            }
            return Some((m.name, m.addr, Some(m.outbox)));
        }
        let (name, addr) = self.remote.remove(id)?;
        Some((name, addr, None))
    }
}

/// Counters shown by `chatctl status`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Room messages and actions accepted from this node's users.
    pub messages: AtomicU64,
    /// Lines queued to recipients (one message to N others counts N; a batched storm frame
    /// counts each of its lines).
    pub deliveries: AtomicU64,
    /// Members kicked by an admin.
    pub kicks: AtomicU64,
    /// How long pushing each room message to every member took (one observation per message).
    pub fanout: FanoutHistogram,
}

/// Upper bounds, in nanoseconds, of the fan-out latency buckets: 10 µs to 100 ms.
pub const FANOUT_BUCKETS_NS: [u64; 12] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    100_000_000,
];

/// A latency histogram of plain atomics: one bucket add and one sum add per observation, read
/// by `/metrics` (all buckets) and `chatctl status` (count and sum) alike.
#[derive(Debug, Default)]
pub struct FanoutHistogram {
    /// Observations per bucket of [`FANOUT_BUCKETS_NS`], not cumulative; the last one is
    /// everything slower.
    pub buckets: [AtomicU64; FANOUT_BUCKETS_NS.len() + 1],
    /// Sum of all observations, in nanoseconds.
    pub sum_ns: AtomicU64,
}

impl FanoutHistogram {
    /// Records one fan-out that took `took`.
    pub fn observe(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let i = FANOUT_BUCKETS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(FANOUT_BUCKETS_NS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// What this node's members have queued and not yet written, for `chatctl status` and
/// `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueuedBytes {
    /// In all outboxes together.
    pub total: u64,
    /// In the fullest outbox.
    pub max: u64,
}

/// What `chatctl list` shows of one member.
#[derive(Debug, Clone)]
pub struct MemberInfo {
    /// Display name.
    pub name: String,
    /// Peer address.
    pub addr: SocketAddr,
    /// When the member joined (took a name).
    pub joined_at: SystemTime,
    /// Time since the member last sent a message (or joined).
    pub idle: std::time::Duration,
    /// The cluster node it is connected to; `None` for this node.
    pub node: Option<String>,
    /// What carries its bytes; `None` for a member of another node.
    pub transport: Option<Transport>,
}

/// Why a room operation addressed to a name failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    /// No member has that name.
    #[error("no user named {0:?} is online")]
    NoSuchUser(String),
    /// The name rules or uniqueness refused a name.
    #[error(transparent)]
    Name(#[from] NameError),
}

/// The shared chatroom.
#[derive(Debug)]
pub struct Room {
    state: Mutex<State>,
    /// Activity counters, readable without the lock.
    pub counters: Counters,
    /// Reclaim tokens issued to members' connections (see reclaim.rs).
    pub reclaims: crate::reclaim::Reclaims,
    /// Wakes [`Room::flush_when_due`] when a presence batch opens.
    batch_opened: tokio::sync::Notify,
    /// What decides the order of events and who holds a name (engine.rs).
    engine: Arc<dyn Engine>,
}

impl Room {
    /// An empty room of a single node keeping `history` recent messages.
    pub fn new(history: usize) -> Self {
        Self::with_engine(history, Arc::new(Local::default()))
    }

    /// An empty room keeping `history` recent messages, ordered by `engine`.
    pub fn with_engine(history: usize, engine: Arc<dyn Engine>) -> Self {
        Room {
            state: Mutex::new(State {
                history_cap: history,
                ..State::default()
            }),
            counters: Counters::default(),
            reclaims: Default::default(),
            batch_opened: tokio::sync::Notify::new(),
            engine,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation below leaves `State` consistent before it can panic (maps are updated
        // together, pushes cannot fail), so a poisoned lock holds valid data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The answer to `/token` from member `id`: its reclaim token, which the engine learns of
    /// (a cluster keeps its digest, so the name can be reclaimed on any node) before the
    /// answer is given.
    pub async fn token_line(&self, id: ClientId) -> Bytes {
        let (line, token) = self.reclaims.token_line(id);
        if let Some(token) = token {
            self.engine.token_issued(self, id, &token.digest()).await;
        }
        line
    }

    /// Changes how many messages are kept (config reload); trims at once.
    pub fn set_history_cap(&self, cap: usize) {
        let mut st = self.lock();
        st.history_cap = cap;
        while st.history.len() > cap {
            st.history.pop_front();
        }
    }

    /// Adds a member under `name`. On success the newcomer's outbox gets `welcome` (not a room
    /// line) and then the history, atomically with the join, and everyone else gets `*** JOIN`
    /// (at once, or in a storm's batch: see [`PRESENCE_COALESCE`]). Ready at once on a single
    /// node; a cluster's engine waits for NATS (the claim, then the join's round trip).
    pub async fn join(&self, who: Newcomer<'_>) -> Result<usize, NameError> {
        self.engine
            .claim(who.claim(), &|_| false, NameError::Taken)
            .await?;
        let (key, id) = (who.name.key.clone(), who.id);
        self.seat(who, &key, id).await
    }

    /// Like [`join`](Self::join), but when the name is held by the member whose connection
    /// `token` (as sent, in hex) was issued to, that member is removed first (told
    /// `*** KICKED`, everyone else `*** LEAVE <name> left (reconnected)`); the engine hands the
    /// name over in one step, so nobody can take it in between. A free name is simply joined.
    /// A wrong or malformed token is [`NameError::ReclaimRefused`], never `name-taken`, so a
    /// client can tell "this token is not (or no longer) the holder's" from other refusals.
    pub async fn reclaim(&self, who: Newcomer<'_>, token: &str) -> Result<usize, NameError> {
        let token = Token::from_hex(token).ok_or(NameError::ReclaimRefused)?;
        let (key, id) = (who.name.key.clone(), who.id);
        let digest = token.digest();
        let claim = Claim {
            proof: Some(&digest),
            ..who.claim()
        };
        let replaced = self
            .engine
            .claim(
                claim,
                &|holder| holder != id && self.reclaims.matches(holder, &token),
                NameError::ReclaimRefused,
            )
            .await?;
        if let Some(holder) = replaced {
            let why = RECLAIMED_REASON;
            self.engine
                .append(self, Event::Replaced { id: holder, why });
        }
        self.seat(who, &key, id).await
    }

    /// Appends the join of `who`, whose name `key` is claimed; gives the name back if the join
    /// could not be delivered.
    async fn seat(&self, who: Newcomer<'_>, key: &str, id: ClientId) -> Result<usize, NameError> {
        match self.engine.join(self, who).await {
            Some(Delivered::Joined { users }) => Ok(users),
            None => Ok(self.len()),
            Some(other) => {
                self.engine.release(key, id);
                Err(if other == Delivered::NotDelivered {
                    NameError::Unavailable
                } else {
                    NameError::Taken
                })
            }
        }
    }

    /// A message from member `id` to everyone else; `text` must already be sanitised. (The
    /// daemon's sessions say through [`Room::say_all`]; this is the one-line event, for tests.)
    #[cfg(test)]
    pub fn say(&self, id: ClientId, text: &str) {
        self.counters.messages.fetch_add(1, Ordering::Relaxed);
        self.engine.append(self, Event::Say { id, text });
    }

    /// Messages and actions from member `id` that arrived together, in order (each text
    /// already sanitised): everyone else gets them one after the other, with nothing between.
    pub fn say_all(&self, id: ClientId, said: &Said) {
        self.counters
            .messages
            .fetch_add(said.len() as u64, Ordering::Relaxed);
        self.engine.append_said(self, id, said);
    }

    /// An action (`/me`) from member `id` (for tests, as [`Room::say`]).
    #[cfg(test)]
    pub fn act(&self, id: ClientId, text: &str) {
        self.counters.messages.fetch_add(1, Ordering::Relaxed);
        self.engine.append(self, Event::Act { id, text });
    }

    /// A private message from member `from` to the member named `to`.
    pub fn private(&self, from: ClientId, to: &str, text: &str) -> Result<String, RoomError> {
        // Checked first so an engine that delivers later refuses a nobody at once, like a
        // single node; a recipient who leaves before the delivery is reported by the engine.
        let target = {
            let st = self.lock();
            let id = self.find(&st, to)?;
            st.member(id).map(|(name, _)| name.to_owned())
        };
        let target = target.ok_or_else(|| RoomError::NoSuchUser(to.to_owned()))?;
        match self.engine.append(self, Event::Private { from, to, text }) {
            Some(Delivered::Sent { to }) => Ok(to),
            None => Ok(target),
            Some(_) => Err(RoomError::NoSuchUser(to.to_owned())),
        }
    }

    /// Renames member `id`; everyone (including the member) is told. Returns the old name.
    pub async fn rename(&self, id: ClientId, new: Name) -> Result<String, NameError> {
        let key = new.key.clone();
        let Some((old, addr)) = self
            .lock()
            .member(id)
            .map(|(name, addr)| (name.to_owned(), addr))
        else {
            return Err(NameError::Empty);
        };
        let claim = Claim {
            name: &new,
            holder: id,
            addr,
            proof: None,
        };
        self.engine
            .claim(claim, &|_| false, NameError::Taken)
            .await?;
        match self.engine.append(self, Event::Rename { id, name: new }) {
            Some(Delivered::Renamed { old }) => {
                let old_key = chat_proto::names::lookup_key(&old);
                if old_key != key {
                    self.engine.release(&old_key, id);
                }
                Ok(old)
            }
            None => Ok(old),
            Some(_) => {
                self.engine.release(&key, id);
                Err(NameError::Empty)
            }
        }
    }

    /// Removes member `id` (if still present) and tells everyone else why. Idempotent: a
    /// member whose leave is on its way (in a cluster) is not sent off twice.
    pub fn leave(&self, id: ClientId, reason: &str) -> Option<String> {
        if let Some(m) = self.lock().members.get_mut(&id) {
            if m.leaving {
                return None;
            }
            m.leaving = true;
        }
        match self.engine.append(self, Event::Leave { id, reason })? {
            Delivered::Removed { name, .. } => {
                self.engine.release(&name.key, id);
                Some(name.display)
            }
            _ => None,
        }
    }

    /// Marks the room as shutting down: from now on leaves are not announced (every session
    /// tells its own client `*** SHUTDOWN`). A node's own shutdown, not a room event.
    pub fn close(&self) {
        let mut st = self.lock();
        self.send_presence(&mut st);
        st.closing = true;
    }

    /// Disconnects the member named `name`: they get `*** KICKED <reason>`, everyone else
    /// `*** KICK`. Returns the member's display name and address.
    pub fn kick(&self, name: &str, reason: &str) -> Result<(String, SocketAddr), RoomError> {
        let key = chat_proto::names::lookup_key(name);
        let id = self.lock().by_name(&key);
        id.and_then(|id| self.kick_id(id, reason, false))
            .ok_or_else(|| RoomError::NoSuchUser(name.to_owned()))
    }

    /// Sends away, as banned, every member for whom `matches(key, addr)` holds; returns the
    /// display names of those sent away.
    pub fn kick_where(
        &self,
        matches: impl Fn(&str, SocketAddr) -> bool,
        reason: &str,
    ) -> Vec<String> {
        let ids: Vec<ClientId> = self
            .lock()
            .everyone()
            .filter(|(_, key, _, addr)| matches(key, *addr))
            .map(|(id, ..)| id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.kick_id(id, reason, true).map(|(name, _)| name))
            .collect()
    }

    fn kick_id(&self, id: ClientId, reason: &str, ban: bool) -> Option<(String, SocketAddr)> {
        let known = self
            .lock()
            .member(id)
            .map(|(name, addr)| (name.to_owned(), addr));
        match self.engine.append(self, Event::Kick { id, reason, ban }) {
            Some(Delivered::Removed { name, addr }) => {
                self.engine.release(&name.key, id);
                Some((name.display, addr))
            }
            // Delivered later (a cluster), wherever the member is connected.
            None => known,
            Some(_) => None,
        }
    }

    /// A notice from the operators to every member; returns how many received it.
    pub fn announce(&self, text: &str) -> usize {
        match self.engine.append(self, Event::Announce { text }) {
            Some(Delivered::Announced { recipients }) => recipients,
            _ => self.len(),
        }
    }

    /// The rest of a join, under the room lock.
    fn join_locked(&self, st: &mut State, who: Newcomer<'_>) -> Delivered {
        who.greet();
        let Newcomer {
            id,
            name,
            addr,
            transport,
            outbox,
            ..
        } = who;
        for entry in &st.history {
            let when = humantime::format_rfc3339_seconds(entry.at).to_string();
            outbox.push(protocol::history_line(&when, &entry.line));
        }
        let joined = protocol::server_line(kind::JOIN, &format!("{} joined", name.display));
        self.presence_line(st, &joined, Some(id));
        st.by_key.insert(name.key.clone(), id);
        st.seat_local(
            id,
            Member {
                name,
                outbox,
                slot: 0,
                addr,
                transport,
                leaving: false,
                joined_at: SystemTime::now(),
                last_active: Instant::now(),
            },
        );
        Delivered::Joined { users: st.len() }
    }

    /// Messages and actions from member `id` (`(is_action, text)`, in order): encoded once,
    /// one after the other in one buffer, and fanned out in frames of whole lines of at most
    /// [`COPY_MAX`] bytes, so that a recipient's byte queue copies each (a longer frame is
    /// queued shared, which costs every recipient a reference-count round trip on it). One
    /// line is one frame, as it always was; the lines of one read take one push per
    /// recipient instead of one per line. Each line is kept in the history on its own.
    fn post<'t>(
        &self,
        st: &mut State,
        id: ClientId,
        lines: impl Iterator<Item = (bool, &'t str)> + Clone,
    ) -> Delivered {
        self.send_presence(st);
        // One clock read for both the idle time and the fan-out latency.
        let start = Instant::now();
        // Encoded once; every recipient and the history share these bytes.
        let (all, total) = {
            let name = if let Some(member) = st.members.get_mut(&id) {
                member.last_active = start;
                member.name.display.as_str()
            } else {
                st.remote.touch(id);
                match st.remote.get(id) {
                    Some(m) => m.display,
                    None => return Delivered::NoSuchMember,
                }
            };
            let (size, total) = lines.clone().fold((0, 0usize), |(size, n), (_, text)| {
                (size + name.len() + text.len() + 4, n + 1)
            });
            let mut buf = BytesMut::with_capacity(size);
            for (action, text) in lines {
                protocol::put_said_line(&mut buf, name, action, text);
            }
            (buf.freeze(), total)
        };
        // The history keeps its last `history_cap` lines, each on its own (a slice of `all`).
        let keep_from = if st.history_cap > 0 {
            total.saturating_sub(st.history_cap)
        } else {
            total
        };
        let at = (keep_from < total).then(SystemTime::now);
        // Whole lines up to COPY_MAX bytes per frame (a longer line is a frame of its own):
        // `frame` is where the frame being gathered starts, `line` where the next line does.
        let (mut frame, mut line, mut count) = (0, 0, 0u64);
        for (k, end) in memchr::memchr_iter(b'\n', &all).map(|i| i + 1).enumerate() {
            if count > 0 && end - frame > COPY_MAX {
                self.broadcast_lines(st, Some(id), &all.slice(frame..line), count);
                (frame, count) = (line, 0);
            }
            count += 1;
            if let Some(at) = at
                && k >= keep_from
            {
                st.remember(at, all.slice(line..end));
            }
            line = end;
        }
        if count > 0 {
            self.broadcast_lines(st, Some(id), &all.slice(frame..line), count);
        }
        self.counters.fanout.observe(start.elapsed());
        Delivered::Posted
    }

    /// Announces a join or a leave: at once, or as part of a storm's batch (see
    /// [`PRESENCE_COALESCE`]). `joiner` is the member this line announces if it is a join; it is
    /// not in `st.members` yet, and leavers are no longer in it, so nobody gets their own line.
    fn presence_line(&self, st: &mut State, line: &Bytes, joiner: Option<ClientId>) {
        let now = Instant::now();
        let close = st
            .last_change
            .is_some_and(|t| now.saturating_duration_since(t) < PRESENCE_COALESCE);
        st.streak = if close { st.streak + 1 } else { 0 };
        st.last_change = Some(now);
        if st.presence.is_none() && st.streak < STORM_STREAK {
            self.broadcast(st, None, line);
            return;
        }
        let members = st.members.len();
        let batch = st.presence.get_or_insert_with(|| {
            self.batch_opened.notify_one();
            PresenceBatch {
                lines: BytesMut::new(),
                count: 0,
                newcomers: HashMap::new(),
                due: now + batch_window(members),
            }
        });
        batch.lines.extend_from_slice(line);
        batch.count += 1;
        if let Some(id) = joiner {
            batch.newcomers.insert(id, (batch.lines.len(), batch.count));
        }
    }

    /// Sends every presence batch when it is due, so a storm's last lines go out even if
    /// nothing else happens in the room. Runs for the daemon's life; cancel it by dropping it.
    pub async fn flush_when_due(&self) {
        loop {
            match self.presence_due() {
                // A permit left by a batch that opened before this wait is not lost
                // (`notify_one` stores one), and a spurious wake just loops.
                None => self.batch_opened.notified().await,
                Some(due) if due > Instant::now() => {
                    tokio::time::sleep_until(due.into()).await;
                }
                Some(_) => self.flush_presence(),
            }
        }
    }

    /// When the pending presence lines must be sent at the latest, if there are any.
    pub fn presence_due(&self) -> Option<Instant> {
        self.lock().presence.as_ref().map(|b| b.due)
    }

    /// Sends the pending presence lines, if any.
    pub fn flush_presence(&self) {
        let mut st = self.lock();
        self.send_presence(&mut st);
    }

    /// Sends the pending presence lines: one shared frame, of which each member who joined
    /// during the batch gets only the part after its own line.
    fn send_presence(&self, st: &mut State) {
        let Some(batch) = st.presence.take() else {
            return;
        };
        let frame = batch.lines.freeze();
        let mut delivered = 0;
        for (id, outbox) in &st.fanout {
            let (part, lines) = match batch.newcomers.get(id) {
                Some(&(end, count)) => (frame.slice(end..), batch.count - count),
                None => (frame.clone(), batch.count),
            };
            // An overflowing push closes the outbox; the session handles that (see broadcast).
            if lines > 0 && outbox.push(part) {
                delivered += lines as u64;
            }
        }
        self.counters
            .deliveries
            .fetch_add(delivered, Ordering::Relaxed);
    }

    /// Queues the one-line `frame` to every member but `except`, and closes the outboxes that
    /// overflow.
    fn broadcast(&self, st: &State, except: Option<ClientId>, frame: &Bytes) {
        self.broadcast_lines(st, except, frame, 1);
    }

    /// Queues `frame`, which holds `lines` lines, to every member but `except`, and closes the
    /// outboxes that overflow (a frame is queued whole or not at all).
    fn broadcast_lines(&self, st: &State, except: Option<ClientId>, frame: &Bytes, lines: u64) {
        let mut delivered = 0;
        for (id, outbox) in &st.fanout {
            if Some(*id) == except {
                continue;
            }
            // A push that overflows closes the outbox; the member's session sees the close,
            // counts and logs it, ends, and calls `leave`, which announces it. It stays listed
            // until then so names are not freed twice.
            if outbox.push_ref(frame) {
                delivered += lines;
            }
        }
        self.counters
            .deliveries
            .fetch_add(delivered, Ordering::Relaxed);
    }

    /// The member named `name` (as typed), wherever it is connected.
    fn find(&self, st: &State, name: &str) -> Result<ClientId, RoomError> {
        st.by_name(&chat_proto::names::lookup_key(name))
            .ok_or_else(|| RoomError::NoSuchUser(name.to_owned()))
    }

    /// Removes member `id` against their will: they get `*** KICKED <why>` as their last line
    /// and their outbox is closed as `close`, everyone else gets the line `announce` builds
    /// from their name.
    fn evict(
        &self,
        st: &mut State,
        id: ClientId,
        close: Close,
        why: &str,
        announce: impl FnOnce(&str) -> Bytes,
    ) -> Option<(Name, SocketAddr)> {
        let (name, addr, outbox) = st.take(id)?;
        if let Some(outbox) = &outbox {
            outbox.close_with(Some(protocol::server_line(kind::KICKED, why)), close);
        }
        self.broadcast(st, None, &announce(&name.display));
        Some((name, addr))
    }

    /// Display names of everyone online, sorted case-insensitively.
    pub fn names(&self) -> Vec<String> {
        // Joins first, so a `/who` answer never names someone whose join the asker has not seen.
        let mut st = self.lock();
        self.send_presence(&mut st);
        let mut names: Vec<(String, String)> = st
            .everyone()
            .map(|(_, key, display, _)| (key.to_owned(), display.to_owned()))
            .collect();
        drop(st);
        names.sort();
        names.into_iter().map(|(_, d)| d).collect()
    }

    /// A snapshot of every member, sorted by name.
    pub fn members(&self) -> Vec<MemberInfo> {
        let st = self.lock();
        let now = Instant::now();
        let local = st.members.values().map(|m| {
            (
                m.name.key.clone(),
                MemberInfo {
                    name: m.name.display.clone(),
                    addr: m.addr,
                    joined_at: m.joined_at,
                    idle: now.saturating_duration_since(m.last_active),
                    node: None,
                    transport: Some(m.transport),
                },
            )
        });
        let remote = st.remote.iter().map(|(_, m)| {
            (
                m.key.to_owned(),
                MemberInfo {
                    name: m.display.to_owned(),
                    addr: m.addr,
                    joined_at: m.joined_at,
                    idle: m.idle,
                    node: Some(m.node.to_string()),
                    transport: None,
                },
            )
        });
        let mut list: Vec<(String, MemberInfo)> = local.chain(remote).collect();
        drop(st);
        list.sort_by(|a, b| a.0.cmp(&b.0));
        list.into_iter().map(|(_, m)| m).collect()
    }

    /// Bytes queued in this node's members' outboxes: a walk over every member under the room
    /// lock (about as long as one fan-out), so it is read per status request or scrape only.
    pub fn queued_bytes(&self) -> QueuedBytes {
        let st = self.lock();
        let mut q = QueuedBytes::default();
        for (_, outbox) in &st.fanout {
            let n = outbox.queued_bytes() as u64;
            q.total += n;
            q.max = q.max.max(n);
        }
        q
    }

    /// Number of members, on every node.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Number of members connected to this node.
    pub fn local_len(&self) -> usize {
        self.lock().members.len()
    }

    /// Seats a member of another node, as its node's join announced: `*** JOIN` to this node's
    /// members (unless `quiet`: a member already there when this node started), and a place
    /// in `/who`, lists and name lookups. Returns its id here (ids of members of other nodes
    /// have [`REMOTE_IDS`] set); a member already seated keeps its id and is not announced
    /// again. `None` only if the table is full.
    pub fn arrive(&self, who: Remote<'_>, quiet: bool) -> Option<ClientId> {
        let mut st = self.lock();
        let (id, new) = st
            .remote
            .insert(who.origin, &who.name, who.addr, who.joined_at)?;
        if new && !quiet {
            let joined = protocol::server_line(kind::JOIN, &format!("{} joined", who.name.display));
            self.presence_line(&mut st, &joined, None);
        }
        Some(id)
    }

    /// The id here of the member of another node at `origin`, if it is seated.
    pub fn remote_id(&self, origin: Origin<'_>) -> Option<ClientId> {
        self.lock().remote.id_of(origin)
    }

    /// Where the member of another node `id` is connected: (node, the node's run, its
    /// connection there).
    pub fn remote_origin(&self, id: ClientId) -> Option<(Arc<str>, u64, u64)> {
        self.lock().remote.origin(id)
    }

    /// A notice about this node only (its link to a cluster), to its own members at once: not
    /// a room event, so not ordered with the room's lines nor kept in history.
    pub fn notice_local(&self, text: &str) {
        let mut st = self.lock();
        self.send_presence(&mut st);
        let line = protocol::server_line(kind::NOTICE, text);
        self.broadcast(&st, None, &line);
    }

    /// Remembers a message delivered before this node started (a cluster's recent history),
    /// for newcomers; no member is sent anything.
    pub fn remember(&self, at: SystemTime, line: Bytes) {
        self.lock().remember(at, line);
    }

    /// Whether nobody is in the room.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Deliver for Room {
    fn seated(&self, id: ClientId) -> Option<Seated> {
        let st = self.lock();
        let m = st.members.get(&id)?;
        Some(Seated {
            name: m.name.display.clone(),
            addr: m.addr,
            outbox: m.outbox.clone(),
        })
    }

    fn deliver_said(&self, id: ClientId, said: &Said) -> Delivered {
        if said.is_empty() {
            return Delivered::Posted;
        }
        let mut st = self.lock();
        self.post(&mut st, id, said.iter())
    }

    /// Delivers one event, in the engine's order, to this node's members: the fan-out half of
    /// every room operation. Under the room lock: no I/O, no `.await`.
    fn deliver(&self, event: Event<'_>) -> Delivered {
        let mut st = self.lock();
        match event {
            Event::Join(who) => self.join_locked(&mut st, who),
            Event::Replaced { id, why } => {
                self.send_presence(&mut st);
                match self.evict(&mut st, id, Close::Replaced, why, |name| {
                    protocol::server_line(kind::LEAVE, &format!("{name} left (reconnected)"))
                }) {
                    Some((name, addr)) => Delivered::Removed { name, addr },
                    None => Delivered::NoSuchMember,
                }
            }
            Event::Say { id, text } => self.post(&mut st, id, std::iter::once((false, text))),
            Event::Act { id, text } => self.post(&mut st, id, std::iter::once((true, text))),
            Event::Private { from, to, text } => {
                self.send_presence(&mut st);
                let Some((sender, _)) = st.member(from) else {
                    return Delivered::NoSuchMember;
                };
                let Ok(target) = self.find(&st, to) else {
                    return Delivered::NoSuchMember;
                };
                // A recipient on another node is reached by its own node's delivery.
                if let Some(m) = st.members.get(&target) {
                    m.outbox.push(protocol::private_line(sender, text));
                    self.counters.deliveries.fetch_add(1, Ordering::Relaxed);
                }
                match st.member(target) {
                    Some((to, _)) => Delivered::Sent { to: to.to_owned() },
                    None => Delivered::NoSuchMember,
                }
            }
            Event::Rename { id, name } => {
                self.send_presence(&mut st);
                let Some(old) = st.member(id).map(|(name, _)| name.to_owned()) else {
                    return Delivered::NoSuchMember;
                };
                let line = protocol::server_line(
                    kind::NICK,
                    &format!("{old} is now known as {}", name.display),
                );
                self.broadcast(&st, None, &line);
                if let Some(m) = st.members.get_mut(&id) {
                    let old_key = std::mem::replace(&mut m.name, name.clone()).key;
                    if st.by_key.get(&old_key) == Some(&id) {
                        st.by_key.remove(&old_key);
                    }
                    st.by_key.insert(name.key, id);
                } else {
                    st.remote.rename(id, &name);
                }
                Delivered::Renamed { old }
            }
            Event::Leave { id, reason } => {
                let Some((name, addr, _)) = st.take(id) else {
                    return Delivered::NoSuchMember;
                };
                if !st.closing {
                    let line = protocol::server_line(
                        kind::LEAVE,
                        &format!("{} left ({reason})", name.display),
                    );
                    self.presence_line(&mut st, &line, None);
                }
                Delivered::Removed { name, addr }
            }
            Event::Kick { id, reason, ban } => {
                self.send_presence(&mut st);
                let close = if ban { Close::Banned } else { Close::Kicked };
                let Some((name, addr)) = self.evict(&mut st, id, close, reason, |name| {
                    protocol::server_line(kind::KICK, &format!("{name} was kicked ({reason})"))
                }) else {
                    return Delivered::NoSuchMember;
                };
                self.counters.kicks.fetch_add(1, Ordering::Relaxed);
                Delivered::Removed { name, addr }
            }
            Event::Announce { text } => {
                self.send_presence(&mut st);
                let line = protocol::server_line(kind::NOTICE, text);
                self.broadcast(&st, None, &line);
                Delivered::Announced {
                    recipients: st.len(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_proto::names::NameRules;
    use std::net::IpAddr;

    /// The result of a room step, which the in-process engine finishes at once.
    fn now<T>(step: impl std::future::Future<Output = T>) -> T {
        use futures::FutureExt;
        step.now_or_never()
            .unwrap_or_else(|| panic!("the in-process engine never waits"))
    }

    fn name(s: &str) -> Name {
        NameRules::new(24, &[])
            .validate(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    /// Connection `id` asking for `name`, from one address, with no welcome lines.
    fn newcomer(id: ClientId, name: Name, outbox: Arc<Outbox>) -> Newcomer<'static> {
        Newcomer {
            id,
            name,
            addr: addr(),
            transport: Transport::Tcp,
            outbox,
            welcome: &[],
        }
    }

    fn drained(o: &Outbox) -> Vec<String> {
        let mut q = VecDeque::new();
        o.drain_into(&mut q);
        q.iter()
            .map(|b| String::from_utf8_lossy(b).trim_end().to_owned())
            .collect()
    }

    /// A room of 10 history lines with `first` (id 1) and `second` (id 2) in it, and their
    /// outboxes.
    fn room_of_two(first: &str, second: &str) -> (Room, Arc<Outbox>, Arc<Outbox>) {
        let room = Room::new(10);
        let (a, b) = (
            Arc::new(Outbox::new(1 << 16)),
            Arc::new(Outbox::new(1 << 16)),
        );
        assert_eq!(now(room.join(newcomer(1, name(first), a.clone()))), Ok(1));
        assert_eq!(now(room.join(newcomer(2, name(second), b.clone()))), Ok(2));
        (room, a, b)
    }

    #[test]
    fn join_say_leave_fan_out_to_others_only() {
        let (room, a, b) = room_of_two("alice", "Bob");
        assert_eq!(drained(&a), vec!["*** JOIN Bob joined"]);
        room.say(1, "hi");
        assert_eq!(drained(&b), vec!["alice: hi"]);
        assert!(drained(&a).is_empty());
        room.leave(1, "quit");
        assert_eq!(drained(&b), vec!["*** LEAVE alice left (quit)"]);
        assert_eq!(room.leave(1, "quit"), None);
    }

    /// The packed fan-out list stays the members' outboxes, each at its member's slot, through
    /// leaves and kicks from its start, middle and end; every broadcast reaches exactly the
    /// members still there.
    #[test]
    fn fanout_list_follows_joins_leaves_and_kicks() {
        let room = Room::new(0);
        let outboxes: Vec<Arc<Outbox>> = (0..12).map(|_| Arc::new(Outbox::new(1 << 16))).collect();
        for (i, o) in outboxes.iter().enumerate() {
            let id = i as ClientId + 1;
            now(room.join(newcomer(id, name(&format!("user{id}")), o.clone())))
                .unwrap_or_else(|e| panic!("join {id}: {e:?}"));
        }
        let consistent = |room: &Room| {
            let st = room.lock();
            assert_eq!(st.fanout.len(), st.members.len());
            for (slot, (id, outbox)) in st.fanout.iter().enumerate() {
                let m = &st.members[id];
                assert_eq!(m.slot, slot, "member {id}");
                assert!(Arc::ptr_eq(&m.outbox, outbox));
            }
        };
        consistent(&room);
        let mut present: Vec<ClientId> = (1..=12).collect();
        for (gone, kicked) in [(1, false), (12, true), (6, false), (2, true), (11, false)] {
            if kicked {
                room.kick(&format!("user{gone}"), "test")
                    .map(|_| ())
                    .unwrap_or_else(|e| panic!("{e:?}"));
            } else {
                room.leave(gone, "quit");
            }
            present.retain(|&id| id != gone);
            consistent(&room);
            let from = present[present.len() / 2];
            room.say(from, &format!("after {gone}"));
            for (i, o) in outboxes.iter().enumerate() {
                let id = i as ClientId + 1;
                let got = drained(o);
                let heard = got.iter().any(|l| l.ends_with(&format!(": after {gone}")));
                assert_eq!(
                    heard,
                    present.contains(&id) && id != from,
                    "member {id}: {got:?}"
                );
            }
        }
    }

    #[test]
    fn leaves_are_not_announced_once_the_room_is_closing() {
        let (room, a, b) = room_of_two("alice", "bob");
        drained(&a);
        room.close();
        assert_eq!(
            room.leave(1, "server shutting down").as_deref(),
            Some("alice")
        );
        assert!(drained(&b).is_empty());
        assert_eq!(room.len(), 1);
    }

    #[test]
    fn names_are_unique_case_insensitively() {
        let room = Room::new(0);
        let o = Arc::new(Outbox::new(1024));
        assert!(now(room.join(newcomer(1, name("alice"), o.clone()))).is_ok());
        assert_eq!(
            now(room.join(newcomer(2, name("ALICE"), o.clone()))),
            Err(NameError::Taken)
        );
        assert_eq!(
            now(room.rename(1, name("Alice"))).ok(),
            Some("alice".to_owned())
        );
    }

    #[test]
    fn newcomer_sees_bounded_history() {
        let room = Room::new(2);
        let a = Arc::new(Outbox::new(1 << 16));
        assert!(now(room.join(newcomer(1, name("a"), a))).is_ok());
        for t in ["one", "two", "three"] {
            room.say(1, t);
        }
        let b = Arc::new(Outbox::new(1 << 16));
        assert!(now(room.join(newcomer(2, name("b"), b.clone()))).is_ok());
        let got = drained(&b);
        assert_eq!(got.len(), 2);
        assert!(got[0].starts_with("*** HISTORY ") && got[0].ends_with(" a: two"));
        assert!(got[1].ends_with(" a: three"));
    }

    #[test]
    fn kick_closes_outbox_and_tells_others() {
        let room = Room::new(0);
        let (a, b) = (
            Arc::new(Outbox::new(1 << 16)),
            Arc::new(Outbox::new(1 << 16)),
        );
        assert!(now(room.join(newcomer(1, name("alice"), a.clone()))).is_ok());
        assert!(now(room.join(newcomer(2, name("bob"), b.clone()))).is_ok());
        drained(&a);
        assert!(room.kick("BOB", "spam").is_ok());
        assert_eq!(drained(&b), vec!["*** KICKED spam"]);
        assert_eq!(b.closed(), Some(Close::Kicked));
        assert_eq!(drained(&a), vec!["*** KICK bob was kicked (spam)"]);
        assert_eq!(
            room.kick("bob", "x").err(),
            Some(RoomError::NoSuchUser("bob".into()))
        );
        // A ban's kick closes the outbox as a ban: a transport tells the two apart by that,
        // not by the reason's text.
        assert_eq!(
            room.kick_where(|key, _| key == "alice", "spam"),
            vec!["alice"]
        );
        assert_eq!(drained(&a), vec!["*** KICKED spam"]);
        assert_eq!(a.closed(), Some(Close::Banned));
    }

    #[test]
    fn slow_member_overflows_without_touching_others() {
        let room = Room::new(0);
        let (a, slow, c) = (
            Arc::new(Outbox::new(1 << 16)),
            Arc::new(Outbox::new(64)),
            Arc::new(Outbox::new(1 << 16)),
        );
        assert!(now(room.join(newcomer(1, name("a"), a))).is_ok());
        assert!(now(room.join(newcomer(2, name("slow"), slow.clone()))).is_ok());
        assert!(now(room.join(newcomer(3, name("c"), c.clone()))).is_ok());
        drained(&c);
        for i in 0..20 {
            room.say(1, &format!("message {i}"));
        }
        assert_eq!(slow.closed(), Some(Close::Overflow));
        assert_eq!(drained(&c).len(), 20);
    }

    #[test]
    fn lines_said_together_go_out_in_frames_of_whole_lines_and_each_is_remembered() {
        let room = Room::new(3);
        let (a, b, c) = (
            Arc::new(Outbox::new(1 << 16)),
            Arc::new(Outbox::new(1 << 16)),
            Arc::new(Outbox::new(1 << 16)),
        );
        c.copy_small_frames();
        for (id, who, o) in [(1, "alice", &a), (2, "bob", &b), (3, "carol", &c)] {
            assert!(now(room.join(newcomer(id, name(who), o.clone()))).is_ok());
        }
        drained(&a);
        drained(&b);
        drained(&c);
        let before = room.counters.deliveries.load(Ordering::Relaxed);
        let long = "y".repeat(COPY_MAX);
        let mut said = Said::default();
        let mut want = Vec::new();
        for k in 0..12 {
            let text = format!("line {k} of a burst, long enough to fill a frame in ten");
            let action = k == 4;
            said.push(action, &text);
            want.push(if action {
                format!("* alice {text}")
            } else {
                format!("alice: {text}")
            });
            if k == 7 {
                said.push(false, &long);
                want.push(format!("alice: {long}"));
            }
        }
        room.say_all(1, &said);

        // One line after the other, as if said one by one, in frames of whole lines of at
        // most COPY_MAX bytes (a longer line alone): fewer frames than lines.
        let mut frames = VecDeque::new();
        b.drain_into(&mut frames);
        let joined: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        let one_by_one: String = want.iter().map(|l| format!("{l}\n")).collect();
        assert_eq!(String::from_utf8_lossy(&joined), one_by_one);
        assert!(frames.len() < want.len() / 2, "{} frames", frames.len());
        for f in &frames {
            assert!(f.ends_with(b"\n"));
            let lines = f.iter().filter(|&&b| b == b'\n').count();
            assert!(
                f.len() <= COPY_MAX || lines == 1,
                "{} bytes, {lines} lines",
                f.len()
            );
        }
        // A copying outbox gets the same lines; the sender none.
        assert_eq!(lines(&c), want);
        assert!(drained(&a).is_empty());
        assert_eq!(
            room.counters.deliveries.load(Ordering::Relaxed) - before,
            2 * want.len() as u64
        );
        // The history keeps the last lines, each on its own.
        let d = Arc::new(Outbox::new(1 << 16));
        assert!(now(room.join(newcomer(4, name("dave"), d.clone()))).is_ok());
        let history: Vec<String> = lines(&d)
            .into_iter()
            .filter_map(|l| {
                Some(
                    l.strip_prefix("*** HISTORY ")?
                        .split_once(' ')?
                        .1
                        .to_owned(),
                )
            })
            .collect();
        assert_eq!(history, want[want.len() - 3..]);
        // Nothing said, nothing sent.
        room.say_all(1, &Said::default());
        assert!(drained(&b).iter().all(|l| l.starts_with("*** JOIN dave")));
    }

    /// Every line of every queued frame (a join-storm frame holds several).
    fn lines(o: &Outbox) -> Vec<String> {
        let mut q = VecDeque::new();
        o.drain_into(&mut q);
        q.iter()
            .flat_map(|b| {
                String::from_utf8_lossy(b)
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The same room events with every outbox copying small frames (the TCP driver's way) or
    /// none: each member must get the same bytes in the same order.
    #[test]
    fn copying_outboxes_get_the_same_bytes_as_sharing_ones() {
        let script = |copy: bool| -> Vec<Vec<u8>> {
            let room = Room::new(5);
            let outs: Vec<Arc<Outbox>> = (0..14)
                .map(|_| {
                    let o = Arc::new(Outbox::new(1 << 20));
                    if copy {
                        o.copy_small_frames();
                    }
                    o
                })
                .collect();
            let mut got: Vec<Vec<u8>> = vec![Vec::new(); outs.len()];
            let take = |got: &mut Vec<Vec<u8>>| {
                for (o, g) in outs.iter().zip(got.iter_mut()) {
                    let mut q = crate::outbox::ByteQueue::default();
                    o.drain_bytes(&mut q);
                    let mut slices = [std::io::IoSlice::new(&[]); 64];
                    let n = q.io_slices(&mut slices);
                    g.extend(slices[..n].iter().flat_map(|s| s.iter().copied()));
                }
            };
            assert!(now(room.join(newcomer(0, name("n0"), outs[0].clone()))).is_ok());
            room.say(0, "before anyone else");
            room.say(0, &"long ".repeat(200));
            // A storm: the later joins are batched into shared frames.
            for (i, o) in outs.iter().enumerate().skip(1) {
                let id = i as ClientId;
                assert!(now(room.join(newcomer(id, name(&format!("n{i}")), o.clone()))).is_ok());
                if i == 5 {
                    take(&mut got);
                }
            }
            room.say(3, "hello");
            room.act(4, "waves");
            assert!(room.private(5, "n6", "psst").is_ok());
            take(&mut got);
            room.say(2, &"x".repeat(crate::outbox::COPY_MAX + 20));
            room.leave(7, "quit");
            assert!(room.kick("n8", "spam").is_ok());
            room.say(1, "after");
            room.flush_presence();
            take(&mut got);
            got
        };
        let (shared, copied) = (script(false), script(true));
        assert!(shared.iter().all(|g| !g.is_empty()));
        for (i, (s, c)) in shared.iter().zip(&copied).enumerate() {
            assert_eq!(
                String::from_utf8_lossy(c),
                String::from_utf8_lossy(s),
                "member n{i}"
            );
        }
    }

    /// A member of node `node` (run 1), connection `conn`, as its node announced it.
    fn remote<'a>(node: &'a str, conn: u64, who: &str, ip: [u8; 4]) -> Remote<'a> {
        Remote {
            origin: Origin {
                node,
                boot: 1,
                conn,
            },
            name: name(who),
            addr: SocketAddr::from((ip, 4000)),
            joined_at: SystemTime::now(),
        }
    }

    #[test]
    fn members_of_other_nodes_are_listed_found_renamed_and_removed() {
        let room = Room::new(0);
        let a = Arc::new(Outbox::new(1 << 16));
        assert!(now(room.join(newcomer(1, name("alice"), a.clone()))).is_ok());
        let bob = room
            .arrive(remote("b", 7, "bob", [10, 0, 0, 2]), false)
            .unwrap_or_else(|| panic!("bob"));
        assert!(is_remote(bob));
        assert_eq!(drained(&a), vec!["*** JOIN bob joined"]);
        // Already there when this node started: seated without a line.
        let carol = room
            .arrive(remote("c", 7, "carol", [10, 0, 0, 3]), true)
            .unwrap_or_else(|| panic!("carol"));
        assert!(drained(&a).is_empty());
        // Seen again (its message before its join): the same member, not announced twice.
        assert_eq!(
            room.arrive(remote("b", 7, "bob", [10, 0, 0, 2]), false),
            Some(bob)
        );
        assert!(drained(&a).is_empty());
        assert_eq!((room.len(), room.local_len()), (3, 1));
        assert_eq!(room.names(), vec!["alice", "bob", "carol"]);
        let origin = Origin {
            node: "b",
            boot: 1,
            conn: 7,
        };
        assert_eq!(room.remote_id(origin), Some(bob));
        assert_eq!(room.remote_origin(bob), Some((Arc::from("b"), 1, 7)));
        let list = room.members();
        assert_eq!(
            list.iter()
                .map(|m| (m.name.as_str(), m.node.as_deref(), m.transport))
                .collect::<Vec<_>>(),
            vec![
                ("alice", None, Some(Transport::Tcp)),
                ("bob", Some("b"), None),
                ("carol", Some("c"), None)
            ]
        );
        assert_eq!(list[1].addr, SocketAddr::from(([10, 0, 0, 2], 4000)));
        // A private message to a member of another node: its own node delivers it.
        assert_eq!(room.private(1, "BOB", "psst").as_deref(), Ok("bob"));
        assert!(drained(&a).is_empty());
        // Its messages and renames, as its node's events deliver them.
        room.deliver(Event::Say {
            id: bob,
            text: "hi",
        });
        assert_eq!(drained(&a), vec!["bob: hi"]);
        room.deliver(Event::Rename {
            id: bob,
            name: name("Robert"),
        });
        assert_eq!(drained(&a), vec!["*** NICK bob is now known as Robert"]);
        assert_eq!(
            room.private(1, "bob", "x").err(),
            Some(RoomError::NoSuchUser("bob".into()))
        );
        // Kicked by name, banned by address: gone from every index.
        assert_eq!(
            room.kick("robert", "spam").ok(),
            Some(("Robert".to_owned(), SocketAddr::from(([10, 0, 0, 2], 4000))))
        );
        assert_eq!(drained(&a), vec!["*** KICK Robert was kicked (spam)"]);
        assert_eq!(room.remote_id(origin), None);
        let banned = room.kick_where(|_, addr| addr.ip() == IpAddr::from([10, 0, 0, 3]), "ban");
        assert_eq!(banned, vec!["carol"]);
        assert_eq!(room.names(), vec!["alice"]);
        assert_eq!(
            room.deliver(Event::Leave {
                id: carol,
                reason: "x"
            }),
            Delivered::NoSuchMember
        );
    }

    /// An engine that seats joins at once and keeps every other event (a cluster delivering
    /// them later).
    #[derive(Debug, Default)]
    struct Later {
        appended: Mutex<Vec<String>>,
    }

    impl Engine for Later {
        fn claim<'a>(
            &'a self,
            _claim: Claim<'a>,
            _may_replace: &'a (dyn Fn(ClientId) -> bool + Sync),
            _refusal: NameError,
        ) -> crate::engine::Pending<'a, Result<Option<ClientId>, NameError>> {
            Box::pin(std::future::ready(Ok(None)))
        }

        fn release(&self, _key: &str, _holder: ClientId) {}

        fn append(&self, room: &dyn Deliver, event: Event<'_>) -> Option<Delivered> {
            if let Event::Join(_) = event {
                return Some(room.deliver(event));
            }
            let mut log = self.appended.lock().unwrap_or_else(|e| e.into_inner());
            log.push(format!("{event:?}"));
            None
        }
    }

    #[test]
    fn a_leave_on_its_way_is_sent_once_however_often_it_is_asked() {
        let engine = Arc::new(Later::default());
        let room = Room::with_engine(0, engine.clone());
        let a = Arc::new(Outbox::new(1 << 16));
        assert!(now(room.join(newcomer(1, name("alice"), a))).is_ok());
        // Quit, then the session's end, then its drop: one leave reaches the engine.
        for _ in 0..3 {
            assert_eq!(room.leave(1, "quit"), None);
        }
        let log = engine.appended.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(log.len(), 1, "{log:?}");
        assert!(log[0].starts_with("Leave"), "{log:?}");
        drop(log);
        // Still listed until the engine delivers the leave.
        assert_eq!(room.names(), vec!["alice"]);
        assert!(room.seated(1).is_some());
        room.deliver(Event::Leave {
            id: 1,
            reason: "quit",
        });
        assert!(room.is_empty() && room.seated(1).is_none());
    }

    #[test]
    fn batch_window_grows_with_the_room_within_bounds() {
        assert_eq!(batch_window(0), PRESENCE_COALESCE);
        assert_eq!(batch_window(4_000), PRESENCE_COALESCE);
        assert_eq!(batch_window(19_000), Duration::from_millis(95));
        assert_eq!(batch_window(1_000_000), Duration::from_millis(250));
    }

    #[test]
    fn join_storm_is_coalesced_without_changing_what_anyone_sees() {
        let room = Room::new(0);
        let first = Arc::new(Outbox::new(1 << 16));
        assert!(now(room.join(newcomer(1, name("first"), first.clone()))).is_ok());
        let outs: Vec<Arc<Outbox>> = (0..12).map(|_| Arc::new(Outbox::new(1 << 16))).collect();
        for (i, o) in outs.iter().enumerate() {
            let id = 2 + i as ClientId;
            assert!(now(room.join(newcomer(id, name(&format!("n{i}")), o.clone()))).is_ok());
        }
        // Twelve joins in a row, microseconds apart: the later ones wait in a batch.
        let due = room.presence_due();
        assert!(due.is_some_and(|d| d <= Instant::now() + batch_window(13)));
        let mut queued = VecDeque::new();
        first.drain_into(&mut queued);
        let sent_at_once = queued.len();
        assert!(sent_at_once < 12, "nothing was coalesced");
        // A message flushes the batch first, so the order is the same as without coalescing.
        room.say(2, "hello");
        assert_eq!(room.presence_due(), None);
        let joins: Vec<String> = (0..12).map(|i| format!("*** JOIN n{i} joined")).collect();
        let mut want = joins[sent_at_once..].to_vec();
        want.push("n0: hello".to_owned());
        assert_eq!(lines(&first), want);
        // Each newcomer got exactly the joins after its own, then the message.
        for (i, o) in outs.iter().enumerate() {
            let mut want = joins[i + 1..].to_vec();
            if i != 0 {
                want.push("n0: hello".to_owned());
            }
            assert_eq!(lines(o), want, "newcomer n{i}");
        }
        room.flush_presence();
        assert!(lines(&first).is_empty());
    }

    #[test]
    fn leave_storm_is_coalesced_and_leavers_get_nothing() {
        let room = Room::new(0);
        let outs: Vec<Arc<Outbox>> = (0..30).map(|_| Arc::new(Outbox::new(1 << 16))).collect();
        for (i, o) in outs.iter().enumerate() {
            assert!(
                now(room.join(newcomer(i as ClientId, name(&format!("n{i}")), o.clone()))).is_ok()
            );
        }
        room.flush_presence();
        for o in &outs {
            lines(o);
        }
        // A pause ends the join storm, so the first leaves below go out one by one.
        std::thread::sleep(PRESENCE_COALESCE + Duration::from_millis(5));
        // Twenty members drop at once; after the first few the rest wait in one batch.
        for i in 10..30 {
            assert!(room.leave(i, "connection lost").is_some());
        }
        assert!(room.presence_due().is_some());
        let leaves: Vec<String> = (10..30)
            .map(|i| format!("*** LEAVE n{i} left (connection lost)"))
            .collect();
        let mut queued = VecDeque::new();
        outs[0].drain_into(&mut queued);
        let sent_at_once: usize = queued
            .iter()
            .map(|f| f.split(|&b| b == b'\n').count() - 1)
            .sum();
        assert!(sent_at_once < leaves.len(), "nothing was coalesced");
        assert_eq!(
            queued.len(),
            sent_at_once,
            "single leaves go out one frame each"
        );
        // A join flushes nothing by itself (it joins the batch); a message does.
        let late = Arc::new(Outbox::new(1 << 16));
        assert!(now(room.join(newcomer(99, name("late"), late.clone()))).is_ok());
        room.say(0, "still here");
        assert_eq!(room.presence_due(), None);
        // The sender (n0) gets the batch first, but not its own message.
        let mut want = leaves[sent_at_once..].to_vec();
        want.push("*** JOIN late joined".to_owned());
        assert_eq!(lines(&outs[0]), want);
        for o in &outs[1..10] {
            let mut want = leaves.clone();
            want.push("*** JOIN late joined".to_owned());
            want.push("n0: still here".to_owned());
            assert_eq!(lines(o), want);
        }
        // The newcomer sees only what came after its own join; the leavers saw none of it.
        assert_eq!(lines(&late), vec!["n0: still here"]);
        // Each leaver got only the leaves sent at once before its own, none of the batch.
        for (k, o) in outs[10..].iter().enumerate() {
            assert_eq!(
                lines(o),
                leaves[..k.min(sent_at_once)].to_vec(),
                "leaver n{}",
                k + 10
            );
        }
        assert_eq!(room.len(), 11);
    }
}
