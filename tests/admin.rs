//! Every chatctl command against a live daemon, plus the admin socket's own defences.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};

use crate::helper::{Config, TestDaemon, WAIT, bin, json, require, require_root, wait_until};

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn list_shows_users_as_table_and_json() {
    let d = TestDaemon::start("");
    let out = d.chatctl(&["list"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "no users online\n");

    let _a = d.join("alice");
    let _b = d.join("bob");
    let out = d.chatctl(&["list"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("NAME "), "{text}");
    assert!(
        lines[0].contains("ADDRESS")
            && lines[0].contains("CONNECTED SINCE")
            && lines[0].contains("IDLE")
    );
    assert!(
        lines[1].starts_with("alice ") && lines[1].contains("127.0.0.1:"),
        "{text}"
    );
    assert!(lines[2].starts_with("bob "), "{text}");
    assert_eq!(lines[3], "2 users online");

    let v = json(&d.chatctl(&["list", "--json"]));
    assert_eq!(v["version"], 1);
    assert_eq!(v["response"]["type"], "users");
    let users = v["response"]["users"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(users.len(), 2);
    assert_eq!(users[0]["name"], "alice");
    assert!(
        users[0]["addr"]
            .as_str()
            .unwrap_or("")
            .starts_with("127.0.0.1:")
    );
    assert!(users[0]["connected_since"].as_u64().unwrap_or(0) > 1_700_000_000);
    assert!(users[0]["idle_secs"].is_u64());
}

#[test]
fn kick_tells_the_user_and_the_room() {
    let d = TestDaemon::start("");
    let (mut alice, mut bob) = d.pair("alice", "bob");

    let out = d.chatctl(&["kick", "BOB", "--reason", "flooding the room"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("kicked bob (127.0.0.1:"),
        "{}",
        stdout(&out)
    );
    assert_eq!(bob.line(), "*** KICKED flooding the room");
    assert_eq!(bob.try_line(), None, "kicked user is disconnected");
    assert_eq!(alice.line(), "*** KICK bob was kicked (flooding the room)");
    d.wait_log("user kicked");

    let out = d.chatctl(&["kick", "bob"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(
        stderr(&out).contains("no user named \"bob\" is online"),
        "{}",
        stderr(&out)
    );
    let v = json(&d.chatctl(&["kick", "nobody", "--json"]));
    assert_eq!(v["response"]["type"], "error");
    assert_eq!(v["response"]["code"], "no-such-user");
}

#[test]
fn announce_reaches_everyone_as_a_notice() {
    let d = TestDaemon::start("");
    let (mut a, mut b) = d.pair("alice", "bob");
    let out = d.chatctl(&["announce", "maintenance", "at", "noon"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "announced to 2 users\n");
    assert_eq!(a.line(), "*** NOTICE maintenance at noon");
    assert_eq!(b.line(), "*** NOTICE maintenance at noon");

    let out = d.chatctl(&["announce", "  "]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "empty text is an invalid argument"
    );
    let out = d.chatctl(&["announce", "two\nlines"]);
    assert_eq!(out.status.code(), Some(6));
    assert!(stderr(&out).contains("single line"));
}

#[test]
fn status_reports_counters_and_addresses() {
    let d = TestDaemon::start("");
    let mut a = d.join("alice");
    let _b = d.join("bob");
    a.send("hello");
    a.send("/who");
    a.expect_prefix("*** WHO");
    let v = json(&d.chatctl(&["status", "--json"]));
    let s = &v["response"];
    assert_eq!(s["type"], "status");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["users"], 2);
    assert_eq!(s["connections"], 2);
    assert_eq!(s["messages"], 1);
    assert_eq!(s["deliveries"].as_u64().map(|n| n >= 1), Some(true));
    assert_eq!(s["listen"][0], d.addr.to_string());
    assert_eq!(s["config_path"], d.config_path.display().to_string());
    assert_eq!(s["admin_socket"], d.socket.display().to_string());

    let out = d.chatctl(&["status"]);
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!("chatd {} up ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(
        text.contains(&format!("listening on:     {}", d.addr)),
        "{text}"
    );
    assert!(text.contains("users:            2"), "{text}");
}

#[test]
fn memory_a_drained_burst_left_behind_is_given_back_and_reported() {
    // One reader stops reading while 32 MB of messages queue up for it, then reads them all.
    // Once they are written and freed, the allocator holds far more than the trim threshold
    // free, and within a few checks the daemon gives it back and says so in `status`.
    let d = TestDaemon::start_config(Config::test().no_rate_limit().section(
        "limits",
        [("max-queue-bytes", "67108864"), ("max-line-length", "8192")],
    ));
    let (mut sender, mut reader) = d.pair("sender", "reader");
    let before = json(&d.chatctl(&["status", "--json"]));
    let m = &before["response"]["memory"];
    assert!(m["rss_bytes"].as_u64().is_some_and(|b| b > 0), "{m}");
    assert_eq!(m["trims"], 0, "{m}");

    let pad = "x".repeat(4000);
    let count = 8000;
    for k in 0..count {
        sender.send(&format!("{k} {pad}"));
    }
    for k in 0..count {
        assert_eq!(reader.line(), format!("sender: {k} {pad}"));
    }
    let mut last = serde_json::Value::Null;
    wait_until(WAIT, "a trim after the burst drained", || {
        last = json(&d.chatctl(&["status", "--json"]));
        last["response"]["memory"]["trims"].as_u64() >= Some(1)
    });
    let m = &last["response"]["memory"];
    assert!(m["trimmed_bytes"].as_u64().is_some_and(|b| b > 0), "{m}");
    let text = stdout(&d.chatctl(&["status"]));
    assert!(text.contains("memory:           "), "{text}");
    assert!(text.contains(" trims gave back "), "{text}");
}

#[test]
fn reload_reports_applied_and_restart_keys_or_the_error() {
    let d = TestDaemon::start("");
    d.write_config("[room]\nmotd = \"new motd\"\n");
    let out = d.chatctl(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "config reloaded\napplied: room.motd\nneeds restart: nothing\n"
    );

    // A listen change cannot apply live and is reported as such.
    d.edit_config(|c| c.listen(&["127.0.0.1:1"]));
    let v = json(&d.chatctl(&["reload", "--json"]));
    assert_eq!(v["response"]["type"], "reloaded");
    assert_eq!(v["response"]["needs_restart"][0], "server.listen");

    d.write_config("[room]\nmotd = 5\n");
    let out = d.chatctl(&["reload"]);
    assert_eq!(out.status.code(), Some(7));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}:", d.config_path.display())) && err.contains("invalid type"),
        "{err}"
    );
    // The old config still runs.
    let mut c = d.enter("carol");
    assert_eq!(c.line(), "*** MOTD new motd");
}

#[test]
fn daemon_not_running_is_a_distinct_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.sock");
    let out = Command::new(bin("chatctl"))
        .arg("--socket")
        .arg(&missing)
        .arg("status")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("chatd is not running"),
        "{}",
        stderr(&out)
    );

    // A stale socket file with nobody listening is the same case.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let out = Command::new(bin("chatctl"))
        .arg("--socket")
        .arg(&stale)
        .arg("list")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
}

/// Sends raw bytes on the admin socket and returns the first response line.
fn raw_request(d: &TestDaemon, bytes: &[u8]) -> serde_json::Value {
    let mut s = UnixStream::connect(&d.socket).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s.write_all(bytes).expect("write");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("read");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[test]
fn malformed_unknown_and_oversized_requests_get_errors() {
    let d = TestDaemon::start("");
    let v = raw_request(&d, b"this is not json\n");
    assert_eq!(v["response"]["code"], "bad-request");
    let v = raw_request(&d, b"{\"version\":1,\"request\":{\"cmd\":\"explode\"}}\n");
    assert_eq!(v["response"]["code"], "bad-request");
    assert!(
        v["response"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("explode")
    );
    let v = raw_request(&d, b"{\"version\":99,\"request\":{\"cmd\":\"list\"}}\n");
    assert_eq!(v["response"]["code"], "unsupported-version");
    let mut big = vec![b'x'; 200 * 1024];
    big.push(b'\n');
    let v = raw_request(&d, &big);
    assert_eq!(v["response"]["code"], "bad-request");
    assert!(
        v["response"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("larger than")
    );
    // Still serving.
    assert_eq!(d.chatctl(&["list"]).status.code(), Some(0));
}

#[test]
fn a_stuck_admin_client_does_not_block_others() {
    let d = TestDaemon::start("");
    let mut stuck = UnixStream::connect(&d.socket).expect("connect");
    stuck
        .write_all(b"{\"version\":1,")
        .expect("write half a request");
    let out = d.chatctl(&["status"]);
    assert_eq!(out.status.code(), Some(0));
    drop(stuck);
}

/// Runs chatctl as the unprivileged `nobody` user.
fn chatctl_as_nobody(d: &TestDaemon, args: &[&str]) -> Output {
    Command::new(bin("chatctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .expect("run chatctl as nobody")
}

/// Whether this test can run programs as another user: only root can (see `require_root`).
fn running_as_root() -> bool {
    require_root("run chatctl as another user")
}

#[test]
fn unauthorised_users_are_refused_by_the_kernel_and_by_chatd() {
    if !running_as_root() {
        return;
    }
    // Case 1: socket mode 0660 owned by root: the kernel refuses connect().
    let d = TestDaemon::start("");
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = chatctl_as_nobody(&d, &["list"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("permission denied"),
        "{}",
        stderr(&out)
    );
    drop(d);

    // Case 2: a world-writable socket: chatd's peer-credential check refuses.
    let d = TestDaemon::start("");
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d.edit_config(|c| c.set("admin", "mode", "0o666"));
    assert_eq!(d.chatctl(&["reload"]).status.code(), Some(0));
    let out = chatctl_as_nobody(&d, &["kick", "anyone"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("permission denied: uid 65534"),
        "{}",
        stderr(&out)
    );
    d.wait_log("refused admin connection");
}

#[test]
fn a_closed_output_pipe_ends_chatctl_quietly() {
    let d = TestDaemon::start("");
    let _a = d.join("alice");
    // `chatctl list | head -0`: the reader is gone before chatctl writes.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(bin("chatctl"))
        .arg("--socket")
        .arg(&d.socket)
        .arg("list")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run chatctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

/// Runs chatctl as `nobody` with exactly the supplementary `groups` (setpriv, util-linux).
fn chatctl_as_nobody_in(d: &TestDaemon, groups: &str, args: &[&str]) -> Output {
    let group_arg = if groups.is_empty() {
        "--clear-groups".to_owned()
    } else {
        format!("--groups={groups}")
    };
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", &group_arg])
        .arg(bin("chatctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run setpriv")
}

#[test]
fn members_of_the_admin_group_by_supplementary_group_are_served() {
    if !running_as_root() || !require("setpriv", "apt-get install util-linux") {
        return;
    }
    // `users` (gid 100) exists on every Debian system; nobody's primary group is not it.
    let d = TestDaemon::start("");
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d.edit_config(|c| {
        c.set("admin", "mode", "0o666")
            .set_str("admin", "group", "users")
    });
    assert_eq!(d.chatctl(&["reload"]).status.code(), Some(0));
    let member = chatctl_as_nobody_in(&d, "100", &["status"]);
    assert_eq!(member.status.code(), Some(0), "{}", stderr(&member));
    let outsider = chatctl_as_nobody_in(&d, "", &["status"]);
    assert_eq!(outsider.status.code(), Some(4), "{}", stderr(&outsider));
}
