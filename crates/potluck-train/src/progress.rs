//! Progress tracking over the DHT, the clock of collaborative training: every peer publishes a
//! signed [`Report`] (its epoch, the samples it accumulated in it, its samples/s, when) under
//! its own subkey of `RUN/progress`; every peer reads everyone's and estimates the swarm's
//! state ([`swarm_state`]): the epoch, the samples gathered toward the target batch, and when
//! the target will be reached, so matchmaking can be scheduled ahead of it. A report is its
//! sender's word: what it claims counts only as far as what this peer has seen allows
//! ([`Measure`]).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::identity::Keypair;
use potluck_core::clock::{self, Time};
use potluck_net::dht::typed::{self, Owned, Typed};
use potluck_net::dht::{self, Dht};
use serde::{Deserialize, Serialize};

/// What one peer says of its progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The global epoch it is accumulating gradients for.
    pub epoch: u64,
    /// Samples it accumulated in that epoch so far, counting the micro-batch under way (it
    /// will be in before the peer averages).
    pub samples: u64,
    /// Its recent throughput.
    pub samples_per_second: f64,
    /// Wall clock (ms) when `samples` was counted.
    pub time: Time,
    /// Steps in the state it serves (its epoch, or one less while its step is under way).
    pub held: u64,
    /// Where it can be reached (multiaddrs as bytes): it serves its state there.
    pub addrs: Vec<Vec<u8>>,
    /// The tokenizers its data was encoded with ([`crate::tokenizers::Bundle::id`]).
    pub tokenizers: crate::tokenizers::Id,
    /// How it trains ([`crate::collab::Settings::recipe`]): peers of another are left out.
    pub recipe: String,
    /// A digest of its state's optimizer settings ([`crate::optim::Config::digest`]): a peer
    /// whose settings are not those most peers report takes theirs.
    pub optimizer: u64,
}

/// The longest recipe a report may carry.
pub const MAX_RECIPE: usize = 256;

impl Typed for Report {
    const NAME: &'static str = "progress";
    const MAX_BYTES: usize = 64 << 10;

    fn is_key(key: &[u8]) -> bool {
        typed::ends_with(key, "progress")
    }

    fn check(&self) -> Result<(), String> {
        if self.recipe.len() > MAX_RECIPE {
            return Err(format!("a recipe of {} bytes", self.recipe.len()));
        }
        typed::check_addrs(&self.addrs)
    }
}

/// The deadline of an epoch's averaging (wall-clock ms), as a peer proposes it under
/// `RUN/close/EPOCH`: every peer takes the earliest proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Deadline(pub Time);

impl Typed for Deadline {
    const NAME: &'static str = "deadline";
    const MAX_BYTES: usize = 16;

    fn is_key(key: &[u8]) -> bool {
        typed::numbered(key, "close", None)
    }
}

/// The deadlines proposed for `epoch` of `run`.
pub fn deadlines(run: &str, epoch: u64) -> Owned<Deadline> {
    Owned::at(format!("{run}/close/{epoch}"))
}

/// The swarm as one peer estimates it.
#[derive(Debug, Clone, PartialEq)]
pub struct SwarmState {
    /// The latest epoch a quorum of the live peers reports ([`quorum`]): one peer's claim to
    /// be ahead moves no one.
    pub epoch: u64,
    /// Samples gathered toward the target in that epoch, extrapolated to now.
    pub samples: u64,
    /// Samples the peers in that epoch reported, computed or under way (not extrapolated).
    pub committed: u64,
    /// Samples/s of the peers in that epoch.
    pub samples_per_second: f64,
    /// Live peers (reports not older than the staleness limit), and those in the epoch.
    pub peers: usize,
    pub in_epoch: usize,
    /// Peers in the epoch that compute (samples or a rate in it; not an aux peer).
    pub computing: usize,
    /// Estimated time until the target is reached (zero once it is; `None` with no rate).
    pub eta: Option<Duration>,
}

impl SwarmState {
    /// Whether the epoch's target batch is reached: the peers reported that many samples,
    /// computed or under way (every peer finishes its micro-batch before it averages).
    pub fn ready(&self, target: u64) -> bool {
        self.committed >= target
    }
}

/// The newest epoch that more than half of `claims` reach (of two, the older): what a peer
/// downloads, where one liar of two must not be the donor.
pub fn majority(claims: impl Iterator<Item = u64>) -> u64 {
    ranked(claims, |n| n / 2)
}

/// The claim at position `at(len)` from the newest (0 if there are none).
fn ranked(claims: impl Iterator<Item = u64>, at: fn(usize) -> usize) -> u64 {
    let mut claims: Vec<u64> = claims.collect();
    claims.sort_unstable_by(|a, b| b.cmp(a));
    claims.get(at(claims.len())).copied().unwrap_or(0)
}

/// The newest epoch that at least half of `claims` reach: a peer's epoch is its own word, so a
/// claim counts only as far as as many others back it. One claim counts alone; of two, the
/// newer (a peer that stepped is not held back by one that has yet to). 0 if there are none.
/// The honest peers of a group step together, so a majority of honest peers moves the quorum
/// within a report's time of stepping.
pub fn quorum(claims: impl Iterator<Item = u64>) -> u64 {
    ranked(claims, |n| n.saturating_sub(1) / 2)
}

/// Estimates the swarm's state at `now` from `reports`; reports older than `stale` are of
/// peers presumed gone. A peer's samples are extrapolated by its rate since its report, up to
/// `stale` (a peer that stopped reporting stops counting).
pub fn swarm_state(
    reports: &[(PeerId, Report)],
    now: Time,
    target: u64,
    stale: Duration,
) -> SwarmState {
    let stale_ms = stale.as_millis() as u64;
    let live: Vec<&Report> = reports
        .iter()
        .map(|(_, r)| r)
        .filter(|r| r.time + stale_ms >= now && r.samples_per_second.is_finite())
        .collect();
    let epoch = quorum(live.iter().map(|r| r.epoch));
    let current: Vec<&&Report> = live.iter().filter(|r| r.epoch == epoch).collect();
    let samples: f64 = current
        .iter()
        .map(|r| {
            let since = now.saturating_sub(r.time).min(stale_ms) as f64 / 1000.0;
            r.samples as f64 + r.samples_per_second.max(0.0) * since
        })
        .sum();
    let committed = current
        .iter()
        .map(|r| r.samples)
        .fold(0u64, u64::saturating_add);
    let rate: f64 = current.iter().map(|r| r.samples_per_second.max(0.0)).sum();
    let samples = samples.min(u64::MAX as f64) as u64;
    SwarmState {
        epoch,
        samples,
        committed,
        eta: eta(samples, target, rate),
        samples_per_second: rate,
        peers: live.len(),
        in_epoch: current.len(),
        computing: current
            .iter()
            .filter(|r| r.samples > 0 || r.samples_per_second > 0.0)
            .count(),
    }
}

/// The time until `target` samples at `rate` samples/s with `samples` gathered: zero once
/// reached, `None` with no rate.
pub fn eta(samples: u64, target: u64, rate: f64) -> Option<Duration> {
    if samples >= target {
        Some(Duration::ZERO)
    } else if rate > 0.0 {
        Some(Duration::from_secs_f64(
            ((target - samples) as f64 / rate).min(1e9),
        ))
    } else {
        None
    }
}

/// The most one peer's rate counts toward an epoch's end, in median computing peers: a peer
/// that says it computes the whole batch at once brings the end nearer by this many median
/// peers' work, no more. A swarm of machines more unequal than this gathers larger epochs than
/// its target (the fastest peer's work beyond it still goes into its gradient, it only does not
/// count toward the end). Of two peers the median is the faster, so a pair is never held back.
pub const SPREAD: f64 = 4.0;

/// Epochs whose beginning a [`Measure`] keeps.
const KEEP_BEGUN: usize = 8;

/// What this peer has seen of the others' work, to measure their claims against: when each
/// recent epoch began here, and the rate each live peer last reported while computing (a
/// peer reports a rate of 0 while it waits for the epoch's end). Bounded by the live peers.
#[derive(Debug, Default, Clone)]
pub struct Measure {
    began: BTreeMap<u64, Time>,
    /// Each peer's last positive rate, and the time of its latest live report.
    rates: HashMap<PeerId, (f64, Time)>,
}

/// A claim [`Measure::bound`] cut: the peer, its claimed rate and the most its rate counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cut {
    pub peer: PeerId,
    pub claimed: f64,
    pub counted: f64,
}

impl Measure {
    /// Notes that this peer is in `epoch` at `now` (the first note of an epoch is its
    /// beginning here).
    pub fn begin(&mut self, epoch: u64, now: Time) {
        self.began.entry(epoch).or_insert(now);
        while self.began.len() > KEEP_BEGUN {
            self.began.pop_first();
        }
    }

    /// When `epoch` began here: an epoch this peer has yet to enter begins now (nothing of it
    /// counts yet), one older than those kept at the oldest kept beginning.
    fn began(&self, epoch: u64, now: Time) -> Time {
        if let Some(t) = self.began.get(&epoch) {
            return *t;
        }
        match self.began.first_key_value() {
            Some((first, t)) if epoch < *first => *t,
            _ => now,
        }
    }

    /// Takes in the rates of `reports`' live peers (those older than `stale` are forgotten).
    pub fn observe(&mut self, reports: &[(PeerId, Report)], now: Time, stale: Duration) {
        let stale_ms = stale.as_millis() as u64;
        for (peer, r) in reports {
            if r.time.saturating_add(stale_ms) < now {
                continue;
            }
            let rate = r.samples_per_second;
            let seen = r.time.min(now);
            let entry = self.rates.entry(*peer).or_insert((0.0, seen));
            entry.1 = entry.1.max(seen);
            if rate.is_finite() && rate > 0.0 {
                entry.0 = rate;
            }
        }
        self.rates
            .retain(|_, (rate, seen)| *rate > 0.0 && seen.saturating_add(stale_ms) >= now);
    }

    /// The most a rate counts: [`SPREAD`] times the median of the live peers' rates (of an
    /// even count, the upper one); infinite when no peer has computed yet.
    pub fn cap(&self) -> f64 {
        let mut rates: Vec<f64> = self.rates.values().map(|(r, _)| *r).collect();
        if rates.is_empty() {
            return f64::INFINITY;
        }
        rates.sort_unstable_by(f64::total_cmp);
        SPREAD * rates[rates.len() / 2]
    }

    /// Cuts each of `reports`' claims to what its sender could have done: its rate to the
    /// last it reported while computing, at most [`cap`](Self::cap); its samples to that rate
    /// times the time since its epoch began here, plus `micro` (a micro-batch of this peer's:
    /// room for the one a peer reports as it starts it). A peer yet to report a rate counts
    /// `micro` at most. Returns the peers whose rate was cut.
    pub fn bound(&self, reports: &mut [(PeerId, Report)], now: Time, micro: u64) -> Vec<Cut> {
        let cap = self.cap();
        let mut cut = Vec::new();
        for (peer, r) in reports.iter_mut() {
            let claimed = self.rates.get(peer).map_or(0.0, |(rate, _)| *rate);
            let rate = claimed.min(cap);
            if claimed > cap {
                cut.push(Cut {
                    peer: *peer,
                    claimed,
                    counted: cap,
                });
            }
            let since = now.saturating_sub(self.began(r.epoch, now)) as f64 / 1000.0;
            let most = (rate * since).min(u64::MAX as f64) as u64;
            r.samples = r.samples.min(most.saturating_add(micro));
            // (A rate that is not a number is no rate at all.)
            if r.samples_per_second.is_nan() || r.samples_per_second > rate {
                r.samples_per_second = rate;
            }
        }
        cut
    }
}

/// Publishes this peer's reports and reads the swarm's, under `RUN/progress`.
#[derive(Debug)]
pub struct Tracker<'a> {
    pub dht: &'a Dht,
    pub keypair: &'a Keypair,
    pub run: &'a str,
    /// How long a report stays in the DHT (and counts).
    pub ttl: Duration,
}

impl Tracker<'_> {
    fn reports(&self) -> Owned<Report> {
        Owned::at(format!("{}/progress", self.run))
    }

    /// Stores `report` under this peer's signed subkey.
    pub async fn publish(&self, report: &Report) -> Result<(), dht::Error> {
        let expiration = clock::now() + self.ttl.as_millis() as u64;
        self.reports()
            .put(self.dht, self.keypair, report, expiration)
            .await?;
        Ok(())
    }

    /// Every peer's latest report (signatures checked by the DHT; undecodable ones skipped).
    pub async fn fetch(&self) -> Result<Vec<(PeerId, Report)>, dht::Error> {
        self.reports().get(self.dht).await
    }

    /// The swarm's state now, toward `target` samples.
    pub async fn state(&self, target: u64) -> Result<SwarmState, dht::Error> {
        let reports = self.fetch().await?;
        Ok(swarm_state(&reports, clock::now(), target, self.ttl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(epoch: u64, samples: u64, rate: f64, time: Time) -> (PeerId, Report) {
        (
            PeerId::random(),
            Report {
                epoch,
                samples,
                samples_per_second: rate,
                time,
                held: epoch,
                addrs: Vec::new(),
                tokenizers: crate::tokenizers::NONE,
                recipe: String::new(),
                optimizer: 0,
            },
        )
    }

    #[test]
    fn the_swarm_counts_live_peers_of_the_latest_epoch_extrapolated_to_now() {
        let now = 100_000;
        let stale = Duration::from_secs(30);
        let reports = [
            report(5, 100, 10.0, now - 2_000), // 100 + 20
            report(5, 50, 30.0, now - 1_000),  // 50 + 30
            report(4, 400, 50.0, now - 1_000), // behind: catching up, not counted
            report(6, 10, 5.0, now - 100_000), // gone (stale): its epoch does not count
            report(5, 0, f64::NAN, now),       // nonsense rate: ignored
        ];
        let s = swarm_state(&reports, now, 1000, stale);
        assert_eq!(s.epoch, 5);
        assert_eq!(s.samples, 200);
        assert_eq!(s.committed, 150);
        assert_eq!(s.samples_per_second, 40.0);
        assert_eq!((s.peers, s.in_epoch), (3, 2));
        assert_eq!(s.eta, Some(Duration::from_secs(20)));
        assert!(!s.ready(1000));
        // Ready on what the peers reported, not on the extrapolation.
        assert!(!s.ready(200));
        assert!(s.ready(150));
        // A peer that stops reporting counts its rate for `stale` at most.
        let quiet = [report(1, 0, 10.0, now - 29_000)];
        assert_eq!(swarm_state(&quiet, now, 1000, stale).samples, 290);
        let none = swarm_state(&[], now, 1000, stale);
        assert_eq!((none.epoch, none.samples, none.eta), (0, 0, None));
    }

    #[test]
    fn an_epoch_no_majority_backs_moves_no_one() {
        let now = 100_000;
        let stale = Duration::from_secs(30);
        // One liar a step ahead, or at the counter's end, among three honest peers: the
        // swarm stays in the honest epoch, and the liar's samples do not count toward it.
        for lie in [6, u64::MAX] {
            let reports = [
                report(5, 40, 10.0, now),
                report(5, 40, 10.0, now),
                report(5, 40, 10.0, now),
                report(lie, 1_000_000, 1e9, now),
            ];
            let s = swarm_state(&reports, now, 128, stale);
            assert_eq!((s.epoch, s.committed, s.in_epoch), (5, 120, 3), "lie {lie}");
            assert!(!s.ready(128));
        }
        // Three of eight lying do not move it either; four of eight do.
        let claims = |ahead: usize| (0..8).map(move |i| if i < ahead { 9 } else { 5 });
        assert_eq!(quorum(claims(3)), 5);
        assert_eq!(quorum(claims(4)), 9);
        // One claim counts alone; of two, the newer; of three, the middle one.
        assert_eq!(quorum([7].into_iter()), 7);
        assert_eq!(quorum([7, 3].into_iter()), 7);
        assert_eq!(quorum([7, 3, 3].into_iter()), 3);
        assert_eq!(quorum(std::iter::empty()), 0);
        // What a peer downloads needs more than half: of two, the older.
        assert_eq!(majority([7, 3].into_iter()), 3);
        assert_eq!(majority(claims(4)), 5);
        assert_eq!(majority(std::iter::empty()), 0);
    }

    #[test]
    fn a_claim_counts_only_as_far_as_a_rate_and_the_time_since_the_epoch_began_allow() {
        let stale = Duration::from_secs(30);
        let micro = 2;
        let start = 100_000;
        let mut measure = Measure::default();
        measure.begin(4, start - 2_000);
        // Three honest peers at 10 samples/s, seen computing in the epoch before.
        let honest: Vec<(PeerId, Report)> =
            (0..3).map(|_| report(4, 20, 10.0, start - 100)).collect();
        measure.observe(&honest, start - 100, stale);
        // Epoch 5 begins: the honest peers start a micro-batch of 2 each (their rate reads 0
        // while they waited), the liar says it computed a thousand targets at 1e9/s.
        measure.begin(5, start);
        let mut reports: Vec<(PeerId, Report)> = honest
            .iter()
            .map(|(p, _)| {
                let (_, r) = report(5, 2, 0.0, start);
                (*p, r)
            })
            .collect();
        let liar = report(5, 128_000, 1e9, start);
        reports.push(liar.clone());
        // Unmeasured, the liar ends the epoch as it begins.
        assert!(swarm_state(&reports, start, 128, stale).ready(128));
        measure.observe(&reports, start, stale);
        assert_eq!(measure.cap(), 40.0, "four times the median peer's rate");
        let mut bounded = reports.clone();
        let cut = measure.bound(&mut bounded, start, micro);
        assert_eq!(cut.len(), 1);
        assert_eq!((cut[0].peer, cut[0].counted), (liar.0, 40.0));
        // At the start the honest peers' micro-batches count, and one of the liar's.
        let s = swarm_state(&bounded, start, 128, stale);
        assert_eq!(s.committed, 3 * 2 + 2);
        assert_eq!(s.samples_per_second, 40.0);
        assert!(!s.ready(128));
        // Two seconds on: the honest peers computed 20 each (and started a micro-batch), the
        // liar counts as four of them.
        let later = start + 2_000;
        let mut reports: Vec<(PeerId, Report)> = honest
            .iter()
            .map(|(p, _)| (*p, report(5, 22, 10.0, later).1))
            .collect();
        reports.push((liar.0, report(5, 128_000, 1e9, later).1));
        measure.observe(&reports, later, stale);
        measure.bound(&mut reports, later, micro);
        let s = swarm_state(&reports, later, 128, stale);
        assert_eq!(s.committed, 66 + 82);
        // A claim of an epoch this peer has yet to enter counts only a micro-batch, and so
        // does one of a peer that never reported a rate.
        let mut ahead = vec![(liar.0, report(6, 128_000, 1e9, later).1)];
        ahead.push(report(5, 50, 0.0, later));
        measure.bound(&mut ahead, later, micro);
        assert_eq!((ahead[0].1.samples, ahead[1].1.samples), (2, 2));
        // Of two peers the median is the faster: a pair is never held back.
        let mut pair = Measure::default();
        pair.begin(1, start);
        let two = [report(1, 40, 20.0, later), report(1, 5, 2.5, later)];
        pair.observe(&two, later, stale);
        let mut bounded = two.to_vec();
        assert!(pair.bound(&mut bounded, later, micro).is_empty());
        assert_eq!(bounded[0].1.samples, 40);
        // Gone peers are forgotten, and so are old epochs' beginnings.
        measure.observe(&[], later + 60_000, stale);
        assert_eq!(measure.cap(), f64::INFINITY);
        for e in 0..100 {
            measure.begin(e, later);
        }
        assert!(measure.began.len() <= KEEP_BEGUN);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peers_see_each_others_signed_reports_through_the_dht() {
        let nodes = crate::test_nodes(3).await;
        let now = clock::now();
        for (i, (node, key)) in nodes.iter().enumerate() {
            let tracker = Tracker {
                dht: node,
                keypair: key,
                run: "run",
                ttl: Duration::from_secs(60),
            };
            let report = Report {
                epoch: 3,
                samples: 100 * (i as u64 + 1),
                samples_per_second: 0.0,
                time: now,
                held: 3,
                addrs: Vec::new(),
                tokenizers: crate::tokenizers::NONE,
                recipe: String::new(),
                optimizer: 0,
            };
            tracker.publish(&report).await.unwrap();
        }
        let (node, key) = &nodes[2];
        let tracker = Tracker {
            dht: node,
            keypair: key,
            run: "run",
            ttl: Duration::from_secs(60),
        };
        let reports = tracker.fetch().await.unwrap();
        assert_eq!(reports.len(), 3);
        for (node, _) in &nodes {
            assert!(reports.iter().any(|(p, _)| *p == node.peer_id()));
        }
        let state = tracker.state(600).await.unwrap();
        assert_eq!((state.epoch, state.samples, state.in_epoch), (3, 600, 3));
        assert!(state.ready(600));
    }
}
