//! A fake service manager: the datagram socket systemd passes as `NOTIFY_SOCKET`, here an
//! abstract one, so tests can check every notification of a daemon's life.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::time::{Duration, Instant};

use super::WAIT;

/// A fake service manager on an abstract socket, as systemd ≥ 254 uses by default.
pub struct FakeManager {
    socket: UnixDatagram,
    /// The address to pass as `NOTIFY_SOCKET` (`@name`).
    pub name: String,
    /// `WATCHDOG=1` pings seen so far (they interleave with everything else).
    pub watchdog_pings: usize,
    /// Every datagram received, in order, for failure messages.
    pub seen: Vec<String>,
}

impl FakeManager {
    /// A manager listening on a fresh abstract socket.
    pub fn new() -> FakeManager {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("chatd-it-{}-{stamp}", std::process::id());
        let addr = UnixAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind abstract socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        FakeManager {
            socket,
            name: format!("@{name}"),
            watchdog_pings: 0,
            seen: Vec::new(),
        }
    }

    /// The next datagram that is not a watchdog ping (those are counted), within `WAIT`.
    pub fn next(&mut self) -> String {
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 4096];
        loop {
            assert!(
                Instant::now() < deadline,
                "no notification within {WAIT:?}; saw {:?}",
                self.seen
            );
            let Ok(n) = self.socket.recv(&mut buf) else {
                continue;
            };
            let msg = String::from_utf8(buf[..n].to_vec()).expect("UTF-8 datagram");
            self.seen.push(msg.clone());
            if msg == "WATCHDOG=1" {
                self.watchdog_pings += 1;
                continue;
            }
            return msg;
        }
    }

    /// Skips plain `STATUS=` updates until a datagram starting with `prefix`.
    pub fn expect(&mut self, prefix: &str) -> String {
        loop {
            let msg = self.next();
            if msg.starts_with(prefix) {
                return msg;
            }
            assert!(
                msg.starts_with("STATUS="),
                "expected {prefix:?}, got {msg:?} (all: {:?})",
                self.seen
            );
        }
    }

    /// Shrinks the socket's receive buffer to the least the kernel allows, so a manager that
    /// does not read is full after a few datagrams.
    pub fn shrink_buffer(&self) {
        nix::sys::socket::setsockopt(&self.socket, nix::sys::socket::sockopt::RcvBuf, &1)
            .expect("SO_RCVBUF");
    }

    /// Takes one datagram if one is waiting (within the socket's 100 ms timeout); it must be
    /// a watchdog ping, which is counted.
    pub fn poll_watchdog(&mut self) {
        let mut buf = [0u8; 64];
        if let Ok(n) = self.socket.recv(&mut buf) {
            assert_eq!(&buf[..n], b"WATCHDOG=1", "unexpected datagram");
            self.watchdog_pings += 1;
        }
    }

    /// Asserts that the next notifications (past `STATUS=` updates) are one reload:
    /// `RELOADING=1` with a monotonic timestamp in the same datagram, then `READY=1`.
    pub fn expect_reload(&mut self) {
        let reloading = self.expect("RELOADING=1");
        let usec = reloading
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .and_then(|v| v.parse::<u64>().ok());
        assert!(
            usec.is_some_and(|u| u > 0),
            "no MONOTONIC_USEC in {reloading:?}"
        );
        self.expect("READY=1");
    }
}
