//! The butterfly all-reduce of a flat `f32` buffer over `/potluck/allreduce/2` bulk streams.
//!
//! The buffer is split into one part per reducing peer ([`balance`]); each part into chunks of
//! at most [`Settings::chunk`] values that never cross a codec boundary ([`CodecPlan`]). Every
//! member opens one stream to every other reducer: on it, it sends its chunks of that
//! reducer's part (if it sends at all) and reads back the averaged chunks, both at once. A
//! reducer aggregates chunk by chunk as contributions arrive and sends each averaged chunk to
//! every member as soon as it is done, so sending, reducing and returning overlap; a reader
//! runs at most [`Settings::window`] chunks ahead of the slowest live sender, so memory stays
//! bounded.
//!
//! Results are written in place: the averaged chunk replaces the member's own values, which
//! were sent before (a reducer can't finish a chunk without them).
//!
//! Where both hosts can, the chunks travel over a direct channel ([`potluck_net::direct`]:
//! their own TCP connection, AES-256-GCM under keys agreed on the libp2p stream) instead of
//! the libp2p stream, which costs several times the CPU per byte; where a direct connection
//! can't be made, they stay on the stream.
//!
//! Faults: a sender that sends nothing for longer than its measured rate allows (times
//! [`Settings::slack`]) is excluded by the reducer for the rest of the round; a reducer that
//! stalls or dies leaves its senders with their own values for the chunks they did not get
//! back, and their [`Report`] says which those are. The round finishes for everyone else.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, PeerId, Stream};
use potluck_net::auth::Role;
use potluck_net::direct;
use potluck_net::frame::{read_frame, read_message, write_frame, write_message};
use potluck_net::host::{self, Host};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::aggregate::{self, Checks, Contribution, Dropped, Rule};
use crate::balance::{self, Mode};
pub use crate::codec::CodecPlan;
use crate::codec::{self, Codec};

/// The protocol's name.
pub const PROTOCOL: &str = "/potluck/allreduce/2";

/// Largest control message (hello, ack).
const MAX_CONTROL: usize = 4096;

/// Largest group.
pub const MAX_GROUP: usize = 256;

/// What the opener of a stream says first.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Hello {
    round: [u8; 32],
    /// The opener's index in the group.
    sender: u32,
    /// Its weight (samples); 0 for one that only receives.
    weight: f32,
    /// It can open a direct channel.
    direct: bool,
}

/// The reducer's answer to a hello.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Ack {
    Ok,
    Refused(String),
    /// Open a direct channel with this offer (then say which way on the stream, and read the
    /// final answer on the channel chosen: [`direct::choose`]).
    Direct(direct::Offer),
}

/// One member of a group.
#[derive(Debug, Clone)]
pub struct Member {
    pub peer: PeerId,
    pub addrs: Vec<Multiaddr>,
    pub mode: Mode,
    /// Bytes per second it moves each way (measured).
    pub rate: f64,
}

/// A group as every member sees it: the same members in the same order, the same parts.
#[derive(Debug, Clone)]
pub struct Group {
    /// Names the round (every stream says which round it belongs to).
    pub round: [u8; 32],
    pub members: Vec<Member>,
    /// Values in each member's part (0 for clients), in member order.
    pub parts: Vec<usize>,
}

/// Why a group could not be formed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GroupError {
    #[error(transparent)]
    Balance(#[from] balance::Error),
    #[error("a group of {0} is larger than {MAX_GROUP}")]
    TooLarge(usize),
}

impl Group {
    /// A group whose parts are balanced by the members' rates for a buffer of `len` values.
    pub fn new(round: [u8; 32], members: Vec<Member>, len: usize) -> Result<Group, GroupError> {
        if members.len() > MAX_GROUP {
            return Err(GroupError::TooLarge(members.len()));
        }
        let peers: Vec<balance::Peer> = members
            .iter()
            .map(|m| balance::Peer {
                mode: m.mode,
                rate: m.rate,
            })
            .collect();
        let parts = balance::part_sizes(len, &peers)?;
        Ok(Group {
            round,
            members,
            parts,
        })
    }

    /// The values of member `j`'s part.
    pub fn range(&self, j: usize) -> Range<usize> {
        let start: usize = self.parts[..j].iter().sum();
        start..start + self.parts[j]
    }

    fn len(&self) -> usize {
        self.parts.iter().sum()
    }

    fn sends(&self, i: usize) -> bool {
        self.members[i].mode != Mode::Auxiliary
    }

    fn index_of(&self, peer: &PeerId) -> Option<usize> {
        self.members.iter().position(|m| m.peer == *peer)
    }
}

/// How a round runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Values per chunk, at most.
    pub chunk: usize,
    pub plan: CodecPlan,
    pub rule: Rule,
    pub checks: Checks,
    /// Chunks a reducer reads ahead of the slowest live sender.
    pub window: usize,
    /// Time to open every stream of the round (connections included).
    pub open_timeout: Duration,
    /// The least time a sender may go silent before it is excluded.
    pub min_stall: Duration,
    /// How many times the expected time (from measured rates) a chunk may take.
    pub slack: f64,
    /// Pace direct channels so a member's flows share its uplink evenly: together they send
    /// this many times the member's measured rate, each its share ([`Uplink`]). Only for rates
    /// that were measured (a rate set too low would slow the round); None: TCP shares the
    /// uplink as it will, which through one FIFO bottleneck is badly.
    pub pace: Option<f64>,
    /// For tests: this member vanishes (as a crash would) at this point of the round.
    pub fault: Option<Fault>,
}

/// Where a member vanishes in a round (fault injection for tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// After sending this many chunks (over all its streams).
    Sending(usize),
    /// As a reducer, after receiving this many chunks, before averaging any.
    Reducing(usize),
    /// As a reducer, after returning this many averaged chunks.
    Returning(usize),
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            chunk: 1 << 16,
            plan: CodecPlan::uniform(Codec::None),
            rule: Rule::Mean,
            checks: Checks::default(),
            window: 8,
            open_timeout: Duration::from_secs(15),
            min_stall: Duration::from_secs(2),
            slack: 4.0,
            pace: None,
            fault: None,
        }
    }
}

/// How one part of the buffer came back.
#[derive(Debug, Clone, PartialEq)]
pub struct PartResult {
    /// The member that reduced it.
    pub reducer: usize,
    pub range: Range<usize>,
    pub chunks: usize,
    /// Chunks that came back averaged (the rest kept this member's own values).
    pub chunks_done: usize,
    /// The least total weight behind any of its chunks.
    pub weight: f64,
    /// Members whose contributions made it into every averaged chunk.
    pub contributors: Vec<usize>,
}

impl PartResult {
    pub fn complete(&self) -> bool {
        self.chunks_done == self.chunks
    }
}

/// What a round did, for this member.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub parts: Vec<PartResult>,
    /// Senders this member's reducer excluded or whose contributions it dropped, and why.
    pub excluded: Vec<(usize, String)>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// This member's channels of the round that went direct ([`potluck_net::direct`]), of
    /// all it had (streams it opened and streams opened to it).
    pub direct_channels: usize,
    pub channels: usize,
    pub elapsed: Duration,
}

impl Report {
    /// This member's achieved throughput in the round: bytes moved each way per second. A
    /// lower bound on its capacity, and it follows the part it was given: balancing parts on
    /// it round after round feeds back (measure capacity with [`Host::probe`] instead).
    pub fn rate(&self) -> f64 {
        let bytes = self.bytes_sent.max(self.bytes_received) as f64;
        bytes / self.elapsed.as_secs_f64().max(1e-6)
    }

    /// Whether every part came back averaged.
    pub fn complete(&self) -> bool {
        self.parts.iter().all(PartResult::complete)
    }

    /// The least weight behind any averaged part (what the result stands for).
    pub fn weight(&self) -> f64 {
        self.parts
            .iter()
            .filter(|p| p.chunks > 0)
            .map(|p| p.weight)
            .fold(f64::INFINITY, f64::min)
    }
}

/// Errors that stop a round before it starts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("this member is not in the group")]
    NotAMember,
    #[error("the buffer has {got} values, the group averages {expected}")]
    Length { got: usize, expected: usize },
    #[error(transparent)]
    Host(#[from] host::Error),
    #[error("this member vanished as its fault injection said")]
    Vanished,
}

/// Counts toward an injected fault and fires it.
#[derive(Debug)]
struct Crash {
    fault: Option<Fault>,
    sent: std::sync::atomic::AtomicUsize,
    fired: tokio::sync::Notify,
}

impl Crash {
    async fn sent_chunk(&self) {
        let n = self.sent.fetch_add(1, Ordering::Relaxed) + 1;
        self.check(Fault::Sending(n)).await;
    }

    /// Fires the fault if this is its point, and then never returns (the round is dropped).
    async fn check(&self, fault: Fault) {
        if self.fault == Some(fault) {
            self.fired.notify_one();
            std::future::pending::<()>().await;
        }
    }
}

/// The reading and writing halves of a member's channel (a libp2p stream or a direct one).
type Reader = direct::BoxReader;
type Writer = direct::BoxWriter;

/// A channel that arrived for a round, after its hello.
struct Incoming {
    peer: PeerId,
    hello: Hello,
    reader: Reader,
    writer: Writer,
    pacing: Option<direct::Pacing>,
}

/// The rounds running on a host, and a wake-up for streams waiting for theirs to start.
#[derive(Default)]
struct RoundsInner {
    map: Mutex<HashMap<[u8; 32], mpsc::Sender<Incoming>>>,
    registered: tokio::sync::Notify,
}

type Rounds = Arc<RoundsInner>;

/// How long a stream for a round that has not started here yet waits for it (members start a
/// round at slightly different moments; holding the stream beats refusing and backing off).
const HOLD: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Accepts `/potluck/allreduce/1` streams for the rounds this host runs; one per host.
#[derive(Clone)]
pub struct Inbox {
    host: Host,
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
struct Registration {
    rounds: Rounds,
    round: [u8; 32],
    streams: mpsc::Receiver<Incoming>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.rounds.map).remove(&self.round);
    }
}

impl Inbox {
    /// Starts accepting streams on `host`. The accept loop hands every stream to a task at
    /// once (libp2p-stream keeps one waiting stream at most; openers retry what it drops).
    /// In an authorized run only trainers and aux peers are heard (a monitor may not average).
    pub fn start(host: &Host) -> Result<Inbox, host::Error> {
        let mut incoming = host.accept_from(PROTOCOL, Role::averages)?;
        let rounds: Rounds = Arc::default();
        let shared = rounds.clone();
        let router = host.clone();
        tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                tokio::spawn(route(peer, stream, shared.clone(), router.clone()));
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
    fn strike(&self, peer: PeerId, why: &str) {
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
    fn note_gone(&self, peer: PeerId) {
        let mut gone = lock(&self.gone);
        gone.retain(|_, at| at.elapsed() < GONE_FOR);
        if gone.len() < 4096 {
            gone.insert(peer, Instant::now());
        }
    }

    /// Whether `peer` was found gone in the last [`GONE_FOR`].
    fn is_gone(&self, peer: &PeerId) -> bool {
        lock(&self.gone)
            .get(peer)
            .is_some_and(|at| at.elapsed() < GONE_FOR)
    }

    fn register(&self, round: [u8; 32], capacity: usize) -> Registration {
        let (tx, streams) = mpsc::channel(capacity.max(1));
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
        host.direct().and_then(direct::Listener::expect)
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

async fn read_control<T: for<'de> Deserialize<'de>>(
    r: &mut (impl futures::AsyncRead + Unpin),
) -> std::io::Result<T> {
    read_message(r, MAX_CONTROL).await
}

/// A result frame: the chunk's total weight (f64 LE), a bitmap of the members behind it, then
/// the encoded chunk.
fn result_limit(members: usize, values: usize) -> usize {
    8 + members.div_ceil(8) + codec::HEADER + 4 * values
}

/// Parses a result frame for a chunk of `out.len()` values in a group of `members`: the
/// chunk's total weight and the members behind it; the averaged values go into `out`
/// (untouched on error).
pub fn parse_result(
    frame: &[u8],
    members: usize,
    out: &mut [f32],
) -> Result<(f64, Vec<usize>), codec::Error> {
    let bitmap = members.div_ceil(8);
    if frame.len() < 8 + bitmap {
        return Err(codec::Error::Short { len: frame.len() });
    }
    let mut weight = [0u8; 8];
    weight.copy_from_slice(&frame[..8]);
    let weight = f64::from_le_bytes(weight);
    if !(weight.is_finite() && weight >= 0.0) {
        return Err(codec::Error::BadScale);
    }
    let bits = &frame[8..8 + bitmap];
    let behind = (0..members)
        .filter(|m| bits[m / 8] & (1 << (m % 8)) != 0)
        .collect();
    codec::decode_into(&frame[8 + bitmap..], out)?;
    Ok((weight, behind))
}

/// Decodes the control messages of `/potluck/allreduce/2` (hello, ack, and the choice of
/// channel) from bytes, as a reducer and an opener do; for fuzzing.
#[doc(hidden)]
pub fn decode_control(bytes: &[u8]) -> [bool; 3] {
    [
        postcard::from_bytes::<Hello>(bytes).is_ok(),
        postcard::from_bytes::<Ack>(bytes).is_ok(),
        postcard::from_bytes::<direct::Via>(bytes).is_ok(),
    ]
}

/// Per-round timing from the members' measured rates.
#[derive(Debug, Clone, Copy)]
struct Timing {
    min_stall: Duration,
    slack: f64,
}

impl Timing {
    /// How long `bytes` may take over a link of `rate` bytes/s shared `share` ways.
    fn allow(&self, bytes: usize, rate: f64, share: usize) -> Duration {
        let expected = bytes as f64 * share.max(1) as f64 / rate.max(1.0);
        self.min_stall
            .max(Duration::from_secs_f64((self.slack * expected).min(3600.0)))
    }
}

/// Averages `buffer` with the group, as member `me` with `weight`; the result replaces
/// `buffer` where it came back (see [`Report`]).
pub async fn all_reduce(
    inbox: &Inbox,
    group: &Group,
    me: usize,
    weight: f32,
    buffer: &mut [f32],
    settings: &Settings,
) -> Result<Report, Error> {
    run(inbox, group, me, weight, buffer, None, settings).await
}

/// [`all_reduce`] with error feedback for lossy codecs: what compression left out of this
/// member's values in one round (kept in `residual`, as long as the buffer, zero at first) is
/// added to what it sends in the next.
pub async fn all_reduce_with_feedback(
    inbox: &Inbox,
    group: &Group,
    me: usize,
    weight: f32,
    buffer: &mut [f32],
    residual: &mut [f32],
    settings: &Settings,
) -> Result<Report, Error> {
    if residual.len() != buffer.len() {
        return Err(Error::Length {
            got: residual.len(),
            expected: buffer.len(),
        });
    }
    run(inbox, group, me, weight, buffer, Some(residual), settings).await
}

async fn run(
    inbox: &Inbox,
    group: &Group,
    me: usize,
    weight: f32,
    buffer: &mut [f32],
    residual: Option<&mut [f32]>,
    settings: &Settings,
) -> Result<Report, Error> {
    let started = Instant::now();
    if me >= group.members.len() || group.members[me].peer != inbox.host.peer_id() {
        return Err(Error::NotAMember);
    }
    if buffer.len() != group.len() {
        return Err(Error::Length {
            got: buffer.len(),
            expected: group.len(),
        });
    }
    let registration = inbox.register(group.round, group.members.len());
    let timing = Timing {
        min_stall: settings.min_stall,
        slack: settings.slack,
    };
    let weight = if group.sends(me) { weight } else { 0.0 };
    // Split the buffer into the members' parts.
    let mut parts: Vec<&mut [f32]> = Vec::with_capacity(group.members.len());
    let mut residuals: Vec<Option<&mut [f32]>> = Vec::with_capacity(group.members.len());
    let mut rest = buffer;
    let mut rest_residual = residual;
    for &len in &group.parts {
        let (part, tail) = rest.split_at_mut(len);
        parts.push(part);
        rest = tail;
        match rest_residual.take() {
            Some(r) => {
                let (head, tail) = r.split_at_mut(len);
                residuals.push(Some(head));
                rest_residual = Some(tail);
            }
            None => residuals.push(None),
        }
    }
    let counters = Arc::new(Counters::default());
    let crash = Crash {
        fault: settings.fault,
        sent: Default::default(),
        fired: tokio::sync::Notify::new(),
    };
    let pace = Pace::new(group.members.len());
    let uplink = Uplink::new(settings.pace.map(|f| f * group.members[me].rate));
    let mut jobs = Vec::new();
    let mut own = None;
    for (j, (part, residual)) in parts.into_iter().zip(residuals).enumerate() {
        if group.parts[j] == 0 {
            continue;
        }
        if j == me {
            own = Some(part);
            continue;
        }
        jobs.push(exchange(
            inbox,
            group,
            me,
            j,
            weight,
            part,
            residual,
            settings,
            timing,
            &crash,
            &pace,
            &uplink,
            counters.clone(),
        ));
    }
    let reduce = async {
        match own {
            Some(part) => Some(
                reduce(
                    registration,
                    group,
                    me,
                    weight,
                    part,
                    settings,
                    timing,
                    &crash,
                    &uplink,
                    counters.clone(),
                    inbox,
                )
                .await,
            ),
            None => {
                // No part: refuse whoever opens a stream to us (they keep their values).
                drop(registration);
                None
            }
        }
    };
    let round = async { futures::join!(futures::future::join_all(jobs), reduce) };
    let (mut results, mine) = tokio::select! {
        done = round => done,
        () = crash.fired.notified() => return Err(Error::Vanished),
    };
    let mut report = Report::default();
    if let Some((result, excluded)) = mine {
        results.push(result);
        report.excluded = excluded;
    }
    results.sort_by_key(|r| r.reducer);
    report.parts = results;
    report.bytes_sent = counters.sent.load(Ordering::Relaxed);
    report.bytes_received = counters.received.load(Ordering::Relaxed);
    report.direct_channels = counters.direct.load(Ordering::Relaxed);
    report.channels = counters.channels.load(Ordering::Relaxed);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Why opening a stream failed.
enum Open {
    /// No connection to the member could be made (a process gone refuses at once).
    Unreachable(String),
    /// Connected, but the stream failed or was refused (the round not started there yet,
    /// say): worth another try until the open deadline.
    Retry(String),
}

/// Times a member may be found unreachable, [`WATCH`] apart, before the round goes on without
/// it and the next rounds leave it out for [`GONE_FOR`] (a member killed after its group formed
/// would otherwise hold everyone up for the open timeout, round after round).
const UNREACHABLE_TRIES: usize = 3;

/// Opens a stream to member `j`, says hello and moves to a direct channel where the member
/// offers one and it connects; retries refusals until the open deadline (a reducer that has
/// not started the round yet refuses it as unknown).
async fn open(
    inbox: &Inbox,
    group: &Group,
    me: usize,
    j: usize,
    weight: f32,
    deadline: Instant,
) -> Result<(Reader, Writer, Option<direct::Pacing>), String> {
    let member = &group.members[j];
    let hello = Hello {
        round: group.round,
        sender: me as u32,
        weight,
        direct: inbox.host.wants_direct(member.peer),
    };
    if inbox.is_gone(&member.peer) {
        return Err("found gone lately".into());
    }
    let mut backoff = Duration::from_millis(20);
    let mut unreachable = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no stream within the open timeout".into());
        }
        let attempt = async {
            let mut stream = match inbox
                .host
                .open_stream(member.peer, member.addrs.clone(), PROTOCOL, left)
                .await
            {
                Ok(stream) => stream,
                // No connection could be made: the member is likely gone.
                Err(e @ (host::Error::Rpc { .. } | host::Error::Dial { .. })) => {
                    return Err(Open::Unreachable(e.to_string()));
                }
                Err(e) => return Err(Open::Retry(e.to_string())),
            };
            write_message(&mut stream, &hello)
                .await
                .map_err(|e| Open::Retry(e.to_string()))?;
            let bulk = match read_control::<Ack>(&mut stream).await {
                Ok(Ack::Ok) => {
                    let (r, w) = direct::Bulk::Stream(stream).into_split();
                    return Ok((r, w, None));
                }
                Ok(Ack::Refused(why)) => return Err(Open::Retry(why)),
                Ok(Ack::Direct(offer)) => inbox
                    .host
                    .choose_direct(stream, member.peer, &member.addrs, &offer)
                    .await
                    .map_err(|e| Open::Retry(e.to_string()))?,
                // Dropped unread (the accept queue was full) or reset: try again.
                Err(e) => return Err(Open::Retry(e.to_string())),
            };
            let pacing = bulk.pacing();
            let (mut reader, writer) = bulk.into_split();
            // The final answer comes on the channel chosen.
            match read_control::<Ack>(&mut reader).await {
                Ok(Ack::Ok) => Ok((reader, writer, pacing)),
                Ok(Ack::Refused(why)) => Err(Open::Retry(why)),
                Ok(Ack::Direct(_)) => Err(Open::Retry("a second direct offer".into())),
                Err(e) => Err(Open::Retry(e.to_string())),
            }
        };
        match tokio::time::timeout(left, attempt).await {
            Ok(Ok(halves)) => return Ok(halves),
            Ok(Err(Open::Unreachable(why))) => {
                unreachable += 1;
                if unreachable >= UNREACHABLE_TRIES {
                    inbox.note_gone(member.peer);
                    return Err(format!("no connection in {unreachable} tries: {why}"));
                }
                tracing::debug!("connecting to member {j}: {why}; retrying");
                // Tries a watch interval apart, as the reducers' (a blip is not a death).
                backoff = backoff.max(WATCH);
            }
            Ok(Err(Open::Retry(why))) => {
                tracing::debug!("opening a stream to member {j}: {why}; retrying");
            }
            Err(_) => return Err("no stream within the open timeout".into()),
        }
        tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// This member's side of part `j`: sends its chunks (if it sends) and reads back the averaged
/// ones into `part`.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    inbox: &Inbox,
    group: &Group,
    me: usize,
    j: usize,
    weight: f32,
    part: &mut [f32],
    residual: Option<&mut [f32]>,
    settings: &Settings,
    timing: Timing,
    crash: &Crash,
    pace: &Pace,
    uplink: &Arc<Uplink>,
    counters: Arc<Counters>,
) -> PartResult {
    let range = group.range(j);
    let chunks = settings.plan.chunks(range.clone(), settings.chunk);
    let mut result = PartResult {
        reducer: j,
        range: range.clone(),
        chunks: chunks.len(),
        chunks_done: 0,
        weight: f64::INFINITY,
        contributors: (0..group.members.len()).collect(),
    };
    let started = Instant::now();
    let (mut reader, mut writer, pacing) =
        match open(inbox, group, me, j, weight, started + settings.open_timeout).await {
            Ok(halves) => halves,
            Err(why) => {
                tracing::warn!(
                    "member {j} (part of {} values) unreachable: {why}",
                    range.len()
                );
                result.weight = 0.0;
                result.contributors.clear();
                return result;
            }
        };
    counters.channel(pacing.is_some());
    // Chunk slices travel from the writer (once sent) to the reader (which overwrites them).
    let mut slices: Vec<&mut [f32]> = Vec::with_capacity(chunks.len());
    let mut rest = part;
    for (r, _) in &chunks {
        let (head, tail) = rest.split_at_mut(r.len());
        slices.push(head);
        rest = tail;
    }
    let mut residual = residual;
    let ready = Mutex::new(std::collections::VecDeque::new());
    let (count_tx, count_rx) = watch::channel(0usize);
    let sends = group.sends(me);
    let n = group.members.len();
    // The reducer's pace is the slowest member's; the first chunk also waits for every stream.
    let slowest = group
        .members
        .iter()
        .map(|m| m.rate)
        .fold(f64::INFINITY, f64::min);
    let write = async {
        // Owned here: when the writer stops, the reader stops waiting for its slices.
        let count_tx = count_tx;
        let mut buf = Vec::new();
        let mut at = 0;
        let total = chunks.len().max(1) as f64;
        let _slot = pace.slot(j);
        let _flow = sends.then(|| uplink.join(pacing));
        for (i, (slice, (_, codec))) in slices.into_iter().zip(&chunks).enumerate() {
            if sends {
                pace.wait(j, (i as f64 - LEAD) / total).await;
                buf.clear();
                match residual.as_deref_mut() {
                    Some(r) if !codec.is_exact() => {
                        let r = &mut r[at..at + slice.len()];
                        codec::encode_with_feedback(*codec, slice, r, &mut buf);
                    }
                    _ => codec::encode(*codec, slice, &mut buf),
                }
                at += slice.len();
                if let Err(e) = write_frame(&mut writer, &[&buf]).await {
                    tracing::debug!("sending to member {j}: {e}");
                    break;
                }
                counters
                    .sent
                    .fetch_add(4 + buf.len() as u64, Ordering::Relaxed);
                pace.set(j, (i + 1) as f64 / total);
                crash.sent_chunk().await;
            }
            lock(&ready).push_back(slice);
            count_tx.send_modify(|c| *c += 1);
        }
        drop(_slot);
        let _ = writer.close().await;
        tracing::debug!("sent part {j} in {:.3} s", started.elapsed().as_secs_f64());
    };
    let read = async {
        let mut buf = Vec::new();
        let mut count_rx = count_rx;
        let mut done = 0;
        for (i, (r, _)) in chunks.iter().enumerate() {
            let mut allow = timing.allow(result_limit(n, r.len()), slowest, n);
            if i == 0 {
                allow += settings.open_timeout;
            }
            let got = tokio::time::timeout(
                allow,
                read_frame(&mut reader, result_limit(n, r.len()), &mut buf),
            )
            .await;
            match got {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!("member {j} stopped returning part {j}: {e}");
                    break;
                }
                Err(_) => {
                    tracing::warn!(
                        "member {j} sent no averaged chunk for {allow:?}: keeping our values"
                    );
                    break;
                }
            }
            counters
                .received
                .fetch_add(4 + buf.len() as u64, Ordering::Relaxed);
            // Our slice of this chunk, once the writer is done with it.
            if count_rx.wait_for(|c| *c > i).await.is_err() {
                break;
            }
            let Some(slice) = lock(&ready).pop_front() else {
                break;
            };
            match parse_result(&buf, n, slice) {
                Ok((chunk_weight, members)) => {
                    result.contributors.retain(|m| members.contains(m));
                    result.weight = result.weight.min(chunk_weight);
                    done += 1;
                }
                Err(e) => {
                    tracing::warn!(
                        "member {j} sent a bad averaged chunk ({e}): keeping our values"
                    );
                    break;
                }
            }
        }
        done
    };
    // The reader ends last unless the reducer failed: then a writer stuck on a reducer that
    // stopped reading is dropped with it (and holds none of this member's other streams back).
    let done = {
        tokio::pin!(write, read);
        let mut written = false;
        let done = loop {
            tokio::select! {
                () = &mut write, if !written => written = true,
                done = &mut read => break done,
            }
        };
        if !written && done == chunks.len() {
            // All back: the writer is only closing.
            let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
        }
        done
    };
    tracing::debug!("part {j} back in {:.3} s", started.elapsed().as_secs_f64());
    result.chunks_done = done;
    if done == 0 {
        result.weight = 0.0;
        result.contributors.clear();
    }
    result
}

/// How many chunks a member's stream to one reducer may run ahead of its slowest stream to
/// another (in chunks of the faster stream's part).
const LEAD: f64 = 4.0;

/// Keeps a member's streams to the reducers sending at the same relative pace: a stream sends
/// its next chunk only while no other live stream has sent a smaller share of its part, give
/// or take [`LEAD`] chunks. Left alone, the TCP flows that share a member's uplink share it
/// badly (on 100 Mbit/s links one flow took most of it: one part was done at 57% of the round,
/// the others at 90–100%), and a round ends with its slowest part. A stream not open yet, or
/// done, holds nobody back.
struct Pace {
    /// Per member: the share of its part this member has sent it.
    shares: watch::Sender<Vec<f64>>,
}

impl Pace {
    fn new(members: usize) -> Pace {
        Pace {
            shares: watch::Sender::new(vec![f64::INFINITY; members]),
        }
    }

    fn set(&self, j: usize, share: f64) {
        self.shares.send_modify(|s| s[j] = share);
    }

    /// Stream `j`'s place, at its start; dropped, it holds nobody back.
    fn slot(&self, j: usize) -> Slot<'_> {
        self.set(j, 0.0);
        Slot { pace: self, j }
    }

    /// Waits until every other stream has sent at least `share` of its part.
    async fn wait(&self, j: usize, share: f64) {
        let mut rx = self.shares.subscribe();
        let _ = rx
            .wait_for(|s| s.iter().enumerate().all(|(k, v)| k == j || *v >= share))
            .await;
    }
}

/// Paces a member's direct channels so its flows share its uplink evenly: while `n` flows
/// send, each may send `rate / n` ([`Settings::pace`]); re-shared as flows start and finish.
struct Uplink {
    rate: Option<f64>,
    flows: Mutex<(u64, Vec<(u64, direct::Pacing)>)>,
}

impl Uplink {
    fn new(rate: Option<f64>) -> Arc<Uplink> {
        Arc::new(Uplink {
            rate: rate.filter(|r| r.is_finite() && *r > 0.0),
            flows: Mutex::new((0, Vec::new())),
        })
    }

    /// A flow sending while the [`Flow`] lives (paced where it has a handle to pace).
    fn join(self: &Arc<Self>, pacing: Option<direct::Pacing>) -> Flow {
        let (Some(_), Some(pacing)) = (self.rate, pacing) else {
            return Flow(None);
        };
        let mut flows = lock(&self.flows);
        let id = flows.0;
        flows.0 += 1;
        flows.1.push((id, pacing));
        self.reshare(&flows.1);
        Flow(Some((self.clone(), id)))
    }

    fn reshare(&self, flows: &[(u64, direct::Pacing)]) {
        let Some(rate) = self.rate else { return };
        let each = rate / flows.len().max(1) as f64;
        for (_, p) in flows {
            p.set(Some(each));
        }
    }
}

/// A flow's place in its member's [`Uplink`]; dropping it gives the share to the others.
struct Flow(Option<(Arc<Uplink>, u64)>);

impl Drop for Flow {
    fn drop(&mut self) {
        if let Some((uplink, id)) = self.0.take() {
            let mut flows = lock(&uplink.flows);
            flows.1.retain(|(i, _)| *i != id);
            uplink.reshare(&flows.1);
        }
    }
}

/// Aborts a task when dropped.
struct Abort(tokio::task::JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often a reducer checks on members that have not opened their streams yet.
const WATCH: Duration = Duration::from_millis(500);

/// Tells the reducer about members that have not opened their stream and to which no
/// connection can be made [`UNREACHABLE_TRIES`] times in a row, [`WATCH`] apart (a member
/// killed after its group formed would otherwise hold the part up for the open timeout).
async fn watch_missing(
    host: Host,
    members: Vec<Member>,
    missing: Arc<Mutex<Vec<bool>>>,
    gone: mpsc::Sender<usize>,
) {
    let mut failures = vec![0usize; members.len()];
    loop {
        tokio::time::sleep(WATCH).await;
        let wanted: Vec<usize> = lock(&missing)
            .iter()
            .enumerate()
            .filter(|(_, m)| **m)
            .map(|(i, _)| i)
            .collect();
        if wanted.is_empty() {
            return;
        }
        for i in wanted {
            let m = &members[i];
            match host.connect(m.peer, m.addrs.clone(), WATCH).await {
                Err(host::Error::Rpc { .. } | host::Error::Dial { .. }) => failures[i] += 1,
                _ => failures[i] = 0,
            }
            if failures[i] == UNREACHABLE_TRIES && gone.send(i).await.is_err() {
                return;
            }
        }
    }
}

/// What a member's round counts as it goes.
#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    direct: AtomicUsize,
    channels: AtomicUsize,
}

impl Counters {
    fn channel(&self, direct: bool) {
        self.channels.fetch_add(1, Ordering::Relaxed);
        if direct {
            self.direct.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A stream's place in its member's [`Pace`].
struct Slot<'a> {
    pace: &'a Pace,
    j: usize,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.pace.set(self.j, f64::INFINITY);
    }
}

/// What a reader task tells the reducer.
enum Arrival {
    Chunk {
        sender: usize,
        chunk: usize,
        values: Vec<f32>,
    },
    Failed {
        sender: usize,
        why: String,
    },
}

/// Reads sender `s`'s chunks of our part and passes them on, at most `window` ahead of the
/// chunks already averaged.
#[allow(clippy::too_many_arguments)]
async fn read_contributions(
    sender: usize,
    mut reader: Reader,
    chunks: Vec<Range<usize>>,
    finished: watch::Receiver<usize>,
    window: usize,
    allow: Vec<Duration>,
    arrivals: mpsc::Sender<Arrival>,
    counters: Arc<Counters>,
    pool: Pool,
) {
    let mut finished = finished;
    let mut buf = Vec::new();
    for (c, range) in chunks.iter().enumerate() {
        if finished.wait_for(|f| c < f + window).await.is_err() {
            return;
        }
        let limit = codec::HEADER + 4 * range.len();
        let failed = |why: String| Arrival::Failed { sender, why };
        let arrival =
            match tokio::time::timeout(allow[c], read_frame(&mut reader, limit, &mut buf)).await {
                Err(_) => failed(format!("sent nothing for {:?}", allow[c])),
                Ok(Err(e)) => failed(e.to_string()),
                Ok(Ok(())) => {
                    counters
                        .received
                        .fetch_add(4 + buf.len() as u64, Ordering::Relaxed);
                    let mut values = pool.take(range.len());
                    match codec::decode_into(&buf, &mut values) {
                        Ok(_) => Arrival::Chunk {
                            sender,
                            chunk: c,
                            values,
                        },
                        Err(e) => failed(e.to_string()),
                    }
                }
            };
        let stop = matches!(arrival, Arrival::Failed { .. });
        if arrivals.send(arrival).await.is_err() || stop {
            return;
        }
    }
}

/// Chunk buffers the reducer is done with, for the readers to fill again (no allocation, no
/// zeroing per chunk).
#[derive(Debug, Clone, Default)]
struct Pool(Arc<Mutex<Vec<Vec<f32>>>>);

impl Pool {
    const MAX: usize = 64;

    fn take(&self, len: usize) -> Vec<f32> {
        let mut v = lock(&self.0).pop().unwrap_or_default();
        v.resize(len, 0.0);
        v
    }

    fn give(&self, v: Vec<f32>) {
        let mut pool = lock(&self.0);
        if pool.len() < Self::MAX {
            pool.push(v);
        }
    }
}

/// Writes the averaged chunks to one member as they come.
async fn write_results(mut writer: Writer, mut results: mpsc::Receiver<Arc<Vec<u8>>>, flow: Flow) {
    let _flow = flow;
    while let Some(frame) = results.recv().await {
        if write_frame(&mut writer, &[&frame]).await.is_err() {
            return;
        }
    }
    let _ = writer.close().await;
}

/// This member's part: takes the streams of the round, aggregates chunk by chunk, returns the
/// averaged chunks to every member, and writes them into `part`.
#[allow(clippy::too_many_arguments)]
async fn reduce(
    mut registration: Registration,
    group: &Group,
    me: usize,
    weight: f32,
    part: &mut [f32],
    settings: &Settings,
    timing: Timing,
    crash: &Crash,
    uplink: &Arc<Uplink>,
    counters: Arc<Counters>,
    inbox: &Inbox,
) -> (PartResult, Vec<(usize, String)>) {
    let started = Instant::now();
    let n = group.members.len();
    let range = group.range(me);
    let chunks = settings.plan.chunks(range.clone(), settings.chunk);
    let ranges: Vec<Range<usize>> = chunks
        .iter()
        .map(|(r, _)| r.start - range.start..r.end - range.start)
        .collect();
    let my_rate = group.members[me].rate;
    let (arrivals_tx, mut arrivals) = mpsc::channel::<Arrival>(4 * n);
    let (finished_tx, finished_rx) = watch::channel(0usize);
    let mut writers: Vec<mpsc::Sender<Arc<Vec<u8>>>> = Vec::new();
    let mut joined = vec![false; n];
    joined[me] = true;
    // Senders whose contributions each chunk still waits for.
    let mut live: Vec<bool> = (0..n).map(|i| i != me && group.sends(i)).collect();
    let mut excluded: Vec<(usize, String)> = Vec::new();
    for (i, m) in group.members.iter().enumerate() {
        if i != me && inbox.is_gone(&m.peer) {
            joined[i] = true;
            if live[i] {
                live[i] = false;
                excluded.push((i, "gone: found unreachable lately".into()));
            }
        }
        // A banned member still gets this part's average (its stream is taken); what it sends
        // is ignored.
        if i != me && live[i] && inbox.is_banned(&m.peer) {
            live[i] = false;
            excluded.push((i, BANNED.into()));
        }
    }
    let mut pending: HashMap<usize, Vec<Option<Vec<f32>>>> = HashMap::new();
    let mut weights = vec![0f32; n];
    weights[me] = weight;
    let open_deadline = tokio::time::Instant::now() + settings.open_timeout;
    // Members gone since the group formed are given up on before the open deadline.
    let missing = Arc::new(Mutex::new(joined.iter().map(|j| !j).collect::<Vec<bool>>()));
    let (gone_tx, mut gone) = mpsc::channel::<usize>(n.max(1));
    let _watcher = Abort(tokio::spawn(watch_missing(
        inbox.host.clone(),
        group.members.clone(),
        missing.clone(),
        gone_tx,
    )));
    let mut result = PartResult {
        reducer: me,
        range: range.clone(),
        chunks: chunks.len(),
        chunks_done: 0,
        weight: f64::INFINITY,
        contributors: (0..n).collect(),
    };
    let mut out = Vec::new();
    let mut done_results: Vec<Arc<Vec<u8>>> = Vec::new();
    let pool = Pool::default();
    let mut arrived = 0;
    let mut next = 0;
    // Until every chunk is averaged, and every member has its stream (late ones get the
    // averaged chunks so far at once) or the open deadline passed.
    while next < chunks.len() || joined.iter().any(|j| !j) {
        // Finish every chunk that has all it waits for.
        let complete = |c: usize, pending: &HashMap<usize, Vec<Option<Vec<f32>>>>| {
            (0..n).all(|s| !live[s] || pending.get(&c).is_some_and(|v| v[s].is_some()))
        };
        if next < chunks.len() && complete(next, &pending) {
            let got = pending.remove(&next).unwrap_or_else(|| vec![None; n]);
            let r = ranges[next].clone();
            let mut contributions: Vec<Contribution<'_>> = Vec::with_capacity(n);
            if group.sends(me) {
                contributions.push(Contribution {
                    peer: me,
                    weight,
                    values: &part[r.clone()],
                });
            }
            for (s, v) in got.iter().enumerate() {
                if let Some(v) = v {
                    contributions.push(Contribution {
                        peer: s,
                        weight: weights[s],
                        values: v,
                    });
                }
            }
            out.resize(r.len(), 0.0);
            let outcome =
                aggregate::aggregate(settings.rule, settings.checks, &contributions, &mut out);
            drop(contributions);
            for (s, why) in &outcome.dropped {
                if live[*s] {
                    live[*s] = false;
                    let why = describe(why);
                    inbox.strike(group.members[*s].peer, &why);
                    excluded.push((*s, format!("contribution dropped: {why}")));
                }
            }
            if outcome.weight > 0.0 {
                part[r.clone()].copy_from_slice(&out);
            }
            result.weight = result.weight.min(outcome.weight);
            result.contributors.retain(|m| outcome.kept.contains(m));
            for v in got.into_iter().flatten() {
                pool.give(v);
            }
            let mut bitmap = vec![0u8; n.div_ceil(8)];
            for &m in &outcome.kept {
                bitmap[m / 8] |= 1 << (m % 8);
            }
            let codec = chunks[next].1;
            let mut frame = Vec::with_capacity(8 + bitmap.len() + codec.encoded_len(r.len()));
            frame.extend_from_slice(&outcome.weight.to_le_bytes());
            frame.extend_from_slice(&bitmap);
            codec::encode(codec, &part[r], &mut frame);
            let shared = Arc::new(frame);
            for w in &writers {
                // Bounded by the chunk count: never waits.
                if w.try_send(shared.clone()).is_ok() {
                    counters
                        .sent
                        .fetch_add(4 + shared.len() as u64, Ordering::Relaxed);
                }
            }
            // Kept for members yet to open their stream only.
            if joined.iter().all(|j| *j) {
                done_results.clear();
            } else {
                done_results.push(shared);
            }
            next += 1;
            result.chunks_done = next;
            let _ = finished_tx.send(next);
            crash.check(Fault::Returning(next)).await;
            continue;
        }
        let joining = joined.iter().any(|j| !j);
        tokio::select! {
            arrival = arrivals.recv() => match arrival {
                Some(Arrival::Chunk { sender, chunk, values }) => {
                    arrived += 1;
                    crash.check(Fault::Reducing(arrived)).await;
                    if live[sender] && chunk >= next {
                        pending.entry(chunk).or_insert_with(|| vec![None; n])[sender] = Some(values);
                    }
                }
                Some(Arrival::Failed { sender, why }) if live[sender] => {
                    tracing::warn!("excluding member {sender} from part {me}: {why}");
                    live[sender] = false;
                    excluded.push((sender, why));
                }
                Some(Arrival::Failed { .. }) | None => {}
            },
            incoming = registration.streams.recv(), if joining => {
                let Some(Incoming { peer, hello, reader, mut writer, pacing }) = incoming else { continue };
                let s = hello.sender as usize;
                if group.index_of(&peer) != Some(s) || joined[s] {
                    let _ = write_message(&mut writer, &Ack::Refused("not a member of this round".into())).await;
                    continue;
                }
                if write_message(&mut writer, &Ack::Ok).await.is_err() {
                    continue;
                }
                joined[s] = true;
                lock(&missing)[s] = false;
                weights[s] = if group.sends(s) && hello.weight.is_finite() { hello.weight.max(0.0) } else { 0.0 };
                let (tx, rx) = mpsc::channel(chunks.len().max(1));
                // Chunks already averaged go out first.
                for f in &done_results {
                    let _ = tx.try_send(f.clone());
                }
                writers.push(tx);
                counters.channel(pacing.is_some());
                tokio::spawn(write_results(writer, rx, uplink.join(pacing)));
                if live[s] {
                    let sender_rate = group.members[s].rate;
                    let allow: Vec<Duration> = ranges
                        .iter()
                        .map(|r| {
                            let bytes = codec::HEADER + 4 * r.len();
                            timing.allow(bytes, sender_rate, n).max(timing.allow(bytes, my_rate, n))
                        })
                        .collect();
                    tokio::spawn(read_contributions(
                        s,
                        reader,
                        ranges.clone(),
                        finished_rx.clone(),
                        settings.window,
                        allow,
                        arrivals_tx.clone(),
                        counters.clone(),
                        pool.clone(),
                    ));
                }
            },
            Some(s) = gone.recv(), if joining => {
                inbox.note_gone(group.members[s].peer);
                if !joined[s] {
                    joined[s] = true;
                    if live[s] {
                        live[s] = false;
                        excluded.push((s, "gone: no connection to it can be made".into()));
                    }
                }
            }
            _ = tokio::time::sleep_until(open_deadline), if joining => {
                for s in 0..n {
                    if !joined[s] {
                        joined[s] = true;
                        if live[s] {
                            live[s] = false;
                            excluded.push((s, "never opened its stream".into()));
                        }
                    }
                }
            }
        }
    }
    drop(writers);
    tracing::debug!(
        "reduced part {me} in {:.3} s",
        started.elapsed().as_secs_f64()
    );
    if result.chunks == 0 {
        result.weight = 0.0;
    }
    (result, excluded)
}

fn describe(why: &Dropped) -> String {
    match why {
        Dropped::NonFinite => "non-finite values".into(),
        Dropped::BadWeight(w) => format!("bad weight {w}"),
        Dropped::Norm { norm, limit } => format!("norm {norm} past {limit}"),
        Dropped::Length { got, expected } => format!("{got} values, {expected} expected"),
    }
}
