//! Reclaiming a name after a lost connection (`/token`, `/reclaim NAME TOKEN`), against the
//! real daemon: the token works, a wrong or someone else's token changes nothing, and a token
//! dies with its connection.

use crate::helper::{Client, TestDaemon};

/// Asks for this connection's reclaim token and returns it.
fn token(c: &mut Client) -> String {
    c.send("/token");
    let line = c.expect_prefix("*** TOKEN ");
    let token = line
        .strip_prefix("*** TOKEN ")
        .and_then(|r| r.split(' ').next())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(token.len(), 32, "{line}");
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()), "{line}");
    token
}

/// Connects and sends `line` as the name line; returns the client and the verdict line.
fn try_name(d: &TestDaemon, line: &str) -> (Client, String) {
    let mut c = d.connect();
    c.expect_prefix("*** HELLO ");
    c.send(line);
    let verdict = c.expect_prefix("*** ");
    (c, verdict)
}

fn who(c: &mut Client) -> String {
    c.send("/who");
    c.expect_prefix("*** WHO ")
}

#[test]
fn token_takes_the_name_back_from_the_old_connection() {
    let d = TestDaemon::start("");
    let (mut bob, mut old) = d.pair("bob", "alice");
    let t = token(&mut old);
    // Asking again gives the same token: it belongs to the connection.
    assert_eq!(token(&mut old), t);

    let (mut new, verdict) = try_name(&d, &format!("/reclaim ALICE {t}"));
    assert!(verdict.starts_with("*** WELCOME ALICE "), "{verdict}");
    // The old connection is told and closed; the room sees one leave and one join.
    assert_eq!(
        old.expect_prefix("*** KICKED"),
        "*** KICKED your name was reclaimed by a new connection"
    );
    assert!(old.until_eof().is_empty());
    assert_eq!(
        bob.expect_prefix("*** LEAVE"),
        "*** LEAVE alice left (reconnected)"
    );
    assert_eq!(bob.expect_prefix("*** JOIN"), "*** JOIN ALICE joined");
    assert_eq!(who(&mut bob), "*** WHO 2 ALICE bob");
    new.send("back again");
    assert_eq!(bob.expect_prefix("ALICE:"), "ALICE: back again");

    // The old token died with the old connection; the new one has a new token.
    let t2 = token(&mut new);
    assert_ne!(t2, t);
    let (_c, verdict) = try_name(&d, &format!("/reclaim alice {t}"));
    assert!(verdict.starts_with("*** ERR reclaim-refused "), "{verdict}");
}

#[test]
fn wrong_or_foreign_tokens_are_refused_and_change_nothing() {
    let d = TestDaemon::start("");
    let mut alice = d.join("alice");
    let _alice_token = token(&mut alice);
    let mut mallory = d.join("mallory");
    let mallory_token = token(&mut mallory);
    alice.expect_prefix("*** JOIN mallory");

    for attempt in [
        format!("/reclaim alice {mallory_token}"),
        format!("/reclaim alice {}", "0".repeat(32)),
        "/reclaim alice not-a-token".to_owned(),
    ] {
        let (mut c, verdict) = try_name(&d, &attempt);
        assert!(
            verdict.starts_with("*** ERR reclaim-refused ")
                && verdict.ends_with("; send another name"),
            "{attempt}: {verdict}"
        );
        // The refused connection is still naming and may pick a free name.
        c.send("carol");
        assert!(c.expect_prefix("*** ").starts_with("*** WELCOME carol "));
        c.send("quit");
        c.expect_prefix("*** BYE");
    }
    let usage = try_name(&d, "/reclaim alice").1;
    assert!(
        usage.starts_with("*** ERR bad-arguments usage: /reclaim NAME TOKEN"),
        "{usage}"
    );

    // alice never noticed: still online, still chatting, never told to leave.
    assert_eq!(who(&mut alice), "*** WHO 2 alice mallory");
    mallory.send("still here?");
    assert_eq!(alice.expect_prefix("mallory:"), "mallory: still here?");
    let seen = {
        alice.send("/who");
        let mut lines = Vec::new();
        loop {
            let l = alice.line();
            if l.starts_with("*** WHO ") {
                break lines;
            }
            lines.push(l);
        }
    };
    assert!(
        !seen
            .iter()
            .any(|l| l.contains("KICKED") || l.contains("LEAVE alice")),
        "{seen:?}"
    );
}

#[test]
fn reclaiming_a_free_name_is_an_ordinary_join() {
    let d = TestDaemon::start("");
    let mut bob = d.join("bob");
    let t = token(&mut bob);
    // bob leaves; his token goes with him, but the name is free, so anyone's reclaim joins.
    bob.send("quit");
    bob.expect_prefix("*** BYE");
    let (mut c, verdict) = try_name(&d, &format!("/reclaim dora {t}"));
    assert!(verdict.starts_with("*** WELCOME dora "), "{verdict}");
    // A reclaim still obeys the name rules.
    let (_c2, verdict) = try_name(&d, &format!("/reclaim server {t}"));
    assert!(verdict.starts_with("*** ERR name-reserved "), "{verdict}");
    assert_eq!(who(&mut c), "*** WHO 1 dora");
}
