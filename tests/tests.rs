//! Integration tests: every test starts the real `chatd` binary on an ephemeral port with a
//! temporary config and admin socket, and talks to it over real sockets or through the real
//! `chatctl` and `chat-client` binaries. Every wait is bounded.

mod helper;

mod abuse;
mod admin;
mod bench;
mod chat;
mod client;
mod client_tty;
mod cluster;
mod config;
mod docs;
mod harness;
mod metrics;
mod notify;
mod proxy;
mod reclaim;
mod signals;
mod systemd;
mod tls;
mod web;
