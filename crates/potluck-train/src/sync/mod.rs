//! State sync: a peer that joins a run, or that fell behind, downloads the swarm's training
//! state (parameters, optimizer moments, epoch, optimizer settings) from several donors at once over
//! `/potluck/state/1` bulk streams.
//!
//! Every peer that trains is a donor of its last epoch's state: after each step it puts a
//! [`Snapshot`] of its [`TrainState`](crate::state::TrainState) on its [`Shelf`] (the state
//! itself, shared; a chunk's bytes are encoded when a downloader asks for it). A downloader
//! asks every donor for the manifest (the state's shape, the epoch and a SHA-256 per chunk),
//! checks each against the shape it expects and takes the one most donors agree on, then
//! fetches chunks from those donors in parallel, each checked against the manifest's hash.
//! Donors serve while they go on training and averaging.
//!
//! - `wire`: the protocol's messages, the manifest and its checks;
//! - `snapshot`: a state as one byte string cut into hashed chunks, encoded and decoded;
//! - `serve`: the donor's side;
//! - `download`: the downloader's side.

mod download;
pub(crate) mod serve;
mod snapshot;
mod wire;

pub use download::{ConfigWanted, Donor, Partial, Report, Settings, Want, download};
pub use serve::{Serving, Shelf, serve};
pub use snapshot::Snapshot;
pub use wire::{
    MAX_CHUNK, MAX_CONTROL, MAX_STATE, Manifest, PROTOCOL, Request, Response, Shape,
    decode_manifest,
};

use potluck_net::host;

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no donor to download from (the peers that report holding the run's state could not be \
         reached: they may have left, or the run ended; try again, or start the run anew from \
         a checkpoint with --init)"
    )]
    NoDonors,
    #[error("no donor sent a manifest: {0}")]
    NoManifest(String),
    /// Donors offered another state than they claimed to hold or with other optimizer
    /// settings than the run's, and no other donor offered one that fits.
    #[error(
        "no donor offered the state it claimed: {}{}",
        donors.iter().map(|(p, why)| format!("{p}: {why}")).collect::<Vec<_>>().join("; "),
        others.iter().map(|o| format!("; {o}")).collect::<String>()
    )]
    Unlike {
        donors: Vec<(libp2p::PeerId, String)>,
        others: Vec<String>,
    },
    /// Donors of one epoch served different states, and no state had more of them than
    /// another: which one is the swarm's cannot be told (one may be a liar's). Nothing is
    /// installed and no donor is blamed; more donors decide it later.
    #[error(
        "the {donors} donors of epoch {epoch} serve {states} different states, none of them \
         more donors than another: not installed (more donors will tell which is the swarm's)"
    )]
    Tied {
        epoch: u64,
        donors: usize,
        states: usize,
    },
    #[error("the donor's state does not fit this model: {0}")]
    Mismatch(String),
    /// Every chunk matched its hash, but the state holds values no training reaches: its
    /// donors agreed on a broken state; it is not installed.
    #[error("the downloaded state is not finite ({0}); not installed")]
    NotFinite(String),
    #[error("{got} of {total} chunks downloaded before every donor dropped out")]
    Incomplete { got: usize, total: usize },
    #[error(transparent)]
    Host(#[from] host::Error),
}

/// A small model's parameters and an optimizer that took three steps on them (unit tests).
#[cfg(test)]
pub(crate) fn test_state(
    precision: crate::optim::Precision,
) -> (Vec<f32>, crate::optim::Optimizer) {
    use crate::optim::{Config, Optimizer, Rule};
    use potluck_core::{Layout, Role};
    let layout = Layout::new([
        ("w", vec![70, 100], Role::Weight),
        ("b", vec![100], Role::Bias),
    ])
    .unwrap();
    let cfg = Config {
        precision,
        rule: Rule::Lamb,
        ..Config::reference_lamb()
    };
    let mut opt = Optimizer::new(cfg, &layout);
    let mut params: Vec<f32> = (0..layout.numel()).map(|i| (i as f32).sin()).collect();
    let mut grad: Vec<f32> = (0..layout.numel()).map(|i| (i as f32).cos()).collect();
    for _ in 0..3 {
        opt.step(&mut params, &mut grad.clone()).unwrap();
        grad.iter_mut().for_each(|g| *g *= 0.5);
    }
    (params, opt)
}
