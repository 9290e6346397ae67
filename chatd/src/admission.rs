//! Who may connect: the checks every chat listener makes on a new connection before a session
//! exists, in one place. A listener accepts, calls [`Admission::admit`], and either serves the
//! connection for as long as it holds the [`Ticket`], or tells the client the [`Refusal`]'s
//! `code` and `text` in its own framing and closes.
//!
//! The checks, in order: the total connection cap (`limits.max-clients`), address bans, and the
//! per-address cap (`limits.max-connections-per-ip`). Each refusal is counted and logged here,
//! so every listener reports the same way.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use crate::bans;
use crate::shared::{LimitCounters, Shared};
use chat_proto::protocol::code;

/// The admission checks shared by every listener, with the per-address connection counts.
#[derive(Debug)]
pub struct Admission {
    shared: Arc<Shared>,
    // A std mutex: one hash-map update per connect and disconnect, never across an await.
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

/// Which limit refused a connection (each has its counter in `chatctl status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `limits.max-clients` connections were open (`refused_full`).
    MaxClients,
    /// The address or its block is banned (`refused_banned`).
    Banned,
    /// `limits.max-connections-per-ip` were open from this address (`refused_per_ip`).
    PerAddress,
}

/// Why a connection may not stay, as the client is told it.
///
/// It holds the connection's slot until dropped, so clients still being told go on counting
/// against `limits.max-clients`: a flood of refused connections cannot grow without bound.
#[derive(Debug)]
pub struct Refusal {
    /// The `*** ERR` code (`chat_proto::protocol::code`).
    pub code: &'static str,
    /// The text after the code, naming the config key or the ban.
    pub text: String,
    /// The limit that fired (already counted and logged).
    pub limit: Limit,
    _slot: Ticket,
}

impl Refusal {
    /// A refusal by `limit`, counted in `shared.limits`.
    fn new(
        shared: &Shared,
        limit: Limit,
        code: &'static str,
        text: String,
        slot: Ticket,
    ) -> Refusal {
        let l = &shared.limits;
        LimitCounters::bump(match limit {
            Limit::MaxClients => &l.refused_full,
            Limit::Banned => &l.refused_banned,
            Limit::PerAddress => &l.refused_per_ip,
        });
        Refusal {
            code,
            text,
            limit,
            _slot: slot,
        }
    }
}

/// An admitted connection's place in the counts (in total and for its address); dropping it
/// gives the place back.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    /// The address counted against the per-address cap; `None` while only the total is held.
    ip: Option<IpAddr>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission
            .shared
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.ip {
            self.admission.release(ip);
        }
    }
}

impl Admission {
    /// Admission for the daemon serving `shared` (its config, bans and counters).
    pub fn new(shared: Arc<Shared>) -> Self {
        Admission {
            shared,
            per_address: Mutex::new(HashMap::new()),
        }
    }

    /// Decides whether the connection from `peer` may stay. Counting in `shared.connections`
    /// starts here, for admitted and refused connections alike, and ends when the ticket (or
    /// the refusal holding it) is dropped.
    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Ticket, Refusal> {
        let shared = &self.shared;
        let open = shared.connections.fetch_add(1, Ordering::Relaxed);
        let mut ticket = Ticket {
            admission: self.clone(),
            ip: None,
        };
        let live = shared.live.load();
        let max = live.config.limits.max_clients.get();
        if open >= max {
            warn!(%peer, max_clients = max, "refusing connection: server full (limits.max-clients)");
            let text =
                format!("server full ({max} connections, limits.max-clients), try again later");
            return Err(Refusal::new(
                shared,
                Limit::MaxClients,
                code::SERVER_FULL,
                text,
                ticket,
            ));
        }
        if let Some(ban) = shared.bans.find(peer.ip(), None) {
            info!(%peer, ban = %ban.target.to_text(), "refusing connection: banned address");
            return Err(Refusal::new(
                shared,
                Limit::Banned,
                code::BANNED,
                ban.refusal(),
                ticket,
            ));
        }
        let per_ip = live.config.limits.max_connections_per_ip.get();
        if !self.try_reserve(peer.ip(), per_ip) {
            warn!(%peer, max_connections_per_ip = per_ip,
                "refusing connection: too many from this address (limits.max-connections-per-ip)");
            let text = format!(
                "too many connections from your address ({per_ip}, limits.max-connections-per-ip)"
            );
            return Err(Refusal::new(
                shared,
                Limit::PerAddress,
                code::TOO_MANY_CONNECTIONS,
                text,
                ticket,
            ));
        }
        ticket.ip = Some(peer.ip());
        Ok(ticket)
    }

    /// Counts a connection from `ip` unless `max` are already open; returns whether it may stay.
    fn try_reserve(&self, ip: IpAddr, max: usize) -> bool {
        let mut open = self.lock();
        let n = open.entry(address_key(ip)).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    fn release(&self, ip: IpAddr) {
        let mut open = self.lock();
        let key = address_key(ip);
        if let Some(n) = open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&key);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.per_address.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the per-address cap counts by. IPv4 addresses count one by one; IPv6 addresses count
/// per /64, the block one subscriber usually gets, so a single host cannot dodge the limit by
/// rotating through its own addresses. IPv4-mapped IPv6 counts as the IPv4 address, the same
/// rule bans use.
pub(crate) fn address_key(ip: IpAddr) -> IpAddr {
    match bans::canonical(ip) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bans::{Ban, Target};
    use crate::config::{Bounded, Config};

    fn admission(dir: &std::path::Path, max_clients: u64, per_ip: u64) -> Arc<Admission> {
        let mut config = Config::default();
        config.limits.max_clients = Bounded(max_clients);
        config.limits.max_connections_per_ip = Bounded(per_ip);
        let shared = Shared::for_test(dir, config);
        Arc::new(Admission::new(Arc::new(shared)))
    }

    fn peer(s: &str) -> SocketAddr {
        s.parse()
            .unwrap_or_else(|e| panic!("test address {s}: {e}"))
    }

    fn open(a: &Admission) -> usize {
        a.shared.connections.load(Ordering::Relaxed)
    }

    #[test]
    fn caps_per_address_and_ipv6_per_64() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let a = admission(dir.path(), 100, 2);
        let first = a.admit(peer("192.0.2.1:1"));
        let second = a.admit(peer("[::ffff:192.0.2.1]:2"));
        assert!(first.is_ok() && second.is_ok());
        let third = a.admit(peer("192.0.2.1:3")).err();
        assert_eq!(third.as_ref().map(|r| r.limit), Some(Limit::PerAddress));
        assert_eq!(
            third.as_ref().map(|r| r.code),
            Some(code::TOO_MANY_CONNECTIONS)
        );
        // The refusal holds its slot until it is dropped.
        assert_eq!(open(&a), 3);
        drop(third);
        assert_eq!(open(&a), 2);

        let v6: Vec<_> = ["[2001:db8::1]:1", "[2001:db8::ffff]:1"]
            .iter()
            .map(|p| a.admit(peer(p)))
            .collect();
        assert!(v6.iter().all(Result::is_ok));
        let same_64 = a.admit(peer("[2001:db8::2:3]:1")).err().map(|r| r.limit);
        assert_eq!(same_64, Some(Limit::PerAddress));
        assert!(a.admit(peer("[2001:db8:0:1::1]:1")).is_ok());

        drop((first, second, v6));
        assert!(a.admit(peer("192.0.2.1:4")).is_ok());
        assert_eq!(a.shared.limits.snapshot().refused_per_ip, 2);
    }

    #[test]
    fn full_server_and_banned_addresses_are_refused_and_counted() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let a = admission(dir.path(), 1, 5);
        let ban = Ban {
            target: Target::parse("198.51.100.0/24").unwrap_or(Target::Name("x".into())),
            reason: "spam".into(),
            created: bans::now_secs(),
            expires: None,
        };
        a.shared.bans.add(ban).unwrap_or_else(|e| panic!("{e}"));
        let banned = a.admit(peer("198.51.100.7:1")).err();
        assert_eq!(banned.as_ref().map(|r| r.code), Some(code::BANNED));
        assert_eq!(
            banned.map(|r| r.text),
            Some("you are banned permanently: spam".to_owned())
        );
        let held = a.admit(peer("192.0.2.1:1"));
        assert!(held.is_ok());
        let full = a.admit(peer("192.0.2.2:1")).err();
        assert_eq!(full.map(|r| r.limit), Some(Limit::MaxClients));
        let stats = a.shared.limits.snapshot();
        assert_eq!((stats.refused_full, stats.refused_banned), (1, 1));
        drop(held);
        assert_eq!(open(&a), 0);
    }
}
