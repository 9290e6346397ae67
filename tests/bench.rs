//! The load generator (`chat-bench`) runs end to end and tells the truth: on a tiny load against
//! the real chatd it reports sane, non-zero figures and a clean run, and against a deliberately
//! faulty server it counts the messages that server lost, duplicated and reordered. No speed is
//! asserted here; docs/performance.md holds the measured figures.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::helper::{Config, TestDaemon, bin, wait_child};

/// Longest any one benchmark run may take before the test kills it and fails.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// A daemon with what a load from one address needs lifted, as config/bench.toml does.
fn bench_daemon() -> TestDaemon {
    TestDaemon::start_config(Config::test().no_rate_limit().set(
        "limits",
        "max-connections-per-ip",
        "1000",
    ))
}

/// Runs chat-bench with `args`; returns its exit code and its one JSON line.
pub(crate) fn run_bench(args: &[&str]) -> (Option<i32>, Value) {
    let out_path = tempfile::NamedTempFile::new().expect("temp file");
    let stdout = out_path.reopen().expect("reopen");
    let mut child = Command::new(bin("chat-bench"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn chat-bench");
    let Some(status) = wait_child(&mut child, RUN_LIMIT) else {
        panic!("chat-bench {args:?} ran longer than {RUN_LIMIT:?}");
    };
    let text = std::fs::read_to_string(out_path.path()).expect("read output");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "expected one JSON line, got {text:?}");
    let report: Value = serde_json::from_str(lines[0]).expect("output is JSON");
    (status.code(), report)
}

/// Runs `chat-bench MODE --addr ADDR [--pid PID] REST` against `d`, `command` being
/// `MODE REST` (words split at white space); `--pid` when `with_pid`.
fn run_bench_on(d: &TestDaemon, with_pid: bool, command: &str) -> (Option<i32>, Value) {
    let (addr, pid) = (d.addr.to_string(), d.pid().to_string());
    let mut words = command.split_whitespace();
    let mut args = vec![words.next().expect("a mode"), "--addr", &addr];
    if with_pid {
        args.extend(["--pid", &pid]);
    }
    args.extend(words);
    run_bench(&args)
}

fn num(v: &Value, path: &str) -> f64 {
    let mut cur = v;
    for key in path.split('.') {
        cur = &cur[key];
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number in {v}"))
}

#[test]
fn fanout_against_chatd_reports_a_clean_run() {
    let d = bench_daemon();
    let (code, r) = run_bench_on(&d, true, "fanout -c 6 -s 2 -d 1 --timeout 30 --label test");
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["mode"], "fanout");
    assert_eq!(r["label"], "test");
    assert_eq!(num(&r, "seated"), 6.0);
    let sent = num(&r, "sent");
    assert!(sent > 0.0, "{r}");
    // Every message reaches every client but its sender, exactly once and in order.
    assert_eq!(num(&r, "expected_deliveries"), sent * 5.0);
    assert_eq!(num(&r, "deliveries"), sent * 5.0, "{r}");
    for key in [
        "lost",
        "duplicated",
        "reordered",
        "bogus",
        "disconnected",
        "errors",
    ] {
        assert_eq!(num(&r, key), 0.0, "{key} in {r}");
    }
    assert_eq!(r["timed_out"], false);
    assert!(num(&r, "deliveries_per_s") > 0.0, "{r}");
    assert!(num(&r, "elapsed_s") > 0.0, "{r}");
    let (p50, p99, p999, max) = (
        num(&r, "latency_us.p50"),
        num(&r, "latency_us.p99"),
        num(&r, "latency_us.p999"),
        num(&r, "latency_us.max"),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= p999 && p999 <= max, "{r}");
    assert_eq!(num(&r, "latency_us.samples"), sent * 5.0);
    assert!(num(&r, "server.cpu_s") >= 0.0, "{r}");
    assert!(num(&r, "server.rss_kib") > 0.0, "{r}");
    assert!(num(&r, "server.rss_peak_kib") >= num(&r, "server.rss_kib"));
}

#[test]
fn fixed_rate_fanout_sends_at_that_rate() {
    let d = bench_daemon();
    let (code, r) = run_bench_on(&d, false, "fanout -c 4 -s 2 --rate 50 -d 1 --timeout 30");
    assert_eq!(code, Some(0), "{r}");
    // Two senders at 50 messages/s for one second; generous bounds for a loaded machine.
    let sent = num(&r, "sent");
    assert!((60.0..=140.0).contains(&sent), "sent {sent}: {r}");
    assert_eq!(num(&r, "deliveries"), sent * 3.0, "{r}");
    assert!(r["server"].is_null(), "no --pid, no server figures: {r}");
}

#[test]
fn idle_mode_seats_everyone_and_reads_rss() {
    let d = bench_daemon();
    let (code, r) = run_bench_on(
        &d,
        true,
        "idle -c 30 --join-rate 300 --settle 0.2 --hold 0.2 --timeout 30",
    );
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(num(&r, "seated"), 30.0);
    assert_eq!(num(&r, "still_open"), 30.0);
    // Everyone sees the join of everyone who came after them: 29 + 28 + ... + 0.
    assert_eq!(num(&r, "joins_expected"), 435.0);
    assert_eq!(num(&r, "joins_received"), 435.0);
    assert!(num(&r, "all_seated_s") > 0.0, "{r}");
    assert!(num(&r, "server.rss_kib_idle") > 0.0, "{r}");
    assert!(r["server"]["rss_per_conn_bytes"].is_number(), "{r}");
    assert_eq!(r["timed_out"], false);
}

/// A bench daemon that also serves the web client (`[web]`, on an ephemeral port).
fn bench_web_daemon() -> TestDaemon {
    TestDaemon::start_config(
        Config::test()
            .no_rate_limit()
            .set("limits", "max-connections-per-ip", "1000")
            .set("web", "listen", r#"["127.0.0.1:0"]"#),
    )
}

/// Runs `chat-bench MODE --websocket --addr WEB --pid PID REST` against `d`'s web listener.
fn run_ws_bench(d: &TestDaemon, command: &str) -> (Option<i32>, Value) {
    let (addr, pid) = (d.web_addr().to_string(), d.pid().to_string());
    let mut words = command.split_whitespace();
    let mut args = vec![
        words.next().expect("a mode"),
        "--websocket",
        "--addr",
        &addr,
    ];
    args.extend(["--pid", &pid]);
    args.extend(words);
    run_bench(&args)
}

#[test]
fn fanout_over_websocket_reports_a_clean_run() {
    let d = bench_web_daemon();
    let (code, r) = run_ws_bench(&d, "fanout -c 6 -s 2 -d 1 --timeout 30");
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["transport"], "ws");
    assert_eq!(r["tls"], false);
    assert_eq!(num(&r, "seated"), 6.0, "{r}");
    assert_eq!(num(&r, "websocket.upgraded"), 6.0, "{r}");
    let sent = num(&r, "sent");
    assert!(sent > 0.0, "{r}");
    // Every message reaches every client but its sender, once, in one order for all.
    assert_eq!(num(&r, "deliveries"), sent * 5.0, "{r}");
    assert_eq!(num(&r, "orders_seen"), 1.0, "{r}");
    for key in [
        "lost",
        "duplicated",
        "reordered",
        "bogus",
        "disconnected",
        "errors",
    ] {
        assert_eq!(num(&r, key), 0.0, "{key} in {r}");
    }
    assert_eq!(r["websocket"]["close_frames"], serde_json::json!({}), "{r}");
    assert!(num(&r, "deliveries_per_s") > 0.0, "{r}");
    let (p50, p99) = (num(&r, "latency_us.p50"), num(&r, "latency_us.p99"));
    assert!(0.0 < p50 && p50 <= p99, "{r}");
    assert_eq!(num(&r, "latency_us.samples"), sent * 5.0);
    assert!(num(&r, "server.cpu_s") >= 0.0, "{r}");
    assert!(num(&r, "server.rss_kib") > 0.0, "{r}");
}

#[test]
fn idle_over_websocket_reads_rss_per_connection() {
    let d = bench_web_daemon();
    let (code, r) = run_ws_bench(
        &d,
        "idle -c 30 --join-rate 300 --settle 0.2 --hold 0.2 --timeout 30",
    );
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["transport"], "ws");
    assert_eq!(num(&r, "seated"), 30.0, "{r}");
    assert_eq!(num(&r, "still_open"), 30.0, "{r}");
    assert_eq!(num(&r, "joins_received"), 435.0, "{r}");
    assert!(num(&r, "server.rss_kib_idle") > 0.0, "{r}");
    assert!(r["server"]["rss_per_conn_bytes"].is_number(), "{r}");
    assert_eq!(r["timed_out"], false);
}

#[test]
fn fanout_over_wss_reports_a_clean_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = crate::helper::Pki::new(dir.path(), "bench web CA");
    let (cert, key, _) = pki.leaf("web");
    let d = TestDaemon::start_config(
        crate::helper::Pki::config(&cert, &key)
            .no_rate_limit()
            .set("limits", "max-connections-per-ip", "1000")
            .set("web", "listen", r#"["127.0.0.1:0"]"#)
            .set("web", "tls", "true"),
    );
    let (addr, ca) = (d.web_addr().to_string(), pki.ca_path.display().to_string());
    let (code, r) = run_bench(&[
        "fanout",
        "--websocket",
        "--ca",
        &ca,
        "--addr",
        &addr,
        "-c",
        "4",
        "-s",
        "2",
        "-d",
        "1",
        "--timeout",
        "30",
    ]);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["transport"], "wss");
    assert_eq!(num(&r, "seated"), 4.0, "{r}");
    let sent = num(&r, "sent");
    assert!(sent > 0.0, "{r}");
    assert_eq!(num(&r, "deliveries"), sent * 3.0, "{r}");
    for key in ["lost", "duplicated", "reordered", "errors", "disconnected"] {
        assert_eq!(num(&r, key), 0.0, "{key} in {r}");
    }
}

#[test]
fn websocket_from_a_foreign_origin_is_reported_refused() {
    let d = bench_web_daemon();
    let (code, r) = run_ws_bench(
        &d,
        "idle -c 1 --origin http://evil.example --settle 0 --hold 0 --timeout 30",
    );
    assert_eq!(code, Some(1), "{r}");
    assert_eq!(num(&r, "seated"), 0.0, "{r}");
    let e = r["first_error"].as_str().unwrap_or_default();
    assert!(e.contains("upgrade refused: HTTP/1.1 403"), "{r}");
}

#[test]
fn refuses_non_loopback_addresses() {
    let out = Command::new(bin("chat-bench"))
        .args(["idle", "--addr", "192.0.2.1:42069", "--timeout", "1"])
        .stdin(Stdio::null())
        .output()
        .expect("run chat-bench");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
}

/// A chat server that speaks just enough of the protocol for chat-bench (hello, welcome, join
/// announcements, `name: text` relay) and mishandles some relayed messages on purpose: per
/// (receiver, sender) pair, of every 20 messages the 5th is dropped, the 9th is sent twice and
/// the 14th is held back and sent after the next one from the same sender.
struct FaultyServer {
    addr: SocketAddr,
}

#[derive(Default)]
struct FaultyRoom {
    /// Joined clients: name and write half.
    members: Vec<(String, TcpStream)>,
    /// Messages relayed so far, per (receiver, sender).
    relayed: HashMap<(String, String), u64>,
    /// A message held back, per (receiver, sender).
    held: HashMap<(String, String), Vec<u8>>,
}

impl FaultyServer {
    fn start() -> FaultyServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let room = Arc::new(Mutex::new(FaultyRoom::default()));
        // The accept thread ends with the test process; every client thread ends at EOF.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let room = room.clone();
                std::thread::spawn(move || {
                    let _ = Self::serve(stream, &room);
                });
            }
        });
        FaultyServer { addr }
    }

    fn serve(stream: TcpStream, room: &Mutex<FaultyRoom>) -> std::io::Result<()> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(RUN_LIMIT))?;
        let mut out = stream.try_clone()?;
        out.write_all(b"*** HELLO faulty - welcome! Please send your name.\n")?;
        let mut lines = BufReader::new(stream).lines();
        let Some(name) = lines.next().transpose()? else {
            return Ok(());
        };
        {
            let mut r = room.lock().unwrap_or_else(|e| e.into_inner());
            out.write_all(format!("*** WELCOME {name} you are chatting as {name}\n").as_bytes())?;
            let join = format!("*** JOIN {name} joined\n");
            for (_, w) in &mut r.members {
                w.write_all(join.as_bytes())?;
            }
            r.members.push((name.clone(), out));
        }
        for line in lines {
            let line = format!("{name}: {}\n", line?);
            let mut guard = room.lock().unwrap_or_else(|e| e.into_inner());
            let r = &mut *guard;
            for (to, w) in &mut r.members {
                if *to == name {
                    continue;
                }
                let pair = (to.clone(), name.clone());
                let n = r.relayed.entry(pair.clone()).or_insert(0);
                *n += 1;
                match *n % 20 {
                    5 => {}
                    9 => {
                        w.write_all(line.as_bytes())?;
                        w.write_all(line.as_bytes())?;
                    }
                    14 => {
                        r.held.insert(pair, line.clone().into_bytes());
                    }
                    _ => {
                        w.write_all(line.as_bytes())?;
                        if let Some(late) = r.held.remove(&pair) {
                            w.write_all(&late)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[test]
fn detects_lost_duplicated_and_reordered_messages() {
    let server = FaultyServer::start();
    let addr = server.addr.to_string();
    // Fixed rate and no window: a lossy server would otherwise stall a windowed sender.
    let (code, r) = run_bench(&[
        "fanout",
        "--addr",
        &addr,
        "-c",
        "4",
        "-s",
        "2",
        "--rate",
        "100",
        "--window",
        "0",
        "-d",
        "1",
        "--drain",
        "0.5",
        "--timeout",
        "30",
    ]);
    assert_eq!(code, Some(1), "a faulty run must not exit 0: {r}");
    assert_eq!(num(&r, "seated"), 4.0, "{r}");
    let sent = num(&r, "sent");
    assert!(sent >= 40.0, "{r}");
    let (lost, dup, reordered) = (num(&r, "lost"), num(&r, "duplicated"), num(&r, "reordered"));
    assert!(lost > 0.0, "loss not detected: {r}");
    assert!(dup > 0.0, "duplicates not detected: {r}");
    assert!(reordered > 0.0, "reordering not detected: {r}");
    // Deliveries count unique messages only: duplicates never inflate them.
    assert_eq!(
        num(&r, "deliveries") + lost,
        num(&r, "expected_deliveries"),
        "{r}"
    );
    // About one in 20 of each, not more: the checks do not over-report either. (Lost also counts
    // a message still held back when sending stopped, at most one per pair.)
    let expected = num(&r, "expected_deliveries");
    assert!(lost <= expected / 20.0 + 12.0, "{r}");
    assert!(dup <= expected / 20.0 + 6.0, "{r}");
    assert!(reordered <= expected / 20.0 + 6.0, "{r}");
}

#[test]
fn bench_config_lifts_only_the_load_limits() {
    fn flatten(prefix: &str, v: &toml::Value, out: &mut HashMap<String, toml::Value>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.clone());
            }
        }
    }
    let root = format!("{}/..", env!("CARGO_MANIFEST_DIR"));
    let read = |rel: &str| -> HashMap<String, toml::Value> {
        let text = std::fs::read_to_string(format!("{root}/{rel}")).expect("read config");
        let value: toml::Value = toml::from_str(&text).expect("parse config");
        let mut out = HashMap::new();
        flatten("", &value, &mut out);
        out
    };
    let (shipped, bench) = (read("config/chatd.toml"), read("config/bench.toml"));
    let keys: BTreeSet<&String> = shipped.keys().chain(bench.keys()).collect();
    let differ: Vec<&str> = keys
        .into_iter()
        .filter(|k| shipped.get(*k) != bench.get(*k))
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        differ,
        [
            "limits.max-clients",
            "limits.max-connections-per-ip",
            "limits.message-burst",
            "limits.message-rate",
        ]
    );
    // And chatd itself accepts it.
    let out = Command::new(crate::helper::bin("chatd"))
        .args(["--check-config", "--config"])
        .arg(format!("{root}/config/bench.toml"))
        .stdin(Stdio::null())
        .output()
        .expect("run chatd --check-config");
    assert!(out.status.success(), "{out:?}");
}
