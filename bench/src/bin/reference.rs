//! chat-reference: the least a server must do to carry chat-bench's load in chatd's protocol.
//! It is a **ceiling for measurement, never a product**: `bench/compare.sh` runs it and chatd
//! alternately under the same load generator and reports chatd's figures as ratios to it.
//!
//! What it does, and nothing more:
//!
//! - greets every connection with `*** HELLO chat-reference - welcome! Please send your name.`;
//! - takes the first non-empty line as the name (no validation, no uniqueness check), answers
//!   `*** WELCOME <name> you are chatting as <name>` and tells everyone else
//!   `*** JOIN <name> joined` (chatd's shapes; chat-bench counts those lines);
//! - relays every later non-empty line as `<name>: <text>` to everyone but its sender, all
//!   members receiving all lines in one global order (the fan-out runs under one room mutex);
//! - queues each member's output in a bounded byte queue (1 MiB, chatd's default
//!   `limits.max-queue-bytes`) and disconnects a member whose queue would overflow;
//! - writes each member's whole queue with one write call per wake-up.
//!
//! What it leaves out, on purpose, because chatd's protocol needs it but the load does not:
//! name rules, commands, `LEAVE` announcements, history, MOTD, flood limits, UTF-8 checks and
//! sanitising, keepalive, timeouts, logging, configuration, admin, signals, graceful shutdown.
//!
//! Its shape is chatd's, so the comparison isolates what chatd does per line and per wake-up:
//! the same tokio multi-thread runtime with two workers (this machine has two cores), one task
//! per connection, a room mutex held only for the pushes, a per-member queue with its own small
//! mutex and a `Notify` that wakes the writer when the queue stops being empty. Where a cheaper
//! choice exists it takes it: a member's queue is one contiguous byte buffer (a ~50-byte copy
//! per recipient instead of a reference-counted frame, and a plain write instead of a vector of
//! frames), double-buffered so a steady load allocates nothing, and reads go to one scratch
//! buffer per worker thread.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Bytes that may wait for one member: chatd's default `limits.max-queue-bytes`.
const QUEUE_LIMIT: usize = 1 << 20;
/// A partial line longer than this disconnects its sender, so reading stays bounded too.
const MAX_PARTIAL: usize = 64 * 1024;
/// Size of each worker thread's read buffer.
const SCRATCH: usize = 64 * 1024;
/// A drained output buffer up to this capacity is kept for the next wake-up; a bigger one (from
/// a burst) is given back, so idle connections hold no burst-sized buffers.
const KEEP_CAPACITY: usize = 4096;

const HELLO: &[u8] = b"*** HELLO chat-reference - welcome! Please send your name.\n";

thread_local! {
    /// One read buffer per worker thread: a connection only needs its own buffer for the tail
    /// of a partial line, which is rare.
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
}

/// Locks `m`, ignoring poisoning: every critical section here is a few appends and moves that
/// leave the data consistent even if a panic interrupted them.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A member's pending output and whether it was closed for overflowing.
#[derive(Default)]
struct Queue {
    buf: Vec<u8>,
    overflowed: bool,
}

/// One connection's bounded output queue, filled by whoever fans out and drained by its task.
#[derive(Default)]
struct Outbox {
    queue: Mutex<Queue>,
    notify: Notify,
}

impl Outbox {
    /// Appends `line`; on overflow the outbox is closed instead, and its task ends the session.
    fn push(&self, line: &[u8]) {
        let mut q = lock(&self.queue);
        if q.overflowed {
            return;
        }
        let was_empty = q.buf.is_empty();
        if q.buf.len() + line.len() > QUEUE_LIMIT {
            q.overflowed = true;
            q.buf = Vec::new();
            drop(q);
            self.notify.notify_one();
            return;
        }
        q.buf.extend_from_slice(line);
        drop(q);
        // The task drains the whole queue per wake-up: only the first push after a drain wakes it.
        if was_empty {
            self.notify.notify_one();
        }
    }

    /// Swaps the queued bytes into `out` (which is empty), leaving `out`'s old buffer as the
    /// queue's next one; `false` once the outbox overflowed.
    fn take(&self, out: &mut Vec<u8>) -> bool {
        let mut q = lock(&self.queue);
        if q.overflowed {
            return false;
        }
        std::mem::swap(&mut q.buf, out);
        true
    }
}

/// The joined members, in a vector for fast iteration, with an index for removal.
#[derive(Default)]
struct Members {
    list: Vec<(u64, Arc<Outbox>)>,
    index: HashMap<u64, usize>,
}

/// The one room. Every push happens under its mutex, which is what gives one global order.
#[derive(Default)]
struct Room {
    members: Mutex<Members>,
}

impl Room {
    /// Seats `id`: its welcome goes first to its own queue, its join to everyone else's.
    fn join(&self, id: u64, name: &[u8], outbox: &Arc<Outbox>) {
        let mut welcome = Vec::with_capacity(2 * name.len() + 40);
        welcome.extend_from_slice(b"*** WELCOME ");
        welcome.extend_from_slice(name);
        welcome.extend_from_slice(b" you are chatting as ");
        welcome.extend_from_slice(name);
        welcome.push(b'\n');
        let mut joined = Vec::with_capacity(name.len() + 20);
        joined.extend_from_slice(b"*** JOIN ");
        joined.extend_from_slice(name);
        joined.extend_from_slice(b" joined\n");
        let mut m = lock(&self.members);
        outbox.push(&welcome);
        for (_, other) in &m.list {
            other.push(&joined);
        }
        let at = m.list.len();
        m.list.push((id, outbox.clone()));
        m.index.insert(id, at);
    }

    /// Sends the encoded `line` to every member but `from`.
    fn say(&self, from: u64, line: &[u8]) {
        let m = lock(&self.members);
        for (id, other) in &m.list {
            if *id != from {
                other.push(line);
            }
        }
    }

    /// Removes `id` (silently: announcing leaves is not part of the measured load).
    fn leave(&self, id: u64) {
        let mut m = lock(&self.members);
        let Some(at) = m.index.remove(&id) else {
            return;
        };
        m.list.swap_remove(at);
        if let Some((moved, _)) = m.list.get(at) {
            let moved = *moved;
            m.index.insert(moved, at);
        }
    }
}

/// One connection's own state, touched only by its task.
struct Session {
    id: u64,
    room: Arc<Room>,
    outbox: Arc<Outbox>,
    stream: TcpStream,
    /// `<name>: ` once named; the start of every relayed line.
    prefix: Option<Vec<u8>>,
    /// Received bytes after the last newline.
    partial: Vec<u8>,
    /// Bytes taken from the queue and not yet written, from `written` on.
    out: Vec<u8>,
    written: usize,
    /// Where each relayed line is encoded once before it is pushed to everyone.
    frame: Vec<u8>,
}

impl Session {
    /// Serves the connection until it closes, fails or overflows.
    async fn run(&mut self) -> io::Result<()> {
        self.outbox.push(HELLO);
        loop {
            if self.written < self.out.len() {
                // The socket was full: finish this batch before taking more from the queue.
                tokio::select! {
                    r = self.stream.writable() => { r?; self.write()?; }
                    r = self.stream.readable() => { r?; if !self.read()? { return Ok(()); } }
                }
            } else {
                tokio::select! {
                    () = self.outbox.notify.notified() => {
                        if !self.outbox.take(&mut self.out) {
                            return Ok(());
                        }
                        self.write()?;
                    }
                    r = self.stream.readable() => { r?; if !self.read()? { return Ok(()); } }
                }
            }
        }
    }

    /// One write of what is pending; a drained buffer is kept for reuse unless a burst grew it.
    fn write(&mut self) -> io::Result<()> {
        if self.written < self.out.len() {
            match self.stream.try_write(&self.out[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        if self.written == self.out.len() {
            self.written = 0;
            if self.out.capacity() > KEEP_CAPACITY {
                self.out = Vec::new();
            } else {
                self.out.clear();
            }
        }
        Ok(())
    }

    /// One read, and every complete line in it handled; `false` at end of stream.
    fn read(&mut self) -> io::Result<bool> {
        SCRATCH_BUF.with_borrow_mut(|buf| {
            let keep = self.partial.len();
            buf[..keep].copy_from_slice(&self.partial);
            let n = match self.stream.try_read(&mut buf[keep..]) {
                Ok(0) => return Ok(false),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) => return Err(e),
            };
            let end = keep + n;
            let mut start = 0;
            while let Some(nl) = buf[start..end].iter().position(|&b| b == b'\n') {
                let line = &buf[start..start + nl];
                self.line(line.strip_suffix(b"\r").unwrap_or(line));
                start += nl + 1;
            }
            let rest = &buf[start..end];
            if rest.len() > MAX_PARTIAL {
                return Err(io::Error::other("line too long"));
            }
            self.partial.clear();
            self.partial.extend_from_slice(rest);
            Ok(true)
        })
    }

    /// The name line, or a message to relay.
    fn line(&mut self, line: &[u8]) {
        if line.is_empty() {
            return;
        }
        match &self.prefix {
            None => {
                self.room.join(self.id, line, &self.outbox);
                let mut prefix = line.to_vec();
                prefix.extend_from_slice(b": ");
                self.prefix = Some(prefix);
            }
            Some(prefix) => {
                self.frame.clear();
                self.frame.extend_from_slice(prefix);
                self.frame.extend_from_slice(line);
                self.frame.push(b'\n');
                self.room.say(self.id, &self.frame);
            }
        }
    }
}

/// Serves `stream` as member `id` until it ends, then takes it out of the room.
async fn serve(stream: TcpStream, id: u64, room: Arc<Room>) {
    // Latency is measured per message: no Nagle, as chatd.
    let _ = stream.set_nodelay(true);
    let mut session = Session {
        id,
        room,
        outbox: Arc::default(),
        stream,
        prefix: None,
        partial: Vec::new(),
        out: Vec::new(),
        written: 0,
        frame: Vec::new(),
    };
    // Any end (EOF, error, overflow) is just a disconnect: there is no one to report it to.
    let _ = session.run().await;
    if session.prefix.is_some() {
        session.room.leave(id);
    }
}

async fn accept_loop(listener: TcpListener) -> io::Result<()> {
    let room = Arc::new(Room::default());
    let mut next_id = 0u64;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                next_id += 1;
                tokio::spawn(serve(stream, next_id, room.clone()));
            }
            // Out of descriptors or an aborted handshake: that connection is lost, not the server.
            Err(e) if is_transient(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Accept errors that concern one connection (or a momentary shortage), not the listener.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || e.raw_os_error().is_some_and(|c| c == 24 || c == 23) // EMFILE, ENFILE
}

fn parse_args() -> Result<SocketAddr, String> {
    let mut addr = "127.0.0.1:42069".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => addr = args.next().ok_or("--listen needs an address")?,
            "-h" | "--help" => {
                println!(
                    "chat-reference [--listen ADDR]: the minimal fan-out server chatd is measured \
                     against (a ceiling, not a product); default 127.0.0.1:42069"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    addr.parse()
        .map_err(|e| format!("bad --listen {addr:?}: {e}"))
}

fn main() -> ExitCode {
    let addr = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chat-reference: {e}");
            return ExitCode::from(2);
        }
    };
    // 19,000 connections need the hard limit, as chatd raises it.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chat-reference: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        // tokio's bind listens with a backlog of 1024, as chatd does.
        let listener = TcpListener::bind(addr).await?;
        accept_loop(listener).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-reference: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}
