//! This member's own part, as its reducer: [`reduce`] takes the round's streams from the
//! inbox, reads every sender's chunks ([`read_contributions`], at most
//! [`Settings::window`] ahead), aggregates chunk by chunk ([`crate::aggregate`]) as the
//! contributions arrive, and returns every averaged chunk to every member as soon as it is done
//! ([`write_results`]). Senders that go silent, send bad values or never come are excluded for
//! the rest of the round. The senders' side is [`super::send`].
//!
//! [`Settings::window`]: super::Settings::window

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::AsyncWriteExt;
use potluck_core::lock;
use potluck_net::frame::{read_frame, write_frame, write_message};
use potluck_net::host;
use tokio::sync::{mpsc, watch};

use super::flow::{Flow, paced_bytes};
use super::inbox::{Inbox, Incoming, Registration};
use super::round::{Counters, Round};
use super::send::UNREACHABLE_TRIES;
use super::wire::{Ack, parse_result, result_frame};
use super::{BANNED, Fault, Member, PartResult, Reader, Writer};
use crate::aggregate::{self, Contribution, Dropped};
use crate::codec;

/// Aborts a task when dropped.
struct Abort(tokio::task::JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often a reducer checks on members that have not opened their streams yet.
pub(super) const WATCH: Duration = Duration::from_millis(500);

/// Tells the reducer about members that have not opened their stream and to which no
/// connection can be made [`UNREACHABLE_TRIES`] times in a row, [`WATCH`] apart (a member
/// killed after its group formed would otherwise hold the part up for the open timeout).
async fn watch_missing(
    inbox: Inbox,
    round: [u8; 32],
    members: Vec<Member>,
    missing: Arc<Mutex<Vec<bool>>>,
    gone: mpsc::Sender<(usize, Missing)>,
) {
    let host = inbox.host.clone();
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
            // This member's own stream to it learned that it left the round.
            if inbox.has_left(round, &m.peer) {
                if gone.send((i, Missing::Left)).await.is_err() {
                    return;
                }
                continue;
            }
            match host.connect(m.peer, m.addrs.clone(), WATCH).await {
                Err(host::Error::Rpc { .. } | host::Error::Dial { .. }) => failures[i] += 1,
                _ => failures[i] = 0,
            }
            if failures[i] == UNREACHABLE_TRIES && gone.send((i, Missing::Gone)).await.is_err() {
                return;
            }
        }
    }
}

/// Why a member that has not opened its stream is no longer waited for.
#[derive(Debug, Clone, Copy)]
enum Missing {
    /// No connection to it can be made.
    Gone,
    /// It told this member's sender that it left the round.
    Left,
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

/// What every reader of this member's part shares (each its own clone: readers are tasks).
#[derive(Clone)]
struct Readers {
    /// The part's chunks, as ranges of the part.
    chunks: Vec<Range<usize>>,
    /// Chunks averaged so far.
    finished: watch::Receiver<usize>,
    /// Chunks a reader may read ahead of those averaged
    /// ([`Settings::window`](super::Settings::window)).
    window: usize,
    arrivals: mpsc::Sender<Arrival>,
    counters: Arc<Counters>,
    pool: Pool,
}

/// Reads `sender`'s chunks of our part and passes them on, at most `window` ahead of the
/// chunks already averaged; `allow` is how long each chunk may take.
async fn read_contributions(
    sender: usize,
    mut reader: Reader,
    allow: Vec<Duration>,
    readers: Readers,
) {
    let Readers {
        chunks,
        mut finished,
        window,
        arrivals,
        counters,
        pool,
    } = readers;
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
pub(super) async fn reduce(
    round: &Round<'_>,
    mut registration: Registration,
    part: &mut [f32],
    mut residual: Option<&mut [f32]>,
) -> (PartResult, Vec<(usize, String)>) {
    let &Round {
        inbox,
        group,
        me,
        weight,
        settings,
        timing,
        ref crash,
        ref uplink,
        ref counters,
        ..
    } = round;
    let started = Instant::now();
    let n = group.members.len();
    let range = group.range(me);
    let chunks = settings.plan.chunks(range.clone(), settings.chunk);
    let ranges: Vec<Range<usize>> = chunks
        .iter()
        .map(|(r, _)| r.start - range.start..r.end - range.start)
        .collect();
    let my_rate = group.members[me].rate;
    let paced = paced_bytes(group, settings, chunks.len());
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
    weights[me] = weight.min(group.granted(me));
    let open_deadline = tokio::time::Instant::now() + settings.open_timeout;
    // Members gone since the group formed are given up on before the open deadline.
    let missing = Arc::new(Mutex::new(joined.iter().map(|j| !j).collect::<Vec<bool>>()));
    let (gone_tx, mut gone) = mpsc::channel::<(usize, Missing)>(n.max(1));
    let _watcher = Abort(tokio::spawn(watch_missing(
        inbox.clone(),
        group.round,
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
        unreached: None,
    };
    let mut out = Vec::new();
    let mut done_results: Vec<Arc<Vec<u8>>> = Vec::new();
    let pool = Pool::default();
    let readers = Readers {
        chunks: ranges.clone(),
        finished: finished_rx,
        window: settings.window,
        arrivals: arrivals_tx,
        counters: counters.clone(),
        pool: pool.clone(),
    };
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
                    weight: weights[me],
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
            let codec = chunks[next].1;
            let frame = if settings.forge {
                let forged: Vec<f32> = part[r].iter().map(|v| -10.0 * v).collect();
                result_frame(outcome.weight, &outcome.kept, n, codec, &forged, None)
            } else {
                // With error feedback, what the result's rounding leaves out goes into the
                // next round's result of these values (every member gets the same bytes).
                let residual = residual
                    .as_deref_mut()
                    .filter(|_| !codec.is_exact())
                    .map(|res| &mut res[r.clone()]);
                let values = &part[r.clone()];
                let frame = result_frame(outcome.weight, &outcome.kept, n, codec, values, residual);
                // The reducer keeps what the others receive: with a lossy codec, the exact
                // average kept here made its parameters drift from theirs epoch after epoch.
                if !codec.is_exact() {
                    let _ = parse_result(&frame, n, &mut part[r]);
                }
                frame
            };
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
                // A weight counts up to what the swarm saw its sender report.
                weights[s] = if group.sends(s) && hello.weight.is_finite() { hello.weight.max(0.0).min(group.granted(s)) } else { 0.0 };
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
                            let rate = sender_rate.min(my_rate);
                            timing.allow(bytes, rate, n).max(timing.allow(paced, rate, 1))
                        })
                        .collect();
                    tokio::spawn(read_contributions(s, reader, allow, readers.clone()));
                }
            },
            Some((s, why)) = gone.recv(), if joining => {
                let why = match why {
                    Missing::Gone => {
                        inbox.note_gone(group.members[s].peer);
                        "gone: no connection to it can be made"
                    }
                    Missing::Left => "it left the round",
                };
                if !joined[s] {
                    joined[s] = true;
                    if live[s] {
                        live[s] = false;
                        excluded.push((s, why.into()));
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
