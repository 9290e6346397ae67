//! `--config` and `--check-config`.
