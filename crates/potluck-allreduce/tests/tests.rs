//! The all-reduce among hosts in one process: the butterfly on libp2p's in-memory transport
//! and on loopback TCP, matchmaking over the DHT then averaging in the groups, a flood of DHT
//! requests during rounds, and the frame decoders on any bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod butterfly;
mod decoders;
mod flood;
mod matchmaking;
mod util;
