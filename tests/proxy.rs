//! The PROXY protocol against the real daemon: this test plays the load balancer (connecting
//! from 127.0.0.1, a trusted proxy) and writes v1 and v2 headers itself, for IPv4 and IPv6
//! clients; then the real HAProxy, where installed. The real client address must be what
//! `chatctl list`, bans and the per-address cap see; every way a header can be wrong is refused
//! and counted.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::helper::{Client, Config, TestDaemon, WAIT, free_port, require, wait_until};

/// The v2 signature.
const V2: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// A v1 header for a TCP client at `client` (to the daemon's `to`).
fn v1(client: SocketAddr, to: SocketAddr) -> Vec<u8> {
    let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
    // Both addresses in a v1 header are of one family.
    let dst = if client.is_ipv4() {
        to.ip().to_string()
    } else {
        "::1".to_owned()
    };
    format!(
        "PROXY {family} {} {dst} {} {}\r\n",
        client.ip(),
        client.port(),
        to.port()
    )
    .into_bytes()
}

/// A v2 PROXY header for a TCP client at `client`, written byte by byte from the spec so the
/// daemon's parser is checked against an independent encoder.
fn v2(client: SocketAddr, to_port: u16) -> Vec<u8> {
    let mut h = V2.to_vec();
    h.push(0x21); // version 2, PROXY
    match client.ip() {
        IpAddr::V4(ip) => {
            h.push(0x11); // TCP over IPv4
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&ip.octets());
            h.extend_from_slice(&[127, 0, 0, 1]);
        }
        IpAddr::V6(ip) => {
            h.push(0x21); // TCP over IPv6
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&ip.octets());
            h.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        }
    }
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&to_port.to_be_bytes());
    h
}

/// A v2 LOCAL header (a balancer's health check).
fn v2_local() -> Vec<u8> {
    let mut h = V2.to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0, 0]);
    h
}

/// A daemon whose listener expects headers from 127.0.0.1 only.
fn proxied_daemon(edit: impl FnOnce(Config) -> Config) -> TestDaemon {
    let config = Config::test()
        .set("server", "proxy-protocol", "true")
        .set("server", "trusted-proxies", r#"["127.0.0.1/32", "::1"]"#)
        .set_str("limits", "name-timeout", "2s");
    TestDaemon::with(edit(config)).start()
}

/// A connection from `src` that sends `header` first.
fn through(d: &TestDaemon, src: [u8; 4], header: &[u8]) -> Client {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    sock.bind(&SocketAddr::from((src, 0)).into())
        .expect("bind source address");
    sock.connect_timeout(&d.addr.into(), WAIT).expect("connect");
    let mut c = Client::from_stream(sock.into());
    c.send_raw(header);
    c
}

/// Reads what the daemon sends until it closes; panics if it does not close within `WAIT`.
fn closed(c: &mut Client) -> Vec<u8> {
    let mut out = Vec::new();
    let s = c.reader.get_mut();
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    match s.read_to_end(&mut out) {
        Ok(_) => out,
        // A reset is a close too (unread input when the daemon closed).
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => out,
        Err(e) => panic!("the daemon did not close the connection: {e}"),
    }
}

fn refused_proxy(d: &TestDaemon) -> u64 {
    d.chatctl_json(&["status"])
        .pointer("/response/limits/refused_proxy")
        .and_then(serde_json::Value::as_u64)
        .expect("refused_proxy in status")
}

fn addrs_in_list(d: &TestDaemon) -> Vec<(String, String)> {
    let v = d.chatctl_json(&["list"]);
    v.pointer("/response/users")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .map(|u| {
            (
                u["name"].as_str().unwrap_or_default().to_owned(),
                u["addr"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn real_client_addresses_reach_list_bans_and_the_per_address_cap() {
    let d = proxied_daemon(|c| c.set("limits", "max-connections-per-ip", "2"));
    let to = d.addr;
    let clients: [(&str, SocketAddr, bool); 4] = [
        ("v1four", "203.0.113.5:40001".parse().expect("addr"), false),
        ("v2four", "203.0.113.6:40002".parse().expect("addr"), true),
        ("v1six", "[2001:db8::7]:40003".parse().expect("addr"), false),
        (
            "v2six",
            "[2001:db8:1::8]:40004".parse().expect("addr"),
            true,
        ),
    ];
    let mut conns = Vec::new();
    for (name, addr, binary) in clients {
        let header = if binary {
            v2(addr, to.port())
        } else {
            v1(addr, to)
        };
        let mut c = through(&d, [127, 0, 0, 1], &header);
        c.join_as(name);
        conns.push(c);
    }
    let mut listed = addrs_in_list(&d);
    listed.sort();
    let mut want: Vec<(String, String)> = clients
        .iter()
        .map(|(n, a, _)| ((*n).to_owned(), a.to_string()))
        .collect();
    want.sort();
    assert_eq!(
        listed, want,
        "chatctl list shows the clients, not the proxy"
    );
    assert!(
        d.log().contains("peer=203.0.113.5:40001"),
        "logs name the real client:\n{}",
        d.log()
    );

    // A ban on one real address refuses that client, not the others behind the same proxy.
    let out = d.chatctl(&["ban", "203.0.113.5", "--reason", "spam"]);
    assert!(out.status.success(), "{out:?}");
    let last = conns[0].until_eof();
    assert!(
        last.iter().any(|l| l.starts_with("*** KICKED")),
        "the banned client is disconnected: {last:?}"
    );
    let mut again = through(
        &d,
        [127, 0, 0, 1],
        &v1("203.0.113.5:40100".parse().expect("addr"), to),
    );
    let refusal = String::from_utf8_lossy(&closed(&mut again)).into_owned();
    assert!(refusal.starts_with("*** ERR banned"), "{refusal:?}");
    let mut neighbour = through(
        &d,
        [127, 0, 0, 1],
        &v2("203.0.113.99:1".parse().expect("addr"), to.port()),
    );
    neighbour.join_as("neighbour");

    // The per-address cap (2) counts each real address, not the proxy's one.
    let capped: SocketAddr = "198.51.100.1:1000".parse().expect("addr");
    let mut held = Vec::new();
    for port in [1001, 1002] {
        let mut c = through(
            &d,
            [127, 0, 0, 1],
            &v1(SocketAddr::new(capped.ip(), port), to),
        );
        c.expect_prefix("*** HELLO");
        held.push(c);
    }
    let mut third = through(
        &d,
        [127, 0, 0, 1],
        &v1(SocketAddr::new(capped.ip(), 1003), to),
    );
    let refusal = String::from_utf8_lossy(&closed(&mut third)).into_owned();
    assert!(
        refusal.starts_with("*** ERR too-many-connections"),
        "{refusal:?}"
    );
    let mut other = through(
        &d,
        [127, 0, 0, 1],
        &v2("198.51.100.2:1".parse().expect("addr"), to.port()),
    );
    other.join_as("other");
    assert_eq!(refused_proxy(&d), 0, "nothing here was a bad header");
}

#[test]
fn bad_missing_untrusted_and_slow_headers_are_refused_and_counted() {
    let d = proxied_daemon(|c| c);
    let to = d.addr;
    let good = v1("203.0.113.5:1".parse().expect("addr"), to);

    // 127.0.0.2 is not a trusted proxy: closed before a byte is read, header or not.
    let mut untrusted = through(&d, [127, 0, 0, 2], &good);
    assert!(
        closed(&mut untrusted).is_empty(),
        "no greeting for an untrusted peer"
    );
    // A trusted peer that does not send a header (a client sent straight to this port).
    let mut missing = through(&d, [127, 0, 0, 1], b"alice\n");
    assert!(closed(&mut missing).is_empty());
    // Malformed: a v1 address that is no address; a v2 header with an unknown version.
    let mut bad_v1 = through(
        &d,
        [127, 0, 0, 1],
        b"PROXY TCP4 1.2.3 4.5.6.7 1 2\r\nalice\n",
    );
    assert!(closed(&mut bad_v1).is_empty());
    let mut bad_v2 = [V2, &[0x31, 0x11, 0, 12], &[0u8; 12]].concat();
    bad_v2.extend_from_slice(b"alice\n");
    let mut bad_v2 = through(&d, [127, 0, 0, 1], &bad_v2);
    assert!(closed(&mut bad_v2).is_empty());
    // A v1 header longer than the protocol allows (107 bytes) is not waited out.
    let long = format!("PROXY TCP4 {}\r\n", "1".repeat(120));
    let mut too_long = through(&d, [127, 0, 0, 1], long.as_bytes());
    assert!(closed(&mut too_long).is_empty());
    wait_until(WAIT, "five refusals counted", || refused_proxy(&d) == 5);

    // A health check (v2 LOCAL) is closed quietly: not a refusal.
    let mut health = through(&d, [127, 0, 0, 1], &v2_local());
    assert!(closed(&mut health).is_empty());
    assert_eq!(refused_proxy(&d), 5);

    // Half a header, then nothing: closed at limits.name-timeout (2s), not before.
    let start = Instant::now();
    let mut slow = through(&d, [127, 0, 0, 1], &good[..10]);
    assert!(closed(&mut slow).is_empty());
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(8),
        "closed after {took:?}"
    );
    wait_until(WAIT, "the slow header counted", || refused_proxy(&d) == 6);
    let log = d.log();
    for needle in [
        "not a trusted proxy (server.trusted-proxies",
        "no PROXY protocol header",
        "malformed PROXY protocol header",
        "in time (limits.name-timeout)",
    ] {
        assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }
    // The listener still serves a well-behaved proxy.
    let mut fine = through(&d, [127, 0, 0, 1], &good);
    fine.join_as("fine");
}

#[test]
fn a_header_on_a_listener_without_the_option_is_refused() {
    let d = TestDaemon::start("");
    for header in [
        v1("203.0.113.5:1".parse().expect("addr"), d.addr),
        v2("203.0.113.5:1".parse().expect("addr"), d.addr.port()),
    ] {
        let mut c = through(&d, [127, 0, 0, 1], &header);
        let got = String::from_utf8_lossy(&closed(&mut c)).into_owned();
        assert!(got.starts_with("*** HELLO"), "{got:?}");
        assert!(
            !got.contains("WELCOME"),
            "the header was not taken as a name: {got:?}"
        );
    }
    assert_eq!(refused_proxy(&d), 2);
    assert!(
        d.log()
            .contains("this listener does not expect one (server.proxy-protocol)")
    );
    assert!(addrs_in_list(&d).is_empty());
}

/// HAProxy in foreground mode; killed on drop.
struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn behind_a_real_haproxy_send_proxy_v2() {
    if !require("haproxy", "apt-get install haproxy") {
        return;
    }
    let d = proxied_daemon(|c| c);
    let front = free_port();
    let cfg = d.dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 60s\n  timeout server 60s\nfrontend chat\n  bind 127.0.0.1:{front}\n  \
             default_backend chatd\nbackend chatd\n  server chatd {} send-proxy-v2\n",
            d.addr
        ),
    )
    .expect("write haproxy.cfg");
    let _haproxy = Haproxy(
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haproxy"),
    );
    let front = SocketAddr::from(([127, 0, 0, 1], front));
    wait_until(WAIT, "haproxy to listen", || {
        TcpStream::connect(front).is_ok()
    });
    // Connect from 127.0.0.3 so the real address differs from the proxy's (127.0.0.1).
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    sock.bind(&SocketAddr::from(([127, 0, 0, 3], 0)).into())
        .expect("bind");
    sock.connect_timeout(&front.into(), WAIT).expect("connect");
    let stream: TcpStream = sock.into();
    let me = stream.local_addr().expect("local addr");
    let mut c = Client::from_stream(stream);
    c.join_as("viahaproxy");
    c.send("hello through haproxy");
    assert_eq!(
        addrs_in_list(&d),
        vec![("viahaproxy".to_owned(), me.to_string())]
    );
    c.reader.get_mut().write_all(b"/quit\n").expect("quit");
    assert_eq!(refused_proxy(&d), 0);
}

/// The TLS listener takes the same two keys: the header comes before the handshake, the real
/// address is what `chatctl list` shows; without the option a header there is refused by name.
#[test]
fn the_tls_listener_reads_the_header_before_the_handshake() {
    use crate::helper::tls::Pki;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, StreamOwned};

    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "proxy test CA");
    let (cert, key, _) = pki.leaf("server");
    let d = TestDaemon::with(
        Pki::config(&cert, &key)
            .set("tls", "proxy-protocol", "true")
            .set("tls", "trusted-proxies", r#"["127.0.0.1/32"]"#)
            .set_str("limits", "name-timeout", "2s"),
    )
    .start();
    let client = SocketAddr::from(([198, 51, 100, 7], 40000));
    let mut tcp = TcpStream::connect_timeout(&d.tls_addr(), WAIT).expect("connect");
    tcp.set_read_timeout(Some(WAIT)).expect("timeout");
    tcp.write_all(&v2(client, d.tls_addr().port()))
        .expect("send header");
    let name = ServerName::try_from("localhost").expect("server name");
    let conn = ClientConnection::new(pki.client_config(), name).expect("client connection");
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .expect("TLS handshake after the header");
    }
    let mut tina = Client::new(tls);
    tina.join_as("tina");
    let seen = addrs_in_list(&d);
    assert!(
        seen.contains(&("tina".to_owned(), client.to_string())),
        "list shows the real address: {seen:?}"
    );

    // The plain TCP listener of the same daemon has no PROXY option: a header there is
    // refused, and so is one on a TLS listener without the option.
    let (_dir2, pki2, plain) = {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new(dir.path(), "plain CA");
        let (cert, key, _) = pki.leaf("server");
        let d = TestDaemon::with(Pki::config(&cert, &key)).start();
        (dir, pki, d)
    };
    let _ = pki2;
    let before = refused_proxy(&plain);
    let mut s = TcpStream::connect_timeout(&plain.tls_addr(), WAIT).expect("connect");
    s.write_all(&v1(client, plain.tls_addr()))
        .expect("send header");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    wait_until(WAIT, "the stray header to be counted", || {
        refused_proxy(&plain) == before + 1
    });
    assert!(
        plain.log().contains("tls.proxy-protocol"),
        "the log names the key: {}",
        plain.log()
    );
}

/// `server.proxy-protocol` and `server.trusted-proxies` apply on reload, to new connections:
/// turned on, a header names the real client; turned off again, a header is refused.
#[test]
fn the_proxy_keys_apply_on_reload() {
    let d = TestDaemon::with(Config::test()).start();
    let client: SocketAddr = "203.0.113.9:40009".parse().expect("addr");
    d.edit_config(|c| {
        c.set("server", "proxy-protocol", "true").set(
            "server",
            "trusted-proxies",
            r#"["127.0.0.1/32"]"#,
        )
    });
    let report = d.sighup_reload();
    assert!(report.contains("server.proxy-protocol"), "{report}");
    let mut c = through(&d, [127, 0, 0, 1], &v1(client, d.addr));
    c.join_as("late");
    assert!(
        addrs_in_list(&d).contains(&("late".to_owned(), client.to_string())),
        "{:?}",
        addrs_in_list(&d)
    );

    d.edit_config(|c| c.set("server", "proxy-protocol", "false"));
    d.sighup_reload();
    let before = refused_proxy(&d);
    let mut refused = through(&d, [127, 0, 0, 1], &v1(client, d.addr));
    closed(&mut refused);
    assert_eq!(refused_proxy(&d), before + 1);
}
