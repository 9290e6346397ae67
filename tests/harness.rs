//! The test kit itself: config building, several daemons at once, extra environment.

use crate::helper::{Config, TestDaemon, require};

#[test]
fn config_builder_sets_replaces_merges_and_reads_back() {
    let c = Config::test()
        .section("limits", [("message-rate", "1000000")])
        .raw("[limits]\nmessage-burst = 5\n\n[room]\nmotd = \"hi\"\n")
        .set("limits", "message-burst", "7")
        .motd("say \"hi\"")
        .remove("server", "shutdown-grace");
    let text = c.to_string();
    let parsed: toml::Table = toml::from_str(&text).expect("valid TOML");
    assert_eq!(
        parsed["limits"]["message-rate"].as_integer(),
        Some(1_000_000)
    );
    assert_eq!(parsed["limits"]["message-burst"].as_integer(), Some(7));
    assert_eq!(parsed["room"]["motd"].as_str(), Some("say \"hi\""));
    assert_eq!(parsed["server"]["listen"][0].as_str(), Some("127.0.0.1:0"));
    assert!(parsed["server"].get("shutdown-grace").is_none(), "{text}");
    assert_eq!(Config::parse(&text), c, "what it writes it reads back");
}

#[test]
fn start_many_brings_up_independent_daemons_with_their_own_config_and_env() {
    let daemons = TestDaemon::start_many(3, |i| Config::test().motd(&format!("daemon {i}")));
    let ports: std::collections::HashSet<u16> = daemons.iter().map(|d| d.addr.port()).collect();
    assert_eq!(ports.len(), 3, "each on its own port");
    for (i, d) in daemons.iter().enumerate() {
        let mut c = d.enter("visitor");
        assert_eq!(c.line(), format!("*** MOTD daemon {i}"));
        assert_eq!(d.status()["response"]["users"], 1);
    }
    let d = TestDaemon::with(Config::test())
        .env("RUST_LOG", "debug")
        .start();
    let _a = d.join("alice");
    d.wait_log("DEBUG");
}

#[test]
fn a_present_component_is_not_a_skip() {
    assert!(require("sh", "it is part of every system"));
}
