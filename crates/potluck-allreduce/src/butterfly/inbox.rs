//! Where a host's incoming `/potluck/allreduce/2` streams go: the [`Inbox`] (one per host)
//! reads each stream's hello ([`route`]), moves it to a direct channel where the opener asks,
//! and hands it to the round it names once that round has [`Inbox::register`]ed here. The
//! inbox also remembers across rounds what one round learns about members: who was found
//! gone lately ([`GONE_FOR`]) and whose contributions were dropped again and again (strikes
//! and local bans, [`STRIKES_TO_BAN`]). What a round does with its streams is
//! [`super::reduce`]'s business.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream};
use potluck_core::lock;
use potluck_core::slots::Slots;
use potluck_net::auth::Role;
use potluck_net::direct;
use potluck_net::frame::write_message;
use potluck_net::host::{self, Host};
use tokio::sync::mpsc;

use super::wire::{Ack, Hello, PROTOCOL, read_control};
use super::{Reader, Writer};

/// A channel that arrived for a round, after its hello.
pub(super) struct Incoming {
    pub(super) peer: PeerId,
    pub(super) hello: Hello,
    pub(super) reader: Reader,
    pub(super) writer: Writer,
    pub(super) pacing: Option<direct::Pacing>,
}

/// The rounds running on a host, and a wake-up for streams waiting for theirs to start.
#[derive(Default)]
struct RoundsInner {
    map: Mutex<HashMap<[u8; 32], mpsc::Sender<Incoming>>>,
    registered: tokio::sync::Notify,
    /// The rounds that ended here lately, oldest first (at most [`MAX_ENDED`]): a stream for
    /// one is told at once that this member left it, instead of being held and refused while
    /// its opener retries until its open deadline (a member that gave a round up held every
    /// other member's part to it for the whole open timeout, 15 s by default).
    ended: Mutex<VecDeque<[u8; 32]>>,
    /// Members that said they left a round this host runs (at most [`MAX_ENDED`]): its
    /// reducer stops waiting for their streams.
    left: Mutex<VecDeque<([u8; 32], PeerId)>>,
}

/// How many ended rounds a host remembers (a few epochs' worth of gradient and state rounds).
const MAX_ENDED: usize = 256;

type Rounds = Arc<RoundsInner>;

/// How long a stream for a round that has not started here yet waits for it (members start a
/// round at slightly different moments; holding the stream beats refusing and backing off).
const HOLD: Duration = Duration::from_secs(5);

/// Accepts [`PROTOCOL`] streams for the rounds this host runs; one per host.
#[derive(Clone)]
pub struct Inbox {
    pub(super) host: Host,
    rounds: Rounds,
    /// Members found gone lately (no connection could be made), and when: the next rounds
    /// (the state averaging right after a gradient's, say) go on without them at once.
    gone: Arc<Mutex<HashMap<PeerId, Instant>>>,
    /// Members whose contributions this host's reducer dropped, and the local bans.
    strikes: Arc<Mutex<Strikes>>,
}

/// Why a banned member's contributions are not waited for.
pub const BANNED: &str = "banned here: its contributions were dropped again and again";

/// How long a member found gone is left out of new rounds (unless it opens a stream first).
pub const GONE_FOR: Duration = Duration::from_secs(60);

/// Contributions of one member dropped (non-finite, absurd in norm) before it is banned here.
pub const STRIKES_TO_BAN: u32 = 3;
/// How long a local ban lasts: this host's reducer ignores the member's contributions from the
/// start of every round.
pub const BANNED_FOR: Duration = Duration::from_secs(3600);
/// Members tracked, at most.
const MAX_TRACKED: usize = 4096;

/// Incoming streams read for their hello and routed at once, at most.
pub(super) const MAX_ROUTING: usize = 256;
/// Of those, from one peer at most (a member opens one stream to each reducer of a round).
pub(super) const MAX_ROUTING_PER_PEER: usize = 16;

/// Dropped contributions per member, and the members banned here (until when, and why).
#[derive(Debug, Default)]
struct Strikes {
    count: HashMap<PeerId, u32>,
    banned: HashMap<PeerId, (Instant, String)>,
    /// A ban was made since [`Inbox::take_fresh_bans`] last said so.
    fresh: bool,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

/// A round's claim on incoming streams; dropping it gives the round up.
pub(super) struct Registration {
    rounds: Rounds,
    round: [u8; 32],
    pub(super) streams: mpsc::Receiver<Incoming>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.rounds.map).remove(&self.round);
        let mut ended = lock(&self.rounds.ended);
        if ended.len() >= MAX_ENDED {
            ended.pop_front();
        }
        ended.push_back(self.round);
    }
}

impl Inbox {
    /// Starts accepting streams on `host`. The accept loop hands every stream to a task at
    /// once (libp2p-stream keeps one waiting stream at most; openers retry what it drops), at
    /// most [`MAX_ROUTING`] at once and [`MAX_ROUTING_PER_PEER`] for one peer: a stream over
    /// those is dropped (an honest opener retries). In an authorized run only trainers and aux
    /// peers are heard (a monitor may not average).
    pub fn start(host: &Host) -> Result<Inbox, host::Error> {
        let mut incoming = host.accept_from(PROTOCOL, Role::averages)?;
        let rounds: Rounds = Arc::default();
        let shared = rounds.clone();
        let router = host.clone();
        let routing = Slots::new(MAX_ROUTING, MAX_ROUTING_PER_PEER);
        tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                let Some(slot) = routing.try_enter(peer) else {
                    tracing::debug!("dropped an all-reduce stream of {peer}: too many at once");
                    continue;
                };
                let (shared, router) = (shared.clone(), router.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    route(peer, stream, shared, router).await;
                });
            }
        });
        Ok(Inbox {
            host: host.clone(),
            rounds,
            gone: Arc::default(),
            strikes: Arc::default(),
        })
    }

    /// Counts a dropped contribution of `peer`; at [`STRIKES_TO_BAN`] it is banned here for
    /// [`BANNED_FOR`].
    pub(super) fn strike(&self, peer: PeerId, why: &str) {
        let mut s = lock(&self.strikes);
        let now = Instant::now();
        s.banned.retain(|_, (until, _)| *until > now);
        if s.count.len() >= MAX_TRACKED && !s.count.contains_key(&peer) {
            s.count.clear();
        }
        let n = s.count.entry(peer).or_insert(0);
        *n += 1;
        if *n >= STRIKES_TO_BAN && s.banned.len() < MAX_TRACKED {
            s.count.remove(&peer);
            let why = format!("{STRIKES_TO_BAN} contributions dropped, the last: {why}");
            tracing::warn!("banned {peer} from this host's parts for {BANNED_FOR:?}: {why}");
            s.banned.insert(peer, (now + BANNED_FOR, why));
            s.fresh = true;
        }
    }

    /// Whether this host's reducer ignores `peer`'s contributions.
    pub fn is_banned(&self, peer: &PeerId) -> bool {
        lock(&self.strikes)
            .banned
            .get(peer)
            .is_some_and(|(until, _)| *until > Instant::now())
    }

    /// The members banned here now, and why.
    pub fn bans(&self) -> Vec<(PeerId, String)> {
        let now = Instant::now();
        let s = lock(&self.strikes);
        let live = s.banned.iter().filter(|(_, (until, _))| *until > now);
        live.map(|(p, (_, why))| (*p, why.clone())).collect()
    }

    /// Whether a ban was made since the last call (the bans are to be reported again).
    pub fn take_fresh_bans(&self) -> bool {
        std::mem::take(&mut lock(&self.strikes).fresh)
    }

    /// Records that no connection to `peer` could be made.
    pub(super) fn note_gone(&self, peer: PeerId) {
        let mut gone = lock(&self.gone);
        gone.retain(|_, at| at.elapsed() < GONE_FOR);
        if gone.len() < 4096 {
            gone.insert(peer, Instant::now());
        }
    }

    /// Records that `peer` said it left `round`.
    pub(super) fn note_left(&self, round: [u8; 32], peer: PeerId) {
        let mut left = lock(&self.rounds.left);
        if left.len() >= MAX_ENDED {
            left.pop_front();
        }
        left.push_back((round, peer));
    }

    /// Whether `peer` said it left `round`.
    pub(super) fn has_left(&self, round: [u8; 32], peer: &PeerId) -> bool {
        lock(&self.rounds.left).contains(&(round, *peer))
    }

    /// Whether `peer` was found gone in the last [`GONE_FOR`].
    pub(super) fn is_gone(&self, peer: &PeerId) -> bool {
        lock(&self.gone)
            .get(peer)
            .is_some_and(|at| at.elapsed() < GONE_FOR)
    }

    /// Claims the streams that come for `round` (at most `capacity` waiting) until the
    /// [`Registration`] is dropped.
    pub(super) fn register(&self, round: [u8; 32], capacity: usize) -> Registration {
        let (tx, streams) = mpsc::channel(capacity.max(1));
        lock(&self.rounds.ended).retain(|r| *r != round);
        lock(&self.rounds.map).insert(round, tx);
        self.rounds.registered.notify_waiters();
        Registration {
            rounds: self.rounds.clone(),
            round,
            streams,
        }
    }
}

/// Reads a hello and hands the stream (or the direct channel it moves to) to its round, or
/// refuses it.
async fn route(peer: PeerId, mut stream: Stream, rounds: Rounds, host: Host) {
    let read = read_control::<Hello>(&mut stream);
    let Ok(Ok(hello)) = tokio::time::timeout(Duration::from_secs(10), read).await else {
        return;
    };
    // The round may start here a moment later than at the opener: wait for it a while.
    let until = tokio::time::Instant::now() + HOLD;
    let tx = loop {
        let registered = rounds.registered.notified();
        tokio::pin!(registered);
        registered.as_mut().enable();
        if let Some(tx) = lock(&rounds.map).get(&hello.round).cloned() {
            break Some(tx);
        }
        if lock(&rounds.ended).contains(&hello.round) {
            let _ = write_message(&mut stream, &Ack::Left).await;
            let _ = stream.close().await;
            return;
        }
        if tokio::time::timeout_at(until, registered).await.is_err() {
            break None;
        }
    };
    let Some(tx) = tx else {
        let _ = write_message(&mut stream, &Ack::Refused("unknown round".into())).await;
        let _ = stream.close().await;
        return;
    };
    let offer = if hello.direct {
        host.direct().and_then(|l| l.expect(peer))
    } else {
        None
    };
    let bulk = match offer {
        None => direct::Bulk::Stream(stream),
        Some((offer, expected)) => {
            if write_message(&mut stream, &Ack::Direct(offer))
                .await
                .is_err()
            {
                return;
            }
            match direct::chosen(stream, expected).await {
                Ok(bulk) => bulk,
                Err(e) => {
                    tracing::debug!("member {peer}'s direct channel did not come: {e}");
                    return;
                }
            }
        }
    };
    let pacing = bulk.pacing();
    let (reader, writer) = bulk.into_split();
    if let Err(e) = tx.try_send(Incoming {
        peer,
        hello,
        reader,
        writer,
        pacing,
    }) {
        let Incoming { mut writer, .. } = e.into_inner();
        let _ = write_message(&mut writer, &Ack::Refused("round busy".into())).await;
        let _ = writer.close().await;
    }
}
