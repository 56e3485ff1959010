//! The DHT: hivemind's record semantics over Kademlia routing, on our own request–response
//! protocol (`/potluck/dht/1`).
//!
//! - [`record`]: records, subkeys, expiration, owner signatures, validators;
//! - [`store`]: a node's bounded local store and the merge rules;
//! - [`routing`]: the Kademlia routing table;
//! - [`wire`]: the messages and their bounded encoding;
//! - [`node`]: a running node: answers requests, runs lookups, stores and gets.

pub use node::{Config, Dht, Error, Refusing};

pub mod node;
pub mod record;
pub mod routing;
pub mod store;
pub mod wire;
