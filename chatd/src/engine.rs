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
//! [`join`](Engine::join) a newcomer, to [`append`](Engine::append) every other event, and to
//! [`release`](Engine::release) a name once its holder is gone. Claims and joins may have to
//! wait for other nodes, so they return a [`Pending`] future (ready at once in the in-process
//! engine), which the session awaits without holding a runtime thread (session/core.rs). The
//! engine delivers each appended event, in its one order, to
//! [`Deliver::deliver`] of the room on every node. This module holds the vocabulary both sides
//! speak ([`Event`], [`Delivered`], [`Newcomer`]), so the room depends on it and not the reverse. [`Local`] is the in-process engine of a single node: its
//! order is the room lock's and it delivers at once, so a single node pays one function call for
//! the seam. A clustered engine orders through a shared log and delivers from it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::future::{Future, ready};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};

use std::net::SocketAddr;

use chat_proto::names::{Name, NameError};

use std::sync::Arc;

use bytes::Bytes;

use crate::outbox::Outbox;

/// Identity of one connection for its whole life (names can change, addresses can repeat).
pub type ClientId = u64;

/// A connection taking a name: who it is and what it is sent on joining.
#[derive(Debug)]
pub struct Newcomer<'a> {
    /// The connection.
    pub id: ClientId,
    /// The name it asked for, already validated.
    pub name: Name,
    /// Its peer address, for `chatctl list` and bans.
    pub addr: SocketAddr,
    /// What carries its bytes, for `chatctl list`.
    pub transport: Transport,
    /// Where its lines go.
    pub outbox: Arc<Outbox>,
    /// Lines it gets before the history (not room lines: `WELCOME`, `MOTD`).
    pub welcome: &'a [Bytes],
}

/// What carries a client's bytes to this node (shown by `chatctl list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP (`server.listen`).
    Tcp,
    /// TLS over TCP (`tls.listen`).
    Tls,
    /// A WebSocket on the web listener (`web.listen`), over plain HTTP.
    Ws,
    /// A WebSocket on the web listener over HTTPS (`web.tls`).
    Wss,
}

impl Transport {
    /// The name `chatctl list` shows: `tcp`, `tls`, `ws` or `wss`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }
}

impl Newcomer<'_> {
    /// Queues the newcomer's welcome lines (before any room line reaches it).
    pub fn greet(&self) {
        for frame in self.welcome {
            self.outbox.push(frame.clone());
        }
    }

    /// What the engine records of the newcomer when it claims its name.
    pub fn claim(&self) -> Claim<'_> {
        Claim {
            name: &self.name,
            holder: self.id,
            addr: self.addr,
            proof: None,
        }
    }
}

/// A room event: everything that changes the room or reaches its members goes through the
/// engine as one of these, so every node delivers the same events in the same order. Members
/// are named by connection; names travel validated.
#[derive(Debug)]
pub enum Event<'a> {
    /// A connection joins under a name its engine has claimed for it.
    Join(Newcomer<'a>),
    /// The member `id` lost its name to a reconnecting client (a reclaim): told `why`, closed,
    /// and everyone else told it left (reconnected).
    Replaced {
        /// The connection replaced.
        id: ClientId,
        /// Its last line's text.
        why: &'a str,
    },
    /// A message from member `id` to everyone else (sanitised).
    Say {
        /// The sender.
        id: ClientId,
        /// The text.
        text: &'a str,
    },
    /// An action (`/me`) from member `id`.
    Act {
        /// The sender.
        id: ClientId,
        /// The text.
        text: &'a str,
    },
    /// A private message from member `from` to the member named `to`.
    Private {
        /// The sender.
        from: ClientId,
        /// The recipient's name, as typed.
        to: &'a str,
        /// The text (sanitised).
        text: &'a str,
    },
    /// Member `id` takes a new name (claimed for it already).
    Rename {
        /// The member.
        id: ClientId,
        /// The new name.
        name: Name,
    },
    /// Member `id` leaves; everyone else is told `reason`.
    Leave {
        /// The member.
        id: ClientId,
        /// Why, as announced.
        reason: &'a str,
    },
    /// Member `id` is disconnected by an administrator.
    Kick {
        /// The member.
        id: ClientId,
        /// Why, as announced.
        reason: &'a str,
        /// Whether a ban sends it away (its client is told so apart from a kick, e.g. by a
        /// WebSocket close code, which must not be read from the free-text reason).
        ban: bool,
    },
    /// A notice from the operators to every member.
    Announce {
        /// The text.
        text: &'a str,
    },
}

/// Consecutive messages and actions of one member that arrived together (the complete lines of
/// one read), kept in order until they are appended as consecutive [`Event::Say`] and
/// [`Event::Act`] events ([`Engine::append_said`]). A single node fans them out as one frame
/// per recipient instead of one per line: a recipient's queue is then locked, bound-checked and
/// woken once for the lines of a read, not once for each (docs/performance.md).
#[derive(Debug, Default)]
pub struct Said {
    /// The lines' texts, one after another (sanitised, so none holds a newline).
    text: String,
    /// Per line: whether it is an action (`/me`), and where its text ends in `text`.
    lines: Vec<(bool, usize)>,
}

impl Said {
    /// The longest `text`, and the most line entries, kept between two batches: a member who
    /// once sent a long burst (or thousands of one-letter lines) does not keep its buffers; a
    /// usual batch is a few lines, a few hundred bytes.
    const KEEP: usize = 4096;
    const KEEP_LINES: usize = 64;

    /// Adds a message (or, with `action`, a `/me` action) after the ones held.
    pub fn push(&mut self, action: bool, text: &str) {
        self.text.push_str(text);
        self.lines.push((action, self.text.len()));
    }

    /// Lines held.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether no line is held.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Bytes of text held.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    /// The lines held, in order: (whether it is an action, its text).
    pub fn iter(&self) -> impl Iterator<Item = (bool, &str)> + Clone + '_ {
        let mut start = 0;
        self.lines.iter().map(move |&(action, end)| {
            let text = self.text.get(start..end).unwrap_or_default();
            start = end;
            (action, text)
        })
    }

    /// Forgets the lines held (they were appended), keeping small buffers for the next ones.
    pub fn clear(&mut self) {
        if self.text.capacity() > Self::KEEP || self.lines.capacity() > Self::KEEP_LINES {
            *self = Said::default();
        } else {
            self.text.clear();
            self.lines.clear();
        }
    }
}

/// What delivering one event did on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// A member joined; the room now has `users` members.
    Joined {
        /// Members after the join.
        users: usize,
    },
    /// A member was renamed from `old`.
    Renamed {
        /// The previous display name.
        old: String,
    },
    /// A member left, or was kicked or replaced.
    Removed {
        /// Its name (key and display).
        name: Name,
        /// Its address.
        addr: SocketAddr,
    },
    /// A private message reached the member with this display name.
    Sent {
        /// The recipient's display name.
        to: String,
    },
    /// An announcement reached this many members.
    Announced {
        /// How many members got it.
        recipients: usize,
    },
    /// The event named a member who is not (or no longer) here; nothing changed.
    NoSuchMember,
    /// The engine could not deliver the event (a cluster whose bus did not answer in time).
    NotDelivered,
    /// A message or action was sent.
    Posted,
}

/// Where an engine delivers events: a node's room (`room::Room`).
pub trait Deliver {
    /// Delivers one event, in the engine's order, to this node's members: the fan-out half of
    /// every room operation.
    fn deliver(&self, event: Event<'_>) -> Delivered;

    /// Delivers `said`'s lines, all from member `id`, as consecutive messages and actions: what
    /// delivering each as its own [`Event::Say`] or [`Event::Act`] would do, in one step.
    fn deliver_said(&self, id: ClientId, said: &Said) -> Delivered;

    /// The member of this node `id`, if it is seated: what an engine that publishes its
    /// events needs of it, read from the room rather than kept twice.
    fn seated(&self, id: ClientId) -> Option<Seated>;
}

/// A member of this node seated in the room, as its engine sees it.
#[derive(Debug, Clone)]
pub struct Seated {
    /// Its display name.
    pub name: String,
    /// Its peer address.
    pub addr: SocketAddr,
    /// Where its lines go (an engine tells it when its line was not delivered).
    pub outbox: Arc<Outbox>,
}

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
    /// For a reclaim: the digest of the token presented (`reclaim::Token::digest`), which
    /// must be the digest of the token the name's holder was issued.
    pub proof: Option<&'a str>,
}

/// A step an engine may finish later (a cluster waits for NATS), boxed so the trait stays
/// object-safe; the in-process engine's are ready at once. Awaited by the session that asked,
/// never on a runtime thread of its own.
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the nodes of one room share: the order of events, and name ownership.
pub trait Engine: Send + Sync + fmt::Debug {
    /// Claims a name for a connection, atomically. A name already the connection's is kept.
    /// When another connection holds it, `may_replace` is asked: yes hands the name over (a
    /// reclaim after a lost connection) and returns the previous holder; no refuses with
    /// `refusal`. An engine that cannot reach its shared state says
    /// [`NameError::Unavailable`].
    fn claim<'a>(
        &'a self,
        claim: Claim<'a>,
        may_replace: &'a (dyn Fn(ClientId) -> bool + Sync),
        refusal: NameError,
    ) -> Pending<'a, Result<Option<ClientId>, NameError>>;

    /// Appends the join of `who` (its name claimed) and resolves once it is delivered on this
    /// node: what delivering it did, or `None` when the engine does not know (delivered, the
    /// room's size unknown); [`Delivered::NotDelivered`] when the join was taken back.
    fn join<'a>(
        &'a self,
        room: &'a (dyn Deliver + Sync),
        who: Newcomer<'a>,
    ) -> Pending<'a, Option<Delivered>> {
        Box::pin(ready(self.append(room, Event::Join(who))))
    }

    /// Releases the name `key` if `holder` still holds it (a later holder keeps it).
    fn release(&self, key: &str, holder: ClientId);

    /// Orders `event` after every event appended before it and delivers it to every node's
    /// room. Returns what delivering it did on this node when that happened at once (an
    /// in-process engine), `None` when it is delivered later.
    fn append(&self, room: &dyn Deliver, event: Event<'_>) -> Option<Delivered>;

    /// Appends `said`'s lines, all from member `id`, as consecutive [`Event::Say`] and
    /// [`Event::Act`] events (one after the other here; an engine that orders by one lock may
    /// deliver them together, [`Deliver::deliver_said`]).
    fn append_said(&self, room: &dyn Deliver, id: ClientId, said: &Said) {
        for (action, text) in said.iter() {
            let event = if action {
                Event::Act { id, text }
            } else {
                Event::Say { id, text }
            };
            self.append(room, event);
        }
    }

    /// Connection `holder` of `room` was issued a reclaim token with this digest (an engine
    /// shared by several nodes keeps it beside the holder's name, so another node can check a
    /// reclaim); resolves once it is kept.
    fn token_issued<'a>(
        &'a self,
        _room: &'a (dyn Deliver + Sync),
        _holder: ClientId,
        _digest: &'a str,
    ) -> Pending<'a, ()> {
        Box::pin(ready(()))
    }
}

/// The in-process engine of a single node: names in a map, order by the room lock.
#[derive(Debug, Default)]
pub struct Local {
    /// Name key → the connection holding it. Claims happen before the event that uses the name
    /// is appended, so two joins racing for one name cannot both pass.
    names: Mutex<HashMap<String, ClientId>>,
}

impl Local {
    fn names(&self) -> MutexGuard<'_, HashMap<String, ClientId>> {
        // Single inserts and removes: the map is valid at every point, poisoned or not.
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Local {
    fn claim_now(
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
}

impl Engine for Local {
    fn claim<'a>(
        &'a self,
        claim: Claim<'a>,
        may_replace: &'a (dyn Fn(ClientId) -> bool + Sync),
        refusal: NameError,
    ) -> Pending<'a, Result<Option<ClientId>, NameError>> {
        Box::pin(ready(self.claim_now(claim, may_replace, refusal)))
    }

    fn release(&self, key: &str, holder: ClientId) {
        let mut names = self.names();
        if names.get(key) == Some(&holder) {
            names.remove(key);
        }
    }

    fn append(&self, room: &dyn Deliver, event: Event<'_>) -> Option<Delivered> {
        Some(room.deliver(event))
    }

    /// The room lock orders a single node's events, so lines appended together are delivered
    /// together: consecutive in every member's queue, with nothing between them.
    fn append_said(&self, room: &dyn Deliver, id: ClientId, said: &Said) {
        room.deliver_said(id, said);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn said_gives_its_lines_back_in_order_and_keeps_only_small_buffers() {
        let mut said = Said::default();
        said.push(false, "hi");
        said.push(true, "waves");
        said.push(false, "");
        said.push(false, "bye");
        let lines: Vec<_> = said.iter().collect();
        assert_eq!(
            lines,
            [(false, "hi"), (true, "waves"), (false, ""), (false, "bye")]
        );
        assert_eq!((said.len(), said.text_len()), (4, 10));
        said.clear();
        assert!(said.is_empty() && said.iter().next().is_none());
        // A usual batch's buffers are kept for the next one...
        assert!(said.text.capacity() > 0 && said.lines.capacity() > 0);
        // ...a burst's are not, however it grew them.
        for _ in 0..1000 {
            said.push(false, "x");
        }
        said.clear();
        assert_eq!((said.text.capacity(), said.lines.capacity()), (0, 0));
        said.push(false, &"y".repeat(5000));
        said.clear();
        assert_eq!(said.text.capacity(), 0);
    }

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
        assert_eq!(e.claim_now(by(1), &never, NameError::Taken), Ok(None));
        assert_eq!(e.claim_now(by(1), &never, NameError::Taken), Ok(None));
        assert_eq!(
            e.claim_now(by(2), &never, NameError::Taken),
            Err(NameError::Taken)
        );
        assert_eq!(
            e.claim_now(by(2), &|old| old == 1, NameError::Taken),
            Ok(Some(1))
        );
        // The old holder's late release does not free the new holder's name.
        e.release("alice", 1);
        assert_eq!(
            e.claim_now(by(3), &never, NameError::ReclaimRefused),
            Err(NameError::ReclaimRefused)
        );
        e.release("alice", 2);
        assert_eq!(e.claim_now(by(3), &never, NameError::Taken), Ok(None));
    }
}
