//! The chat protocol over real TCP.
