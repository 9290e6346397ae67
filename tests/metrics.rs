//! `/metrics` against the real daemon: the output passes `promtool check metrics`, other paths
//! are 404, the numbers move with real traffic and equal `chatctl status --json`, and the
//! shipped Prometheus config and alert rules pass promtool.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};

use socket2::{Domain, Socket, Type};

use crate::helper::{Client, Config, TestDaemon, WAIT, free_port, require, wait_until};

/// A daemon serving metrics on a free loopback port; returns it and that address.
fn daemon_with_metrics(edit: impl FnOnce(Config) -> Config) -> (TestDaemon, SocketAddr) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let d = TestDaemon::with(edit(Config::test().set_str(
        "metrics",
        "listen",
        &addr.to_string(),
    )))
    .start();
    (d, addr)
}

/// One HTTP/1.1 request; the status code and the body.
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, WAIT).expect("connect to metrics");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {raw:?}"));
    (code, body.to_owned())
}

fn scrape(addr: SocketAddr) -> String {
    let (code, body) = http(addr, "GET", "/metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// The value of the sample `series` (name with labels, as printed) in a scrape.
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// Runs `promtool ARGS` with `input` on stdin; panics with its output unless it succeeds.
fn promtool(args: &[&str], input: &str) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_pass_promtool_and_other_paths_are_404() {
    if !require("promtool", "apt-get install prometheus") {
        return;
    }
    let (d, addr) = daemon_with_metrics(|c| c);
    // Some traffic first, so the histogram and labelled families have non-zero samples.
    let (mut a, mut b) = d.pair("alice", "bob");
    a.send("hello");
    b.expect_prefix("alice: hello");
    promtool(&["check", "metrics"], &scrape(addr));
    assert_eq!(http(addr, "GET", "/").0, 404);
    assert_eq!(http(addr, "GET", "/metrics/x").0, 404);
    assert_eq!(http(addr, "POST", "/metrics").0, 405);
}

#[test]
fn metrics_move_with_traffic_and_equal_status() {
    let (d, addr) = daemon_with_metrics(|c| c.set("limits", "max-connections-per-ip", "3"));
    let before = scrape(addr);
    assert_eq!(sample(&before, "chatd_messages_total"), 0);

    let (mut alice, mut bob) = d.pair("alice", "bob");
    for i in 0..3 {
        alice.send(&format!("line {i}"));
        bob.expect_prefix(&format!("alice: line {i}"));
    }
    let mut carol = d.join("carol");
    carol.send("/quit");
    carol.until_eof();
    let out = d.chatctl(&["kick", "bob"]);
    assert!(out.status.success(), "{out:?}");
    bob.until_eof();
    wait_until(WAIT, "bob and carol gone", || {
        d.status()["response"]["connections"].as_u64() == Some(1)
    });
    // Refused at accept: a banned address, then the per-address cap (alice holds one of 3).
    assert!(d.chatctl(&["ban", "127.0.0.2"]).status.success());
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    sock.bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into())
        .expect("bind");
    sock.connect_timeout(&d.addr.into(), WAIT).expect("connect");
    let mut banned = Client::from_stream(sock.into());
    banned.expect_prefix("*** ERR banned");
    let held: Vec<Client> = (0..2).map(|_| d.connect()).collect();
    let mut over = d.connect();
    over.expect_prefix("*** ERR too-many-connections");
    drop(held);
    wait_until(WAIT, "only alice connected", || {
        d.status()["response"]["connections"].as_u64() == Some(1)
    });

    let m = scrape(addr);
    let s = d.chatctl_json(&["status"]);
    let s = &s["response"];
    let num = |p: &str| {
        s.pointer(p)
            .and_then(serde_json::Value::as_u64)
            .unwrap_or_else(|| panic!("no {p} in {s}"))
    };
    let pairs: &[(&str, &str)] = &[
        ("chatd_users", "/users"),
        ("chatd_messages_total", "/messages"),
        ("chatd_deliveries_total", "/deliveries"),
        ("chatd_sent_bytes_total", "/activity/bytes_sent"),
        ("chatd_connections{listener=\"tcp\"}", "/activity/open_tcp"),
        (
            "chatd_disconnects_total{reason=\"quit\"}",
            "/activity/quits",
        ),
        ("chatd_disconnects_total{reason=\"kick\"}", "/kicks"),
        (
            "chatd_disconnects_total{reason=\"error\"}",
            "/activity/lost",
        ),
        (
            "chatd_connections_refused_total{reason=\"banned\"}",
            "/limits/refused_banned",
        ),
        (
            "chatd_connections_refused_total{reason=\"per_ip\"}",
            "/limits/refused_per_ip",
        ),
        (
            "chatd_connections_refused_total{reason=\"proxy\"}",
            "/limits/refused_proxy",
        ),
        ("chatd_reloads_total{result=\"ok\"}", "/reloads"),
        (
            "chatd_reloads_total{result=\"failed\"}",
            "/activity/reload_failures",
        ),
        (
            "chatd_fanout_duration_seconds_count",
            "/activity/fanout_count",
        ),
        ("chatd_send_queue_bytes", "/activity/queued_bytes"),
    ];
    for (series, path) in pairs {
        assert_eq!(sample(&m, series), num(path), "{series} vs status {path}");
    }
    // And they moved the way the traffic says.
    assert_eq!(sample(&m, "chatd_users"), 1);
    assert_eq!(sample(&m, "chatd_messages_total"), 3);
    assert_eq!(sample(&m, "chatd_fanout_duration_seconds_count"), 3);
    assert!(sample(&m, "chatd_deliveries_total") >= 3);
    assert!(sample(&m, "chatd_sent_bytes_total") > 100);
    assert_eq!(sample(&m, "chatd_disconnects_total{reason=\"quit\"}"), 1);
    assert_eq!(sample(&m, "chatd_disconnects_total{reason=\"kick\"}"), 1);
    assert_eq!(
        sample(&m, "chatd_connections_refused_total{reason=\"banned\"}"),
        1
    );
    assert_eq!(
        sample(&m, "chatd_connections_refused_total{reason=\"per_ip\"}"),
        1
    );
    assert!(sample(&m, "process_resident_memory_bytes") > 1 << 20);

    // A failed reload is counted on both sides too.
    std::fs::write(&d.config_path, "[limits]\nmax-line-length = 1\n").expect("write config");
    assert!(!d.chatctl(&["reload"]).status.success());
    let m = scrape(addr);
    assert_eq!(sample(&m, "chatd_reloads_total{result=\"failed\"}"), 1);
    assert_eq!(
        d.chatctl_json(&["status"])["response"]["activity"]["reload_failures"].as_u64(),
        Some(1)
    );
}

#[test]
fn shipped_prometheus_config_and_alert_rules_pass_promtool() {
    if !require("promtool", "apt-get install prometheus") {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/prometheus");
    for (what, file) in [("rules", "chatd-alerts.yml"), ("config", "prometheus.yml")] {
        let out = Command::new("promtool")
            .args(["check", what])
            .arg(dir.join(file))
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool check {what} {file}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
