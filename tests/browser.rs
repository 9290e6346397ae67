//! The browser client in a real browser: headless Chromium (driven through chromedriver) opens
//! chatd's page and chats with raw TCP users in the same room. Skipped with a reason when
//! Chromium or chromedriver is missing; a failure under CI (`require`).
//!
//! Each test starts one chromedriver and as few Chromium sessions as it needs (one per browser
//! user); everything a test checks on one page is done in that one session.

use std::time::Duration;

use chat_proto::protocol::Event;
use serde_json::json;

use crate::helper::browser::{Browser, Page, View};
use crate::helper::{Client, Config, NO_RATE_LIMIT, TestDaemon, free_port};

/// A daemon serving its page on a free loopback port, with the default test config plus
/// `extra`.
fn web_daemon(extra: &str) -> TestDaemon {
    TestDaemon::start_config(web_config("127.0.0.1:0", extra))
}

/// The test config plus `extra`, with the page served on `addr`.
fn web_config(addr: &str, extra: &str) -> Config {
    Config::test()
        .raw(extra)
        .set("web", "listen", format!("[\"{addr}\"]"))
}

/// The page's address on `d`.
fn page_url(d: &TestDaemon) -> String {
    format!("http://{}/", d.web_addr())
}

/// Reads the TCP client's lines until the chat line `want` (a message or action from someone
/// else), skipping server lines and copies of its own private messages; panics on any other
/// chat line first.
fn expect_chat(c: &mut Client, want: &str) {
    loop {
        let l = c.line();
        if l.starts_with("*** ") || l.starts_with("-> ") {
            continue;
        }
        assert_eq!(l, want, "the TCP user saw another line first");
        return;
    }
}

/// Waits until `page` shows `line` as its latest message.
async fn expect_latest(page: &Page, line: &str) {
    page.wait_js(
        &format!("the message {line:?}"),
        &format!(
            "const m = [...document.querySelectorAll('#messages li.chat, #messages li.action')] \
               .filter(li => !li.classList.contains('history')); \
             const last = m[m.length - 1]; \
             return !!last && [...last.childNodes].slice(2).map(n => n.textContent).join('') === {};",
            json!(line)
        ),
    )
    .await;
}

/// Two browser users and a raw TCP user chat in both directions; all three see the same
/// messages in the same order. Along the way: own messages are set apart, joins are notices,
/// `/me`, `/msg` (both ways) and `/nick` work, the online list follows JOIN, NICK and LEAVE,
/// Tab completes a name and Up recalls the last line.
#[test]
fn browser_and_tcp_users_chat_in_one_order() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let d = web_daemon("");
    browser.run(async {
        let url = page_url(&d);
        let (ann, ben) = tokio::join!(
            browser.page(&url, View::Desktop(1024, 768)),
            browser.page(&url, View::Desktop(1024, 768))
        );
        ann.join("ann").await;
        ben.join("ben").await;
        let mut cat = d.join("cat");
        for p in [&ann, &ben] {
            p.wait_js(
                "cat in the online list",
                "return chatdPage.people().includes('cat');",
            )
            .await;
        }
        // ann saw ben and cat join, as notices, not as messages.
        ann.wait_js(
            "the join notices",
            "return [...document.querySelectorAll('#messages li.notice')] \
               .map(li => li.textContent).filter(t => /(ben|cat) joined$/.test(t)).length === 2;",
        )
        .await;

        // Each user speaks in turn (and ann three lines in a row); every line reaches the
        // other two before the next is sent, so all three views must be the same list.
        let mut expected: Vec<String> = Vec::new();
        let mut cat_view: Vec<String> = Vec::new();
        let steps: &[(&str, &str, &str)] = &[
            ("ann", "hello from a browser", "ann: hello from a browser"),
            ("cat", "hello from a terminal", "cat: hello from a terminal"),
            ("ben", "and another browser", "ben: and another browser"),
            ("ann", "/me waves", "* ann waves"),
            ("cat", "/me waves back", "* cat waves back"),
            ("ann", "one", "ann: one"),
            ("ann", "two", "ann: two"),
            ("ann", "three", "ann: three"),
            ("ben", "//slash at the start", "ben: /slash at the start"),
        ];
        for &(who, typed, shown) in steps {
            match who {
                "cat" => {
                    cat.send(typed);
                    cat_view.push(shown.to_owned());
                }
                "ann" => ann.say(typed).await,
                _ => ben.say(typed).await,
            }
            expected.push(shown.to_owned());
            if who != "cat" {
                expect_chat(&mut cat, shown);
                cat_view.push(shown.to_owned());
            }
            expect_latest(&ann, shown).await;
            expect_latest(&ben, shown).await;
        }
        assert_eq!(ann.messages().await, expected, "ann's view");
        assert_eq!(ben.messages().await, expected, "ben's view");
        assert_eq!(cat_view, expected, "the TCP user's view");

        // Own lines are set apart; others' are not.
        let own = ann
            .js("return [...document.querySelectorAll('#messages li.own')] \
                   .map(li => li.dataset.from);")
            .await;
        assert_eq!(own, json!(["ann", "ann", "ann", "ann", "ann"]));

        // Private messages, both directions.
        ann.say("/msg cat just for you").await;
        assert_eq!(
            cat.expect_prefix("ann (private): "),
            "ann (private): just for you"
        );
        ann.wait_js(
            "ann's copy of her private message",
            "return [...document.querySelectorAll('#messages li.private.own')] \
               .some(li => li.textContent.endsWith('cat (private): just for you'));",
        )
        .await;
        cat.send("/msg ben psst");
        ben.wait_js(
            "ben's private message",
            "return [...document.querySelectorAll('#messages li.private:not(.own)')] \
               .some(li => li.textContent.endsWith('cat (private): psst'));",
        )
        .await;

        // Tab completes a name (with ": " at the start of a line); Up recalls the last line.
        ann.type_into("#input", &format!("be{}", &*fantoccini::key::Key::Tab))
            .await;
        assert_eq!(
            ann.js("return document.getElementById('input').value;")
                .await,
            json!("ben: ")
        );
        ann.js("document.getElementById('input').value = ''; return true;")
            .await;
        ann.type_into("#input", &fantoccini::key::Key::Up).await;
        assert_eq!(
            ann.js("return document.getElementById('input').value;")
                .await,
            json!("/msg cat just for you")
        );
        ann.js("document.getElementById('input').value = ''; return true;")
            .await;

        // /nick and a leave keep the online list current.
        ben.say("/nick benny").await;
        cat.expect_prefix("*** NICK ben is now known as benny");
        ann.wait_js(
            "benny instead of ben in the list",
            "const p = chatdPage.people(); return p.includes('benny') && !p.includes('ben');",
        )
        .await;
        ben.wait_js("ben's own new name", "return chatdPage.name() === 'benny';")
            .await;
        cat.send("quit");
        cat.expect_prefix("*** BYE");
        ann.wait_js(
            "cat gone from the list",
            "return !chatdPage.people().includes('cat');",
        )
        .await;
        let mut people = ann.people().await;
        people.sort();
        assert_eq!(people, ["ann", "benny"]);
        tokio::join!(ann.close(), ben.close());
    });
}

/// A name refused in the browser says why and lets the user try again; then the user is in,
/// with the focus in the message box and Tab not trapping it. In the room, the view sticks to
/// the newest line unless scrolled up, and then a "new messages" button counts what came in and
/// jumps down.
#[test]
fn browser_name_clash_then_join_and_new_messages_button() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let d = web_daemon(NO_RATE_LIMIT);
    browser.run(async {
        let mut dan = d.join("dana");
        let page = browser
            .page(&page_url(&d), View::Desktop(1024, 768))
            .await;
        page.try_name("DANA").await;
        let err = page
            .wait_js(
                "the refusal",
                "return document.getElementById('name-error').textContent;",
            )
            .await;
        let err = err.as_str().unwrap_or_default();
        assert!(err.contains("“DANA” is taken"), "{err}");
        assert_eq!(page.phase().await, "naming");
        assert_eq!(
            page.js("return document.getElementById('room').hidden;")
                .await,
            json!(true)
        );
        page.try_name("admin").await;
        page.wait_js(
            "the reserved-name refusal",
            "return document.getElementById('name-error').textContent.includes('“admin” is reserved');",
        )
        .await;
        page.join("dana2").await;
        dan.expect_prefix("*** JOIN dana2 joined");
        // By keyboard alone: the message box has the focus after joining, and Tab with
        // nothing to complete moves on (to Send) instead of trapping the focus.
        assert_eq!(
            page.js("return document.activeElement.id;").await,
            json!("input")
        );
        page.type_into("#input", &format!("zq{}", &*fantoccini::key::Key::Tab))
            .await;
        assert_eq!(
            page.js("return document.activeElement.id;").await,
            json!("send")
        );
        page.js("document.getElementById('input').value = ''; return true;")
            .await;
        // Every line carries its time; every control has a name a screen reader announces,
        // and the message log is announced as one.
        assert_eq!(
            page.js(
                "const lines = [...document.querySelectorAll('#messages > li')]; \
                 return lines.length > 0 && lines.every(li => { \
                   const t = li.querySelector('time'); \
                   return t && t.textContent.trim() !== '' && t.dateTime !== ''; });"
            )
            .await,
            json!(true)
        );
        assert_eq!(
            page.js(
                "const unnamed = [...document.querySelectorAll('input, button')].filter(e => \
                   !e.closest('[hidden]') && !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && \
                   e.textContent.trim() === ''); \
                 const log = document.getElementById('log'); \
                 return [unnamed.map(e => e.id), log.getAttribute('role'), \
                         log.getAttribute('aria-label')];"
            )
            .await,
            json!([[], "log", "Messages"])
        );
        assert_eq!(
            page.js("return document.getElementById('name-error').textContent;")
                .await,
            json!("")
        );

        // Enough lines to scroll; the view follows them.
        for i in 0..60 {
            dan.send(&format!("line {i}"));
        }
        page.wait_messages(60).await;
        let at_bottom = "const l = document.getElementById('log'); \
                         return l.scrollHeight - l.scrollTop - l.clientHeight < 50;";
        page.wait_js("the view at the newest line", at_bottom).await;
        assert_eq!(
            page.js("return document.getElementById('jump').hidden;")
                .await,
            json!(true)
        );
        // Scrolled up: new lines do not move the view; the button counts them.
        page.js("document.getElementById('log').scrollTop = 0; return true;")
            .await;
        page.wait_js(
            "the scroll to be noticed",
            "return document.getElementById('log').scrollTop === 0;",
        )
        .await;
        dan.send("while you were reading");
        dan.send("and another");
        page.wait_messages(62).await;
        let jump = page
            .wait_js(
                "the new-messages button",
                "const j = document.getElementById('jump'); return !j.hidden && j.textContent;",
            )
            .await;
        assert_eq!(jump, json!("2 new messages ↓"));
        assert_eq!(
            page.js("return document.getElementById('log').scrollTop;")
                .await,
            json!(0),
            "the view moved while scrolled up"
        );
        page.js("document.getElementById('jump').click(); return true;")
            .await;
        page.wait_js("the jump to the newest line", at_bottom).await;
        assert_eq!(
            page.js("return document.getElementById('jump').hidden;")
                .await,
            json!(true)
        );
        page.close().await;
    });
}

/// The banner's text once it shows.
async fn banner(page: &Page, what: &str) -> String {
    page.wait_js(
        what,
        "const e = document.getElementById('ended'); \
         return !e.hidden && document.getElementById('ended-text').textContent;",
    )
    .await
    .as_str()
    .unwrap_or_default()
    .to_owned()
}

/// Asserts that `page` has ended and opens no new connection for `d` (longer than the first
/// reconnect delays), and that `name` is not in `chatctl list` then.
async fn stays_away(page: &Page, d: &TestDaemon, name: &str, d_wait: Duration) {
    assert_eq!(page.phase().await, "ended");
    assert_eq!(
        page.js("return document.getElementById('input').disabled;")
            .await,
        json!(true)
    );
    let before = page.js("return chatdPage.connections();").await;
    tokio::time::sleep(d_wait).await;
    assert_eq!(
        page.js("return chatdPage.connections();").await,
        before,
        "the page connected again"
    );
    assert_eq!(page.phase().await, "ended");
    let list = d.chatctl_json(&["list"]);
    assert!(
        !list.to_string().contains(&format!("\"{name}\"")),
        "{name} is back: {list}"
    );
}

/// `chatctl kick` of a browser user: the page says it was kicked, with the reason, and does
/// not come back. The same for a ban (4001) and for a name taken over by a newer connection
/// with the page's own reclaim token (4004).
#[test]
fn browser_user_kicked_sees_reason_and_does_not_rejoin() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let d = web_daemon("");
    browser.run(async {
        let url = page_url(&d);
        let mut fay = d.join("fay");
        let page = browser.page(&url, View::Desktop(1024, 768)).await;
        page.join("eve").await;
        fay.expect_prefix("*** JOIN eve joined");
        let out = d.chatctl(&["kick", "eve", "--reason", "spamming <b>the</b> room"]);
        assert!(out.status.success(), "{out:?}");
        fay.expect_prefix("*** KICK eve was kicked (spamming <b>the</b> room)");
        let text = banner(&page, "the kick banner").await;
        assert!(
            text.starts_with("You were kicked") && text.contains("spamming <b>the</b> room"),
            "{text}"
        );
        assert_eq!(
            page.js("return document.querySelectorAll('#ended b, #messages b').length;")
                .await,
            json!(0),
            "the reason's markup became elements"
        );
        // Longer than the page's first two reconnect delays (0.5 s, 1 s).
        stays_away(&page, &d, "eve", Duration::from_secs(3)).await;

        // Taken over: another connection reclaims the name with the page's token.
        page.goto(&url).await;
        page.join("eve2").await;
        let token = page
            .wait_js(
                "the reclaim token",
                "const s = JSON.parse(sessionStorage.getItem('chatd.session') || 'null'); \
                 return !!s && s.token;",
            )
            .await;
        let mut thief = d.connect();
        thief.expect_prefix("*** HELLO ");
        thief.send(&format!(
            "/reclaim eve2 {}",
            token.as_str().unwrap_or_default()
        ));
        thief.expect_prefix("*** WELCOME eve2");
        let text = banner(&page, "the take-over banner").await;
        assert!(text.contains("taken over by a newer connection"), "{text}");
        assert_eq!(page.phase().await, "ended");
        thief.send("quit");
        thief.expect_prefix("*** BYE");

        // Banned while online.
        page.goto(&url).await;
        page.join("eve3").await;
        let out = d.chatctl(&["ban", "eve3", "--reason", "no spam here"]);
        assert!(out.status.success(), "{out:?}");
        let text = banner(&page, "the ban banner").await;
        assert!(
            text.starts_with("You are banned") && text.contains("no spam here"),
            "{text}"
        );
        stays_away(&page, &d, "eve3", Duration::from_secs(2)).await;
        page.close().await;
    });
}

/// An event as the page's parser (`chatdPage.parse`) names it.
fn event_json(e: &Event<'_>) -> serde_json::Value {
    match *e {
        Event::Hello { text } => json!({"type": "hello", "text": text}),
        Event::Welcome { name, text } => json!({"type": "welcome", "name": name, "text": text}),
        Event::Motd { text } => json!({"type": "motd", "text": text}),
        Event::History { when, line } => json!({"type": "history", "when": when, "line": line}),
        Event::Join { name } => json!({"type": "join", "name": name}),
        Event::Leave { name, reason } => json!({"type": "leave", "name": name, "reason": reason}),
        Event::Nick { old, new } => json!({"type": "nick", "old": old, "name": new}),
        Event::Kick { name, reason } => json!({"type": "kick", "name": name, "reason": reason}),
        Event::Kicked { reason } => json!({"type": "kicked", "reason": reason}),
        Event::Notice { text } => json!({"type": "notice", "text": text}),
        Event::Who { count, names } => {
            json!({"type": "who", "count": count, "names": names.iter().collect::<Vec<_>>()})
        }
        Event::Info { text } => json!({"type": "info", "text": text}),
        Event::Err { code, text } => json!({"type": "err", "code": code, "text": text}),
        Event::Bye { text } => json!({"type": "bye", "text": text}),
        Event::Shutdown { text } => json!({"type": "shutdown", "text": text}),
        Event::Token { token, text } => json!({"type": "token", "token": token, "text": text}),
        Event::Chat { name, text } => json!({"type": "chat", "name": name, "text": text}),
        Event::Action { name, text } => json!({"type": "action", "name": name, "text": text}),
        Event::Private { from, text } => json!({"type": "private", "name": from, "text": text}),
        Event::PrivateEcho { to, text } => {
            json!({"type": "privateEcho", "name": to, "text": text})
        }
        Event::Server { kind, rest } => json!({"type": "server", "kind": kind, "text": rest}),
        Event::Other(line) => json!({"type": "other", "text": line}),
    }
}

/// Lines of every shape, and near misses of each, for the parser comparison.
const PARSER_CASES: &[&str] = &[
    "*** HELLO chatd 0.1.0 - welcome! Please send your name.",
    "*** WELCOME ann you are chatting as ann; type /help; at most 5 lines/s, bursts of 10",
    "*** WELCOME",
    "*** MOTD be nice",
    "*** HISTORY 2026-01-02T03:04:05Z bob: hi: there",
    "*** JOIN bob joined",
    "*** JOIN  joined",
    "*** JOIN bo b joined",
    "*** JOIN bob arrived",
    "*** LEAVE bob left (quit)",
    "*** LEAVE bob left (a) b)",
    "*** LEAVE bob left (",
    "*** LEAVE bob went (quit)",
    "*** NICK bob is now known as rob",
    "*** NICK bob is now known as r b",
    "*** NICK bob is known as rob",
    "*** KICK eve was kicked (spam <b>x</b>)",
    "*** KICK eve was kicked ()",
    "*** KICKED flooding",
    "*** KICKED",
    "*** NOTICE <script>x</script>",
    "*** WHO 3 ann bob cat",
    "*** WHO 0 ",
    "*** WHO +2 a b",
    "*** WHO many a b",
    "*** INFO commands: /who",
    "*** ERR name-taken that name is in use; send another name",
    "*** ERR",
    "*** BYE goodbye",
    "*** SHUTDOWN the server is stopping",
    "*** TOKEN 0123456789abcdef0123456789abcdef keep it secret",
    "*** FUTURE something new",
    "***",
    "*** ",
    "* bob waves",
    "* bob",
    "*  waves",
    "* b:b waves",
    "-> bob (private): hi",
    "-> b b (private): hi",
    "bob (private): hi (private): again",
    "bob: hi: there",
    "bob:hi",
    ": hi",
    "b*b: hi",
    "a>b: hi",
    "שלום: مرحبا",
    "just text",
    "",
];

/// Markup in messages, actions, private messages, history and announcements is shown as the
/// literal text and runs nothing. The page's CSP would block inline handlers even if the markup
/// were parsed, so the test also asserts that no element was made from it: that is what fails
/// if any text reached the DOM as HTML. At phone width, long words, right-to-left text and
/// combining marks keep inside the screen, and the online list opens from the header.
#[test]
fn browser_shows_markup_as_text_and_runs_nothing() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let d = web_daemon("");
    let payload =
        r#"<img src=x onerror="window.__xss=1"><script>window.__xss=2</script><b>bold?</b>"#;
    browser.run(async {
        let mut hal = d.join("hal");
        // Said before the browser user joins: it arrives as history.
        hal.send(payload);
        hal.send("/who");
        hal.expect_prefix("*** WHO ");
        let page = browser
            .page(&page_url(&d), View::Phone)
            .await;
        // The page reads every line as chat-proto does: the same shape, the same fields.
        let got = page
            .js(&format!(
                "return {}.map(chatdPage.parse);",
                json!(PARSER_CASES)
            ))
            .await;
        for (i, line) in PARSER_CASES.iter().enumerate() {
            assert_eq!(got[i], event_json(&Event::parse(line)), "parsing {line:?}");
        }
        page.join("gus").await;
        hal.expect_prefix("*** JOIN gus joined");
        hal.send(payload);
        hal.send(&format!("/me {payload}"));
        hal.send(&format!("/msg gus {payload}"));
        let out = d.chatctl(&["announce", payload]);
        assert!(out.status.success(), "{out:?}");
        page.say(payload).await;
        expect_chat(&mut hal, &format!("gus: {payload}"));
        // history, chat, action, private, announcement, own echo.
        let texts = page
            .wait_js(
                "six lines carrying the payload",
                &format!(
                    "const t = [...document.querySelectorAll('#messages li .text')] \
                       .map(e => e.textContent).filter(t => t.includes({p})); \
                     return t.length >= 6 && t;",
                    p = json!("<script>")
                ),
            )
            .await;
        let texts: Vec<&str> = texts
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(texts.len(), 6, "{texts:?}");
        for t in &texts {
            assert!(t.ends_with(payload), "not the literal text: {t:?}");
        }
        for kind in ["chat history", "chat", "action", "private", "announce", "chat own"] {
            let selector = format!(
                "#messages li.{}",
                kind.split(' ').collect::<Vec<_>>().join(".")
            );
            let n = page
                .js(&format!(
                    "return [...document.querySelectorAll({})] \
                       .filter(li => li.textContent.includes('<script>')).length;",
                    json!(selector)
                ))
                .await;
            assert!(n.as_u64() >= Some(1), "no {kind} line with the payload");
        }
        let made = page
            .js("return document.querySelectorAll('#messages img, #messages script, #messages b, #people img').length + \
                        document.images.length;")
            .await;
        assert_eq!(made, json!(0), "markup became elements");
        assert_eq!(
            page.js("return typeof window.__xss;").await,
            json!("undefined")
        );

        // At phone width, a long word, right-to-left text and stacked combining marks stay
        // within the screen and their own lines.
        let long = "x".repeat(400);
        let rtl = "שלום עולם مرحبا بالعالم";
        let stacked = "Z\u{337}\u{322}\u{31b}\u{353}\u{320}\u{323}a\u{338}\u{322}\u{31b}\u{317}l\u{336}\u{321}\
                       g\u{334}\u{322}o\u{338}\u{327}";
        hal.send(&long);
        hal.send(&format!("{rtl} and then some latin"));
        hal.send(stacked);
        expect_latest(&page, &format!("hal: {stacked}")).await;
        let outside = page
            .js("const w = document.documentElement.clientWidth; \
                 const l = document.getElementById('log'); \
                 return [document.documentElement.scrollWidth - w, l.scrollWidth - l.clientWidth, \
                         ...[...document.querySelectorAll('#messages li')] \
                            .map(li => Math.floor(li.getBoundingClientRect().right) - w)] \
                        .filter(x => x > 0).length;")
            .await;
        assert_eq!(outside, json!(0), "something is wider than the phone's screen");
        let rtl_is_rtl = page
            .js(&format!(
                "const t = [...document.querySelectorAll('#messages li .text')] \
                   .find(e => e.textContent.startsWith({})); \
                 return !!t && t.matches(':dir(rtl)');",
                json!(rtl)
            ))
            .await;
        assert_eq!(rtl_is_rtl, json!(true), "the right-to-left message is not shown as such");
        // The online list sits behind a header button at phone width.
        assert_eq!(
            page.js("return getComputedStyle(document.getElementById('people-panel')).display;")
                .await,
            json!("none")
        );
        page.js("document.getElementById('people-toggle').click(); return true;")
            .await;
        assert_eq!(
            page.js("return [getComputedStyle(document.getElementById('people-panel')).display, \
                             document.getElementById('people-toggle').getAttribute('aria-expanded'), \
                             chatdPage.people().sort().join(' ')];")
                .await,
            json!(["block", "true", "gus hal"])
        );
        page.close().await;
    });
}

/// After chatd stops, the page says the server is gone; when chatd is back on the same port
/// it reconnects by itself and has its name again.
/// The brightness (0-765, the sum of red, green and blue) of a CSS `rgb(...)` colour.
fn brightness(css: &serde_json::Value) -> u32 {
    css.as_str()
        .unwrap_or_default()
        .trim_start_matches("rgba(")
        .trim_start_matches("rgb(")
        .trim_end_matches(')')
        .split(',')
        .take(3)
        .filter_map(|c| c.trim().parse::<f32>().ok())
        .map(|c| c as u32)
        .sum()
}

#[test]
fn browser_follows_the_systems_light_or_dark_setting() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let d = web_daemon("");
    let url = page_url(&d);
    browser.run(async {
        let colours = "const b = getComputedStyle(document.body), \
                       i = getComputedStyle(document.getElementById('name-input')); \
                       return [b.backgroundColor, b.color, i.backgroundColor];";
        let light = browser.page(&url, View::Desktop(1024, 768)).await;
        let light = light.js(colours).await;
        let dark = browser.page(&url, View::Dark(1024, 768)).await;
        let dark = dark.js(colours).await;
        // Light: a light page with dark text; dark: the other way round, its fields too.
        assert!(brightness(&light[0]) > 600, "{light}");
        assert!(brightness(&light[1]) < 200, "{light}");
        assert!(brightness(&dark[0]) < 200, "{dark}");
        assert!(brightness(&dark[1]) > 500, "{dark}");
        assert!(brightness(&dark[2]) < 300, "{dark}");
    });
}

#[test]
fn browser_reconnects_after_restart_with_its_name() {
    let Some(browser) = Browser::start() else {
        return;
    };
    // The restarted daemon must serve the page where the old one did.
    let port = free_port();
    let config = web_config(&format!("127.0.0.1:{port}"), "");
    let mut d = TestDaemon::start_config(config.clone());
    browser.run(async {
        let mut jon = d.join("jon");
        let page = browser.page(&page_url(&d), View::Desktop(1024, 768)).await;
        page.join("ida").await;
        jon.expect_prefix("*** JOIN ida joined");
        // The page asked for its reclaim token and keeps it for this tab.
        page.wait_js(
            "the reclaim token kept",
            "const s = JSON.parse(sessionStorage.getItem('chatd.session') || 'null'); \
             return !!s && s.name === 'ida' && /^[0-9a-f]{32}$/.test(s.token || '');",
        )
        .await;

        d.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(d.wait_exit(), Some(0), "{}", d.log());
        page.wait_js(
            "the lost connection",
            "return chatdPage.phase() === 'waiting';",
        )
        .await;
        let banner = page
            .wait_js(
                "the statement that the server is gone",
                "const t = document.getElementById('ended-text').textContent; \
                 return t.startsWith('The server is gone') && t;",
            )
            .await;
        assert!(
            banner
                .as_str()
                .unwrap_or_default()
                .contains(&format!("127.0.0.1:{port}")),
            "{banner}"
        );

        let d2 = TestDaemon::start_config(config);
        page.wait_js(
            "the page back in the room as ida",
            "return chatdPage.phase() === 'chatting' && chatdPage.name() === 'ida';",
        )
        .await;
        page.wait_js(
            "the reconnect said",
            "return [...document.querySelectorAll('#messages li.status')] \
               .some(li => li.textContent.endsWith('Reconnected: you are ida again.'));",
        )
        .await;
        let mut kim = d2.join("kim");
        kim.send("/who");
        let who = kim.expect_prefix("*** WHO ");
        assert!(who.split(' ').any(|n| n == "ida"), "{who}");
        page.wait_js(
            "kim in the list",
            "return chatdPage.people().includes('kim');",
        )
        .await;
        page.say("back again").await;
        expect_chat(&mut kim, "ida: back again");
        page.close().await;
    });
}

/// Not a test: regenerates docs/web-desktop.png and docs/web-phone.png (the README shows
/// them). Run with
/// `cargo test -p chatd --test tests browser_screenshots -- --ignored`.
#[test]
#[ignore = "writes docs/web-*.png; run it by name to regenerate the screenshots"]
fn browser_screenshots() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let d =
        web_daemon("[room]\nmotd = \"Welcome to #general. Be kind; the operators read along.\"\n");
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    browser.run(async {
        let mut amara = d.join("amara");
        let mut yusuf = d.join("yusuf");
        amara.send("morning all! did the deploy go out?");
        yusuf.send("it did, 09:40. the web client is live too");
        yusuf.send("/who");
        yusuf.expect_prefix("*** WHO ");
        let url = page_url(&d);
        let (desk, phone) = tokio::join!(
            browser.page(&url, View::Desktop(1100, 720)),
            browser.page(&url, View::Phone)
        );
        desk.join("lena").await;
        phone.join("kenji").await;
        amara.send("welcome lena, you are in the same room as the terminal users");
        expect_latest(
            &desk,
            "amara: welcome lena, you are in the same room as the terminal users",
        )
        .await;
        desk.say("thanks! typing from a browser tab, nothing installed")
            .await;
        amara.expect_prefix("lena: thanks!");
        yusuf.send("/me hands out coffee ☕");
        expect_latest(&desk, "* yusuf hands out coffee ☕").await;
        phone.say("same here, on my phone").await;
        amara.expect_prefix("kenji: same here");
        yusuf.send("nice one kenji, the layout holds up at phone width");
        expect_latest(
            &desk,
            "yusuf: nice one kenji, the layout holds up at phone width",
        )
        .await;
        amara.send("שלום לכולם! مرحبا بالجميع");
        amara.send("/msg lena can you check the staging logs later?");
        expect_latest(&desk, "amara: שלום לכולם! مرحبا بالجميع").await;
        desk.wait_js(
            "the private message",
            "return document.querySelectorAll('#messages li.private').length > 0;",
        )
        .await;
        let out = d.chatctl(&["announce", "maintenance window tonight 22:00-22:15 UTC"]);
        assert!(out.status.success(), "{out:?}");
        desk.wait_js(
            "the announcement",
            "return [...document.querySelectorAll('#messages li.announce')].length > 0;",
        )
        .await;
        phone
            .wait_js(
                "the announcement",
                "return [...document.querySelectorAll('#messages li.announce')].length > 0;",
            )
            .await;
        std::fs::write(docs.join("web-desktop.png"), desk.screenshot().await)
            .expect("write docs/web-desktop.png");
        std::fs::write(docs.join("web-phone.png"), phone.screenshot().await)
            .expect("write docs/web-phone.png");
        tokio::join!(desk.close(), phone.close());
    });
}
