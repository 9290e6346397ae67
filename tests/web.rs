//! The browser client's server side (`[web]`): the page and its headers, the WebSocket at
//! `/ws` as a room member like any other, the refusals made before an upgrade, and every
//! hostile input closed with its code and a log line while the room goes on.

use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::helper::tls::peer_leaf;
use crate::helper::web::{self, closed_with, http};
use crate::helper::{Config, Pki, TestDaemon, WAIT, wait_until};

/// The test config with a web listener on a free loopback port.
fn web_config() -> Config {
    Config::test().set("web", "listen", "[\"127.0.0.1:0\"]")
}

fn start() -> TestDaemon {
    TestDaemon::with(web_config()).start()
}

/// Sends one raw frame on a WebSocket client.
fn send_frame(c: &mut web::WsClient, frame: Frame) {
    let ws = &mut c.reader.get_mut().ws;
    ws.write(Message::Frame(frame)).expect("write frame");
    ws.flush().expect("flush");
}

#[test]
fn the_page_is_served_with_its_security_headers_and_types() {
    let d = start();
    let addr = d.web_addr();
    for (path, kind) in [
        ("/", "text/html; charset=utf-8"),
        ("/app.js", "text/javascript; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
        ("/icon.svg", "image/svg+xml; charset=utf-8"),
    ] {
        let r = http(addr, "GET", path, &[]);
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some(kind), "{path}");
        let csp = r.header("content-security-policy").unwrap_or_default();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(r.header("referrer-policy"), Some("no-referrer"));
        assert!(!r.body.is_empty(), "{path}");
    }
    let page = http(addr, "GET", "/", &[]).body;
    assert!(
        page.contains("app.js") && page.contains("style.css"),
        "{page}"
    );
    // Nothing inline, nothing from elsewhere.
    assert!(!page.contains("style=\""), "{page}");
    assert!(!page.contains("<script>"), "{page}");
    for external in [
        "src=\"http",
        "href=\"http",
        "src=\"//",
        "href=\"//",
        "@import",
    ] {
        assert!(!page.contains(external), "{external}: {page}");
    }
    assert_eq!(http(addr, "GET", "/nope", &[]).status, 404);
    assert_eq!(http(addr, "POST", "/", &[]).status, 405);
    assert_eq!(http(addr, "HEAD", "/", &[]).status, 200);
    // /ws without an upgrade says what it is.
    let r = http(addr, "GET", "/ws", &[]);
    assert_eq!(r.status, 426);
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
}

#[test]
fn websocket_and_tcp_users_share_the_room_in_one_order() {
    let d = TestDaemon::with(web_config().no_rate_limit()).start();
    let mut tom = d.join("tom");
    tom.send("before anyone else");
    tom.send("/who");
    tom.expect_prefix("*** WHO ");

    // A name clash, said why, and a retry on the same connection.
    let mut wendy = web::connect(d.web_addr());
    wendy.expect_prefix("*** HELLO ");
    wendy.send("tom");
    let refused = wendy.expect_prefix("*** ERR ");
    assert!(refused.starts_with("*** ERR name-taken"), "{refused}");
    wendy.send("wendy");
    wendy.expect_prefix("*** WELCOME wendy");
    // History reaches the WebSocket user too.
    let history = wendy.expect_prefix("*** HISTORY ");
    assert!(history.ends_with("tom: before anyone else"), "{history}");
    tom.expect_prefix("*** JOIN wendy");

    // Both directions, interleaved: a TCP and a WebSocket onlooker see one order, and each
    // talker sees the other's lines in it.
    let mut olga = d.join("olga");
    let mut walt = web::join(d.web_addr(), "walt");
    tom.expect_prefix("*** JOIN walt");
    wendy.expect_prefix("*** JOIN walt");
    for i in 0..10 {
        if i % 2 == 0 {
            tom.send(&format!("tcp {i}"));
        } else {
            wendy.send(&format!("ws {i}"));
        }
    }
    let tcp_view = olga.chat_lines(10);
    let ws_view = walt.chat_lines(10);
    assert_eq!(tcp_view, ws_view);
    let from = |view: &[String], who: &str| -> Vec<String> {
        view.iter()
            .filter(|l| l.starts_with(who))
            .cloned()
            .collect()
    };
    assert_eq!(tom.chat_lines(5), from(&tcp_view, "wendy:"));
    assert_eq!(wendy.chat_lines(5), from(&tcp_view, "tom:"));
    assert!(tcp_view.contains(&"wendy: ws 1".to_owned()), "{tcp_view:?}");

    wendy.send("/me waves");
    assert_eq!(tom.expect_prefix("* wendy"), "* wendy waves");
    wendy.send("/msg tom psst");
    assert_eq!(wendy.expect_prefix("-> tom"), "-> tom (private): psst");
    assert_eq!(
        tom.expect_prefix("wendy (private)"),
        "wendy (private): psst"
    );
    tom.send("/msg wendy hi back");
    assert_eq!(
        wendy.expect_prefix("tom (private)"),
        "tom (private): hi back"
    );
    wendy.send("/who");
    assert_eq!(
        wendy.expect_prefix("*** WHO "),
        "*** WHO 4 olga tom walt wendy"
    );
    wendy.send("/nick wanda");
    tom.expect_prefix("*** NICK wendy is now known as wanda");
    wendy.send("/quit");
    wendy.expect_prefix("*** BYE");
    assert_eq!(closed_with(&mut wendy).0, 1000);
    tom.expect_prefix("*** LEAVE wanda");
}

#[test]
fn chatctl_lists_the_transport_kicks_with_4000_and_status_and_metrics_count_it() {
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], crate::helper::free_port()));
    let d =
        TestDaemon::with(web_config().set_str("metrics", "listen", &metrics.to_string())).start();
    let mut wendy = web::join(d.web_addr(), "wendy");
    let _tom = d.join("tom");
    let list = d.chatctl(&["list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    let row = text
        .lines()
        .find(|l| l.starts_with("wendy"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(row.split_whitespace().any(|w| w == "ws"), "{text}");
    let users = d.users();
    assert!(
        users
            .iter()
            .any(|u| u["name"] == "wendy" && u["transport"] == "ws"),
        "{users:?}"
    );
    assert_eq!(d.status()["response"]["activity"]["open_ws"], 1);
    let scrape = http(metrics, "GET", "/metrics", &[]).body;
    assert!(
        scrape.contains("chatd_connections{listener=\"ws\"} 1"),
        "{scrape}"
    );

    // A reason that reads like a ban is still a kick: the code is not read from the text.
    let reason = "banned words, and too much spam";
    let out = d.chatctl(&["kick", "wendy", "--reason", reason]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        wendy.expect_prefix("*** KICKED"),
        format!("*** KICKED {reason}")
    );
    assert_eq!(closed_with(&mut wendy), (4000, reason.to_owned()));
    wait_until(WAIT, "the WebSocket to be counted closed", || {
        d.status()["response"]["activity"]["open_ws"] == 0
    });
}

#[test]
fn a_reconnecting_page_reclaims_its_name_and_the_old_connection_gets_4004() {
    let d = start();
    let mut old = web::join(d.web_addr(), "wendy");
    old.send("/token");
    let token = old.expect_prefix("*** TOKEN ");
    let token = token
        .split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_owned();
    let mut tom = d.join("tom");

    let mut new = web::connect(d.web_addr());
    new.expect_prefix("*** HELLO ");
    new.send(&format!("/reclaim wendy {token}"));
    new.expect_prefix("*** WELCOME wendy");
    old.expect_prefix("*** KICKED your name was reclaimed");
    assert_eq!(closed_with(&mut old).0, 4004);
    new.send("back again");
    assert_eq!(tom.expect_prefix("wendy:"), "wendy: back again");
}

#[test]
fn refusals_come_before_the_upgrade_with_their_status_and_a_log_line() {
    let d = TestDaemon::with(
        web_config()
            .set("limits", "max-connections-per-ip", "2")
            .set("limits", "max-clients", "3"),
    )
    .start();
    let addr = d.web_addr();

    let r = web::try_connect(addr, Some("http://evil.example")).err();
    let r = r.expect("a foreign origin is refused");
    assert_eq!(r.status, 403);
    assert!(r.body.contains("origin"), "{}", r.body);
    d.wait_log("refusing WebSocket");
    let r = web::try_connect(addr, None)
        .err()
        .expect("no Origin is refused");
    assert_eq!(r.status, 403);
    assert!(r.body.contains("Origin"), "{}", r.body);
    assert_eq!(d.status()["response"]["limits"]["refused_origin"], 2);

    // Per-address cap: the WebSocket counts with the TCP connections.
    let _a = d.join("a");
    let _b = web::join(addr, "b");
    let r = web::try_connect(addr, Some(&format!("http://{addr}"))).err();
    let r = r.expect("a third connection from one address is refused");
    assert_eq!(r.status, 429);
    assert!(r.body.contains("max-connections-per-ip"), "{}", r.body);

    // Bans, before the upgrade.
    let out = d.chatctl(&["ban", "127.0.0.1", "--reason", "testing"]);
    assert!(out.status.success(), "{out:?}");
    drop((_a, _b));
    wait_until(WAIT, "the kicked connections to close", || {
        d.status()["response"]["connections"] == 0
    });
    let r = web::try_connect(addr, Some(&format!("http://{addr}"))).err();
    let r = r.expect("a banned address is refused");
    assert_eq!(r.status, 403);
    assert!(r.body.contains("banned"), "{}", r.body);
}

#[test]
fn a_full_server_answers_503() {
    let d = TestDaemon::with(web_config().set("limits", "max-clients", "1")).start();
    let _a = d.join("a");
    let addr = d.web_addr();
    let r = web::try_connect(addr, Some(&format!("http://{addr}"))).err();
    let r = r.expect("a full server refuses");
    assert_eq!(r.status, 503);
    assert!(r.body.contains("max-clients"), "{}", r.body);
}

#[test]
fn allowed_origins_apply_on_reload() {
    let d = start();
    let addr = d.web_addr();
    assert!(web::try_connect(addr, Some("https://chat.example.org")).is_err());
    d.edit_config(|c| c.set("web", "allowed-origins", "[\"https://Chat.example.org\"]"));
    let report = d.sighup_reload();
    assert!(report.contains("web.allowed-origins"), "{report}");
    let mut c = web::try_connect(addr, Some("https://chat.example.org"))
        .unwrap_or_else(|r| panic!("{r:?}"));
    c.join_as("remote");
    // Listed origins replace the default: the page's own origin is no longer enough.
    assert!(web::try_connect(addr, Some(&format!("http://{addr}"))).is_err());
}

/// Every hostile input closes its own connection with its code, a last line and a log line;
/// a TCP user and a WebSocket user beside it go on chatting.
#[test]
fn hostile_frames_are_closed_with_their_codes_and_the_room_goes_on() {
    let d = TestDaemon::with(web_config().set("limits", "max-line-length", "64").set(
        "limits",
        "max-connections-per-ip",
        "50",
    ))
    .start();
    let addr = d.web_addr();
    let mut tom = d.join("tom");
    let mut wendy = web::join(addr, "wendy");
    let check_room = |tom: &mut crate::helper::Client, wendy: &mut web::WsClient, n: usize| {
        tom.send(&format!("still here {n}"));
        assert_eq!(wendy.expect_prefix("tom:"), format!("tom: still here {n}"));
        wendy.send(&format!("me too {n}"));
        assert_eq!(tom.expect_prefix("wendy:"), format!("wendy: me too {n}"));
    };

    // Oversized: one message past limits.max-line-length.
    let mut c = web::join(addr, "big");
    c.send(&"x".repeat(65));
    assert!(
        c.expect_prefix("*** ERR ")
            .starts_with("*** ERR line-too-long")
    );
    assert_eq!(closed_with(&mut c).0, 1009);
    check_room(&mut tom, &mut wendy, 1);

    // A binary frame.
    let mut c = web::join(addr, "binary");
    send_frame(
        &mut c,
        Frame::message(vec![0u8, 1, 2], OpCode::Data(Data::Binary), true),
    );
    assert_eq!(closed_with(&mut c).0, 1003);
    check_room(&mut tom, &mut wendy, 2);

    // Fragments without end: each small, together past the cap.
    let mut c = web::join(addr, "fragments");
    send_frame(
        &mut c,
        Frame::message(b"start".to_vec(), OpCode::Data(Data::Text), false),
    );
    for _ in 0..20 {
        send_frame(
            &mut c,
            Frame::message(b"more".to_vec(), OpCode::Data(Data::Continue), false),
        );
    }
    assert_eq!(closed_with(&mut c).0, 1009);
    check_room(&mut tom, &mut wendy, 3);

    // A flood of pings.
    let mut c = web::join(addr, "pinger");
    for _ in 0..100 {
        let ws = &mut c.reader.get_mut().ws;
        if ws.write(Message::Ping(b"hi".to_vec().into())).is_err() || ws.flush().is_err() {
            break;
        }
    }
    assert_eq!(closed_with(&mut c).0, 1008);
    check_room(&mut tom, &mut wendy, 4);

    // Invalid UTF-8 in a text frame.
    let mut c = web::join(addr, "mangled");
    send_frame(
        &mut c,
        Frame::message(vec![b'a', 0xff, 0xfe], OpCode::Data(Data::Text), true),
    );
    assert_eq!(closed_with(&mut c).0, 1007);
    check_room(&mut tom, &mut wendy, 5);

    // A flood of lines: the same limit as TCP, then 1008.
    let mut c = web::join(addr, "flooder");
    for i in 0..200 {
        let ws = &mut c.reader.get_mut().ws;
        if ws.write(Message::text(format!("spam {i}"))).is_err() || ws.flush().is_err() {
            break;
        }
    }
    let lines = c.until_eof();
    assert!(
        lines.iter().any(|l| l.starts_with("*** ERR flooding")),
        "{lines:?}"
    );
    assert_eq!(c.reader.get_ref().close.as_ref().map(|c| c.0), Some(1008));
    check_room(&mut tom, &mut wendy, 6);

    let log = d.log();
    for what in [
        "closing a WebSocket: message too long",
        "closing a WebSocket: binary frame",
        "closing a WebSocket: ping flood",
        "closing a WebSocket: invalid UTF-8",
        "disconnecting a flooding client",
    ] {
        assert!(log.contains(what), "no log line {what:?}:\n{log}");
    }
    let limits = &d.status()["response"]["limits"];
    assert_eq!(limits["ws_bad_frames"], 5, "{limits}");
}

#[test]
fn a_websocket_that_does_not_read_is_closed_with_4002() {
    let d = TestDaemon::with(
        web_config()
            .no_rate_limit()
            .set("limits", "max-queue-bytes", "4096"),
    )
    .start();
    let addr = d.web_addr();
    let mut slow = web::connect(addr);
    slow.join_as("slow");
    let mut tom = d.join("tom");
    // `slow` reads nothing while tom talks far past its queue and the socket buffers.
    let line = "y".repeat(1000);
    for _ in 0..3000 {
        tom.send(&line);
        if d.log()
            .contains("disconnecting a client that does not read")
        {
            break;
        }
    }
    d.wait_log("disconnecting a client that does not read");
    tom.expect_prefix("*** LEAVE slow");
    // Reading now, the client finds the close with its code at the end.
    assert_eq!(closed_with(&mut slow).0, 4002);
}

#[test]
fn shutdown_says_so_and_closes_with_1001() {
    let mut d = start();
    let mut wendy = web::join(d.web_addr(), "wendy");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    wendy.expect_prefix("*** SHUTDOWN");
    assert_eq!(closed_with(&mut wendy).0, 1001);
    assert_eq!(d.wait_exit(), Some(0));
}

#[test]
fn no_name_in_time_closes_with_4003() {
    let d = TestDaemon::with(web_config().set_str("limits", "name-timeout", "1s")).start();
    let mut c = web::connect(d.web_addr());
    c.expect_prefix("*** HELLO ");
    assert!(
        c.expect_prefix("*** ERR ")
            .starts_with("*** ERR name-timeout")
    );
    assert_eq!(closed_with(&mut c).0, 4003);
}

#[test]
fn wss_serves_the_tls_certificate_and_follows_its_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "chatd web CA");
    let (cert, key, first) = pki.leaf("first");
    let d = TestDaemon::with(
        Pki::config(&cert, &key)
            .set("web", "listen", "[\"127.0.0.1:0\"]")
            .set("web", "tls", "true"),
    )
    .start();
    let addr = d.web_addr();
    let open = |name: &str| {
        let tls = pki.stream(addr, "localhost");
        let leaf = peer_leaf(&tls);
        let url = format!("wss://localhost:{}/ws", addr.port());
        let origin = format!("https://localhost:{}", addr.port());
        let mut c = web::upgrade(tls, &url, Some(&origin)).unwrap_or_else(|r| panic!("{r:?}"));
        c.join_as(name);
        (c, leaf)
    };
    let (mut wendy, leaf) = open("wendy");
    assert_eq!(leaf, first);
    // A plain-HTTP origin is not this page's.
    let tls = pki.stream(addr, "localhost");
    let url = format!("wss://localhost:{}/ws", addr.port());
    let refused = web::upgrade(
        tls,
        &url,
        Some(&format!("http://localhost:{}", addr.port())),
    );
    assert_eq!(refused.err().map(|r| r.status), Some(403));

    let users = d.users();
    assert!(users.iter().any(|u| u["transport"] == "wss"), "{users:?}");

    // Rotation: the same files get a new certificate; a reload puts it in force.
    let second = pki.issue(&cert, &key, "second", &["127.0.0.1", "localhost"], 2091);
    let report = d.sighup_reload();
    assert!(report.contains("config reloaded"), "{report}");
    let (mut tess, leaf) = open("tess");
    assert_eq!(leaf, second);
    assert_ne!(first, second);
    // The session made with the old certificate goes on.
    wendy.send("still here");
    assert_eq!(tess.expect_prefix("wendy:"), "wendy: still here");
}

#[test]
fn web_config_errors_name_file_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |text: &str| {
        let path = dir.path().join("chatd.toml");
        std::fs::write(&path, text).expect("write");
        let out = std::process::Command::new(crate::helper::bin("chatd"))
            .arg("--check-config")
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run chatd");
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (err, path.display().to_string())
    };
    let (err, path) = check("[web]\nlisten = [\"127.0.0.1:8080\"]\nallowed-origin = []\n");
    assert!(err.contains(&format!("{path}:3:1:")), "{err}");
    let (err, path) = check("[web]\nallowed-origins = [\"https://x.org/path\"]\n");
    assert!(
        err.contains(&format!("{path}:1:")) || err.contains(&format!("{path}:2:")),
        "{err}"
    );
    assert!(err.contains("not a web origin"), "{err}");
    let (err, path) = check("[web]\nlisten = [\"127.0.0.1:8080\"]\ntls = true\n");
    assert!(err.contains(&format!("{path}:3:1: web.tls")), "{err}");
    let (err, path) =
        check("[server]\nlisten = [\"127.0.0.1:5000\"]\n[web]\nlisten = [\"127.0.0.1:5000\"]\n");
    assert!(err.contains(&format!("{path}:4:1: web.listen")), "{err}");
}

#[test]
fn bans_close_with_4001_online_and_at_naming() {
    let d = start();
    let addr = d.web_addr();
    let mut wendy = web::join(addr, "wendy");
    let out = d.chatctl(&["ban", "wendy", "--reason", "spam"]);
    assert!(out.status.success(), "{out:?}");
    let kicked = wendy.expect_prefix("*** KICKED ");
    assert!(kicked.starts_with("*** KICKED banned"), "{kicked}");
    let (code, reason) = closed_with(&mut wendy);
    assert_eq!(code, 4001);
    assert!(reason.ends_with("spam"), "{reason}");

    // The name ban holds when the name is sent again, on a new connection.
    let mut again = web::connect(addr);
    again.expect_prefix("*** HELLO ");
    again.send("wendy");
    assert!(
        again
            .expect_prefix("*** ERR ")
            .starts_with("*** ERR banned")
    );
    assert_eq!(closed_with(&mut again).0, 4001);
}

#[test]
fn http_connections_that_have_not_upgraded_are_capped_per_address() {
    use std::io::Read;
    let d = TestDaemon::with(web_config().set("limits", "max-connections-per-ip", "2")).start();
    let addr = d.web_addr();
    let idle: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect_timeout(&addr, WAIT).expect("connect"))
        .collect();
    // Both are held open (sending nothing yet); wait until the daemon has counted them.
    wait_until(
        WAIT,
        "the idle connections to be refused past the cap",
        || {
            let mut third = std::net::TcpStream::connect_timeout(&addr, WAIT).expect("connect");
            third
                .set_read_timeout(Some(std::time::Duration::from_millis(500)))
                .expect("timeout");
            // Closed at once, without an answer: EOF (or a reset).
            matches!(third.read(&mut [0u8; 16]), Ok(0))
                || matches!(third.read(&mut [0u8; 16]), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
        },
    );
    drop(idle);
    // The places come back once those close.
    wait_until(WAIT, "a page load to work again", || {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect_timeout(&addr, WAIT).expect("connect");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        answer.starts_with(b"HTTP/1.1 200")
    });
}

#[test]
fn socket_activation_serves_a_passed_web_socket() {
    use std::os::fd::OwnedFd;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("admin.sock");
    // If chatd bound web.listen it would fail: 192.0.2.1 (TEST-NET-1) is not a local address.
    let config = Config::test()
        .admin_socket(&socket)
        .state_dir(&dir.path().join("state"))
        .set("web", "listen", "[\"192.0.2.1:9\"]");
    std::fs::write(dir.path().join("chatd.toml"), config.to_string()).expect("write config");
    let plain = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let web_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let (plain_addr, web_addr) = (
        plain.local_addr().expect("addr"),
        web_listener.local_addr().expect("addr"),
    );
    // Like systemd with chatd.socket and chatd-web.socket: fd 3 named chat, fd 4 named web.
    let log = std::fs::File::create(dir.path().join("chatd.log")).expect("log");
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(
            "exec 3<&0 4>&1 0</dev/null 1>/dev/null; LISTEN_PID=$$ LISTEN_FDS=2 \
             LISTEN_FDNAMES=chat:web exec \"$0\" --config \"$1\"",
        )
        .arg(crate::helper::bin("chatd"))
        .arg(dir.path().join("chatd.toml"))
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::from(OwnedFd::from(plain)))
        .stdout(Stdio::from(OwnedFd::from(web_listener)))
        .stderr(log)
        .spawn()
        .expect("spawn chatd");
    let status = crate::helper::wait_for(
        WAIT,
        "chatd to answer on its admin socket",
        || crate::helper::admin_request(&socket, "status").ok(),
        || std::fs::read_to_string(dir.path().join("chatd.log")).unwrap_or_default(),
    );
    assert_eq!(
        status["response"]["web_listen"][0].as_str(),
        Some(web_addr.to_string().as_str())
    );
    let mut wendy = web::join(web_addr, "wendy");
    let mut paul = crate::helper::Client::connect_as(plain_addr, "paul");
    wendy.expect_prefix("*** JOIN paul");
    paul.send("hi");
    assert_eq!(wendy.expect_prefix("paul:"), "paul: hi");
    let _ = child.kill();
    let _ = child.wait();
}
