//! Many DHT nodes in one process over libp2p's in-memory transport.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod auth;
mod decoders;
mod host;
mod swarm;
