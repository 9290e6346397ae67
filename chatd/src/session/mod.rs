//! One client, from greeting to goodbye, split in two: the conversation (`core`: what the
//! client's lines mean, with no I/O) and a transport that moves its bytes (`tcp`: a TCP stream
//! through readiness and `try_*` calls; `stream`: any `AsyncRead + AsyncWrite`, which TLS uses
//! and a WebSocket could). A new transport is a new driver around the same [`Conversation`].

mod core;
mod stream;
mod tcp;

pub use self::core::Conversation;
pub use self::stream::StreamSession;
pub use self::tcp::Session;
