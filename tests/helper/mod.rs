//! The test harness: temporary daemons and their configs, line-oriented clients, bounded waits,
//! and the system components some tests need.
//!
//! - [`config`]: [`Config`], a chatd config built by section and key.
//! - [`daemon`]: [`TestDaemon`], a real chatd in a temp dir, ready when its admin socket answers.
//! - [`net`]: [`Client`], a line client over any stream (TCP by default).
//! - [`wait`]: [`WAIT`], [`wait_until`], [`wait_for`], [`wait_child`].
//! - [`components`]: [`require`] and [`require_root`], which skip (or fail under CI).
//! - [`nats`]: [`NatsServer`], real NATS servers with JetStream for the cluster tests, and
//!   [`RawNats`], a tiny client of NATS's text protocol.
//! - [`tls`]: [`Pki`], a test CA issuing certificates, and TLS [`Client`]s.
//! - [`web`]: [`WsClient`], a line [`Client`] over a WebSocket (one text message per line),
//!   and plain HTTP requests to the web listener.

#![allow(dead_code, unused_imports)]

pub mod components;
pub mod config;
pub mod daemon;
pub mod nats;
pub mod net;
pub mod notify;
pub mod tls;
pub mod wait;
pub mod web;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use components::{ci, require, require_root};
pub use config::Config;
pub use daemon::{Launch, TestDaemon, admin_request};
pub use nats::{NatsServer, RawNats};
pub use net::{Client, ReadTimeout, agreed_order, free_port};
pub use notify::FakeManager;
pub use tls::{Pki, TlsClient};
pub use wait::{WAIT, wait_child, wait_for, wait_until};
pub use web::{WsClient, WsStream};

/// A `[limits]` section that lifts flood control, for tests that send bursts.
pub const NO_RATE_LIMIT: &str = "[limits]\nmessage-rate = 1000000\nmessage-burst = 1000000\n";

/// Path of one of the workspace's programs, built for this test run. The daemon is this
/// package's own binary (`CARGO_BIN_EXE_chatd`); chatctl, chat-client and chat-bench are other
/// packages' binaries, which `cargo test` does not build for this package's tests, so the first
/// call builds them once with the same cargo and profile, into the same target directory.
pub fn bin(name: &str) -> PathBuf {
    let chatd = PathBuf::from(env!("CARGO_BIN_EXE_chatd"));
    let path = match name {
        "chatd" => chatd,
        "chatctl" | "chat-client" | "chat-bench" => {
            let dir = sibling_binaries(&chatd);
            dir.join(name)
        }
        other => panic!("unknown binary {other}"),
    };
    assert!(path.exists(), "binary {} is missing", path.display());
    path
}

/// Builds the workspace's other programs once per test run; returns the directory they are in
/// (the one the daemon's binary is in).
fn sibling_binaries(chatd: &Path) -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = chatd.parent().expect("binary directory").to_path_buf();
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .arg("build")
            .arg("--quiet")
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
            .args(["-p", "chatctl", "-p", "chat-client", "-p", "chat-bench"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        let status = cargo
            .status()
            .expect("run cargo to build chatctl, chat-client and chat-bench");
        assert!(
            status.success(),
            "building chatctl, chat-client and chat-bench failed"
        );
        dir
    })
}

/// Runs one of the workspace's programs (see [`bin`]) with `args` and no input; its output.
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name))
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {name}: {e}"))
}

/// chatctl's `--json` answer, parsed.
pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "chatctl printed no JSON ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}
