//! The `chatd` binary: arguments → config → logging → sockets → [`chatd::run`] → exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing::{error, info, warn};

use chat_proto::admin as proto;
use chatd::admin;
use chatd::config::DEFAULT_CONFIG_PATH;
use chatd::shared::{ApplyHook, ConfigSource, Shared};
use chatd::{logging, server, signals, systemd};

mod cli;
use cli::Args;

/// Exit status for a configuration error at startup (sysexits EX_CONFIG).
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let args = Args::parse();
    let source = ConfigSource {
        path: args
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
        explicit: args.config.is_some(),
    };
    let config = match source.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chatd: {e}");
            return ExitCode::from(if args.check_config { 1 } else { EX_CONFIG });
        }
    };
    if args.check_config {
        match &config {
            Some(_) => eprintln!("chatd: {}: config OK", source.path.display()),
            None => eprintln!(
                "chatd: {} does not exist; built-in defaults apply",
                source.path.display()
            ),
        }
        print!("{}", config.clone().unwrap_or_default().to_toml());
        return ExitCode::SUCCESS;
    }
    let effective = config.clone().unwrap_or_default();
    let log = logging::init(effective.log.level.as_str());
    match &config {
        Some(_) => info!(config = %source.path.display(), "config loaded"),
        None => info!(
            config = %source.path.display(),
            "no config file; running on built-in defaults"
        ),
    }
    raise_fd_limit();
    let state_dir = if effective.server.state_dir.as_os_str().is_empty() {
        chatd::bans::default_state_dir(nix::unistd::geteuid().is_root())
    } else {
        effective.server.state_dir.clone()
    };
    let bans = match chatd::bans::Bans::load(&state_dir) {
        Ok(b) => b,
        Err(e) => {
            error!("cannot load bans: {e}");
            return ExitCode::FAILURE;
        }
    };
    info!(bans = bans.active().len(), file = %bans.path().display(), "ban list loaded");

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        let std_listeners = match listeners(&effective.server.listen) {
            Ok(l) => l,
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let mut listeners = Vec::new();
        let mut bound = Vec::new();
        for l in std_listeners {
            match l.local_addr().and_then(|a| {
                bound.push(a);
                tokio::net::TcpListener::from_std(l)
            }) {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    error!(error = %e, "cannot register listener");
                    return ExitCode::FAILURE;
                }
            }
        }
        let metrics_listener = match &effective.metrics {
            Some(m) => {
                match chatd::metrics::bind(m.listen).and_then(tokio::net::TcpListener::from_std) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        error!("cannot listen on {} (metrics.listen): {e}", m.listen);
                        return ExitCode::FAILURE;
                    }
                }
            }
            None => None,
        };
        let socket_path = if effective.admin.socket.as_os_str().is_empty() {
            proto::default_socket_path(nix::unistd::geteuid().is_root())
        } else {
            effective.admin.socket.clone()
        };
        let admin_listener =
            match admin::bind(&socket_path, effective.admin.mode.0, &effective.admin.group) {
                Ok(a) => a,
                Err(e) => {
                    error!("cannot create admin socket: {e}");
                    return ExitCode::FAILURE;
                }
            };
        let events = match signals::listen() {
            Ok(rx) => rx,
            Err(e) => {
                error!(error = %e, "cannot install signal handlers");
                return ExitCode::FAILURE;
            }
        };
        let hooks: Vec<ApplyHook> = vec![
            Box::new(move |c| log.set_level(c.log.level.as_str())),
            Box::new({
                let path = socket_path.clone();
                move |c| {
                    admin::apply_permissions(&path, c.admin.mode.0, &c.admin.group)
                        .map_err(|e| e.to_string())
                }
            }),
        ];
        let shared = Arc::new(Shared::new(config, source, bound, socket_path, bans, hooks));
        // Beside `run`, not in it: it serves scrapes through the shutdown drain and stops after.
        let metrics_stop = tokio_util::sync::CancellationToken::new();
        let metrics = metrics_listener.map(|l| {
            tokio::spawn(chatd::metrics::serve(
                l,
                shared.clone(),
                metrics_stop.clone(),
            ))
        });
        chatd::run(shared, listeners, admin_listener, events).await;
        metrics_stop.cancel();
        if let Some(metrics) = metrics {
            let _ = metrics.await;
        }
        ExitCode::SUCCESS
    });
    drop(runtime);
    code
}

/// The chat listeners: the sockets systemd passed when socket-activated (chatd.socket), else
/// `server.listen` bound here. Sockets passed for another process are ignored.
fn listeners(configured: &[SocketAddr]) -> Result<Vec<std::net::TcpListener>, String> {
    match systemd::take_listeners() {
        Ok(Some(passed)) => {
            let names: Vec<&str> = passed.iter().map(|(n, _)| n.as_str()).collect();
            info!(
                sockets = passed.len(),
                names = ?names,
                "socket activation: serving the sockets systemd passed; server.listen is not bound"
            );
            Ok(passed.into_iter().map(|(_, l)| l).collect())
        }
        Ok(None) => server::bind_all(configured),
        Err(e) => Err(e.to_string()),
    }
}

/// Raises the soft open-files limit to the hard one, and says so.
fn raise_fd_limit() {
    match server::raise_fd_limit() {
        Ok(Some(limit)) => info!(limit, "raised the open-files limit"),
        Ok(None) => {}
        Err(e) => warn!(error = %e, "cannot raise the open-files limit"),
    }
}
