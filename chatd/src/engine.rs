//! The engine: what the nodes serving one room must share, behind one small interface.
//!
//! A room served by several nodes needs exactly three things in common: **one order** of room
//! events (every node delivers the same events in the same sequence to its own members),
//! **names** claimed and released atomically across nodes, and the **recent history** a newcomer
//! is shown (built by each node from the same ordered events). Everything else stays per node,
//! on the room's side of this interface: who is connected here, their outboxes, encoding each
//! line once, and batching join/leave storms (room.rs).
//!
//! The room asks the engine to [`claim`](Engine::claim) a name before a join or rename, to
//! [`append`](Engine::append) every event, and to [`release`](Engine::release) a name once its
//! holder is gone; the engine delivers each appended event, in its one order, to
//! [`Room::deliver`] on every node. [`Local`] is the in-process engine of a single node: its
//! order is the room lock's and it delivers at once, so a single node pays one function call for
//! the seam. A clustered engine orders through a shared log and delivers from it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use std::net::SocketAddr;

use chat_proto::names::{Name, NameError};

use crate::reclaim::Token;
use crate::room::{ClientId, Delivered, Event, Room};

/// Position of an event in the room's one order (1 for the first).
pub type Seq = u64;

/// A connection asking for a name: what the name's entry says of its holder.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// The name, validated.
    pub name: &'a Name,
    /// The connection asking.
    pub holder: ClientId,
    /// Its peer address.
    pub addr: SocketAddr,
    /// For a reclaim: the token presented, which the name's holder must have been issued.
    pub proof: Option<&'a Token>,
}

/// What the nodes of one room share: the order of events, and name ownership.
pub trait Engine: Send + Sync + fmt::Debug {
    /// Claims a name for a connection, atomically. A name already the connection's is kept.
    /// When another connection holds it, `may_replace` is asked: yes hands the name over (a
    /// reclaim after a lost connection) and returns the previous holder; no refuses with
    /// `refusal`. An engine that cannot reach its shared state says
    /// [`NameError::Unavailable`].
    fn claim(
        &self,
        claim: Claim<'_>,
        may_replace: &dyn Fn(ClientId) -> bool,
        refusal: NameError,
    ) -> Result<Option<ClientId>, NameError>;

    /// Releases the name `key` if `holder` still holds it (a later holder keeps it).
    fn release(&self, key: &str, holder: ClientId);

    /// Orders `event` after every event appended before it and delivers it to every node's
    /// room. Returns what delivering it did on this node when that happened at once (an
    /// in-process engine), `None` when it is delivered later.
    fn append(&self, room: &Room, event: Event<'_>) -> Option<Delivered>;

    /// The position of the last event delivered here.
    fn position(&self) -> Seq;

    /// Connection `holder` was issued reclaim `token` (an engine shared by several nodes keeps
    /// its digest beside the holder's name, so another node can check a reclaim).
    fn token_issued(&self, _holder: ClientId, _token: &Token) {}
}

/// The in-process engine of a single node: names in a map, order by the room lock.
#[derive(Debug, Default)]
pub struct Local {
    /// Name key → the connection holding it. Claims happen before the event that uses the name
    /// is appended, so two joins racing for one name cannot both pass.
    names: Mutex<HashMap<String, ClientId>>,
    /// Events delivered so far.
    delivered: AtomicU64,
}

impl Local {
    fn names(&self) -> MutexGuard<'_, HashMap<String, ClientId>> {
        // Single inserts and removes: the map is valid at every point, poisoned or not.
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Engine for Local {
    fn claim(
        &self,
        claim: Claim<'_>,
        may_replace: &dyn Fn(ClientId) -> bool,
        refusal: NameError,
    ) -> Result<Option<ClientId>, NameError> {
        let holder = claim.holder;
        let mut names = self.names();
        match names.entry(claim.name.key.clone()) {
            Entry::Vacant(e) => {
                e.insert(holder);
                Ok(None)
            }
            Entry::Occupied(e) if *e.get() == holder => Ok(None),
            Entry::Occupied(mut e) => {
                let previous = *e.get();
                if may_replace(previous) {
                    e.insert(holder);
                    Ok(Some(previous))
                } else {
                    Err(refusal)
                }
            }
        }
    }

    fn release(&self, key: &str, holder: ClientId) {
        let mut names = self.names();
        if names.get(key) == Some(&holder) {
            names.remove(key);
        }
    }

    fn append(&self, room: &Room, event: Event<'_>) -> Option<Delivered> {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        Some(room.deliver(event))
    }

    fn position(&self) -> Seq {
        self.delivered.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_has_one_holder_until_released_or_handed_over() {
        let e = Local::default();
        let alice = chat_proto::names::NameRules::new(24, &[])
            .validate("alice")
            .unwrap_or_else(|err| panic!("{err}"));
        let by = |holder| Claim {
            name: &alice,
            holder,
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            proof: None,
        };
        let never = |_: ClientId| false;
        assert_eq!(e.claim(by(1), &never, NameError::Taken), Ok(None));
        assert_eq!(e.claim(by(1), &never, NameError::Taken), Ok(None));
        assert_eq!(
            e.claim(by(2), &never, NameError::Taken),
            Err(NameError::Taken)
        );
        assert_eq!(
            e.claim(by(2), &|old| old == 1, NameError::Taken),
            Ok(Some(1))
        );
        // The old holder's late release does not free the new holder's name.
        e.release("alice", 1);
        assert_eq!(
            e.claim(by(3), &never, NameError::ReclaimRefused),
            Err(NameError::ReclaimRefused)
        );
        e.release("alice", 2);
        assert_eq!(e.claim(by(3), &never, NameError::Taken), Ok(None));
    }
}
