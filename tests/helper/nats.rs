//! Real NATS servers for the cluster tests: one server with JetStream on an ephemeral port, or a
//! cluster of several; stopped, started again on the same port and store, or killed, on demand;
//! killed on drop. [`RawNats`] is a tiny client of the NATS text protocol, for tests that look
//! at JetStream or put messages on a room's subject behind chatd's back.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::components::program_path;
use super::wait::{WAIT, wait_child, wait_for};
use super::{Config, free_port};

/// How long a NATS cluster gets to elect its JetStream meta leader.
const ELECTION: Duration = Duration::from_secs(30);

/// One `nats-server` with JetStream, its store and log in a temp dir of its own.
pub struct NatsServer {
    /// Its server name (`-n`).
    pub name: String,
    /// The client port, kept across [`NatsServer::stop`] and [`NatsServer::start_again`].
    pub port: u16,
    /// Holds `store/` (JetStream's) and `nats.log`.
    pub dir: tempfile::TempDir,
    /// Extra arguments (a cluster member's name and routes).
    args: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts one server with JetStream on an ephemeral loopback port; returns once it accepts
    /// clients and JetStream answers.
    pub fn start() -> NatsServer {
        // The port was free when picked; if something took it since, pick again.
        for attempt in 0.. {
            let mut s = NatsServer::new(format!("n{}", free_port()), free_port(), Vec::new());
            s.spawn();
            match s.wait_listening() {
                Ok(()) => {
                    s.wait_jetstream(WAIT);
                    return s;
                }
                Err(log) if attempt < 3 => eprintln!("nats-server did not start, again: {log}"),
                Err(log) => panic!("nats-server did not start:\n{log}"),
            }
        }
        unreachable!()
    }

    /// Starts one server with JetStream that only admits clients giving `args`' credentials
    /// (`--user U --pass P`, `--auth TOKEN`); returns once it accepts TCP (this harness's own
    /// NATS client does not authenticate, so JetStream is not probed).
    pub fn start_with_auth(args: &[&str]) -> NatsServer {
        let args = args.iter().map(|a| (*a).to_owned()).collect();
        let mut s = NatsServer::new(format!("n{}", free_port()), free_port(), args);
        s.spawn();
        if let Err(log) = s.wait_listening() {
            panic!("nats-server did not start:\n{log}");
        }
        s
    }

    /// A server whose port and store are picked but which is not started yet (for a test
    /// that starts chatd before NATS); [`NatsServer::start_again`] starts it.
    pub fn unstarted() -> NatsServer {
        NatsServer::new(format!("n{}", free_port()), free_port(), Vec::new())
    }

    /// Starts `n` servers as one NATS cluster with JetStream; returns once every one accepts
    /// clients and JetStream (its meta leader) answers on each.
    pub fn cluster(n: usize) -> Vec<NatsServer> {
        // A port was free when picked; if something took one since, start them all again.
        for attempt in 0.. {
            match NatsServer::try_cluster(n) {
                Ok(servers) => return servers,
                Err(log) if attempt < 3 => eprintln!("a NATS cluster did not start, again: {log}"),
                Err(log) => panic!("{log}"),
            }
        }
        unreachable!()
    }

    fn try_cluster(n: usize) -> Result<Vec<NatsServer>, String> {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let mut servers: Vec<NatsServer> = (0..n)
            .map(|i| {
                let others: Vec<String> = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| format!("nats://127.0.0.1:{}", routes[j]))
                    .collect();
                let args = vec![
                    "--cluster_name".to_owned(),
                    "c".to_owned(),
                    "--cluster".to_owned(),
                    format!("nats://127.0.0.1:{}", routes[i]),
                    "--routes".to_owned(),
                    others.join(","),
                ];
                NatsServer::new(format!("n{i}"), free_port(), args)
            })
            .collect();
        for s in &mut servers {
            s.spawn();
        }
        for s in &mut servers {
            if let Err(log) = s.wait_listening() {
                return Err(format!("cluster member {} did not start:\n{log}", s.name));
            }
        }
        for s in &servers {
            s.wait_jetstream(ELECTION);
        }
        Ok(servers)
    }

    fn new(name: String, port: u16, args: Vec<String>) -> NatsServer {
        NatsServer {
            name,
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            args,
            child: None,
        }
    }

    fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "nats-server {} runs already",
            self.name
        );
        let program = program_path("nats-server").expect("nats-server is installed");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("nats log");
        let child = Command::new(program)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js"])
            .arg("-sd")
            .arg(self.dir.path().join("store"))
            .args(["-n", &self.name])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
    }

    /// Waits until the server accepts TCP on its port; its log if it exits (or never does).
    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("exited ({status}):\n{}", self.log()));
            }
            if TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not listening after {WAIT:?}:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until JetStream answers `$JS.API.INFO` on this server without an error.
    pub fn wait_jetstream(&self, limit: Duration) {
        let last = std::cell::RefCell::new(String::new());
        wait_for(
            limit,
            &format!("JetStream on nats-server {}", self.name),
            || {
                let answer = RawNats::connect(self.port).request("$JS.API.INFO", b"");
                let ok = answer.as_deref().is_some_and(|a| {
                    serde_json::from_slice::<serde_json::Value>(a)
                        .is_ok_and(|v| v.get("error").is_none() && v.get("memory").is_some())
                });
                if !ok {
                    *last.borrow_mut() =
                        String::from_utf8_lossy(answer.as_deref().unwrap_or_default()).into();
                    std::thread::sleep(Duration::from_millis(200));
                }
                ok.then_some(())
            },
            || format!("last answer: {}\n{}", last.borrow(), self.log()),
        );
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Where it logs.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// Everything it logged so far (all its runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether it runs now.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops it the polite way (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if wait_child(&mut child, WAIT).is_none() {
                panic!("nats-server {} ignored SIGTERM:\n{}", self.name, self.log());
            }
        }
    }

    /// Sends it `sig` (SIGSTOP freezes it with every connection open: its clients' requests
    /// go unanswered until SIGCONT); does nothing when it is not running.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(child) = &self.child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
        }
    }

    /// Kills it at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store after [`NatsServer::stop`] or
    /// [`NatsServer::kill`] (or for the first time, if [`NatsServer::unstarted`]); returns once it accepts clients (JetStream may need longer: see
    /// [`NatsServer::wait_jetstream`]).
    pub fn start_again(&mut self) {
        // The port may linger briefly after the old process; a few tries.
        for attempt in 0.. {
            self.spawn();
            match self.wait_listening() {
                Ok(()) => return,
                Err(log) if attempt < 5 => {
                    eprintln!(
                        "nats-server {} did not start again, once more: {log}",
                        self.name
                    );
                    std::thread::sleep(Duration::from_millis(300));
                }
                Err(log) => panic!("nats-server {} did not start again:\n{log}", self.name),
            }
        }
    }

    /// A raw client of this server.
    pub fn client(&self) -> RawNats {
        RawNats::connect(self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `nats` list of a chatd `[cluster]` table for `servers`, as TOML.
pub fn nats_urls(servers: &[&NatsServer]) -> String {
    let urls: Vec<String> = servers.iter().map(|s| format!("{:?}", s.url())).collect();
    format!("[{}]", urls.join(", "))
}

/// A test config with a `[cluster]` table: node `node` of room `room` on `servers`, a 2 s
/// node timeout (the least allowed), one replica, and no flood control.
pub fn cluster_config(servers: &[&NatsServer], room: &str, node: &str) -> Config {
    Config::test()
        .no_rate_limit()
        .set("cluster", "nats", nats_urls(servers))
        .set_str("cluster", "node", node)
        .set_str("cluster", "name", room)
        .set_str("cluster", "node-timeout", "2s")
        .set("cluster", "replicas", "1")
}

/// A room name of its own for one test: `base` and this process's id (servers are per test,
/// but a unique room keeps a shared server harmless too).
pub fn room_name(base: &str) -> String {
    format!("{base}-{}", std::process::id())
}

/// A minimal client of the NATS text protocol over TCP: publish, and request-reply. Every read
/// is bounded.
pub struct RawNats {
    reader: BufReader<TcpStream>,
    next_sid: u32,
}

/// One `MSG` the server sent.
#[derive(Debug)]
pub struct RawMsg {
    pub subject: String,
    pub sid: u32,
    pub payload: Vec<u8>,
}

impl RawNats {
    /// Connects to the server on `port` and says hello (`CONNECT`), then waits for a `PONG`.
    pub fn connect(port: u16) -> RawNats {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let stream = TcpStream::connect_timeout(&addr, WAIT).expect("connect to nats-server");
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut c = RawNats {
            reader: BufReader::new(stream),
            next_sid: 1,
        };
        let info = c.read_line();
        assert!(info.starts_with("INFO "), "not a NATS server: {info:?}");
        c.write(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"name\":\"chatd-tests\"}\r\n");
        c.flush();
        c
    }

    fn write(&mut self, bytes: &[u8]) {
        self.reader
            .get_mut()
            .write_all(bytes)
            .expect("write to nats-server");
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .expect("read from nats-server");
        assert!(n > 0, "nats-server closed the connection");
        line.trim_end_matches(['\r', '\n']).to_owned()
    }

    /// Waits until the server has handled everything sent so far (PING, then its PONG).
    pub fn flush(&mut self) {
        self.write(b"PING\r\n");
        loop {
            let l = self.read_line();
            match l.as_str() {
                "PONG" => return,
                "PING" => self.write(b"PONG\r\n"),
                l if l.starts_with("-ERR") => panic!("nats-server: {l}"),
                l if l.starts_with("MSG ") => {
                    self.read_payload(l);
                }
                _ => {}
            }
        }
    }

    fn read_payload(&mut self, header: &str) -> RawMsg {
        // MSG <subject> <sid> [reply-to] <#bytes>
        let parts: Vec<&str> = header.split(' ').collect();
        let len: usize = parts
            .last()
            .and_then(|n| n.parse().ok())
            .expect("MSG length");
        let mut payload = vec![0; len + 2];
        self.reader.read_exact(&mut payload).expect("MSG payload");
        payload.truncate(len);
        RawMsg {
            subject: parts[1].to_owned(),
            sid: parts[2].parse().expect("sid"),
            payload,
        }
    }

    /// Publishes `payload` on `subject`, with `reply` as its reply subject if given.
    pub fn publish_to(&mut self, subject: &str, reply: Option<&str>, payload: &[u8]) {
        let head = match reply {
            Some(r) => format!("PUB {subject} {r} {}\r\n", payload.len()),
            None => format!("PUB {subject} {}\r\n", payload.len()),
        };
        self.write(head.as_bytes());
        self.write(payload);
        self.write(b"\r\n");
    }

    /// Publishes `payload` on `subject` and waits until the server has it.
    pub fn publish(&mut self, subject: &str, payload: &[u8]) {
        self.publish_to(subject, None, payload);
        self.flush();
    }

    /// Sends a request and returns the first reply, or `None` if none came within 2 s (or
    /// the server said `-ERR`).
    pub fn request(&mut self, subject: &str, payload: &[u8]) -> Option<Vec<u8>> {
        let sid = self.next_sid;
        self.next_sid += 1;
        let inbox = format!("_INBOX.chatd-tests.{}.{sid}", std::process::id());
        self.write(format!("SUB {inbox} {sid}\r\n").as_bytes());
        self.publish_to(subject, Some(&inbox), payload);
        let stream = self.reader.get_ref().try_clone().expect("clone");
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut reply = None;
        while Instant::now() < deadline {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if l == "PING" {
                self.write(b"PONG\r\n");
            } else if l.starts_with("-ERR") {
                break;
            } else if l.starts_with("MSG ") {
                let m = self.read_payload(l);
                if m.sid == sid {
                    reply = Some(m.payload);
                    break;
                }
            }
        }
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        self.write(format!("UNSUB {sid}\r\n").as_bytes());
        reply
    }

    /// A JetStream API request (`$JS.API.<api>`), its JSON answer.
    pub fn js_api(&mut self, api: &str, body: &str) -> Option<serde_json::Value> {
        let answer = self.request(&format!("$JS.API.{api}"), body.as_bytes())?;
        serde_json::from_slice(&answer).ok()
    }

    /// Publishes `payload` on a stream's subject and returns JetStream's acknowledgement
    /// (`{"stream": .., "seq": ..}`, or an error object).
    pub fn js_publish(&mut self, subject: &str, payload: &[u8]) -> serde_json::Value {
        let answer = self
            .request(subject, payload)
            .unwrap_or_else(|| panic!("no JetStream acknowledgement for a publish on {subject}"));
        serde_json::from_slice(&answer).expect("JetStream acknowledgement is JSON")
    }
}
