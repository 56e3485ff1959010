//! potluck's network layer: identities, the libp2p host, and the DHT every other part of a
//! run coordinates through (progress, matchmaking, state donors, metrics).
//!
//! Nothing here knows about models: what travels is records and bytes.

pub mod auth;
pub mod dht;
pub mod direct;
pub mod frame;
pub mod host;
pub mod identity;
pub mod limit;
pub mod revoke;
