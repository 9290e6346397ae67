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
    /// Server host name or address (default: from the config file, else asked for).
    pub host: Option<String>,

    /// Server TCP port (default: from the config file, else asked for).
    pub port: Option<u16>,

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
