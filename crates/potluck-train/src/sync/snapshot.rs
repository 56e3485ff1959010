//! A training state as the state protocol sees it: one byte string (the parameters, then the
//! moments, little-endian), cut into chunks, each with its SHA-256.
//!
//! A donor's [`Snapshot`] shares the peer's live [`TrainState`] and encodes the bytes of a
//! chunk when a downloader asks for it: serving keeps no copy of the state, and nothing is
//! serialised until someone downloads (the chunks' hashes are computed on the first request
//! for the manifest, once per state). A downloader writes each chunk's bytes in place into the
//! state's buffers as it arrives ([`Values`]); the downloaded snapshot holds those, and
//! [`Snapshot::into_state`] moves them into a state with the downloader's own optimizer
//! layout.
//!
//! The byte string: `params` (f32 × n), then with `f32` moments `m` (f32 × n) and `v`
//! (f32 × n); with 8-bit moments `m` (u8 × n), `m_scale` (f32 × scales), `v` (u8 × n),
//! `v_scale` (f32 × scales).

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use sha2::{Digest, Sha256};

use super::wire::{MAX_CHUNK, Manifest, Shape};
use crate::optim::{self, Moments, Optimizer, Precision};
use crate::state::TrainState;

/// A training state to serve or just downloaded, with its chunking.
#[derive(Debug)]
pub struct Snapshot {
    pub epoch: u64,
    pub samples: u64,
    pub config: optim::Config,
    shape: Shape,
    chunk: usize,
    body: Body,
    hashes: OnceLock<Vec<[u8; 32]>>,
}

/// Where a snapshot's values are.
#[derive(Debug)]
enum Body {
    /// A peer's live state, shared with it.
    Shared(Arc<TrainState>),
    /// Values decoded from a download (the downloader brings the optimizer).
    Parts { params: Vec<f32>, moments: Moments },
}

/// One run of the byte string.
enum Section<'a> {
    F32(&'a [f32]),
    U8(&'a [u8]),
}

impl Section<'_> {
    fn bytes(&self) -> usize {
        match self {
            Section::F32(v) => 4 * v.len(),
            Section::U8(v) => v.len(),
        }
    }
}

fn sections<'a>(params: &'a [f32], moments: &'a Moments) -> Vec<Section<'a>> {
    match moments {
        Moments::F32 { m, v } => vec![Section::F32(params), Section::F32(m), Section::F32(v)],
        Moments::Blockwise8 {
            m,
            m_scale,
            v,
            v_scale,
        } => vec![
            Section::F32(params),
            Section::U8(m),
            Section::F32(m_scale),
            Section::U8(v),
            Section::F32(v_scale),
        ],
    }
}

/// Writes the bytes `range` of the byte string made of `sections` into `out` (cleared first).
fn read(sections: &[Section<'_>], range: Range<usize>, out: &mut Vec<u8>) {
    out.clear();
    let mut at = 0;
    for section in sections {
        let len = section.bytes();
        let (lo, hi) = (range.start.max(at), range.end.min(at + len));
        if lo < hi {
            let (lo, hi) = (lo - at, hi - at);
            match section {
                Section::U8(v) => out.extend_from_slice(&v[lo..hi]),
                Section::F32(v) => {
                    // Whole values, then the bytes of the first and last that the range cuts.
                    let first = lo / 4;
                    for (k, x) in v[first..hi.div_ceil(4)].iter().enumerate() {
                        let base = 4 * (first + k);
                        let bytes = x.to_le_bytes();
                        out.extend_from_slice(&bytes[lo.max(base) - base..hi.min(base + 4) - base]);
                    }
                }
            }
        }
        at += len;
    }
}

impl Snapshot {
    /// Serves `state` (shared, not copied) in chunks of `chunk` bytes.
    pub fn of(state: Arc<TrainState>, chunk: usize) -> Snapshot {
        Snapshot {
            epoch: state.epoch(),
            samples: state.samples,
            config: *state.optimizer.config(),
            shape: Shape::of(&state.optimizer),
            chunk: chunk.clamp(1, MAX_CHUNK),
            body: Body::Shared(state),
            hashes: OnceLock::new(),
        }
    }

    /// A copy of `params` and `optimizer`'s state, to be served in chunks of `chunk` bytes.
    pub fn take(params: &[f32], optimizer: &Optimizer, samples: u64, chunk: usize) -> Snapshot {
        let state = TrainState::new(params.to_vec(), optimizer.clone(), samples);
        Snapshot::of(Arc::new(state), chunk)
    }

    /// A downloaded state: `values` (every chunk of `manifest` written in, each checked
    /// against its hash on arrival).
    pub(super) fn downloaded(manifest: &Manifest, values: Values) -> Snapshot {
        Snapshot {
            epoch: manifest.epoch,
            samples: manifest.samples,
            config: manifest.config,
            shape: values.shape,
            chunk: manifest.chunk as usize,
            body: Body::Parts {
                params: values.params,
                moments: values.moments,
            },
            hashes: OnceLock::from(manifest.hashes.clone()),
        }
    }

    fn parts(&self) -> (&[f32], &Moments) {
        match &self.body {
            Body::Shared(state) => (&state.params, state.optimizer.moments()),
            Body::Parts { params, moments } => (params, moments),
        }
    }

    /// Bytes of the whole state.
    pub fn len(&self) -> usize {
        self.shape.bytes() as usize
    }

    /// Whether the state holds no bytes at all (a model without parameters).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes per chunk (the last may be shorter).
    pub(super) fn chunk(&self) -> usize {
        self.chunk
    }

    /// The bytes of chunk `index` (empty past the end) into `out`.
    pub(super) fn read_chunk(&self, index: usize, out: &mut Vec<u8>) {
        let (params, moments) = self.parts();
        let start = (index * self.chunk).min(self.len());
        let end = (start + self.chunk).min(self.len());
        read(&sections(params, moments), start..end, out);
    }

    /// The chunks' hashes (computed once, on first use).
    fn hashes(&self) -> &[[u8; 32]] {
        self.hashes.get_or_init(|| {
            let mut buf = Vec::with_capacity(self.chunk.min(self.len()));
            (0..self.len().div_ceil(self.chunk))
                .map(|i| {
                    self.read_chunk(i, &mut buf);
                    Sha256::digest(&buf).into()
                })
                .collect()
        })
    }

    /// The chunks' hashes if this state is of `epoch`, cut in chunks of `chunk` bytes and of
    /// `shape` (else None, and nothing is hashed).
    pub(super) fn manifest_if(
        &self,
        epoch: u64,
        chunk: usize,
        shape: Shape,
    ) -> Option<&[[u8; 32]]> {
        (self.epoch == epoch && self.chunk == chunk && self.shape == shape).then(|| self.hashes())
    }

    /// The manifest (hashes computed on first use).
    pub fn manifest(&self) -> Manifest {
        Manifest {
            epoch: self.epoch,
            samples: self.samples,
            config: self.config,
            numel: self.shape.numel,
            precision: self.shape.precision,
            scales: self.shape.scales,
            total: self.len() as u64,
            chunk: self.chunk as u32,
            hashes: self.hashes().to_vec(),
        }
    }

    /// Whether every parameter, moment and scale is finite (8-bit codes decode to finite
    /// values exactly when their scales are); else which part is not.
    pub fn check_finite(&self) -> Result<(), String> {
        let (params, moments) = self.parts();
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        if !finite(params) {
            return Err("a parameter".into());
        }
        let ok = match moments {
            Moments::F32 { m, v } => finite(m) && finite(v),
            Moments::Blockwise8 {
                m_scale, v_scale, ..
            } => finite(m_scale) && finite(v_scale),
        };
        if ok { Ok(()) } else { Err("a moment".into()) }
    }

    /// A copy of the parameters and moments it holds.
    pub fn state(&self) -> (Vec<f32>, Moments) {
        let (params, moments) = self.parts();
        (params.to_vec(), moments.clone())
    }

    /// Copies the state into `params` and `optimizer` (epoch, moments, settings).
    pub fn install(
        &self,
        params: &mut [f32],
        optimizer: &mut Optimizer,
    ) -> Result<(), optim::Error> {
        let (p, moments) = self.parts();
        if p.len() != params.len() {
            return Err(optim::Error::State {
                got: p.len(),
                want: params.len(),
            });
        }
        optimizer.restore(moments.clone(), self.epoch)?;
        optimizer.adopt(self.config)?;
        params.copy_from_slice(p);
        Ok(())
    }

    /// The state itself: a downloaded one's values moved into an optimizer laid out as
    /// `like` (this peer's), with the snapshot's epoch and settings; a served one's shared
    /// state (copied only if others still hold it).
    pub fn into_state(self, like: &Optimizer) -> Result<TrainState, optim::Error> {
        match self.body {
            Body::Shared(state) => Ok(Arc::unwrap_or_clone(state)),
            Body::Parts { params, moments } => {
                if params.len() != like.numel() {
                    return Err(optim::Error::State {
                        got: params.len(),
                        want: like.numel(),
                    });
                }
                let optimizer = like.restored(moments, self.epoch, self.config)?;
                Ok(TrainState::new(params, optimizer, self.samples))
            }
        }
    }
}

/// The values of a state being downloaded: each chunk's bytes are written in place as it
/// arrives (no chunk is kept), into buffers allocated zeroed (pages the kernel maps only as
/// they are written).
#[derive(Debug)]
pub(super) struct Values {
    shape: Shape,
    params: Vec<f32>,
    moments: Moments,
}

impl Values {
    pub(super) fn zeroed(shape: Shape) -> Values {
        let (n, s) = (shape.numel as usize, shape.scales as usize);
        let moments = match shape.precision {
            Precision::F32 => Moments::F32 {
                m: vec![0.0; n],
                v: vec![0.0; n],
            },
            Precision::Blockwise8 => Moments::Blockwise8 {
                m: vec![0; n],
                m_scale: vec![0.0; s],
                v: vec![0; n],
                v_scale: vec![0.0; s],
            },
        };
        Values {
            shape,
            params: vec![0.0; n],
            moments,
        }
    }

    pub(super) fn shape(&self) -> Shape {
        self.shape
    }

    /// Writes `bytes`, the bytes `start..` of the state's byte string, in place.
    pub(super) fn write(&mut self, start: usize, bytes: &[u8]) {
        let end = start + bytes.len();
        let mut at = 0;
        for section in sections_mut(&mut self.params, &mut self.moments) {
            let len = section.bytes();
            let (lo, hi) = (start.max(at), end.min(at + len));
            if lo < hi {
                let src = &bytes[lo - start..hi - start];
                let (lo, hi) = (lo - at, hi - at);
                match section {
                    SectionMut::U8(v) => v[lo..hi].copy_from_slice(src),
                    SectionMut::F32(v) => {
                        // A value the chunk cuts keeps the bytes another chunk brings.
                        let mut taken = 0;
                        for (k, x) in v[lo / 4..hi.div_ceil(4)].iter_mut().enumerate() {
                            let base = 4 * (lo / 4 + k);
                            let (from, to) = (lo.max(base) - base, hi.min(base + 4) - base);
                            let mut b = x.to_le_bytes();
                            b[from..to].copy_from_slice(&src[taken..taken + to - from]);
                            taken += to - from;
                            *x = f32::from_le_bytes(b);
                        }
                    }
                }
            }
            at += len;
        }
    }
}

/// One run of the byte string, to write into.
enum SectionMut<'a> {
    F32(&'a mut [f32]),
    U8(&'a mut [u8]),
}

impl SectionMut<'_> {
    fn bytes(&self) -> usize {
        match self {
            SectionMut::F32(v) => 4 * v.len(),
            SectionMut::U8(v) => v.len(),
        }
    }
}

fn sections_mut<'a>(params: &'a mut [f32], moments: &'a mut Moments) -> Vec<SectionMut<'a>> {
    match moments {
        Moments::F32 { m, v } => vec![
            SectionMut::F32(params),
            SectionMut::F32(m),
            SectionMut::F32(v),
        ],
        Moments::Blockwise8 {
            m,
            m_scale,
            v,
            v_scale,
        } => vec![
            SectionMut::F32(params),
            SectionMut::U8(m),
            SectionMut::F32(m_scale),
            SectionMut::U8(v),
            SectionMut::F32(v_scale),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::test_state as optimizer;
    use crate::sync::wire::check;

    /// The whole byte string of a snapshot, chunk by chunk.
    fn bytes(snap: &Snapshot) -> Vec<u8> {
        let mut all = Vec::new();
        let mut buf = Vec::new();
        for i in 0..snap.len().div_ceil(snap.chunk) {
            snap.read_chunk(i, &mut buf);
            all.extend_from_slice(&buf);
        }
        all
    }

    #[test]
    fn a_snapshot_installs_the_same_state_for_both_precisions() {
        for precision in [Precision::F32, Precision::Blockwise8] {
            let (params, opt) = optimizer(precision);
            let snap = Snapshot::take(&params, &opt, 42, 1000);
            assert_eq!(bytes(&snap).len() as u64, Shape::of(&opt).bytes());
            let m = snap.manifest();
            assert_eq!((m.epoch, m.samples), (3, 42));
            check(&m, &Shape::of(&opt)).unwrap();
            let (_, mut fresh) = optimizer(precision);
            fresh.set_steps(0);
            let mut p = vec![0.0; params.len()];
            snap.install(&mut p, &mut fresh).unwrap();
            assert_eq!(p, params);
            assert_eq!(fresh.moments(), opt.moments());
            assert_eq!(fresh.steps(), 3);
        }
    }

    /// Chunks of any size, cutting values anywhere, written in any order, give back the state
    /// they were read from, with the downloader's optimizer layout and the snapshot's epoch
    /// and settings.
    #[test]
    fn chunks_cut_anywhere_decode_to_the_state_served() {
        for precision in [Precision::F32, Precision::Blockwise8] {
            let (params, opt) = optimizer(precision);
            let shape = Shape::of(&opt);
            for chunk in [1, 3, 5, 4096, 1 << 20] {
                let snap = Snapshot::take(&params, &opt, 42, chunk);
                let manifest = snap.manifest();
                let all = bytes(&snap);
                let mut values = Values::zeroed(shape);
                for (i, c) in all.chunks(chunk).enumerate().rev() {
                    values.write(i * chunk, c);
                }
                let got = Snapshot::downloaded(&manifest, values);
                assert_eq!(got.manifest(), manifest, "{precision:?}, chunk {chunk}");
                let (_, mut like) = optimizer(precision);
                like.set_steps(0);
                let state = got.into_state(&like).unwrap();
                assert_eq!(state.params, params);
                assert_eq!(state.optimizer.moments(), opt.moments());
                assert_eq!((state.epoch(), state.samples), (3, 42));
            }
        }
    }
}
