//! The downloader's side: the manifests of several donors at once, cross-checked, then the
//! chunks from every donor that gave the manifest taken, each checked against its hash.
//!
//! A donor that drops, stalls, moves on to a newer epoch or sends a chunk that does not match
//! leaves its chunks to the others; a chunk already received is never fetched again
//! ([`Partial`] carries them into a retry).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId, Stream};
use potluck_core::lock;
use potluck_net::frame::{read_frame, read_message, write_message};
use potluck_net::host::{self, Host};
use sha2::{Digest, Sha256};

use super::Error;
use super::snapshot::{Snapshot, Values};
use super::wire::{
    MAX_CONTROL, Manifest, PROTOCOL, Request, Response, Shape, decode_manifest, manifest_limit,
};
use crate::optim;

/// How many epochs past its claim a donor's state may be and still be taken, when no donor
/// serves the claimed epoch itself.
const MAX_MOVED_ON: u64 = 64;

/// Donors fetched from at once.
const MAX_DONORS: usize = 8;

/// A donor: a peer and where to reach it.
#[derive(Debug, Clone)]
pub struct Donor {
    pub peer: PeerId,
    pub addrs: Vec<Multiaddr>,
}

/// What a downloader takes: a state of its model's shape and, where it knows them, of the
/// epoch its donors claimed to hold and with the run's optimizer settings. A manifest is its
/// donor's word: one of another epoch than claimed (a peer that says it is ahead and serves
/// something else) or with other settings is passed over, never adopted.
#[derive(Debug, Clone, Copy)]
pub struct Want {
    pub shape: Shape,
    pub epoch: Option<u64>,
    /// The optimizer settings it takes.
    pub config: ConfigWanted,
    /// No more donors of the epoch are coming (every other peer holds it or a newer one): a
    /// tie of the donors' states is settled by the first donor's rather than waited out
    /// ([`Error::Tied`]). Two honest donors can hold different states (a part of the gradient
    /// one of them kept local when its reducer vanished), and a peer with no one else to ask
    /// must take one of them.
    pub settle_ties: bool,
}

impl Want {
    /// Any state of `shape`.
    pub fn shape(shape: Shape) -> Want {
        Want {
            shape,
            epoch: None,
            config: ConfigWanted::Any,
            settle_ties: false,
        }
    }

    /// Why `manifest` is not what was claimed or what the run trains with, if it is not. (A
    /// manifest of a later epoch than claimed is no lie, only not the state wanted: its donor
    /// stepped since it reported; it is passed over).
    fn unlike(&self, manifest: &Manifest) -> Option<String> {
        if let Some(epoch) = self.epoch
            && manifest.epoch < epoch
        {
            return Some(format!(
                "it claimed the state of epoch {epoch} and offered epoch {}",
                manifest.epoch
            ));
        }
        let other = match self.config {
            ConfigWanted::Any => false,
            ConfigWanted::Exactly(config) => manifest.config != config,
            ConfigWanted::Digest(digest) => manifest.config.digest() != digest,
        };
        if other {
            return Some(format!(
                "it offered other optimizer settings than the run's ({:?} against {:?})",
                manifest.config, self.config
            ));
        }
        None
    }
}

/// The optimizer settings a downloader takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ConfigWanted {
    /// Those the manifest most donors agree on names: a newcomer's, which has no settings of
    /// the run yet.
    Any,
    /// These: a peer that holds the run's state, whose settings no donor changes.
    Exactly(optim::Config),
    /// Those of this digest ([`optim::Config::digest`]): a peer that found its settings were
    /// not those most peers report, taking theirs.
    Digest(u64),
}

/// Chunks received so far, kept across attempts: their bytes are already in place in the
/// state being filled.
#[derive(Debug, Default)]
pub struct Partial {
    manifest: Option<Manifest>,
    got: Vec<bool>,
    values: Option<Values>,
    /// This peer's own state, whose chunks are taken where a manifest of its epoch names them.
    own: Option<Snapshot>,
    /// Which of `got` came from `own`.
    owned: Vec<bool>,
}

impl Partial {
    /// A download that takes from `own` (this peer's own state) every chunk that a manifest of
    /// the same epoch and cut names by the same hash, and asks the donors for the rest only:
    /// peers that start a run together start from the same parameters (seeded by the run), and
    /// a peer that joined a run still at its first epoch downloaded the whole state it held
    /// (53 MB, most of a round on a 10 Mbit/s link). A state of another epoch is not hashed
    /// (it shares no chunk but by chance, and hashing costs a pass over the state).
    pub fn with_own(own: Snapshot) -> Partial {
        Partial {
            own: Some(own),
            ..Partial::default()
        }
    }

    /// Chunks received, of how many.
    pub fn progress(&self) -> (usize, usize) {
        (self.got.iter().filter(|&&g| g).count(), self.got.len())
    }

    /// Adopts `manifest`, keeping the received chunks it shares (same place, same hash).
    pub(super) fn adopt(&mut self, manifest: Manifest) {
        let shape = Shape {
            numel: manifest.numel,
            precision: manifest.precision,
            scales: manifest.scales,
        };
        let same_cut = self.manifest.as_ref().is_some_and(|old| {
            old.chunk == manifest.chunk && old.hashes.len() == manifest.hashes.len()
        }) && self.values.as_ref().is_some_and(|v| v.shape() == shape);
        match self.manifest.take() {
            Some(old) if same_cut => {
                for ((got, old), new) in self.got.iter_mut().zip(&old.hashes).zip(&manifest.hashes)
                {
                    *got &= old == new;
                }
                for (owned, got) in self.owned.iter_mut().zip(&self.got) {
                    *owned &= got;
                }
            }
            _ => {
                self.got = vec![false; manifest.hashes.len()];
                self.owned = vec![false; manifest.hashes.len()];
                self.values = Some(Values::zeroed(shape));
            }
        }
        self.take_own(&manifest, shape);
        self.manifest = Some(manifest);
    }

    /// Writes in the chunks of `manifest` this peer's own state holds alike (see
    /// [`Partial::with_own`]).
    fn take_own(&mut self, manifest: &Manifest, shape: Shape) {
        let (Some(own), Some(values)) = (&self.own, &mut self.values) else {
            return;
        };
        let own_manifest = own.manifest_if(manifest.epoch, manifest.chunk as usize, shape);
        let Some(hashes) = own_manifest else {
            return;
        };
        let mut bytes = Vec::new();
        for (i, ((got, owned), (theirs, mine))) in self
            .got
            .iter_mut()
            .zip(self.owned.iter_mut())
            .zip(manifest.hashes.iter().zip(hashes))
            .enumerate()
        {
            if !*got && theirs == mine {
                own.read_chunk(i, &mut bytes);
                values.write(manifest.range(i).start, &bytes);
                *got = true;
                *owned = true;
            }
        }
    }

    /// Writes chunk `index`'s bytes (checked against the manifest) in place.
    fn write(&mut self, index: usize, bytes: &[u8]) {
        let (Some(manifest), Some(values)) = (&self.manifest, &mut self.values) else {
            return;
        };
        values.write(manifest.range(index).start, bytes);
        self.got[index] = true;
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
    /// Donors whose manifest was not what they claimed or the run trains with (also in
    /// `dropped`).
    pub unlike: Vec<PeerId>,
    /// Donors whose manifest disagreed with the one most donors gave (also in `dropped`):
    /// they serve another state than the others under the same claim.
    pub outvoted: Vec<PeerId>,
    /// Chunks taken from this peer's own state ([`Partial::with_own`]), and of how many.
    pub own: (usize, usize),
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
    let mut buf = Vec::new();
    read_frame(stream, manifest_limit(shape), &mut buf)
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
    want: &Want,
    partial: &mut Partial,
    settings: &Settings,
) -> Result<(Snapshot, Report), Error> {
    let started = Instant::now();
    let shape = want.shape;
    let donors: Vec<&Donor> = donors.iter().take(MAX_DONORS).collect();
    if donors.is_empty() {
        return Err(Error::NoDonors);
    }
    // Every donor's manifest, at once. One whose manifest does not fit is passed over (it may
    // lie); only when every donor that answered gave one that does not fit is this peer's model
    // not the run's. The manifests that fit are cross-checked: the one most donors give is
    // taken (on a tie, none: [`Error::Tied`], unless told to settle it), and only those donors serve the chunks — a
    // donor with a manifest of its own making cannot make honest donors' chunks look wrong.
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
    let mut unlike: Vec<(PeerId, String)> = Vec::new();
    let mut later: Vec<(usize, Manifest, Stream)> = Vec::new();
    for (i, answer) in futures::future::join_all(asked)
        .await
        .into_iter()
        .enumerate()
    {
        let peer = donors[i].peer;
        match answer.map(|(stream, bytes)| (stream, decode_manifest(&bytes, &shape))) {
            Ok((stream, Ok(m))) if want.epoch.is_some_and(|e| m.epoch > e) => {
                if want.epoch.is_some_and(|e| m.epoch - e <= MAX_MOVED_ON)
                    && want.unlike(&m).is_none()
                {
                    later.push((i, m, stream));
                } else {
                    reasons.push(format!("{peer}: moved on to epoch {}", m.epoch));
                }
            }
            Ok((stream, Ok(m))) => match want.unlike(&m) {
                None => fitting.push((i, m, stream)),
                Some(why) => {
                    tracing::warn!("state donor {peer}: {why}");
                    unlike.push((peer, why));
                }
            },
            Ok((_, Err(Error::Mismatch(why)))) => misfits.push(format!("{peer}: {why}")),
            Ok((_, Err(e))) => reasons.push(format!("{peer}: {e}")),
            Err(e) => reasons.push(format!("{peer}: {e}")),
        }
    }
    // Donors that stepped since they reported serve their newer state only when no donor
    // serves the one claimed (a lone donor of a fast run moves on between two reads).
    if fitting.is_empty() {
        fitting = later;
    } else {
        reasons.extend(
            later
                .iter()
                .map(|(i, m, _)| format!("{}: moved on to epoch {}", donors[*i].peer, m.epoch)),
        );
    }
    let manifest = match vote(fitting.iter().map(|(_, m, _)| m)) {
        Vote::Taken(m) => Some(m),
        Vote::Tied { first, .. } if want.settle_ties => Some(first),
        Vote::Tied { states, epoch, .. } => {
            return Err(Error::Tied {
                epoch,
                donors: fitting.len(),
                states,
            });
        }
        Vote::Empty => None,
    };
    let Some(manifest) = manifest else {
        if !unlike.is_empty() {
            reasons.extend(misfits);
            return Err(Error::Unlike {
                donors: unlike,
                others: reasons,
            });
        }
        if reasons.is_empty() && !misfits.is_empty() {
            return Err(Error::Mismatch(misfits.join("; ")));
        }
        reasons.extend(misfits);
        return Err(Error::NoManifest(reasons.join("; ")));
    };
    let manifest = manifest.clone();
    let unlike_peers: Vec<PeerId> = unlike.iter().map(|(p, _)| *p).collect();
    let mut dropped = unlike;
    let mut outvoted = Vec::new();
    let mut streams: Vec<Option<Stream>> = donors.iter().map(|_| None).collect();
    for (i, m, stream) in fitting {
        if m == manifest {
            streams[i] = Some(stream);
        } else {
            let why = "its manifest disagrees with the other donors'".to_owned();
            tracing::warn!("state donor {}: {why}", donors[i].peer);
            dropped.push((donors[i].peer, why));
            outvoted.push(donors[i].peer);
        }
    }
    partial.adopt(manifest.clone());
    let manifest = Arc::new(manifest);
    let queue: VecDeque<usize> = (0..manifest.hashes.len())
        .filter(|&i| !partial.got[i])
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
        partial.write(i, &chunk);
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
    let own = (partial.owned.iter().filter(|&&o| o).count(), total);
    partial.owned.clear();
    partial.manifest = None;
    partial.got.clear();
    let values = partial
        .values
        .take()
        .ok_or(Error::Incomplete { got, total })?;
    debug_assert_eq!(values.shape(), shape);
    let snapshot = Snapshot::downloaded(&manifest, values);
    snapshot.check_finite().map_err(Error::NotFinite)?;
    Ok((
        snapshot,
        Report {
            bytes,
            elapsed: started.elapsed(),
            per_donor,
            dropped,
            unlike: unlike_peers,
            outvoted,
            own,
        },
    ))
}

/// What the donors' manifests say.
enum Vote<'a> {
    /// No donor gave one.
    Empty,
    /// The manifest more donors gave than any other.
    Taken(&'a Manifest),
    /// As many donors gave one as gave another (of epoch `epoch`): `states` manifests share
    /// the most donors.
    Tied {
        states: usize,
        epoch: u64,
        first: &'a Manifest,
    },
}

/// The manifest more of `manifests` are equal to than to any other. A tie is no answer: of
/// two donors, one honest and one a liar serving a state of its own making, the order they
/// answered in must not decide which state a peer installs.
fn vote<'a>(manifests: impl Iterator<Item = &'a Manifest>) -> Vote<'a> {
    let mut counts: Vec<(&Manifest, usize)> = Vec::new();
    for m in manifests {
        match counts.iter_mut().find(|(seen, _)| *seen == m) {
            Some((_, n)) => *n += 1,
            None => counts.push((m, 1)),
        }
    }
    let Some(most) = counts.iter().map(|(_, n)| *n).max() else {
        return Vote::Empty;
    };
    let mut top = counts.into_iter().filter(|(_, n)| *n == most);
    match (top.next(), top.count()) {
        (Some((m, _)), 0) => Vote::Taken(m),
        (Some((m, _)), others) => Vote::Tied {
            states: others + 1,
            epoch: m.epoch,
            first: m,
        },
        (None, _) => Vote::Empty,
    }
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
            Response::Busy { retry_after_s } => {
                return Err(format!(
                    "this peer took its share of the donor's upload; it serves again in \
                     {retry_after_s} s"
                ));
            }
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
    use crate::optim::Precision;
    use crate::sync::test_state as optimizer;

    #[test]
    fn a_retry_keeps_the_chunks_a_new_manifest_shares() {
        let (params, opt) = optimizer(Precision::F32);
        let snap = Snapshot::take(&params, &opt, 0, 4096);
        let m = snap.manifest();
        let mut partial = Partial::default();
        partial.adopt(m.clone());
        let chunk = |i| {
            let mut bytes = Vec::new();
            snap.read_chunk(i, &mut bytes);
            assert_eq!(bytes.len(), m.range(i).len());
            bytes
        };
        partial.write(0, &chunk(0));
        partial.write(1, &chunk(1));
        let mut changed = m.clone();
        changed.hashes[1] = [0; 32];
        partial.adopt(changed);
        assert!(partial.got[0]);
        assert!(!partial.got[1]);
        assert_eq!(partial.progress(), (1, m.hashes.len()));
    }

    /// A downloader's own state of the manifest's epoch gives every chunk it holds alike; one
    /// of another epoch gives none.
    #[test]
    fn a_downloader_takes_the_chunks_its_own_state_holds_alike() {
        let (params, opt) = optimizer(Precision::F32);
        let theirs = Snapshot::take(&params, &opt, 0, 4096);
        let m = theirs.manifest();
        assert!(m.hashes.len() > 2);
        let mut changed = params.clone();
        changed[0] += 1.0;
        let own = Snapshot::take(&changed, &opt, 0, 4096);
        let mut partial = Partial::with_own(own);
        partial.adopt(m.clone());
        // All but the first chunk, which holds the changed value.
        assert!(!partial.got[0]);
        assert_eq!(partial.progress(), (m.hashes.len() - 1, m.hashes.len()));
        let mut bytes = Vec::new();
        theirs.read_chunk(0, &mut bytes);
        partial.write(0, &bytes);
        let values = partial.values.take().unwrap();
        let got = Snapshot::downloaded(&m, values);
        assert_eq!(got.manifest(), m, "the state put together is the donors'");
        // A manifest of a later epoch takes nothing of it.
        let mut later = m.clone();
        later.epoch += 1;
        let own = Snapshot::take(&params, &opt, 0, 4096);
        let mut partial = Partial::with_own(own);
        partial.adopt(later);
        assert_eq!(partial.progress().0, 0);
    }
}
