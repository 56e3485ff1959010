//! Averaging flat `f32` buffers among peers: per-chunk compression codecs ([`codec`]), part
//! sizes from measured rates ([`balance`]) and aggregation rules ([`aggregate`]); the
//! butterfly all-reduce and matchmaking build on these.
//!
//! Nothing here knows about models or networks: what comes in is `f32` slices and bytes.

pub mod aggregate;
pub mod balance;
pub mod codec;
