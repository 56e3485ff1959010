//! The DHT: hivemind's record semantics over Kademlia routing, on our own request–response
//! protocol (`/potluck/dht/1`).
//!
//! - [`record`]: records, subkeys, expiration, owner signatures, validators;
//! - [`store`]: a node's bounded local store and the merge rules;
//! - [`routing`]: the Kademlia routing table;
//! - [`typed`]: the typed records of a run (one Rust type per kind of key), published and
//!   read with [`typed::Owned`], checked by the store before storing;
//! - [`wire`]: the messages and their bounded encoding;
//! - [`node`]: a running node: answers requests, runs lookups, stores and gets.

pub use node::{Config, Dht, Error};

pub mod node;
pub mod record;
pub mod routing;
pub mod store;
pub mod typed;
pub mod wire;
