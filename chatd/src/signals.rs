//! Process signals as daemon events, through `signal-hook` on a dedicated thread.
//!
//! Handlers are installed before the daemon reports itself ready, because SIGHUP's default
//! action would kill it. Signals coalesce: one `Reload` may stand for several SIGHUPs, which is
//! fine since a reload is idempotent.

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tokio::sync::mpsc;

/// What a signal asks the daemon to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGHUP: re-read the config.
    Reload,
    /// SIGTERM or SIGINT: shut down gracefully.
    Shutdown,
}

/// Installs the handlers and returns the stream of events.
pub fn listen() -> std::io::Result<mpsc::Receiver<Event>> {
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT])?;
    let (tx, rx) = mpsc::channel(16);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let event = if sig == SIGHUP {
                    Event::Reload
                } else {
                    Event::Shutdown
                };
                if tx.blocking_send(event).is_err() {
                    break;
                }
            }
        })?;
    Ok(rx)
}
