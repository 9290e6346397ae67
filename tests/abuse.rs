//! Hostile clients against the real daemon: floods, per-address limits, stalled readers,
//! look-alike names, bans, reload storms, fd exhaustion, reset and half-open peers. Each test
//! shows that the abuser is contained and that everyone else keeps chatting, losing nothing.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use socket2::{Domain, Socket, Type};

use crate::helper::{
    Client, Config, TestDaemon, WAIT, agreed_order, require, require_root, wait_until,
};

/// A client whose connection comes from `src` (any 127.0.0.0/8 address is local on Linux), so
/// per-address limits and address bans can be tested on one machine.
fn connect_from(src: [u8; 4], to: SocketAddr) -> Client {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    sock.bind(&SocketAddr::from((src, 0)).into())
        .expect("bind source address");
    sock.connect_timeout(&to.into(), WAIT).expect("connect");
    Client::from_stream(sock.into())
}

/// `chatctl status --json`, parsed.
fn status(d: &TestDaemon) -> serde_json::Value {
    d.chatctl_json(&["status"])
}

/// One limit counter from `chatctl status --json`.
fn counter(d: &TestDaemon, name: &str) -> u64 {
    let s = status(d);
    s.pointer(&format!("/response/limits/{name}"))
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no counter {name} in {s}"))
}

#[test]
fn a_flooder_is_refused_then_disconnected_while_others_chat() {
    let d =
        TestDaemon::start("[limits]\nmessage-rate = 1\nmessage-burst = 5\nflood-disconnect = 4\n");
    let (mut a, mut f) = d.pair("alice", "flood");
    let burst: String = (0..30).map(|k| format!("spam {k}\n")).collect();
    f.send_raw(burst.as_bytes());
    let replies = f.until_eof();
    let limited = replies
        .iter()
        .filter(|l| l.starts_with("*** ERR rate-limited "))
        .count();
    assert!(limited >= 1, "{replies:?}");
    assert!(
        replies[0].contains("limits.message-rate"),
        "the refusal names its key: {replies:?}"
    );
    let last = replies.last().cloned().unwrap_or_default();
    assert!(last.starts_with("*** ERR flooding "), "{replies:?}");
    assert!(last.contains("limits.flood-disconnect"), "{last}");

    // alice saw the accepted part of the burst, in order, then the flooder leave; then the
    // room goes on as normal.
    let mut seen = Vec::new();
    loop {
        let l = a.line();
        if l.starts_with("*** LEAVE flood") {
            assert!(l.contains("flooding"), "{l}");
            break;
        }
        seen.push(l);
    }
    assert!(!seen.is_empty() && seen.len() < 30, "{seen:?}");
    for (k, l) in seen.iter().enumerate() {
        assert_eq!(l, &format!("flood: spam {k}"));
    }
    let mut b = d.join("bob");
    a.expect_prefix("*** JOIN bob");
    b.send("still here");
    assert_eq!(a.line(), "bob: still here");
    assert!(counter(&d, "rate_limited") >= 1);
    assert_eq!(counter(&d, "flood_disconnects"), 1);
    let log = d.log();
    assert!(log.contains("disconnecting a flooding client"), "{log}");
    assert_eq!(log.matches("rate limiting a client").count(), 1, "{log}");
}

#[test]
fn rate_limit_refills_over_time() {
    let d = TestDaemon::start("[limits]\nmessage-rate = 20\nmessage-burst = 3\n");
    let (mut a, mut b) = d.pair("alice", "bob");
    // Lines spaced wider than the refill interval are never refused, however many there are.
    for k in 0..15 {
        std::thread::sleep(Duration::from_millis(120));
        b.send(&format!("paced {k}"));
        assert_eq!(a.line(), format!("bob: paced {k}"));
    }
    assert_eq!(counter(&d, "rate_limited"), 0);
}

#[test]
fn per_address_limit_refuses_the_extra_connection_only() {
    let d = TestDaemon::start("[limits]\nmax-connections-per-ip = 2\n");
    let mut one = connect_from([127, 0, 0, 1], d.addr);
    one.expect_prefix("*** HELLO");
    let mut two = connect_from([127, 0, 0, 1], d.addr);
    two.expect_prefix("*** HELLO");
    let mut three = connect_from([127, 0, 0, 1], d.addr);
    let line = three.line();
    assert!(line.starts_with("*** ERR too-many-connections "), "{line}");
    assert!(line.contains("limits.max-connections-per-ip"), "{line}");
    assert_eq!(three.try_line(), None);
    // Another address is not affected.
    let mut other = connect_from([127, 0, 0, 2], d.addr);
    other.join_as("other");
    // A closed connection frees its slot.
    drop(one);
    wait_until(WAIT, "the slot to be freed", || {
        let mut c = connect_from([127, 0, 0, 1], d.addr);
        c.line().starts_with("*** HELLO")
    });
    assert!(counter(&d, "refused_per_ip") >= 1);
    assert!(d.log().contains("too many from this address"));
    drop(two);
}

#[test]
fn a_stalled_reader_is_dropped_and_never_delays_the_others() {
    let d = TestDaemon::start_config(Config::test().no_rate_limit().section(
        "limits",
        [("max-queue-bytes", "65536"), ("max-line-length", "8192")],
    ));
    let mut a = d.join("alice");
    let mut b = d.join("bob");
    // The stalled client: a tiny receive buffer, and it never reads after joining.
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    sock.connect_timeout(&d.addr.into(), WAIT).expect("connect");
    let mut s = Client::from_stream(sock.into());
    s.join_as("stalled");
    s.send("/who");
    s.expect_prefix("*** WHO");
    a.expect_prefix("*** JOIN stalled");
    b.expect_prefix("*** JOIN stalled");

    // Lock-step: alice sends message k only once bob has received message k-1. bob therefore
    // receives every message while the stalled reader's queue fills up, overflows and gets it
    // disconnected; the order of events below is the proof, not a clock.
    let pad = "x".repeat(8000);
    let mut leave_at = None;
    let mut k = 0;
    while k < 5000 {
        a.send(&format!("{k} {pad}"));
        let want = format!("alice: {k} {pad}");
        loop {
            let l = b.line();
            if l == want {
                break;
            }
            assert!(
                l.starts_with("*** LEAVE stalled left (too slow"),
                "bob got {:.80}",
                l
            );
            leave_at.get_or_insert(k);
        }
        k += 1;
        if leave_at.is_some_and(|at| k > at + 20) {
            break;
        }
    }
    let at = leave_at.expect("the stalled reader was never disconnected");
    assert!(
        at > 0,
        "bob received messages while the stalled queue filled"
    );
    // The stalled client is gone for good: what it finally reads ends, it was not kept alive.
    s.stream().shutdown(std::net::Shutdown::Write).ok();
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s.reader, &mut buf);
    assert!(
        buf.len() < 64 * 1024 + 8 * 1024 * 1024,
        "bounded backlog, got {}",
        buf.len()
    );
    assert_eq!(counter(&d, "slow_disconnects"), 1);
    assert!(d.log().contains("too slow"));
}

#[test]
fn look_alike_names_cannot_impersonate_an_online_user() {
    let d = TestDaemon::start("");
    let _alice = d.join("alice");
    let _cop = d.join("cop");
    let mut m = d.connect();
    m.expect_prefix("*** HELLO");
    for (name, code) in [
        ("ALICE", "name-taken"),
        ("\u{ff41}\u{ff4c}\u{ff49}\u{ff43}\u{ff45}", "name-taken"), // fullwidth "alice"
        ("\u{441}\u{43e}\u{440}", "name-taken"),                    // Cyrillic "сор"
        ("\u{430}lice", "name-invalid"),                            // Cyrillic a + Latin
        ("ali\u{200b}ce", "name-invalid"),                          // zero-width space
        ("al\u{202e}ice", "name-invalid"),                          // bidi override
        ("*** alice", "name-invalid"),
    ] {
        m.send(name);
        let l = m.line();
        assert!(l.starts_with(&format!("*** ERR {code} ")), "{name:?}: {l}");
    }
    m.send("mallory");
    m.expect_prefix("*** WELCOME mallory");
}

fn bans_json(d: &TestDaemon) -> serde_json::Value {
    d.chatctl_json(&["bans"])
}

#[test]
fn bans_disconnect_refuse_survive_a_restart_and_expire() {
    let mut d = TestDaemon::start("");
    let (mut bob, mut mallory) = d.pair("bob", "mallory");

    // A name ban disconnects at once, with the reason.
    let out = d.chatctl(&["ban", "mallory", "--duration", "1h", "--reason", "spamming"]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("mallory") && said.contains("disconnected"),
        "{said}"
    );
    let kicked = mallory.expect_prefix("*** KICKED");
    assert!(
        kicked.contains("spamming") && kicked.contains("until"),
        "{kicked}"
    );
    assert_eq!(mallory.try_line(), None);
    bob.expect_prefix("*** KICK mallory");

    // Coming back under the name, in any case or look-alike, is refused with reason and expiry.
    let mut again = d.connect();
    again.expect_prefix("*** HELLO");
    again.send("MALLORY");
    let refused = again.line();
    assert!(
        refused.starts_with("*** ERR banned you are banned until ")
            && refused.ends_with(": spamming"),
        "{refused}"
    );
    assert_eq!(again.try_line(), None);

    // Address and CIDR bans refuse at connect, before any name.
    assert!(d.chatctl(&["ban", "127.0.0.2"]).status.success());
    assert!(
        d.chatctl(&["ban", "127.0.0.8/29", "--reason", "bad block"])
            .status
            .success()
    );
    let mut c = connect_from([127, 0, 0, 2], d.addr);
    let l = c.line();
    assert!(
        l.starts_with("*** ERR banned you are banned permanently"),
        "{l}"
    );
    let mut c = connect_from([127, 0, 0, 13], d.addr);
    assert!(c.line().ends_with(": bad block"));
    let mut fine = connect_from([127, 0, 0, 16], d.addr);
    fine.join_as("fine");
    // A short ban, to expire by itself.
    assert!(
        d.chatctl(&["ban", "shortlived", "--duration", "1s"])
            .status
            .success()
    );
    let listed = bans_json(&d);
    let text = listed.to_string();
    for t in ["mallory", "127.0.0.2", "127.0.0.8/29", "shortlived"] {
        assert!(text.contains(t), "{t} not in {text}");
    }

    // Restart on the same config and state directory: the bans are still there.
    let state = d.dir.path().join("state");
    assert!(state.join("bans.json").is_file());
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait_exit(), Some(0));
    let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().expect("tempdir"));
    let text = std::fs::read_to_string(dir.path().join("chatd.toml")).expect("config");
    let d = TestDaemon::start_with_text(dir, &text);
    let listed = bans_json(&d).to_string();
    assert!(
        listed.contains("mallory") && listed.contains("127.0.0.8/29"),
        "{listed}"
    );
    let mut again = d.connect();
    again.expect_prefix("*** HELLO");
    again.send("mallory");
    assert!(again.line().starts_with("*** ERR banned "));
    // No temp file is left next to the state file.
    let leftovers: Vec<_> = std::fs::read_dir(&state)
        .expect("state dir")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "bans.json")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The 1s ban expires by itself; unban lifts the others; an unknown ban is exit code 5.
    wait_until(WAIT, "the short ban to expire", || {
        let mut c = d.connect();
        c.expect_prefix("*** HELLO");
        c.send("shortlived");
        c.line().starts_with("*** WELCOME")
    });
    assert!(d.chatctl(&["unban", "mallory"]).status.success());
    let _m = d.join("mallory");
    assert_eq!(d.chatctl(&["unban", "nobody"]).status.code(), Some(5));
    assert!(counter(&d, "refused_banned") >= 1);
}

#[test]
fn a_corrupt_ban_file_stops_startup_with_its_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::write(state.join("bans.json"), "{ not json").expect("write");
    let config = dir.path().join("chatd.toml");
    std::fs::write(
        &config,
        Config::test().with_paths_in(dir.path()).to_string(),
    )
    .expect("config");
    let out = Command::new(crate::helper::bin("chatd"))
        .arg("--config")
        .arg(&config)
        .env("NO_COLOR", "1")
        .output()
        .expect("run chatd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bans.json") && err.contains("line 1"), "{err}");
}

#[test]
fn reload_storm_under_load_drops_no_one_and_loses_nothing() {
    let d = TestDaemon::start_config(Config::test().no_rate_limit().motd("v0"));
    let mut senders: Vec<_> = (0..3).map(|i| d.join(&format!("s{i}"))).collect();
    let mut receivers: Vec<_> = (0..3).map(|i| d.join(&format!("r{i}"))).collect();
    for r in &mut receivers {
        r.send("/who");
        r.expect_prefix("*** WHO 6 ");
    }
    let per_sender = 300;
    let done = AtomicBool::new(false);
    let mut reloads = 0;
    std::thread::scope(|scope| {
        let handles: Vec<_> = senders
            .iter_mut()
            .enumerate()
            .map(|(i, s)| {
                scope.spawn(move || {
                    for k in 0..per_sender {
                        s.send(&format!("m{i}-{k}"));
                        // Spread the sending over the whole storm.
                        if k % 5 == 0 {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                    }
                })
            })
            .collect();
        // SIGHUP every few milliseconds (at least 100 of them); every fourth config is invalid
        // and must be rejected.
        while !handles.iter().all(|h| h.is_finished()) || reloads < 100 {
            let good = reloads % 4 != 3;
            let config = Config::test().no_rate_limit();
            let config = if good {
                config.motd(&format!("v{reloads}"))
            } else {
                config.set("room", "motd", "7")
            };
            let tmp = d.config_path.with_extension("tmp");
            std::fs::write(&tmp, d.render(config)).expect("write");
            std::fs::rename(&tmp, &d.config_path).expect("rename");
            d.signal(Signal::SIGHUP);
            reloads += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        done.store(true, Ordering::Relaxed);
    });
    assert!(done.load(Ordering::Relaxed));
    let order = agreed_order(&mut receivers, 3 * per_sender);
    let unique: HashSet<_> = order.iter().collect();
    assert_eq!(
        unique.len(),
        3 * per_sender,
        "a message was lost or duplicated"
    );
    // Rejected reloads were logged; the running config is one of the good ones.
    wait_until(WAIT, "reloads to be handled", || {
        d.log().contains("config reload failed") && d.log().contains("config reloaded")
    });
    let mut c = d.enter("later");
    let motd = c.line();
    assert!(motd.starts_with("*** MOTD v"), "{motd}");
}

fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces): utime is 14th, stime 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0)
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn prlimit_nofile(pid: i32, n: usize) {
    let out = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={n}:{n}"))
        .output()
        .expect("run prlimit");
    assert!(out.status.success(), "prlimit: {out:?}");
}

#[test]
fn fd_exhaustion_backs_off_without_spinning_and_recovers() {
    if !require("prlimit", "apt-get install util-linux") {
        return;
    }
    let d = TestDaemon::start("");
    let mut alice = d.join("alice");
    let pid = d.pid();
    let before = open_fds(pid);
    // Room for exactly two more connections, then accept(2) fails with EMFILE.
    prlimit_nofile(pid, before + 2);
    let mut held: Vec<TcpStream> = Vec::new();
    for _ in 0..8 {
        // The kernel completes the handshake into the backlog whatever chatd can accept.
        held.push(TcpStream::connect_timeout(&d.addr, WAIT).expect("connect"));
    }
    d.wait_log("cannot accept connections: out of resources");
    // Backing off, not spinning: over two seconds of sustained EMFILE chatd uses a small
    // fraction of a core (a spinning accept loop would use all of it).
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - t0;
    eprintln!("CPU while out of fds: {used} ticks in 2 s");
    assert!(used < 60, "chatd used {used} ticks of CPU while out of fds");
    // Users already in keep chatting meanwhile.
    alice.send("/who");
    alice.expect_prefix("*** WHO 1 alice");
    // Once descriptors are free again (the hard limit cannot be raised back, so by closing
    // connections), new connections are served; the admin socket needs a descriptor per
    // connection too, so the counters are read only now.
    drop(held);
    let mut bob = d.join("bob");
    bob.send("hi");
    assert_eq!(alice.expect_prefix("bob:"), "bob: hi");
    assert!(counter(&d, "accept_backoffs") >= 1);
}

#[test]
fn a_reset_connection_is_cleaned_up() {
    let d = TestDaemon::start("");
    let mut a = d.join("alice");
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    sock.connect_timeout(&d.addr.into(), WAIT).expect("connect");
    let mut r = Client::from_stream(sock.try_clone().expect("clone").into());
    r.join_as("resetter");
    a.expect_prefix("*** JOIN resetter");
    // SO_LINGER 0: close sends RST instead of FIN.
    sock.set_linger(Some(Duration::ZERO)).expect("linger");
    drop(r);
    drop(sock);
    let l = a.expect_prefix("*** LEAVE resetter");
    assert!(l.contains("connection lost"), "{l}");
    wait_until(WAIT, "the connection to be released", || {
        let s = status(&d);
        s.pointer("/response/connections")
            .and_then(serde_json::Value::as_u64)
            == Some(1)
    });
}

/// A network namespace joined to the host by a veth pair; removed on drop.
struct Netns {
    name: String,
    host_ip: IpAddr,
    peer_ip: IpAddr,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// `None` (with a note; under CI a failure) when not root, or without `ip` and `nft`.
    fn new() -> Option<Netns> {
        if !require_root("make a network namespace")
            || !require("ip", "apt-get install iproute2")
            || !require("nft", "apt-get install nftables")
        {
            return None;
        }
        let id = std::process::id() % 250 + 1;
        let name = format!("chatd-ho-{}", std::process::id());
        let (host, peer) = (format!("vh{id}x"), format!("vp{id}x"));
        let (host_ip, peer_ip) = (format!("10.231.{id}.1"), format!("10.231.{id}.2"));
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            host_ip: host_ip.parse().expect("ip"),
            peer_ip: peer_ip.parse().expect("ip"),
        };
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host]);
        ip(&["link", "set", &host, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{peer_ip}/30"),
            "dev",
            &peer,
        ]);
        ip(&["-n", &name, "link", "set", &peer, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Some(ns)
    }

    /// A TCP connection made from inside the namespace (a socket keeps the namespace it was
    /// created in, so only this short-lived thread has to enter it).
    fn connect(&self, to: SocketAddr) -> TcpStream {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("netns file");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            TcpStream::connect_timeout(&to, WAIT).expect("connect from the namespace")
        })
        .join()
        .expect("connect thread")
    }

    /// Drops every packet in and out of the namespace: the peer is now silently gone.
    fn blackhole(&self) {
        let rules = "table inet blackhole {\n\
                     chain in { type filter hook input priority 0; policy drop; }\n\
                     chain out { type filter hook output priority 0; policy drop; }\n}\n";
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run nft in the namespace");
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, rules.as_bytes()).expect("nft rules");
        }
        assert!(child.wait().expect("nft").success(), "nft failed");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it the pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

#[test]
fn a_half_open_peer_is_found_by_keepalive_and_its_slot_freed() {
    let Some(ns) = Netns::new() else { return };
    let d = TestDaemon::start_config(
        Config::test()
            .listen(&["127.0.0.1:0", &format!("{}:0", ns.host_ip)])
            .set_str("limits", "keepalive", "1s"),
    );
    let mut a = d.join("alice");
    let mut ghost = Client::from_stream(ns.connect(d.addr_on(ns.host_ip)));
    ghost.join_as("ghost");
    let joined = a.expect_prefix("*** JOIN ghost");
    assert!(joined.contains("ghost"));
    let listed = String::from_utf8_lossy(&d.chatctl(&["list"]).stdout).into_owned();
    assert!(listed.contains(&ns.peer_ip.to_string()), "{listed}");

    // The peer vanishes without a FIN or RST; room traffic keeps flowing to it.
    ns.blackhole();
    let start = Instant::now();
    a.send("anyone there?");
    let left = a.expect_prefix("*** LEAVE ghost");
    assert!(left.contains("connection lost"), "{left}");
    assert!(start.elapsed() < WAIT);
    a.send("/who");
    assert_eq!(a.expect_prefix("*** WHO"), "*** WHO 1 alice");
}
