//! Taking a name back after a lost connection.
//!
//! The server frees a name only when it notices that its connection is dead, which after a
//! network failure can take minutes (until a write to the dead socket fails). A client that
//! reconnects meanwhile would find its own name "taken". So a named client may ask for a
//! **reclaim token** (`/token` → `*** TOKEN <token> ...`), a 128-bit random secret bound to its
//! connection. On a new connection it sends `/reclaim NAME TOKEN` as its name line; when NAME is
//! held by the connection the token was issued to, that connection is closed (it is told
//! `*** KICKED`, the room `*** LEAVE NAME left (reconnected)`) and the newcomer joins under NAME
//! in the same step, so nobody can take the name in between. A wrong token gets
//! `*** ERR reclaim-refused` and changes nothing; a free NAME is simply joined.
//!
//! Tokens live only in memory and die with their connection, so a restarted server knows none
//! (and holds no names either). They are compared in constant time and never logged.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;

use crate::engine::ClientId;
use chat_proto::protocol::{self, code, kind};

/// Random bytes per token.
const TOKEN_BYTES: usize = 16;

/// A reclaim token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Token([u8; TOKEN_BYTES]);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A secret: never in logs.
        f.write_str("Token(..)")
    }
}

impl Token {
    /// A fresh token from the kernel's random source.
    pub fn generate() -> std::io::Result<Token> {
        let mut bytes = [0u8; TOKEN_BYTES];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        Ok(Token(bytes))
    }

    /// Lower-case hex, as sent on the wire.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses the wire form; `None` unless it is exactly 32 hex digits.
    pub fn from_hex(s: &str) -> Option<Token> {
        if s.len() != TOKEN_BYTES * 2 || !s.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; TOKEN_BYTES];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Token(bytes))
    }

    /// A one-way digest of the token (SHA-256, hex), which a cluster stores beside the name so
    /// another node can check a reclaim without ever holding the secret itself.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        sha2::Sha256::digest(self.0)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Equality that takes the same time wherever the first difference is.
    fn ct_eq(&self, other: &Token) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// The tokens issued, by connection. Owned by the room (`Room::reclaims`) so that checking a
/// token and replacing the name's holder happen under one room lock.
#[derive(Debug, Default)]
pub struct Reclaims {
    by_client: Mutex<HashMap<ClientId, Token>>,
}

impl Reclaims {
    fn lock(&self) -> MutexGuard<'_, HashMap<ClientId, Token>> {
        // Inserts and removes leave the map valid at every point.
        self.by_client.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The token of connection `id`, made on first request.
    pub fn issue(&self, id: ClientId) -> std::io::Result<Token> {
        if let Some(t) = self.lock().get(&id) {
            return Ok(*t);
        }
        let token = Token::generate()?;
        Ok(*self.lock().entry(id).or_insert(token))
    }

    /// Whether `token` was issued to connection `id`.
    pub fn matches(&self, id: ClientId, token: &Token) -> bool {
        self.lock().get(&id).is_some_and(|t| t.ct_eq(token))
    }

    /// Forgets connection `id`'s token (its session ended).
    pub fn forget(&self, id: ClientId) {
        self.lock().remove(&id);
    }

    /// The reply to `/token` for connection `id`, and the token when one was issued.
    pub fn token_line(&self, id: ClientId) -> (Bytes, Option<Token>) {
        match self.issue(id) {
            Ok(t) => (
                protocol::server_line(
                    kind::TOKEN,
                    &format!(
                        "{} keep this secret; after a lost connection send \"/reclaim NAME {}\" as \
                     your name to take your name back",
                        t.to_hex(),
                        t.to_hex()
                    ),
                ),
                Some(t),
            ),
            Err(_) => (
                protocol::error_line(
                    code::RECLAIM_REFUSED,
                    "no reclaim token can be issued right now",
                ),
                None,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_compare() {
        let t = Token::generate().expect("urandom");
        let hex = t.to_hex();
        assert_eq!(hex.len(), 32);
        assert_eq!(Token::from_hex(&hex), Some(t));
        assert_eq!(Token::from_hex(&hex[1..]), None);
        assert_eq!(Token::from_hex(&"zz".repeat(16)), None);
        assert_eq!(Token::from_hex(&"é".repeat(16)), None);
        assert_ne!(Token::generate().expect("urandom"), t);
        assert_eq!(format!("{t:?}"), "Token(..)");
    }

    #[test]
    fn registry_issues_once_per_connection() {
        let r = Reclaims::default();
        let a = r.issue(1).expect("issue");
        assert_eq!(r.issue(1).expect("issue"), a);
        let b = r.issue(2).expect("issue");
        assert!(r.matches(1, &a) && !r.matches(1, &b) && !r.matches(3, &a));
        r.forget(1);
        assert!(!r.matches(1, &a));
        assert_eq!(r.lock().len(), 1);
    }
}
