//! Flow control of a member's sending: [`Pace`] keeps its streams to the reducers at the same
//! relative progress, and [`Uplink`] paces its direct channels so they share its uplink evenly
//! ([`Settings::pace`](super::Settings::pace)). Shared state only: the senders that wait on it
//! are [`super::send`]'s and [`super::reduce`]'s.

use std::sync::{Arc, Mutex};

use potluck_net::direct;
use tokio::sync::watch;

use potluck_core::lock;

use super::{Group, Settings};
use crate::codec;

/// How many chunks a member's stream to one reducer may run ahead of its slowest stream to
/// another (in chunks of the faster stream's part).
pub(super) const LEAD: f64 = 4.0;

/// Keeps a member's streams to the reducers sending at the same relative pace: a stream sends
/// its next chunk only while no other live stream has sent a smaller share of its part, give
/// or take [`LEAD`] chunks. Left alone, the TCP flows that share a member's uplink share it
/// badly (on 100 Mbit/s links one flow took most of it: one part was done at 57% of the round,
/// the others at 90–100%), and a round ends with its slowest part. A stream not open yet, or
/// done, holds nobody back.
pub(super) struct Pace {
    /// Per member: the share of its part this member has sent it.
    shares: watch::Sender<Vec<f64>>,
}

impl Pace {
    pub(super) fn new(members: usize) -> Pace {
        Pace {
            shares: watch::Sender::new(vec![f64::INFINITY; members]),
        }
    }

    pub(super) fn set(&self, j: usize, share: f64) {
        self.shares.send_modify(|s| s[j] = share);
    }

    /// Stream `j`'s place, at its start; dropped, it holds nobody back.
    pub(super) fn slot(&self, j: usize) -> Slot<'_> {
        self.set(j, 0.0);
        Slot { pace: self, j }
    }

    /// Waits until every other stream has sent at least `share` of its part.
    pub(super) async fn wait(&self, j: usize, share: f64) {
        let mut rx = self.shares.subscribe();
        let _ = rx
            .wait_for(|s| s.iter().enumerate().all(|(k, v)| k == j || *v >= share))
            .await;
    }
}

/// The bytes a sender may send while one chunk of a part of `chunks` chunks waits on its
/// [`Pace`]: `LEAD + 1` of that part's shares of everything it sends (at most the whole
/// buffer, counted in f32). Each chunk of a part may take that long, at the slower end's rate,
/// whatever its own size: with parts cut by rate, or a part of many small tensors' chunks, it
/// is far more than one chunk's bytes (three `small` peers on 10 Mbit/s links left a sender
/// out of a part after a 2 s wait, the allowance of a small chunk, in most rounds).
pub(super) fn paced_bytes(group: &Group, settings: &Settings, chunks: usize) -> usize {
    let buffer: usize = (0..group.members.len())
        .map(|j| {
            let r = group.range(j);
            let count = settings.plan.chunks(r.clone(), settings.chunk).len();
            codec::HEADER * count + 4 * r.len()
        })
        .sum();
    (buffer as f64 * (LEAD + 1.0) / chunks.max(1) as f64) as usize
}

/// Paces a member's direct channels so its flows share its uplink evenly: while `n` flows
/// send, each may send `rate / n` ([`Settings::pace`]); re-shared as flows start and finish.
pub(super) struct Uplink {
    rate: Option<f64>,
    flows: Mutex<(u64, Vec<(u64, direct::Pacing)>)>,
}

impl Uplink {
    pub(super) fn new(rate: Option<f64>) -> Arc<Uplink> {
        Arc::new(Uplink {
            rate: rate.filter(|r| r.is_finite() && *r > 0.0),
            flows: Mutex::new((0, Vec::new())),
        })
    }

    /// A flow sending while the [`Flow`] lives (paced where it has a handle to pace).
    pub(super) fn join(self: &Arc<Self>, pacing: Option<direct::Pacing>) -> Flow {
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
pub(super) struct Flow(Option<(Arc<Uplink>, u64)>);

impl Drop for Flow {
    fn drop(&mut self) {
        if let Some((uplink, id)) = self.0.take() {
            let mut flows = lock(&uplink.flows);
            flows.1.retain(|(i, _)| *i != id);
            uplink.reshare(&flows.1);
        }
    }
}

/// A stream's place in its member's [`Pace`].
pub(super) struct Slot<'a> {
    pace: &'a Pace,
    j: usize,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.pace.set(self.j, f64::INFINITY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Mode;
    use crate::butterfly::Member;
    use libp2p::PeerId;

    /// A chunk of a part cut small (its reducer's rate a third of the others') may wait on the
    /// sender's pace for the time of several of the larger parts' chunks: its allowance counts
    /// them, not its own bytes alone. Equal parts allow `LEAD + 1` chunks of every part.
    #[test]
    fn a_small_parts_chunk_may_wait_for_the_larger_parts() {
        let member = |rate| Member {
            peer: PeerId::random(),
            addrs: Vec::new(),
            mode: Mode::Full,
            rate,
            max_weight: f64::INFINITY,
        };
        let settings = Settings {
            chunk: 1000,
            ..Settings::default()
        };
        let len = 30_000;
        let equal = Group::new([0; 32], vec![member(1e6); 3], len).unwrap();
        let per_part = settings.plan.chunks(equal.range(0), settings.chunk).len();
        assert_eq!(per_part, 10);
        // Three parts of 10 chunks of 4 kB and a header each, LEAD + 1 = 5 chunks of each.
        let chunk_bytes = codec::HEADER + 4 * 1000;
        assert_eq!(
            paced_bytes(&equal, &settings, per_part),
            5 * 3 * chunk_bytes
        );
        let uneven = Group::new([0; 32], vec![member(1e6), member(3e6), member(3e6)], len).unwrap();
        let small = (0..3).min_by_key(|&j| uneven.range(j).len()).unwrap();
        let chunks = settings
            .plan
            .chunks(uneven.range(small), settings.chunk)
            .len();
        assert!(chunks < per_part, "{chunks}");
        // Many times one chunk's bytes times the group's size (the allowance before).
        assert!(paced_bytes(&uneven, &settings, chunks) > 6 * 3 * chunk_bytes);
    }
}
