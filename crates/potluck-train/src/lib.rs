//! Training in potluck, on flat buffers (no tensors here): the inner optimizers ([`optim`]),
//! checkpoints, and the training loop on one machine. The collaborative optimizer joins this
//! crate with the network.

pub mod optim;
