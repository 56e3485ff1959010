//! This member's side of every other member's part: [`open`] a stream to the reducer (moving
//! to a direct channel where it offers one, retrying until the open deadline, giving up on a
//! member no connection can be made to), then [`exchange`]: send this member's chunks of the
//! part, paced ([`super::flow`]), and read the averaged chunks back into the buffer, both at
//! once. The reducer's side is [`super::reduce`].

use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::AsyncWriteExt;
use potluck_core::lock;
use potluck_net::direct;
use potluck_net::frame::{read_frame, write_frame, write_message};
use potluck_net::host;
use tokio::sync::watch;

use super::flow::{LEAD, paced_bytes};
use super::reduce::WATCH;
use super::round::Round;
use super::wire::{Ack, Hello, PROTOCOL, parse_result, read_control, result_limit};
use super::{PartResult, Reader, Writer};
use crate::codec;

/// Why opening a stream failed.
enum Open {
    /// No connection to the member could be made (a process gone refuses at once).
    Unreachable(String),
    /// Connected, but the stream failed or was refused (the round not started there yet,
    /// say): worth another try until the open deadline.
    Retry(String),
    /// The member ran the round and is done with it: it will never take this part.
    Left,
}

/// Times a member may be found unreachable, [`WATCH`] apart, before the round goes on without
/// it and the next rounds leave it out for [`GONE_FOR`] (a member killed after its group formed
/// would otherwise hold everyone up for the open timeout, round after round).
///
/// [`GONE_FOR`]: super::GONE_FOR
pub(super) const UNREACHABLE_TRIES: usize = 3;

/// Opens a stream to member `j`, says hello and moves to a direct channel where the member
/// offers one and it connects; retries refusals until the open deadline (a reducer that has
/// not started the round yet refuses it as unknown).
async fn open(
    round: &Round<'_>,
    j: usize,
    deadline: Instant,
) -> Result<(Reader, Writer, Option<direct::Pacing>), String> {
    let &Round {
        inbox,
        group,
        me,
        weight,
        ..
    } = round;
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
                Ok(Ack::Left) => return Err(Open::Left),
                Ok(Ack::Direct(offer)) => inbox
                    .host
                    .choose_direct(stream, member.peer, &offer)
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
                Ok(Ack::Left) => Err(Open::Left),
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
            Ok(Err(Open::Left)) => {
                // This member's reducer need not wait for its stream either.
                inbox.note_left(group.round, member.peer);
                return Err("it left the round".into());
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
pub(super) async fn exchange(
    round: &Round<'_>,
    j: usize,
    part: &mut [f32],
    residual: Option<&mut [f32]>,
) -> PartResult {
    let &Round {
        group,
        me,
        settings,
        timing,
        ref crash,
        ref pace,
        ref uplink,
        ref counters,
        ..
    } = round;
    let range = group.range(j);
    let chunks = settings.plan.chunks(range.clone(), settings.chunk);
    let mut result = PartResult {
        reducer: j,
        range: range.clone(),
        chunks: chunks.len(),
        chunks_done: 0,
        weight: f64::INFINITY,
        contributors: (0..group.members.len()).collect(),
        unreached: None,
    };
    let started = Instant::now();
    let (mut reader, mut writer, pacing) =
        match open(round, j, started + settings.open_timeout).await {
            Ok(halves) => halves,
            Err(why) => {
                tracing::warn!(
                    "member {j} (part of {} values) unreachable: {why}",
                    range.len()
                );
                result.weight = 0.0;
                result.contributors.clear();
                result.unreached = Some(why);
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
    // A chunk's average waits for that chunk from every sender, each paced (`flow::Pace`).
    let paced = paced_bytes(group, settings, chunks.len());
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
            let mut allow = timing
                .allow(result_limit(n, r.len()), slowest, n)
                .max(timing.allow(paced, slowest, 1));
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
