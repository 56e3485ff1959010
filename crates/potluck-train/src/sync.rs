//! State sync: a peer that joins a run, or that fell behind, downloads the swarm's training
//! state (parameters, optimizer moments, epoch, optimizer settings) from several donors at once over
//! `/potluck/state/1` bulk streams.
//!
//! Every peer that trains is a donor of its last epoch's state: after each step it publishes a
//! [`Snapshot`] (a copy of the state as one byte string, cut into chunks). A downloader asks
//! one donor for the manifest (the state's shape, the epoch and a SHA-256 per chunk), checks
//! it against the shape it expects, then fetches chunks from every donor in parallel, each
//! checked against the manifest's hash. A donor that drops, stalls, moves on to a newer epoch
//! or sends a chunk that does not match leaves its chunks to the others; a chunk already
//! received is never fetched again ([`Partial`] carries them into a retry). Donors serve from
//! their snapshot while they go on training and averaging.
//!
//! On the wire every message is a length-prefixed postcard frame ([`potluck_net::frame`]); a
//! chunk's bytes follow its header as one raw frame. Every length is bounded by what the
//! receiver expects before anything is allocated.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, PeerId, Stream};
use potluck_net::frame::{read_frame, read_message, write_frame, write_message};
use potluck_net::host::{self, Host};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::optim::{self, Moments, Optimizer, Precision};

/// The protocol's name.
pub const PROTOCOL: &str = "/potluck/state/1";

/// Largest request or response header.
pub const MAX_CONTROL: usize = 1024;
/// Largest chunk a downloader accepts.
pub const MAX_CHUNK: usize = 16 << 20;
/// Largest state a downloader accepts (bounds the manifest's hash list too).
pub const MAX_STATE: u64 = 64 << 30;
/// Donors fetched from at once.
const MAX_DONORS: usize = 8;

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
    fn range(&self, i: usize) -> std::ops::Range<usize> {
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
    #[error("the donor's state does not fit this model: {0}")]
    Mismatch(String),
    #[error("{got} of {total} chunks downloaded before every donor dropped out")]
    Incomplete { got: usize, total: usize },
    #[error(transparent)]
    Host(#[from] host::Error),
}

/// Training state as one byte string, with its manifest.
#[derive(Debug)]
pub struct Snapshot {
    pub epoch: u64,
    pub samples: u64,
    pub config: optim::Config,
    shape: Shape,
    chunk: usize,
    bytes: Vec<u8>,
    hashes: OnceLock<Vec<[u8; 32]>>,
}

fn put_f32s(out: &mut Vec<u8>, values: &[f32]) {
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

impl Snapshot {
    /// Copies `params` and `optimizer`'s state, to be served in chunks of `chunk` bytes.
    pub fn take(params: &[f32], optimizer: &Optimizer, samples: u64, chunk: usize) -> Snapshot {
        let shape = Shape::of(optimizer);
        let mut bytes = Vec::with_capacity(shape.bytes() as usize);
        put_f32s(&mut bytes, params);
        match optimizer.moments() {
            Moments::F32 { m, v } => {
                put_f32s(&mut bytes, m);
                put_f32s(&mut bytes, v);
            }
            Moments::Blockwise8 {
                m,
                m_scale,
                v,
                v_scale,
            } => {
                bytes.extend_from_slice(m);
                put_f32s(&mut bytes, m_scale);
                bytes.extend_from_slice(v);
                put_f32s(&mut bytes, v_scale);
            }
        }
        Snapshot {
            epoch: optimizer.steps(),
            samples,
            config: *optimizer.config(),
            shape,
            chunk: chunk.clamp(1, MAX_CHUNK),
            bytes,
            hashes: OnceLock::new(),
        }
    }

    /// The chunks' hashes (computed once, on first use).
    fn hashes(&self) -> &[[u8; 32]] {
        self.hashes.get_or_init(|| {
            self.bytes
                .chunks(self.chunk)
                .map(|c| Sha256::digest(c).into())
                .collect()
        })
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
            total: self.bytes.len() as u64,
            chunk: self.chunk as u32,
            hashes: self.hashes().to_vec(),
        }
    }

    /// The parameters and moments it holds.
    pub fn state(&self) -> (Vec<f32>, Moments) {
        let n = self.shape.numel as usize;
        let s = self.shape.scales as usize;
        let (params, rest) = self.bytes.split_at(4 * n);
        let moments = match self.shape.precision {
            Precision::F32 => {
                let (m, v) = rest.split_at(4 * n);
                Moments::F32 {
                    m: f32s(m),
                    v: f32s(v),
                }
            }
            Precision::Blockwise8 => {
                let (m, rest) = rest.split_at(n);
                let (m_scale, rest) = rest.split_at(4 * s);
                let (v, v_scale) = rest.split_at(n);
                Moments::Blockwise8 {
                    m: m.to_vec(),
                    m_scale: f32s(m_scale),
                    v: v.to_vec(),
                    v_scale: f32s(v_scale),
                }
            }
        };
        (f32s(params), moments)
    }

    /// Installs the state into `params` and `optimizer` (epoch, moments, settings).
    pub fn install(
        &self,
        params: &mut [f32],
        optimizer: &mut Optimizer,
    ) -> Result<(), crate::optim::Error> {
        let (p, moments) = self.state();
        if p.len() != params.len() {
            return Err(crate::optim::Error::State {
                got: p.len(),
                want: params.len(),
            });
        }
        optimizer.restore(moments, self.epoch)?;
        optimizer.adopt(self.config)?;
        params.copy_from_slice(&p);
        Ok(())
    }
}

/// The state this peer serves; replaced after every step.
#[derive(Debug, Clone, Default)]
pub struct Shelf(Arc<Mutex<Option<Arc<Snapshot>>>>);

impl Shelf {
    pub fn put(&self, snapshot: Snapshot) {
        *lock(&self.0) = Some(Arc::new(snapshot));
    }

    pub fn get(&self) -> Option<Arc<Snapshot>> {
        lock(&self.0).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
}

/// How a donor serves (fault injection for tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct Serving {
    /// Vanish (close every stream, answer nothing more) after serving this many chunks.
    pub vanish_after: Option<usize>,
    /// Wait this long before each chunk (a slow donor).
    pub delay: Option<Duration>,
}

/// Serves `shelf` on `host` until the host stops. Each stream answers requests in order.
pub fn serve(host: &Host, shelf: Shelf, serving: Serving) -> Result<(), host::Error> {
    let mut incoming = host.accept(PROTOCOL)?;
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            let (shelf, served) = (shelf.clone(), served.clone());
            tokio::spawn(async move {
                if let Err(e) = answer(stream, shelf, serving, served).await {
                    tracing::debug!("state stream from {peer} ended: {e}");
                }
            });
        }
    });
    Ok(())
}

/// How long a donor waits for the next request on an open stream.
const IDLE: Duration = Duration::from_secs(60);

async fn answer(
    mut stream: Stream,
    shelf: Shelf,
    serving: Serving,
    served: Arc<std::sync::atomic::AtomicUsize>,
) -> std::io::Result<()> {
    loop {
        let request = match tokio::time::timeout(IDLE, read_message(&mut stream, MAX_CONTROL)).await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        let snapshot = shelf.get();
        match (request, snapshot) {
            (Request::Manifest, Some(s)) => {
                // Hashing a large state takes a while: off the async workers.
                let manifest = tokio::task::spawn_blocking(move || s.manifest())
                    .await
                    .map_err(std::io::Error::other)?;
                let bytes = postcard::to_allocvec(&manifest).map_err(std::io::Error::other)?;
                write_message(&mut stream, &Response::Manifest).await?;
                write_frame(&mut stream, &[&bytes]).await?;
            }
            (Request::Chunk { epoch, index }, Some(s))
                if s.epoch == epoch && (index as usize) * s.chunk < s.bytes.len() =>
            {
                if let Some(n) = serving.vanish_after
                    && served.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= n
                {
                    let _ = stream.close().await;
                    return Ok(());
                }
                if let Some(d) = serving.delay {
                    tokio::time::sleep(d).await;
                }
                let start = index as usize * s.chunk;
                let end = (start + s.chunk).min(s.bytes.len());
                write_message(&mut stream, &Response::Chunk).await?;
                write_frame(&mut stream, &[&s.bytes[start..end]]).await?;
            }
            (_, s) => {
                let epoch = s.map(|s| s.epoch);
                write_message(&mut stream, &Response::Gone { epoch }).await?;
            }
        }
    }
}

/// A donor: a peer and where to reach it.
#[derive(Debug, Clone)]
pub struct Donor {
    pub peer: PeerId,
    pub addrs: Vec<Multiaddr>,
}

/// Chunks received so far, kept across attempts.
#[derive(Debug, Default)]
pub struct Partial {
    manifest: Option<Manifest>,
    chunks: Vec<Option<Vec<u8>>>,
}

impl Partial {
    /// Chunks received, of how many.
    pub fn progress(&self) -> (usize, usize) {
        (
            self.chunks.iter().filter(|c| c.is_some()).count(),
            self.chunks.len(),
        )
    }

    /// Adopts `manifest`, keeping received chunks whose hashes it shares.
    fn adopt(&mut self, manifest: Manifest) {
        let mut kept: std::collections::HashMap<[u8; 32], Vec<u8>> = Default::default();
        if let Some(old) = self.manifest.take() {
            for (h, c) in old.hashes.iter().zip(self.chunks.drain(..)) {
                if let Some(c) = c {
                    kept.insert(*h, c);
                }
            }
        }
        self.chunks = manifest
            .hashes
            .iter()
            .enumerate()
            .map(|(i, h)| {
                kept.remove(h)
                    .filter(|c| c.len() == manifest.range(i).len())
            })
            .collect();
        self.manifest = Some(manifest);
    }
}

/// How a download runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Time to connect and get a manifest from one donor.
    pub open_timeout: Duration,
    /// The least time a chunk may take before its donor is dropped; beyond it, a chunk may
    /// take `slack` times the donor's measured time per chunk.
    pub min_stall: Duration,
    pub slack: f64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            open_timeout: Duration::from_secs(30),
            min_stall: Duration::from_secs(5),
            slack: 8.0,
        }
    }
}

/// What a download did.
#[derive(Debug, Clone)]
pub struct Report {
    pub bytes: u64,
    pub elapsed: Duration,
    /// Chunks each donor delivered, in donor order.
    pub per_donor: Vec<usize>,
    /// Donors dropped, and why.
    pub dropped: Vec<(PeerId, String)>,
}

/// Decodes a manifest a donor sent and checks it against what this peer expects (sizes,
/// chunking, one hash per chunk) before anything is downloaded.
pub fn decode_manifest(bytes: &[u8], shape: &Shape) -> Result<Manifest, Error> {
    let manifest: Manifest =
        postcard::from_bytes(bytes).map_err(|e| Error::Mismatch(format!("not a manifest: {e}")))?;
    check(&manifest, shape)?;
    Ok(manifest)
}

fn check(manifest: &Manifest, shape: &Shape) -> Result<(), Error> {
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

async fn open(host: &Host, donor: &Donor, settings: &Settings) -> Result<Stream, host::Error> {
    host.open_stream(
        donor.peer,
        donor.addrs.clone(),
        PROTOCOL,
        settings.open_timeout,
    )
    .await
}

/// A donor's manifest, undecoded (bounded by the largest state this peer would take).
async fn fetch_manifest(stream: &mut Stream, shape: &Shape) -> Result<Vec<u8>, String> {
    write_message(stream, &Request::Manifest)
        .await
        .map_err(|e| e.to_string())?;
    match read_message::<Response>(stream, MAX_CONTROL)
        .await
        .map_err(|e| e.to_string())?
    {
        Response::Manifest => {}
        other => return Err(format!("answered {other:?}")),
    }
    // The hash list is bounded by the largest state this peer would take.
    let limit = 64 + 40 * (shape.bytes().div_ceil(1024) as usize + 1);
    let mut buf = Vec::new();
    read_frame(stream, limit, &mut buf)
        .await
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

/// Downloads the state of the shape `shape` from `donors` (the first that answers gives the
/// manifest; all fetch chunks), carrying on from `partial`. Returns the snapshot (not yet
/// installed) and what the download did.
pub async fn download(
    host: &Host,
    donors: &[Donor],
    shape: Shape,
    partial: &mut Partial,
    settings: &Settings,
) -> Result<(Snapshot, Report), Error> {
    let started = Instant::now();
    let donors: Vec<&Donor> = donors.iter().take(MAX_DONORS).collect();
    if donors.is_empty() {
        return Err(Error::NoDonors);
    }
    // Every donor's manifest, at once. One whose manifest does not fit is passed over (it may
    // lie); only when every donor that answered gave one that does not fit is this peer's model
    // not the run's. The manifests that fit are cross-checked: the one most donors give is
    // taken (on a tie, the first donor's), and only those donors serve the chunks — a donor
    // with a manifest of its own making cannot make honest donors' chunks look wrong.
    let asked = donors.iter().map(|donor| async move {
        let mut stream = open(host, donor, settings)
            .await
            .map_err(|e| e.to_string())?;
        let got = tokio::time::timeout(settings.open_timeout, fetch_manifest(&mut stream, &shape))
            .await
            .unwrap_or_else(|_| Err("timed out".into()))?;
        Ok::<_, String>((stream, got))
    });
    let mut reasons = Vec::new();
    let mut misfits = Vec::new();
    let mut fitting: Vec<(usize, Manifest, Stream)> = Vec::new();
    for (i, answer) in futures::future::join_all(asked)
        .await
        .into_iter()
        .enumerate()
    {
        let peer = donors[i].peer;
        match answer.map(|(stream, bytes)| (stream, decode_manifest(&bytes, &shape))) {
            Ok((stream, Ok(m))) => fitting.push((i, m, stream)),
            Ok((_, Err(Error::Mismatch(why)))) => misfits.push(format!("{peer}: {why}")),
            Ok((_, Err(e))) => reasons.push(format!("{peer}: {e}")),
            Err(e) => reasons.push(format!("{peer}: {e}")),
        }
    }
    let Some(manifest) = majority(fitting.iter().map(|(_, m, _)| m)) else {
        if reasons.is_empty() && !misfits.is_empty() {
            return Err(Error::Mismatch(misfits.join("; ")));
        }
        reasons.extend(misfits);
        return Err(Error::NoManifest(reasons.join("; ")));
    };
    let manifest = manifest.clone();
    let mut dropped = Vec::new();
    let mut streams: Vec<Option<Stream>> = donors.iter().map(|_| None).collect();
    for (i, m, stream) in fitting {
        if m == manifest {
            streams[i] = Some(stream);
        } else {
            let why = "its manifest disagrees with the other donors'".to_owned();
            tracing::warn!("state donor {}: {why}", donors[i].peer);
            dropped.push((donors[i].peer, why));
        }
    }
    partial.adopt(manifest.clone());
    let manifest = Arc::new(manifest);
    let queue: VecDeque<usize> = (0..manifest.hashes.len())
        .filter(|&i| partial.chunks[i].is_none())
        .collect();
    let queue = Arc::new(Mutex::new(queue));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, Vec<u8>)>(2 * donors.len());
    let mut workers = tokio::task::JoinSet::new();
    // Only the donors that gave the manifest taken serve chunks, each on its own stream.
    for (i, stream) in streams.into_iter().enumerate() {
        let Some(stream) = stream else {
            continue;
        };
        let job = Worker {
            manifest: manifest.clone(),
            queue: queue.clone(),
            tx: tx.clone(),
            settings: settings.clone(),
        };
        workers.spawn(async move { (i, job.run(stream).await) });
    }
    drop(tx);
    let mut per_donor = vec![0; donors.len()];
    let mut bytes = 0u64;
    while let Some((i, chunk)) = rx.recv().await {
        bytes += chunk.len() as u64;
        partial.chunks[i] = Some(chunk);
    }
    while let Some(joined) = workers.join_next().await {
        if let Ok((i, (delivered, error))) = joined {
            per_donor[i] = delivered;
            if let Some(e) = error {
                dropped.push((donors[i].peer, e));
            }
        }
    }
    let (got, total) = partial.progress();
    if got < total {
        return Err(Error::Incomplete { got, total });
    }
    let mut state = Vec::with_capacity(manifest.total as usize);
    for c in partial.chunks.drain(..) {
        state.extend_from_slice(&c.unwrap_or_default());
    }
    partial.manifest = None;
    let snapshot = Snapshot {
        epoch: manifest.epoch,
        samples: manifest.samples,
        config: manifest.config,
        shape,
        chunk: manifest.chunk as usize,
        bytes: state,
        hashes: OnceLock::from(manifest.hashes.clone()),
    };
    Ok((
        snapshot,
        Report {
            bytes,
            elapsed: started.elapsed(),
            per_donor,
            dropped,
        },
    ))
}

/// The manifest most of `manifests` are equal to; on a tie, the earliest of those.
fn majority<'a>(manifests: impl Iterator<Item = &'a Manifest>) -> Option<&'a Manifest> {
    let mut counts: Vec<(&Manifest, usize)> = Vec::new();
    for m in manifests {
        match counts.iter_mut().find(|(seen, _)| *seen == m) {
            Some((_, n)) => *n += 1,
            None => counts.push((m, 1)),
        }
    }
    // `max_by_key` keeps the last of equals: search from the end to keep the earliest.
    counts
        .into_iter()
        .rev()
        .max_by_key(|(_, n)| *n)
        .map(|(m, _)| m)
}

/// Fetches chunks from one donor until the queue is empty or the donor fails.
struct Worker {
    manifest: Arc<Manifest>,
    queue: Arc<Mutex<VecDeque<usize>>>,
    tx: tokio::sync::mpsc::Sender<(usize, Vec<u8>)>,
    settings: Settings,
}

impl Worker {
    /// Chunks delivered, and why it stopped early (if it did).
    async fn run(self, mut stream: Stream) -> (usize, Option<String>) {
        let mut delivered = 0;
        // Measured time per chunk; the first chunk gets the open timeout.
        let mut per_chunk: Option<Duration> = None;
        loop {
            let Some(index) = lock(&self.queue).pop_front() else {
                return (delivered, None);
            };
            let allow = match per_chunk {
                Some(t) => self.settings.min_stall.max(t.mul_f64(self.settings.slack)),
                None => self.settings.open_timeout,
            };
            let started = Instant::now();
            let got = tokio::time::timeout(allow, self.fetch(&mut stream, index)).await;
            let failure = match got {
                Ok(Ok(bytes)) => {
                    let t = started.elapsed();
                    per_chunk = Some(per_chunk.map_or(t, |p| (p * 3 + t) / 4));
                    if self.tx.send((index, bytes)).await.is_err() {
                        return (delivered, None);
                    }
                    delivered += 1;
                    continue;
                }
                Ok(Err(e)) => e,
                Err(_) => format!("no chunk within {allow:?}"),
            };
            lock(&self.queue).push_back(index);
            return (delivered, Some(failure));
        }
    }

    async fn fetch(&self, stream: &mut Stream, index: usize) -> Result<Vec<u8>, String> {
        let request = Request::Chunk {
            epoch: self.manifest.epoch,
            index: index as u32,
        };
        write_message(stream, &request)
            .await
            .map_err(|e| e.to_string())?;
        match read_message::<Response>(stream, MAX_CONTROL)
            .await
            .map_err(|e| e.to_string())?
        {
            Response::Chunk => {}
            Response::Gone { epoch } => return Err(format!("moved on to epoch {epoch:?}")),
            Response::Manifest => return Err("answered out of turn".into()),
        }
        let want = self.manifest.range(index).len();
        let mut buf = Vec::new();
        read_frame(stream, want, &mut buf)
            .await
            .map_err(|e| e.to_string())?;
        if buf.len() != want
            || <[u8; 32]>::from(Sha256::digest(&buf)) != self.manifest.hashes[index]
        {
            return Err(format!("chunk {index} does not match the manifest"));
        }
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{Config, Rule};
    use potluck_core::{Layout, Role};

    fn optimizer(precision: Precision) -> (Vec<f32>, Optimizer) {
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

    #[test]
    fn a_snapshot_installs_the_same_state_for_both_precisions() {
        for precision in [Precision::F32, Precision::Blockwise8] {
            let (params, opt) = optimizer(precision);
            let snap = Snapshot::take(&params, &opt, 42, 1000);
            assert_eq!(snap.bytes.len() as u64, Shape::of(&opt).bytes());
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
    }

    #[test]
    fn a_retry_keeps_the_chunks_a_new_manifest_shares() {
        let (params, opt) = optimizer(Precision::F32);
        let snap = Snapshot::take(&params, &opt, 0, 4096);
        let m = snap.manifest();
        let mut partial = Partial::default();
        partial.adopt(m.clone());
        partial.chunks[0] = Some(snap.bytes[m.range(0)].to_vec());
        partial.chunks[1] = Some(snap.bytes[m.range(1)].to_vec());
        let mut changed = m.clone();
        changed.hashes[1] = [0; 32];
        partial.adopt(changed);
        assert!(partial.chunks[0].is_some());
        assert!(partial.chunks[1].is_none());
        assert_eq!(partial.progress(), (1, m.hashes.len()));
    }
}
