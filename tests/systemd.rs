//! The systemd contract of the real `chatd` binary, without systemd: a fake service manager
//! listens on an abstract `NOTIFY_SOCKET` and checks every datagram of a daemon's life, and
//! socket activation is driven the way systemd does it (`LISTEN_PID`/`LISTEN_FDS`, fd 3).

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::helper::{Client, Config, FakeManager, TestDaemon, WAIT, bin, wait_child, wait_until};

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The chat port chatd logged ("listening for chat clients ... :PORT"), for the checks that it
/// says where it listens before it says it is ready.
fn logged_port(log: &str) -> Option<u16> {
    log.lines()
        .find(|l| l.contains("listening for chat clients"))
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.trim().parse().ok())
}

fn wait_exit(child: &mut Child) -> Option<i32> {
    match wait_child(child, WAIT) {
        Some(status) => status.code(),
        None => panic!("chatd did not exit in time"),
    }
}

#[test]
fn notifies_ready_reload_status_watchdog_and_stopping() {
    let mut manager = FakeManager::new();
    // A 400 ms watchdog: pings every 200 ms.
    let mut d = TestDaemon::with(Config::test())
        .env("NOTIFY_SOCKET", &manager.name)
        .env("WATCHDOG_USEC", "400000")
        .spawn();
    let pid = Pid::from_raw(d.pid());

    // READY=1 comes once, after the listeners and the admin socket are up.
    let ready = manager.expect("READY=1");
    assert_eq!(ready, "READY=1\nSTATUS=0 users online, 0 connections");
    let text = d.log();
    assert!(
        text.contains("admin socket ready"),
        "READY before admin socket:\n{text}"
    );
    logged_port(&text).expect("port logged before READY");
    let status = d.chatctl(&["status"]);
    assert!(
        status.status.success(),
        "chatctl status right after READY failed: {}\n{}",
        String::from_utf8_lossy(&status.stderr),
        d.log()
    );
    d.wait_ready();
    let addr = d.addr;

    // The status line follows the user count.
    let mut alice = Client::connect_as(addr, "alice");
    let status = manager.expect("STATUS=1 user online");
    assert_eq!(status, "STATUS=1 user online, 1 connection");

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC in one datagram, then READY=1.
    kill(pid, Signal::SIGHUP).expect("SIGHUP");
    let reloading = manager.expect("RELOADING=1");
    let lines: Vec<&str> = reloading.lines().collect();
    assert_eq!(lines.len(), 3, "{reloading:?}");
    assert_eq!(lines[0], "RELOADING=1");
    let usec: u64 = lines[1]
        .strip_prefix("MONOTONIC_USEC=")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(usec > 0);
    assert_eq!(lines[2], "STATUS=Reloading configuration");
    assert_eq!(
        manager.expect("READY=1"),
        "READY=1\nSTATUS=1 user online, 1 connection"
    );
    alice.send("still here");

    // The watchdog was fed all along (400 ms deadline, pinged every 200 ms).
    let pings_before = manager.watchdog_pings;
    wait_until(WAIT, "watchdog pings", || {
        manager.poll_watchdog();
        manager.watchdog_pings >= pings_before + 3
    });

    // SIGTERM: STOPPING=1 before the users are told.
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(
        manager.expect("STOPPING=1"),
        "STOPPING=1\nSTATUS=Shutting down, telling 1 user"
    );
    alice.until_eof();
    assert_eq!(d.wait_exit(), Some(0));
}

#[test]
fn without_notify_socket_nothing_is_sent_and_chatd_runs() {
    // The plain case every other test covers too; here it also must not log notify errors.
    let d = TestDaemon::start("");
    let _a = d.join("alice");
    assert!(!d.log().contains("cannot notify systemd"), "{}", d.log());
}

#[test]
fn socket_activation_serves_the_passed_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("admin.sock");
    // If chatd bound server.listen it would fail: 192.0.2.1 (TEST-NET-1) is not a local address.
    let config = Config::new()
        .listen(&["192.0.2.1:9"])
        .admin_socket(&socket)
        .set_str("admin", "group", "")
        .to_string();
    std::fs::write(dir.path().join("chatd.toml"), &config).expect("write config");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut manager = FakeManager::new();
    // Like systemd: the socket at fd 3, LISTEN_PID = chatd's own pid. The listener goes in as
    // the shell's stdin (the only safe way to hand a child a descriptor), the shell moves it to
    // fd 3 and execs chatd, keeping its pid ($$).
    let log_path = dir.path().join("chatd.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(
            "exec 3<&0 0</dev/null; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=chat \
             exec \"$0\" --config \"$1\"",
        )
        .arg(bin("chatd"))
        .arg(dir.path().join("chatd.toml"))
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .env("NOTIFY_SOCKET", &manager.name)
        .env("NO_COLOR", "1")
        .stdin(Stdio::from(OwnedFd::from(listener)))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn chatd");
    let ready = manager.expect("READY=1");
    assert!(ready.starts_with("READY=1\nSTATUS="), "{ready:?}");
    let text = read(&log_path);
    assert!(text.contains("socket activation"), "{text}");
    assert_eq!(logged_port(&text), Some(addr.port()), "{text}");
    let mut a = Client::connect_as(addr, "alice");
    let mut b = Client::connect_as(addr, "bob");
    a.expect_prefix("*** JOIN bob");
    b.send("hi alice");
    assert_eq!(a.expect_prefix("bob:"), "bob: hi alice");
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(wait_exit(&mut child), Some(0));
}

#[test]
fn sockets_passed_to_another_process_are_ignored() {
    // LISTEN_PID names some other process: chatd must bind server.listen itself.
    let mut d = TestDaemon::with(Config::test())
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .start();
    assert_ne!(d.addr.port(), 0);
    let _a = Client::connect_as(d.addr, "alice");
    assert!(!d.log().contains("socket activation"));
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(), Some(0));
}

/// A service manager that stops reading (its socket buffer full) costs notifications, never the
/// daemon: chatd keeps answering while its watchdog pings have nowhere to go.
#[test]
fn a_manager_that_stops_reading_never_stalls_the_daemon() {
    let manager = FakeManager::new();
    manager.shrink_buffer();
    let d = TestDaemon::with(Config::test())
        .env("NOTIFY_SOCKET", &manager.name)
        .env("WATCHDOG_USEC", "100000")
        .start();
    // Pings every 50 ms: the tiny buffer is full long before this.
    std::thread::sleep(Duration::from_millis(600));
    for _ in 0..3 {
        let started = Instant::now();
        let out = d.chatctl(&["status"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "status took {:?}",
            started.elapsed()
        );
        let mut c = d.join("still");
        c.send("/quit");
    }
    drop(manager);
}
