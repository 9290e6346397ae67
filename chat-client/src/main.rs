//! `chat-client`: a terminal client for the chatd chatroom. Arguments are in `cli.rs`, the
//! client's life (connect, name, chat, reconnect) in `app.rs`, display in `render.rs`, and the
//! interactive line editor in `editor.rs`. See docs/client.md.

mod app;
mod cli;
mod config;
mod editor;
mod net;
mod pace;
mod render;
mod roster;
mod ui;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    // Once, before any TLS: the process-wide rustls provider is ring, as in every program here.
    let _ = rustls::crypto::CryptoProvider::clone(&net::provider()).install_default();
    let config = match config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chat-client: {e:#}");
            std::process::exit(app::exit::ERROR);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chat-client: cannot start: {e}");
            std::process::exit(app::exit::ERROR);
        }
    };
    let code = runtime.block_on(async {
        restore_terminal_on_signals();
        let mut ui_settings = config.ui.clone();
        if cli.no_bell {
            ui_settings.bell = false;
        }
        match ui::Ui::new(!cli.no_color, ui_settings) {
            Ok(ui) => app::run(cli, config, ui).await,
            Err(e) => {
                eprintln!("chat-client: cannot set up the terminal: {e}");
                app::exit::ERROR
            }
        }
    });
    // The key-reading thread may still sit in a blocking read; exiting here ends it.
    std::process::exit(code);
}

/// SIGTERM and SIGHUP (the terminal went away) end the client; give the terminal back out of
/// raw mode first, so the user's shell is usable again.
fn restore_terminal_on_signals() {
    use std::io::Write;
    use tokio::signal::unix::{SignalKind, signal};
    for (kind, number) in [(SignalKind::terminate(), 15), (SignalKind::hangup(), 1)] {
        let Ok(mut sig) = signal(kind) else { continue };
        tokio::spawn(async move {
            if sig.recv().await.is_some() {
                let _ =
                    crossterm::execute!(std::io::stdout(), crossterm::event::DisableBracketedPaste);
                let _ = crossterm::terminal::disable_raw_mode();
                // Not eprintln!: after a hangup stderr is a dead terminal, and eprintln!
                // panics on a failed write, which would end this task instead of the process
                // (and leave crossterm's reader spinning on the closed tty).
                let _ = writeln!(std::io::stderr(), "\r\nchat-client: stopped by a signal");
                std::process::exit(128 + number);
            }
        });
    }
}
