//! TLS for the chat protocol (`[tls]`): the certificate in force, its loading and rotation
//! (here, with nothing of the daemon's state, which holds a [`Tls`]), and
//! the TLS listener's accept loop ([`listener`]).
//!
//! Rotation: every handshake asks [`CertStore`] for the certificate, which reads an `ArcSwap`,
//! so a reload that installs a new one affects new handshakes only; established sessions keep
//! their keys. A certificate that cannot be used (missing, unreadable, key not matching,
//! expired or not yet valid) is refused at load with the file and the reason, and the old one
//! stays.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

pub mod listener;

/// Longest a TLS handshake may take (shorter when `limits.name-timeout` is): a peer that opens
/// a connection and never finishes the handshake (a plaintext client waiting for our greeting,
/// a stalled scanner) is closed and counted after this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most TLS bytes rustls buffers for one connection on the way out. The outbox bounds what
/// waits for a client; this bounds what sits encrypted between the outbox and the socket.
pub(crate) const TLS_BUFFER_LIMIT: usize = 16 * 1024;

/// The crypto provider every TLS user in chatd uses: ring, which async-nats brings in too (two
/// providers in one process make rustls refuse to pick one). rustls 0.23.48 deprecates ring's
/// provider because it lacks post-quantum key exchange; the alternative, aws-lc-rs, needs a C
/// toolchain and cmake at build time and would sit beside ring, so chatd stays on ring
/// (X25519 and the NIST curves) until the workspace moves as a whole.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's default rustls provider. Call once at start, before any TLS (the
/// NATS client builds its own configs from the process default).
pub fn install_provider() {
    // Err means a provider is installed already: it is this one, installed earlier.
    let _ = CryptoProvider::clone(&provider()).install_default();
}

/// Why a certificate or key could not be used; names the config key and the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {file}: {why}")]
pub struct CertError {
    /// `tls.certificate` or `tls.private-key`.
    pub key: &'static str,
    /// The file as configured.
    pub file: String,
    /// What is wrong with it.
    pub why: String,
}

impl CertError {
    fn certificate(file: &Path, why: impl Into<String>) -> CertError {
        CertError {
            key: "tls.certificate",
            file: file.display().to_string(),
            why: why.into(),
        }
    }

    fn private_key(file: &Path, why: impl Into<String>) -> CertError {
        CertError {
            key: "tls.private-key",
            file: file.display().to_string(),
            why: why.into(),
        }
    }
}

/// What a PEM read error means to an operator.
fn pem_problem(e: rustls::pki_types::pem::Error, what: &str) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(e) => format!("cannot read: {e}"),
        Error::NoItemsFound => format!("no {what} in PEM form in this file"),
        other => format!("not a valid PEM file: {other:?}"),
    }
}

/// Loads a certificate chain (leaf first, as certbot's `fullchain.pem`) and its private key,
/// and checks that they belong together and that the leaf is valid now. Symlinks are followed
/// (certbot's `live/` directory is made of them), so a renewal is picked up at the next load.
pub fn load_certified_key(
    certificate: &Path,
    private_key: &Path,
    now: SystemTime,
) -> Result<CertifiedKey, CertError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certificate)
        .map_err(|e| CertError::certificate(certificate, pem_problem(e, "certificate")))?
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::certificate(certificate, pem_problem(e, "certificate")))?;
    let Some(leaf) = chain.first() else {
        return Err(CertError::certificate(
            certificate,
            "no certificate in PEM form in this file",
        ));
    };
    let (not_before, not_after) = validity(leaf).ok_or_else(|| {
        CertError::certificate(certificate, "the first certificate is not valid X.509")
    })?;
    if now > not_after {
        return Err(CertError::certificate(
            certificate,
            format!("the certificate expired on {}", date(not_after)),
        ));
    }
    if now < not_before {
        return Err(CertError::certificate(
            certificate,
            format!("the certificate is not valid before {}", date(not_before)),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(private_key)
        .map_err(|e| CertError::private_key(private_key, pem_problem(e, "private key")))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => CertError::private_key(
            private_key,
            format!(
                "this key does not match the certificate in {}",
                certificate.display()
            ),
        ),
        rustls::Error::General(why) => CertError::private_key(private_key, why),
        other => CertError::private_key(private_key, other.to_string()),
    })
}

/// A certificate date for a message (humantime cannot show dates before 1970, and panics on them).
fn date(t: SystemTime) -> String {
    if t < UNIX_EPOCH {
        "a date before 1970".to_owned()
    } else {
        humantime::format_rfc3339_seconds(t).to_string()
    }
}

/// The certificate handshakes use now; swapped whole at reload.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The TLS side of a daemon with a `[tls]` table: the certificate in force and the server
/// configuration every handshake uses.
pub struct Tls {
    store: Arc<CertStore>,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// TLS serving the certificate and key `config` names; an error names the file and why.
    pub fn new(config: &TlsConfig) -> Result<Tls, CertError> {
        let key = load_certified_key(&config.certificate, &config.private_key, SystemTime::now())?;
        let store = Arc::new(CertStore {
            current: ArcSwap::from_pointee(key),
        });
        // TLS 1.3 and 1.2 only, ring's AEAD suites with forward secrecy (rustls offers nothing
        // weaker), no client certificates.
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| CertError::certificate(&config.certificate, e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(store.clone());
        Ok(Tls {
            store,
            acceptor: TlsAcceptor::from(Arc::new(server)),
        })
    }

    /// Loads the files `config` names without using them yet (the reload's check).
    pub fn load(&self, config: &TlsConfig) -> Result<CertifiedKey, CertError> {
        load_certified_key(&config.certificate, &config.private_key, SystemTime::now())
    }

    /// Makes `key` the certificate of every handshake from now on.
    pub fn install(&self, key: CertifiedKey) {
        self.store.current.store(Arc::new(key));
    }

    /// The acceptor every handshake goes through (the web listener's too, with `web.tls`).
    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// The leaf certificate in force (for logs and tests).
    pub fn current_leaf(&self) -> Option<CertificateDer<'static>> {
        self.store.current.load().cert.first().cloned()
    }
}

/// `notBefore` and `notAfter` of a DER certificate.
///
/// Written by hand rather than with an X.509 crate: these two fields at a fixed place in the
/// structure are all chatd reads (webpki checks everything else at every handshake on the
/// client's side), and a parser crate would bring in about eight more crates for it. Every
/// length is checked; anything unexpected is `None`.
pub fn validity(cert: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (tag, certificate, _) = der(cert)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs, _) = der(certificate)?;
    if tag != 0x30 {
        return None;
    }
    let mut rest = tbs;
    let (mut tag, mut body, mut next) = der(rest)?;
    if tag == 0xa0 {
        // [0] EXPLICIT version
        rest = next;
        (tag, body, next) = der(rest)?;
    }
    let _ = body;
    // serialNumber INTEGER, signature AlgorithmIdentifier, issuer Name, then validity.
    if tag != 0x02 {
        return None;
    }
    rest = next;
    for _ in 0..2 {
        let (t, _, n) = der(rest)?;
        if t != 0x30 {
            return None;
        }
        rest = n;
    }
    let (tag, validity, _) = der(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (t1, before, rest) = der(validity)?;
    let (t2, after, _) = der(rest)?;
    Some((time(t1, before)?, time(t2, after)?))
}

/// One DER element: its tag, contents and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return None;
    }
    let (body, after) = rest.split_at(len);
    Some((tag, body, after))
}

/// A UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) as a point in time.
fn time(tag: u8, text: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(text).ok()?;
    let digits = text.strip_suffix('Z')?;
    let (year, rest) = match (tag, digits.len()) {
        (0x17, 12) => {
            let yy: i64 = digits.get(..2)?.parse().ok()?;
            // RFC 5280: two-digit years from 50 are 19xx, below are 20xx.
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (0x18, 14) => (digits.get(..4)?.parse().ok()?, &digits[4..]),
        _ => return None,
    };
    let field = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day, h, m, s) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s;
    if secs >= 0 {
        Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
    } else {
        Some(UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()))
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_days() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
    }

    #[test]
    fn asn1_times() {
        let t = time(0x17, b"491231235959Z").unwrap_or(UNIX_EPOCH);
        assert_eq!(
            humantime::format_rfc3339_seconds(t).to_string(),
            "2049-12-31T23:59:59Z"
        );
        let t = time(0x17, b"500101000000Z").unwrap_or(UNIX_EPOCH);
        assert_eq!(
            UNIX_EPOCH.duration_since(t).map(|d| d.as_secs()).ok(),
            Some(631_152_000)
        );
        assert_eq!(date(t), "a date before 1970");
        let t = time(0x18, b"20990615120000Z").unwrap_or(UNIX_EPOCH);
        assert_eq!(
            humantime::format_rfc3339_seconds(t).to_string(),
            "2099-06-15T12:00:00Z"
        );
        assert_eq!(time(0x17, b"9912312359Z"), None);
        assert_eq!(time(0x18, b"20991315120000Z"), None);
    }

    #[test]
    fn truncated_der_is_none_not_a_panic() {
        for bytes in [
            &[][..],
            &[0x30],
            &[0x30, 0x82, 0xff],
            &[0x30, 0x05, 0x30, 0x00],
        ] {
            assert_eq!(validity(bytes), None);
        }
    }

    #[test]
    fn missing_files_name_the_file() {
        let e = load_certified_key(
            Path::new("/nonexistent/fullchain.pem"),
            Path::new("/nonexistent/privkey.pem"),
            SystemTime::now(),
        )
        .err();
        let e = e.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e.starts_with("tls.certificate: /nonexistent/fullchain.pem: cannot read"),
            "{e}"
        );
    }
}
