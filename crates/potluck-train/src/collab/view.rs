//! What the progress task learned of the swarm ([`View`]), and what a peer asks of it: the
//! newest state the other peers hold and its donors, the weight a peer's contribution may
//! carry, the optimizer settings of the run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use potluck_core::clock::Time;

use crate::progress::{self, SwarmState};
use crate::sync::Donor;
use crate::tokenizers;

/// What the progress task learned of the swarm.
#[derive(Debug, Clone)]
pub(super) struct View {
    pub(super) state: SwarmState,
    /// The same, of the other peers alone (this peer's own count is exact where it computes).
    pub(super) others_state: SwarmState,
    /// Other live peers: the epochs they compute for and hold the state of, and their
    /// addresses (donors of that state).
    pub(super) others: Vec<(u64, u64, Donor)>,
    /// No other peer seen for a good while: this peer steps alone.
    pub(super) alone: bool,
    /// The newest report seen of each peer for each recent epoch (a peer's record holds only
    /// its latest epoch: what it said of the one before is kept here).
    pub(super) reported: Arc<Reported>,
    /// How long a report counts (see [`report_ttl`]).
    pub(super) ttl: Duration,
    /// Live peers whose data was encoded with other tokenizers, and theirs: left out of
    /// everything above.
    pub(super) strangers: Vec<(PeerId, tokenizers::Id)>,
    /// Live peers of this peer's tokenizers that train by another recipe
    /// ([`Settings::recipe`]), and theirs: left out as strangers are.
    pub(super) misfits: Vec<(PeerId, String)>,
    /// The digest of the optimizer settings each of `others` reports.
    pub(super) optimizers: HashMap<PeerId, u64>,
}

/// Reports seen, by peer and epoch.
pub(super) type Reported = HashMap<(PeerId, u64), progress::Report>;

/// Peers that claimed to hold a state they did not serve (no manifest of that epoch), and the
/// epoch they claimed: their claim is not believed until it changes.
pub(super) type Unserved = HashMap<PeerId, u64>;

/// A contribution may weigh this many times the samples its sender was seen to report (at
/// its reported rate until now): room for the micro-batches reported after the last read.
pub(super) const GRANT_SLACK: f64 = 1.5;

impl View {
    /// Samples of `epoch` the swarm holds, computed or under way, when this peer holds `mine`.
    pub(super) fn committed(&self, epoch: u64, mine: u64) -> u64 {
        let others = if self.others_state.epoch == epoch {
            self.others_state.committed
        } else {
            0
        };
        mine.saturating_add(others)
    }

    /// The most weight `peer`'s contribution to `epoch` may carry at `now`: the samples it
    /// reported for that epoch, extrapolated at its reported rate (for at most a report's
    /// lifetime), times [`GRANT_SLACK`]; none if it reported none. A weight is a claim: it
    /// counts only as far as the samples the peer told the swarm it computed (which brought
    /// the epoch's end nearer for everyone).
    pub(super) fn granted(&self, peer: PeerId, epoch: u64, now: Time) -> f64 {
        let Some(r) = self.reported.get(&(peer, epoch)) else {
            return 0.0;
        };
        let since = now.saturating_sub(r.time).min(self.ttl.as_millis() as u64) as f64 / 1000.0;
        let rate = if r.samples_per_second.is_finite() {
            r.samples_per_second.max(0.0)
        } else {
            0.0
        };
        (r.samples as f64 + rate * since) * GRANT_SLACK
    }

    /// The newest state the other peers hold, as far as more than half of them back it
    /// ([`progress::majority`]: one peer claiming to be ahead is not believed, and cannot make
    /// itself the only donor), leaving out the claims in `unserved` (a peer and the epoch it
    /// claimed but could not serve).
    pub(super) fn newest(&self, unserved: &Unserved) -> u64 {
        self.newest_of(unserved, None)
    }

    /// [`View::newest`] of the peers that report the optimizer settings of digest `optimizer`
    /// (None: of all).
    pub(super) fn newest_of(&self, unserved: &Unserved, optimizer: Option<u64>) -> u64 {
        progress::majority(
            self.others
                .iter()
                .filter(|(_, h, d)| unserved.get(&d.peer) != Some(h) && self.of(d, optimizer))
                .map(|(_, h, _)| *h),
        )
    }

    /// The donors of the state at `epoch` (those that claim to hold it, less `unserved`) that
    /// report the optimizer settings of digest `optimizer` (None: any).
    pub(super) fn donors(
        &self,
        epoch: u64,
        unserved: &Unserved,
        optimizer: Option<u64>,
    ) -> Vec<Donor> {
        self.others
            .iter()
            .filter(|(_, h, d)| {
                *h == epoch && unserved.get(&d.peer) != Some(h) && self.of(d, optimizer)
            })
            .map(|(_, _, d)| d.clone())
            .collect()
    }

    /// Whether `donor` reports the optimizer settings of digest `optimizer` (None: any).
    fn of(&self, donor: &Donor, optimizer: Option<u64>) -> bool {
        optimizer.is_none_or(|o| self.optimizers.get(&donor.peer) == Some(&o))
    }

    /// The optimizer settings of the run, by digest: those most live peers report, this peer
    /// (training with `mine`) among them; of equally many, the smallest digest, so that every
    /// peer that sees the same reports picks the same.
    pub(super) fn run_optimizer(&self, mine: u64) -> u64 {
        most_reported(self.optimizers.values().copied().chain([mine]))
    }
}

/// The digest most of `digests` are; of equally many, the smallest (0 if there are none).
/// Every peer that counts the same reports picks the same; a tie is two sides of equal
/// numbers, where no honest majority decides (a liar beside one honest peer wins half of
/// them, as it is believed in everything else of two).
fn most_reported(digests: impl Iterator<Item = u64>) -> u64 {
    let mut counts: HashMap<u64, usize> = HashMap::new();
    for d in digests {
        *counts.entry(d).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|&(d, n)| (n, std::cmp::Reverse(d)))
        .map_or(0, |(d, _)| d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The run's optimizer settings are those most peers report, whoever counts them; a tie
    /// goes to the same side for every peer.
    #[test]
    fn the_run_s_optimizer_settings_are_those_most_peers_report() {
        assert_eq!(most_reported([7, 9, 9].into_iter()), 9);
        assert_eq!(most_reported([9, 7, 9].into_iter()), 9);
        // One against one: the smaller, seen from either side.
        assert_eq!(most_reported([9, 7].into_iter()), 7);
        assert_eq!(most_reported([7, 9].into_iter()), 7);
        assert_eq!(most_reported([5, 5, 9, 9, 3].into_iter()), 5);
        assert_eq!(most_reported(std::iter::empty()), 0);
    }
}
