//! chatctl against a live daemon.
