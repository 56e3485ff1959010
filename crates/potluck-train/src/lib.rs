//! Training in potluck, on flat buffers (no tensors here): the inner optimizers ([`optim`]),
//! checkpoints ([`checkpoint`]) and training on one machine ([`solo`]). The collaborative
//! optimizer joins this crate with the network.

pub mod checkpoint;
pub mod optim;
pub mod solo;
