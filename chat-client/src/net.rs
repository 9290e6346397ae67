//! The TCP connection to the server: connecting with a bound, reading lines in a task of their
//! own (so waiting for a line can sit in `select!` without losing half-read data), and sending.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
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
    writer: OwnedWriteHalf,
    reader: tokio::task::JoinHandle<()>,
    /// The flood limit the server announced when it welcomed us: (lines per second, burst).
    pub limits: Option<(u64, u64)>,
}

impl Connection {
    /// Connects to `host:port`; the error says where and why, e.g.
    /// "cannot connect to 127.0.0.1:1: Connection refused (os error 111)".
    pub async fn open(host: &str, port: u16) -> anyhow::Result<Connection> {
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
        let (read, writer) = stream.into_split();
        let (tx, lines) = mpsc::channel(256);
        let reader = tokio::spawn(read_lines(read, tx));
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
        self.writer.write_all(&buf).await
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
async fn read_lines(mut read: OwnedReadHalf, tx: mpsc::Sender<FromServer>) {
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
        let mut conn = Connection::open("127.0.0.1", serve(wire).await)
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
