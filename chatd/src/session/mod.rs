//! One client, from greeting to goodbye, split in two: the conversation (`core`: what the
//! client's lines mean, with no I/O) and a transport that moves its bytes (`tcp`: a TCP stream).
//! A new transport (TLS, WebSocket) is a new driver around the same [`Conversation`].

mod core;
mod tcp;

pub use self::core::Conversation;
pub use self::tcp::Session;
