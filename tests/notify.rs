//! Every reload path tells the service manager the same way: `chatctl reload` and SIGHUP each
//! send `RELOADING=1` (with `MONOTONIC_USEC=`, which `Type=notify-reload` needs) and then
//! `READY=1`, also when the new config is rejected. A fake manager is a datagram socket bound
//! in a temporary directory and passed to chatd as `NOTIFY_SOCKET`.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::helper::{TestDaemon, WAIT, bin, wait_child};

/// A chatd started with `NOTIFY_SOCKET` pointing at `manager`; killed on drop.
struct NotifiedDaemon {
    child: Child,
    manager: UnixDatagram,
    socket: std::path::PathBuf,
    log: std::path::PathBuf,
    /// Every datagram received, for failure messages.
    seen: Vec<String>,
}

impl NotifiedDaemon {
    fn start(dir: &Path) -> NotifiedDaemon {
        let notify = dir.join("notify");
        let manager = UnixDatagram::bind(&notify).expect("bind the fake NOTIFY_SOCKET");
        manager
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let socket = dir.join("admin.sock");
        let config = dir.join("chatd.toml");
        std::fs::write(&config, TestDaemon::config_text(&socket, "")).expect("write config");
        let log = dir.join("chatd.log");
        let child = Command::new(bin("chatd"))
            .arg("--config")
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify)
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn chatd");
        NotifiedDaemon {
            child,
            manager,
            socket,
            log,
            seen: Vec::new(),
        }
    }

    /// The next datagram other than a plain `STATUS=` update, within `WAIT`.
    fn next(&mut self) -> String {
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 4096];
        loop {
            assert!(
                Instant::now() < deadline,
                "no notification within {WAIT:?}; saw {:?}; log:\n{}",
                self.seen,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            let Ok(n) = self.manager.recv(&mut buf) else {
                continue;
            };
            let msg = String::from_utf8(buf[..n].to_vec()).expect("UTF-8 datagram");
            self.seen.push(msg.clone());
            if !msg.starts_with("STATUS=") {
                return msg;
            }
        }
    }

    /// Asserts that the next notifications are one reload: `RELOADING=1` with a monotonic
    /// timestamp in the same datagram, then `READY=1`.
    fn expect_reload(&mut self) {
        let reloading = self.next();
        let lines: Vec<&str> = reloading.lines().collect();
        assert_eq!(lines.first(), Some(&"RELOADING=1"), "{:?}", self.seen);
        let usec = lines
            .iter()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .and_then(|v| v.parse::<u64>().ok());
        assert!(
            usec.is_some_and(|u| u > 0),
            "no MONOTONIC_USEC in {reloading:?}"
        );
        let ready = self.next();
        assert!(ready.starts_with("READY=1\n"), "{:?}", self.seen);
    }

    fn chatctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("chatctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run chatctl")
    }
}

impl Drop for NotifiedDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn chatctl_reload_and_sighup_both_notify_reloading_then_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = NotifiedDaemon::start(dir.path());
    let started = d.next();
    assert!(started.starts_with("READY=1\n"), "{started:?}");

    let out = d.chatctl(&["reload"]);
    assert!(
        out.status.success(),
        "chatctl reload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.expect_reload();

    kill(Pid::from_raw(d.child.id() as i32), Signal::SIGHUP).expect("SIGHUP");
    d.expect_reload();

    // A rejected config leaves chatd running on the old one: ready again all the same.
    std::fs::write(
        dir.path().join("chatd.toml"),
        "[room]\nhistory = \"many\"\n",
    )
    .expect("write");
    let out = d.chatctl(&["reload"]);
    assert_eq!(out.status.code(), Some(7), "reload of a broken config");
    d.expect_reload();

    kill(Pid::from_raw(d.child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert!(d.next().starts_with("STOPPING=1"), "{:?}", d.seen);
    let status = wait_child(&mut d.child, WAIT).expect("chatd exits after SIGTERM");
    assert_eq!(status.code(), Some(0));
}
