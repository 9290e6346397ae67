//! A listener's PROXY protocol keys as the config holds them (`proxy-protocol`,
//! `trusted-proxies`): parsing an entry, checking the keys together, asking who is trusted.
//! Kept apart from `proxy.rs` (which reads headers and counts refusals in the daemon's shared
//! state) so the config can name these types without depending on the running daemon.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::bans;

/// One entry of `trusted-proxies`: an address (`10.0.0.1`) or a block (`10.0.0.0/8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProxyNet(pub IpNet);

impl TryFrom<String> for ProxyNet {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let raw = s.trim();
        if let Ok(ip) = raw.parse::<IpAddr>() {
            return Ok(ProxyNet(IpNet::from(bans::canonical(ip))));
        }
        let net: IpNet = raw
            .parse()
            .map_err(|e| format!("{raw:?} is not an address or CIDR block: {e}"))?;
        // Host bits set ("10.1.2.3/8") usually mean a typo; trusting more than written is not
        // a guess to make silently.
        if net.trunc() != net {
            return Err(format!(
                "{raw:?} has host bits set; write the block as {}",
                net.trunc()
            ));
        }
        Ok(ProxyNet(net))
    }
}

impl From<ProxyNet> for String {
    fn from(n: ProxyNet) -> String {
        n.0.to_string()
    }
}

/// A listener's PROXY protocol keys, as any config section that has them presents them.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    /// The section the keys are in (`server`, `tls`), for messages.
    pub section: &'static str,
    /// `proxy-protocol`: every connection must start with a header.
    pub enabled: bool,
    /// `trusted-proxies`: who may send one.
    pub trusted: &'a [ProxyNet],
}

impl Settings<'_> {
    /// Checks the keys together: a listener that expects headers must trust someone.
    pub fn check(&self) -> Result<(), String> {
        if self.enabled && self.trusted.is_empty() {
            return Err(format!(
                "{0}.trusted-proxies: {0}.proxy-protocol = true needs the addresses of the \
                 proxies (CIDR blocks) that may send the header",
                self.section
            ));
        }
        Ok(())
    }

    /// Whether `ip` may send a header (IPv4-mapped IPv6 counts as the IPv4 address).
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = bans::canonical(ip);
        self.trusted.iter().any(|n| n.0.contains(&ip))
    }
}

impl fmt::Display for ProxyNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
