//! Measuring this peer's uplink on the run's own links. Every [`Settings::measure_every`] it
//! probes one other live peer, in turn (a bulk transfer grown until it takes a quarter of
//! [`PROBE_TIME`] or more, over a direct channel where one connects: [`Host::measure`]), and offers the
//! median of its last [`KEPT`] measurements as its rate in the next rounds: the parts it is
//! given and the time the others wait for its chunks follow the link it has, not a figure
//! assumed for every peer. A link that changes is seen at the next probes.
//!
//! [`Host::measure`]: potluck_net::host::Host::measure

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use potluck_allreduce::matchmaking::{MAX_RATE, MIN_RATE};
use tokio::sync::watch;

use super::view::View;
use super::{Net, Settings};

/// The time a probe aims at: the last of its growing transfers takes at least a quarter of it,
/// long enough to measure the link's rate rather than its connection's start, short enough to
/// cost little (the transfers of one probe take at most about this; one every five minutes is
/// 0.2% of the link's time).
const PROBE_TIME: Duration = Duration::from_millis(500);
/// How long a probe may take in all before it is given up.
const PROBE_DEADLINE: Duration = Duration::from_secs(10);
/// The largest transfer of a probe (16 MiB): a link faster than that in a quarter of
/// [`PROBE_TIME`] (134 MB/s) is measured from a shorter transfer, and so somewhat below its
/// rate; far above a volunteer's uplink, and a loopback or a LAN is not worth more to learn.
const MAX_PROBE_BYTES: u64 = 16 << 20;
/// Measurements the offered rate is the median of.
const KEPT: usize = 3;

/// This peer's measured uplink, shared by its tasks: bytes per second (as `f64` bits; 0: not
/// measured yet), and the bytes its probes sent.
#[derive(Debug, Clone, Default)]
pub struct Link {
    rate: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
}

impl Link {
    /// The rate to offer: measured, or `assumed` until a probe succeeds.
    pub fn rate_or(&self, assumed: f64) -> f64 {
        match f64::from_bits(self.rate.load(Ordering::Relaxed)) {
            r if r > 0.0 => r,
            _ => assumed,
        }
    }

    /// Whether a probe has measured the link yet.
    pub fn measured(&self) -> bool {
        self.rate.load(Ordering::Relaxed) != 0
    }

    /// Bytes the probes sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn set(&self, rate: f64) {
        self.rate.store(rate.to_bits(), Ordering::Relaxed);
    }
}

/// The median of `kept` (the upper one of an even count), bounded as an offer must be.
fn offered(kept: &VecDeque<f64>) -> f64 {
    let mut sorted: Vec<f64> = kept.iter().copied().filter(|r| r.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    sorted
        .get(sorted.len() / 2)
        .copied()
        .unwrap_or(MIN_RATE)
        .clamp(MIN_RATE, MAX_RATE)
}

/// Probes the live peers of `view` in turn, every `settings.measure_every`, into `net.link`,
/// until the view's sender is gone (the peer stopped).
pub(super) async fn measure_loop(
    net: Net,
    settings: Settings,
    mut view: watch::Receiver<Option<View>>,
) {
    let Some(every) = settings.measure_every else {
        return;
    };
    let mut kept: VecDeque<f64> = VecDeque::with_capacity(KEPT);
    let mut turn = 0usize;
    // The first probe as soon as another peer is seen; then one every `every`.
    let mut wait = Duration::ZERO;
    loop {
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let peer = loop {
            let pick = view.borrow_and_update().as_ref().and_then(|v| {
                let live: Vec<_> = v
                    .others
                    .iter()
                    .filter(|(_, _, d)| !d.addrs.is_empty())
                    .collect();
                (!live.is_empty()).then(|| live[turn % live.len()].2.clone())
            });
            if let Some(p) = pick {
                break p;
            }
            if view.changed().await.is_err() {
                return;
            }
        };
        turn += 1;
        wait = every;
        let host = net.dht.host();
        match host
            .measure_at_most(
                peer.peer,
                peer.addrs.clone(),
                PROBE_TIME,
                PROBE_DEADLINE,
                true,
                MAX_PROBE_BYTES,
            )
            .await
        {
            Ok(probe) => {
                net.link.sent.fetch_add(probe.bytes, Ordering::Relaxed);
                if kept.len() == KEPT {
                    kept.pop_front();
                }
                kept.push_back(probe.bytes_per_second());
                let rate = offered(&kept);
                net.link.set(rate);
                tracing::info!(
                    "measured the link to {}: {:.1} MB/s up{}; offering {:.1} MB/s (the median \
                     of the last {})",
                    peer.peer,
                    probe.bytes_per_second() / 1e6,
                    if probe.relayed {
                        ", through a relay"
                    } else {
                        ""
                    },
                    rate / 1e6,
                    kept.len()
                );
            }
            Err(e) => tracing::debug!("measuring the link to {}: {e}", peer.peer),
        }
        if view.has_changed().is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The offered rate is the median of the last measurements (one slow probe, taken while
    /// averaging shared the link, moves nothing), and within what an offer may say.
    #[test]
    fn the_offered_rate_is_the_median_of_the_last_probes_and_bounded() {
        let kept: VecDeque<f64> = [12e6, 1e6, 11e6].into();
        assert_eq!(offered(&kept), 11e6);
        let kept: VecDeque<f64> = [1e6, 9e6].into();
        assert_eq!(offered(&kept), 9e6);
        let kept: VecDeque<f64> = [f64::INFINITY, 1e15].into();
        assert_eq!(offered(&kept), MAX_RATE);
        assert_eq!(offered(&VecDeque::new()), MIN_RATE);
        let link = Link::default();
        assert!(!link.measured());
        assert_eq!(link.rate_or(1e8), 1e8);
        link.set(2e6);
        assert!(link.measured());
        assert_eq!(link.rate_or(1e8), 2e6);
    }
}
