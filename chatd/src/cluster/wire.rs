//! Room events as they travel between the nodes of a cluster: one JSON object per event, and
//! one event or a batch of them (one per line) per stream message (docs/cluster.md has the
//! schema). What a node reads here is untrusted input like a
//! socket's: the size is capped before parsing, every field is bounded, names are validated
//! again by the reader's own name rules and texts are sanitised again before anyone sees them.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::is_cluster_token;

/// The wire format's version; a message of another version is skipped with a log line.
pub const VERSION: u8 = 1;

/// Largest stream message a node reads, in bytes.
pub const MAX_MESSAGE: usize = 256 * 1024;

/// Most events one stream message carries: a publishing node sends the events of one of its
/// members that queued up while that member's previous event was on its way as one message.
pub const MAX_BATCH: usize = 256;

/// The events of one stream message, in order: one JSON object per line. Bounded before
/// parsing: a message over [`MAX_MESSAGE`] yields one error and nothing else, and a message
/// of more than [`MAX_BATCH`] lines yields its first [`MAX_BATCH`] events and then one error.
pub fn decode_message(bytes: &[u8]) -> impl Iterator<Item = Result<Envelope, WireError>> + '_ {
    let too_large = bytes.len() > MAX_MESSAGE;
    let refused = too_large.then_some(Err(WireError::TooLarge(bytes.len())));
    let events = (!too_large)
        .then(|| bytes.split(|&b| b == b'\n'))
        .into_iter()
        .flatten()
        .take(MAX_BATCH + 1)
        .enumerate()
        .map(|(i, part)| {
            if i == MAX_BATCH {
                Err(WireError::Invalid("more events than a batch holds"))
            } else {
                Envelope::decode(part)
            }
        });
    refused.into_iter().chain(events)
}

/// Longest text (message, reason, notice) a node accepts from the bus, in bytes.
const MAX_TEXT: usize = 64 * 1024;

/// A member of the room, wherever it is connected: the node, the node's run (a restarted node
/// is a new run, so its old members can be told apart), and the connection on that node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemberRef {
    /// The node the member is connected to.
    pub node: String,
    /// That node's run.
    pub boot: u64,
    /// The connection on that node.
    pub id: u64,
}

/// One stream message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Always [`VERSION`].
    pub v: u8,
    /// The node that published it.
    pub from: String,
    /// The event.
    #[serde(flatten)]
    pub event: WireEvent,
}

/// A room event on the wire; see `room::Event` for what each does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum WireEvent {
    /// A member joined.
    Join {
        /// Who.
        who: MemberRef,
        /// The name it took (display form).
        name: String,
        /// Its peer address.
        addr: SocketAddr,
        /// When, in milliseconds since the Unix epoch.
        at: u64,
    },
    /// A member lost its name to a reconnecting client.
    Replaced {
        /// Who.
        who: MemberRef,
        /// Its last line's text.
        why: String,
    },
    /// A message to the room.
    Say {
        /// The sender.
        who: MemberRef,
        /// The sender's name when it was sent (for history).
        name: String,
        /// The text.
        text: String,
        /// When, in milliseconds since the Unix epoch.
        at: u64,
    },
    /// An action (`/me`).
    Act {
        /// The sender.
        who: MemberRef,
        /// The sender's name when it was sent (for history).
        name: String,
        /// The text.
        text: String,
        /// When, in milliseconds since the Unix epoch.
        at: u64,
    },
    /// A private message to the member named `to`.
    Private {
        /// The sender.
        who: MemberRef,
        /// The recipient's name.
        to: String,
        /// The text.
        text: String,
    },
    /// A member took a new name.
    Rename {
        /// Who.
        who: MemberRef,
        /// The new name.
        name: String,
    },
    /// A member left.
    Leave {
        /// Who.
        who: MemberRef,
        /// Why.
        reason: String,
    },
    /// A member was kicked by an administrator (of any node).
    Kick {
        /// Who.
        who: MemberRef,
        /// Why.
        reason: String,
        /// Sent away by a ban (written only when true; absent in events of older nodes).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        ban: bool,
    },
    /// A notice from the operators.
    Announce {
        /// The text.
        text: String,
    },
}

/// Why a stream message was not used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Larger than [`MAX_MESSAGE`].
    #[error("message of {0} bytes is over the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
    /// Not JSON of the expected shape.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A version this node does not speak.
    #[error("unsupported wire version {0}")]
    Version(u8),
    /// A field out of bounds.
    #[error("invalid field {0}")]
    Invalid(&'static str),
}

impl Envelope {
    /// Encodes for publishing.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain structs of strings and numbers cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes and bounds-checks a stream message.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, WireError> {
        if bytes.len() > MAX_MESSAGE {
            return Err(WireError::TooLarge(bytes.len()));
        }
        let env: Envelope =
            serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
        if env.v != VERSION {
            return Err(WireError::Version(env.v));
        }
        if !is_cluster_token(&env.from) {
            return Err(WireError::Invalid("from"));
        }
        env.event.check()?;
        Ok(env)
    }
}

impl WireEvent {
    /// The member the event is about, if any.
    pub fn who(&self) -> Option<&MemberRef> {
        match self {
            WireEvent::Join { who, .. }
            | WireEvent::Replaced { who, .. }
            | WireEvent::Say { who, .. }
            | WireEvent::Act { who, .. }
            | WireEvent::Private { who, .. }
            | WireEvent::Rename { who, .. }
            | WireEvent::Leave { who, .. }
            | WireEvent::Kick { who, .. } => Some(who),
            WireEvent::Announce { .. } => None,
        }
    }

    fn check(&self) -> Result<(), WireError> {
        if let Some(who) = self.who()
            && !is_cluster_token(&who.node)
        {
            return Err(WireError::Invalid("who.node"));
        }
        let texts: &[&str] = match self {
            WireEvent::Join { name, .. } | WireEvent::Rename { name, .. } => &[name],
            WireEvent::Replaced { why, .. } => &[why],
            WireEvent::Say { name, text, .. } | WireEvent::Act { name, text, .. } => &[name, text],
            WireEvent::Private { to, text, .. } => &[to, text],
            WireEvent::Leave { reason, .. } | WireEvent::Kick { reason, .. } => &[reason],
            WireEvent::Announce { text } => &[text],
        };
        if texts.iter().any(|t| t.len() > MAX_TEXT) {
            return Err(WireError::Invalid("text"));
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch, for `at` fields.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The time an `at` field names.
pub fn time_of(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A name key as a NATS KV key: `x` and the lower-case hex of its UTF-8 bytes (KV keys allow
/// only `A-Z a-z 0-9 - _ = . /`, names are any script).
pub fn kv_key(name_key: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(1 + name_key.len() * 2);
    out.push('x');
    for b in name_key.as_bytes() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The text a [`kv_key`] was made from, if it was made by it.
pub fn from_kv_key(key: &str) -> Option<String> {
    let hex = key.strip_prefix('x')?;
    if hex.len() % 2 != 0 || !hex.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Decodes a ban read from the cluster's ban list (untrusted, like the stream).
pub fn decode_ban(bytes: &[u8]) -> Result<crate::bans::Ban, WireError> {
    if bytes.len() > MAX_TEXT {
        return Err(WireError::TooLarge(bytes.len()));
    }
    serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))
}

/// A name's entry in the names bucket: who holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NameHolder {
    /// The holder.
    pub who: MemberRef,
    /// Its display name.
    pub name: String,
    /// Its peer address.
    pub addr: SocketAddr,
    /// When it took the name, in milliseconds since the Unix epoch.
    pub at: u64,
    /// The digest of the reclaim token its connection was issued, if any (reclaim.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl NameHolder {
    /// Encodes for the names bucket.
    pub fn encode(&self) -> bytes::Bytes {
        bytes::Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Decodes an entry read from the bucket (untrusted, like the stream).
    pub fn decode(bytes: &[u8]) -> Result<NameHolder, WireError> {
        if bytes.len() > 4096 {
            return Err(WireError::TooLarge(bytes.len()));
        }
        let h: NameHolder =
            serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
        if !is_cluster_token(&h.who.node) {
            return Err(WireError::Invalid("who.node"));
        }
        Ok(h)
    }
}

/// A node's lease in the nodes bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    /// The node's run.
    pub boot: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> MemberRef {
        MemberRef {
            node: "a".into(),
            boot: 7,
            id: 3,
        }
    }

    #[test]
    fn every_event_round_trips() {
        let events = vec![
            WireEvent::Join {
                who: who(),
                name: "Ålice".into(),
                addr: SocketAddr::from(([10, 0, 0, 1], 5000)),
                at: 1,
            },
            WireEvent::Say {
                who: who(),
                name: "a".into(),
                text: "hi: there".into(),
                at: 2,
            },
            WireEvent::Leave {
                who: who(),
                reason: "quit".into(),
            },
            WireEvent::Announce {
                text: "maintenance".into(),
            },
            WireEvent::Kick {
                who: who(),
                reason: "spam".into(),
                ban: false,
            },
            WireEvent::Kick {
                who: who(),
                reason: "banned permanently: spam".into(),
                ban: true,
            },
        ];
        for event in events {
            let env = Envelope {
                v: VERSION,
                from: "a".into(),
                event,
            };
            assert_eq!(Envelope::decode(&env.encode()), Ok(env));
        }
    }

    #[test]
    fn a_kick_says_ban_only_when_it_is_one() {
        let kick = |ban| Envelope {
            v: VERSION,
            from: "a".into(),
            event: WireEvent::Kick {
                who: who(),
                reason: "r".into(),
                ban,
            },
        };
        let plain = String::from_utf8(kick(false).encode()).unwrap_or_default();
        assert!(!plain.contains("\"ban\""), "{plain}");
        let banned = String::from_utf8(kick(true).encode()).unwrap_or_default();
        assert!(banned.contains("\"ban\":true"), "{banned}");
        // A kick written without the field (by a node before it) is a plain kick.
        let old = plain.replace(",\"ban\":false", "");
        assert_eq!(Envelope::decode(old.as_bytes()), Ok(kick(false)));
    }

    #[test]
    fn hostile_messages_are_refused_not_panicked_on() {
        assert!(matches!(
            Envelope::decode(b"not json"),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            Envelope::decode(&vec![b' '; MAX_MESSAGE + 1]),
            Err(WireError::TooLarge(_))
        ));
        let wrong_version = br#"{"v":9,"from":"a","event":"announce","text":"x"}"#;
        assert_eq!(Envelope::decode(wrong_version), Err(WireError::Version(9)));
        let bad_node =
            br#"{"v":1,"from":"a","event":"leave","who":{"node":"a.b","boot":1,"id":1},"reason":"x"}"#;
        assert_eq!(
            Envelope::decode(bad_node),
            Err(WireError::Invalid("who.node"))
        );
        let long = format!(
            r#"{{"v":1,"from":"a","event":"announce","text":"{}"}}"#,
            "x".repeat(MAX_TEXT + 1)
        );
        assert_eq!(
            Envelope::decode(long.as_bytes()),
            Err(WireError::Invalid("text"))
        );
    }

    #[test]
    fn batches_decode_in_order_and_are_bounded() {
        let envs: Vec<Envelope> = (0..3)
            .map(|i| Envelope {
                v: VERSION,
                from: "a".into(),
                event: WireEvent::Say {
                    who: who(),
                    name: "alice".into(),
                    text: format!("line {i}"),
                    at: 1,
                },
            })
            .collect();
        // One event: exactly what a single-event message always was.
        let one = envs[0].encode();
        let got: Vec<_> = decode_message(&one).collect();
        assert_eq!(got, vec![Ok(envs[0].clone())]);
        // Several, one per line, in order; a bad line is an error in its place, not the end.
        let mut batch = Vec::new();
        for (i, env) in envs.iter().enumerate() {
            if i > 0 {
                batch.push(b'\n');
            }
            batch.extend_from_slice(&env.encode());
            if i == 0 {
                batch.extend_from_slice(b"\nnot json");
            }
        }
        let got: Vec<_> = decode_message(&batch).collect();
        assert_eq!(got.len(), 4);
        assert_eq!(got[0], Ok(envs[0].clone()));
        assert!(matches!(got[1], Err(WireError::Malformed(_))));
        assert_eq!(got[2..], [Ok(envs[1].clone()), Ok(envs[2].clone())]);
        // Too large: one error, nothing parsed.
        let huge = vec![b'\n'; MAX_MESSAGE + 1];
        let got: Vec<_> = decode_message(&huge).collect();
        assert_eq!(got, vec![Err(WireError::TooLarge(MAX_MESSAGE + 1))]);
        // Too many lines: the first MAX_BATCH, then one error.
        let many = vec![b'\n'; 10 * MAX_BATCH];
        let got: Vec<_> = decode_message(&many).collect();
        assert_eq!(got.len(), MAX_BATCH + 1);
        assert!(matches!(got[MAX_BATCH], Err(WireError::Invalid(_))));
    }

    #[test]
    fn kv_keys_use_only_allowed_characters() {
        let k = kv_key("ålice bob");
        assert!(k.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(kv_key("ab"), "x6162");
        assert_eq!(from_kv_key(&k).as_deref(), Some("ålice bob"));
        assert_eq!(from_kv_key("x6"), None);
        assert_eq!(from_kv_key("nothex"), None);
    }
}
