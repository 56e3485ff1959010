//! Training in potluck, on flat buffers (no tensors here): the inner optimizers ([`optim`]),
//! checkpoints ([`checkpoint`]), training on one machine ([`solo`]) and the swarm's progress
//! over the DHT ([`progress`]). The collaborative optimizer joins this crate with the network.

pub mod checkpoint;
pub mod collab;
pub mod guard;
pub mod metrics;
pub mod optim;
pub mod progress;
pub mod reports;
pub mod solo;
pub mod sync;
