//! Averaging flat `f32` buffers among peers: per-chunk compression codecs ([`codec`]), part
//! sizes from measured rates ([`balance`]), aggregation rules ([`aggregate`]) and the
//! butterfly all-reduce over the host's bulk streams ([`butterfly`]); groups form through the
//! DHT ([`matchmaking`]).
//!
//! Nothing here knows about models: what comes in is `f32` slices. The network it uses is
//! `potluck-net`'s: bulk streams of the host (or direct channels) for the all-reduce, the DHT
//! for matchmaking.

pub mod aggregate;
pub mod balance;
pub mod butterfly;
pub mod codec;
pub mod matchmaking;
