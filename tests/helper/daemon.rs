//! Running `chatd`s: each with its own temp dir, config file, admin socket and log; ready when
//! its admin socket answers `status` (which also says where it listens); killed on drop.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use super::config::{Config, admin_socket_of};
use super::net::Client;
use super::wait::{WAIT, wait_child, wait_for, wait_until};
use super::{bin, json};

/// Environment a test daemon never inherits from the test run: logging overrides and the
/// systemd interfaces (a test that wants one sets it with [`Launch::env`]).
const SCRUBBED_ENV: &[&str] = &[
    "RUST_LOG",
    "JOURNAL_STREAM",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
];

/// A running `chatd` with its own temp dir, config file and admin socket; killed on drop.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    /// The first chat address it listens on (port 0 until it is ready).
    pub addr: SocketAddr,
    /// Every chat address it listens on, as `status` reports them (empty until it is ready).
    pub listen: Vec<SocketAddr>,
    /// Every TLS address it listens on (`tls_listen` in `status`; empty without `[tls]`).
    pub tls_listen: Vec<SocketAddr>,
    /// Every web (HTTP/WebSocket) address it listens on (`web_listen` in `status`; empty
    /// without `[web]`).
    pub web_listen: Vec<SocketAddr>,
    pub config_path: PathBuf,
    pub socket: PathBuf,
    pub log_path: PathBuf,
}

/// A daemon about to be started: its directory, config text and extra environment.
pub struct Launch {
    dir: tempfile::TempDir,
    text: String,
    env: Vec<(OsString, OsString)>,
}

impl Launch {
    /// Sets an environment variable for the daemon.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Launch {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts the daemon and waits until it is ready.
    pub fn start(self) -> TestDaemon {
        let mut d = self.spawn();
        d.wait_ready();
        d
    }

    /// Starts the daemon without waiting (for a test that watches it come up); call
    /// [`TestDaemon::wait_ready`] before using `addr`.
    pub fn spawn(self) -> TestDaemon {
        let config_path = self.dir.path().join("chatd.toml");
        std::fs::write(&config_path, &self.text).expect("write config");
        let socket = admin_socket_of(&self.text)
            .unwrap_or_else(|| panic!("a test config must set admin.socket:\n{}", self.text));
        // The other programs are built on first use; do it before the daemon runs, so no test
        // that calls chatctl soon after a start waits for a build meanwhile.
        let _ = bin("chatctl");
        let log_path = self.dir.path().join("chatd.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(bin("chatd"));
        cmd.arg("--config").arg(&config_path);
        for key in SCRUBBED_ENV {
            cmd.env_remove(key);
        }
        let child = cmd
            .env("NO_COLOR", "1")
            .envs(self.env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn chatd");
        TestDaemon {
            dir: self.dir,
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            listen: Vec::new(),
            tls_listen: Vec::new(),
            web_listen: Vec::new(),
            config_path,
            socket,
            log_path,
        }
    }
}

impl TestDaemon {
    /// The default test config plus `extra` (whole sections), for `socket`, as text.
    pub fn config_text(socket: &Path, extra: &str) -> String {
        Config::test()
            .admin_socket(socket)
            .state_dir(&socket.with_file_name("state"))
            .raw(extra)
            .to_string()
    }

    /// Starts a daemon with the default test config plus `extra` (whole sections).
    pub fn start(extra: &str) -> TestDaemon {
        TestDaemon::start_config(Config::test().raw(extra))
    }

    /// Starts a daemon on `config` (see [`TestDaemon::with`]).
    pub fn start_config(config: Config) -> TestDaemon {
        TestDaemon::with(config).start()
    }

    /// A daemon to start on `config`, in a fresh temp dir that holds its admin socket and state
    /// unless `config` puts them elsewhere.
    pub fn with(config: Config) -> Launch {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = config.with_paths_in(dir.path()).to_string();
        Launch {
            dir,
            text,
            env: Vec::new(),
        }
    }

    /// Starts `n` daemons at once, daemon `i` on `config(i)`; returns once all are ready.
    pub fn start_many(n: usize, mut config: impl FnMut(usize) -> Config) -> Vec<TestDaemon> {
        TestDaemon::launch_many((0..n).map(|i| TestDaemon::with(config(i))))
    }

    /// Starts every daemon in `launches` at once; returns once all are ready.
    pub fn launch_many(launches: impl IntoIterator<Item = Launch>) -> Vec<TestDaemon> {
        let mut daemons: Vec<TestDaemon> = launches.into_iter().map(Launch::spawn).collect();
        for d in &mut daemons {
            d.wait_ready();
        }
        daemons
    }

    /// Starts a daemon on exactly this config text (written to `dir/chatd.toml`); it must set
    /// `admin.socket`.
    pub fn start_with_text(dir: tempfile::TempDir, text: &str) -> TestDaemon {
        Launch {
            dir,
            text: text.to_owned(),
            env: Vec::new(),
        }
        .start()
    }

    /// Waits until this daemon answers `status` on its admin socket (it is serving its
    /// listeners by then) and notes the addresses it reports. Panics with the log if it exits
    /// first.
    pub fn wait_ready(&mut self) {
        let want = self.config_path.display().to_string();
        let log_path = self.log_path.clone();
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        let (child, socket) = (&mut self.child, &self.socket);
        let listen = wait_for(
            WAIT,
            "chatd to answer `status` on its admin socket",
            || {
                if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    panic!("chatd exited early ({status}):\n{}", log());
                }
                let v = admin_request(socket, "status").ok()?;
                let s = &v["response"];
                // Another daemon on the same socket is not this one.
                let addrs = |key: &str| {
                    s[key]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a.as_str()?.parse::<SocketAddr>().ok())
                        .collect::<Vec<_>>()
                };
                (s["config_path"].as_str() == Some(want.as_str()))
                    .then(|| (addrs("listen"), addrs("tls_listen"), addrs("web_listen")))
            },
            log,
        );
        let (listen, tls_listen, web_listen) = listen;
        self.addr = *listen.first().expect("a ready chatd listens somewhere");
        self.listen = listen;
        self.tls_listen = tls_listen;
        self.web_listen = web_listen;
    }

    /// The first web address (the daemon must have a `[web]` table).
    pub fn web_addr(&self) -> SocketAddr {
        *self
            .web_listen
            .first()
            .unwrap_or_else(|| panic!("this chatd has no web listener:\n{}", self.log()))
    }

    /// The first TLS address (the daemon must have a `[tls]` table).
    pub fn tls_addr(&self) -> SocketAddr {
        *self
            .tls_listen
            .first()
            .unwrap_or_else(|| panic!("this chatd has no TLS listener:\n{}", self.log()))
    }

    /// The listener on `ip` (of a daemon listening on several).
    pub fn addr_on(&self, ip: std::net::IpAddr) -> SocketAddr {
        self.listen
            .iter()
            .copied()
            .find(|a| a.ip() == ip)
            .unwrap_or_else(|| panic!("no listener on {ip}: {:?}", self.listen))
    }

    /// `status` from the admin socket, as chatctl `--json` prints it.
    pub fn status(&self) -> serde_json::Value {
        admin_request(&self.socket, "status").expect("status over the admin socket")
    }

    /// `status`'s `cluster` object (null for a single node).
    pub fn cluster_status(&self) -> serde_json::Value {
        self.status()["response"]["cluster"].clone()
    }

    /// Waits until this cluster node says it follows the room (`cluster.ready`); panics with
    /// its status and log if it does not within [`WAIT`].
    pub fn wait_cluster_ready(&self) {
        let last = std::cell::RefCell::new(serde_json::Value::Null);
        wait_for(
            WAIT,
            "the cluster node to be ready",
            || {
                let c = admin_request(&self.socket, "status").ok()?["response"]["cluster"].clone();
                let ready = c["ready"] == true;
                *last.borrow_mut() = c;
                ready.then_some(())
            },
            || format!("last cluster status: {}\n{}", last.borrow(), self.log()),
        );
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

    /// Rewrites the config file as the default test config plus `extra` (for reload tests).
    pub fn write_config(&self, extra: &str) {
        std::fs::write(&self.config_path, self.config_with(extra)).expect("write");
    }

    /// The text [`TestDaemon::write_config`] writes.
    pub fn config_with(&self, extra: &str) -> String {
        TestDaemon::config_text(&self.socket, extra)
    }

    /// `config` as this daemon's file: with its admin socket and state dir unless it sets
    /// them.
    pub fn render(&self, config: Config) -> String {
        let mut config = config;
        if config.get("admin", "socket").is_none() {
            config = config.admin_socket(&self.socket);
        }
        if config.get("server", "state-dir").is_none() {
            config = config.state_dir(&self.socket.with_file_name("state"));
        }
        config.to_string()
    }

    /// Rewrites the config file as `config` (see [`TestDaemon::render`]).
    pub fn write(&self, config: Config) {
        std::fs::write(&self.config_path, self.render(config)).expect("write config");
    }

    /// The config file as it is now.
    pub fn config(&self) -> Config {
        Config::parse(&std::fs::read_to_string(&self.config_path).expect("read config"))
    }

    /// Rewrites the config file through `edit` (for reload tests).
    pub fn edit_config(&self, edit: impl FnOnce(Config) -> Config) {
        self.write(edit(self.config()));
    }

    /// Sends SIGHUP and waits until one more "config reloaded" line is logged; returns it.
    pub fn sighup_reload(&self) -> String {
        let reloaded = |log: &str| -> Vec<String> {
            log.lines()
                .filter(|l| l.contains("config reloaded"))
                .map(str::to_owned)
                .collect()
        };
        let before = reloaded(&self.log()).len();
        self.signal(nix::sys::signal::Signal::SIGHUP);
        wait_for(
            WAIT,
            "reload to be logged",
            || reloaded(&self.log()).get(before).cloned(),
            || self.log(),
        )
    }

    /// Waits for the daemon to exit and returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        match wait_child(&mut child, WAIT) {
            Some(status) => status.code(),
            None => panic!("chatd did not exit in time:\n{}", self.log()),
        }
    }

    /// Kills the daemon at once (SIGKILL: no goodbye to anyone) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill chatd");
            child.wait().expect("reap chatd");
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

    /// Joins `first`, then `second`; returns both once `first` has seen `second` join.
    pub fn pair(&self, first: &str, second: &str) -> (Client, Client) {
        let mut a = self.join(first);
        let b = self.join(second);
        a.expect_prefix(&format!("*** JOIN {second}"));
        (a, b)
    }

    /// Connects and takes `name`; returns right after the welcome, so the MOTD and history are
    /// the next lines read.
    pub fn enter(&self, name: &str) -> Client {
        Client::connect_as(self.addr, name)
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

    /// Runs `chatctl --json ARGS`, asserts it succeeded, and returns its answer.
    pub fn chatctl_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.chatctl(&[&["--json"], args].concat());
        assert!(out.status.success(), "{out:?}");
        json(&out)
    }

    /// The users `chatctl --json list` shows, one JSON object each (name, node, transport...).
    pub fn users(&self) -> Vec<serde_json::Value> {
        self.chatctl_json(&["list"])["response"]["users"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// Lines of a daemon's log a failing test prints (its end: what led up to the failure).
const LOG_TAIL: usize = 80;

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A test that panics drops its daemons while unwinding: their logs go with the
        // failure's report (the harness shows what the test printed), so a failure seen once,
        // under CI's load, can still be read afterwards.
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(LOG_TAIL);
            eprintln!(
                "---- log of the chatd on {} (last {} of {} lines)\n{}",
                self.addr,
                lines.len() - from,
                lines.len(),
                lines[from..].join("\n")
            );
        }
    }
}

/// Sends one admin request (`{"cmd": cmd}`) on `socket` and returns the answer, as chatctl
/// `--json` prints it; reads and writes are bounded by [`WAIT`].
pub fn admin_request(socket: &Path, cmd: &str) -> std::io::Result<serde_json::Value> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(WAIT))?;
    s.set_write_timeout(Some(WAIT))?;
    let request = serde_json::json!({"version": 1, "request": {"cmd": cmd}});
    s.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}
