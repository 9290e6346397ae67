//! What more than one chatd program needs, and nothing else: the chat line protocol (every line
//! shape, its encoder and parser), the line codec with its hard length cap, the name rules, the
//! flood limit's token bucket, and the admin protocol types `chatd` and `chatctl` exchange.
//!
//! Pure code over bytes and explicit instants: no runtime, no sockets, no terminal.

pub mod admin;
pub mod codec;
pub mod command;
pub mod flood;
pub mod names;
pub mod protocol;
