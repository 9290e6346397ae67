//! The PROXY protocol (HAProxy's, v1 text and v2 binary): behind a load balancer every
//! connection comes from the balancer, and the header it sends first names the real client,
//! which admission (bans, the per-address cap), logs and `chatctl list` must use instead.
//!
//! Any listener with the option calls [`real_peer`] on each accepted stream before
//! [`crate::admission::Admission::admit`]; the keys are the same two in every section that has
//! a listener (`proxy-protocol`, `trusted-proxies`), read through [`Settings`], so parsing,
//! validation and refusals are one piece of code for all of them. A listener without the option
//! refuses a connection whose first bytes are a header ([`looks_like_header`]): otherwise a
//! misconfigured balancer's header would be taken as a name, and every user would share the
//! balancer's address.
//!
//! The header is read with exact-length reads (v2: 16 bytes, then the length they give) and, for
//! v1, peeks up to the newline, so not one byte of what follows (the client's first line, a TLS
//! ClientHello) is consumed. Bounds: v2 at most 16 + 65535 bytes, v1 at most 107, all within
//! `limits.name-timeout` of the accept. Parsing is the `ppp` crate's.

use std::net::{IpAddr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::bans;
pub use crate::proxy_keys::{ProxyNet, Settings};
use crate::shared::{LimitCounters, Shared};

/// The v2 header's fixed part: the 12-byte signature, version/command, family, length.
const V2_FIXED: usize = 16;
/// The v2 signature.
const V2_SIGNATURE: &[u8] = ppp::v2::PROTOCOL_PREFIX;
/// How a v1 header starts.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, CRLF included (the protocol's own limit).
const V1_MAX: usize = 107;

/// Why a connection on a PROXY protocol listener was not given a client address.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The peer is not in `trusted-proxies`.
    #[error("not a trusted proxy")]
    Untrusted,
    /// The first bytes are not a PROXY header.
    #[error("no PROXY protocol header")]
    Missing,
    /// It looked like a header but is not a valid one.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    /// A valid header without a usable client address (a Unix socket, UDP, no family).
    #[error("PROXY protocol header without a TCP client address ({0})")]
    Unsupported(&'static str),
    /// A v2 LOCAL command or a v1 `UNKNOWN`: the balancer's own health check.
    #[error("health check from the proxy (LOCAL)")]
    Local,
    /// The header did not arrive within `limits.name-timeout`.
    #[error("no complete PROXY protocol header in time (limits.name-timeout)")]
    Timeout,
    /// A header on a listener without `proxy-protocol`.
    #[error("PROXY protocol header sent, but this listener does not expect one")]
    Unexpected,
    /// The peer closed or the read failed before the header was complete.
    #[error("connection ended before the PROXY protocol header was complete: {0}")]
    Io(#[from] std::io::Error),
}

/// Whether `first`, the first bytes a connection sent, start a PROXY header (v1 or v2).
pub fn looks_like_header(first: &[u8]) -> bool {
    first.starts_with(V1_PREFIX) || first.starts_with(V2_SIGNATURE)
}

/// The real client behind a PROXY protocol listener: checks that `peer` is trusted, reads its
/// header by `deadline`, and returns the client's address. `None` means the connection must be
/// closed; the reason is already logged and counted (`limits.refused_proxy`), except for the
/// balancer's health checks (LOCAL), which are closed quietly.
pub async fn real_peer(
    stream: &mut TcpStream,
    peer: SocketAddr,
    settings: Settings<'_>,
    deadline: Instant,
    shared: &Shared,
) -> Option<SocketAddr> {
    let result = if settings.trusts(peer.ip()) {
        read_header(stream, deadline).await
    } else {
        Err(ProxyError::Untrusted)
    };
    match result {
        Ok(client) => {
            debug!(peer = %client, proxy = %peer, "PROXY protocol header read");
            Some(client)
        }
        Err(ProxyError::Local) => {
            debug!(proxy = %peer, "PROXY protocol health check (LOCAL), closing");
            None
        }
        Err(e) => {
            refused(shared, peer, settings.section, &e);
            None
        }
    }
}

/// Counts and logs a connection refused for its PROXY header (or lack of one).
pub fn refused(shared: &Shared, peer: SocketAddr, section: &str, e: &ProxyError) {
    LimitCounters::bump(&shared.limits.refused_proxy);
    match e {
        ProxyError::Untrusted => warn!(%peer,
            "refusing connection: not a trusted proxy ({section}.trusted-proxies, {section}.proxy-protocol)"),
        e => warn!(%peer, error = %e,
            "refusing connection: {e} ({section}.proxy-protocol)"),
    }
}

/// Reads one PROXY header (v1 or v2) from `stream` by `deadline`, consuming nothing after it,
/// and returns the client address it gives.
pub async fn read_header(
    stream: &mut TcpStream,
    deadline: Instant,
) -> Result<SocketAddr, ProxyError> {
    tokio::time::timeout_at(deadline, read_header_now(stream))
        .await
        .unwrap_or(Err(ProxyError::Timeout))
}

async fn read_header_now(stream: &mut TcpStream) -> Result<SocketAddr, ProxyError> {
    let mut buf = vec![0u8; V2_FIXED];
    let mut filled = 0;
    // The shortest header we serve is 16 bytes or more, except v1's 15-byte `PROXY UNKNOWN`,
    // so reading up to 16 never takes a byte of the client's; a v1 header that ends early
    // is finished by its newline.
    while filled < V2_FIXED {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        filled += n;
        let got = &buf[..filled];
        if !prefix_of(got, V1_PREFIX) && !prefix_of(got, V2_SIGNATURE) {
            return Err(ProxyError::Missing);
        }
        if got.starts_with(V1_PREFIX) && got.contains(&b'\n') {
            buf.truncate(filled);
            return v1_client(&buf);
        }
    }
    if buf.starts_with(V2_SIGNATURE) {
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        buf.resize(V2_FIXED + len, 0);
        stream.read_exact(&mut buf[V2_FIXED..]).await?;
        return v2_client(&buf);
    }
    // v1: peek for the newline and take exactly up to it.
    let mut peeked = [0u8; V1_MAX];
    loop {
        if buf.contains(&b'\n') {
            return v1_client(&buf);
        }
        let room = V1_MAX.saturating_sub(buf.len());
        if room == 0 {
            return Err(ProxyError::Malformed(format!(
                "v1 header longer than {V1_MAX} bytes"
            )));
        }
        let n = stream.peek(&mut peeked[..room]).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        let take = peeked[..n]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(n, |i| i + 1);
        let start = buf.len();
        buf.resize(start + take, 0);
        stream.read_exact(&mut buf[start..]).await?;
    }
}

/// Whether `got` and `sig` agree on their common length (`got` may be the start of `sig`).
fn prefix_of(got: &[u8], sig: &[u8]) -> bool {
    let n = got.len().min(sig.len());
    got[..n] == sig[..n]
}

fn v1_client(header: &[u8]) -> Result<SocketAddr, ProxyError> {
    use ppp::v1::Addresses;
    let parsed =
        ppp::v1::Header::try_from(header).map_err(|e| ProxyError::Malformed(e.to_string()))?;
    // ppp parses up to the first CR; anything between it and the newline is not a header.
    if parsed.header.len() != header.len() {
        return Err(ProxyError::Malformed(
            "v1 header does not end in CRLF".to_owned(),
        ));
    }
    match parsed.addresses {
        Addresses::Tcp4(a) => Ok(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Tcp6(a) => Ok(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unknown => Err(ProxyError::Local),
    }
}

fn v2_client(header: &[u8]) -> Result<SocketAddr, ProxyError> {
    use ppp::v2::{Addresses, Command, Protocol};
    let parsed =
        ppp::v2::Header::try_from(header).map_err(|e| ProxyError::Malformed(e.to_string()))?;
    if parsed.command == Command::Local {
        return Err(ProxyError::Local);
    }
    if parsed.protocol != Protocol::Stream {
        return Err(ProxyError::Unsupported("not a stream"));
    }
    match parsed.addresses {
        Addresses::IPv4(a) => Ok(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::IPv6(a) => {
            // A balancer listening dual-stack reports IPv4 clients as mapped IPv6; bans and caps
            // key them as IPv4, so the address is shown that way too.
            let ip = bans::canonical(IpAddr::V6(a.source_address));
            Ok(SocketAddr::new(ip, a.source_port))
        }
        Addresses::Unix(_) => Err(ProxyError::Unsupported("a Unix socket")),
        Addresses::Unspecified => Err(ProxyError::Unsupported("no address family")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_entries_parse_and_match() {
        let parse = |s: &str| ProxyNet::try_from(s.to_owned());
        let nets: Vec<ProxyNet> = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]
            .iter()
            .filter_map(|s| parse(s).ok())
            .collect();
        assert_eq!(nets.len(), 3);
        assert!(parse("10.1.2.3/8").is_err());
        assert!(parse("proxy.example").is_err());
        let s = Settings {
            section: "server",
            enabled: true,
            trusted: &nets,
        };
        assert!(s.trusts("10.9.8.7".parse().unwrap_or(IpAddr::from([0; 4]))));
        assert!(s.trusts("::ffff:192.0.2.7".parse().unwrap_or(IpAddr::from([0; 4]))));
        assert!(!s.trusts("192.0.2.8".parse().unwrap_or(IpAddr::from([0; 4]))));
        assert!(s.check().is_ok());
        let none = Settings { trusted: &[], ..s };
        assert!(none.check().is_err());
    }

    #[test]
    fn headers_give_the_client_address() {
        let v1 = b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 42069\r\n";
        assert_eq!(
            v1_client(v1).ok(),
            Some(SocketAddr::from(([203, 0, 113, 9], 40000)))
        );
        assert!(matches!(
            v1_client(b"PROXY UNKNOWN\r\n"),
            Err(ProxyError::Local)
        ));
        assert!(matches!(
            v1_client(b"PROXY TCP4 1.2.3 4.5.6.7 1 2\r\n"),
            Err(ProxyError::Malformed(_))
        ));
        let addrs: (SocketAddr, SocketAddr) = (
            SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 5], 5000)),
            SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 42069)),
        );
        let v2 = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            addrs,
        )
        .build()
        .unwrap_or_default();
        assert_eq!(v2_client(&v2).ok(), Some(addrs.0));
        let local = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .unwrap_or_default();
        assert!(matches!(v2_client(&local), Err(ProxyError::Local)));
        assert!(looks_like_header(v1) && looks_like_header(&v2));
        assert!(!looks_like_header(b"alice\n"));
    }
}
