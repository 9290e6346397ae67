//! The TLS listener (`[tls]`) with the real daemon: TLS and plaintext users in one room, the
//! same caps before the handshake, bad handshakes closed within their bound and counted,
//! certificate rotation on SIGHUP without dropping anyone, bad certificates refused at reload
//! and at start, and interoperability with `openssl s_client` and `chat-client --tls`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::helper::tls::peer_leaf;
use crate::helper::{Pki, TestDaemon, WAIT, bin, require, wait_for};

/// A CA in a temp dir, a valid leaf, and a daemon serving it on TLS and plain TCP.
fn tls_daemon(extra: &str) -> (tempfile::TempDir, Pki, TestDaemon) {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "chatd test CA");
    let (cert, key, _) = pki.leaf("server");
    let d = TestDaemon::with(Pki::config(&cert, &key).raw(extra)).start();
    (dir, pki, d)
}

fn counter(d: &TestDaemon, name: &str) -> u64 {
    d.status()["response"]["limits"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

#[test]
fn tls_and_plaintext_users_chat_both_ways_and_are_told_of_shutdown() {
    let (_dir, pki, mut d) = tls_daemon("");
    let mut tess = pki.join(d.tls_addr(), "tess");
    let mut paul = d.join("paul");
    tess.expect_prefix("*** JOIN paul joined");
    paul.send("hello from tcp");
    assert_eq!(tess.expect_prefix("paul:"), "paul: hello from tcp");
    tess.send("hello from tls");
    assert_eq!(paul.expect_prefix("tess:"), "tess: hello from tls");
    tess.send("/me waves");
    assert_eq!(paul.expect_prefix("* tess"), "* tess waves");

    // chatctl list says who is on TLS.
    let users = d.chatctl_json(&["list"]);
    let transport = |name: &str| {
        users["response"]["users"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|u| u["name"] == name)
            .map(|u| u["transport"].clone())
    };
    assert_eq!(transport("tess"), Some("tls".into()));
    assert_eq!(transport("paul"), Some("tcp".into()));
    let text = String::from_utf8_lossy(&d.chatctl(&["list"]).stdout).into_owned();
    assert!(
        text.contains("TRANSPORT") && text.contains(" tls "),
        "{text}"
    );
    let status = String::from_utf8_lossy(&d.chatctl(&["status"]).stdout).into_owned();
    assert!(
        status.contains("TLS on:") && status.contains("tls-handshakes-failed 0"),
        "{status}"
    );

    // Shutdown: the TLS user is told, then the stream ends cleanly (close_notify, no reset).
    d.signal(nix::sys::signal::Signal::SIGTERM);
    tess.expect_prefix("*** SHUTDOWN");
    assert_eq!(tess.try_line(), None);
    assert_eq!(d.wait_exit(), Some(0));
}

#[test]
fn a_tls_client_over_the_per_address_cap_is_refused_inside_tls() {
    let (_dir, pki, d) = tls_daemon("[limits]\nmax-connections-per-ip = 1\n");
    let _paul = d.join("paul");
    let mut tess = pki.connect(d.tls_addr());
    assert!(
        tess.line()
            .starts_with("*** ERR too-many-connections too many connections from your address"),
    );
    assert_eq!(tess.try_line(), None);
    assert_eq!(counter(&d, "refused_per_ip"), 1);
}

/// Connects to `addr`, sends `bytes` (then half-closes if `half_close`), and returns how long
/// the server took to close the connection; panics if it stays open past [`WAIT`] or answers
/// with chat lines.
fn closed_after(addr: std::net::SocketAddr, bytes: &[u8], half_close: bool) -> Duration {
    let mut s = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let start = Instant::now();
    s.write_all(bytes).expect("send");
    if half_close {
        s.shutdown(std::net::Shutdown::Write).expect("half close");
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the TLS port kept a bad connection open: {e}"),
        }
    }
    assert!(
        !String::from_utf8_lossy(&got).contains("***"),
        "chat lines in the clear: {got:?}"
    );
    start.elapsed()
}

#[test]
fn plaintext_garbage_aborted_and_stalled_handshakes_are_closed_and_counted() {
    let (_dir, pki, d) = tls_daemon("[limits]\nname-timeout = \"2s\"\n");
    let addr = d.tls_addr();
    // A plaintext chat client on the TLS port.
    closed_after(addr, b"alice\nhello\n", false);
    // Garbage that looks like a TLS record header, then nonsense.
    let mut garbage = vec![0x16, 0x03, 0x01, 0x00, 0x40];
    garbage.extend((0u8..64).map(|i| i.wrapping_mul(37)));
    closed_after(addr, &garbage, false);
    // A handshake record cut short, then the client goes away.
    closed_after(addr, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00], true);
    // A client that connects and never starts the handshake: closed at the bound (2s here).
    let took = closed_after(addr, b"", false);
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "{took:?}"
    );
    wait_for(
        WAIT,
        "four failed handshakes counted",
        || (counter(&d, "tls_handshakes_failed") == 4).then_some(()),
        || d.status().to_string(),
    );
    assert_eq!(counter(&d, "tls_handshake_timeouts"), 1);
    // Nothing of it reached the room or hurt the listener.
    let mut tess = pki.join(addr, "tess");
    tess.send("/who");
    assert_eq!(tess.expect_prefix("*** WHO"), "*** WHO 1 tess");
    assert!(!d.log().contains("panicked"), "{}", d.log());
    assert_eq!(
        d.status()["response"]["connections"].as_u64(),
        Some(1),
        "every bad connection gave its slot back"
    );
}

/// Points certbot-style `live/` symlinks at `archive/` files `n` (fullchain`n`.pem,
/// privkey`n`.pem), the way a renewal does.
fn point_live_at(dir: &Path, n: u32) {
    for (link, target) in [
        ("fullchain.pem", format!("../archive/fullchain{n}.pem")),
        ("privkey.pem", format!("../archive/privkey{n}.pem")),
    ] {
        let tmp = dir.join("live").join(format!("{link}.new"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp).expect("symlink");
        std::fs::rename(&tmp, dir.join("live").join(link)).expect("swap symlink");
    }
}

#[test]
fn sighup_rotates_the_certificate_without_dropping_anyone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "chatd test CA");
    std::fs::create_dir_all(dir.path().join("live")).expect("live");
    std::fs::create_dir_all(dir.path().join("archive")).expect("archive");
    let archive = |n: u32| {
        (
            dir.path().join(format!("archive/fullchain{n}.pem")),
            dir.path().join(format!("archive/privkey{n}.pem")),
        )
    };
    let (c1, k1) = archive(1);
    let first = pki.issue(&c1, &k1, "first", &["127.0.0.1", "localhost"], 2090);
    point_live_at(dir.path(), 1);
    let live = dir.path().join("live");
    let d = TestDaemon::with(Pki::config(
        &live.join("fullchain.pem"),
        &live.join("privkey.pem"),
    ))
    .start();

    let mut tess = pki.join(d.tls_addr(), "tess");
    assert_eq!(peer_leaf(tess.stream()), first);
    let mut paul = d.join("paul");
    tess.expect_prefix("*** JOIN paul");

    let (c2, k2) = archive(2);
    let second = pki.issue(&c2, &k2, "second", &["127.0.0.1", "localhost"], 2091);
    point_live_at(dir.path(), 2);
    let report = d.sighup_reload();
    assert!(report.contains("config reloaded"), "{report}");

    // The session made with the old certificate goes on, both ways.
    tess.send("still here");
    assert_eq!(paul.expect_prefix("tess:"), "tess: still here");
    paul.send("welcome back");
    assert_eq!(tess.expect_prefix("paul:"), "paul: welcome back");
    // A new connection gets the new certificate.
    let mut tom = pki.join(d.tls_addr(), "tom");
    assert_eq!(peer_leaf(tom.stream()), second);
    assert_ne!(first, second);
    tom.send("hi");
    assert_eq!(tess.expect_prefix("tom:"), "tom: hi");
    // And chatctl reload does the same (idempotent with unchanged files).
    assert_eq!(d.chatctl(&["reload"]).status.code(), Some(0));
}

#[test]
fn a_bad_certificate_at_reload_keeps_the_old_one_and_names_the_file() {
    let (dir, pki, d) = tls_daemon("");
    let (cert, key) = pki.paths("server");
    let first = peer_leaf(pki.connect(d.tls_addr()).stream());
    let keep = |what: &str, want: &[&str]| {
        let out = d.chatctl(&["reload"]);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(7), "{what}: {err}");
        for w in want {
            assert!(err.contains(w), "{what}: {err:?} lacks {w:?}");
        }
        assert_eq!(
            peer_leaf(pki.connect(d.tls_addr()).stream()),
            first,
            "{what}: the old certificate stays"
        );
    };

    // Missing: the certificate file is gone.
    let saved = std::fs::read(&cert).expect("read cert");
    std::fs::remove_file(&cert).expect("remove cert");
    let cert_s = cert.display().to_string();
    keep(
        "missing",
        &[
            "tls.certificate",
            &cert_s,
            "cannot read",
            "keeping the certificate",
        ],
    );
    std::fs::write(&cert, &saved).expect("restore cert");

    // Mismatched: a key of another certificate.
    let (_, other_key, _) = pki.leaf("other");
    std::fs::copy(&other_key, &key).expect("copy key");
    let key_s = key.display().to_string();
    keep("mismatched", &["tls.private-key", &key_s, "does not match"]);

    // Expired: a fresh pair whose certificate ran out.
    pki.issue(&cert, &key, "old", &["127.0.0.1", "localhost"], 2021);
    keep(
        "expired",
        &["tls.certificate", &cert_s, "expired on 2021-01-01"],
    );

    // The same at start: a configuration error naming the file (exit 78).
    let mut bad = TestDaemon::with(Pki::config(&cert, &key)).spawn();
    assert_eq!(bad.wait_exit(), Some(78));
    let log = bad.log();
    assert!(log.contains(&cert_s) && log.contains("expired"), "{log}");
    drop(dir);
}

#[test]
fn openssl_s_client_chats_with_a_plaintext_user() {
    if !require("openssl", "apt-get install openssl") {
        return;
    }
    let (_dir, pki, d) = tls_daemon("");
    let mut paul = d.join("paul");
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-verify_return_error", "-CAfile"])
        .arg(&pki.ca_path)
        .args([
            "-connect",
            &d.tls_addr().to_string(),
            "-servername",
            "localhost",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl");
    let out = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn({
        let out = out.clone();
        move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().expect("lock").extend_from_slice(&buf[..n]);
            }
        }
    });
    let seen = || String::from_utf8_lossy(&out.lock().expect("lock")).into_owned();
    let mut stdin = child.stdin.take().expect("stdin");
    wait_for(
        WAIT,
        "the greeting through openssl",
        || seen().contains("*** HELLO").then_some(()),
        seen,
    );
    stdin
        .write_all(b"olga\nhello from openssl\n")
        .expect("write");
    stdin.flush().expect("flush");
    paul.expect_prefix("*** JOIN olga joined");
    assert_eq!(paul.expect_prefix("olga:"), "olga: hello from openssl");
    paul.send("hi olga");
    wait_for(
        WAIT,
        "paul's line through openssl",
        || seen().contains("paul: hi olga").then_some(()),
        seen,
    );
    stdin.write_all(b"/quit\n").expect("write");
    drop(stdin);
    wait_for(
        WAIT,
        "openssl to end",
        || child.try_wait().ok().flatten(),
        seen,
    );
    let _ = reader.join();
    assert!(seen().contains("*** BYE"), "{}", seen());
}
/// Runs `chat-client ARGS` with `input` on standard input; its exit code, stdout and stderr.
fn chat_client(args: &[&str], input: &str) -> (Option<i32>, String, String) {
    let home = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(bin("chat-client"))
        .args(args)
        .env("XDG_CONFIG_HOME", home.path())
        .env_remove("CHAT_CLIENT_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chat-client");
    let mut stdin = child.stdin.take().expect("stdin");
    // The client may end (refusing the server) before reading its input.
    let _ = stdin.write_all(input.as_bytes());
    drop(stdin);
    let out = crate::helper::wait_child(&mut child, WAIT)
        .map(|s| s.code())
        .unwrap_or_else(|| panic!("chat-client did not end"));
    let read = |r: Option<&mut dyn Read>| {
        let mut s = String::new();
        if let Some(r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    };
    let stdout = read(child.stdout.as_mut().map(|s| s as &mut dyn Read));
    let stderr = read(child.stderr.as_mut().map(|s| s as &mut dyn Read));
    (out, stdout, stderr)
}

#[test]
fn chat_client_tls_with_a_private_ca_chats_with_a_plaintext_user() {
    let (_dir, pki, d) = tls_daemon("");
    let mut paul = d.join("paul");
    let ca = pki.ca_path.display().to_string();
    let port = d.tls_addr().port().to_string();
    // `--tls` with a host and port, then the `chats://` form.
    let (code, out, err) = chat_client(
        &["--tls", "--ca", &ca, "localhost", &port],
        "cleo\nhello over tls\n",
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("*** WELCOME cleo"), "{out}");
    assert_eq!(paul.expect_prefix("cleo:"), "cleo: hello over tls");
    let url = format!("chats://127.0.0.1:{port}");
    let (code, _, err) = chat_client(&["--ca", &ca, &url], "cleo\nagain\n");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(paul.expect_prefix("cleo:"), "cleo: again");
}

#[test]
fn chat_client_refuses_an_untrusted_or_misnamed_certificate() {
    let (dir, pki, d) = tls_daemon("");
    let port = d.tls_addr().port().to_string();
    // The system's roots do not know the test CA.
    let (code, out, err) = chat_client(&["--tls", "127.0.0.1", &port], "cleo\nhi\n");
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("certificate") && err.contains("not trusted"),
        "{err}"
    );
    assert!(!out.contains("WELCOME"), "{out}");
    // Another CA.
    let other = Pki::new(dir.path(), "other CA");
    let other_ca = other.ca_path.display().to_string();
    let (code, _, err) = chat_client(&["--tls", "--ca", &other_ca, "127.0.0.1", &port], "x\n");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not trusted"), "{err}");
    // The right CA, but a certificate for another name.
    let ca = pki.ca_path.display().to_string();
    let (cert, key) = pki.paths("misnamed");
    pki.issue(&cert, &key, "misnamed", &["chat.example.org"], 2090);
    let misnamed = TestDaemon::with(Pki::config(&cert, &key)).start();
    let port2 = misnamed.tls_addr().port().to_string();
    let (code, _, err) = chat_client(&["--tls", "--ca", &ca, "localhost", &port2], "x\n");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not valid for localhost"), "{err}");
    // A TLS client on the plaintext port fails clearly too, never falling back.
    let plain = d.addr.port().to_string();
    let (code, _, err) = chat_client(&["--tls", "--ca", &ca, "127.0.0.1", &plain], "x\n");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("TLS"), "{err}");
}

#[test]
fn chat_bench_drives_the_tls_listener() {
    let (_dir, pki, d) = tls_daemon(
        "[limits]\nmessage-rate = 1000000\nmessage-burst = 1000000\nmax-connections-per-ip = 1000\n",
    );
    let (addr, ca) = (d.tls_addr().to_string(), pki.ca_path.display().to_string());
    let (code, r) = crate::bench::run_bench(&[
        "fanout",
        "--addr",
        &addr,
        "--tls",
        "--ca",
        &ca,
        "-c",
        "6",
        "-s",
        "2",
        "-d",
        "1",
        "--timeout",
        "30",
    ]);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["tls"], true);
    assert_eq!(r["seated"], 6);
    assert!(r["sent"].as_u64() > Some(0), "{r}");
    assert_eq!(r["deliveries"], r["expected_deliveries"], "{r}");
    for key in ["lost", "duplicated", "reordered", "errors", "disconnected"] {
        assert_eq!(r[key], 0, "{key} in {r}");
    }
    let (code, r) = crate::bench::run_bench(&[
        "idle",
        "--addr",
        &addr,
        "--ca",
        &ca,
        "-c",
        "20",
        "--join-rate",
        "200",
        "--settle",
        "0.1",
        "--hold",
        "0.1",
        "--timeout",
        "30",
    ]);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["seated"], 20, "{r}");
    // Nothing the load generator did was a failed handshake.
    assert_eq!(counter(&d, "tls_handshakes_failed"), 0);
}

#[test]
fn a_socket_systemd_names_tls_serves_tls() {
    use std::os::fd::OwnedFd;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "chatd test CA");
    let (cert, key, leaf) = pki.leaf("server");
    let socket = dir.path().join("admin.sock");
    // If chatd bound server.listen or tls.listen it would fail: 192.0.2.1 is not local.
    let config = Pki::config(&cert, &key)
        .listen(&["192.0.2.1:9"])
        .set("tls", "listen", "[\"192.0.2.1:10\"]")
        .admin_socket(&socket)
        .state_dir(&dir.path().join("state"));
    std::fs::write(dir.path().join("chatd.toml"), config.to_string()).expect("write config");
    let plain = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let secure = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let (plain_addr, tls_addr) = (
        plain.local_addr().expect("addr"),
        secure.local_addr().expect("addr"),
    );
    // Like systemd with chatd.socket and chatd-tls.socket: fd 3 named chat, fd 4 named tls.
    let log = std::fs::File::create(dir.path().join("chatd.log")).expect("log");
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(
            "exec 3<&0 4>&1 0</dev/null 1>/dev/null; LISTEN_PID=$$ LISTEN_FDS=2 \
             LISTEN_FDNAMES=chat:tls exec \"$0\" --config \"$1\"",
        )
        .arg(bin("chatd"))
        .arg(dir.path().join("chatd.toml"))
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::from(OwnedFd::from(plain)))
        .stdout(Stdio::from(OwnedFd::from(secure)))
        .stderr(log)
        .spawn()
        .expect("spawn chatd");
    let status = wait_for(
        WAIT,
        "chatd to answer on its admin socket",
        || crate::helper::admin_request(&socket, "status").ok(),
        || std::fs::read_to_string(dir.path().join("chatd.log")).unwrap_or_default(),
    );
    assert_eq!(
        status["response"]["tls_listen"][0].as_str(),
        Some(tls_addr.to_string().as_str())
    );
    let mut tess = pki.join(tls_addr, "tess");
    assert_eq!(peer_leaf(tess.stream()), leaf);
    let mut paul = crate::helper::Client::connect_as(plain_addr, "paul");
    tess.expect_prefix("*** JOIN paul");
    paul.send("hi");
    assert_eq!(tess.expect_prefix("paul:"), "paul: hi");
    let _ = child.kill();
    let _ = child.wait();
}
