//! `--config` and `--check-config` on good, bad and missing files.

use std::process::{Command, Output};

use crate::helper::{Config, TestDaemon, bin};

fn chatd(args: &[&str]) -> Output {
    Command::new(bin("chatd"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run chatd")
}

/// What `chatd --check-config --config PATH` says on stderr.
fn check_err(path: &str) -> String {
    String::from_utf8_lossy(&chatd(&["--check-config", "--config", path]).stderr).into_owned()
}

fn write(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("chatd.toml");
    std::fs::write(&path, text).expect("write");
    path.display().to_string()
}

#[test]
fn shipped_config_checks_ok_and_prints_effective_config() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/chatd.toml");
    let out = chatd(&["--check-config", "--config", shipped]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("config OK"));
    let effective = String::from_utf8_lossy(&out.stdout);
    for key in [
        "[server]",
        "listen = [",
        "[limits]",
        "max-line-length = 2048",
        "mode = 432",
    ] {
        assert!(effective.contains(key), "{key} missing from:\n{effective}");
    }
}

#[test]
fn check_config_reports_file_line_col() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(
        &dir,
        "[room]\nhistory = 5\n\n[limits]\nmax-clients = 10\nfrobnicate = true\n",
    );
    let out = chatd(&["--check-config", "--config", &path]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("chatd: {path}:6:1: unknown field `frobnicate`")),
        "{err}"
    );

    let path = write(&dir, "[room]\nhistory = \"many\"\n");
    let err = check_err(&path);
    assert!(
        err.starts_with(&format!("chatd: {path}:2:11: invalid type")),
        "{err}"
    );

    let path = write(&dir, "[server\n");
    let err = check_err(&path);
    assert!(err.starts_with(&format!("chatd: {path}:1:")), "{err}");

    let path = write(&dir, "[server]\nlisten = []\n");
    let out = chatd(&["--check-config", "--config", &path]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.listen: at least one address"));
}

#[test]
fn missing_or_bad_explicit_config_is_a_startup_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("absent.toml").display().to_string();
    let out = chatd(&["--config", &missing]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&missing) && err.contains("cannot read config"),
        "{err}"
    );
    assert_eq!(
        chatd(&["--check-config", "--config", &missing])
            .status
            .code(),
        Some(1)
    );

    let path = write(&dir, "[limits]\nmax-line-length = 1\n");
    let out = chatd(&["--config", &path]);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{path}:2:19: 1 is out of range, expected 16 to 65536"
        )),
        "{err}"
    );
}

#[test]
fn default_path_missing_means_built_in_defaults() {
    if std::path::Path::new("/etc/chatd/chatd.toml").exists() {
        eprintln!("/etc/chatd/chatd.toml exists on this machine; checking it parses instead");
        assert_eq!(chatd(&["--check-config"]).status.code(), Some(0));
        return;
    }
    let out = chatd(&["--check-config"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("built-in defaults apply"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("0.0.0.0:42069"));
}

#[test]
fn bound_addresses_are_logged() {
    let d = TestDaemon::start("");
    assert_ne!(d.addr.port(), 0);
    assert!(
        d.log()
            .contains(&format!("listening for chat clients addr={}", d.addr))
    );
}

#[test]
fn ipv4_and_ipv6_listeners_work_side_by_side() {
    let d = TestDaemon::start_config(Config::test().listen(&["127.0.0.1:0", "[::1]:0"]));
    let v6 = d.addr_on(std::net::Ipv6Addr::LOCALHOST.into());
    let mut a = d.join("four");
    let mut b = crate::helper::Client::connect(v6);
    b.expect_prefix("*** HELLO");
    b.send("six");
    a.expect_prefix("*** JOIN six");
    b.send("over v6");
    assert_eq!(a.line(), "six: over v6");
}
