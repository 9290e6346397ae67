//! The client side of WebSocket (RFC 6455) for `--websocket`: the opening handshake and the
//! framing, as pure functions over byte buffers so they run inside the generator's own mio loop
//! (plaintext or through rustls) with no extra copies, threads or per-message allocations.
//!
//! Hand-written rather than a crate because the loop already owns reading, writing and buffering
//! (one shared read buffer, edge-triggered readiness, TLS driven by hand): what is left is a
//! frame header codec and a header check, about as long as the glue any crate would need, and a
//! message is handed on as a slice of the read buffer unless it came in fragments.
//!
//! What it does, and deliberately does not:
//! - Handshake: `GET PATH HTTP/1.1` with `Upgrade: websocket`, a random `Sec-WebSocket-Key`,
//!   version 13, an `Origin`; the answer must be `101` with `Upgrade: websocket`,
//!   `Connection: upgrade` and the matching `Sec-WebSocket-Accept`, and no extension or
//!   subprotocol (none was offered). Anything else is an error quoting the status line and the
//!   start of the body (chatd says in the body why it refused).
//! - Client frames: single, final, masked frames (a fresh mask per frame from the caller).
//! - Server frames: must be unmasked and without RSV bits; text and binary messages may be
//!   fragmented (continuations reassembled, control frames allowed in between); control frames
//!   are final and at most 125 bytes; a close frame's code is read when present. Text is not
//!   checked for UTF-8: the generator counts protocol lines as bytes, as it does over TCP.

use std::fmt::Write as _;

/// The GUID RFC 6455 appends to the key before hashing it into `Sec-WebSocket-Accept`.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// A response head longer than this without its blank line is not a WebSocket server.
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Frame opcodes.
pub const OP_CONTINUATION: u8 = 0x0;
/// A text frame.
pub const OP_TEXT: u8 = 0x1;
/// A binary frame.
pub const OP_BINARY: u8 = 0x2;
/// A close frame.
pub const OP_CLOSE: u8 = 0x8;
/// A ping frame.
pub const OP_PING: u8 = 0x9;
/// A pong frame.
pub const OP_PONG: u8 = 0xA;

/// Standard base64 (with padding) of `bytes`.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * k) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The `Sec-WebSocket-Accept` a server must answer to `key`.
pub fn accept_for(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(ACCEPT_GUID.as_bytes());
    base64(ctx.finish().as_ref())
}

/// A `Sec-WebSocket-Key`: 16 bytes from `rng`, in base64.
pub fn new_key(rng: &mut Rng) -> String {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&rng.next().to_le_bytes());
    raw[8..].copy_from_slice(&rng.next().to_le_bytes());
    base64(&raw)
}

/// Appends the upgrade request for `path` on `host` (`host:port`) from `origin` to `out`.
pub fn write_request(out: &mut Vec<u8>, host: &str, path: &str, origin: &str, key: &str) {
    let mut s = String::with_capacity(256);
    // Writing to a String cannot fail.
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n\r\n"
    );
    out.extend_from_slice(s.as_bytes());
}

/// Checks the server's answer to the upgrade request sent with `key`, at the start of `buf`:
/// `Ok(None)` while its head is incomplete, `Ok(Some(n))` once it is a valid `101` whose head is
/// `n` bytes long (frames may follow at once), and an error saying what is wrong otherwise.
pub fn check_response(buf: &[u8], key: &str) -> Result<Option<usize>, String> {
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err("no end of the HTTP response head".to_owned());
        }
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let code = status.split(' ').nth(1).unwrap_or_default();
    if !status.starts_with("HTTP/1.1 ") || code != "101" {
        // The server says why in the body: quote its start (what has arrived of it).
        let body = String::from_utf8_lossy(&buf[end + 4..]);
        let body = body.trim();
        let body: String = body.chars().take(200).collect();
        return Err(if body.is_empty() {
            format!("upgrade refused: {status}")
        } else {
            format!("upgrade refused: {status}: {body}")
        });
    }
    let (mut upgrade, mut connection, mut accept) = (false, false, None);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("malformed header line {line:?}"));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "upgrade" => upgrade = value.eq_ignore_ascii_case("websocket"),
            "connection" => {
                connection = value
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
            }
            "sec-websocket-accept" => accept = Some(value.to_owned()),
            "sec-websocket-extensions" | "sec-websocket-protocol" => {
                return Err(format!("server chose {line:?}, which was not offered"));
            }
            _ => {}
        }
    }
    if !upgrade || !connection {
        return Err("101 without Upgrade: websocket and Connection: upgrade".to_owned());
    }
    let want = accept_for(key);
    match accept {
        Some(got) if got == want => Ok(Some(end + 4)),
        Some(got) => Err(format!("Sec-WebSocket-Accept {got:?}, expected {want:?}")),
        None => Err("101 without Sec-WebSocket-Accept".to_owned()),
    }
}

/// Turns the bytes `out[start..]` (a payload just written there) into one final, masked frame
/// of type `opcode`, in place: the header goes in front and the payload is masked with `mask`.
pub fn frame_in_place(out: &mut Vec<u8>, start: usize, opcode: u8, mask: [u8; 4]) {
    let len = out.len() - start;
    let mut header = [0u8; 14];
    header[0] = 0x80 | opcode;
    let n = if len < 126 {
        header[1] = 0x80 | len as u8;
        2
    } else if let Ok(len) = u16::try_from(len) {
        header[1] = 0x80 | 126;
        header[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        header[1] = 0x80 | 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    header[n..n + 4].copy_from_slice(&mask);
    for (k, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[k & 3];
    }
    out.splice(start..start, header[..n + 4].iter().copied());
}

/// Appends one final, masked frame of type `opcode` carrying `payload` to `out`.
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    let start = out.len();
    out.extend_from_slice(payload);
    frame_in_place(out, start, opcode, mask);
}

/// A whole message or control frame from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'a> {
    /// A text message (reassembled when it came in fragments).
    Text(&'a [u8]),
    /// A binary message, of this many bytes (chatd never sends one).
    Binary(usize),
    /// A ping with its payload, to be echoed in a pong.
    Ping(&'a [u8]),
    /// A pong (unsolicited; the generator sends no pings).
    Pong,
    /// A close frame: its code, if it carried one, and its reason.
    Close(Option<u16>, &'a [u8]),
}

/// Reassembles the server's frames into messages; one per connection. Bytes of a frame that has
/// not fully arrived stay with the caller (see [`Decoder::decode`]).
#[derive(Debug, Default)]
pub struct Decoder {
    /// The opcode of the fragmented message being reassembled, if any.
    fragment_of: Option<u8>,
    /// Its payload so far.
    fragments: Vec<u8>,
    /// Messages that came in more than one frame.
    pub fragmented: u64,
}

impl Decoder {
    /// Decodes the whole frames at the start of `buf`, calling `on` for every complete message
    /// and control frame, in order. Returns how many bytes were used: the rest is the start of a
    /// frame still arriving, to be passed again with what follows it. A protocol error (which
    /// ends the connection) is returned as a description; a message longer than `max_message`
    /// is one.
    pub fn decode(
        &mut self,
        buf: &[u8],
        max_message: usize,
        mut on: impl FnMut(Received<'_>),
    ) -> Result<usize, String> {
        let mut pos = 0;
        loop {
            let Some((header_len, payload_len, fin, opcode)) = parse_header(&buf[pos..])? else {
                return Ok(pos);
            };
            let Some(total) = header_len.checked_add(payload_len) else {
                return Err("frame length overflows".to_owned());
            };
            if payload_len > max_message {
                return Err(format!(
                    "frame of {payload_len} bytes (more than {max_message})"
                ));
            }
            if buf.len() - pos < total {
                return Ok(pos);
            }
            let payload = &buf[pos + header_len..pos + total];
            pos += total;
            match opcode {
                OP_TEXT | OP_BINARY if self.fragment_of.is_some() => {
                    return Err("new message inside a fragmented one".to_owned());
                }
                OP_TEXT | OP_BINARY if fin => on(whole(opcode, payload)),
                OP_TEXT | OP_BINARY => {
                    self.fragment_of = Some(opcode);
                    self.fragments.clear();
                    self.fragments.extend_from_slice(payload);
                }
                OP_CONTINUATION => {
                    let Some(of) = self.fragment_of else {
                        return Err("continuation frame outside a fragmented message".to_owned());
                    };
                    if self.fragments.len() + payload.len() > max_message {
                        return Err(format!(
                            "fragmented message longer than {max_message} bytes"
                        ));
                    }
                    self.fragments.extend_from_slice(payload);
                    if fin {
                        self.fragment_of = None;
                        self.fragmented += 1;
                        on(whole(of, &self.fragments));
                        self.fragments.clear();
                        if self.fragments.capacity() > 4096 {
                            self.fragments = Vec::new();
                        }
                    }
                }
                OP_PING => on(Received::Ping(payload)),
                OP_PONG => on(Received::Pong),
                OP_CLOSE => match payload {
                    [] => on(Received::Close(None, &[])),
                    [_] => return Err("close frame with a 1-byte payload".to_owned()),
                    [a, b, reason @ ..] => {
                        on(Received::Close(Some(u16::from_be_bytes([*a, *b])), reason));
                    }
                },
                other => return Err(format!("unknown opcode {other:#x}")),
            }
        }
    }
}

fn whole(opcode: u8, payload: &[u8]) -> Received<'_> {
    if opcode == OP_TEXT {
        Received::Text(payload)
    } else {
        Received::Binary(payload.len())
    }
}

/// The header of a server frame at the start of `b`: (header length, payload length, FIN,
/// opcode), or `None` while it is incomplete.
fn parse_header(b: &[u8]) -> Result<Option<(usize, usize, bool, u8)>, String> {
    let [b0, b1, rest @ ..] = b else {
        return Ok(None);
    };
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
    if b0 & 0x70 != 0 {
        return Err("frame with RSV bits set (no extension was agreed)".to_owned());
    }
    if b1 & 0x80 != 0 {
        return Err("masked frame from the server".to_owned());
    }
    let (header_len, len) = match b1 & 0x7F {
        126 => match rest {
            [x, y, ..] => (4, u64::from(u16::from_be_bytes([*x, *y]))),
            _ => return Ok(None),
        },
        127 => match rest.get(..8) {
            Some(x) => {
                let mut n = [0u8; 8];
                n.copy_from_slice(x);
                (10, u64::from_be_bytes(n))
            }
            None => return Ok(None),
        },
        n => (2, u64::from(n)),
    };
    if opcode & 0x8 != 0 && (!fin || len > 125) {
        return Err("control frame fragmented or longer than 125 bytes".to_owned());
    }
    let len = usize::try_from(len).map_err(|_| "frame too long".to_owned())?;
    Ok(Some((header_len, len, fin, opcode)))
}

/// A small, fast generator for masks and keys (xorshift64*). A load generator's masks need to
/// vary, not to be secret: they only keep a proxy from mistaking frames for other traffic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from the clock and the process id.
    pub fn seeded() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng((t ^ u64::from(std::process::id()) << 32) | 1)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A masking key.
    pub fn mask(&mut self) -> [u8; 4] {
        (self.next() as u32).to_le_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame (unmasked) with the given first byte and payload.
    fn server_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![b0];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n <= 0xFFFF => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// Decodes `chunks` as they would arrive in successive reads, keeping what is left over as
    /// the engine does; returns what was received, rendered as text.
    fn feed(chunks: &[&[u8]]) -> Result<Vec<String>, String> {
        let mut d = Decoder::default();
        let mut pending = Vec::new();
        let mut got = Vec::new();
        for chunk in chunks {
            pending.extend_from_slice(chunk);
            let used = d.decode(&pending, 1 << 20, |m| {
                got.push(match m {
                    Received::Text(t) => format!("text {}", String::from_utf8_lossy(t)),
                    Received::Binary(n) => format!("binary {n}"),
                    Received::Ping(p) => format!("ping {}", String::from_utf8_lossy(p)),
                    Received::Pong => "pong".to_owned(),
                    Received::Close(c, r) => format!("close {c:?} {}", String::from_utf8_lossy(r)),
                });
            })?;
            pending.drain(..used);
        }
        assert!(pending.is_empty(), "bytes left over: {pending:?}");
        Ok(got)
    }

    #[test]
    fn base64_and_accept_match_rfc_6455() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        // The example of RFC 6455 section 1.3.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let key = new_key(&mut Rng::seeded());
        assert_eq!(key.len(), 24);
    }

    #[test]
    fn request_carries_key_origin_and_version() {
        let mut out = Vec::new();
        write_request(
            &mut out,
            "127.0.0.1:8080",
            "/ws",
            "http://127.0.0.1:8080",
            "a2V5",
        );
        let text = String::from_utf8(out).expect("ascii");
        assert!(text.starts_with("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        for h in [
            "Upgrade: websocket\r\n",
            "Connection: Upgrade\r\n",
            "Sec-WebSocket-Key: a2V5\r\n",
            "Sec-WebSocket-Version: 13\r\n",
            "Origin: http://127.0.0.1:8080\r\n",
        ] {
            assert!(text.contains(h), "{h:?} missing from {text:?}");
        }
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn checks_the_upgrade_answer() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = "HTTP/1.1 101 Switching Protocols\r\nupgrade: WebSocket\r\n\
                  connection: keep-alive, Upgrade\r\n\
                  sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        let mut with_frame = ok.as_bytes().to_vec();
        with_frame.extend_from_slice(&server_frame(0x81, b"*** HELLO"));
        assert_eq!(check_response(&with_frame, key), Ok(Some(ok.len())));
        // Incomplete: wait for more.
        assert_eq!(check_response(&ok.as_bytes()[..40], key), Ok(None));
        let bad_accept = ok.replace("s3pPLMBiTxaQ9kYG", "AAAAAAAAAAAAAAAA");
        assert!(check_response(bad_accept.as_bytes(), key).is_err());
        let no_upgrade = ok.replace("upgrade: WebSocket\r\n", "");
        assert!(check_response(no_upgrade.as_bytes(), key).is_err());
        let ext = ok.replace(
            "\r\n\r\n",
            "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
        );
        assert!(check_response(ext.as_bytes(), key).is_err());
        // A refusal quotes the status and the server's reason.
        let refused = "HTTP/1.1 403 Forbidden\r\ncontent-length: 15\r\n\r\nbad Origin: x\r\n";
        let e = check_response(refused.as_bytes(), key).expect_err("refused");
        assert_eq!(e, "upgrade refused: HTTP/1.1 403 Forbidden: bad Origin: x");
        assert!(check_response(&[b'x'; MAX_RESPONSE_HEAD + 1], key).is_err());
    }

    #[test]
    fn client_frames_are_masked_with_the_right_length() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = Vec::new();
        write_frame(&mut out, OP_TEXT, b"Hello", mask);
        // RFC 6455 section 5.7: a masked "Hello".
        assert_eq!(
            out,
            [
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58
            ]
        );
        for len in [125usize, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|k| k as u8).collect();
            let mut out = vec![b'x'];
            write_frame(&mut out, OP_BINARY, &payload, mask);
            let header = match len {
                125 => 2,
                126 | 65535 => 4,
                _ => 10,
            };
            assert_eq!(out.len(), 1 + header + 4 + len);
            assert_eq!(out[1], 0x82);
            assert_eq!(out[2] & 0x80, 0x80, "mask bit");
            let unmasked: Vec<u8> = out[1 + header + 4..]
                .iter()
                .enumerate()
                .map(|(k, b)| b ^ mask[k & 3])
                .collect();
            assert_eq!(unmasked, payload);
        }
    }

    #[test]
    fn decodes_frames_split_over_reads() {
        let mut stream = server_frame(0x81, b"*** HELLO chatd");
        stream.extend(server_frame(0x81, &[b'a'; 300]));
        stream.extend(server_frame(0x81, b"b1: 0 123"));
        // Every split point, including inside the 16-bit length.
        for cut in 0..stream.len() {
            let got = feed(&[&stream[..cut], &stream[cut..]]).expect("valid");
            assert_eq!(got.len(), 3, "cut at {cut}");
            assert_eq!(got[0], "text *** HELLO chatd");
            assert_eq!(got[2], "text b1: 0 123");
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(feed(&bytes).expect("valid").len(), 3);
    }

    #[test]
    fn reassembles_fragments_with_a_ping_in_the_middle() {
        let mut stream = server_frame(0x01, b"b2: 7 ");
        stream.extend(server_frame(0x89, b"are you there"));
        stream.extend(server_frame(0x00, b"123"));
        stream.extend(server_frame(0x80, b"...."));
        stream.extend(server_frame(0x81, b"next"));
        stream.extend(server_frame(0x88, b"\x0f\xa0kicked: spam"));
        for cut in 0..stream.len() {
            let got = feed(&[&stream[..cut], &stream[cut..]]).expect("valid");
            assert_eq!(
                got,
                [
                    "ping are you there",
                    "text b2: 7 123....",
                    "text next",
                    "close Some(4000) kicked: spam",
                ],
                "cut at {cut}"
            );
        }
        let mut d = Decoder::default();
        d.decode(&stream, 1024, |_| {}).expect("valid");
        assert_eq!(d.fragmented, 1);
    }

    #[test]
    fn refuses_what_a_server_must_not_send() {
        let bad: [(&str, Vec<u8>); 8] = [
            ("masked", vec![0x81, 0x81, 1, 2, 3, 4, b'x']),
            ("rsv", server_frame(0xC1, b"x")),
            ("opcode", server_frame(0x83, b"x")),
            ("long ping", server_frame(0x89, &[0; 126])),
            ("fragmented ping", server_frame(0x09, b"x")),
            ("stray continuation", server_frame(0x80, b"x")),
            ("1-byte close", server_frame(0x88, b"x")),
            ("text inside fragments", {
                let mut s = server_frame(0x01, b"a");
                s.extend(server_frame(0x81, b"b"));
                s
            }),
        ];
        for (what, stream) in bad {
            assert!(feed(&[&stream]).is_err(), "{what} was accepted");
        }
        // Longer than the cap, whole or in fragments.
        let mut d = Decoder::default();
        assert!(
            d.decode(&server_frame(0x81, &[0; 100]), 99, |_| {})
                .is_err()
        );
        let mut s = server_frame(0x01, &[0; 60]);
        s.extend(server_frame(0x80, &[0; 60]));
        assert!(Decoder::default().decode(&s, 99, |_| {}).is_err());
        // An empty close is fine.
        assert_eq!(feed(&[&[0x88, 0]]).expect("valid"), ["close None "]);
    }
}
