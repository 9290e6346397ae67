//! The browser client's transports for tests: [`WsStream`] turns a WebSocket into a line
//! stream (each text message one line, in both directions), so a [`Client`] reads and writes
//! it like a TCP one; [`http`] makes plain HTTP/1.1 requests to the web listener.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::HandshakeError;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocket;
use tokio_tungstenite::tungstenite::{Error, Message};

use super::net::{Client, ReadTimeout};
use super::wait::WAIT;

/// A WebSocket read and written as lines: `read` yields each text message followed by `\n`,
/// `write` sends each complete line as one text message. A close frame ends the stream (EOF)
/// and is kept in [`WsStream::close`].
pub struct WsStream<S: Read + Write = TcpStream> {
    pub ws: WebSocket<S>,
    /// Bytes of the last message not read yet.
    input: Vec<u8>,
    /// Bytes written since the last complete line.
    output: Vec<u8>,
    /// The close frame's code and reason, once one arrived (1005 for a close without code).
    pub close: Option<(u16, String)>,
}

/// A line client over a WebSocket.
pub type WsClient<S = TcpStream> = Client<WsStream<S>>;

impl<S: Read + Write> WsStream<S> {
    /// Wraps an open WebSocket.
    pub fn new(ws: WebSocket<S>) -> Self {
        WsStream {
            ws,
            input: Vec::new(),
            output: Vec::new(),
            close: None,
        }
    }
}

impl<S: Read + Write> Read for WsStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.input.is_empty() {
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    assert!(!t.contains('\n'), "a message holds one line: {t:?}");
                    self.input.extend_from_slice(t.as_bytes());
                    self.input.push(b'\n');
                }
                Ok(Message::Close(frame)) => {
                    self.close = Some(frame.map_or((1005, String::new()), |f| {
                        (u16::from(f.code), f.reason.to_string())
                    }));
                    return Ok(0);
                }
                Ok(Message::Binary(b)) => panic!("the server sent a binary message: {b:?}"),
                Ok(_) => {}
                Err(Error::ConnectionClosed | Error::AlreadyClosed) => return Ok(0),
                Err(Error::Io(e)) => return Err(e),
                Err(e) => return Err(std::io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input.drain(..n);
        Ok(n)
    }
}

impl<S: Read + Write> Write for WsStream<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        while let Some(end) = self.output.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.output.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..end]).into_owned();
            self.ws
                .write(Message::text(text))
                .map_err(std::io::Error::other)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.ws.flush().map_err(std::io::Error::other)
    }
}

impl<S: Read + Write + ReadTimeout> ReadTimeout for WsStream<S> {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.ws.get_ref().set_read_timeout(d)
    }
}

/// Why an upgrade was refused: the HTTP status and body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: String,
}

/// Opens `ws://addr/ws` over `stream` with `origin` (none: no `Origin` header), as a line
/// client; `Err` carries the status and body of a refused upgrade.
pub fn upgrade<S: Read + Write + ReadTimeout>(
    stream: S,
    url: &str,
    origin: Option<&str>,
) -> Result<WsClient<S>, Refused> {
    let mut request = url.into_client_request().expect("request");
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("Origin", HeaderValue::from_str(origin).expect("origin"));
    }
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    match tokio_tungstenite::tungstenite::client::client(request, stream) {
        Ok((ws, _)) => Ok(Client::new(WsStream::new(ws))),
        Err(HandshakeError::Failure(Error::Http(response))) => Err(Refused {
            status: response.status().as_u16(),
            body: String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                .into_owned(),
        }),
        Err(e) => panic!("WebSocket handshake failed: {e}"),
    }
}

/// Opens the chat's WebSocket at `addr` as the page would (its own origin).
pub fn try_connect(addr: SocketAddr, origin: Option<&str>) -> Result<WsClient, Refused> {
    let tcp = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    upgrade(tcp, &format!("ws://{addr}/ws"), origin)
}

/// Opens the chat's WebSocket at `addr` with the page's own origin; panics if refused.
pub fn connect(addr: SocketAddr) -> WsClient {
    try_connect(addr, Some(&format!("http://{addr}")))
        .unwrap_or_else(|r| panic!("upgrade refused: {r:?}"))
}

/// Connects and takes `name`; returns once the name is accepted.
pub fn join(addr: SocketAddr, name: &str) -> WsClient {
    let mut c = connect(addr);
    c.join_as(name);
    c
}

/// The close code and reason that ended `c` (reads to the end first).
pub fn closed_with<S: Read + Write + ReadTimeout>(c: &mut WsClient<S>) -> (u16, String) {
    let rest = c.until_eof();
    let stream = c.reader.get_ref();
    stream
        .close
        .clone()
        .unwrap_or_else(|| panic!("the connection ended without a close frame; read {rest:?}"))
}

/// An HTTP response: status, headers (names in lower case) and body.
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The value of header `name` (lower case), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with `headers` (whole lines) to `addr`, connection closed after.
pub fn http(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> HttpResponse {
    let mut s = TcpStream::connect_timeout(&addr, WAIT).expect("connect to web");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {raw:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}
