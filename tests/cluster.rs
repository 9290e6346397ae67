//! A room served by several chatd nodes through NATS JetStream (docs/cluster.md), with real
//! `nats-server` and `chatd` processes: one order on every node, names unique cluster-wide,
//! every command across nodes, one history, the failures the docs promise to survive, and
//! hostile messages put straight on the room's subject. Each test runs its own NATS server(s)
//! and its own room, so the tests run in parallel.

use std::collections::HashMap;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::helper::config::Config;
use crate::helper::nats::{cluster_config, room_name};
use crate::helper::{Client, NatsServer, TestDaemon, WAIT, require, wait_for, wait_until};

/// Whether nats-server is installed (the tests skip, or fail under CI, without it).
fn nats_present() -> bool {
    require("nats-server", "apt-get install nats-server")
}

/// Starts a chatd node for each of `nodes` in `room` on `nats`; returns once every one
/// follows the room.
fn start_nodes(nats: &[&NatsServer], room: &str, nodes: &[&str]) -> Vec<TestDaemon> {
    start_ready(nodes.len(), |i| cluster_config(nats, room, nodes[i]))
}

/// Starts `n` chatd nodes, node `i` on `config(i)`; returns once every one follows the room.
fn start_ready(n: usize, config: impl FnMut(usize) -> Config) -> Vec<TestDaemon> {
    let ds = TestDaemon::start_many(n, config);
    for d in &ds {
        d.wait_cluster_ready();
    }
    ds
}

/// Waits until every node in `ds` counts exactly `nodes` as live.
fn wait_live(ds: &[&TestDaemon], nodes: &[&str]) {
    for d in ds {
        let last = std::cell::RefCell::new(serde_json::Value::Null);
        wait_for(
            WAIT,
            &format!("live nodes {nodes:?}"),
            || {
                let c = d.cluster_status();
                let live: Vec<&str> = c["live_nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n.as_str())
                    .collect();
                let done = live == nodes;
                *last.borrow_mut() = c;
                done.then_some(())
            },
            || format!("last status: {}\n{}", last.borrow(), d.log()),
        );
    }
}

/// `from` (named `name`) says `tag`; every one of `to` reads up to it. Returns what each read
/// before it (the tag's line not included).
fn sync(from: &mut Client, name: &str, tag: &str, to: &mut [&mut Client]) -> Vec<Vec<String>> {
    from.send(tag);
    let want = format!("{name}: {tag}");
    to.iter_mut()
        .map(|c| {
            let mut lines = c.lines_until(|l| l == want);
            lines.pop();
            lines
        })
        .collect()
}

/// The next line if one comes within `d` (`None` if none does); panics at EOF.
fn line_within(c: &mut Client, d: Duration) -> Option<String> {
    use std::io::BufRead;
    c.stream().set_read_timeout(Some(d)).expect("timeout");
    let mut buf = Vec::new();
    let got = c.reader.read_until(b'\n', &mut buf);
    c.stream().set_read_timeout(Some(WAIT)).expect("timeout");
    match got {
        Ok(0) => panic!("connection closed"),
        Ok(_) => Some(String::from_utf8_lossy(buf.trim_ascii_end()).into_owned()),
        Err(_) => None,
    }
}

/// How many of `lines` are exactly `line`.
fn count(lines: &[String], line: &str) -> usize {
    lines.iter().filter(|l| *l == line).count()
}

/// Joins `name` on `d` and waits until `d` has seated it (it is in `chatctl list`): its join
/// has come back from NATS. Until then a `/nick` fails (cluster_nick_right_after_joining_works).
fn join_seated(d: &TestDaemon, name: &str) -> Client {
    let c = d.join(name);
    wait_for(
        WAIT,
        &format!("{name} to be seated"),
        || {
            let v = d.chatctl_json(&["list"]);
            v["response"]["users"]
                .as_array()?
                .iter()
                .any(|u| u["name"] == name)
                .then_some(())
        },
        || d.log(),
    );
    c
}

/// Connects to `d` and sends `name` as soon as `go` lets everyone go; the first line answered.
fn race_for(d: &TestDaemon, name: &str, go: &Barrier) -> (Client, String) {
    let mut c = d.connect();
    c.expect_prefix("*** HELLO");
    go.wait();
    c.send(name);
    let answer = c.line();
    (c, answer)
}

// ------------------------------------------------------------------------------------ order

#[test]
fn cluster_every_node_sees_one_order() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let ds = start_nodes(&[&nats], &room_name("order"), &["a", "b"]);
    let (a, b) = (&ds[0], &ds[1]);

    let mut ra = a.join("ra");
    let mut rb = b.join("rb");
    ra.expect_prefix("*** JOIN rb");
    // From here on both receivers are in the room: they must see the same lines.
    sync(&mut ra, "ra", "start", &mut [&mut rb]);

    const SENDERS: [(&str, usize); 4] = [("sa1", 0), ("sa2", 0), ("sb1", 1), ("sb2", 1)];
    const LINES: usize = 60;
    let go = Arc::new(Barrier::new(SENDERS.len() + 2));
    let mut churners: Vec<Option<Client>> = vec![None, None];
    let mut threads = Vec::new();
    for (name, node) in SENDERS {
        let mut c = ds[node].join(name);
        let go = go.clone();
        threads.push(thread::spawn(move || {
            go.wait();
            for i in 0..LINES {
                c.send(&format!("{name} line {i}"));
            }
            c
        }));
    }
    // Joins, renames, leaves and announcements from both nodes, in the middle of the traffic.
    // The members who rename are seated first (a `/nick` right after the welcome is another
    // test's business: cluster_nick_right_after_joining_works).
    for (node, d) in ds.iter().enumerate() {
        let who = format!("churn{node}");
        churners[node] = Some(d.join(&who));
        ra.expect_prefix(&format!("*** JOIN {who}"));
        rb.expect_prefix(&format!("*** JOIN {who}"));
    }
    // The visitors wait until they are seated before they speak and leave (leaving at once is
    // cluster_a_member_who_leaves_at_once_is_seen_alike_everywhere's business).
    let senders: Vec<Client> = thread::scope(|s| {
        for (node, d) in ds.iter().enumerate() {
            let go = go.clone();
            let mut c = churners[node].take().expect("churner");
            s.spawn(move || {
                go.wait();
                let who = format!("churn{node}");
                c.send(&format!("/nick {who}x"));
                let visitor = format!("visitor{node}");
                let mut v = join_seated(d, &visitor);
                let out = d.chatctl(&["announce", &format!("notice from node {node}")]);
                assert!(out.status.success(), "{out:?}");
                c.send("/quit");
                v.send(&format!("hello from {visitor}"));
                v.send("/quit");
                let _ = c.until_eof();
                let _ = v.until_eof();
            });
        }
        threads
            .into_iter()
            .map(|t| t.join().expect("sender"))
            .collect()
    });

    // Everything sent is in the room once; read until each receiver has it all.
    let total = SENDERS.len() * LINES + 2;
    let done = |lines: &[String]| {
        lines.iter().filter(|l| !l.starts_with("*** ")).count() == total
            && lines.iter().filter(|l| l.starts_with("*** LEAVE ")).count() == 4
            && lines
                .iter()
                .filter(|l| l.starts_with("*** NOTICE notice from node"))
                .count()
                == 2
    };
    let mut orders = Vec::new();
    for r in [&mut ra, &mut rb] {
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(&lines) {
            let left = deadline.saturating_duration_since(Instant::now());
            match line_within(r, left.max(Duration::from_millis(1))) {
                Some(l) => lines.push(l),
                None => panic!("incomplete after 30 s: {lines:#?}"),
            }
        }
        orders.push(lines);
    }
    // Nothing more is coming: a last line is the next thing both see.
    let after = sync(&mut ra, "ra", "end", &mut [&mut rb]);
    assert_eq!(
        after,
        vec![Vec::<String>::new()],
        "lines after the counted ones"
    );

    let (oa, ob) = (&orders[0], &orders[1]);
    if oa != ob {
        let first = oa.iter().zip(ob).position(|(x, y)| x != y);
        panic!(
            "the nodes disagree on the order (first difference at {first:?}):\na: {oa:#?}\nb: {ob:#?}"
        );
    }
    for (name, _) in SENDERS {
        let theirs: Vec<&str> = oa
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("{name}: ")))
            .collect();
        let want: Vec<String> = (0..LINES).map(|i| format!("{name} line {i}")).collect();
        assert_eq!(theirs, want, "{name}'s lines: each once, in the order sent");
    }
    for who in ["churn0", "churn1"] {
        let events: Vec<&String> = oa.iter().filter(|l| l.contains(who)).collect();
        assert_eq!(
            events,
            [
                &format!("*** NICK {who} is now known as {who}x"),
                &format!("*** LEAVE {who}x left (quit)"),
            ],
            "{who}'s rename and departure, once each, in order"
        );
    }
    for who in ["visitor0", "visitor1"] {
        let events: Vec<&String> = oa.iter().filter(|l| l.contains(who)).collect();
        assert_eq!(
            events,
            [
                &format!("*** JOIN {who} joined"),
                &format!("{who}: hello from {who}"),
                &format!("*** LEAVE {who} left (quit)"),
            ],
            "{who}'s arrival, line and departure, once each, in order"
        );
    }
    drop(senders);
}

// ------------------------------------------------------------------------------------ names

#[test]
fn cluster_names_are_unique_across_nodes() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let ds = start_nodes(&[&nats], &room_name("names"), &["a", "b"]);

    // The same name, a case variant and look-alikes, asked for at the same moment on both
    // nodes: one wins, the other is told the name is taken.
    let mut holders = Vec::new();
    for (on_a, on_b) in [
        ("dora", "dora"),
        ("Alice", "alice"),
        ("cop", "\u{441}\u{43e}\u{440}"),    // Cyrillic "сор"
        ("eve", "\u{ff45}\u{ff56}\u{ff45}"), // full-width "ｅｖｅ"
    ] {
        let go = Barrier::new(2);
        let (ra, rb) = thread::scope(|s| {
            let ta = s.spawn(|| race_for(&ds[0], on_a, &go));
            let tb = s.spawn(|| race_for(&ds[1], on_b, &go));
            (ta.join().expect("a"), tb.join().expect("b"))
        });
        let won = [&ra.1, &rb.1].map(|l| l.starts_with("*** WELCOME "));
        assert!(
            won[0] != won[1],
            "{on_a:?} on a and {on_b:?} on b: exactly one may win: {:?} / {:?}",
            ra.1,
            rb.1
        );
        let (winner, loser, node) = if won[0] { (ra, rb, 0) } else { (rb, ra, 1) };
        assert!(
            loser.1.starts_with("*** ERR name-taken "),
            "the loser is told the name is taken: {}",
            loser.1
        );
        holders.push((winner.0, node, if node == 0 { on_a } else { on_b }));
    }

    // `/nick` to a name held on the other node is refused.
    let (dora, dora_node, _) = holders.remove(0);
    let other = 1 - dora_node;
    let mut zed = join_seated(&ds[other], "zed");
    zed.send("/nick DORA");
    let refused = zed.line();
    assert!(refused.starts_with("*** ERR name-taken "), "{refused}");

    // Once the holder leaves, the name is free on the other node.
    drop(dora);
    zed.expect_prefix("*** LEAVE dora left");
    // Retried: the leave is published before the name is deleted from NATS, so right after
    // the leave is seen the name may still be held for a moment.
    let answer = std::cell::RefCell::new(String::new());
    wait_for(
        WAIT,
        "dora's name to be free on the other node",
        || {
            zed.send("/nick dora");
            let l = zed.line();
            let done = l == "*** NICK zed is now known as dora";
            *answer.borrow_mut() = l;
            done.then_some(())
        },
        || answer.borrow().clone(),
    );
}

// --------------------------------------------------------------------------------- commands

#[test]
fn cluster_commands_reach_the_whole_room() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let ds = start_nodes(&[&nats], &room_name("cmds"), &["a", "b"]);
    let (a, b) = (&ds[0], &ds[1]);
    let mut alice = a.join("alice");
    let mut bob = b.join("bob");
    alice.expect_prefix("*** JOIN bob");

    // /who on either node lists everyone.
    for c in [&mut alice, &mut bob] {
        c.send("/who");
        assert_eq!(c.line(), "*** WHO 2 alice bob");
    }

    // /msg across nodes, and to nobody.
    alice.send("/msg BOB psst");
    assert_eq!(alice.line(), "-> bob (private): psst");
    assert_eq!(bob.line(), "alice (private): psst");
    bob.send("/msg alice back");
    assert_eq!(bob.line(), "-> alice (private): back");
    assert_eq!(alice.line(), "bob (private): back");

    // chatctl list, both forms, on both nodes: every user with its node.
    for d in [a, b] {
        let v = d.chatctl_json(&["list"]);
        let users: Vec<(String, String)> = v["response"]["users"]
            .as_array()
            .expect("users")
            .iter()
            .map(|u| {
                (
                    u["name"].as_str().unwrap_or("?").to_owned(),
                    u["node"].as_str().unwrap_or("?").to_owned(),
                )
            })
            .collect();
        assert!(
            users.contains(&("alice".into(), "a".into()))
                && users.contains(&("bob".into(), "b".into()))
                && users.len() == 2,
            "{users:?}"
        );
        let out = d.chatctl(&["list"]);
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let rows: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[0][..2], ["NAME", "NODE"], "{text}");
        assert!(
            rows.iter().any(|r| r[..2] == ["alice", "a"])
                && rows.iter().any(|r| r[..2] == ["bob", "b"]),
            "{text}"
        );
        assert!(text.ends_with("2 users online\n"), "{text}");
    }

    // chatctl announce on one node reaches both.
    let out = b.chatctl(&["announce", "maintenance", "at", "noon"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(alice.line(), "*** NOTICE maintenance at noon");
    assert_eq!(bob.line(), "*** NOTICE maintenance at noon");

    // chatctl status on both: node, server, position, live nodes.
    wait_live(&[a, b], &["a", "b"]);
    for (d, node) in [(a, "a"), (b, "b")] {
        let c = d.chatctl_json(&["status"])["response"]["cluster"].clone();
        assert_eq!(c["node"], node, "{c}");
        assert_eq!(c["connected"], true, "{c}");
        assert_eq!(c["ready"], true, "{c}");
        assert_eq!(
            c["server"].as_str(),
            Some(nats.addr().to_string().as_str()),
            "{c}"
        );
        assert!(c["position"].as_u64().unwrap_or(0) >= 3, "{c}");
        let out = d.chatctl(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!(
                "cluster node:     {node} (connected to NATS at {})",
                nats.addr()
            )) && text.contains("cluster state:    following the room at position ")
                && text.contains("live nodes:       a, b"),
            "{text}"
        );
    }

    // chatctl kick on node a kicks a user of node b.
    let out = a.chatctl(&["kick", "bob", "--reason", "testing"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(bob.line(), "*** KICKED testing");
    assert_eq!(bob.try_line(), None, "the kicked user is disconnected");
    assert_eq!(alice.line(), "*** KICK bob was kicked (testing)");
    // Gone from the room on both nodes.
    alice.send("/who");
    assert_eq!(alice.line(), "*** WHO 1 alice");
    // A private message to nobody is an error (told once: see
    // cluster_a_private_message_to_nobody_is_refused_once).
    alice.send("/msg nobody hi");
    let l = alice.line();
    assert!(l.starts_with("*** ERR no-such-user "), "{l}");
    wait_for(
        WAIT,
        "bob to be gone from node b's list",
        || {
            let v = b.chatctl_json(&["list"]);
            (v["response"]["users"].as_array()?.len() == 1).then_some(())
        },
        || b.log(),
    );
}

/// Connects to `d`, asks for `name`; the answer.
fn try_name(d: &TestDaemon, name: &str) -> String {
    let mut c = d.connect();
    c.expect_prefix("*** HELLO");
    c.send(name);
    c.line()
}

#[test]
fn cluster_bans_apply_everywhere_and_survive_restarts() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let room = room_name("bans");
    let mut ds = start_nodes(&[&nats], &room, &["a", "b"]);
    let mut alice = ds[0].join("alice");
    let mut mallory = ds[1].join("mallory");
    alice.expect_prefix("*** JOIN mallory");

    // A ban made on node a refuses the name on node b; the user online there is sent away.
    let out = ds[0].chatctl(&["ban", "mallory", "--reason", "spamming"]);
    assert!(out.status.success(), "{out:?}");
    let kicked = mallory.expect_prefix("*** KICKED");
    assert!(kicked.contains("spamming"), "{kicked}");
    assert_eq!(mallory.try_line(), None);
    alice.expect_prefix("*** KICK mallory");
    for d in &ds {
        let last = std::cell::RefCell::new(String::new());
        wait_for(
            WAIT,
            "the ban to be in force",
            || {
                let answer = try_name(d, "Mallory");
                let banned = answer.starts_with("*** ERR banned ");
                *last.borrow_mut() = answer;
                banned.then_some(())
            },
            || format!("last answer: {}\n{}", last.borrow(), d.log()),
        );
    }

    // Stop both nodes, start both again on the same NATS: the ban holds on both.
    drop(alice);
    for d in &mut ds {
        d.signal(Signal::SIGTERM);
        assert_eq!(d.wait_exit(), Some(0), "{}", d.log());
    }
    let restarted: Vec<TestDaemon> = ds
        .into_iter()
        .map(|mut d| {
            let dir = std::mem::replace(&mut d.dir, tempfile::tempdir().expect("tempdir"));
            let text = std::fs::read_to_string(&d.config_path).expect("config");
            let d = TestDaemon::start_with_text(dir, &text);
            d.wait_cluster_ready();
            d
        })
        .collect();
    // (A node that never saw the ban: cluster_a_new_node_refuses_banned_names_at_once.)
    for d in &restarted {
        let node = d.cluster_status()["node"].clone();
        let listed = std::cell::RefCell::new(String::new());
        wait_for(
            WAIT,
            "chatctl bans to list the ban",
            || {
                let bans = d.chatctl_json(&["bans"]).to_string();
                let found = bans.contains("mallory") && bans.contains("spamming");
                *listed.borrow_mut() = bans;
                found.then_some(())
            },
            || format!("node {node}: {}", listed.borrow()),
        );
        let last = std::cell::RefCell::new(String::new());
        wait_for(
            WAIT,
            "the ban to be in force after the restart",
            || {
                let answer = try_name(d, "mallory");
                let banned = answer.starts_with("*** ERR banned ");
                *last.borrow_mut() = answer;
                banned.then_some(())
            },
            || format!("last answer: {}\n{}", last.borrow(), d.log()),
        );
    }
}

// ---------------------------------------------------------------------------------- history

/// A newcomer's `*** HISTORY` lines on `d`, as (timestamp, rest). `witness`, a member on any
/// node, waits for the newcomer's join and then sends it a private line, which marks the end
/// of what the newcomer was given on arrival (a private line is not history).
fn history_on(d: &TestDaemon, name: &str, witness: &mut Client) -> Vec<(String, String)> {
    let mut c = d.enter(name);
    witness.expect_prefix(&format!("*** JOIN {name}"));
    witness.send(&format!("/msg {name} that was all"));
    witness.expect_prefix(&format!("-> {name} (private)"));
    c.lines_until(|l| l.ends_with("(private): that was all"))
        .into_iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("*** HISTORY ")?;
            let (ts, line) = rest.split_once(' ')?;
            Some((ts.to_owned(), line.to_owned()))
        })
        .collect()
}

#[test]
fn cluster_history_is_the_same_on_every_node() {
    if !nats_present() {
        return;
    }
    history_scenario(false);
}

/// alice (node a) says six things; newcomers on node a, on node b and, if `late`, on a node
/// started after all that, get the last three as history.
fn history_scenario(late: bool) {
    let nats = NatsServer::start();
    let room = room_name("history");
    let start = |nodes: &[&str]| {
        start_ready(nodes.len(), |i| {
            cluster_config(&[&nats], &room, nodes[i]).set("room", "history", "3")
        })
    };
    let ds = start(&["a", "b"]);
    let mut alice = ds[0].join("alice");
    let mut bob = ds[1].join("bob");
    alice.expect_prefix("*** JOIN bob");
    for i in 1..=5 {
        alice.send(&format!("message {i}"));
    }
    sync(&mut alice, "alice", "message 6", &mut [&mut bob]);
    let want = ["alice: message 4", "alice: message 5", "alice: message 6"];

    let on_a = history_on(&ds[0], "newa", &mut alice);
    let on_b = history_on(&ds[1], "newb", &mut alice);
    let text = |h: &[(String, String)]| h.iter().map(|(_, l)| l.clone()).collect::<Vec<_>>();
    assert_eq!(
        text(&on_a),
        want,
        "history on the node the messages were sent on"
    );
    assert_eq!(text(&on_b), want, "history on the other node");
    // The same moments, give or take the second they were delivered in.
    for ((ta, _), (tb, _)) in on_a.iter().zip(&on_b) {
        let ta = humantime::parse_rfc3339(ta).expect("timestamp");
        let tb = humantime::parse_rfc3339(tb).expect("timestamp");
        let apart = ta.duration_since(tb).or_else(|_| tb.duration_since(ta));
        assert!(
            apart.expect("order") <= Duration::from_secs(1),
            "{on_a:?} / {on_b:?}"
        );
    }

    if late {
        // A node started after those messages (and after the newcomers above came and went)
        // gives its newcomers the same history.
        let late = start(&["c"]);
        let on_c = history_on(&late[0], "newc", &mut alice);
        assert_eq!(
            text(&on_c),
            want,
            "history on a node started after the messages"
        );
    }
}

// ----------------------------------------------------------------------------------- faults

#[test]
fn cluster_a_killed_node_s_users_leave_once() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let mut ds = start_nodes(&[&nats], &room_name("kill"), &["a", "b", "c"]);
    let mut alice = ds[0].join("alice");
    let mut bob = ds[1].join("bob");
    let _carol = ds[2].join("carol");
    let _dave = ds[2].join("dave");
    for who in ["bob", "carol", "dave"] {
        alice.expect_prefix(&format!("*** JOIN {who}"));
    }
    for who in ["carol", "dave"] {
        bob.expect_prefix(&format!("*** JOIN {who}"));
    }
    wait_live(&[&ds[0], &ds[1], &ds[2]], &["a", "b", "c"]);

    ds[2].kill();
    let killed = Instant::now();
    // Chat goes on at once.
    alice.send("right after the kill");
    let seen = bob.lines_until(|l| l == "alice: right after the kill");
    assert!(
        killed.elapsed() < Duration::from_secs(2),
        "a line took {:?} after the kill: {seen:?}",
        killed.elapsed()
    );

    // Each of the dead node's users leaves once, on each survivor, within node-timeout + 5 s.
    let leaves = [
        "*** LEAVE carol left (node c lost)",
        "*** LEAVE dave left (node c lost)",
    ];
    let mut lines = [seen, Vec::new()];
    for (c, lines) in [&mut alice, &mut bob].into_iter().zip(&mut lines) {
        while !leaves.iter().all(|l| lines.contains(&(*l).to_owned())) {
            assert!(
                killed.elapsed() < Duration::from_secs(2 + 5),
                "no leave within node-timeout + 5 s: {lines:?}"
            );
            lines.push(c.line());
        }
    }
    // Give a second announcement time to show up (the reaper runs every 0.5 s), then read
    // both receivers up to a common line.
    wait_live(&[&ds[0], &ds[1]], &["a", "b"]);
    std::thread::sleep(Duration::from_secs(1));
    let rest = sync(&mut alice, "alice", "after the leaves", &mut [&mut bob]);
    lines[1].extend(rest.into_iter().flatten());
    for (who, lines) in ["alice", "bob"].iter().zip(&lines) {
        for l in leaves {
            assert_eq!(count(lines, l), 1, "{who} saw {l:?} not once: {lines:?}");
        }
    }

    // The names are free on the survivors.
    let _carol = ds[0].join("carol");
    let _dave = ds[1].join("dave");
}

/// A survivor that cannot publish to the room (its NATS user may not: here a permission, in
/// life a failing link) leaves a dead node's users to one that can: each is announced once.
/// When a survivor deleted a name before publishing its leave, such a survivor won the race for
/// some names and their leaves were lost; now a name is deleted only once its leave is stored.
#[test]
fn cluster_a_survivor_that_cannot_publish_does_not_swallow_a_dead_node_s_leaves() {
    if !nats_present() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        "authorization {\n  users = [\n    {user: full, password: full-pass}\n    \
         {user: mute, password: mute-pass, permissions: {publish: {deny: [\"chat.>\"]}}}\n  ]\n}\n",
    )
    .expect("write nats.conf");
    let nats = NatsServer::start_with_auth(&["-c", &conf.display().to_string()]);
    let room = room_name("mute");
    let creds = |user: &str| {
        let path = dir.path().join(user);
        std::fs::write(&path, format!("{user}:{user}-pass\n")).expect("write credentials");
        path.display().to_string()
    };
    let (full, mute) = (creds("full"), creds("mute"));
    let mut ds = start_ready(3, |i| {
        let user = if i == 1 { &mute } else { &full };
        cluster_config(&[&nats], &room, ["a", "b", "c"][i]).set_str("cluster", "credentials", user)
    });
    let mut alice = ds[0].join("alice");
    let gone = ["carol", "dave", "erin", "frank"];
    let _theirs: Vec<Client> = gone.iter().map(|n| ds[2].join(n)).collect();
    for who in gone {
        alice.expect_prefix(&format!("*** JOIN {who}"));
    }
    wait_live(&[&ds[0], &ds[1], &ds[2]], &["a", "b", "c"]);

    ds[2].kill();
    let killed = Instant::now();
    let leaves: Vec<String> = gone
        .iter()
        .map(|n| format!("*** LEAVE {n} left (node c lost)"))
        .collect();
    let mut seen = Vec::new();
    while !leaves.iter().all(|l| seen.contains(l)) {
        assert!(
            killed.elapsed() < Duration::from_secs(2 + 8),
            "not every leave within node-timeout + 8 s: {seen:?}\nnode b (cannot publish):\n{}",
            ds[1].log()
        );
        seen.extend(line_within(&mut alice, Duration::from_millis(500)));
    }
    // A second announcement would follow within the reaper's next rounds.
    thread::sleep(Duration::from_secs(1));
    alice.send("/who");
    seen.extend(alice.lines_until(|l| l.starts_with("*** WHO ")));
    for l in &leaves {
        assert_eq!(count(&seen, l), 1, "{l:?} not once: {seen:?}");
    }
    assert_eq!(seen.last().map(String::as_str), Some("*** WHO 1 alice"));
}

/// What the members saw of a NATS outage: the lines each of alice, bob (another node) and
/// carol (alice's node) read from NATS's stop until after a line sent once it was back, and
/// whether alice's line sent during the outage was answered `*** ERR not-delivered`.
struct Outage {
    seen: HashMap<&'static str, Vec<String>>,
    refused: bool,
}

/// Two nodes on one NATS server, which is stopped (SIGTERM) and started again on the same
/// port and store; alice says "while down" during the outage.
fn nats_outage() -> Outage {
    let mut nats = NatsServer::start();
    let ds = start_nodes(&[&nats], &room_name("natsdown"), &["a", "b"]);
    let mut alice = ds[0].join("alice");
    let mut carol = ds[0].join("carol");
    let mut bob = ds[1].join("bob");
    alice.expect_prefix("*** JOIN carol");
    alice.expect_prefix("*** JOIN bob");
    carol.expect_prefix("*** JOIN bob");
    sync(&mut alice, "alice", "before", &mut [&mut bob, &mut carol]);

    nats.stop();
    let degraded = "*** NOTICE the room is degraded: ";
    let back = "*** NOTICE the room is back: ";
    let mut seen: HashMap<&str, Vec<String>> = HashMap::new();
    for (who, c) in [
        ("alice", &mut alice),
        ("bob", &mut bob),
        ("carol", &mut carol),
    ] {
        seen.insert(who, c.lines_until(|l| l.starts_with(degraded)));
    }

    // A line sent while NATS is down: not lost silently.
    alice.send("while down");
    // A new name cannot be taken meanwhile.
    let answer = try_name(&ds[1], "dave");
    assert!(answer.starts_with("*** ERR unavailable "), "{answer}");
    // The sender is told within ~10 s that it was not delivered (or it goes out later).
    let refused = match line_within(&mut alice, Duration::from_secs(15)) {
        Some(l) if l.starts_with("*** ERR not-delivered ") => true,
        Some(l) => panic!("unexpected line while NATS is down: {l}"),
        None => false,
    };

    nats.start_again();
    nats.wait_jetstream(WAIT);
    for (who, c) in [
        ("alice", &mut alice),
        ("bob", &mut bob),
        ("carol", &mut carol),
    ] {
        seen.get_mut(who)
            .expect("seen")
            .extend(c.lines_until(|l| l.starts_with(back)));
    }
    for d in &ds {
        d.wait_cluster_ready();
    }

    // Chat works again, without restarting chatd; users were never disconnected.
    let after = wait_for(
        Duration::from_secs(20),
        "a line to go through after NATS is back",
        || {
            let rest = sync(&mut alice, "alice", "after", &mut [&mut bob, &mut carol]);
            Some(rest)
        },
        String::new,
    );
    seen.get_mut("bob").expect("bob").extend(after[0].clone());
    seen.get_mut("carol")
        .expect("carol")
        .extend(after[1].clone());
    Outage { seen, refused }
}

#[test]
fn cluster_survives_its_nats_server_restarting() {
    if !nats_present() {
        return;
    }
    let Outage { seen, refused } = nats_outage();
    let degraded = "*** NOTICE the room is degraded: ";
    let back = "*** NOTICE the room is back: ";
    for (who, lines) in &seen {
        assert_eq!(
            lines.iter().filter(|l| l.starts_with(degraded)).count(),
            1,
            "{who}: degraded once: {lines:?}"
        );
        assert_eq!(
            lines.iter().filter(|l| l.starts_with(back)).count(),
            1,
            "{who}: back once: {lines:?}"
        );
    }
    // The line sent during the outage is never lost silently, never shown twice. (That a
    // refused line must not show up later either is cluster_a_refused_line_is_never_delivered.)
    for who in ["bob", "carol"] {
        let shown = count(&seen[who], "alice: while down");
        assert!(
            shown <= 1,
            "{who} saw the line {shown} times: {:?}",
            seen[who]
        );
        assert!(
            refused || shown == 1,
            "{who}: a line neither refused nor delivered: {:?}",
            seen[who]
        );
    }
}

/// Node `node` of `room` on a 3-server NATS cluster: everything replicated 3 times, and the
/// default node timeout: a dead server's leader elections (4-9 s) stop lease refreshes for
/// longer than the 2 s of `cluster_config`, and the nodes would reap each other's users.
fn three_server_config(servers: &[&NatsServer], room: &str, node: &str) -> Config {
    cluster_config(servers, room, node)
        .set("cluster", "replicas", "3")
        .set_str("cluster", "node-timeout", "10s")
}

#[test]
fn cluster_survives_losing_a_nats_server_of_three() {
    if !nats_present() {
        return;
    }
    let mut servers = NatsServer::cluster(3);
    let room = room_name("nats3");
    let refs: Vec<&NatsServer> = servers.iter().collect();
    let ds = start_ready(2, |i| three_server_config(&refs, &room, ["a", "b"][i]));
    let mut ra = ds[0].join("ra");
    let mut rb = ds[1].join("rb");
    ra.expect_prefix("*** JOIN rb");
    sync(&mut ra, "ra", "start", &mut [&mut rb]);

    // The stream's leader, to kill it.
    let info = servers[0]
        .client()
        .js_api(&format!("STREAM.INFO.CHAT_{room}"), "")
        .expect("stream info");
    let leader = info["cluster"]["leader"]
        .as_str()
        .unwrap_or("n0")
        .to_owned();
    let victim = servers.iter().position(|s| s.name == leader).unwrap_or(0);

    const LINES: usize = 80;
    let go = Arc::new(Barrier::new(3));
    let senders: Vec<_> = [(0, "sa"), (1, "sb")]
        .into_iter()
        .map(|(node, name)| {
            let mut c = ds[node].join(name);
            let go = go.clone();
            thread::spawn(move || {
                go.wait();
                for i in 0..LINES {
                    c.send(&format!("{name} line {i}"));
                    std::thread::sleep(Duration::from_millis(25));
                }
                c
            })
        })
        .collect();
    go.wait();
    std::thread::sleep(Duration::from_millis(600));
    let killed = Instant::now();
    servers[victim].kill();
    let back = stream_back(&servers, victim, &room);
    let senders: Vec<Client> = senders
        .into_iter()
        .map(|t| t.join().expect("sender"))
        .collect();

    // Every line once, the same order on both nodes.
    let mut orders = Vec::new();
    let warnings = || {
        ds.iter()
            .map(|d| {
                let log = d.log();
                let w: Vec<&str> = log.lines().filter(|l| !l.contains(" INFO ")).collect();
                w.join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    for (who, r) in [("ra", &mut ra), ("rb", &mut rb)] {
        let mut lines: Vec<String> = Vec::new();
        // Every line is sent by now (or waits in its node's publisher for the stream).
        let deadline = back + PAUSE;
        while lines.len() < 2 * LINES {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(l) = line_within(r, left.max(Duration::from_millis(1))) else {
                panic!(
                    "{who}: {} of {} lines {PAUSE:?} after the stream took writes again \
                     ({:?} after the kill of {leader}): {lines:?}\n{}",
                    lines.len(),
                    2 * LINES,
                    back - killed,
                    warnings()
                );
            };
            assert!(!l.starts_with("*** ERR"), "{l}\n{}", warnings());
            if !l.starts_with("*** ") {
                lines.push(l);
            }
        }
        orders.push(lines);
    }
    assert_eq!(orders[0], orders[1], "the nodes disagree on the order");
    for name in ["sa", "sb"] {
        let theirs: Vec<&str> = orders[0]
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("{name}: ")))
            .collect();
        let want: Vec<String> = (0..LINES).map(|i| format!("{name} line {i}")).collect();
        assert_eq!(theirs, want, "{name}'s lines: each once, in order");
    }
    // No sender was told a line was lost.
    for mut s in senders {
        s.send("/who");
        let lines = s.lines_until(|l| l.starts_with("*** WHO "));
        assert!(!lines.iter().any(|l| l.starts_with("*** ERR")), "{lines:?}");
    }
    let after = sync(&mut ra, "ra", "end", &mut [&mut rb]);
    assert!(
        after[0].iter().all(|l| l.starts_with("*** ")),
        "lines after the counted ones: {after:?}"
    );
}

/// A 3-server NATS cluster, the room replicated 3 times, nodes a and b on it, receivers `ra` on
/// a and `rb` on b, the sender `sb` on b, and the stream's leader on another server than the one
/// node b talks to. Returns the servers, the nodes, `[ra, rb]`, `sb`, and the index of node b's
/// server.
fn three_servers_leader_off_b(
    room: &str,
) -> (Vec<NatsServer>, Vec<TestDaemon>, [Client; 2], Client, usize) {
    let servers = NatsServer::cluster(3);
    let refs: Vec<&NatsServer> = servers.iter().collect();
    let ds = start_ready(2, |i| three_server_config(&refs, room, ["a", "b"][i]));
    let mut ra = ds[0].join("ra");
    let mut rb = ds[1].join("rb");
    let mut sb = ds[1].join("sb");
    ra.expect_prefix("*** JOIN rb");
    sync(&mut sb, "sb", "start", &mut [&mut ra, &mut rb]);
    let b_port = server_port(&ds[1].cluster_status()).expect("node b's server");
    let b_server = servers
        .iter()
        .position(|s| s.port == b_port)
        .expect("node b talks to one of the servers");
    let other = (b_server + 1) % servers.len();
    wait_for(
        WAIT,
        "the stream's leader to be off node b's server",
        || match stream_leader(&servers[other], room) {
            Some(l) if l != servers[b_server].name => Some(()),
            Some(_) => {
                let _ = servers[b_server]
                    .client()
                    .js_api(&format!("STREAM.LEADER.STEPDOWN.CHAT_{room}"), "");
                std::thread::sleep(Duration::from_millis(500));
                None
            }
            None => None,
        },
        || format!("leader: {:?}", stream_leader(&servers[other], room)),
    );
    (servers, ds, [ra, rb], sb, b_server)
}

/// The port of the NATS server in a node's cluster status.
fn server_port(status: &serde_json::Value) -> Option<u16> {
    status["server"]
        .as_str()
        .and_then(|s| s.rsplit(':').next())
        .and_then(|p| p.parse().ok())
}

/// The name of the room stream's leader, asked of `via`.
fn stream_leader(via: &NatsServer, room: &str) -> Option<String> {
    via.client()
        .js_api(&format!("STREAM.INFO.CHAT_{room}"), "")
        .and_then(|i| i["cluster"]["leader"].as_str().map(str::to_owned))
}

/// Longest a node's users wait for the room after one NATS server of three died, counted from
/// when the room's stream takes writes again. When the dead server led the stream, the
/// stream's own leader election comes first (4-9 s on nats-server 2.9, not chatd's to shorten);
/// otherwise the stream never stopped. Generous for a loaded 2-core box: a node reads the
/// stream directly after 1 s without deliveries, and pulls again after 2 s without heartbeat.
const PAUSE: Duration = Duration::from_secs(5);

/// When the room's stream takes writes again after `servers[victim]` died: the first time a
/// survivor names a stream leader other than the dead server (at once if it did not lead).
fn stream_back(servers: &[NatsServer], victim: usize, room: &str) -> Instant {
    let survivor = &servers[(victim + 1) % servers.len()];
    let dead = &servers[victim].name;
    wait_for(
        Duration::from_secs(30),
        "the room's stream to have a leader again",
        || match stream_leader(survivor, room) {
            Some(l) if l != *dead => Some(Instant::now()),
            _ => {
                std::thread::sleep(Duration::from_millis(50));
                None
            }
        },
        || survivor.log(),
    )
}

/// The name of node `node`'s consumer of the room's stream, asked of `via`.
fn consumer_of(via: &NatsServer, room: &str, node: &str) -> Option<String> {
    let names = via
        .client()
        .js_api(&format!("CONSUMER.NAMES.CHAT_{room}"), "")?;
    let prefix = format!("sub_{node}_");
    names["consumers"]
        .as_array()?
        .iter()
        .filter_map(|n| n.as_str())
        .find(|n| n.starts_with(&prefix))
        .map(str::to_owned)
}

/// The leader of the room stream's consumer `consumer`, asked of `via`.
fn consumer_leader(via: &NatsServer, room: &str, consumer: &str) -> Option<String> {
    via.client()
        .js_api(&format!("CONSUMER.INFO.CHAT_{room}.{consumer}"), "")
        .and_then(|i| i["cluster"]["leader"].as_str().map(str::to_owned))
}

/// Reads `c`'s chat lines (announcements skipped, an error fails) in a thread until one is
/// `last` or `limit` passes; returns the client and every line with when it arrived.
fn read_timed(
    mut c: Client,
    last: String,
    limit: Duration,
) -> thread::JoinHandle<(Client, Vec<(Instant, String)>)> {
    thread::spawn(move || {
        let deadline = Instant::now() + limit;
        let mut lines = Vec::new();
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(l) = line_within(&mut c, left.max(Duration::from_millis(1))) else {
                break;
            };
            assert!(!l.starts_with("*** ERR"), "{l}");
            if l.starts_with("*** ") {
                continue;
            }
            let done = l == last;
            lines.push((Instant::now(), l));
            if done {
                break;
            }
        }
        (c, lines)
    })
}

/// Reads `c`'s next `n` chat lines (announcements skipped; an error fails) within `limit`.
fn chat_lines(c: &mut Client, who: &str, n: usize, limit: Duration, log: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let deadline = Instant::now() + limit;
    while lines.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(l) = line_within(c, left.max(Duration::from_millis(1))) else {
            panic!("{who}: only {lines:?} within {limit:?}\n{log}");
        };
        assert!(!l.starts_with("*** ERR"), "{who}: {l}\n{log}");
        if !l.starts_with("*** ") {
            lines.push(l);
        }
    }
    lines
}

/// A line lost with the NATS server its node is connected to, and the sender's next line sent
/// once the node has reconnected elsewhere: the lost line is retried (same message id) and must
/// still come before the next one, on every node. A publisher that sends the next line while
/// the earlier one waits for its ack stores the next one first and the retried one after it.
#[test]
fn cluster_keeps_a_senders_order_when_its_nats_server_dies_mid_line() {
    if !nats_present() {
        return;
    }
    let room = room_name("order");
    let (mut servers, ds, [mut ra, mut rb], mut sb, victim) = three_servers_leader_off_b(&room);
    let victim_port = servers[victim].port;

    // Line 1 goes into the frozen server's socket and dies with it.
    servers[victim].signal(Signal::SIGSTOP);
    sb.send("line 1");
    std::thread::sleep(Duration::from_millis(300));
    servers[victim].kill();
    wait_for(
        WAIT,
        "node b to reconnect to another server",
        || {
            let c = ds[1].cluster_status();
            (c["connected"] == true && server_port(&c).is_some_and(|p| p != victim_port))
                .then_some(())
        },
        || format!("status: {}", ds[1].cluster_status()),
    );
    sb.send("line 2");
    sb.send("line 3");
    let back = stream_back(&servers, victim, &room);
    for (who, c) in [("ra", &mut ra), ("rb", &mut rb)] {
        let limit = (back + PAUSE).saturating_duration_since(Instant::now());
        let lines = chat_lines(c, who, 3, limit, &ds[1].log());
        assert_eq!(
            lines,
            ["sb: line 1", "sb: line 2", "sb: line 3"],
            "{who}: sb's lines out of order\n{}",
            ds[1].log()
        );
    }
    // Nor was the sender told that any of them was lost.
    sb.send("/who");
    let seen = sb.lines_until(|l| l.starts_with("*** WHO "));
    assert!(!seen.iter().any(|l| l.starts_with("*** ERR")), "{seen:?}");
}

/// A NATS server that hangs (SIGSTOP: its connections stay open and silent, as over a cut
/// cable) is given up by the node talking to it within three pings, and the node goes on
/// through another server: its users are told the room is degraded and then back, and chat
/// goes both ways again. With the client's default pings this took three minutes.
#[test]
fn cluster_a_node_whose_nats_server_hangs_moves_to_another_within_seconds() {
    if !nats_present() {
        return;
    }
    let room = room_name("hang");
    let (servers, ds, [mut ra, mut rb], mut sb, b_server) = three_servers_leader_off_b(&room);
    servers[b_server].signal(Signal::SIGSTOP);
    let frozen = Instant::now();
    // Three pings of 3 s, a reconnect, and a loaded machine's slack; far below 3 minutes.
    let bound = Duration::from_secs(25);
    let mut seen = Vec::new();
    for notice in [
        "*** NOTICE the room is degraded: ",
        "*** NOTICE the room is back: ",
    ] {
        while !seen.iter().any(|l: &String| l.starts_with(notice)) {
            assert!(
                frozen.elapsed() < bound,
                "no {notice:?} within {bound:?} of the freeze: {seen:?}\nnode b:\n{}",
                ds[1].log()
            );
            seen.extend(line_within(&mut rb, Duration::from_millis(500)));
        }
    }
    let moved = server_port(&ds[1].cluster_status());
    assert!(
        moved.is_some() && moved != Some(servers[b_server].port),
        "node b is still on the frozen server: {}\n{}",
        ds[1].cluster_status(),
        ds[1].log()
    );
    sync(&mut sb, "sb", "after the freeze", &mut [&mut ra, &mut rb]);
    sync(&mut ra, "ra", "and back", &mut [&mut rb, &mut sb]);
    servers[b_server].signal(Signal::SIGCONT);
}

/// A node that stops answering the cluster for longer than `cluster.node-timeout` (here its
/// process is frozen: a stalled VM; a partition looks the same to the others) is taken for
/// dead: the other node announces its users' leaves and frees their names, while the users
/// are still connected to it. When it is back, a user still connected joins again everywhere
/// and is told so; one whose name someone took meanwhile is told it is lost and closed; and
/// chat goes both ways again. Before, both stayed seated on their own node only, hearing the
/// room but unseen by it.
#[test]
fn cluster_users_of_a_node_taken_for_dead_join_again_or_are_told_when_it_is_back() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let ds = start_nodes(&[&nats], &room_name("cutoff"), &["a", "b"]);
    let mut ra = ds[0].join("ra");
    let mut rb = ds[1].join("rb");
    let mut sb = ds[1].join("sb");
    ra.expect_prefix("*** JOIN sb");
    sync(&mut sb, "sb", "start", &mut [&mut ra, &mut rb]);
    wait_live(&[&ds[0], &ds[1]], &["a", "b"]);

    ds[1].signal(Signal::SIGSTOP);
    let frozen = Instant::now();
    let bound = Duration::from_secs(20);
    let mut gone = Vec::new();
    while gone.len() < 2 {
        assert!(
            frozen.elapsed() < bound,
            "node b's users not taken for gone within {bound:?}: {gone:?}\n{}",
            ds[0].log()
        );
        if let Some(l) = line_within(&mut ra, Duration::from_millis(500)) {
            assert!(!l.starts_with("*** ERR"), "{l}");
            if l.starts_with("*** LEAVE ") {
                gone.push(l);
            }
        }
    }
    gone.sort();
    assert_eq!(
        gone,
        [
            "*** LEAVE rb left (node b lost)",
            "*** LEAVE sb left (node b lost)"
        ]
    );
    // rb's name is free: someone else takes it while node b is away.
    let mut rb2 = ds[0].join("rb");
    ds[1].signal(Signal::SIGCONT);

    // sb is back in the room, and told so; ra sees it join again.
    let told = sb.expect_prefix("*** NOTICE this server was cut off");
    assert!(told.contains("you are back in the room"), "{told}");
    ra.expect_prefix("*** JOIN sb");
    // rb lost its name: told why, and closed; sb sees it go.
    let last = rb.until_eof();
    assert!(
        last.iter()
            .any(|l| l.starts_with("*** ERR unavailable ")
                && l.contains("your name is no longer yours")),
        "rb: {last:?}\n{}",
        ds[1].log()
    );
    // The room goes on both ways, and both nodes see the same members.
    sync(&mut sb, "sb", "back", &mut [&mut ra, &mut rb2]);
    sync(&mut rb2, "rb", "hello", &mut [&mut ra, &mut sb]);
    for c in [&mut ra, &mut sb] {
        c.send("/who");
        assert_eq!(c.expect_prefix("*** WHO "), "*** WHO 3 ra rb sb");
    }
}

/// Lines sent while the stream's leader is frozen all go unanswered; once it is killed and
/// another server leads, they arrive after a short pause, in order: the first one's ack is
/// waited for once, not each line's in turn (20 lines each waiting its own 2 s take 40 s).
#[test]
fn cluster_lines_swallowed_by_a_dead_stream_leader_arrive_after_a_short_pause() {
    if !nats_present() {
        return;
    }
    let room = room_name("swallow");
    let (mut servers, ds, [mut ra, mut rb], mut sb, b_server) = three_servers_leader_off_b(&room);
    let other = (b_server + 1) % servers.len();
    let leader = stream_leader(&servers[other], &room).expect("a leader");
    let victim = servers
        .iter()
        .position(|s| s.name == leader)
        .expect("the leader is one of the servers");
    const LINES: usize = 20;
    servers[victim].signal(Signal::SIGSTOP);
    for i in 1..=LINES {
        sb.send(&format!("line {i}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    servers[victim].kill();
    let back = stream_back(&servers, victim, &room);
    let want: Vec<String> = (1..=LINES).map(|i| format!("sb: line {i}")).collect();
    // The first line's ack waits 2 s before it is retried, once; the rest follow at once.
    for (who, c) in [("ra", &mut ra), ("rb", &mut rb)] {
        let limit = (back + PAUSE).saturating_duration_since(Instant::now());
        let lines = chat_lines(c, who, LINES, limit, &ds[1].log());
        assert_eq!(lines, want, "{who}: sb's lines\n{}", ds[1].log());
    }
    // Nor was the sender told that any of them was lost.
    sb.send("/who");
    let seen = sb.lines_until(|l| l.starts_with("*** WHO "));
    assert!(!seen.iter().any(|l| l.starts_with("*** ERR")), "{seen:?}");
}

/// Node b's consumer lost its leader with the NATS server that also led the JetStream meta
/// group, the stream led elsewhere: the placement that stalled node b for 5-9 s while the
/// stream took writes all along (its consumer had no leader until its election, its pull died
/// with the server, and a new consumer cannot be created without a meta leader). Node b must
/// read the stream directly meanwhile.
#[test]
fn cluster_a_node_follows_the_room_while_its_consumer_and_the_meta_group_elect_leaders() {
    if !nats_present() {
        return;
    }
    lose_a_leading_server("meta", Victim::MetaLeader);
}

/// Node b's NATS server led the room's stream and node b's consumer, and dies while a user on
/// node a chats: node b reconnects elsewhere, the stream elects a leader (4-9 s, the server's
/// own election), and node b's users see the room again within `PAUSE` of that.
#[test]
fn cluster_a_node_whose_nats_server_led_the_stream_and_its_consumer_resumes_at_once() {
    if !nats_present() {
        return;
    }
    lose_a_leading_server("led", Victim::NodeBsServer);
}

/// Which server `lose_a_leading_server` kills.
#[derive(Clone, Copy, Debug)]
enum Victim {
    /// Node b's own server, made to lead the stream and node b's consumer.
    NodeBsServer,
    /// The JetStream meta leader, made to lead node b's consumer but not the stream.
    MetaLeader,
}

/// The server the servers' logs last named as the JetStream meta leader (the leader cannot
/// be moved without the system account, so the tests find it instead).
fn meta_leader(servers: &[NatsServer]) -> Option<usize> {
    let mut latest: Option<(String, usize)> = None;
    for (i, s) in servers.iter().enumerate() {
        for line in s.log().lines() {
            // "[pid] 2026/12/05 15:39:16.761436 [INF] JetStream cluster new metadata leader: n1/c"
            let Some(stamp) = line.split(" [").next().and_then(|l| l.split_once("] ")) else {
                continue;
            };
            let leader = if line.contains("Self is new JetStream cluster metadata leader") {
                Some(i)
            } else if let Some((_, name)) = line.split_once("new metadata leader: ") {
                let name = name.split('/').next().unwrap_or_default();
                servers.iter().position(|s| s.name == name)
            } else {
                None
            };
            if let Some(leader) = leader
                && latest.as_ref().is_none_or(|(at, _)| stamp.1 >= at.as_str())
            {
                latest = Some((stamp.1.to_owned(), leader));
            }
        }
    }
    latest.map(|(_, i)| i)
}

/// Places the leaders as `victim` says, kills that server while a user on node a chats every
/// 50 ms, and holds both nodes to `PAUSE` after the stream takes writes again, every line once
/// and in order, and no sender told of a lost line.
fn lose_a_leading_server(base: &str, victim: Victim) {
    let room = room_name(base);
    let (mut servers, ds, [mut ra, mut rb], mut sb, b_server) = three_servers_leader_off_b(&room);
    let mut sa = ds[0].join("sa");
    sync(&mut sa, "sa", "start", &mut [&mut ra, &mut rb]);
    let dead = match victim {
        Victim::NodeBsServer => b_server,
        Victim::MetaLeader => meta_leader(&servers).expect("a meta leader in the servers' logs"),
    };
    let stream_on_dead = matches!(victim, Victim::NodeBsServer);
    // Each step-down hands a leadership to another server, at random.
    let target = servers[dead].name.clone();
    let other = (dead + 1) % servers.len();
    let placing = Instant::now();
    wait_for(
        Duration::from_secs(60),
        &format!("the leaders placed for {victim:?}"),
        || {
            let consumer = consumer_of(&servers[other], &room, "b")?;
            let stream = stream_leader(&servers[other], &room)?;
            let led = consumer_leader(&servers[other], &room, &consumer)?;
            let stream_ok = (stream == target) == stream_on_dead;
            if stream_ok && led == target {
                return Some(());
            }
            let mut c = servers[other].client();
            if !stream_ok {
                let _ = c.js_api(&format!("STREAM.LEADER.STEPDOWN.CHAT_{room}"), "");
            }
            if led != target {
                let _ = c.js_api(
                    &format!("CONSUMER.LEADER.STEPDOWN.CHAT_{room}.{consumer}"),
                    "",
                );
            }
            std::thread::sleep(Duration::from_millis(500));
            None
        },
        || ds[1].log(),
    );
    if let Victim::MetaLeader = victim {
        assert_eq!(meta_leader(&servers), Some(dead), "the meta leader moved");
    }
    eprintln!(
        "{victim:?}: killing {target} (node b talks to {}), leaders placed in {:?}",
        servers[b_server].name,
        placing.elapsed()
    );
    sync(&mut sa, "sa", "placed", &mut [&mut ra, &mut rb]);

    // sa chats every 50 ms from before the kill until well after the stream is back.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                sa.send(&format!("line {i}"));
                i += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            sa.send("end");
            (sa, i)
        })
    };
    let limit = Duration::from_secs(60);
    let readers = [ra, rb].map(|c| read_timed(c, "sa: end".to_owned(), limit));
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    servers[dead].kill();
    let back = stream_back(&servers, dead, &room);
    // Long enough after the stream is back to see whether each node followed it.
    std::thread::sleep(PAUSE + Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut sa, sent) = sender.join().expect("sender");
    let want: Vec<String> = (0..sent)
        .map(|i| format!("sa: line {i}"))
        .chain(["sa: end".to_owned()])
        .collect();
    // Neither sender was told that a line was lost (its lines' fate first: a refused line is
    // missing below too).
    for (who, c, d) in [("sa", &mut sa, &ds[0]), ("sb", &mut sb, &ds[1])] {
        c.send("/who");
        let seen = c.lines_until(|l| l.starts_with("*** WHO "));
        let refused: Vec<&String> = seen.iter().filter(|l| l.starts_with("*** ERR")).collect();
        assert!(
            refused.is_empty(),
            "{who} was told: {refused:?}\n{}",
            d.log()
        );
    }
    let results: Vec<_> = readers
        .into_iter()
        .map(|r| r.join().expect("reader").1)
        .collect();
    // Both readers' counts first: lines missing on both nodes were not stored (the sender's
    // node did not publish them), on one node only they were not delivered there.
    let counts: Vec<String> = ["ra", "rb"]
        .iter()
        .zip(&results)
        .map(|(who, lines)| format!("{who} got {} of {}", lines.len(), want.len()))
        .collect();
    for ((who, d), lines) in [("ra", &ds[0]), ("rb", &ds[1])].into_iter().zip(&results) {
        let seen: Vec<&String> = lines.iter().map(|(_, l)| l).collect();
        if seen != want.iter().collect::<Vec<_>>() {
            let missing: Vec<&String> = want.iter().filter(|l| !seen.contains(l)).collect();
            let twice: Vec<&&String> = seen.iter().filter(|l| count_in(&seen, l) > 1).collect();
            panic!(
                "{who}: {} lines of {}; missing {missing:?}; more than once {twice:?}; \
                 last {:?} ({})\n--- node a:\n{}\n--- node b:\n{}",
                seen.len(),
                want.len(),
                seen.last(),
                counts.join(", "),
                ds[0].log(),
                ds[1].log()
            );
        }
        // The first line to arrive once the stream takes writes again.
        let next = lines.iter().map(|(at, _)| *at).find(|at| *at >= back);
        let pause = next.map(|at| at - back);
        eprintln!(
            "{who}: stream back {:?} after the kill, next line {pause:?} after that",
            back - killed
        );
        assert!(
            pause.is_some_and(|p| p <= PAUSE),
            "{who}: next line {pause:?} after the stream took writes again ({:?} after the \
             kill), more than {PAUSE:?}\n{}",
            back - killed,
            d.log()
        );
    }
}

/// How many of `lines` are `line`.
fn count_in(lines: &[&String], line: &String) -> usize {
    lines.iter().filter(|l| **l == line).count()
}

#[test]
fn cluster_node_started_before_nats_waits_for_it() {
    if !nats_present() {
        return;
    }
    let mut nats = NatsServer::unstarted();
    let d = TestDaemon::with(cluster_config(&[&nats], &room_name("early"), "a")).start();

    // Up, answering, and saying what it waits for.
    let last = std::cell::RefCell::new(serde_json::Value::Null);
    wait_for(
        WAIT,
        "status to say what the node waits for",
        || {
            let c = d.chatctl_json(&["status"])["response"]["cluster"].clone();
            let waiting = c["waiting"].as_str().is_some_and(|w| w.contains("NATS"));
            let done = c["ready"] == false && waiting;
            *last.borrow_mut() = c;
            done.then_some(())
        },
        || format!("last: {}\n{}", last.borrow(), d.log()),
    );
    let last = last.into_inner();
    assert_eq!(last["connected"], false, "{last}");
    let answer = try_name(&d, "alice");
    assert!(answer.starts_with("*** ERR unavailable "), "{answer}");
    nats.start_again();
    d.wait_cluster_ready();
    assert!(d.cluster_status()["waiting"].is_null());
    let mut alice = d.join("alice");
    let mut bob = d.join("bob");
    alice.expect_prefix("*** JOIN bob");
    bob.send("hello");
    assert_eq!(alice.line(), "bob: hello");
}

/// A node authenticates with a credentials file: `user:password` or a token, told apart by
/// content. Wrong credentials keep it waiting with the reason in its status and log.
#[test]
fn cluster_nodes_authenticate_with_a_credentials_file() {
    if !nats_present() {
        return;
    }
    for (server_args, good, bad) in [
        (
            &["--user", "chat", "--pass", "s3cret"][..],
            "chat:s3cret\n",
            "chat:wrong\n",
        ),
        (
            &["--auth", "t0ken-of-chat"][..],
            "t0ken-of-chat\n",
            "not-the-token\n",
        ),
    ] {
        let nats = NatsServer::start_with_auth(server_args);
        let dir = tempfile::tempdir().expect("tempdir");
        let (good_path, bad_path) = (dir.path().join("good"), dir.path().join("bad"));
        std::fs::write(&good_path, good).expect("write credentials");
        std::fs::write(&bad_path, bad).expect("write credentials");
        let room = room_name("auth");
        let with = |node: &str, creds: &std::path::Path| {
            cluster_config(&[&nats], &room, node).set_str(
                "cluster",
                "credentials",
                &creds.display().to_string(),
            )
        };
        let good_node = TestDaemon::with(with("a", &good_path)).start();
        good_node.wait_cluster_ready();
        let mut alice = good_node.join("alice");
        let bad_node = TestDaemon::with(with("b", &bad_path)).start();
        wait_until(WAIT, "the refused node to say why", || {
            bad_node.log().to_lowercase().contains("authorization")
        });
        let c = bad_node.cluster_status();
        assert_eq!(c["ready"], false, "{c}");
        assert!(
            c["waiting"].as_str().is_some_and(|w| w.contains("NATS")),
            "{c}"
        );
        // The secret itself is never logged, only the file's path.
        let secret = good.trim().rsplit(':').next().unwrap_or_default();
        assert!(!bad_node.log().contains(secret) && !good_node.log().contains(secret));
        alice.send("/who");
        assert_eq!(alice.expect_prefix("*** WHO "), "*** WHO 1 alice");
    }
}

// ---------------------------------------------------------------------------------- hostile

#[test]
fn cluster_skips_hostile_messages_on_the_bus() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let room = room_name("hostile");
    let ds = start_nodes(&[&nats], &room, &["a", "b"]);
    let mut alice = ds[0].join("alice");
    let mut bob = ds[1].join("bob");
    alice.expect_prefix("*** JOIN bob");

    let member = r#""who":{"node":"evil","boot":1,"id":7}"#;
    let oversized = format!(
        r#"{{"v":1,"from":"evil","event":"announce","text":"{}"}}"#,
        "x".repeat(300 * 1024)
    );
    let long_text = format!(
        r#"{{"v":1,"from":"evil","event":"announce","text":"{}"}}"#,
        "y".repeat(65 * 1024)
    );
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let skipped: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        (
            "garbage",
            b"\x00\xff\xfe not json at all \r\n PING".to_vec(),
        ),
        ("oversized", oversized.into_bytes()),
        ("text over 64 KiB", long_text.into_bytes()),
        ("deep nesting", deep.into_bytes()),
        (
            "future version",
            br#"{"v":2,"from":"evil","event":"announce","text":"from the future"}"#.to_vec(),
        ),
        (
            "version as text",
            br#"{"v":"1","from":"evil","event":"announce","text":"typed wrong"}"#.to_vec(),
        ),
        (
            "unknown event",
            br#"{"v":1,"from":"evil","event":"format-disk"}"#.to_vec(),
        ),
        (
            "bad node name",
            br#"{"v":1,"from":"no such node!","event":"announce","text":"bad node"}"#.to_vec(),
        ),
        ("missing fields", br#"{"v":1}"#.to_vec()),
    ];
    let mut raw = nats.client();
    let subject = format!("chat.{room}.events");
    let mut seqs = Vec::new();
    for (what, payload) in &skipped {
        let ack = raw.js_publish(&subject, payload);
        let seq = ack["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("{what}: not stored: {ack}"));
        seqs.push((*what, seq));
    }
    // Well-formed but not acceptable: a reserved name, and a control-laden announcement
    // (sanitised again, so it stays one harmless line).
    let bad_name = format!(
        r#"{{"v":1,"from":"evil","event":"say",{member},"name":"root","text":"i am root","at":0}}"#
    );
    raw.js_publish(&subject, bad_name.as_bytes());
    raw.js_publish(
        &subject,
        br#"{"v":1,"from":"evil","event":"announce","text":"hi\u001b[2J\r\n*** KICKED fake"}"#,
    );

    // Chat goes on; the only line anyone saw from all that is the sanitised announcement.
    let rest = sync(&mut bob, "bob", "still here", &mut [&mut alice]);
    let notice = "*** NOTICE hi\\u{001b}[2J\\u{000d}\\u{000a}*** KICKED fake";
    assert_eq!(rest[0], [notice], "alice");
    let rest = sync(&mut alice, "alice", "me too", &mut [&mut bob]);
    assert_eq!(rest[0], [notice], "bob");

    for d in &ds {
        let v = d.chatctl_json(&["status"]);
        assert_eq!(v["response"]["cluster"]["ready"], true);
        let log = d.log();
        assert!(!log.contains("panicked"), "{log}");
        for (what, seq) in &seqs {
            assert!(
                log.lines().any(|l| l.contains("skipping a stream message")
                    && l.contains(&format!("seq={seq} "))),
                "{what} (seq {seq}) not logged as skipped:\n{log}"
            );
        }
        assert!(
            log.contains("ignoring a member with an invalid name"),
            "the reserved name was not logged:\n{log}"
        );
    }
}

// ------------------------------------------------------------ edges: joins, renames, history, bans, start-up

#[test]
fn cluster_room_names_with_an_underscore_work() {
    if !nats_present() {
        return;
    }
    // chatd --check-config accepts `_` in cluster.name (docs: A-Z a-z 0-9 - _).
    let nats = NatsServer::start();
    let name = format!("under_score_{}", std::process::id());
    let ds = start_nodes(&[&nats], &name, &["a", "b"]);
    let (mut alice, mut bob) = (ds[0].join("alice"), ds[1].join("bob"));
    alice.expect_prefix("*** JOIN bob");
    bob.send("hi");
    assert_eq!(alice.line(), "bob: hi");
}

#[test]
fn cluster_nick_right_after_joining_works() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let ds = start_nodes(&[&nats], &room_name("nick1"), &["a"]);
    // The name and the /nick in one packet: the /nick is handled before the join is back.
    let mut c = ds[0].connect();
    c.expect_prefix("*** HELLO");
    c.send_raw(b"xx\n/nick yy\n");
    let lines = c.lines_until(|l| l.starts_with("*** NICK") || l.starts_with("*** ERR"));
    assert_eq!(
        lines.last().map(String::as_str),
        Some("*** NICK xx is now known as yy"),
        "{lines:?}"
    );
}

#[test]
fn cluster_nick_frees_the_old_name() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let ds = start_nodes(&[&nats], &room_name("nick2"), &["a", "b"]);
    let mut zed = ds[0].join("zed");
    zed.send("/nick zorro");
    assert_eq!(zed.line(), "*** NICK zed is now known as zorro");
    for d in &ds {
        let answer = try_name(d, "zed");
        assert!(answer.starts_with("*** WELCOME zed "), "{answer}");
    }
}

/// A user who hangs up on one node and comes straight back through another (or renames and
/// someone takes the old name at once) finds the name free: the entry's deletion is a round
/// trip behind the leave, and a claim that meets a holder on its way out waits for it instead
/// of refusing. Raced many times, since one round rarely loses the race.
#[test]
fn cluster_a_name_given_up_is_free_at_once_on_every_node() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let ds = start_nodes(&[&nats], &room_name("hop"), &["a", "b"]);
    for i in 0..12 {
        let (here, there) = (&ds[i % 2], &ds[(i + 1) % 2]);
        let name = format!("hop{i}");
        drop(here.join(&name));
        let answer = try_name(there, &name);
        assert!(
            answer.starts_with(&format!("*** WELCOME {name} ")),
            "round {i}: {answer}"
        );
        let mut c = here.join(&format!("nick{i}"));
        c.send(&format!("/nick renamed{i}"));
        c.expect_prefix("*** NICK");
        for d in [here, there] {
            let answer = try_name(d, &format!("nick{i}"));
            assert!(answer.starts_with("*** WELCOME"), "round {i}: {answer}");
        }
    }
    // A name held by someone who stays is still refused, from either node.
    let _stays = ds[0].join("stays");
    for d in &ds {
        let answer = try_name(d, "stays");
        assert!(answer.starts_with("*** ERR name-taken"), "{answer}");
    }
}

/// Node `d`'s `chatctl list`: (name, node) of every user, sorted by name.
fn listed(d: &TestDaemon) -> Vec<(String, String)> {
    let v = d.chatctl_json(&["list"]);
    let mut users: Vec<(String, String)> = v["response"]["users"]
        .as_array()
        .map(|users| {
            users
                .iter()
                .map(|u| {
                    (
                        u["name"].as_str().unwrap_or("?").to_owned(),
                        u["node"].as_str().unwrap_or("?").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    users.sort();
    users
}

/// A member of another node renamed, then its name reclaimed on the other node: every node's
/// `/who`, `/msg` and `chatctl list` follow (the other node's members live in a table of
/// their own, with their own name index).
#[test]
fn cluster_renames_and_reclaims_reach_the_other_nodes() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let ds = start_nodes(&[&nats], &room_name("rename"), &["a", "b"]);
    let (a, b) = (&ds[0], &ds[1]);
    let mut alice = join_seated(a, "alice");
    let mut bob = join_seated(b, "bob");
    alice.expect_prefix("*** JOIN bob");

    // bob, on b, renames: a's room finds him under the new name only.
    bob.send("/nick Robert");
    assert_eq!(bob.line(), "*** NICK bob is now known as Robert");
    assert_eq!(alice.line(), "*** NICK bob is now known as Robert");
    alice.send("/who");
    assert_eq!(alice.line(), "*** WHO 2 alice Robert");
    alice.send("/msg ROBERT psst");
    assert_eq!(alice.line(), "-> Robert (private): psst");
    assert_eq!(bob.line(), "alice (private): psst");
    alice.send("/msg bob hello?");
    let l = alice.line();
    assert!(l.starts_with("*** ERR no-such-user "), "{l}");
    let both = vec![
        ("Robert".to_owned(), "b".to_owned()),
        ("alice".to_owned(), "a".to_owned()),
    ];
    assert_eq!(listed(a), both);
    // And a kick on a finds him there by his new name (below, after the reclaim).

    // alice's name reclaimed by a new connection on b: a's alice is sent off, and a's room
    // now lists alice on b.
    alice.send("/token");
    let line = alice.expect_prefix("*** TOKEN ");
    let token = line.split(' ').nth(2).unwrap_or_default().to_owned();
    let mut back = b.connect();
    back.expect_prefix("*** HELLO");
    back.send(&format!("/reclaim alice {token}"));
    let verdict = back.expect_prefix("*** ");
    assert!(verdict.starts_with("*** WELCOME alice "), "{verdict}");
    assert_eq!(
        alice.expect_prefix("*** KICKED"),
        "*** KICKED your name was reclaimed by a new connection"
    );
    assert!(alice.until_eof().is_empty());
    assert_eq!(
        bob.expect_prefix("*** LEAVE"),
        "*** LEAVE alice left (reconnected)"
    );
    assert_eq!(bob.expect_prefix("*** JOIN"), "*** JOIN alice joined");
    let moved = vec![
        ("Robert".to_owned(), "b".to_owned()),
        ("alice".to_owned(), "b".to_owned()),
    ];
    for d in [a, b] {
        wait_for(
            WAIT,
            "alice to be listed on node b everywhere",
            || (listed(d) == moved).then_some(()),
            || format!("{:?}\n{}", listed(d), d.log()),
        );
    }
    back.send("/who");
    assert_eq!(back.expect_prefix("*** WHO"), "*** WHO 2 alice Robert");

    // A kick on a reaches Robert on b, by the name a learned from the rename.
    let out = a.chatctl(&["kick", "robert", "--reason", "renamed"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(bob.expect_prefix("*** KICKED"), "*** KICKED renamed");
    assert_eq!(
        back.expect_prefix("*** KICK"),
        "*** KICK Robert was kicked (renamed)"
    );
    wait_for(
        WAIT,
        "Robert to be gone from node a's list",
        || (listed(a) == vec![("alice".to_owned(), "b".to_owned())]).then_some(()),
        || format!("{:?}", listed(a)),
    );
}

#[test]
fn cluster_a_private_message_to_nobody_is_refused_once() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let ds = start_nodes(&[&nats], &room_name("msg"), &["a"]);
    let mut alice = ds[0].join("alice");
    alice.send("/msg nobody hi");
    let l = alice.line();
    assert!(l.starts_with("*** ERR no-such-user "), "{l}");
    let again = line_within(&mut alice, Duration::from_millis(1500));
    assert_eq!(again, None, "a second answer");
}

#[test]
fn cluster_a_newcomer_gets_history_before_answers() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let ds = start_nodes(&[&nats], &room_name("hist2"), &["a"]);
    let (mut alice, mut bob) = ds[0].pair("alice", "bob");
    // Once bob has it, "hello" is in the room's order (a line is ordered when the stream
    // takes it, not when it is sent: one still on its way could follow the join below).
    sync(&mut alice, "alice", "hello", &mut [&mut bob]);
    // As on a single node: welcome, MOTD, history, then the answer to what it asked (asked
    // at once, in the same packet as the name).
    let mut c = ds[0].connect();
    c.expect_prefix("*** HELLO");
    c.send_raw(b"newcomer\n/who\n");
    let lines = c.lines_until(|l| l.starts_with("*** WHO "));
    assert!(
        lines.iter().any(|l| l.ends_with(" alice: hello")),
        "history before the answer: {lines:?}"
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("*** WHO 3 alice bob newcomer"),
        "{lines:?}"
    );
}

#[test]
fn cluster_a_refused_line_is_never_delivered() {
    if !nats_present() {
        return;
    }
    let Outage { seen, refused } = nats_outage();
    for who in ["bob", "carol"] {
        let shown = count(&seen[who], "alice: while down");
        assert_eq!(
            shown == 1,
            !refused,
            "{who}: a line refused as not delivered must not reach the room later, one not \
             refused must reach it (refused: {refused}): {:?}",
            seen[who]
        );
    }
}

#[test]
fn cluster_log_says_why_it_waits_for_nats() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::unstarted();
    let d = TestDaemon::with(cluster_config(&[&nats], &room_name("early2"), "a")).start();
    // A warning that names the server it cannot reach and says it keeps trying.
    wait_for(
        WAIT,
        "a warning that chatd cannot reach NATS and retries",
        || {
            d.log()
                .lines()
                .any(|l| {
                    l.contains("WARN")
                        && l.contains(&nats.addr().to_string())
                        && l.contains("retrying")
                })
                .then_some(())
        },
        || d.log(),
    );
}

/// A node-timeout shorter than a NATS leader election is allowed (these tests use 2 s) but
/// logged as a risk, once; the default 10 s is not.
#[test]
fn cluster_a_node_timeout_shorter_than_an_election_is_warned_about_once() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let room = room_name("nto");
    let warning = "cluster.node-timeout is shorter than a NATS leader election";
    let short = start_nodes(&[&nats], &room, &["a"]);
    short[0].wait_log(warning);
    let long = TestDaemon::with(cluster_config(&[&nats], &room, "b").set_str(
        "cluster",
        "node-timeout",
        "10s",
    ))
    .start();
    long.wait_cluster_ready();
    // Once a sees b's lease, b has been through its lease rounds' first check.
    wait_live(&[&short[0], &long], &["a", "b"]);
    assert!(!long.log().contains(warning), "{}", long.log());
    assert_eq!(
        short[0].log().matches(warning).count(),
        1,
        "{}",
        short[0].log()
    );
}

#[test]
fn cluster_a_new_node_refuses_banned_names_at_once() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let room = room_name("bans2");
    let ds = start_nodes(&[&nats], &room, &["a"]);
    let out = ds[0].chatctl(&["ban", "mallory"]);
    assert!(out.status.success(), "{out:?}");
    // From the moment it is ready, a new node applies the room's bans.
    let late = start_nodes(&[&nats], &room, &["b"]);
    let answer = try_name(&late[0], "mallory");
    assert!(answer.starts_with("*** ERR banned "), "{answer}");
    let bans = late[0].chatctl_json(&["bans"]).to_string();
    assert!(bans.contains("mallory"), "{bans}");
}

#[test]
fn cluster_a_node_started_later_gives_the_same_history() {
    if !nats_present() {
        return;
    }
    history_scenario(true);
}

#[test]
fn cluster_a_member_who_leaves_at_once_is_seen_alike_everywhere() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let ds = start_nodes(&[&nats], &room_name("quick"), &["a", "b"]);
    let mut ra = ds[0].join("ra");
    let mut rb = ds[1].join("rb");
    let mut marker = ds[0].join("marker");
    ra.expect_prefix("*** JOIN rb");
    sync(&mut marker, "marker", "start", &mut [&mut ra, &mut rb]);
    // Name, a line and /quit in one packet, on node b.
    let mut v = ds[1].connect();
    v.expect_prefix("*** HELLO");
    v.send_raw(b"visitor\nhello\n/quit\n");
    let _ = v.until_eof();
    let seen = sync(&mut marker, "marker", "end", &mut [&mut ra, &mut rb]);
    let (on_a, on_b) = (&seen[0], &seen[1]);
    assert_eq!(
        on_a, on_b,
        "node a's member and node b's member saw different rooms"
    );
}

/// Threads of process `pid` now (`/proc/PID/status`).
fn threads_of(pid: i32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Joins that wait for NATS (frozen here with SIGSTOP) hold no runtime thread each: the node
/// keeps its thread count and answers its other members meanwhile. A client that hangs up
/// while its join waits leaves no name behind once NATS answers.
#[test]
fn cluster_joins_waiting_for_nats_hold_no_threads() {
    if !nats_present() {
        return;
    }
    // Below limits.max-connections-per-ip (20), with alice and the one that hangs up.
    const WAITING: usize = 16;
    let nats = NatsServer::start();
    let ds = start_nodes(&[&nats], &room_name("parked"), &["a"]);
    let pid = ds[0].pid();
    let mut alice = join_seated(&ds[0], "alice");
    let before = threads_of(pid);

    nats.signal(Signal::SIGSTOP);
    let mut waiting: Vec<_> = (0..WAITING)
        .map(|i| {
            let mut c = ds[0].connect();
            c.expect_prefix("*** HELLO");
            c.send(&format!("parked{i}"));
            c
        })
        .collect();
    // One more, which hangs up while its claim is in flight.
    let mut ghost = ds[0].connect();
    ghost.expect_prefix("*** HELLO");
    ghost.send("ghost");
    // Every join above now waits for NATS (none can be answered). The node still answers a
    // member's local command, and holds no thread per waiting join.
    let mut most = threads_of(pid);
    for _ in 0..10 {
        alice.send("/who");
        // Any count: a join whose claim and delivery NATS had taken before the stop was seated
        // (seen once under load), and one may yet be.
        alice.expect_prefix("*** WHO ");
        most = most.max(threads_of(pid));
        thread::sleep(Duration::from_millis(50));
    }
    drop(ghost);
    thread::sleep(Duration::from_millis(200));
    most = most.max(threads_of(pid));
    nats.signal(Signal::SIGCONT);
    assert!(
        most <= before + 4,
        "{WAITING} joins waiting for NATS took threads: {before} before, {most} while waiting"
    );

    // Once NATS answers, every waiting join gets its answer: seated, or told NATS was too slow.
    for (i, c) in waiting.iter_mut().enumerate() {
        let answer = c.line();
        assert!(
            answer.starts_with(&format!("*** WELCOME parked{i} "))
                || answer.starts_with("*** ERR unavailable "),
            "parked{i}: {answer}"
        );
    }
    // The name whose client hung up mid-claim is freed (claimed, seated, then left).
    wait_for(
        WAIT,
        "the hung-up client's name to be free",
        || {
            let answer = try_name(&ds[0], "ghost");
            answer.starts_with("*** WELCOME ghost ").then_some(())
        },
        || ds[0].log(),
    );
}

/// Nodes a and b of `room`, each with a web listener too, once both follow the cluster.
fn web_nodes(nats: &NatsServer, room: &str) -> Vec<TestDaemon> {
    start_ready(2, |i| {
        cluster_config(&[nats], room, ["a", "b"][i]).set("web", "listen", "[\"127.0.0.1:0\"]")
    })
}

/// A ban or a kick made on one node reaches a WebSocket user of another with its own close
/// code (4001 ban, 4000 kick), carried by the event, whatever the reason's text says.
#[test]
fn cluster_a_websocket_user_of_another_node_is_told_ban_from_kick() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let room = room_name("wsban");
    let ds = web_nodes(&nats, &room);
    let mut kicked = crate::helper::web::join(ds[1].web_addr(), "kicked");
    let mut banned = crate::helper::web::join(ds[1].web_addr(), "banned");
    let mut watcher = join_seated(&ds[0], "watcher");
    wait_for(
        WAIT,
        "node a to list both WebSocket users",
        || {
            let names: Vec<String> = listed(&ds[0]).into_iter().map(|(n, _)| n).collect();
            (names.contains(&"kicked".to_owned()) && names.contains(&"banned".to_owned()))
                .then_some(())
        },
        || format!("{:?}", listed(&ds[0])),
    );
    let reason = "banned words in the topic";
    let out = ds[0].chatctl(&["kick", "kicked", "--reason", reason]);
    assert!(out.status.success(), "{out:?}");
    kicked.expect_prefix("*** KICKED");
    assert_eq!(
        crate::helper::web::closed_with(&mut kicked),
        (4000, reason.to_owned())
    );
    let out = ds[0].chatctl(&["ban", "banned", "--reason", "spam"]);
    assert!(out.status.success(), "{out:?}");
    let line = banned.expect_prefix("*** KICKED");
    let (code, why) = crate::helper::web::closed_with(&mut banned);
    assert_eq!(code, 4001, "{line} / {why}");
    assert!(why.contains("spam"), "{why}");
    watcher.expect_prefix("*** KICK kicked");
    watcher.expect_prefix("*** KICK banned");
}

#[test]
fn cluster_a_websocket_message_of_several_lines_waits_for_its_claim() {
    if !nats_present() {
        return;
    }
    let nats = NatsServer::start();
    let room = room_name("wsheld");
    let ds = web_nodes(&nats, &room);
    let mut watcher = join_seated(&ds[1], "watcher");
    // A name, a /nick and a line in one WebSocket message: the name's claim waits for NATS,
    // and the lines after it must wait with it, neither lost nor handled before the join.
    let mut w = crate::helper::web::connect(ds[0].web_addr());
    w.expect_prefix("*** HELLO");
    // NATS frozen, so the claim surely waits while the rest of the message is at hand.
    nats.signal(Signal::SIGSTOP);
    // One text message (WsClient::send would make one message of each line).
    let ws = &mut w.reader.get_mut().ws;
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        "webby\n/nick webbo\nhello from a browser",
    ))
    .expect("send one message");
    thread::sleep(Duration::from_millis(300));
    nats.signal(Signal::SIGCONT);
    w.expect_prefix("*** WELCOME webby");
    let lines = watcher.lines_until(|l| l.starts_with("webbo: "));
    let joined = lines.iter().position(|l| l == "*** JOIN webby joined");
    let renamed = lines
        .iter()
        .position(|l| l == "*** NICK webby is now known as webbo");
    assert!(
        joined.is_some() && joined < renamed,
        "join, then nick: {lines:?}"
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("webbo: hello from a browser")
    );
    // chatctl on the other node sees the browser user under its new name, on node a.
    let users = ds[1].users();
    assert!(
        users
            .iter()
            .any(|u| u["name"] == "webbo" && u["node"] == "a"),
        "{users:?}"
    );
}
