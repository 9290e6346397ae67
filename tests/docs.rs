//! The written contracts in docs/ and config/ cannot drift from the code.

use chat_proto::admin::ErrorCode;
use chat_proto::command::COMMANDS;
use chat_proto::protocol::{ALL_CODES, ALL_KINDS};
use chatd::config::{ClusterConfig, Config, RESTART_KEYS};

fn read(rel: &str) -> String {
    let path = format!("{}/../{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn protocol_doc_lists_every_server_line_kind_and_error_code() {
    let doc = read("docs/protocol.md");
    for kind in ALL_KINDS {
        assert!(
            doc.contains(&format!("| `{kind}` | `*** {kind}")),
            "docs/protocol.md lacks kind {kind}"
        );
    }
    for code in ALL_CODES {
        assert!(
            doc.contains(&format!("| `{code}` |")),
            "docs/protocol.md lacks code {code}"
        );
    }
}

#[test]
fn protocol_doc_lists_every_websocket_close_code_and_refusal() {
    let doc = read("docs/protocol.md");
    let section = doc
        .split_once("## WebSocket")
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("docs/protocol.md has no WebSocket section"));
    for code in chatd::session::WS_CLOSE_CODES {
        assert!(
            section.contains(&format!("| `{code}` |")),
            "docs/protocol.md lacks close code {code}"
        );
    }
    for status in ["400", "403", "426", "429", "503"] {
        assert!(
            section.contains(&format!("| `{status}` |")),
            "docs/protocol.md lacks HTTP status {status}"
        );
    }
}

#[test]
fn protocol_and_client_docs_name_every_command() {
    for doc in ["docs/protocol.md", "docs/client.md"] {
        let text = read(doc);
        for command in COMMANDS {
            assert!(
                text.contains(&format!("`{}", command.name)),
                "{doc} lacks {}",
                command.name
            );
        }
    }
}

#[test]
fn admin_doc_lists_every_error_code() {
    let doc = read("docs/admin-protocol.md");
    for code in [
        ErrorCode::PermissionDenied,
        ErrorCode::NoSuchUser,
        ErrorCode::NoSuchBan,
        ErrorCode::InvalidArgument,
        ErrorCode::BadRequest,
        ErrorCode::UnsupportedVersion,
        ErrorCode::ReloadFailed,
        ErrorCode::DaemonUnreachable,
        ErrorCode::StateWriteFailed,
    ] {
        let name = serde_json::to_value(code)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned));
        let name = name.unwrap_or_default();
        assert!(
            doc.contains(&format!("`{name}`")),
            "docs/admin-protocol.md lacks {name}"
        );
    }
}

/// Every `section.key` of the config, from the defaults.
fn config_keys() -> Vec<String> {
    let mut keys = Vec::new();
    if let Ok(toml::Value::Table(sections)) = toml::Value::try_from(Config::default()) {
        for (section, v) in sections {
            if let toml::Value::Table(t) = v {
                keys.extend(t.keys().map(|k| format!("{section}.{k}")));
            }
        }
    }
    keys
}

#[test]
fn configuration_doc_and_shipped_config_cover_every_key_with_its_reload_class() {
    let doc = read("docs/configuration.md");
    let shipped = read("config/chatd.toml");
    let keys = config_keys();
    assert!(keys.len() > 10, "{keys:?}");
    for key in &keys {
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{key}` |")))
            .unwrap_or_else(|| panic!("docs/configuration.md has no row for {key}"));
        let restart = RESTART_KEYS.contains(&key.as_str());
        assert_eq!(row.trim_end().ends_with("| restart |"), restart, "{row}");
        let (section, name) = key.split_once('.').unwrap_or_default();
        assert!(
            shipped.contains(&format!("[{section}]")),
            "config/chatd.toml lacks [{section}]"
        );
        let lines: Vec<&str> = shipped.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.starts_with(&format!("{name} =")))
            .unwrap_or_else(|| panic!("config/chatd.toml lacks {key}"));
        // The comment block right above the key says how it applies.
        let comment: String = lines[..at]
            .iter()
            .rev()
            .take_while(|l| l.starts_with('#'))
            .copied()
            .collect();
        let class = if restart { "(restart)" } else { "(live" };
        assert!(
            comment.contains(class),
            "config/chatd.toml: {key} not marked {class}"
        );
    }
}

#[test]
fn cluster_doc_shows_every_wire_event_and_each_example_decodes() {
    use chatd::cluster::wire::Envelope;
    let doc = read("docs/cluster.md");
    let examples: Vec<&str> = doc.lines().filter(|l| l.starts_with("{\"v\":")).collect();
    let mut kinds = std::collections::BTreeSet::new();
    for line in &examples {
        let env = Envelope::decode(line.as_bytes())
            .unwrap_or_else(|e| panic!("docs/cluster.md example does not decode ({e}): {line}"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        kinds.insert(v["event"].as_str().unwrap_or_default().to_owned());
        assert_eq!(Envelope::decode(&env.encode()).ok(), Some(env));
    }
    let all = [
        "join", "say", "act", "private", "rename", "replaced", "kick", "leave", "announce",
    ];
    for kind in all {
        assert!(
            kinds.contains(kind),
            "docs/cluster.md has no example of {kind}"
        );
    }
}

/// The `[cluster]` table is absent by default, so the shipped config shows it commented out:
/// `#[cluster]` and `#key = default` lines, each under a comment saying how it applies.
/// Uncommented, they must give exactly the cluster defaults, and docs/configuration.md must
/// have a row for every key.
#[test]
fn shipped_config_documents_the_cluster_table_commented_out_at_its_defaults() {
    let doc = read("docs/configuration.md");
    let shipped = read("config/chatd.toml");
    let lines: Vec<&str> = shipped.lines().collect();
    assert!(
        lines.contains(&"#[cluster]"),
        "config/chatd.toml lacks #[cluster]"
    );
    let Ok(toml::Value::Table(keys)) = toml::Value::try_from(ClusterConfig::default()) else {
        panic!("the cluster defaults do not render as a table");
    };
    assert!(keys.len() >= 6, "{keys:?}");
    for name in keys.keys() {
        let key = format!("cluster.{name}");
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{key}` |")))
            .unwrap_or_else(|| panic!("docs/configuration.md has no row for {key}"));
        let restart = RESTART_KEYS.contains(&key.as_str());
        assert_eq!(row.trim_end().ends_with("| restart |"), restart, "{row}");
        let at = lines
            .iter()
            .position(|l| l.starts_with(&format!("#{name} =")))
            .unwrap_or_else(|| panic!("config/chatd.toml lacks #{name} = (commented out)"));
        let comment: String = lines[..at]
            .iter()
            .rev()
            .take_while(|l| l.starts_with("# "))
            .copied()
            .collect();
        let class = if restart { "(restart)" } else { "(live" };
        assert!(
            comment.contains(class),
            "config/chatd.toml: {key} not marked {class}"
        );
    }
    // Uncommenting the table (every `#` line that is not prose) turns the cluster on at its
    // defaults and changes nothing else.
    let uncommented: String = lines
        .iter()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if !rest.is_empty() && !rest.starts_with(' ') => rest,
            _ => l,
        })
        .flat_map(|l| [l, "\n"])
        .collect();
    let parsed = Config::parse(&uncommented, std::path::Path::new("config/chatd.toml"));
    let want = Config {
        cluster: Some(ClusterConfig::default()),
        ..Config::default()
    };
    assert_eq!(parsed.map_err(|e| e.to_string()), Ok(want));
}

/// Every example drop-in shipped for a cluster (packaging/cluster/, installed to
/// /usr/share/doc/chatd/examples/) appears verbatim in docs/cluster.md as an `ini` block, and
/// the chatd one orders chatd after NATS.
#[test]
fn cluster_doc_shows_the_shipped_drop_ins_verbatim() {
    let doc = read("docs/cluster.md");
    let blocks: Vec<&str> = doc
        .split("```ini\n")
        .skip(1)
        .filter_map(|b| b.split_once("```").map(|(block, _)| block))
        .collect();
    for file in ["chatd-cluster.conf", "nats-server-jetstream.conf"] {
        let shipped = read(&format!("packaging/cluster/{file}"));
        assert!(
            blocks.contains(&shipped.as_str()),
            "docs/cluster.md has no ```ini block equal to packaging/cluster/{file}:\n{shipped}"
        );
    }
    let chatd = read("packaging/cluster/chatd-cluster.conf");
    for line in [
        "After=nats-server.service",
        "Wants=nats-server.service",
        "TimeoutStartSec=5min",
    ] {
        assert!(
            chatd.lines().any(|l| l == line),
            "chatd-cluster.conf lacks {line}"
        );
    }
    let cargo = read("chatd/Cargo.toml");
    for file in ["chatd-cluster.conf", "nats-server-jetstream.conf"] {
        assert!(
            cargo.contains(&format!(
                "[\"../packaging/cluster/{file}\", \"usr/share/doc/chatd/examples/\""
            )),
            "chatd/Cargo.toml does not install packaging/cluster/{file} as an example"
        );
    }
}
