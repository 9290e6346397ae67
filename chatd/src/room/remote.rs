//! The room's members connected to other nodes of a cluster, in a compact table of their own.
//!
//! With n nodes every node keeps n-1 of these per member of its own, so their size decides a
//! cluster node's memory beside a single node's. A member of another node has no outbox,
//! transport or session here; it needs only what `/who`, `/msg`, `chatctl list`, kicks, bans
//! and the cluster's events ask of it: its name, node, address, join time, last activity and
//! its identity on its own node. One fixed-size entry each (72 bytes) in chunks of
//! [`CHUNK`] entries (no doubling vector's slack), the name's display form and key in one
//! allocation (one string when they are equal, as they mostly are), the node's name and run
//! interned once per node, and two indexes of 4-byte slot numbers: by name key and by identity
//! on its own node. The room's id for an entry encodes its slot and a generation, so no id
//! index is needed and an id outlives nobody: a slot given to a later member gets a new
//! generation, and the old id finds nothing.

use std::hash::BuildHasher;
use std::hash::RandomState;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hashbrown::HashTable;

use crate::engine::ClientId;
use chat_proto::names::Name;

/// Ids of members of other nodes have this bit set; this node's connections count from 1 and
/// never reach it.
pub const REMOTE_IDS: ClientId = 1 << 62;

/// Entries per chunk: a chunk is one allocation of `CHUNK` × 72 bytes.
const CHUNK: usize = 128;

/// Generations wrap within these bits of an id (bits 32 to 61).
const GEN_MASK: u32 = (1 << 30) - 1;

/// No run: the entry's slot is free.
const VACANT: u32 = u32::MAX;

/// Where a member of another node is connected: the node, the node's run (a restarted node is
/// a new run) and the connection on that node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    /// The node's name.
    pub node: &'a str,
    /// The node's run.
    pub boot: u64,
    /// The connection on that node.
    pub conn: u64,
}

/// One node's run, shared by all its members here.
#[derive(Debug)]
struct Run {
    node: Arc<str>,
    boot: u64,
    /// Members of this run in the table; the run is forgotten at 0.
    members: usize,
}

/// One member of another node, or a free slot (`run == VACANT`, `conn` the next free slot).
#[derive(Debug)]
struct Entry {
    /// The display name, followed by the key when it differs from it.
    text: Box<str>,
    /// The connection on its node (the next free slot when vacant).
    conn: u64,
    /// When it joined, in milliseconds since the Unix epoch.
    joined_ms: u64,
    /// Its peer address (an IPv4 address in the first 4 bytes unless `flags & V6`).
    ip: [u8; 16],
    /// Its run in `runs`, or `VACANT`.
    run: u32,
    /// The entry's generation: part of its id (see `Remotes::next_generation`).
    generation: u32,
    /// When it last posted (or arrived here), in seconds since the table's `epoch`.
    active_s: u32,
    port: u16,
    /// Where the display name ends in `text` (the key follows, if it differs).
    display_len: u16,
    flags: u8,
}

/// `Entry::flags`: the address is IPv6.
const V6: u8 = 1;

impl Entry {
    /// A free slot whose successor in the free list is `next`.
    fn free(next: u32) -> Entry {
        Entry {
            text: Box::default(),
            conn: u64::from(next),
            joined_ms: 0,
            ip: [0; 16],
            run: VACANT,
            generation: 0,
            active_s: 0,
            port: 0,
            display_len: 0,
            flags: 0,
        }
    }

    fn display(&self) -> &str {
        self.text.get(..usize::from(self.display_len)).unwrap_or("")
    }

    /// The name key: the part after the display name, or the display name itself.
    fn key(&self) -> &str {
        let len = usize::from(self.display_len);
        if self.text.len() == len {
            &self.text
        } else {
            self.text.get(len..).unwrap_or("")
        }
    }

    fn addr(&self) -> SocketAddr {
        let ip = if self.flags & V6 != 0 {
            IpAddr::V6(Ipv6Addr::from(self.ip))
        } else {
            IpAddr::V4(Ipv4Addr::new(
                self.ip[0], self.ip[1], self.ip[2], self.ip[3],
            ))
        };
        SocketAddr::new(ip, self.port)
    }
}

/// A member of another node as the room shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteView<'a> {
    /// Its display name.
    pub display: &'a str,
    /// Its name key.
    pub key: &'a str,
    /// Its peer address.
    pub addr: SocketAddr,
    /// The node it is connected to.
    pub node: &'a Arc<str>,
    /// When it joined.
    pub joined_at: SystemTime,
    /// How long since it last posted (or since this node learned of it).
    pub idle: Duration,
}

/// The members of other nodes: see the module's documentation.
#[derive(Debug)]
pub struct Remotes {
    chunks: Vec<Box<[Entry]>>,
    /// The first free slot, or `VACANT`.
    free: u32,
    /// Slots in use.
    len: usize,
    /// Slots by the entry's name key.
    by_name: HashTable<u32>,
    /// Slots by the entry's (run, connection).
    by_origin: HashTable<u32>,
    /// The runs of the entries; a forgotten run's place is reused.
    runs: Vec<Option<Run>>,
    hasher: RandomState,
    /// What `Entry::active_s` counts from.
    epoch: Instant,
    /// The next entry's generation: every entry gets a new one, so an id is not given again
    /// until 2³⁰ members later.
    next_generation: u32,
}

impl Default for Remotes {
    fn default() -> Self {
        Remotes {
            chunks: Vec::new(),
            free: VACANT,
            len: 0,
            by_name: HashTable::new(),
            by_origin: HashTable::new(),
            runs: Vec::new(),
            hasher: RandomState::new(),
            epoch: Instant::now(),
            next_generation: 0,
        }
    }
}

/// The entry in `slot` of `chunks`.
fn entry_in(chunks: &[Box<[Entry]>], slot: u32) -> Option<&Entry> {
    let slot = slot as usize;
    chunks.get(slot / CHUNK)?.get(slot % CHUNK)
}

/// The id of the entry in `slot` at `generation`.
fn id_of(slot: u32, generation: u32) -> ClientId {
    REMOTE_IDS | (u64::from(generation & GEN_MASK) << 32) | u64::from(slot)
}

/// `name` as an entry keeps it: the display form, then the key if it differs.
fn packed(name: &Name) -> Box<str> {
    if name.key == name.display {
        return name.display.as_str().into();
    }
    let mut s = String::with_capacity(name.display.len() + name.key.len());
    s.push_str(&name.display);
    s.push_str(&name.key);
    s.into_boxed_str()
}

/// Whether `id` names a member of another node (an id of this table).
pub fn is_remote(id: ClientId) -> bool {
    id & REMOTE_IDS != 0
}

impl Remotes {
    /// Members of other nodes.
    pub fn len(&self) -> usize {
        self.len
    }

    fn entry(&self, slot: u32) -> Option<&Entry> {
        entry_in(&self.chunks, slot)
    }

    fn entry_mut(&mut self, slot: u32) -> Option<&mut Entry> {
        let slot = slot as usize;
        self.chunks.get_mut(slot / CHUNK)?.get_mut(slot % CHUNK)
    }

    /// The slot `id` names, if its entry is still the one the id was given to.
    fn slot(&self, id: ClientId) -> Option<u32> {
        if !is_remote(id) {
            return None;
        }
        let slot = id as u32;
        let generation = ((id >> 32) as u32) & GEN_MASK;
        self.entry(slot)
            .filter(|e| e.run != VACANT && e.generation & GEN_MASK == generation)
            .map(|_| slot)
    }

    fn run_of(&self, node: &str, boot: u64) -> Option<u32> {
        self.runs
            .iter()
            .position(|r| {
                r.as_ref()
                    .is_some_and(|r| r.boot == boot && &*r.node == node)
            })
            .and_then(|i| u32::try_from(i).ok())
    }

    fn name_hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    fn origin_hash(&self, run: u32, conn: u64) -> u64 {
        self.hasher.hash_one((run, conn))
    }

    /// The id of the member `origin`, if it is here.
    pub fn id_of(&self, origin: Origin<'_>) -> Option<ClientId> {
        let run = self.run_of(origin.node, origin.boot)?;
        let hash = self.origin_hash(run, origin.conn);
        let slot = *self.by_origin.find(hash, |&s| {
            self.entry(s)
                .is_some_and(|e| e.run == run && e.conn == origin.conn)
        })?;
        self.entry(slot).map(|e| id_of(slot, e.generation))
    }

    /// The id of the member whose name key is `key`, if one is here.
    pub fn find(&self, key: &str) -> Option<ClientId> {
        let hash = self.name_hash(key);
        let slot = *self
            .by_name
            .find(hash, |&s| self.entry(s).is_some_and(|e| e.key() == key))?;
        self.entry(slot).map(|e| id_of(slot, e.generation))
    }

    /// The member `id`, as the room shows it.
    pub fn get(&self, id: ClientId) -> Option<RemoteView<'_>> {
        self.view(self.entry(self.slot(id)?)?, Instant::now())
    }

    /// Entry `e` as the room shows it, its idle time measured at `now`.
    fn view<'s>(&'s self, e: &'s Entry, now: Instant) -> Option<RemoteView<'s>> {
        let run = self.runs.get(e.run as usize)?.as_ref()?;
        let active = self.epoch + Duration::from_secs(u64::from(e.active_s));
        Some(RemoteView {
            display: e.display(),
            key: e.key(),
            addr: e.addr(),
            node: &run.node,
            joined_at: UNIX_EPOCH + Duration::from_millis(e.joined_ms),
            idle: now.saturating_duration_since(active),
        })
    }

    /// Every member: its id and view.
    pub fn iter(&self) -> impl Iterator<Item = (ClientId, RemoteView<'_>)> + '_ {
        let now = Instant::now();
        self.chunks.iter().enumerate().flat_map(move |(c, chunk)| {
            chunk.iter().enumerate().filter_map(move |(i, e)| {
                if e.run == VACANT {
                    return None;
                }
                let slot = u32::try_from(c * CHUNK + i).ok()?;
                Some((id_of(slot, e.generation), self.view(e, now)?))
            })
        })
    }

    /// Where the member `id` is connected.
    pub fn origin(&self, id: ClientId) -> Option<(Arc<str>, u64, u64)> {
        let e = self.entry(self.slot(id)?)?;
        let run = self.runs.get(e.run as usize)?.as_ref()?;
        Some((run.node.clone(), run.boot, e.conn))
    }

    /// Seconds since the epoch, for `active_s`.
    fn now_s(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    /// Marks the member `id` as active now (it posted).
    pub fn touch(&mut self, id: ClientId) {
        let now = self.now_s();
        if let Some(e) = self.slot(id).and_then(|s| self.entry_mut(s)) {
            e.active_s = now;
        }
    }

    /// Adds the member `origin` named `name`; returns its id and whether it is new (a member
    /// already here keeps its entry and id). `None` when the table is full (2³² members) or
    /// the name is longer than an entry holds (64 KiB; names are validated far shorter).
    pub fn insert(
        &mut self,
        origin: Origin<'_>,
        name: &Name,
        addr: SocketAddr,
        joined_at: SystemTime,
    ) -> Option<(ClientId, bool)> {
        if let Some(id) = self.id_of(origin) {
            return Some((id, false));
        }
        let display_len = u16::try_from(name.display.len()).ok()?;
        let text = packed(name);
        let (ip, flags) = match addr.ip() {
            IpAddr::V4(v4) => {
                let mut ip = [0; 16];
                ip[..4].copy_from_slice(&v4.octets());
                (ip, 0)
            }
            IpAddr::V6(v6) => (v6.octets(), V6),
        };
        let run = self.intern(origin.node, origin.boot)?;
        let slot = match self.take_free() {
            Some(slot) => slot,
            None => match self.grow() {
                Some(slot) => slot,
                None => {
                    self.release_run(run);
                    return None;
                }
            },
        };
        let active_s = self.now_s();
        let joined_ms = joined_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let generation = self.next_generation;
        self.next_generation = generation.wrapping_add(1) & GEN_MASK;
        let entry = self.entry_mut(slot)?;
        *entry = Entry {
            text,
            conn: origin.conn,
            joined_ms,
            ip,
            run,
            generation,
            active_s,
            port: addr.port(),
            display_len,
            flags,
        };
        self.len += 1;
        let (name_hash, origin_hash) = (
            self.name_hash(&name.key),
            self.origin_hash(run, origin.conn),
        );
        let Remotes {
            by_name,
            by_origin,
            chunks,
            hasher,
            ..
        } = self;
        // Growing an index rehashes each slot from its entry.
        by_name.insert_unique(name_hash, slot, |&s| {
            entry_in(chunks, s).map_or(0, |e| hasher.hash_one(e.key()))
        });
        by_origin.insert_unique(origin_hash, slot, |&s| {
            entry_in(chunks, s).map_or(0, |e| hasher.hash_one((e.run, e.conn)))
        });
        Some((id_of(slot, generation), true))
    }

    /// Removes the member `id`; returns its name and address.
    pub fn remove(&mut self, id: ClientId) -> Option<(Name, SocketAddr)> {
        let slot = self.slot(id)?;
        let (name_hash, origin_hash, run) = {
            let e = self.entry(slot)?;
            (
                self.name_hash(e.key()),
                self.origin_hash(e.run, e.conn),
                e.run,
            )
        };
        if let Ok(found) = self.by_name.find_entry(name_hash, |&s| s == slot) {
            found.remove();
        }
        if let Ok(found) = self.by_origin.find_entry(origin_hash, |&s| s == slot) {
            found.remove();
        }
        let free = self.free;
        let gone = std::mem::replace(self.entry_mut(slot)?, Entry::free(free));
        self.free = slot;
        self.len -= 1;
        self.release_run(run);
        let name = Name {
            display: gone.display().to_owned(),
            key: gone.key().to_owned(),
        };
        let addr = gone.addr();
        if self.len == 0 {
            // A storm's tables are given back once everyone is gone.
            *self = Remotes {
                hasher: self.hasher.clone(),
                epoch: self.epoch,
                next_generation: self.next_generation,
                ..Remotes::default()
            };
        }
        Some((name, addr))
    }

    /// Gives the member `id` a new name (a rename delivered from its node).
    pub fn rename(&mut self, id: ClientId, name: &Name) -> bool {
        let Some(slot) = self.slot(id) else {
            return false;
        };
        let Ok(display_len) = u16::try_from(name.display.len()) else {
            return false;
        };
        let old_hash = match self.entry(slot) {
            Some(e) => self.name_hash(e.key()),
            None => return false,
        };
        if let Ok(found) = self.by_name.find_entry(old_hash, |&s| s == slot) {
            found.remove();
        }
        let text = packed(name);
        if let Some(e) = self.entry_mut(slot) {
            e.text = text;
            e.display_len = display_len;
        }
        let hash = self.name_hash(&name.key);
        let Remotes {
            by_name,
            chunks,
            hasher,
            ..
        } = self;
        by_name.insert_unique(hash, slot, |&s| {
            entry_in(chunks, s).map_or(0, |e| hasher.hash_one(e.key()))
        });
        true
    }

    /// The run `(node, boot)`'s index, counting one more member of it.
    fn intern(&mut self, node: &str, boot: u64) -> Option<u32> {
        if let Some(i) = self.run_of(node, boot) {
            if let Some(Some(r)) = self.runs.get_mut(i as usize) {
                r.members += 1;
            }
            return Some(i);
        }
        let run = Run {
            node: Arc::from(node),
            boot,
            members: 1,
        };
        if let Some(i) = self.runs.iter().position(Option::is_none) {
            self.runs[i] = Some(run);
            return u32::try_from(i).ok();
        }
        let i = u32::try_from(self.runs.len())
            .ok()
            .filter(|&i| i != VACANT)?;
        self.runs.push(Some(run));
        Some(i)
    }

    /// One member fewer of run `i`; a run without members is forgotten.
    fn release_run(&mut self, i: u32) {
        if let Some(slot) = self.runs.get_mut(i as usize)
            && let Some(r) = slot
        {
            r.members -= 1;
            if r.members == 0 {
                *slot = None;
            }
        }
    }

    fn take_free(&mut self) -> Option<u32> {
        let slot = self.free;
        if slot == VACANT {
            return None;
        }
        let next = self.entry(slot)?.conn;
        self.free = u32::try_from(next).unwrap_or(VACANT);
        Some(slot)
    }

    /// Adds a chunk; returns its first slot and chains the rest as free.
    fn grow(&mut self) -> Option<u32> {
        let first = u32::try_from(self.chunks.len() * CHUNK)
            .ok()
            .filter(|f| f.checked_add(CHUNK as u32).is_some_and(|end| end < VACANT))?;
        // Slots first+1.. are free, each pointing at the next; the last at the old free list.
        let chunk: Box<[Entry]> = (0..CHUNK as u32)
            .map(|i| {
                Entry::free(if i + 1 < CHUNK as u32 {
                    first + i + 1
                } else {
                    self.free
                })
            })
            .collect();
        self.chunks.push(chunk);
        self.free = first + 1;
        Some(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_proto::names::NameRules;

    fn name(s: &str) -> Name {
        NameRules::new(24, &[])
            .validate(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn at(node: &str, boot: u64, conn: u64) -> Origin<'_> {
        Origin { node, boot, conn }
    }

    fn v4() -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 7], 4242))
    }

    #[test]
    fn an_entry_is_small() {
        assert!(
            std::mem::size_of::<Entry>() <= 72,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }

    #[test]
    fn members_are_found_by_id_name_and_origin() {
        let mut t = Remotes::default();
        let joined = UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
        let v6 = SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 9));
        let (alice, new) = t
            .insert(at("a", 1, 7), &name("Alice"), v4(), joined)
            .unwrap_or_else(|| panic!("full"));
        assert!(new && is_remote(alice));
        let (bob, _) = t
            .insert(at("b", 2, 7), &name("bob"), v6, joined)
            .unwrap_or_else(|| panic!("full"));
        assert_ne!(alice, bob);
        assert_eq!(t.len(), 2);
        // Again: the same member, the same id, nothing added.
        assert_eq!(
            t.insert(at("a", 1, 7), &name("Alice"), v4(), joined),
            Some((alice, false))
        );
        assert_eq!(t.len(), 2);
        let a = t.get(alice).unwrap_or_else(|| panic!("alice"));
        assert_eq!((a.display, a.key, a.addr), ("Alice", "alice", v4()));
        assert_eq!((&**a.node, a.joined_at), ("a", joined));
        assert!(a.idle < Duration::from_secs(2));
        let b = t.get(bob).unwrap_or_else(|| panic!("bob"));
        assert_eq!((b.display, b.key, b.addr), ("bob", "bob", v6));
        assert_eq!(t.find("alice"), Some(alice));
        assert_eq!(t.find("Alice"), None, "looked up by key");
        assert_eq!(t.find("bob"), Some(bob));
        assert_eq!(t.id_of(at("a", 1, 7)), Some(alice));
        // Another run of the same node, another connection: someone else.
        assert_eq!(t.id_of(at("a", 2, 7)), None);
        assert_eq!(t.id_of(at("a", 1, 8)), None);
        assert_eq!(t.origin(bob), Some((Arc::from("b"), 2, 7)));
        let mut ids: Vec<ClientId> = t.iter().map(|(id, _)| id).collect();
        ids.sort_unstable();
        let mut want = vec![alice, bob];
        want.sort_unstable();
        assert_eq!(ids, want);
        assert_eq!(t.get(1), None, "a local connection's id");
    }

    #[test]
    fn a_removed_members_id_never_finds_its_slots_next_member() {
        let mut t = Remotes::default();
        let now = SystemTime::now();
        let (alice, _) = t
            .insert(at("a", 1, 1), &name("alice"), v4(), now)
            .unwrap_or_else(|| panic!("full"));
        let (keep, _) = t
            .insert(at("a", 1, 2), &name("keep"), v4(), now)
            .unwrap_or_else(|| panic!("full"));
        let (gone, addr) = t.remove(alice).unwrap_or_else(|| panic!("alice"));
        assert_eq!(
            (gone.display.as_str(), gone.key.as_str(), addr),
            ("alice", "alice", v4())
        );
        assert_eq!(t.remove(alice), None);
        assert_eq!((t.find("alice"), t.id_of(at("a", 1, 1))), (None, None));
        // The freed slot goes to the next member, under a new id.
        let (carol, _) = t
            .insert(at("a", 1, 3), &name("carol"), v4(), now)
            .unwrap_or_else(|| panic!("full"));
        assert_eq!(carol as u32, alice as u32, "the slot is reused");
        assert_ne!(carol, alice);
        assert_eq!(t.get(alice), None);
        assert_eq!(t.remove(alice), None);
        assert_eq!(t.get(carol).map(|c| c.display), Some("carol"));
        assert_eq!(t.get(keep).map(|k| k.display), Some("keep"));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn thousands_come_and_go_and_every_index_stays_right() {
        let mut t = Remotes::default();
        let now = SystemTime::now();
        let mut ids = Vec::new();
        for i in 0..3_000u64 {
            let node = if i % 2 == 0 { "even" } else { "odd" };
            let (id, new) = t
                .insert(at(node, 9, i), &name(&format!("U{i}")), v4(), now)
                .unwrap_or_else(|| panic!("full"));
            assert!(new);
            ids.push(id);
        }
        assert_eq!(t.len(), 3_000);
        assert_eq!(t.runs.iter().flatten().count(), 2);
        // Every third one leaves; the rest are all still found every way.
        for (i, id) in ids.iter().enumerate().filter(|(i, _)| i % 3 == 0) {
            assert_eq!(t.remove(*id).map(|(n, _)| n.display), Some(format!("U{i}")));
        }
        for (i, id) in ids.iter().enumerate() {
            let node = if i % 2 == 0 { "even" } else { "odd" };
            let here = i % 3 != 0;
            let key = name(&format!("U{i}")).key;
            assert_eq!(t.find(&key), here.then_some(*id), "U{i}");
            assert_eq!(t.id_of(at(node, 9, i as u64)), here.then_some(*id));
            assert_eq!(t.get(*id).is_some(), here);
        }
        assert_eq!(t.len(), 2_000);
        // Everyone leaves: the runs are forgotten and the tables given back.
        for id in ids
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 0)
            .map(|(_, id)| id)
        {
            assert!(t.remove(*id).is_some());
        }
        assert_eq!(t.len(), 0);
        assert!(t.chunks.is_empty() && t.runs.is_empty());
        assert_eq!(t.iter().count(), 0);
    }

    #[test]
    fn a_nodes_run_is_forgotten_with_its_last_member() {
        let mut t = Remotes::default();
        let now = SystemTime::now();
        let (a, _) = t
            .insert(at("a", 1, 1), &name("a1"), v4(), now)
            .unwrap_or_else(|| panic!("full"));
        let (b, _) = t
            .insert(at("b", 1, 1), &name("b1"), v4(), now)
            .unwrap_or_else(|| panic!("full"));
        assert!(t.remove(a).is_some());
        assert_eq!(t.runs.iter().flatten().count(), 1);
        // A restarted node "a" is a new run; it takes the forgotten run's place.
        let (a2, _) = t
            .insert(at("a", 2, 1), &name("a2"), v4(), now)
            .unwrap_or_else(|| panic!("full"));
        assert_eq!(t.runs.len(), 2);
        assert_eq!(t.origin(a2), Some((Arc::from("a"), 2, 1)));
        assert_eq!(t.origin(b), Some((Arc::from("b"), 1, 1)));
    }

    #[test]
    fn a_rename_moves_the_name_index() {
        let mut t = Remotes::default();
        let (id, _) = t
            .insert(at("a", 1, 1), &name("alice"), v4(), SystemTime::now())
            .unwrap_or_else(|| panic!("full"));
        // A name whose key differs from its display form: both kept, found by the key.
        let zoe = name("Zoë");
        assert_ne!(zoe.key, zoe.display);
        assert!(t.rename(id, &zoe));
        assert_eq!((t.find("alice"), t.find(&zoe.key)), (None, Some(id)));
        let z = t.get(id).unwrap_or_else(|| panic!("zoë"));
        assert_eq!((z.display, z.key), ("Zoë", zoe.key.as_str()));
        assert_eq!(t.id_of(at("a", 1, 1)), Some(id));
        assert!(t.rename(id, &name("al")));
        assert_eq!((t.find(&zoe.key), t.find("al")), (None, Some(id)));
        assert!(!t.rename(1, &name("x")));
    }

    #[test]
    fn touch_resets_the_idle_time() {
        let mut t = Remotes::default();
        let (id, _) = t
            .insert(at("a", 1, 1), &name("a1"), v4(), SystemTime::now())
            .unwrap_or_else(|| panic!("full"));
        t.epoch -= Duration::from_secs(100);
        if let Some(e) = t.slot(id).and_then(|s| t.entry_mut(s)) {
            e.active_s = 0;
        }
        assert!(t.get(id).is_some_and(|m| m.idle >= Duration::from_secs(99)));
        t.touch(id);
        assert!(t.get(id).is_some_and(|m| m.idle < Duration::from_secs(2)));
    }
}
