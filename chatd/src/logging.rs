//! Logging setup: journald (native protocol, structured fields) when stderr is connected to the
//! journal, human-readable stderr otherwise. The filter can be swapped at reload time, unless
//! `RUST_LOG` is set, which always wins.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Changes the log filter of the running process.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set: the config's level is ignored.
    env_override: bool,
}

impl LogControl {
    /// Applies `level` (`tracing` filter directives) unless `RUST_LOG` overrides it.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        if self.env_override {
            return Ok(());
        }
        let filter = EnvFilter::builder()
            .parse(level)
            .map_err(|e| format!("log.level: {e}"))?;
        self.handle
            .reload(filter)
            .map_err(|e| format!("log.level: {e}"))
    }
}

/// Whether stderr is the journal's stream (systemd sets `JOURNAL_STREAM=dev:inode` for it).
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(expected) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    expected.to_string_lossy() == format!("{}:{}", meta.dev(), meta.ino())
}

/// Installs the global subscriber with `level` as the initial filter.
pub fn init(level: &str) -> LogControl {
    let env = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
    let env_override = env.is_some();
    let filter = EnvFilter::builder()
        .parse(env.as_deref().unwrap_or(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);

    let journald = if stderr_is_journal() {
        // Fields get the CHAT_ prefix: `user` is queryable as `journalctl CHAT_USER=alice`.
        tracing_journald::layer()
            .ok()
            .map(|l| l.with_field_prefix(Some("CHAT".to_owned())))
    } else {
        None
    };
    let stderr = journald.is_none().then(|| {
        use std::io::IsTerminal;
        let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(color)
            .with_target(false)
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr)
        .try_init();
    LogControl {
        handle,
        env_override,
    }
}
