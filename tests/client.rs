//! The real `chat-client` against the real daemon (or, where the test must send what chatd
//! never would, a scripted server on a real socket): pipe mode here; the interactive client, in a
//! pseudo-terminal (tmux), is in client_tty.rs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::helper::{TestDaemon, WAIT, bin, free_port, wait_child, wait_for};

/// A `chat-client` with piped standard streams, its output collected in the background.
struct PipeClient {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    _config_home: tempfile::TempDir,
}

impl PipeClient {
    /// Starts `chat-client ARGS` with an empty config dir, so no user config leaks in.
    fn start(args: &[&str]) -> PipeClient {
        let config_home = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(bin("chat-client"))
            .args(args)
            .env("XDG_CONFIG_HOME", config_home.path())
            .env_remove("NO_COLOR")
            .env_remove("CHAT_CLIENT_CONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn chat-client");
        let out = collect(child.stdout.take().expect("stdout"));
        let err = collect(child.stderr.take().expect("stderr"));
        PipeClient {
            stdin: child.stdin.take(),
            child,
            out,
            err,
            _config_home: config_home,
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to client");
        stdin.flush().expect("flush");
    }

    /// Ends standard input, as at the end of a script.
    fn close_stdin(&mut self) {
        self.stdin.take();
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().expect("lock")).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().expect("lock")).into_owned()
    }

    fn wait_stdout(&self, needle: &str) {
        wait_for(
            WAIT,
            &format!("{needle:?} on stdout"),
            || self.stdout().contains(needle).then_some(()),
            || format!("stdout:\n{}\nstderr:\n{}", self.stdout(), self.stderr()),
        );
    }

    /// Waits for the client to exit; its exit code.
    fn wait_exit(&mut self) -> i32 {
        let status = wait_child(&mut self.child, WAIT);
        // Let the collector threads drain the pipes.
        std::thread::sleep(Duration::from_millis(50));
        match status {
            Some(status) => status.code().unwrap_or(-1),
            None => panic!(
                "chat-client did not exit\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            ),
        }
    }
}

impl Drop for PipeClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = from.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().expect("lock").extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

fn port_arg(d: &TestDaemon) -> String {
    d.addr.port().to_string()
}

#[test]
fn pipe_mode_chats_both_ways_and_leaves_on_eof() {
    let d = TestDaemon::start("");
    let mut bob = d.join("bob");
    let port = port_arg(&d);
    let mut alice = PipeClient::start(&["127.0.0.1", &port]);
    alice.send("alice");
    assert_eq!(bob.expect_prefix("*** JOIN"), "*** JOIN alice joined");
    alice.wait_stdout("*** WELCOME alice ");

    alice.send("hello bob");
    assert_eq!(bob.expect_prefix("alice:"), "alice: hello bob");
    bob.send("hi alice");
    alice.wait_stdout("bob: hi alice\n");
    alice.send("/me waves");
    assert_eq!(bob.expect_prefix("* alice"), "* alice waves");

    alice.close_stdin();
    assert_eq!(alice.wait_exit(), 0, "stderr: {}", alice.stderr());
    assert_eq!(
        bob.expect_prefix("*** LEAVE"),
        "*** LEAVE alice left (quit)"
    );
    let out = alice.stdout();
    assert!(out.ends_with("*** BYE goodbye\n"), "{out}");
    assert!(!out.contains('\x1b'), "pipe output must be plain: {out:?}");
}

#[test]
fn pipe_mode_quit_command_leaves_cleanly() {
    let d = TestDaemon::start("");
    let mut bob = d.join("bob");
    let mut c = PipeClient::start(&["127.0.0.1", &port_arg(&d), "--name", "carol"]);
    c.wait_stdout("*** WELCOME carol ");
    c.send("/quit");
    assert_eq!(c.wait_exit(), 0, "stderr: {}", c.stderr());
    assert_eq!(
        bob.expect_prefix("*** LEAVE"),
        "*** LEAVE carol left (quit)"
    );
}

#[test]
fn pipe_mode_refused_name_takes_the_next_line() {
    let d = TestDaemon::start("");
    let mut bob = d.join("bob");
    let mut c = PipeClient::start(&["127.0.0.1", &port_arg(&d)]);
    c.send("BOB");
    c.wait_stdout("*** ERR name-taken ");
    c.send("carol");
    c.wait_stdout("*** WELCOME carol ");
    c.send("hi");
    assert_eq!(bob.expect_prefix("carol:"), "carol: hi");
    assert!(
        c.stderr().contains("refused the name \"BOB\""),
        "{}",
        c.stderr()
    );
    c.close_stdin();
    assert_eq!(c.wait_exit(), 0);
}

#[test]
fn pipe_mode_refused_given_name_is_an_error() {
    let d = TestDaemon::start("");
    let _bob = d.join("bob");
    let mut c = PipeClient::start(&["127.0.0.1", &port_arg(&d), "--name", "bob"]);
    assert_eq!(c.wait_exit(), 4);
    assert!(
        c.stderr()
            .contains("the server refused the name \"bob\" (name-taken)"),
        "{}",
        c.stderr()
    );
    // Input ending before any name is accepted is the same error.
    let mut c = PipeClient::start(&["127.0.0.1", &port_arg(&d)]);
    c.send("server");
    c.close_stdin();
    assert_eq!(c.wait_exit(), 4);
    assert!(c.stdout().contains("*** ERR name-reserved "));
    assert!(
        c.stderr().contains("no name was accepted"),
        "{}",
        c.stderr()
    );
}

#[test]
fn unreachable_server_is_an_error_with_the_reason() {
    let port = free_port().to_string();
    let mut c = PipeClient::start(&["127.0.0.1", &port, "--name", "x"]);
    c.close_stdin();
    assert_ne!(c.wait_exit(), 0);
    let err = c.stderr();
    assert!(
        err.contains(&format!(
            "cannot connect to 127.0.0.1:{port}: Connection refused"
        )),
        "{err}"
    );
}

#[test]
fn missing_server_without_a_terminal_is_a_usage_error() {
    let mut c = PipeClient::start(&[]);
    c.close_stdin();
    assert_eq!(c.wait_exit(), 2);
    assert!(c.stderr().contains("no server given"), "{}", c.stderr());
    assert_eq!(c.stdout(), "", "nothing is asked");
}

/// A one-connection server that greets, accepts any name, sends `lines`, then waits for the
/// client to leave.
fn scripted_server(lines: &'static [&'static [u8]]) -> (u16, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        let mut w = s.try_clone().expect("clone");
        let mut r = BufReader::new(s);
        w.write_all(b"*** HELLO scripted\n").expect("hello");
        let mut name = String::new();
        r.read_line(&mut name).expect("name");
        w.write_all(format!("*** WELCOME {} hi\n", name.trim()).as_bytes())
            .expect("welcome");
        for l in lines {
            w.write_all(l).expect("line");
        }
        let mut quit = String::new();
        let _ = r.read_line(&mut quit);
        let _ = w.write_all(b"*** BYE goodbye\n");
    });
    (port, t)
}

#[test]
fn escapes_from_the_network_are_neutralised() {
    let (port, server) = scripted_server(&[
        b"ev\x1b[2Jil: \x1b[31mred\x07 \x1b]0;title\x07 \xc2\x9b1m\n",
        b"* mal \xe2\x80\xaereversed\r\n",
        b"*** NOTICE \x1b[5mblink\n",
    ]);
    let mut c = PipeClient::start(&["127.0.0.1", &port.to_string(), "--name", "ann"]);
    c.wait_stdout("blink");
    c.close_stdin();
    assert_eq!(c.wait_exit(), 0, "{}", c.stderr());
    server.join().expect("server thread");
    let out = c.stdout();
    for bad in ['\x1b', '\x07', '\u{9b}', '\u{202e}', '\r'] {
        assert!(!out.contains(bad), "{bad:?} reached the output: {out:?}");
    }
    assert!(
        out.contains("ev\\u{001b}[2Jil: \\u{001b}[31mred\\u{0007}"),
        "{out}"
    );
    assert!(out.contains("* mal \\u{202e}reversed\n"), "{out}");
}

#[test]
fn kick_reason_is_shown_and_differs_from_a_lost_connection() {
    let d = TestDaemon::start("");
    let mut c = PipeClient::start(&["127.0.0.1", &port_arg(&d), "--name", "mallory"]);
    c.wait_stdout("*** WELCOME mallory ");
    let out = d.chatctl(&["kick", "mallory", "--reason", "flooding the room"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(c.wait_exit(), 3);
    c.wait_stdout("*** KICKED ");
    assert!(c.stdout().contains("flooding the room"), "{}", c.stdout());
    let err = c.stderr();
    assert!(
        err.contains("kicked by the server: ") && err.contains("flooding the room"),
        "{err}"
    );
    assert!(!err.contains("connection to server lost"), "{err}");
}

#[test]
fn lost_server_is_reported_not_a_panic() {
    let mut d = TestDaemon::start("");
    let mut c = PipeClient::start(&["127.0.0.1", &port_arg(&d), "--name", "dora"]);
    c.wait_stdout("*** WELCOME dora ");
    d.kill();
    assert_eq!(c.wait_exit(), 1);
    let err = c.stderr();
    assert!(err.contains("connection to server lost"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
