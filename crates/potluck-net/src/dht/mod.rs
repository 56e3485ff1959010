//! The DHT: hivemind's record semantics over Kademlia routing, on our own request–response
//! protocol (`/potluck/dht/1`), which the host carries without knowing it.
//!
//! - [`record`]: records, subkeys, expiration, owner signatures, validators;
//! - [`store`]: a node's bounded local store and the merge rules;
//! - [`routing`]: the Kademlia routing table;
//! - [`typed`]: the typed records of a run (one Rust type per kind of key), published and
//!   read with [`typed::Owned`], checked by the store before storing;
//! - [`wire`]: the messages and their bounded encoding; asking a peer;
//! - [`node`]: a running node ([`Dht`]) and the state its parts share;
//! - `serve`: answering requests from the store and the routing table;
//! - `lookup`: iterative lookups, and the joins, stores and gets they drive.

pub use node::{Config, Dht, Error};
pub use serve::Refusing;

mod lookup;
pub mod node;
pub mod record;
pub mod routing;
mod serve;
pub mod store;
pub mod typed;
pub mod wire;
