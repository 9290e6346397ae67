//! SIGHUP reloads and SIGTERM shutdown.
