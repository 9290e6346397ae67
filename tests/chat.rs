//! The chat protocol over real TCP, as docs/protocol.md describes it.

use std::time::Duration;

use crate::helper::{NO_RATE_LIMIT, TestDaemon, WAIT, agreed_order};

#[test]
fn greeting_join_message_and_quit() {
    let d = TestDaemon::start("");
    let mut alice = d.connect();
    let hello = alice.line();
    assert!(hello.starts_with("*** HELLO chatd "), "{hello}");
    alice.send("alice");
    assert!(alice.line().starts_with("*** WELCOME alice "));
    assert!(alice.line().starts_with("*** MOTD "));

    let mut bob = d.join("bob");
    assert_eq!(alice.line(), "*** JOIN bob joined");
    bob.send("hello alice");
    assert_eq!(alice.line(), "bob: hello alice");
    alice.send("hi bob");
    assert_eq!(bob.expect_prefix("alice: "), "alice: hi bob");

    alice.send("quit");
    assert_eq!(alice.line(), "*** BYE goodbye");
    assert_eq!(alice.try_line(), None, "server closes after quit");
    assert_eq!(bob.line(), "*** LEAVE alice left (quit)");
}

#[test]
fn slash_quit_and_dropped_connection_are_announced() {
    let d = TestDaemon::start("");
    let (mut watcher, mut a) = d.pair("watcher", "a");
    a.send("/quit");
    assert_eq!(a.line(), "*** BYE goodbye");
    assert_eq!(watcher.line(), "*** LEAVE a left (quit)");

    let b = d.join("b");
    watcher.expect_prefix("*** JOIN b");
    drop(b);
    assert_eq!(watcher.line(), "*** LEAVE b left (connection lost)");
}

#[test]
fn crlf_is_accepted() {
    let d = TestDaemon::start("");
    let mut a = d.join("a");
    let mut b = d.connect();
    b.expect_prefix("*** HELLO");
    b.send_raw(b"bob\r\nhello there\r\n");
    a.expect_prefix("*** JOIN bob");
    assert_eq!(a.line(), "bob: hello there");
}

#[test]
fn invalid_reserved_and_taken_names_can_be_retried() {
    let d = TestDaemon::start("");
    let _alice = d.join("alice");
    let mut c = d.connect();
    c.expect_prefix("*** HELLO");
    for (attempt, code) in [
        ("ALICE", "name-taken"),
        ("server", "name-reserved"),
        ("Admin", "name-reserved"),
        ("*** NOTICE", "name-invalid"),
        ("bad name", "name-invalid"),
        ("", "name-invalid"),
    ] {
        c.send(attempt);
        let line = c.line();
        assert!(
            line.starts_with(&format!("*** ERR {code} ")),
            "{attempt:?}: {line}"
        );
    }
    c.send("carol");
    assert!(c.line().starts_with("*** WELCOME carol "));
}

#[test]
fn every_receiver_sees_messages_in_the_same_order() {
    let d = TestDaemon::start(NO_RATE_LIMIT);
    let mut senders: Vec<_> = (0..3).map(|i| d.join(&format!("s{i}"))).collect();
    let mut receivers: Vec<_> = (0..3).map(|i| d.join(&format!("r{i}"))).collect();
    let per_sender = 50;
    std::thread::scope(|scope| {
        for (i, s) in senders.iter_mut().enumerate() {
            scope.spawn(move || {
                for k in 0..per_sender {
                    s.send(&format!("m{i}-{k}"));
                }
            });
        }
    });
    let order = agreed_order(&mut receivers, 3 * per_sender);
    // Each sender's own messages arrive in the order it sent them, each exactly once.
    for i in 0..3 {
        let mine: Vec<_> = order
            .iter()
            .filter(|l| l.starts_with(&format!("s{i}: ")))
            .cloned()
            .collect();
        let want: Vec<_> = (0..per_sender).map(|k| format!("s{i}: m{i}-{k}")).collect();
        assert_eq!(mine, want);
    }
}

#[test]
fn lines_sent_together_reach_everyone_as_if_sent_one_by_one() {
    // chatd gives the chat lines of one read to the room together (one push per recipient for
    // up to 512 bytes of them, not one per line). One write here holds more than that, with an
    // action, an empty line, a line longer than a frame, a control character, a private message
    // and a rename among the messages: everyone else must get each line, in the order sent,
    // the private message and the rename exactly where they were sent, and the history must
    // keep each line on its own.
    let d = TestDaemon::start(&format!("{NO_RATE_LIMIT}[room]\nhistory = 100\n"));
    let mut bob = d.join("bob");
    let mut carol = d.join("carol");
    bob.expect_prefix("*** JOIN carol");
    let mut alice = d.join("alice");
    bob.expect_prefix("*** JOIN alice");
    carol.expect_prefix("*** JOIN alice");

    let long = "x".repeat(700);
    let mut raw: Vec<String> = (0..20)
        .map(|k| format!("message {k} of the burst"))
        .collect();
    let mut seen: Vec<String> = raw.iter().map(|l| format!("alice: {l}")).collect();
    for (line, shown) in [
        ("/me waves".to_owned(), Some("* alice waves".to_owned())),
        (String::new(), None),
        (long.clone(), Some(format!("alice: {long}"))),
        ("tab\there".to_owned(), Some("alice: tab here".to_owned())),
        ("/msg bob psst".to_owned(), None),
        (
            "after the private one".to_owned(),
            Some("alice: after the private one".to_owned()),
        ),
        (
            "/nick alicia".to_owned(),
            Some("*** NICK alice is now known as alicia".to_owned()),
        ),
        (
            "said as alicia".to_owned(),
            Some("alicia: said as alicia".to_owned()),
        ),
        (
            "/me waves again".to_owned(),
            Some("* alicia waves again".to_owned()),
        ),
    ] {
        raw.push(line);
        seen.extend(shown);
    }
    let burst: String = raw.iter().map(|l| format!("{l}\n")).collect();
    assert!(burst.len() > 2 * 512, "more than two frames' worth");
    alice.send_raw(burst.as_bytes());

    let got: Vec<String> = (0..seen.len()).map(|_| carol.line()).collect();
    assert_eq!(got, seen);
    let private = seen
        .iter()
        .position(|l| l == "alice: tab here")
        .map_or(0, |i| i + 1);
    let mut bobs = seen.clone();
    bobs.insert(private, "alice (private): psst".to_owned());
    let got: Vec<String> = (0..bobs.len()).map(|_| bob.line()).collect();
    assert_eq!(got, bobs);
    // The sender gets none of its own lines back, only the private message's echo and the
    // rename's answer.
    alice.send("/who");
    let own = alice.lines_until(|l| l.starts_with("*** WHO "));
    assert!(
        own.iter()
            .all(|l| !l.starts_with("alice: ") && !l.starts_with("alicia: ")),
        "{own:?}"
    );
    assert!(own.iter().any(|l| l == "-> bob (private): psst"), "{own:?}");

    // A newcomer's history holds each chat line on its own, in order (not the rename).
    let mut dave = d.enter("dave");
    dave.send("/who");
    let history: Vec<String> = dave
        .lines_until(|l| l.starts_with("*** WHO "))
        .iter()
        .filter_map(|l| l.strip_prefix("*** HISTORY ")?.split_once(' '))
        .map(|(_when, line)| line.to_owned())
        .collect();
    let chat: Vec<String> = seen
        .into_iter()
        .filter(|l| !l.starts_with("*** "))
        .collect();
    assert_eq!(history, chat);
    assert_eq!(carol.line(), "*** JOIN dave joined");
}

#[test]
fn a_mass_disconnect_is_announced_once_each_in_one_order() {
    // Enough clients dropping at once to make a leave storm, whose announcements the room
    // batches: every watcher must still get each leave exactly once, in one order, with nothing
    // else in the room to push the batch out.
    let d = TestDaemon::start("[limits]\nmax-connections-per-ip = 100\n");
    let mut watchers: Vec<_> = (0..3).map(|i| d.join(&format!("w{i}"))).collect();
    let leavers: Vec<_> = (0..40).map(|i| d.join(&format!("x{i}"))).collect();
    for w in &mut watchers {
        w.expect_prefix("*** JOIN x39 ");
    }
    drop(leavers);
    let orders: Vec<Vec<String>> = watchers
        .iter_mut()
        .map(|w| (0..40).map(|_| w.line()).collect())
        .collect();
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "watchers disagree on order"
    );
    let mut names: Vec<String> = orders[0]
        .iter()
        .map(|l| {
            let rest = l
                .strip_prefix("*** LEAVE ")
                .unwrap_or_else(|| panic!("not a leave: {l}"));
            assert!(rest.ends_with(" left (connection lost)"), "{l}");
            rest.split(' ').next().unwrap_or_default().to_owned()
        })
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..40).map(|i| format!("x{i}")).collect();
    want.sort();
    assert_eq!(names, want, "each leave exactly once");
    // Later room lines come after all of them.
    watchers[0].send("after");
    for w in &mut watchers[1..] {
        assert_eq!(w.line(), "w0: after");
    }
}

#[test]
fn slash_commands() {
    // Eleven lines in a burst: more than the default limits.message-burst.
    let d = TestDaemon::start(NO_RATE_LIMIT);
    let (mut a, mut b) = d.pair("alice", "bob");

    a.send("/who");
    assert_eq!(a.line(), "*** WHO 2 alice bob");

    a.send("/me waves");
    assert_eq!(b.line(), "* alice waves");

    a.send("/msg BOB psst");
    assert_eq!(a.line(), "-> bob (private): psst");
    assert_eq!(b.line(), "alice (private): psst");
    a.send("/msg nobody hi");
    assert!(a.line().starts_with("*** ERR no-such-user "));

    a.send("/nick Alicia");
    assert_eq!(a.line(), "*** NICK alice is now known as Alicia");
    assert_eq!(b.line(), "*** NICK alice is now known as Alicia");
    b.send("/nick alicia");
    assert!(b.line().starts_with("*** ERR name-taken "));
    b.send("/nick root");
    assert!(b.line().starts_with("*** ERR name-reserved "));

    a.send("/help");
    assert!(a.line().starts_with("*** INFO commands: /who"));
    a.line();
    a.send("/dance");
    assert!(
        a.line()
            .starts_with("*** ERR unknown-command unknown command /dance")
    );
    a.send("/msg");
    assert_eq!(a.line(), "*** ERR bad-arguments usage: /msg NAME TEXT");
    a.send("//not a command");
    assert_eq!(b.line(), "Alicia: /not a command");
    // No command leaked into the room.
    b.assert_silent(Duration::from_millis(200));
}

#[test]
fn newcomers_see_marked_history() {
    let d = TestDaemon::start("[room]\nhistory = 2\n");
    let mut a = d.join("alice");
    for m in ["one", "two", "three"] {
        a.send(m);
    }
    a.send("/who"); // a round trip: the three messages were handled before it
    a.expect_prefix("*** WHO");
    let mut c = d.connect();
    c.expect_prefix("*** HELLO");
    c.send("carol");
    c.expect_prefix("*** WELCOME carol");
    c.expect_prefix("*** MOTD");
    let h1 = c.line();
    let h2 = c.line();
    assert!(
        h1.starts_with("*** HISTORY ") && h1.ends_with(" alice: two"),
        "{h1}"
    );
    assert!(
        h2.starts_with("*** HISTORY ") && h2.ends_with(" alice: three"),
        "{h2}"
    );
    // The timestamp is RFC 3339 UTC.
    let ts = h1.split(' ').nth(2).unwrap_or_default();
    assert!(ts.len() == 20 && ts.ends_with('Z'), "{ts}");
}

#[test]
fn history_zero_turns_it_off() {
    let d = TestDaemon::start("[room]\nhistory = 0\nmotd = \"\"\n");
    let mut a = d.join("alice");
    a.send("one");
    a.send("/who");
    a.expect_prefix("*** WHO");
    let mut c = d.join("carol");
    c.send("/who");
    assert!(
        c.line().starts_with("*** WHO 2"),
        "no history before the reply"
    );
}

#[test]
fn seed_style_unterminated_writes_are_messages() {
    let d = TestDaemon::start("");
    let mut watcher = d.join("watcher");
    let mut seed = d.connect();
    seed.expect_prefix("*** HELLO");
    seed.send_raw(b"pyuser");
    assert!(seed.line().starts_with("*** WELCOME pyuser"));
    watcher.expect_prefix("*** JOIN pyuser");
    seed.send_raw(b"ciao a tutti");
    assert_eq!(watcher.line(), "pyuser: ciao a tutti");
    seed.send_raw(b"second message");
    assert_eq!(watcher.line(), "pyuser: second message");
    seed.send_raw(b"quit");
    assert_eq!(watcher.line(), "*** LEAVE pyuser left (quit)");
}

#[test]
fn a_line_client_is_never_cut_by_the_pause() {
    let d = TestDaemon::start("");
    let (mut watcher, mut slow) = d.pair("watcher", "slow");
    slow.send_raw(b"first half ");
    // Well past partial-line-flush (150ms in the test config).
    std::thread::sleep(Duration::from_millis(600));
    slow.send_raw(b"second half\n");
    assert_eq!(watcher.line(), "slow: first half second half");
}

#[test]
fn invalid_utf8_is_refused_and_the_connection_survives() {
    let d = TestDaemon::start("");
    let (mut a, mut b) = d.pair("alice", "bob");
    b.send_raw(b"bad \xff\xfe bytes\n");
    assert!(b.line().starts_with("*** ERR bad-utf8 "));
    b.send("still here");
    assert_eq!(a.line(), "bob: still here");
}

#[test]
fn control_characters_never_reach_other_users_raw() {
    let d = TestDaemon::start("");
    let (mut a, mut b) = d.pair("alice", "bob");
    b.send_raw(b"red \x1b[31mtext\x07 \xe2\x80\xae reversed\n");
    let got = a.line();
    assert_eq!(
        got,
        "bob: red \\u{001b}[31mtext\\u{0007} \\u{202e} reversed"
    );
}

#[test]
fn too_long_lines_are_refused_and_the_stream_resyncs() {
    let d = TestDaemon::start("[limits]\nmax-line-length = 32\n");
    let (mut a, mut b) = d.pair("alice", "bob");
    let long = "x".repeat(100);
    b.send(&format!("{long}\nafter"));
    let err = b.line();
    assert!(err.starts_with("*** ERR line-too-long "), "{err}");
    assert!(err.contains("32 bytes"), "{err}");
    assert_eq!(a.line(), "bob: after");
    // A stream with no newline at all is cut off at the limit, not buffered.
    b.send_raw("y".repeat(10_000).as_bytes());
    assert!(b.line().starts_with("*** ERR line-too-long "));
    b.send_raw(b"\nok\n");
    assert_eq!(a.line(), "bob: ok");
}

#[test]
fn name_timeout_closes_silent_connections() {
    let d = TestDaemon::start("[limits]\nname-timeout = \"300ms\"\n");
    let mut c = d.connect();
    c.expect_prefix("*** HELLO");
    let rest = c.until_eof();
    assert!(
        rest.iter().any(|l| l.starts_with("*** ERR name-timeout ")),
        "{rest:?}"
    );
    d.wait_log("no name in time (limits.name-timeout)");
}

#[test]
fn server_full_is_said_and_closed() {
    let d = TestDaemon::start("[limits]\nmax-clients = 2\n");
    let _a = d.join("a");
    let _b = d.join("b");
    let mut c = d.connect();
    let line = c.line();
    assert!(line.starts_with("*** ERR server-full "), "{line}");
    assert!(line.contains("limits.max-clients"), "{line}");
    assert_eq!(c.try_line(), None);
    let _ = WAIT;
}
