//! The state protocol's messages: requests and answers, the manifest a donor describes its
//! state with, and the checks a manifest passes before anything is downloaded.
//!
//! Every message is a length-prefixed postcard frame ([`potluck_net::frame`]); a manifest and
//! a chunk's bytes follow their header as one raw frame. Every length is bounded by what the
//! receiver expects before anything is allocated.

use serde::{Deserialize, Serialize};

use super::Error;
use crate::optim::{self, Moments, Optimizer, Precision};

/// The protocol's name.
pub const PROTOCOL: &str = "/potluck/state/1";

/// Largest request or response header.
pub const MAX_CONTROL: usize = 1024;
/// Largest chunk a downloader accepts.
pub const MAX_CHUNK: usize = 16 << 20;
/// Largest state a downloader accepts (bounds the manifest's hash list too).
pub const MAX_STATE: u64 = 64 << 30;

/// What a donor's state is made of and how it is cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Optimizer steps the state has taken (the global epoch).
    pub epoch: u64,
    /// Samples the swarm trained on to reach it.
    pub samples: u64,
    /// The run's optimizer settings (rule, schedule, betas, decay…): a peer that joins adopts
    /// them, so every peer takes the same step.
    pub config: optim::Config,
    pub numel: u64,
    pub precision: Precision,
    /// Blockwise scales per moment (0 with `f32` moments).
    pub scales: u64,
    /// Bytes in all.
    pub total: u64,
    /// Bytes per chunk (the last may be shorter).
    pub chunk: u32,
    pub hashes: Vec<[u8; 32]>,
}

impl Manifest {
    /// The bytes of chunk `i`.
    pub(super) fn range(&self, i: usize) -> std::ops::Range<usize> {
        let start = i * self.chunk as usize;
        start..(start + self.chunk as usize).min(self.total as usize)
    }
}

/// What a downloader expects: its own model's size and optimizer's precision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub numel: u64,
    pub precision: Precision,
    pub scales: u64,
}

impl Shape {
    /// The shape of `optimizer`'s state (with parameters of the same length).
    pub fn of(optimizer: &Optimizer) -> Shape {
        let (precision, scales) = match optimizer.moments() {
            Moments::F32 { .. } => (Precision::F32, 0),
            Moments::Blockwise8 { m_scale, .. } => (Precision::Blockwise8, m_scale.len() as u64),
        };
        Shape {
            numel: optimizer.numel() as u64,
            precision,
            scales,
        }
    }

    /// Bytes of a state of this shape.
    pub fn bytes(&self) -> u64 {
        let n = self.numel;
        match self.precision {
            Precision::F32 => 12 * n,
            Precision::Blockwise8 => 4 * n + 2 * n + 8 * self.scales,
        }
    }
}

/// A downloader's request (postcard, at most [`MAX_CONTROL`] bytes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    Manifest,
    Chunk { epoch: u64, index: u32 },
}

/// A donor's answer (postcard, at most [`MAX_CONTROL`] bytes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    /// Followed by a frame holding the manifest (it can be larger than a control message).
    Manifest,
    /// Followed by a frame holding the chunk's bytes.
    Chunk,
    /// The donor holds no state, or a state of another epoch than asked for.
    Gone { epoch: Option<u64> },
    /// This peer took its share of the donor's upload for now: ask another donor, or this one
    /// again after this many seconds.
    Busy { retry_after_s: u32 },
}

/// Decodes a manifest a donor sent and checks it against what this peer expects (sizes,
/// chunking, one hash per chunk) before anything is downloaded.
pub fn decode_manifest(bytes: &[u8], shape: &Shape) -> Result<Manifest, Error> {
    let manifest: Manifest =
        postcard::from_bytes(bytes).map_err(|e| Error::Mismatch(format!("not a manifest: {e}")))?;
    check(&manifest, shape)?;
    Ok(manifest)
}

pub(super) fn check(manifest: &Manifest, shape: &Shape) -> Result<(), Error> {
    let mismatch = |why: String| Err(Error::Mismatch(why));
    if manifest.numel != shape.numel
        || manifest.precision != shape.precision
        || manifest.config.precision != shape.precision
        || manifest.scales != shape.scales
    {
        return mismatch(format!(
            "{} parameters with {:?} moments ({} scales); this model has {} with {:?} ({})",
            manifest.numel,
            manifest.precision,
            manifest.scales,
            shape.numel,
            shape.precision,
            shape.scales
        ));
    }
    if manifest.total != shape.bytes() || manifest.total > MAX_STATE {
        return mismatch(format!(
            "{} bytes, {} expected",
            manifest.total,
            shape.bytes()
        ));
    }
    manifest.config.check().map_err(Error::Mismatch)?;
    let chunk = manifest.chunk as usize;
    if chunk == 0 || chunk > MAX_CHUNK {
        return mismatch(format!("chunks of {chunk} bytes"));
    }
    if manifest.hashes.len() as u64 != manifest.total.div_ceil(chunk as u64) {
        return mismatch(format!(
            "{} hashes for {} bytes in chunks of {chunk}",
            manifest.hashes.len(),
            manifest.total
        ));
    }
    Ok(())
}

/// The most bytes a manifest of a state of `shape` can take on the wire (its hash list is
/// bounded by the largest state this peer would take).
pub(super) fn manifest_limit(shape: &Shape) -> usize {
    64 + 40 * (shape.bytes().div_ceil(1024) as usize + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::Snapshot;
    use crate::sync::test_state as optimizer;

    #[test]
    fn manifests_that_do_not_fit_are_refused() {
        let (params, opt) = optimizer(Precision::Blockwise8);
        let shape = Shape::of(&opt);
        let good = Snapshot::take(&params, &opt, 0, 4096).manifest();
        let bad = |f: &dyn Fn(&mut Manifest)| {
            let mut m = good.clone();
            f(&mut m);
            check(&m, &shape).is_err()
        };
        assert!(bad(&|m| m.numel += 1));
        assert!(bad(&|m| m.precision = Precision::F32));
        assert!(bad(&|m| m.total = u64::MAX));
        assert!(bad(&|m| m.chunk = 0));
        assert!(bad(&|m| m.chunk = u32::MAX));
        assert!(bad(&|m| {
            m.hashes.pop();
        }));
        // Settings that would wreck whoever adopts them.
        assert!(bad(&|m| m.config.schedule.peak = 1e30));
        assert!(bad(&|m| m.config.schedule.peak = f64::NAN));
        assert!(bad(&|m| m.config.beta2 = 1.0));
        assert!(bad(&|m| m.config.eps = 0.0));
        assert!(bad(&|m| m.config.weight_decay = -1.0));
        assert!(bad(&|m| m.config.max_grad_norm = f64::INFINITY));
        assert!(!bad(&|_| {}));
    }
}
