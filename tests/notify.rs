//! Every reload path tells the service manager the same way: `chatctl reload` and SIGHUP each
//! send `RELOADING=1` (with `MONOTONIC_USEC=`, which `Type=notify-reload` needs) and then
//! `READY=1`, also when the new config is rejected. The manager is the harness's
//! [`FakeManager`], passed to chatd as `NOTIFY_SOCKET`.

use nix::sys::signal::Signal;

use crate::helper::{Config, FakeManager, TestDaemon, WAIT, wait_child};

#[test]
fn chatctl_reload_and_sighup_both_notify_reloading_then_ready() {
    let mut manager = FakeManager::new();
    let mut d = TestDaemon::with(Config::test())
        .env("NOTIFY_SOCKET", &manager.name)
        .spawn();
    manager.expect("READY=1");
    d.wait_ready();

    let out = d.chatctl(&["reload"]);
    assert!(
        out.status.success(),
        "chatctl reload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    manager.expect_reload();

    d.signal(Signal::SIGHUP);
    manager.expect_reload();

    // A rejected config leaves chatd running on the old one: ready again all the same.
    std::fs::write(&d.config_path, "[room]\nhistory = \"many\"\n").expect("write");
    let out = d.chatctl(&["reload"]);
    assert_eq!(out.status.code(), Some(7), "reload of a broken config");
    manager.expect_reload();

    d.signal(Signal::SIGTERM);
    manager.expect("STOPPING=1");
    let child = d.child.as_mut().expect("the daemon runs");
    let status = wait_child(child, WAIT).expect("chatd exits after SIGTERM");
    assert_eq!(status.code(), Some(0));
}
