//! State sync and the spike guard among peers in one process, over libp2p's in-memory transport.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod decoders;
mod guard;
mod sync;
