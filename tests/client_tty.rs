//! The interactive `chat-client` as a person uses it: run in a real pseudo-terminal by tmux,
//! driven with `send-keys`, judged by what `capture-pane` shows. Every tmux server has its own
//! socket name and is killed when its test ends; every wait polls against a deadline.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::helper::{Client, Config, TestDaemon, WAIT, bin, free_port, require, wait_for};

/// Terminal size every test starts with.
const COLS: u16 = 100;
const ROWS: u16 = 30;

/// Whether tmux, which runs the client in a pseudo-terminal, is here (see `require`).
fn tmux() -> bool {
    require("tmux", "apt-get install tmux")
}

/// One chat-client running in its own tmux server.
struct Tty {
    socket: String,
    dir: tempfile::TempDir,
}

impl Tty {
    /// Starts `chat-client ARGS` in a 100x30 terminal with an empty config dir (plus `config`
    /// as its client.toml when given) and `env` set; `NO_COLOR` is unset unless given.
    fn start(args: &[&str], env: &[(&str, &str)], config: Option<&str>) -> Tty {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let socket = format!(
            "chatd-tty-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some(text) = config {
            let conf = dir.path().join("chatd");
            std::fs::create_dir_all(&conf).expect("config dir");
            std::fs::write(conf.join("client.toml"), text).expect("client.toml");
        }
        // The pane stays after the client exits, so its last screen can be read.
        let tmux_conf = dir.path().join("tmux.conf");
        std::fs::write(&tmux_conf, "set -g remain-on-exit on\nset -g status off\n")
            .expect("tmux.conf");
        // tmux does not always reap a dead pane's process (so `#{pane_dead_status}` can stay
        // empty): a shell records the exit status in a file instead.
        let status = dir.path().join("exit-status");
        let mut cmd: Vec<String> = vec![
            "sh".into(),
            "-c".into(),
            // ... and, before it, the terminal's settings as the client left them.
            format!(
                "\"$@\"; s=$?; stty -a > {}/stty 2>&1; echo $s > {}",
                dir.path().display(),
                status.display()
            ),
            "sh".into(),
            "env".into(),
            "-u".into(),
            "NO_COLOR".into(),
            "-u".into(),
            "CHAT_CLIENT_CONFIG".into(),
            format!("XDG_CONFIG_HOME={}", dir.path().display()),
        ];
        cmd.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        cmd.push(bin("chat-client").display().to_string());
        cmd.extend(args.iter().map(|a| a.to_string()));
        let tty = Tty { socket, dir };
        let conf = tmux_conf.display().to_string();
        let (cols, rows) = (COLS.to_string(), ROWS.to_string());
        let out = tty.tmux_out(
            &["-f", &conf, "new-session", "-d", "-x", &cols, "-y", &rows],
            &cmd,
        );
        assert!(out.status.success(), "tmux new-session: {out:?}");
        // Everything the client writes, raw, for the bell and escape checks.
        let raw = tty.raw_path();
        tty.tmux(&["pipe-pane", "-o", &format!("cat >> {}", raw.display())]);
        tty
    }

    fn raw_path(&self) -> PathBuf {
        self.dir.path().join("raw.out")
    }

    fn tmux_out(&self, args: &[&str], tail: &[String]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .args(tail)
            .stdin(Stdio::null())
            .output()
            .expect("run tmux")
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = self.tmux_out(args, &[]);
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `text` literally.
    fn type_text(&self, text: &str) {
        self.tmux(&["send-keys", "-l", text]);
    }

    /// Pastes `text` (-p: as a bracketed paste, as a terminal does when the application
    /// asked for it).
    fn paste(&self, text: &str) {
        self.tmux(&["set-buffer", "--", text]);
        self.tmux(&["paste-buffer", "-p"]);
    }

    /// Presses keys by tmux name (`Enter`, `Up`, `C-c`, ...).
    fn keys(&self, keys: &[&str]) {
        self.tmux(&[&["send-keys"], keys].concat());
    }

    /// The screen as text, trailing blanks trimmed per line.
    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p"])
    }

    /// The screen with its colours and attributes as escape sequences.
    fn screen_escapes(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-e"])
    }

    /// The cursor's column and row.
    fn cursor(&self) -> (usize, usize) {
        let s = self.tmux(&["display-message", "-p", "#{cursor_x} #{cursor_y}"]);
        let mut it = s
            .split_whitespace()
            .map(|n| n.parse().unwrap_or(usize::MAX));
        (
            it.next().unwrap_or(usize::MAX),
            it.next().unwrap_or(usize::MAX),
        )
    }

    /// The row the cursor is on: the input line.
    fn input_line(&self) -> String {
        let (_, y) = self.cursor();
        self.screen()
            .lines()
            .nth(y)
            .unwrap_or_default()
            .trim_end()
            .to_owned()
    }

    /// Everything the client wrote to the terminal so far.
    fn raw(&self) -> Vec<u8> {
        std::fs::read(self.raw_path()).unwrap_or_default()
    }

    /// Waits until the raw output contains `needle`; returns the output.
    fn wait_raw(&self, needle: &[u8]) -> Vec<u8> {
        wait_for(
            WAIT,
            &format!("{:?} in the raw output", String::from_utf8_lossy(needle)),
            || Some(self.raw()).filter(|raw| raw.windows(needle.len()).any(|w| w == needle)),
            || String::from_utf8_lossy(&self.raw()).into_owned(),
        )
    }

    /// Waits until `cond(screen)` holds; returns that screen. Panics with the screen on timeout.
    fn wait(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        wait_for(
            WAIT,
            what,
            || Some(self.screen()).filter(|s| cond(s)),
            || format!("screen:\n{}", self.screen()),
        )
    }

    /// Waits until the screen shows `needle`.
    fn wait_for(&self, needle: &str) -> String {
        self.wait(&format!("{needle:?} on screen"), |s| s.contains(needle))
    }

    /// Waits until the input line reads exactly `line`.
    fn wait_input(&self, line: &str) {
        wait_for(
            WAIT,
            &format!("the input line to read {line:?}"),
            || (self.input_line() == line).then_some(()),
            || {
                format!(
                    "input line {:?}; screen:\n{}",
                    self.input_line(),
                    self.screen()
                )
            },
        )
    }

    fn status_path(&self) -> PathBuf {
        self.dir.path().join("exit-status")
    }

    /// Waits for the client to exit; its exit status.
    fn wait_exit(&self) -> i32 {
        wait_for(
            WAIT,
            "chat-client to exit",
            || {
                let status = std::fs::read_to_string(self.status_path()).unwrap_or_default();
                status.trim().parse().ok()
            },
            || format!("screen:\n{}", self.screen()),
        )
    }

    /// `stty -a` as the client left the terminal (once it has exited).
    fn stty_after(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stty")).unwrap_or_default()
    }

    /// The client's process id.
    fn client_pid(&self) -> i32 {
        let sh = self.tmux(&["display-message", "-p", "#{pane_pid}"]);
        let sh = sh.trim();
        let children =
            std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children")).unwrap_or_default();
        children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no client process under the pane's shell {sh}"))
    }

    /// Whether the client is still running.
    fn alive(&self) -> bool {
        !self.status_path().exists()
    }
}

impl Drop for Tty {
    fn drop(&mut self) {
        let _ = self.tmux_out(&["kill-server"], &[]);
    }
}

/// Starts `chat-client 127.0.0.1 PORT --name NAME` and waits until it has joined.
fn joined(d: &TestDaemon, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Tty {
    let port = d.addr.port().to_string();
    let args = [&["127.0.0.1", port.as_str(), "--name", name][..], extra].concat();
    let t = Tty::start(&args, env, None);
    t.wait_input(&format!("{name}>"));
    // The `/who` the client sends after joining marks the end of the welcome.
    t.wait_for("--- online (");
    t
}

/// A daemon on the test config plus `extra`, `watcher` joined with a line client, then `ann`
/// in the terminal client; once `watcher` has seen ann join. `None` without tmux.
fn ann_joins(extra: &str, watcher: &str) -> Option<(TestDaemon, Client, Tty)> {
    if !tmux() {
        return None;
    }
    let d = TestDaemon::start(extra);
    let (mut w, ann) = (d.join(watcher), joined(&d, "ann", &[], &[]));
    w.expect_prefix("*** JOIN ann");
    Some((d, w, ann))
}

/// Reads lines until one starts with `prefix`; fails if a rate-limit error shows up first.
fn next_from(c: &mut Client, prefix: &str) -> String {
    c.expect_prefix(prefix)
}

#[test]
fn typing_is_not_disturbed_by_arriving_lines_and_enter_sends_exactly_it() {
    let Some((_d, mut bob, ann)) = ann_joins("", "bob") else {
        return;
    };

    ann.type_text("hel");
    ann.wait_input("ann> hel");
    bob.send("hi there, how are you?");
    // The line appears at once, without another key, above the untouched input line.
    let screen = ann.wait_for("bob: hi there, how are you?");
    let lines: Vec<&str> = screen.lines().collect();
    let msg = lines
        .iter()
        .position(|l| l.contains("bob: hi there"))
        .unwrap_or(usize::MAX);
    let (x, y) = ann.cursor();
    assert_eq!(
        lines.get(y).map(|l| l.trim_end()),
        Some("ann> hel"),
        "{screen}"
    );
    assert!(msg < y, "message below the input line:\n{screen}");
    assert_eq!(x, "ann> hel".len(), "cursor after the typed text");
    // Each line carries an HH:MM timestamp.
    let stamped = lines[msg];
    assert!(
        stamped.len() > 6
            && stamped.as_bytes()[2] == b':'
            && stamped[..5].chars().filter(char::is_ascii_digit).count() == 4,
        "{stamped:?}"
    );

    ann.keys(&["Enter"]);
    assert_eq!(next_from(&mut bob, "ann:"), "ann: hel");
    // Our own line is shown (the server does not echo it) and the input line is empty again.
    ann.wait_for("ann: hel");
    ann.wait_input("ann>");
}

/// Asserts that the terminal is back in its cooked mode (line editing and echo on).
fn assert_cooked(t: &Tty) {
    let stty = t.stty_after();
    let flags: Vec<&str> = stty.split_whitespace().collect();
    assert!(
        flags.contains(&"icanon") && flags.contains(&"echo"),
        "terminal left in raw mode: {stty}"
    );
}

#[test]
fn the_terminal_is_given_back_after_quitting_and_after_sigterm() {
    if !tmux() {
        return;
    }
    let d = TestDaemon::start("");
    let ann = joined(&d, "ann", &[], &[]);
    ann.type_text("/quit");
    ann.keys(&["Enter"]);
    assert_eq!(ann.wait_exit(), 0);
    assert_cooked(&ann);
    let bea = joined(&d, "bea", &[], &[]);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bea.client_pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    assert_eq!(bea.wait_exit(), 128 + 15);
    assert_cooked(&bea);
    bea.wait_for("chat-client: stopped by a signal");
}

#[test]
fn history_ctrl_c_and_ctrl_d_behave_as_in_a_shell() {
    if !tmux() {
        return;
    }
    let d = TestDaemon::start("");
    let mut bob = d.join("bob");
    let ann = joined(&d, "ann", &[], &[]);
    for l in ["first", "second"] {
        ann.type_text(l);
        ann.keys(&["Enter"]);
        assert_eq!(next_from(&mut bob, "ann:"), format!("ann: {l}"));
    }
    ann.type_text("draft");
    ann.keys(&["Up"]);
    ann.wait_input("ann> second");
    ann.keys(&["Up"]);
    ann.wait_input("ann> first");
    ann.keys(&["Up"]);
    ann.wait_input("ann> first");
    ann.keys(&["Down"]);
    ann.wait_input("ann> second");
    // Down past the newest line gives back what was being typed.
    ann.keys(&["Down"]);
    ann.wait_input("ann> draft");
    // Ctrl-P recalls too; editing a recalled line and sending it sends the edit.
    ann.keys(&["C-u", "C-p"]);
    ann.wait_input("ann> second");
    ann.type_text("!");
    ann.keys(&["Enter"]);
    assert_eq!(next_from(&mut bob, "ann:"), "ann: second!");

    // Ctrl-C clears the line and sends nothing; on an empty line it says how to leave.
    ann.type_text("never sent");
    ann.wait_input("ann> never sent");
    ann.keys(&["C-c"]);
    ann.wait_input("ann>");
    ann.keys(&["C-c"]);
    ann.wait_for("Ctrl-D on an empty line to leave");
    assert!(ann.alive());
    // Ctrl-D on text deletes under the cursor, like a shell; on an empty line it leaves.
    ann.type_text("ab");
    ann.keys(&["Left", "C-d"]);
    ann.wait_input("ann> a");
    ann.keys(&["BSpace", "C-d"]);
    assert_eq!(ann.wait_exit(), 0);
    assert_eq!(bob.expect_prefix("*** LEAVE"), "*** LEAVE ann left (quit)");
    bob.send("/who");
    let who = bob.expect_prefix("*** WHO");
    assert_eq!(who, "*** WHO 1 bob", "nothing else was sent");
}

#[test]
fn tab_completes_commands_and_online_names() {
    if !tmux() {
        return;
    }
    let d = TestDaemon::start("");
    let _bob = d.join("bob");
    let _carol = d.join("Carol");
    let _cyd = d.join("cyd");
    let ann = joined(&d, "ann", &[], &[]);
    ann.type_text("/ni");
    ann.keys(&["Tab"]);
    ann.wait_input("ann> /nick");
    assert_eq!(ann.cursor().0, "ann> /nick ".len());
    ann.keys(&["C-u"]);
    // A name at the start of the line is addressed ("name: ").
    ann.type_text("ca");
    ann.keys(&["Tab"]);
    ann.wait_input("ann> Carol:");
    ann.keys(&["C-u"]);
    // Elsewhere it is completed with a space.
    ann.type_text("hi b");
    ann.keys(&["Tab"]);
    ann.wait_input("ann> hi bob");
    ann.keys(&["C-u"]);
    // Several candidates are listed.
    ann.type_text("c");
    ann.keys(&["Tab"]);
    ann.wait_for("Carol  cyd");
    ann.wait_input("ann> c");
    ann.keys(&["C-u"]);
    ann.type_text("/m");
    ann.keys(&["Tab"]);
    ann.wait_for("/me  /msg");
    // A name learnt from a later join completes too.
    let _dora = d.join("dora");
    ann.wait_for("dora joined");
    ann.keys(&["C-u"]);
    ann.type_text("/msg do");
    ann.keys(&["Tab"]);
    ann.wait_input("ann> /msg dora");
}

#[test]
fn commands_work_from_the_client_and_lines_are_readable() {
    if !tmux() {
        return;
    }
    let d = TestDaemon::start("");
    let mut bob = d.join("bob");
    let ann = joined(&d, "ann", &[], &[]);
    ann.type_text("/me waves");
    ann.keys(&["Enter"]);
    assert_eq!(bob.expect_prefix("* ann"), "* ann waves");
    ann.wait_for("* ann waves");
    bob.send("/me nods");
    ann.wait_for("* bob nods");
    ann.type_text("/msg bob psst");
    ann.keys(&["Enter"]);
    assert_eq!(bob.expect_prefix("ann (private)"), "ann (private): psst");
    ann.wait_for("[private] -> bob: psst");
    bob.send("/msg ann hush");
    ann.wait_for("[private] bob: hush");
    ann.type_text("/help");
    ann.keys(&["Enter"]);
    ann.wait_for("keys: Enter send");
    ann.wait_for("--- commands: /who");
    let out = d.chatctl(&["announce", "maintenance at noon"]);
    assert!(out.status.success(), "{out:?}");
    ann.wait_for("*** NOTICE: maintenance at noon");
    ann.type_text("/nick anna");
    ann.keys(&["Enter"]);
    assert_eq!(
        bob.expect_prefix("*** NICK"),
        "*** NICK ann is now known as anna"
    );
    ann.wait_input("anna>");
    ann.type_text("/who");
    ann.keys(&["Enter"]);
    ann.wait_for("--- online (2): anna, bob");
    // A refused command is an error line, not a message.
    ann.type_text("/dance");
    ann.keys(&["Enter"]);
    ann.wait_for("!!! unknown command /dance");
    ann.type_text("/quit");
    ann.keys(&["Enter"]);
    assert_eq!(ann.wait_exit(), 0);
    assert_eq!(bob.expect_prefix("*** LEAVE"), "*** LEAVE anna left (quit)");
}

/// The SGR parameters written right before `word` on the first line of a `capture-pane -e`
/// screen that also contains `marker` (escape sequences are not part of the match).
fn sgr_before(screen: &str, marker: &str, word: &str) -> Vec<String> {
    let strip = |l: &str| {
        let mut out = String::new();
        let mut rest = l;
        while let Some(i) = rest.find('\x1b') {
            out.push_str(&rest[..i]);
            rest = rest[i..].split_once('m').map_or("", |x| x.1);
        }
        out + rest
    };
    let line = screen
        .lines()
        .find(|l| strip(l).contains(marker))
        .unwrap_or_else(|| panic!("no line with {marker:?}: {screen:?}"));
    let at = line
        .find(word)
        .unwrap_or_else(|| panic!("{word:?} not in {line:?}"));
    let mut head = &line[..at];
    let mut params = Vec::new();
    while head.ends_with('m') {
        let Some(esc) = head.rfind('\x1b') else {
            break;
        };
        params.extend(head[esc + 2..head.len() - 1].split(';').map(str::to_owned));
        head = &head[..esc];
    }
    params
}

fn bold(params: &[String]) -> bool {
    params.iter().any(|p| p == "1")
}

fn coloured(params: &[String]) -> bool {
    params
        .iter()
        .any(|p| p.len() == 2 && (p.starts_with('3') || p.starts_with('9')) && p != "39")
}

#[test]
fn colours_mark_own_lines_and_mentions_and_the_bell_rings() {
    if !tmux() {
        return;
    }
    let d = TestDaemon::start("");
    let mut bob = d.join("bob");
    let ann = joined(&d, "ann", &[], &[]);
    ann.type_text("my own words");
    ann.keys(&["Enter"]);
    next_from(&mut bob, "ann:");
    bob.send("nothing to see");
    bob.send("hey ann, look at this");
    ann.wait_for("hey ann, look");
    let colours = ann.screen_escapes();
    // Own name bold, other names coloured, a mention highlighted, ordinary text plain.
    let own = sgr_before(&colours, "ann: my own words", "ann");
    assert!(bold(&own), "own name not bold: {own:?}");
    let other = sgr_before(&colours, "bob: nothing to see", "bob");
    assert!(coloured(&other) && !bold(&other), "{other:?}");
    let mention = sgr_before(&colours, "hey ann, look", "hey ann");
    assert!(bold(&mention) && coloured(&mention), "{mention:?}");
    let plain = sgr_before(&colours, "nothing to see", "nothing");
    assert!(!bold(&plain) && !coloured(&plain), "{plain:?}");
    // Server chatter is dimmed.
    let notice = sgr_before(&colours, "--- online (", "---");
    assert!(coloured(&notice), "{notice:?}");
    // The bell rang for the mention (and only then).
    let raw = ann.wait_raw(b"\x07");
    assert_eq!(
        raw.iter().filter(|&&b| b == 0x07).count(),
        1,
        "{:?}",
        String::from_utf8_lossy(&raw)
    );
}

#[test]
fn no_color_and_no_bell_are_honoured() {
    if !tmux() {
        return;
    }
    let d = TestDaemon::start("");
    let mut bob = d.join("bob");
    let ann = joined(&d, "ann", &["--no-bell"], &[("NO_COLOR", "1")]);
    bob.send("ann: are you there?");
    ann.wait_for("are you there?");
    let screen = ann.screen_escapes();
    assert!(
        !screen.contains('\x1b'),
        "colours under NO_COLOR: {screen:?}"
    );
    let raw = ann.wait_raw(b"are you there?");
    assert!(!raw.contains(&0x07), "bell despite --no-bell");
    assert!(
        !String::from_utf8_lossy(&raw).contains("\x1b[3"),
        "colour codes written under NO_COLOR"
    );
    // The config file can turn off colours, the bell and timestamps as well.
    let port = d.addr.port().to_string();
    let cy = Tty::start(
        &["127.0.0.1", &port, "--name", "cy"],
        &[],
        Some("[ui]\ncolor = false\nbell = false\ntimestamps = false\n"),
    );
    cy.wait_for("--- online (");
    bob.send("cy: ping");
    let screen = cy.wait_for("bob: cy: ping");
    assert!(
        screen.lines().any(|l| l.trim_end() == "bob: cy: ping"),
        "timestamps still shown:\n{screen}"
    );
    assert!(!cy.screen_escapes().contains('\x1b'));
    assert!(!cy.wait_raw(b"cy: ping").contains(&0x07));
}

#[test]
fn resize_redraws_and_long_wide_and_combining_input_keeps_the_cursor_right() {
    if !tmux() {
        return;
    }
    let d = TestDaemon::start("");
    let mut bob = d.join("bob");
    let ann = joined(&d, "ann", &[], &[]);
    // "é" as e + combining acute: one column, one grapheme. CJK: two columns each.
    ann.type_text("日本語e\u{301}!");
    ann.wait_input("ann> 日本語e\u{301}!");
    assert_eq!(ann.cursor().0, 5 + 6 + 1 + 1);
    ann.keys(&["Left", "Left"]);
    ann.type_text("x");
    ann.wait_input("ann> 日本語xe\u{301}!");
    assert_eq!(ann.cursor().0, 5 + 6 + 1);
    // Backspace removes one grapheme: the x; Delete removes e + accent at once.
    ann.keys(&["BSpace", "DC"]);
    ann.wait_input("ann> 日本語!");
    assert_eq!(ann.cursor().0, 5 + 6);
    ann.keys(&["End"]);
    ann.type_text("e\u{301}");
    ann.keys(&["Enter"]);
    assert_eq!(next_from(&mut bob, "ann:"), "ann: 日本語!e\u{301}");

    // Scrolled sideways by an odd number of columns, a wide character is cut at the left edge:
    // the rest of the line must stay in its columns, with the cursor right after it.
    ann.type_text(&format!("{}a", "日".repeat(60)));
    ann.wait("the end of the wide line in view", |_| {
        ann.input_line().ends_with("日日a")
    });
    let line = ann.input_line();
    let width: usize = line.chars().map(|c| if c == '日' { 2 } else { 1 }).sum();
    assert_eq!(ann.cursor().0, width, "{line:?}");
    assert!(width < usize::from(COLS), "{line:?}");
    ann.keys(&["C-u"]);
    ann.wait_input("ann>");

    // A line wider than the terminal scrolls sideways; a resize redraws it to fit.
    let long: String = (0..14).map(|i| format!("word{i:02} ")).collect();
    ann.type_text(long.trim_end());
    ann.type_text("末");
    ann.wait("the end of the long line in view", |_| {
        ann.input_line().ends_with("word13末")
    });
    assert!(ann.cursor().0 < usize::from(COLS));
    ann.tmux(&["resize-window", "-x", "40", "-y", "20"]);
    ann.wait("the input line redrawn for 40 columns", |_| {
        let l = ann.input_line();
        l.starts_with("ann> ") && l.ends_with("word13末") && ann.cursor().0 < 40
    });
    // The rows the terminal wrapped the old, wider input line onto are gone.
    let screen = ann.screen();
    let (x, y) = ann.cursor();
    for (i, l) in screen.lines().enumerate() {
        assert!(
            i == y || !l.contains("word"),
            "left behind at row {i}:\n{screen}"
        );
    }
    assert_eq!(
        x,
        ann.input_line()
            .chars()
            .map(|c| if c == '末' { 2 } else { 1 })
            .sum::<usize>()
    );
    bob.send("while narrow");
    ann.wait_for("bob: while narrow");
    assert!(ann.input_line().ends_with("word13末"));
    // Wider again: as much of the line as fits is shown again.
    ann.tmux(&["resize-window", "-x", "100", "-y", "30"]);
    ann.wait("the input line redrawn for 100 columns", |_| {
        let l = ann.input_line();
        l.starts_with("ann> ") && l.contains("word01 word02") && l.ends_with("word13末")
    });
    ann.keys(&["Enter"]);
    assert_eq!(
        next_from(&mut bob, "ann:"),
        format!("ann: {}末", long.trim_end())
    );
}

#[test]
fn multi_line_paste_is_sent_line_by_line_within_the_rate_limit() {
    if !tmux() {
        return;
    }
    // The daemon's default limits: 5 lines/s, bursts of 10.
    let d = TestDaemon::start("");
    let mut bob = d.join("bob");
    let ann = joined(&d, "ann", &[], &[]);
    let lines: Vec<String> = (1..=16).map(|i| format!("pasted line {i}")).collect();
    let text = format!("{}\nunfinished", lines.join("\n"));
    ann.paste(&text);
    bob.expect_prefix("*** JOIN ann");
    for l in &lines {
        assert_eq!(bob.line(), format!("ann: {l}"));
    }
    ann.wait_input("ann> unfinished");
    ann.wait_for("ann: pasted line 16");
    let screen = ann.screen();
    assert!(!screen.contains("not sent"), "{screen}");
    assert!(!screen.contains("rate"), "{screen}");
}

#[test]
fn a_stricter_server_is_paced_from_the_limits_it_announces() {
    // The WELCOME line says "at most 2 lines/s, bursts of 3": nothing is refused.
    let Some((_d, mut bob, ann)) =
        ann_joins("[limits]\nmessage-rate = 2\nmessage-burst = 3\n", "bob")
    else {
        return;
    };
    let text: Vec<String> = (1..=6).map(|i| format!("strict {i}")).collect();
    ann.paste(&format!("{}\n", text.join("\n")));
    for l in &text {
        assert_eq!(bob.line(), format!("ann: {l}"));
    }
    let screen = ann.wait_for("ann: strict 6");
    assert!(!screen.contains("not sent"), "{screen}");
}

#[test]
fn limits_lowered_by_a_reload_slow_the_paste_down_and_no_line_is_lost_silently() {
    let Some((d, mut bob, ann)) = ann_joins("", "bob") else {
        return;
    };
    // Lowered after ann joined, so the client paces to the old, announced limits at first.
    d.write_config("[limits]\nmessage-rate = 4\nmessage-burst = 3\n");
    d.sighup_reload();
    let text: Vec<String> = (1..=10).map(|i| format!("strict {i}")).collect();
    ann.paste(&format!("{}\n", text.join("\n")));
    let mut got = Vec::new();
    while got.last().map(String::as_str) != Some("ann: strict 10") {
        got.push(bob.line());
    }
    // After the first refusal the client keeps to the limits it names, so the tail arrives;
    // every line refused before that is reported on screen, none vanishes silently.
    let missing = text.len() - got.len();
    let screen = ann.wait_for("ann: strict 10");
    let refusals = screen.matches("!!! line not sent").count();
    assert_eq!(refusals, missing, "bob got {got:?}\n{screen}");
    assert!(missing <= 5, "{got:?}");
}

#[test]
fn asks_for_address_port_and_name_and_asks_again() {
    if !tmux() {
        return;
    }
    let d = TestDaemon::start("");
    let mut bob = d.join("bob");
    let closed = free_port();
    let t = Tty::start(&[], &[], None);
    t.wait_input("server address [127.0.0.1]:");
    t.keys(&["Enter"]);
    t.wait_input("port [42069]:");
    t.type_text(&closed.to_string());
    t.keys(&["Enter"]);
    t.wait_for(&format!(
        "cannot connect to 127.0.0.1:{closed}: Connection refused"
    ));
    t.wait_input("server address [127.0.0.1]:");
    t.type_text("localhost");
    t.keys(&["Enter"]);
    t.wait_input("port [42069]:");
    t.type_text("http");
    t.keys(&["Enter"]);
    t.wait_for("\"http\" is not a port number");
    t.wait_input("port [42069]:");
    t.type_text(&d.addr.port().to_string());
    t.keys(&["Enter"]);
    t.wait_input("your name:");
    t.type_text("server");
    t.keys(&["Enter"]);
    t.wait_for("refused the name \"server\" (name-reserved)");
    t.wait_input("your name:");
    t.type_text("BOB");
    t.keys(&["Enter"]);
    t.wait_for("refused the name \"BOB\" (name-taken)");
    t.type_text("ann");
    t.keys(&["Enter"]);
    t.wait_input("ann>");
    assert_eq!(bob.expect_prefix("*** JOIN"), "*** JOIN ann joined");
    // Prompt answers are not in the input history.
    // (Keys are handled in order: had Up recalled a line, "x" would follow it.)
    t.keys(&["Up"]);
    t.type_text("x");
    t.wait_input("ann> x");
}

#[test]
fn a_server_that_refuses_at_once_counts_as_a_failed_connection() {
    if !tmux() {
        return;
    }
    let d = TestDaemon::start("[limits]\nmax-clients = 1\n");
    let bob = d.join("bob");
    let port = d.addr.port().to_string();
    let t = Tty::start(&["127.0.0.1", &port], &[], None);
    t.wait_for("refused the connection (server-full); try another address");
    t.wait_input("server address [127.0.0.1]:");
    drop(bob);
    t.keys(&["Enter"]);
    t.type_text(&port);
    t.keys(&["Enter"]);
    // The greeting is shown before the name is asked for.
    let screen = t.wait_for("your name:");
    assert!(screen.contains("--- chatd "), "{screen}");
}

#[test]
fn config_file_supplies_server_and_name() {
    if !tmux() {
        return;
    }
    let d = TestDaemon::start("");
    let mut bob = d.join("bob");
    let conf = format!(
        "name = \"zed\"\n[server]\nhost = \"127.0.0.1\"\nport = {}\n",
        d.addr.port()
    );
    let t = Tty::start(&[], &[], Some(&conf));
    // Nothing asked about the server; the name prompt offers the configured one.
    t.wait_input("your name [zed]:");
    assert!(!t.screen().contains("server address"));
    t.keys(&["Enter"]);
    t.wait_input("zed>");
    assert_eq!(bob.expect_prefix("*** JOIN"), "*** JOIN zed joined");

    // Ctrl-D at a prompt leaves quietly, as at a shell prompt.
    let u = Tty::start(&[], &[], Some(&conf));
    u.wait_input("your name [zed]:");
    u.keys(&["C-d"]);
    assert_eq!(u.wait_exit(), 0);
    let v = Tty::start(&[], &[], None);
    v.wait_input("server address [127.0.0.1]:");
    v.keys(&["C-d"]);
    assert_eq!(v.wait_exit(), 0);
}

#[test]
fn kicked_shows_the_reason_and_does_not_reconnect() {
    if !tmux() {
        return;
    }
    let d = TestDaemon::start("");
    let t = joined(&d, "mal", &[], &[]);
    let out = d.chatctl(&["kick", "mal", "--reason", "too loud"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(t.wait_exit(), 3);
    let screen = t.screen();
    assert!(
        screen.contains("kicked by the server: too loud"),
        "{screen}"
    );
    assert!(!screen.contains("reconnecting"), "{screen}");
}

/// A daemon listening on `port` (so a restarted one is found where the old one was).
fn daemon_on(port: u16) -> TestDaemon {
    TestDaemon::start_config(Config::test().listen(&[&format!("127.0.0.1:{port}")]))
}

#[test]
fn reconnects_after_the_server_restarts_and_takes_the_same_name() {
    if !tmux() {
        return;
    }
    let port = free_port();
    let mut d = daemon_on(port);
    let t = joined(&d, "ann", &[], &[]);
    d.kill();
    t.wait_for("connection to server lost");
    t.wait_for("reconnecting to 127.0.0.1:");
    t.wait_input("(offline)>");
    // Lines typed while offline are not sent, and the user is told.
    t.type_text("lost words");
    t.keys(&["Enter"]);
    t.wait_for("not connected: the line was not sent");
    // Attempts back off: 0.5 s, then 1 s, ...
    t.wait_for("reconnecting to 127.0.0.1:");
    let screen = t.wait_for(" in 1.0s ");
    assert!(screen.contains(" in 0.5s "), "{screen}");
    assert!(screen.contains("Connection refused"), "{screen}");
    let d2 = daemon_on(port);
    let mut bob = d2.join("bob");
    t.wait_for("reclaimed the name ann");
    t.wait_input("ann>");
    t.type_text("back");
    t.keys(&["Enter"]);
    assert_eq!(bob.expect_prefix("ann:"), "ann: back");
    assert!(t.alive());
}

#[test]
fn no_reconnect_exits_when_the_connection_is_lost() {
    if !tmux() {
        return;
    }
    let mut d = TestDaemon::start("");
    let t = joined(&d, "ann", &["--no-reconnect"], &[]);
    d.kill();
    assert_eq!(t.wait_exit(), 1);
    let screen = t.screen();
    assert!(screen.contains("connection to server lost"), "{screen}");
    assert!(!screen.contains("reconnecting"), "{screen}");
}

/// A TCP relay in front of the daemon whose client sides can be cut while the daemon sides stay
/// open: to the daemon, the old connection looks alive (as after a network failure).
struct Relay {
    port: u16,
    /// Tells the accept loop to end (it is woken by one more connection).
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// Client-side streams of live relayed connections.
    clients: Arc<Mutex<Vec<TcpStream>>>,
    /// Daemon-side streams, kept open on purpose after a cut.
    servers: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(to: SocketAddr) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = l.local_addr().expect("addr").port();
        let clients = Arc::new(Mutex::new(Vec::new()));
        let servers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c2, s2, stop2) = (clients.clone(), servers.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(client) = conn else { return };
                if stop2.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(server) = TcpStream::connect(to) else {
                    return;
                };
                // (from, to, whether `to` is the client side)
                let pipes = [
                    (client.try_clone(), server.try_clone(), false),
                    (server.try_clone(), client.try_clone(), true),
                ];
                for (from, to, to_client) in pipes {
                    if let (Ok(mut from), Ok(mut to)) = (from, to) {
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 4096];
                            while let Ok(n) = from.read(&mut buf) {
                                if n == 0 || to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            // The daemon side is never shut: it must not notice the cut.
                            if to_client {
                                let _ = to.shutdown(std::net::Shutdown::Write);
                            }
                        });
                    }
                }
                c2.lock().expect("lock").push(client);
                s2.lock().expect("lock").push(server);
            }
        });
        Relay {
            port,
            stop,
            clients,
            servers,
        }
    }

    /// Closes every client side; the daemon sides stay connected and silent.
    fn cut(&self) {
        for c in self.clients.lock().expect("lock").drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        self.cut();
        for s in self.servers.lock().expect("lock").drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn reclaims_its_name_while_the_server_still_holds_the_dead_connection() {
    if !tmux() {
        return;
    }
    let d = TestDaemon::start("");
    let mut bob = d.join("bob");
    let relay = Relay::start(d.addr);
    let port = relay.port.to_string();
    let t = Tty::start(&["127.0.0.1", &port, "--name", "ann"], &[], None);
    t.wait_input("ann>");
    t.wait_for("--- online (");
    bob.expect_prefix("*** JOIN ann");
    relay.cut();
    t.wait_for("connection to server lost");
    // The daemon still holds "ann" for the dead connection; the token takes it back at once.
    t.wait_for("reclaimed the name ann");
    assert_eq!(
        bob.expect_prefix("*** LEAVE"),
        "*** LEAVE ann left (reconnected)"
    );
    assert_eq!(bob.expect_prefix("*** JOIN"), "*** JOIN ann joined");
    t.wait_input("ann>");
    t.type_text("same me");
    t.keys(&["Enter"]);
    assert_eq!(bob.expect_prefix("ann:"), "ann: same me");
    let screen = t.screen();
    assert!(!screen.contains("still holds"), "{screen}");
    assert!(
        !screen.contains("TOKEN"),
        "the token is never shown:\n{screen}"
    );
}

#[test]
fn help_and_version_as_users_expect() {
    let run = |arg: &str| {
        Command::new(bin("chat-client"))
            .arg(arg)
            .stdin(Stdio::null())
            .output()
            .expect("run chat-client")
    };
    let help = run("--help");
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for want in [
        "Usage: chat-client",
        "[HOST]",
        "[PORT]",
        "--name",
        "--no-reconnect",
        "--config",
    ] {
        assert!(text.contains(want), "--help lacks {want}:\n{text}");
    }
    // The short help describes the client, not the package the three programs share.
    let short = String::from_utf8_lossy(&run("-h").stdout).into_owned();
    assert!(
        short.starts_with("A terminal client for the chatd chatroom"),
        "{short}"
    );
    let version = run("--version");
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("chat-client {}", env!("CARGO_PKG_VERSION"))
    );
    let bad = run("--bogus");
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn a_bad_config_file_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path: &Path = &dir.path().join("client.toml");
    std::fs::write(path, "[ui]\ncolour = true\n").expect("write");
    let out = Command::new(bin("chat-client"))
        .args(["--config", &path.display().to_string(), "127.0.0.1", "1"])
        .stdin(Stdio::null())
        .output()
        .expect("run chat-client");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("client.toml") && err.contains("colour"),
        "{err}"
    );

    // Without XDG_CONFIG_HOME the default file is ~/.config/chatd/client.toml.
    let home = tempfile::tempdir().expect("tempdir");
    let conf = home.path().join(".config").join("chatd");
    std::fs::create_dir_all(&conf).expect("mkdir");
    std::fs::write(conf.join("client.toml"), "[server]\nport = \"x\"\n").expect("write");
    let out = Command::new(bin("chat-client"))
        .args(["127.0.0.1", "1"])
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("CHAT_CLIENT_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run chat-client");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(".config/chatd/client.toml"), "{err}");
}

/// A terminal that goes away (the window closed, ssh dropped) sends SIGHUP: the client must
/// end and free its connection. It used to panic in its signal handler writing to the dead
/// terminal, and then spin at full CPU in the terminal reader for ever.
#[test]
fn a_closed_terminal_ends_the_client() {
    let Some((_d, mut watcher, ann)) = ann_joins("", "watcher") else {
        return;
    };
    let pid = ann.client_pid();
    ann.tmux(&["kill-server"]);
    let left = watcher.expect_prefix("*** LEAVE ann");
    assert!(left.contains("connection lost"), "{left}");
    crate::helper::wait_until(WAIT, "the client process to end", || {
        // Gone, or a zombie nobody reaped (its parent shell died with the terminal too).
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
            .unwrap_or(true)
    });
}
