//! SIGHUP reloads every live key without dropping anyone; a bad reload changes nothing;
//! SIGTERM and SIGINT shut down gracefully.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::helper::{Config, TestDaemon, WAIT, require, wait_until};

/// Rewrites the config with `extra`, sends SIGHUP, and waits for the reload to be logged.
fn reload(d: &TestDaemon, extra: &str, expect_key: &str) {
    d.write_config(extra);
    let last = d.sighup_reload();
    assert!(last.contains(expect_key), "{expect_key} not in {last}");
}

#[test]
fn sighup_applies_motd_without_dropping_anyone() {
    let d = TestDaemon::start("[room]\nmotd = \"old\"\n");
    let mut a = d.join("alice");
    reload(
        &d,
        "[room]\nmotd = \"new and shiny\"\n",
        "applied: room.motd",
    );
    let mut c = d.enter("carol");
    assert_eq!(c.line(), "*** MOTD new and shiny");
    a.expect_prefix("*** JOIN carol");
    a.send("still connected");
    assert_eq!(c.expect_prefix("alice:"), "alice: still connected");
}

#[test]
fn sighup_with_bad_config_keeps_the_old_one() {
    let d = TestDaemon::start("[room]\nmotd = \"kept\"\n");
    let mut a = d.join("alice");
    d.write_config("[room]\nmotd = \"x\"\nbogus = 1\n");
    d.signal(Signal::SIGHUP);
    d.wait_log("config reload failed");
    let line = d
        .log()
        .lines()
        .find(|l| l.contains("config reload failed"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        line.contains(&format!("{}:", d.config_path.display())) && line.contains("bogus"),
        "{line}"
    );
    let mut c = d.enter("carol");
    assert_eq!(c.line(), "*** MOTD kept");
    a.send("/who");
    assert_eq!(a.expect_prefix("*** WHO"), "*** WHO 2 alice carol");
}

#[test]
fn sighup_applies_history_and_name_rules() {
    let d = TestDaemon::start("[room]\nhistory = 5\n");
    let mut a = d.join("alice");
    a.send("remember me");
    reload(
        &d,
        "[room]\nhistory = 0\n[names]\nmax-length = 4\nreserved = [\"Eve\"]\n",
        "room.history",
    );
    let mut c = d.connect();
    c.expect_prefix("*** HELLO");
    c.send("carol");
    assert!(
        c.line()
            .starts_with("*** ERR name-invalid a name may have at most 4 characters")
    );
    c.send("eve");
    assert!(c.line().starts_with("*** ERR name-reserved"));
    c.send("cat");
    c.expect_prefix("*** WELCOME cat");
    c.send("/who");
    let next = c.expect_prefix("*** ");
    assert!(
        next.starts_with("*** MOTD") || next.starts_with("*** WHO"),
        "no history: {next}"
    );
}

#[test]
fn sighup_applies_limits() {
    let d = TestDaemon::start("");
    let (mut a, mut b) = d.pair("alice", "bob");
    reload(
        &d,
        "[limits]\nmax-line-length = 20\nmax-clients = 2\nname-timeout = \"300ms\"\n",
        "limits.max-clients",
    );
    // Applies to sessions already connected.
    b.send("this line is longer than twenty bytes");
    assert!(
        b.line()
            .starts_with("*** ERR line-too-long line longer than 20 bytes")
    );
    let mut c = d.connect();
    assert!(c.line().starts_with("*** ERR server-full"));
    drop(b);
    a.expect_prefix("*** LEAVE bob");
    reload(
        &d,
        "[limits]\nmax-line-length = 20\nname-timeout = \"300ms\"\n",
        "limits.max-clients",
    );
    let mut e = d.connect();
    e.expect_prefix("*** HELLO");
    assert!(
        e.until_eof()
            .iter()
            .any(|l| l.starts_with("*** ERR name-timeout"))
    );
}

/// Edits the config with `edit`, sends SIGHUP and waits until the reload is logged.
fn reload_edit(d: &TestDaemon, edit: impl FnOnce(Config) -> Config) {
    d.edit_config(edit);
    d.sighup_reload();
}

#[test]
fn sighup_applies_partial_line_flush() {
    let d = TestDaemon::start("");
    // Start with a flush pause far longer than this test waits.
    reload_edit(&d, |c| c.set_str("server", "partial-line-flush", "1h"));
    let mut w = d.join("watcher");
    let mut seed = d.connect();
    seed.expect_prefix("*** HELLO");
    seed.send_raw(b"pyuser");
    w.assert_silent(Duration::from_millis(400));
    reload_edit(&d, |c| c.set_str("server", "partial-line-flush", "50ms"));
    // The new pause is used from the next read on.
    seed.send_raw(b"X");
    assert_eq!(w.expect_prefix("*** JOIN"), "*** JOIN pyuserX joined");
}

#[test]
fn sighup_applies_admin_mode_group_and_log_level() {
    let d = TestDaemon::start("");
    assert_eq!(
        std::fs::metadata(&d.socket)
            .map(|m| m.permissions().mode() & 0o777)
            .ok(),
        Some(0o660)
    );
    assert!(!d.log().contains("DEBUG"));
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(0))
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| "root".into());
    d.edit_config(|c| {
        c.set("admin", "mode", "0o600")
            .set_str("admin", "group", &group)
            .set_str("log", "level", "debug")
    });
    d.signal(Signal::SIGHUP);
    d.wait_log("admin.mode");
    let meta = std::fs::metadata(&d.socket).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.gid(), 0);
    let _c = d.join("dana");
    d.wait_log("DEBUG");
}

#[test]
fn sighup_applies_shutdown_grace() {
    let d = TestDaemon::start_config(Config::test().no_rate_limit().set(
        "limits",
        "max-queue-bytes",
        "1073741824",
    ));
    d.edit_config(|c| c.set_str("server", "shutdown-grace", "700ms"));
    d.signal(Signal::SIGHUP);
    d.wait_log("server.shutdown-grace");
    // A member that never reads keeps output pending, so shutdown must give up after the grace.
    let _stalled = d.join("stalled");
    let mut talker = d.join("talker");
    let line = "z".repeat(2000);
    for _ in 0..5000 {
        talker.send(&line);
    }
    talker.send("/who");
    talker.expect_prefix("*** WHO");
    let mut d = d;
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(), Some(0));
    let log = d.log();
    assert!(
        log.contains("did not drain in time") && log.contains("grace=700ms"),
        "{log}"
    );
}

#[test]
fn sigterm_tells_users_removes_socket_and_exits_zero() {
    let mut d = TestDaemon::start("");
    let mut a = d.join("alice");
    let mut others: Vec<_> = (0..5).map(|i| d.join(&format!("u{i}"))).collect();
    a.send("/who");
    a.expect_prefix("*** WHO 6 ");
    let mut naming = d.connect();
    naming.expect_prefix("*** HELLO");
    assert!(d.socket.exists());
    d.signal(Signal::SIGTERM);
    // Exactly one line each: those leaving at the same time are not announced to each other.
    assert_eq!(
        a.until_eof(),
        vec!["*** SHUTDOWN the server is stopping, goodbye"]
    );
    for o in &mut others {
        let rest: Vec<_> = o
            .until_eof()
            .into_iter()
            .filter(|l| !l.starts_with("*** JOIN"))
            .collect();
        assert_eq!(rest, vec!["*** SHUTDOWN the server is stopping, goodbye"]);
    }
    assert_eq!(
        naming.until_eof(),
        vec!["*** SHUTDOWN the server is stopping, goodbye"]
    );
    assert_eq!(d.wait_exit(), Some(0));
    assert!(!d.socket.exists(), "admin socket removed on exit");
    assert!(d.log().contains("stopped"));
}

#[test]
fn sigint_also_shuts_down_gracefully() {
    let mut d = TestDaemon::start("");
    let mut a = d.join("alice");
    a.send("queued before shutdown");
    d.signal(Signal::SIGINT);
    assert!(
        a.until_eof()
            .last()
            .is_some_and(|l| l.starts_with("*** SHUTDOWN"))
    );
    assert_eq!(d.wait_exit(), Some(0));
}

#[test]
fn stale_socket_is_replaced_and_live_one_is_not_stolen() {
    let d = TestDaemon::start("");
    // A second daemon on the same admin socket must refuse to start.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("second.toml");
    std::fs::write(&path, d.render(Config::test())).expect("write");
    let out = std::process::Command::new(crate::helper::bin("chatd"))
        .arg("--config")
        .arg(&path)
        .env("NO_COLOR", "1")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another chatd is already running"));
    assert_eq!(
        d.chatctl(&["status"]).status.code(),
        Some(0),
        "first daemon unaffected"
    );

    // A socket file left by a crashed daemon is replaced.
    let mut d = d;
    d.signal(Signal::SIGKILL);
    let _ = d.wait_exit();
    assert!(d.socket.exists(), "SIGKILL leaves the socket file behind");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d2 = TestDaemon::start_with_text(dir, &d.render(Config::test()));
    d2.socket = d.socket.clone();
    d2.wait_log("replaced a stale admin socket");
    assert_eq!(d2.chatctl(&["status"]).status.code(), Some(0));
}

#[test]
fn sighup_applies_flood_limits_to_connected_sessions() {
    let d = TestDaemon::start(crate::helper::NO_RATE_LIMIT);
    let (mut a, mut b) = d.pair("alice", "bob");
    let burst: String = (0..15).map(|k| format!("before {k}\n")).collect();
    b.send_raw(burst.as_bytes());
    for k in 0..15 {
        assert_eq!(a.line(), format!("bob: before {k}"));
    }
    reload(
        &d,
        "[limits]\nmessage-rate = 1\nmessage-burst = 2\nflood-disconnect = 3\n",
        "limits.message-rate",
    );
    let burst: String = (0..15).map(|k| format!("after {k}\n")).collect();
    b.send_raw(burst.as_bytes());
    let replies = b.until_eof();
    assert!(
        replies
            .iter()
            .any(|l| l.starts_with("*** ERR rate-limited ")),
        "{replies:?}"
    );
    assert!(
        replies
            .last()
            .is_some_and(|l| l.starts_with("*** ERR flooding ") && l.contains("3 lines")),
        "{replies:?}"
    );
}

#[test]
fn sighup_applies_the_per_address_limit_to_new_connections() {
    let d = TestDaemon::start("[limits]\nmax-connections-per-ip = 5\n");
    let mut a = d.join("alice");
    let _b = d.join("bob");
    reload(
        &d,
        "[limits]\nmax-connections-per-ip = 2\n",
        "limits.max-connections-per-ip",
    );
    let mut c = d.connect();
    assert!(c.line().starts_with("*** ERR too-many-connections "));
    // Those already connected stay.
    a.send("/who");
    assert_eq!(a.expect_prefix("*** WHO"), "*** WHO 2 alice bob");
}

/// The keepalive timer the kernel runs for chatd's side of the connection from `client_port`,
/// in seconds, as `ss` reports it (`timer:(keepalive,59sec,0)`).
fn keepalive_timer(server_port: u16, client_port: u16) -> Option<f64> {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .arg(format!(
            "( sport = :{server_port} and dport = :{client_port} )"
        ))
        .output()
        .expect("run ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let timer = text.split("timer:(keepalive,").nth(1)?;
    let value = timer.split(',').next()?;
    // "59sec", "1min59sec" or "500ms".
    let mut secs = 0.0;
    let mut num = String::new();
    let mut unit = String::new();
    for ch in value.chars().chain(std::iter::once('0')) {
        if ch.is_ascii_digit() || ch == '.' {
            if !unit.is_empty() {
                let n: f64 = num.parse().ok()?;
                secs += match unit.as_str() {
                    "min" => n * 60.0,
                    "sec" => n,
                    "ms" => n / 1000.0,
                    _ => return None,
                };
                num.clear();
                unit.clear();
            }
            num.push(ch);
        } else {
            unit.push(ch);
        }
    }
    Some(secs)
}

#[test]
fn sighup_applies_keepalive_to_new_connections() {
    if !require("ss", "apt-get install iproute2") {
        return;
    }
    let d = TestDaemon::start("");
    let a = d.join("alice");
    let port = |c: &crate::helper::Client| c.stream().local_addr().map(|a| a.port()).unwrap_or(0);
    let mut before = None;
    wait_until(WAIT, "a keepalive timer on the first connection", || {
        before = keepalive_timer(d.addr.port(), port(&a));
        before.is_some()
    });
    assert!(before.unwrap_or(0.0) > 30.0, "default 60s: {before:?}");
    reload(&d, "[limits]\nkeepalive = \"7s\"\n", "limits.keepalive");
    let b = d.join("bob");
    let mut after = None;
    wait_until(WAIT, "a keepalive timer on the new connection", || {
        after = keepalive_timer(d.addr.port(), port(&b));
        after.is_some()
    });
    assert!(after.unwrap_or(99.0) <= 7.0, "{after:?}");
}
