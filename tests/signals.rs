//! SIGHUP reloads every live key without dropping anyone; a bad reload changes nothing;
//! SIGTERM and SIGINT shut down gracefully.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::helper::{TestDaemon, WAIT, wait_until};

/// Rewrites the config with `extra`, sends SIGHUP, and waits for the reload to be logged.
fn reload(d: &TestDaemon, extra: &str, expect_key: &str) {
    let before = d.log().matches("config reloaded").count();
    d.write_config(extra);
    d.signal(Signal::SIGHUP);
    wait_until(WAIT, "reload to be logged", || {
        d.log().matches("config reloaded").count() > before
    });
    let last = d
        .log()
        .lines()
        .rev()
        .find(|l| l.contains("config reloaded"))
        .unwrap_or_default()
        .to_owned();
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
    let mut c = d.connect();
    c.expect_prefix("*** HELLO");
    c.send("carol");
    c.expect_prefix("*** WELCOME");
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
    let mut c = d.connect();
    c.expect_prefix("*** HELLO");
    c.send("carol");
    c.expect_prefix("*** WELCOME");
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
    let mut a = d.join("alice");
    let mut b = d.join("bob");
    a.expect_prefix("*** JOIN bob");
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

/// Edits the config file text with `edit`, sends SIGHUP and waits until the reload is logged.
fn reload_edit(d: &TestDaemon, edit: impl FnOnce(String) -> String) {
    let before = d.log().matches("config reloaded").count();
    let text = std::fs::read_to_string(&d.config_path).unwrap_or_default();
    std::fs::write(&d.config_path, edit(text)).expect("write config");
    d.signal(Signal::SIGHUP);
    wait_until(WAIT, "reload to be logged", || {
        d.log().matches("config reloaded").count() > before
    });
}

#[test]
fn sighup_applies_partial_line_flush() {
    let d = TestDaemon::start("");
    // Start with a flush pause far longer than this test waits.
    reload_edit(&d, |t| t.replace("\"150ms\"", "\"1h\""));
    let mut w = d.join("watcher");
    let mut seed = d.connect();
    seed.expect_prefix("*** HELLO");
    seed.send_raw(b"pyuser");
    w.assert_silent(Duration::from_millis(400));
    reload_edit(&d, |t| t.replace("\"1h\"", "\"50ms\""));
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
    let text = std::fs::read_to_string(&d.config_path).unwrap_or_default();
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(0))
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| "root".into());
    let new = text
        .replace("mode = 0o660", "mode = 0o600")
        .replace("group = \"\"", &format!("group = \"{group}\""))
        + "[log]\nlevel = \"debug\"\n";
    std::fs::write(&d.config_path, new).ok();
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
    let d = TestDaemon::start(
        "[limits]\nmax-queue-bytes = 1073741824\nmessage-rate = 1000000\nmessage-burst = 1000000\n",
    );
    let text = std::fs::read_to_string(&d.config_path).unwrap_or_default();
    std::fs::write(
        &d.config_path,
        text.replace("shutdown-grace = \"3s\"", "shutdown-grace = \"700ms\""),
    )
    .ok();
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
    let mut naming = d.connect();
    naming.expect_prefix("*** HELLO");
    assert!(d.socket.exists());
    d.signal(Signal::SIGTERM);
    assert_eq!(
        a.until_eof(),
        vec!["*** SHUTDOWN the server is stopping, goodbye"]
    );
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
    let text = TestDaemon::config_text(&d.socket, "");
    let path = dir.path().join("second.toml");
    std::fs::write(&path, text).expect("write");
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
    let mut d2 = TestDaemon::start_with_text(dir, &TestDaemon::config_text(&d.socket, ""));
    d2.socket = d.socket.clone();
    d2.wait_log("replaced a stale admin socket");
    assert_eq!(d2.chatctl(&["status"]).status.code(), Some(0));
}
