//! The donor's side: a peer serves the state on its [`Shelf`] to every downloader that asks,
//! one stream each, while it goes on training and averaging.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream};
use potluck_core::lock;
use potluck_core::slots::Slots;
use potluck_net::frame::{read_message, write_frame, write_message};
use potluck_net::host::{self, Host};

use super::snapshot::Snapshot;
use super::wire::{MAX_CONTROL, PROTOCOL, Request, Response};

/// The state this peer serves (replaced after every step), and the bytes it served so far.
///
/// A state replaced while a downloader was fetching it stays on the shelf, for that download
/// only, until no chunk of it was asked for in [`KEEP_WHILE_ASKED`]: on a slow link a state
/// takes longer to download than an epoch does, and a download that had to start again at
/// every step never finished while taking the donors' uplinks from their averaging (three
/// `small` peers on 10 Mbit/s links: a newcomer fetched 22 of 26 chunks, twice, and the
/// others' rounds came too late).
#[derive(Debug, Clone, Default)]
pub struct Shelf(Arc<Mutex<Shelved>>, Arc<std::sync::atomic::AtomicU64>);

/// How long a replaced state stays on the shelf after the last chunk asked of it.
pub(crate) const KEEP_WHILE_ASKED: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Shelved {
    current: Option<Arc<Snapshot>>,
    /// When a chunk of the current state was last asked for.
    asked: Option<Instant>,
    /// The state before, while a download of it is under way (and when it was last asked).
    previous: Option<(Arc<Snapshot>, Instant)>,
}

impl Shelf {
    pub fn put(&self, snapshot: Snapshot) {
        self.put_at(snapshot, Instant::now());
    }

    fn put_at(&self, snapshot: Snapshot, now: Instant) {
        let mut shelved = lock(&self.0);
        let old = shelved.current.replace(Arc::new(snapshot));
        let asked = shelved.asked.take();
        shelved.previous = old
            .zip(asked)
            .filter(|(_, at)| now.saturating_duration_since(*at) < KEEP_WHILE_ASKED);
    }

    /// The state it serves now.
    pub fn get(&self) -> Option<Arc<Snapshot>> {
        lock(&self.0).current.clone()
    }

    /// The state of `epoch` for a chunk asked at `now`: the current one, or the one before
    /// while its download goes on. A replaced state no longer asked for is let go.
    fn for_chunk(&self, epoch: u64, now: Instant) -> Option<Arc<Snapshot>> {
        let mut shelved = lock(&self.0);
        if let Some(s) = shelved.current.clone().filter(|s| s.epoch == epoch) {
            shelved.asked = Some(now);
            return Some(s);
        }
        let stale = shelved
            .previous
            .as_ref()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) >= KEEP_WHILE_ASKED);
        if stale {
            shelved.previous = None;
        }
        let (s, at) = shelved
            .previous
            .as_mut()
            .filter(|(s, _)| s.epoch == epoch)?;
        *at = now;
        Some(s.clone())
    }

    /// Bytes of manifests and chunks served to downloaders so far.
    pub fn served(&self) -> u64 {
        self.1.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count(&self, bytes: usize) {
        self.1
            .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How a donor serves (fault injection for tests).
#[derive(Debug, Clone, Copy, Default)]
pub struct Serving {
    /// Vanish (close every stream, answer nothing more) after serving this many chunks.
    pub vanish_after: Option<usize>,
    /// Wait this long before each chunk (a slow donor).
    pub delay: Option<Duration>,
}

/// State streams answered at once, at most.
pub(super) const MAX_STREAMS: usize = 64;
/// Of those, for one peer at most (a downloader opens one stream to each donor).
pub(super) const MAX_STREAMS_PER_PEER: usize = 2;

/// What one downloader may take from a donor: this many whole states per [`BUDGET_WINDOW`]
/// (a newcomer takes one, split among its donors; a peer whose downloads keep failing a few).
pub(super) const STATES_PER_WINDOW: f64 = 4.0;
/// The window the budget refills over.
pub(super) const BUDGET_WINDOW: Duration = Duration::from_secs(3600);
/// The budget is never smaller than this (small states can be fetched often).
pub(super) const MIN_BUDGET: f64 = (256 << 20) as f64;
/// Downloaders whose budgets are tracked, at most (the fullest are forgotten first).
const MAX_BUDGETS: usize = 4096;

/// The bytes each downloader may still take: a bucket per peer, refilled continuously, that
/// outlives its streams (a peer cannot reset it by reconnecting).
#[derive(Debug, Default)]
pub(crate) struct Budgets {
    by_peer: HashMap<PeerId, (f64, Instant)>,
}

impl Budgets {
    /// Takes `bytes` from `peer`'s budget for a state of `state` bytes, or says in how many
    /// seconds it will hold them.
    pub(crate) fn take(
        &mut self,
        peer: PeerId,
        bytes: usize,
        state: usize,
        now: Instant,
    ) -> Result<(), u32> {
        let capacity = (STATES_PER_WINDOW * state as f64).max(MIN_BUDGET);
        let per_second = capacity / BUDGET_WINDOW.as_secs_f64();
        if self.by_peer.len() >= MAX_BUDGETS && !self.by_peer.contains_key(&peer) {
            let full = |(left, at): &(f64, Instant)| {
                *left + now.saturating_duration_since(*at).as_secs_f64() * per_second >= capacity
            };
            self.by_peer.retain(|_, b| !full(b));
            if self.by_peer.len() >= MAX_BUDGETS {
                return Err(BUDGET_WINDOW.as_secs() as u32);
            }
        }
        let (left, at) = self.by_peer.entry(peer).or_insert((capacity, now));
        *left =
            (*left + now.saturating_duration_since(*at).as_secs_f64() * per_second).min(capacity);
        *at = now;
        let want = bytes as f64;
        if *left >= want {
            *left -= want;
            Ok(())
        } else {
            Err(((want - *left) / per_second)
                .ceil()
                .min(f64::from(u32::MAX)) as u32)
        }
    }
}

/// Serves `shelf` on `host` until the host stops. Each stream answers requests in order; at
/// most [`MAX_STREAMS`] streams are answered at once, [`MAX_STREAMS_PER_PEER`] for one peer
/// (more are closed at once); each peer takes at most its budget of bytes (see
/// [`STATES_PER_WINDOW`]), then is answered [`Response::Busy`].
pub fn serve(host: &Host, shelf: Shelf, serving: Serving) -> Result<(), host::Error> {
    let mut incoming = host.accept(PROTOCOL)?;
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let streams = Slots::new(MAX_STREAMS, MAX_STREAMS_PER_PEER);
    let budgets = Arc::new(Mutex::new(Budgets::default()));
    tokio::spawn(async move {
        while let Some((peer, stream)) = incoming.next().await {
            let Some(slot) = streams.try_enter(peer) else {
                tracing::debug!("closed a state stream of {peer}: too many at once");
                continue;
            };
            let (shelf, served) = (shelf.clone(), served.clone());
            let budgets = budgets.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let donor = Donor {
                    shelf,
                    serving,
                    served,
                    budgets,
                };
                if let Err(e) = answer(peer, stream, &donor).await {
                    tracing::debug!("state stream from {peer} ended: {e}");
                }
            });
        }
    });
    Ok(())
}

/// How long a donor waits for the next request on an open stream.
const IDLE: Duration = Duration::from_secs(60);

/// What every stream of a donor shares.
struct Donor {
    shelf: Shelf,
    serving: Serving,
    /// Chunks served (for [`Serving::vanish_after`]).
    served: Arc<std::sync::atomic::AtomicUsize>,
    budgets: Arc<Mutex<Budgets>>,
}

async fn answer(peer: PeerId, mut stream: Stream, donor: &Donor) -> std::io::Result<()> {
    let Donor {
        shelf,
        serving,
        served,
        budgets,
    } = donor;
    // A chunk's bytes are encoded here from the shared state, one chunk at a time.
    let mut chunk = Vec::new();
    loop {
        let request = match tokio::time::timeout(IDLE, read_message(&mut stream, MAX_CONTROL)).await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        let snapshot = match &request {
            Request::Chunk { epoch, .. } => shelf
                .for_chunk(*epoch, Instant::now())
                .or_else(|| shelf.get()),
            Request::Manifest => shelf.get(),
        };
        match (request, snapshot) {
            (Request::Manifest, Some(s)) => {
                let state = s.len();
                // Hashing a large state takes a while: off the async workers.
                let manifest = tokio::task::spawn_blocking(move || s.manifest())
                    .await
                    .map_err(std::io::Error::other)?;
                let bytes = postcard::to_allocvec(&manifest).map_err(std::io::Error::other)?;
                let charged = lock(budgets).take(peer, bytes.len(), state, Instant::now());
                if let Err(retry_after_s) = charged {
                    write_message(&mut stream, &Response::Busy { retry_after_s }).await?;
                    continue;
                }
                write_message(&mut stream, &Response::Manifest).await?;
                write_frame(&mut stream, &[&bytes]).await?;
                shelf.count(bytes.len());
            }
            (Request::Chunk { epoch, index }, Some(s))
                if s.epoch == epoch && (index as usize) * s.chunk() < s.len() =>
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
                s.read_chunk(index as usize, &mut chunk);
                let charged = lock(budgets).take(peer, chunk.len(), s.len(), Instant::now());
                if let Err(retry_after_s) = charged {
                    write_message(&mut stream, &Response::Busy { retry_after_s }).await?;
                    continue;
                }
                write_message(&mut stream, &Response::Chunk).await?;
                write_frame(&mut stream, &[&chunk]).await?;
                shelf.count(chunk.len());
            }
            (_, s) => {
                let epoch = s.map(|s| s.epoch);
                write_message(&mut stream, &Response::Gone { epoch }).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state replaced while its download is under way is still served for that download,
    /// and let go once no chunk of it was asked for in a while; one nobody was fetching is
    /// let go at once.
    #[test]
    fn a_state_being_downloaded_outlives_its_replacement_until_the_download_stops() {
        let (params, opt) = crate::sync::test_state(crate::optim::Precision::F32);
        let shelf = Shelf::default();
        let t0 = Instant::now();
        let snap = |steps: u64| {
            let mut o = opt.clone();
            o.set_steps(steps);
            Snapshot::take(&params, &o, 0, 1 << 10)
        };
        shelf.put_at(snap(4), t0);
        assert!(shelf.for_chunk(4, t0).is_some());
        // Replaced mid-download: both served.
        let t1 = t0 + Duration::from_secs(5);
        shelf.put_at(snap(5), t1);
        assert_eq!(shelf.for_chunk(4, t1).map(|s| s.epoch), Some(4));
        assert_eq!(shelf.for_chunk(5, t1).map(|s| s.epoch), Some(5));
        // Asked again within the window: kept; then nobody asks, and it goes.
        let t2 = t1 + KEEP_WHILE_ASKED / 2;
        assert!(shelf.for_chunk(4, t2).is_some());
        assert!(shelf.for_chunk(4, t2 + KEEP_WHILE_ASKED).is_none());
        assert!(lock(&shelf.0).previous.is_none());
        // Epoch 5 was last asked for long before 6 replaced it, and 6 never: neither is kept.
        let t3 = t2 + KEEP_WHILE_ASKED;
        shelf.put_at(snap(6), t3);
        shelf.put_at(snap(7), t3);
        assert!(shelf.for_chunk(6, t3).is_none());
        assert!(shelf.for_chunk(5, t3).is_none());
        assert_eq!(shelf.get().map(|s| s.epoch), Some(7));
    }

    /// A downloader takes its budget and is then told when to come back; the budget refills
    /// with time, and another downloader has its own.
    #[test]
    fn a_downloader_takes_its_share_of_the_upload_and_no_more() {
        let state = 100 << 20;
        let capacity = (STATES_PER_WINDOW * state as f64) as usize;
        let mut budgets = Budgets::default();
        let t0 = Instant::now();
        let greedy = PeerId::random();
        let chunk = 1 << 20;
        let mut taken = 0;
        while budgets.take(greedy, chunk, state, t0).is_ok() {
            taken += chunk;
            assert!(taken <= capacity, "took {taken} of a budget of {capacity}");
        }
        assert_eq!(taken, capacity);
        let wait = budgets.take(greedy, chunk, state, t0).unwrap_err();
        assert!(wait >= 1, "{wait}");
        assert!(budgets.take(PeerId::random(), chunk, state, t0).is_ok());
        let later = t0 + Duration::from_secs(u64::from(wait));
        assert!(budgets.take(greedy, chunk, state, later).is_ok());
    }
}
