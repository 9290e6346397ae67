//! chatd's command line, kept free of other crates' types (clap and std only) so the man page
//! and completion generator (`chatd-gen-assets`) can include this file as it is.

use std::path::PathBuf;

/// What `chatd --help` ends with: how the daemon meets systemd and where its files are.
pub const AFTER_HELP: &str = "\
Under systemd (see chatd.service), chatd reports readiness, reloads and shutdown with
sd_notify, feeds the watchdog, logs to the journal with CHAT_* fields, and adopts the
listening sockets of chatd.socket when socket-activated. Outside systemd all of that is off.

Signals:
  SIGHUP   re-read the config file (same as `chatctl reload` and `systemctl reload chatd`)
  SIGTERM  tell every user, drain for server.shutdown-grace, exit 0

Exit status: 0 after a clean shutdown, 1 if it cannot start (a port or socket cannot be bound,
the ban list cannot be read), 78 if the config is invalid.";

/// chatd: a chatroom daemon, served on TCP and administered over a Unix socket with chatctl.
#[derive(Debug, clap::Parser)]
#[command(name = "chatd", version, after_help = AFTER_HELP)]
pub struct Args {
    /// Config file. Without it, /etc/chatd/chatd.toml is used if it exists, else built-in
    /// defaults.
    #[arg(short, long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Validate the config, print it with every default filled in, and exit (0 valid, 1 not).
    #[arg(long)]
    pub check_config: bool,
}
