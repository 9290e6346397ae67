//! The connection to the server, plain TCP or TLS: connecting with a bound, reading lines in a
//! task of their own (so waiting for a line can sit in `select!` without losing half-read
//! data), and sending.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use chat_proto::codec::{Frame, LineDecoder};
use chat_proto::protocol;

/// Longest a connection attempt may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle time before the first keepalive probe, and the time between probes (3 unanswered
/// probes end the connection: a dead path is noticed within about a minute).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Longest line accepted from the server. The longest chatd sends is the `*** WHO` answer,
/// naming everyone online: just under 1 MB with its default limits (10,000 clients, names of 24
/// characters of up to 4 bytes). Anything longer is shown as too long rather than held.
const MAX_LINE: usize = 1 << 20;
/// Room made in the read buffer before each read: most reads bring a few short lines.
const READ_CHUNK: usize = 16 * 1024;

/// What the reader task reports.
#[derive(Debug)]
pub enum FromServer {
    /// One line, without its terminator, invalid UTF-8 replaced.
    Line(String),
    /// The server closed the connection (`None`) or it failed.
    Closed(Option<io::Error>),
}

/// A live connection: lines arrive on `lines`, `send` writes.
pub struct Connection {
    /// Lines from the server, ending with one `Closed`.
    pub lines: mpsc::Receiver<FromServer>,
    writer: Box<dyn AsyncWrite + Send + Unpin>,
    reader: tokio::task::JoinHandle<()>,
    /// The flood limit the server announced when it welcomed us: (lines per second, burst).
    pub limits: Option<(u64, u64)>,
}

impl Connection {
    /// Connects to `host:port`, with TLS when `tls` is given (verifying the certificate for
    /// `host`); the error says where and why, e.g.
    /// "cannot connect to 127.0.0.1:1: Connection refused (os error 111)".
    pub async fn open(
        host: &str,
        port: u16,
        tls: Option<&Arc<ClientConfig>>,
    ) -> anyhow::Result<Connection> {
        let target = format!("{}:{port}", bracket_v6(host));
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => anyhow::bail!("cannot connect to {target}: {e}"),
            Err(_) => anyhow::bail!(
                "cannot connect to {target}: no answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            ),
        };
        // Chat lines are tiny and interactive; waiting to coalesce them only adds latency.
        let _ = stream.set_nodelay(true);
        // A quiet room sends nothing, so a dead path (suspended laptop, dropped Wi-Fi) would
        // go unnoticed until the user types; keepalive probes find it, and reconnecting starts.
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(
            &socket2::TcpKeepalive::new()
                .with_time(KEEPALIVE_IDLE)
                .with_interval(KEEPALIVE_INTERVAL)
                .with_retries(3),
        );
        let (tx, lines) = mpsc::channel(256);
        let (reader, writer): (_, Box<dyn AsyncWrite + Send + Unpin>) = match tls {
            None => {
                let (read, writer) = stream.into_split();
                (tokio::spawn(read_lines(read, tx)), Box::new(writer))
            }
            Some(config) => {
                let stream = handshake(config, host, &target, stream).await?;
                let (read, writer) = tokio::io::split(stream);
                (tokio::spawn(read_lines(read, tx)), Box::new(writer))
            }
        };
        Ok(Connection {
            limits: None,
            lines,
            writer,
            reader,
        })
    }

    /// Sends one line (a `\n` is added).
    pub async fn send(&mut self, line: &str) -> io::Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.writer.write_all(&buf).await?;
        // A TLS writer may hold the record until flushed; a TCP one flushes at once.
        self.writer.flush().await
    }

    /// The next event from the server; a finished reader counts as closed.
    pub async fn recv(&mut self) -> FromServer {
        self.lines.recv().await.unwrap_or(FromServer::Closed(None))
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The TLS client settings: the system's trusted roots, or only the CA certificates in `ca`.
pub fn tls_config(ca: Option<&Path>) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(file) => {
            let certs = CertificateDer::pem_file_iter(file)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("--ca {}: {e:?}", file.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                anyhow::bail!("--ca {}: no CA certificate in this file", file.display());
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                anyhow::bail!(
                    "no trusted root certificates found on this system (install ca-certificates, \
                     or give --ca FILE)"
                );
            }
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("TLS set-up: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The rustls crypto provider: ring, as in the whole workspace (rustls 0.23.48 deprecates it
/// for lacking post-quantum key exchange; aws-lc-rs would need a C toolchain to build).
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS handshake on `stream` for `host`; a certificate that does not verify is an error
/// that says why, and nothing is ever sent in the clear instead.
async fn handshake(
    config: &Arc<ClientConfig>,
    host: &str,
    target: &str,
    stream: TcpStream,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(bare.to_owned())
        .map_err(|_| anyhow::anyhow!("{host:?} is not a host name TLS can verify"))?;
    let connect = tokio_rustls::TlsConnector::from(config.clone()).connect(name, stream);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(anyhow::anyhow!(
            "TLS with {target} failed: {}",
            describe_tls_error(&e, bare)
        )),
        Err(_) => anyhow::bail!(
            "TLS with {target} failed: no handshake within {}s",
            CONNECT_TIMEOUT.as_secs()
        ),
    }
}

/// What a failed handshake means to a user.
fn describe_tls_error(e: &io::Error, host: &str) -> String {
    let Some(tls) = e.get_ref().and_then(|r| r.downcast_ref::<rustls::Error>()) else {
        return format!("{e} (is this a TLS port?)");
    };
    match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                "the server's certificate is not trusted (its issuer is not among the trusted \
                 roots; for a private CA use --ca FILE)"
                    .to_owned()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the server's certificate is not valid for {host}")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired".to_owned()
            }
            other => format!("the server's certificate was refused: {other:?}"),
        },
        rustls::Error::InvalidMessage(_) => {
            format!("the server does not speak TLS on this port ({tls})")
        }
        other => other.to_string(),
    }
}

/// `::1` must be written `[::1]` before a port is added.
fn bracket_v6(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// The line shown in place of one longer than [`MAX_LINE`].
fn too_long_line() -> String {
    let line = protocol::error_line(
        protocol::code::LINE_TOO_LONG,
        "a line from the server was too long to show",
    );
    String::from_utf8_lossy(line.strip_suffix(b"\n").unwrap_or(&line)).into_owned()
}

/// Splits the stream into lines until it ends, with the protocol's own decoder: at most
/// [`MAX_LINE`] bytes of one line are ever held, a longer one is reported once and skipped up
/// to its newline. An unterminated last line (the server died mid-line) is dropped.
async fn read_lines(mut read: impl AsyncRead + Unpin, tx: mpsc::Sender<FromServer>) {
    let mut decoder = LineDecoder::new(MAX_LINE);
    loop {
        while let Some(frame) = decoder.next_frame() {
            let text = match frame {
                Frame::Line(line) => String::from_utf8_lossy(&line).into_owned(),
                Frame::TooLong => too_long_line(),
            };
            if tx.send(FromServer::Line(text)).await.is_err() {
                return;
            }
        }
        let buf = decoder.buffer_mut();
        buf.reserve(READ_CHUNK);
        match read.read_buf(buf).await {
            Ok(0) => {
                let _ = tx.send(FromServer::Closed(None)).await;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(FromServer::Closed(Some(e))).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `bytes` to one client, then closes.
    async fn serve(bytes: Vec<u8>) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(&bytes).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn lines_up_to_the_cap_arrive_longer_ones_are_reported_once() {
        let longest = "x".repeat(MAX_LINE);
        let mut wire = format!("a\r\nb\n{longest}\n").into_bytes();
        wire.extend(std::iter::repeat_n(b'y', MAX_LINE + 10));
        wire.extend_from_slice(b"\nc\nunterminated");
        let mut conn = Connection::open("127.0.0.1", serve(wire).await, None)
            .await
            .expect("connect");
        let mut got = Vec::new();
        loop {
            match conn.recv().await {
                FromServer::Line(l) => got.push(l),
                FromServer::Closed(e) => {
                    assert!(e.is_none(), "{e:?}");
                    break;
                }
            }
        }
        assert_eq!(got, ["a", "b", &longest, &too_long_line(), "c"]);
        assert_eq!(
            too_long_line(),
            "*** ERR line-too-long a line from the server was too long to show"
        );
    }
}
