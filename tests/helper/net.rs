//! Line-oriented chat clients with bounded reads, over any byte stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::WAIT;

/// A stream whose reads can be bounded in time: every read a [`Client`] makes is. A TLS or
/// WebSocket stream implements it by setting the timeout on the socket under it.
pub trait ReadTimeout {
    /// Sets (or with `None` lifts) the read timeout.
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
}

impl ReadTimeout for TcpStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, d)
    }
}

impl ReadTimeout for UnixStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, d)
    }
}

/// A line-oriented chat client with bounded reads. `S` is the byte stream under it: plain TCP
/// by default; a TLS or WebSocket stream for clients of those transports.
pub struct Client<S: Read + Write = TcpStream> {
    pub reader: BufReader<S>,
}

impl Client<TcpStream> {
    /// Connects to `addr`.
    pub fn connect(addr: SocketAddr) -> Client {
        Client::from_stream(TcpStream::connect_timeout(&addr, WAIT).expect("connect"))
    }

    /// Connects to `addr` and takes `name`; returns right after the welcome.
    pub fn connect_as(addr: SocketAddr, name: &str) -> Client {
        let mut c = Client::connect(addr);
        c.join_as(name);
        c
    }

    /// Wraps a connected TCP stream (one made with special socket options, say); turns
    /// Nagle's algorithm off so each line goes out at once.
    pub fn from_stream(stream: TcpStream) -> Client {
        stream.set_nodelay(true).expect("nodelay");
        Client::new(stream)
    }
}

impl<S: Read + Write + ReadTimeout> Client<S> {
    /// Wraps a connected stream; every read from it is bounded by [`WAIT`].
    pub fn new(stream: S) -> Client<S> {
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        Client {
            reader: BufReader::new(stream),
        }
    }

    /// Asserts that no line arrives within `d`.
    pub fn assert_silent(&mut self, d: Duration) {
        self.stream().set_read_timeout(Some(d)).expect("timeout");
        let mut buf = [0u8; 1];
        let got = if self.reader.buffer().is_empty() {
            self.reader.get_mut().read(&mut buf)
        } else {
            Ok(1)
        };
        self.stream().set_read_timeout(Some(WAIT)).expect("timeout");
        match got {
            Ok(0) => panic!("connection closed"),
            Ok(_) => panic!("unexpected data: {:?}", self.reader.buffer()),
            Err(_) => {}
        }
    }
}

impl<S: Read + Write> Client<S> {
    /// The stream under the client (for its addresses or socket options).
    pub fn stream(&self) -> &S {
        self.reader.get_ref()
    }

    /// Takes `name` on a connection that has just been greeted; returns once it is accepted.
    pub fn join_as(&mut self, name: &str) {
        self.expect_prefix("*** HELLO ");
        self.send(name);
        self.expect_prefix(&format!("*** WELCOME {name}"));
    }

    /// Sends `line` followed by `\n`.
    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\n").as_bytes());
    }

    /// Sends bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        let s = self.reader.get_mut();
        s.write_all(bytes).expect("send");
        s.flush().expect("flush");
    }

    /// Next line without its terminator; panics on timeout or EOF.
    pub fn line(&mut self) -> String {
        self.try_line()
            .unwrap_or_else(|| panic!("connection closed while waiting for a line"))
    }

    /// Next line, or `None` at EOF; panics on timeout.
    pub fn try_line(&mut self) -> Option<String> {
        let mut buf = Vec::new();
        match self.reader.read_until(b'\n', &mut buf) {
            Ok(0) => None,
            Ok(_) => {
                assert!(buf.ends_with(b"\n"), "partial line at EOF: {buf:?}");
                buf.pop();
                Some(String::from_utf8(buf).expect("server sent invalid UTF-8"))
            }
            Err(e) => panic!("reading a line failed (timeout {WAIT:?}?): {e}"),
        }
    }

    /// Reads lines until one starts with `prefix`, returning it; earlier lines are skipped.
    pub fn expect_prefix(&mut self, prefix: &str) -> String {
        let mut seen = Vec::new();
        loop {
            match self.try_line() {
                Some(l) if l.starts_with(prefix) => return l,
                Some(l) => seen.push(l),
                None => panic!("EOF before a line starting {prefix:?}; saw {seen:?}"),
            }
        }
    }

    /// Reads the next `n` chat lines (everything but server lines), in order; panics if
    /// anyone leaves meanwhile, since the tests using it promise nobody is dropped.
    pub fn chat_lines(&mut self, n: usize) -> Vec<String> {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let l = self.line();
            assert!(!l.starts_with("*** LEAVE"), "someone was dropped: {l}");
            if !l.starts_with("*** ") {
                got.push(l);
            }
        }
        got
    }

    /// Reads lines until one satisfies `done`; returns every line read, that one last. Panics
    /// on timeout or if the server closes first.
    pub fn lines_until(&mut self, done: impl Fn(&str) -> bool) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match self.try_line() {
                Some(l) => {
                    let last = done(&l);
                    seen.push(l);
                    if last {
                        return seen;
                    }
                }
                None => panic!("connection closed; saw {seen:?}"),
            }
        }
    }

    /// Reads until EOF and returns the remaining lines; panics on timeout.
    pub fn until_eof(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(l) = self.try_line() {
            out.push(l);
        }
        out
    }
}

/// Reads `n` chat lines from every receiver, asserts that they all saw the same lines in the
/// same order, and returns that order.
pub fn agreed_order<S: Read + Write>(receivers: &mut [Client<S>], n: usize) -> Vec<String> {
    let orders: Vec<_> = receivers.iter_mut().map(|r| r.chat_lines(n)).collect();
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "receivers disagree on order"
    );
    orders.into_iter().next().unwrap_or_default()
}

/// A loopback port nothing listens on (bound, noted, closed), for a server a test starts
/// later. It is picked below the kernel's ephemeral range: a port from that range (what
/// binding port 0 gives) can be handed to another test's listener or outgoing connection
/// between the pick and its use, and now and then was (a NATS route that could not bind).
/// Below the range only another pick could take it, and the picks of one run never repeat.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static PICKED: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let span = low.saturating_sub(1024).min(12_000);
    // Runs side by side (two checkouts, a bench) start at different places.
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..span {
        let n = PICKED.fetch_add(1, Ordering::Relaxed);
        let Ok(port) = u16::try_from(low - span + start.wrapping_add(n) % span.max(1)) else {
            break;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}
