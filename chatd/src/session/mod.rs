//! One client, from greeting to goodbye, split in two: the conversation (`core`: what the
//! client's lines mean, with no I/O) and a transport that moves its bytes (`tcp`: a TCP stream
//! through readiness and `try_*` calls; `stream`: any `AsyncRead + AsyncWrite`, which TLS uses;
//! `ws`: a WebSocket, one text message per line, for the browser client). A new transport is a
//! new driver around the same [`Conversation`].

mod core;
mod stream;
mod tcp;
mod ws;

use std::time::Duration;

use tokio::time::{Instant, sleep_until};

use chat_proto::codec::LineDecoder;

use crate::outbox::Close;

pub use self::core::Conversation;
pub use self::stream::StreamSession;
pub use self::tcp::Session;
pub use self::ws::{CLOSE_CODES as WS_CLOSE_CODES, WsSession};

// What every driver shares: how long a closing session may take, and how writes are batched.

/// Longest a closing session waits for its peer to read what is queued (quit, kick).
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// After the farewell line and the stream's own close (FIN; for TLS close_notify first), how
/// long a session waits for the peer to close its side.
const LINGER: Duration = Duration::from_millis(500);
/// Frames offered per vectored write.
const MAX_IOVECS: usize = 64;
/// The largest emptied write queue a session keeps (in frames, 32 bytes each): enough for the
/// usual few frames between writes, small next to a connection's ~4 KB.
const KEEP_QUEUE: usize = 8;
/// The largest emptied byte buffer a TCP session keeps for the next drain (see
/// `outbox::ByteQueue::trim`): what queues up for a member of a busy room between two of its
/// wake-ups, so that the two buffers swapped between the outbox and the writer are not
/// allocated again on every burst (the reference server keeps 4 KiB too). A member whose
/// wake-ups bring more keeps up to twice its last drain (`outbox::KEEP_MAX` at most).
const KEEP_BYTES: usize = 4096;
/// Bytes read per wake-up.
const READ_CHUNK: usize = 4096;

/// What a driver does with its outbox's close, at the top of every turn: an overflow ends the
/// session at once (`true`; the conversation counts and logs it), any other close starts the
/// flush deadline ([`CLOSE_FLUSH_TIMEOUT`]) the first time it is seen.
fn on_close(
    closed: Option<&Close>,
    talk: &mut Conversation,
    deadline: &mut Option<Instant>,
) -> bool {
    match closed {
        Some(Close::Overflow) => {
            talk.overflowed();
            true
        }
        Some(_) => {
            deadline.get_or_insert_with(|| Instant::now() + CLOSE_FLUSH_TIMEOUT);
            false
        }
        None => false,
    }
}

/// Which deadline a session's one timer is set for.
#[derive(Debug, Clone, Copy)]
enum Timer {
    /// A message client's partial line went quiet (`server.partial-line-flush`).
    PartialLine,
    /// No name in time (`limits.name-timeout`).
    Naming,
    /// A closing session's flush took too long ([`CLOSE_FLUSH_TIMEOUT`]).
    Close,
}

impl Timer {
    /// The nearest deadline that applies: the close's while closing, else a quiet partial
    /// line's (unless a step waits) or the naming deadline's, whichever comes first.
    fn next(
        close: Option<Instant>,
        partial: Option<Instant>,
        naming: Option<Instant>,
    ) -> Option<(Instant, Timer)> {
        if let Some(at) = close {
            return Some((at, Timer::Close));
        }
        let partial = partial.map(|at| (at, Timer::PartialLine));
        let naming = naming.map(|at| (at, Timer::Naming));
        partial.into_iter().chain(naming).min_by_key(|&(at, _)| at)
    }

    /// Does what this deadline's passing means for a session reading through `decoder`;
    /// `true` when the session ends (its close took too long).
    fn fire(self, decoder: &mut LineDecoder, talk: &mut Conversation) -> bool {
        match self {
            Timer::Close => return true,
            Timer::PartialLine => {
                if let Some(frame) = decoder.take_partial() {
                    talk.handle_frame(frame);
                }
            }
            Timer::Naming => talk.name_timed_out(),
        }
        false
    }
}

/// Sleeps until `at`, or forever without a deadline. `select!` builds the future of every
/// branch on each turn, disabled ones included, and a `Sleep` built there costs a clock read
/// and a clone of the runtime handle even when it is never polled; this costs nothing until
/// polled.
async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A TCP connection accepted on an ephemeral loopback port: (the accepted side, its peer
/// address, the client side to keep open), for tests that build a session over it.
#[cfg(test)]
pub(crate) async fn accepted_tcp() -> (
    tokio::net::TcpStream,
    std::net::SocketAddr,
    tokio::net::TcpStream,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("address: {e}"));
    let client = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let (stream, peer) = listener
        .accept()
        .await
        .unwrap_or_else(|e| panic!("accept: {e}"));
    (stream, peer, client)
}
