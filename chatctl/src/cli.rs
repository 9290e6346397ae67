//! chatctl's command line, kept free of other crates' types (clap and std only) so the man page
//! and completion generator can include this file as it is.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The exit-status and socket-lookup notes shown after `--help`.
pub const AFTER_HELP: &str = "\
Exit status:
  0  success
  1  other failure
  2  bad command line
  3  chatd is not running (no socket, or nobody listening)
  4  permission denied (not root, not chatd's user, not in the admin group)
  5  no such user (or, for unban, no such ban)
  6  invalid argument (empty, too long or multi-line text, a malformed ban target)
  7  reload failed: the new config was rejected and the old one stays in force
  8  protocol error (incompatible chatd version or garbled answer)
  9  chatd could not save its state (the ban list in server.state-dir); nothing changed

The socket is found by --socket, else $CHATD_SOCKET, else the first that exists of
$RUNTIME_DIRECTORY/chatd.sock, /run/chatd/chatd.sock, $XDG_RUNTIME_DIR/chatd.sock.";

/// Administer a running chatd: list users, kick, ban, announce, status, reload.
#[derive(Debug, Parser)]
#[command(name = "chatctl", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// Path of chatd's admin socket.
    #[arg(long, env = "CHATD_SOCKET", value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,
    /// Print the daemon's answer as one line of JSON (see docs/admin-protocol.md).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// One chatctl command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Users online, with address, connected-since and idle time.
    List,
    /// Disconnect a user; they and everyone else are told why.
    Kick {
        /// The user's name (case-insensitive).
        name: String,
        /// Why; shown to the user and the room.
        #[arg(long, short)]
        reason: Option<String>,
    },
    /// Send a server notice to every user.
    Announce {
        /// The notice; several words are joined with spaces.
        #[arg(required = true, num_args = 1..)]
        text: Vec<String>,
    },
    /// Uptime, users, counters, config path, listening addresses and version.
    Status,
    /// Re-read the config file (like SIGHUP) and report what changed or why it was rejected.
    Reload,
    /// Ban a name, an IP address or a CIDR block; matching users are disconnected at once and
    /// refused when they come back. Bans survive restarts.
    Ban {
        /// NAME, IP (192.0.2.7, 2001:db8::7) or CIDR block (192.0.2.0/24, 2001:db8::/48).
        target: String,
        /// How long, e.g. 30m, 2h, 7d; permanent when absent.
        #[arg(long, short, value_name = "DURATION")]
        duration: Option<String>,
        /// Why; shown to the banned user.
        #[arg(long, short)]
        reason: Option<String>,
    },
    /// Lift a ban, naming its target as it was banned.
    Unban {
        /// NAME, IP or CIDR block.
        target: String,
    },
    /// Bans in force, with reason and expiry.
    Bans,
}
