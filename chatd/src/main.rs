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
    // Once, before anything uses rustls (the TLS listener, the NATS client).
    chatd::tls::install_provider();
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
    // A certificate that cannot be used is a configuration error, named like one.
    let tls = match &effective.tls {
        Some(files) => match chatd::tls::Tls::new(files) {
            Ok(tls) => Some(Arc::new(tls)),
            Err(e) => {
                error!("{e}");
                eprintln!("chatd: {}: {e}", source.path.display());
                return ExitCode::from(EX_CONFIG);
            }
        },
        None => None,
    };
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
        // A cluster node's joins wait for NATS in `block_in_place`, which lends each waiting
        // worker's other tasks to a spare thread; in a join storm that is dozens of threads.
        // Let them go soon after the storm (tokio keeps idle ones 10 s by default), so their
        // stacks and allocator caches do not sit in the memory of an idle room.
        .thread_keep_alive(std::time::Duration::from_millis(500))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        let tls_addrs = effective.tls.as_ref().map(|t| t.listen.as_slice());
        let web_addrs = effective.web.as_ref().map(|w| w.listen.as_slice());
        let (plain, secure, web) = match listeners(&effective.server.listen, tls_addrs, web_addrs) {
            Ok(l) => l,
            Err(e) => {
                error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let (listeners, bound) = match register(plain) {
            Ok(l) => l,
            Err(e) => {
                error!(error = %e, "cannot register listener");
                return ExitCode::FAILURE;
            }
        };
        let (tls_listeners, tls_bound) = match register(secure) {
            Ok(l) => l,
            Err(e) => {
                error!(error = %e, "cannot register TLS listener");
                return ExitCode::FAILURE;
            }
        };
        let (web_listeners, web_bound) = match register(web) {
            Ok(l) => l,
            Err(e) => {
                error!(error = %e, "cannot register web listener");
                return ExitCode::FAILURE;
            }
        };
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
        let mut shared = Shared::new(config, source, bound, socket_path, bans, hooks);
        if let Some(tls) = tls {
            shared = shared.with_tls(tls, tls_bound);
        }
        let shared = Arc::new(shared.with_web(web_bound));
        // Beside `run`, not in it: it serves scrapes through the shutdown drain and stops after.
        let metrics_stop = tokio_util::sync::CancellationToken::new();
        let metrics = metrics_listener.map(|l| {
            tokio::spawn(chatd::metrics::serve(
                l,
                shared.clone(),
                metrics_stop.clone(),
            ))
        });
        chatd::run(
            shared,
            listeners,
            tls_listeners,
            web_listeners,
            admin_listener,
            events,
        )
        .await;
        metrics_stop.cancel();
        if let Some(metrics) = metrics {
            let _ = metrics.await;
        }
        ExitCode::SUCCESS
    });
    drop(runtime);
    code
}

/// The plain and the TLS chat listeners and the web listeners: the sockets systemd passed when
/// socket-activated (chatd.socket: the one named `tls` serves TLS, one named `web` the web
/// client, the others plain chat), else `server.listen`, `tls.listen` and `web.listen` bound
/// here. With `[tls]` (`[web]`) but no `tls` (`web`) socket passed, `tls.listen`
/// (`web.listen`) is bound here too. Sockets passed for another process are ignored.
type Listeners = Vec<std::net::TcpListener>;
fn listeners(
    configured: &[SocketAddr],
    tls: Option<&[SocketAddr]>,
    web: Option<&[SocketAddr]>,
) -> Result<(Listeners, Listeners, Listeners), String> {
    let (plain, secure, web_passed) = match systemd::take_listeners() {
        Ok(Some(passed)) => {
            let names: Vec<&str> = passed.iter().map(|(n, _)| n.as_str()).collect();
            info!(
                sockets = passed.len(),
                names = ?names,
                "socket activation: serving the sockets systemd passed; server.listen is not bound"
            );
            let (web_passed, passed): (Vec<_>, Vec<_>) = passed
                .into_iter()
                .partition(|(n, _)| n == systemd::WEB_SOCKET_NAME);
            let web_passed: Listeners = web_passed.into_iter().map(|(_, l)| l).collect();
            if !web_passed.is_empty() && web.is_none() {
                return Err(
                    "socket activation passed a socket named `web`, but the config has no [web] \
                     table"
                        .to_owned(),
                );
            }
            let (secure, plain): (Vec<_>, Vec<_>) = passed
                .into_iter()
                .partition(|(n, _)| n == systemd::TLS_SOCKET_NAME);
            let secure: Listeners = secure.into_iter().map(|(_, l)| l).collect();
            if !secure.is_empty() && tls.is_none() {
                return Err(
                    "socket activation passed a socket named `tls`, but the config has no [tls] \
                     table (certificate and private-key)"
                        .to_owned(),
                );
            }
            if plain.is_empty() {
                return Err("socket activation passed no plain chat socket".to_owned());
            }
            (
                plain.into_iter().map(|(_, l)| l).collect(),
                secure,
                web_passed,
            )
        }
        Ok(None) => (server::bind_all(configured)?, Vec::new(), Vec::new()),
        Err(e) => return Err(e.to_string()),
    };
    let secure = match tls {
        Some(addrs) if secure.is_empty() => {
            server::bind_all(addrs).map_err(|e| e.replace("server.listen", "tls.listen"))?
        }
        _ => secure,
    };
    let web = match web {
        Some(addrs) if web_passed.is_empty() => chatd::web::bind_all(addrs)?,
        _ => web_passed,
    };
    Ok((plain, secure, web))
}

/// Hands bound listeners to tokio; also returns the addresses they are bound to.
fn register(
    listeners: Listeners,
) -> std::io::Result<(Vec<tokio::net::TcpListener>, Vec<SocketAddr>)> {
    let mut out = Vec::new();
    let mut bound = Vec::new();
    for l in listeners {
        bound.push(l.local_addr()?);
        out.push(tokio::net::TcpListener::from_std(l)?);
    }
    Ok((out, bound))
}

/// Raises the soft open-files limit to the hard one, and says so.
fn raise_fd_limit() {
    match server::raise_fd_limit() {
        Ok(Some(limit)) => info!(limit, "raised the open-files limit"),
        Ok(None) => {}
        Err(e) => warn!(error = %e, "cannot raise the open-files limit"),
    }
}
