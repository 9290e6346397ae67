//! Command-line arguments of `chat-client`. Depends only on clap and std because the man-page
//! generator includes this file by path.

use std::path::PathBuf;

/// A terminal client for the chatd chatroom.
///
/// On a terminal, missing values are asked for (server address, port, name). With standard
/// input from a pipe nothing is asked: the first input line is the name unless --name is given,
/// every other line is sent as a message, and end of input leaves the room.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "chat-client", version)]
pub struct Cli {
    /// Server host name or address, or `chats://HOST[:PORT]` for TLS (default: from the config
    /// file, else asked for).
    pub host: Option<String>,

    /// Server TCP port (default: from the config file, else asked for; 42070 for `chats://`).
    pub port: Option<u16>,

    /// Connect with TLS and verify the server's certificate against the system's trusted
    /// roots and the host name; never falls back to plaintext.
    #[arg(long)]
    pub tls: bool,

    /// With TLS, trust the CA certificates (PEM) in FILE instead of the system's roots, for a
    /// server whose certificate a private CA issued. Implies --tls.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// Name to chat as (default on a terminal: asked for, offering the config file's name).
    #[arg(long, short = 'n', value_name = "NAME")]
    pub name: Option<String>,

    /// Do not reconnect automatically after the connection to the server is lost.
    #[arg(long)]
    pub no_reconnect: bool,

    /// Client config file (default: $XDG_CONFIG_HOME/chatd/client.toml or
    /// ~/.config/chatd/client.toml; a missing default file is not an error).
    #[arg(long, short = 'c', value_name = "FILE", env = "CHAT_CLIENT_CONFIG")]
    pub config: Option<PathBuf>,

    /// Never use colours (the NO_COLOR environment variable does the same).
    #[arg(long)]
    pub no_color: bool,

    /// Do not ring the terminal bell when someone mentions your name.
    #[arg(long)]
    pub no_bell: bool,
}
