//! The test harness: a temporary daemon, line-oriented clients, and bounded waits.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A `[limits]` section that lifts flood control, for tests that send bursts.
pub const NO_RATE_LIMIT: &str = "[limits]\nmessage-rate = 1000000\nmessage-burst = 1000000\n";

/// Default bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// Path of one of the workspace's programs, built for this test run. The daemon is this
/// package's own binary (`CARGO_BIN_EXE_chatd`); chatctl, chat-client and chat-bench are other
/// packages' binaries, which `cargo test` does not build for this package's tests, so the first
/// call builds them once with the same cargo and profile, into the same target directory.
pub fn bin(name: &str) -> PathBuf {
    let chatd = PathBuf::from(env!("CARGO_BIN_EXE_chatd"));
    let path = match name {
        "chatd" => chatd,
        "chatctl" | "chat-client" | "chat-bench" => {
            let dir = sibling_binaries(&chatd);
            dir.join(name)
        }
        other => panic!("unknown binary {other}"),
    };
    assert!(path.exists(), "binary {} is missing", path.display());
    path
}

/// Builds the workspace's other programs once per test run; returns the directory they are in
/// (the one the daemon's binary is in).
fn sibling_binaries(chatd: &Path) -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = chatd.parent().expect("binary directory").to_path_buf();
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .arg("build")
            .arg("--quiet")
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
            .args(["-p", "chatctl", "-p", "chat-client", "-p", "chat-bench"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        let status = cargo
            .status()
            .expect("run cargo to build chatctl, chat-client and chat-bench");
        assert!(
            status.success(),
            "building chatctl, chat-client and chat-bench failed"
        );
        dir
    })
}

/// Waits up to `limit` for `child` to exit; kills it and returns `None` if it does not (the
/// caller panics with what it knows).
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `cond` until it holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `chatd` with its own temp dir, config file and admin socket; killed on drop.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub config_path: PathBuf,
    pub socket: PathBuf,
    pub log_path: PathBuf,
}

impl TestDaemon {
    /// The config every test daemon starts from; `extra` is appended (whole sections).
    pub fn config_text(socket: &Path, extra: &str) -> String {
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\npartial-line-flush = \"150ms\"\nshutdown-grace = \"3s\"\n\
             state-dir = \"{}\"\n\n\
             [admin]\nsocket = \"{}\"\nmode = 0o660\ngroup = \"\"\n\n{extra}",
            socket.with_file_name("state").display(),
            socket.display()
        )
    }

    /// Starts a daemon with the default test config plus `extra`.
    pub fn start(extra: &str) -> TestDaemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("admin.sock");
        let text = Self::config_text(&socket, extra);
        Self::start_with_text(dir, &text)
    }

    /// Starts a daemon on exactly this config text (written to `dir/chatd.toml`).
    pub fn start_with_text(dir: tempfile::TempDir, text: &str) -> TestDaemon {
        let config_path = dir.path().join("chatd.toml");
        std::fs::write(&config_path, text).expect("write config");
        let socket = dir.path().join("admin.sock");
        let log_path = dir.path().join("chatd.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(bin("chatd"))
            .arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn chatd");
        let mut d = TestDaemon {
            dir,
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            config_path,
            socket,
            log_path,
        };
        let mut port = None;
        wait_until(WAIT, "chatd to listen", || {
            if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("chatd exited early ({status}):\n{}", d.log());
            }
            let log = d.log();
            port = log
                .lines()
                .find(|l| l.contains("listening for chat clients"))
                .and_then(|l| l.rsplit(':').next())
                .and_then(|p| p.trim().parse::<u16>().ok());
            port.is_some() && log.contains("admin socket ready")
        });
        d.addr.set_port(port.unwrap_or(0));
        d
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) {
        wait_until(WAIT, &format!("log line {needle:?}"), || {
            self.log().contains(needle)
        });
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running")
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// Rewrites the config file (for reload tests).
    pub fn write_config(&self, extra: &str) {
        std::fs::write(&self.config_path, Self::config_text(&self.socket, extra)).expect("write");
    }

    /// Waits for the daemon to exit and returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        match wait_child(&mut child, WAIT) {
            Some(status) => status.code(),
            None => panic!("chatd did not exit in time:\n{}", self.log()),
        }
    }

    /// Connects a raw client.
    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// Connects and takes `name`; returns once the welcome, MOTD and history have been read
    /// (a `/who` round trip marks their end).
    pub fn join(&self, name: &str) -> Client {
        let mut c = self.connect();
        c.join_as(name);
        c.send("/who");
        c.expect_prefix("*** WHO ");
        c
    }

    /// Runs the real chatctl against this daemon's socket.
    pub fn chatctl(&self, args: &[&str]) -> Output {
        Command::new(bin("chatctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run chatctl")
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A line-oriented TCP client with bounded reads.
pub struct Client {
    pub reader: BufReader<TcpStream>,
    pub writer: TcpStream,
}

impl Client {
    /// Connects to `addr`.
    pub fn connect(addr: SocketAddr) -> Client {
        Client::from_stream(TcpStream::connect_timeout(&addr, WAIT).expect("connect"))
    }

    /// Wraps a connected stream (one made with special socket options, say).
    pub fn from_stream(stream: TcpStream) -> Client {
        stream.set_read_timeout(Some(WAIT)).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        let writer = stream.try_clone().expect("clone");
        Client {
            reader: BufReader::new(stream),
            writer,
        }
    }

    /// Takes `name` on a connection that has just been greeted; returns once it is accepted.
    pub fn join_as(&mut self, name: &str) {
        self.expect_prefix("*** HELLO ");
        self.send(name);
        self.expect_prefix(&format!("*** WELCOME {name}"));
    }

    /// Sends `line` followed by `\n`.
    pub fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\n").as_bytes());
    }

    /// Sends bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    /// Next line without its terminator; panics on timeout or EOF.
    pub fn line(&mut self) -> String {
        self.try_line()
            .unwrap_or_else(|| panic!("connection closed while waiting for a line"))
    }

    /// Next line, or `None` at EOF; panics on timeout.
    pub fn try_line(&mut self) -> Option<String> {
        let mut buf = Vec::new();
        match self.reader.read_until(b'\n', &mut buf) {
            Ok(0) => None,
            Ok(_) => {
                assert!(buf.ends_with(b"\n"), "partial line at EOF: {buf:?}");
                buf.pop();
                Some(String::from_utf8(buf).expect("server sent invalid UTF-8"))
            }
            Err(e) => panic!("reading a line failed (timeout {WAIT:?}?): {e}"),
        }
    }

    /// Reads lines until one starts with `prefix`, returning it; earlier lines are skipped.
    pub fn expect_prefix(&mut self, prefix: &str) -> String {
        let mut seen = Vec::new();
        loop {
            match self.try_line() {
                Some(l) if l.starts_with(prefix) => return l,
                Some(l) => seen.push(l),
                None => panic!("EOF before a line starting {prefix:?}; saw {seen:?}"),
            }
        }
    }

    /// Reads the next `n` chat lines (everything but server lines), in order; panics if
    /// anyone leaves meanwhile, since the tests using it promise nobody is dropped.
    pub fn chat_lines(&mut self, n: usize) -> Vec<String> {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let l = self.line();
            assert!(!l.starts_with("*** LEAVE"), "someone was dropped: {l}");
            if !l.starts_with("*** ") {
                got.push(l);
            }
        }
        got
    }

    /// Reads until EOF and returns the remaining lines; panics on timeout.
    pub fn until_eof(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(l) = self.try_line() {
            out.push(l);
        }
        out
    }

    /// Asserts that no line arrives within `d`.
    pub fn assert_silent(&mut self, d: Duration) {
        let s = self.reader.get_ref();
        s.set_read_timeout(Some(d)).expect("timeout");
        let mut buf = [0u8; 1];
        let got = if self.reader.buffer().is_empty() {
            self.reader.get_mut().read(&mut buf)
        } else {
            Ok(1)
        };
        self.reader
            .get_ref()
            .set_read_timeout(Some(WAIT))
            .expect("timeout");
        match got {
            Ok(0) => panic!("connection closed"),
            Ok(_) => panic!("unexpected data: {:?}", self.reader.buffer()),
            Err(_) => {}
        }
    }
}

/// Reads `n` chat lines from every receiver, asserts that they all saw the same lines in the
/// same order, and returns that order.
pub fn agreed_order(receivers: &mut [Client], n: usize) -> Vec<String> {
    let orders: Vec<_> = receivers.iter_mut().map(|r| r.chat_lines(n)).collect();
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "receivers disagree on order"
    );
    orders.into_iter().next().unwrap_or_default()
}

/// chatctl's `--json` answer, parsed.
pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "chatctl printed no JSON ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}
