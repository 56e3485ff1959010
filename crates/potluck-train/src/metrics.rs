//! Metrics: once an epoch every peer publishes a signed record of how it is doing under its own
//! subkey of `RUN/metrics` (loss, samples, samples/s, device, uptime, version, client mode);
//! anyone in the run — the monitor above all — reads everyone's. Records live ten minutes: a
//! peer gone that long drops out of the view.

use libp2p::PeerId;
use libp2p::identity::Keypair;
use potluck_core::clock::Time;
use potluck_net::dht::typed::{self, Owned, Typed};
use potluck_net::dht::{self, Dht};
use serde::{Deserialize, Serialize};

/// How long a metrics record lives in the DHT.
pub const LIFETIME_MS: u64 = 600_000;
/// Text fields (device, role, version) are cut to this many characters when published and
/// when read.
pub const MAX_TEXT: usize = 64;

/// What one peer says of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// The global epoch it is in.
    pub epoch: u64,
    /// The mean training loss of its samples in its last epoch (None: it computed none).
    pub loss: Option<f64>,
    /// Samples it computed since it started.
    pub samples: u64,
    /// Its recent throughput while computing.
    pub samples_per_second: f64,
    /// Where it computes: `cpu`, `cuda`, or none for an aux peer.
    pub device: String,
    /// `trainer` or `aux`.
    pub role: String,
    pub uptime_s: u64,
    /// potluck's version.
    pub version: String,
    /// Whether it is a client (behind a NAT: it reduces nothing, nobody dials it).
    pub client: bool,
    /// Epochs in a row it could not average though others were around (its parameters drift
    /// from the swarm's; see `collab::Settings::alone_limit`).
    #[serde(default)]
    pub alone_epochs: u64,
    /// How long the epoch it is in has run, once far past how long its epochs usually take
    /// (seconds; [`crate::stall`]); 0: not stalled.
    #[serde(default)]
    pub stalled_s: u64,
    /// Live peers it sees training on data encoded with other tokenizers than its own (left
    /// out of its epochs and groups: the run is split; see `crate::tokenizers`).
    #[serde(default)]
    pub strangers: u64,
    /// Bytes it sent and received since it started: averaging, and the states it downloaded
    /// and served.
    #[serde(default)]
    pub sent: u64,
    #[serde(default)]
    pub received: u64,
    /// The share of its time since it started that it spent computing (0 to 1).
    #[serde(default)]
    pub computing: f64,
    /// How it trains (`collab::Settings::recipe`): every step averaged or local updates, and
    /// the codec.
    #[serde(default)]
    pub recipe: String,
    /// Wall clock (ms) when it was published.
    pub time: Time,
}

impl Metrics {
    /// The same with every text field cut to [`MAX_TEXT`] characters and the figures made
    /// sane (a peer's record is whatever it says).
    pub fn bounded(mut self) -> Metrics {
        for text in [
            &mut self.device,
            &mut self.role,
            &mut self.version,
            &mut self.recipe,
        ] {
            if text.chars().count() > MAX_TEXT {
                *text = text.chars().take(MAX_TEXT).collect();
            }
        }
        self.loss = self.loss.filter(|l| l.is_finite());
        if !self.samples_per_second.is_finite() || self.samples_per_second < 0.0 {
            self.samples_per_second = 0.0;
        }
        self.computing = if self.computing.is_finite() {
            self.computing.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }
}

impl Typed for Metrics {
    const NAME: &'static str = "metrics";
    const MAX_BYTES: usize = 4 << 10;

    fn is_key(key: &[u8]) -> bool {
        typed::ends_with(key, "metrics")
    }

    /// What [`Metrics::bounded`] makes of a record: a publisher always sends that.
    fn check(&self) -> Result<(), String> {
        match [&self.device, &self.role, &self.version]
            .into_iter()
            .find(|t| t.chars().count() > MAX_TEXT)
        {
            Some(t) => Err(format!("a text of {} characters", t.chars().count())),
            None => Ok(()),
        }
    }
}

/// `run`'s metrics records: `RUN/metrics`.
pub fn records(run: &str) -> Owned<Metrics> {
    Owned::at(format!("{run}/metrics"))
}

/// Publishes `metrics` as this peer's record; it expires [`LIFETIME_MS`] after its `time`
/// (so of two records, the later one stays).
pub async fn publish(
    dht: &Dht,
    keypair: &Keypair,
    run: &str,
    metrics: &Metrics,
) -> Result<usize, dht::Error> {
    let bounded = metrics.clone().bounded();
    records(run)
        .put(dht, keypair, &bounded, metrics.time + LIFETIME_MS)
        .await
}

/// Every peer's latest record (signatures checked by the DHT; undecodable ones skipped).
pub async fn fetch(dht: &Dht, run: &str) -> Result<Vec<(PeerId, Metrics)>, dht::Error> {
    let records = records(run).get(dht).await?;
    Ok(records.into_iter().map(|(p, m)| (p, m.bounded())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use potluck_core::clock;

    fn metrics(epoch: u64) -> Metrics {
        Metrics {
            epoch,
            loss: Some(2.5),
            samples: 640,
            samples_per_second: 31.5,
            device: "cpu".into(),
            role: "trainer".into(),
            uptime_s: 60,
            version: "0.1.0".into(),
            client: false,
            alone_epochs: 0,
            stalled_s: 0,
            strangers: 0,
            sent: 0,
            received: 0,
            computing: 0.0,
            recipe: "every step averaged, codec auto".into(),
            time: clock::now(),
        }
    }

    #[test]
    fn what_a_peer_says_is_bounded_when_read() {
        let m = Metrics {
            loss: Some(f64::NAN),
            samples_per_second: f64::INFINITY,
            device: "x".repeat(10_000),
            ..metrics(1)
        }
        .bounded();
        assert_eq!(m.loss, None);
        assert_eq!(m.samples_per_second, 0.0);
        assert_eq!(m.device.len(), MAX_TEXT);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peers_read_each_others_signed_metrics() {
        let nodes = crate::test_nodes(3).await;
        for (i, (node, key)) in nodes.iter().enumerate() {
            publish(node, key, "run", &metrics(i as u64)).await.unwrap();
        }
        // A later record replaces a peer's earlier one.
        let (node, key) = &nodes[1];
        let later = Metrics {
            time: clock::now() + 5,
            ..metrics(7)
        };
        publish(node, key, "run", &later).await.unwrap();
        let seen = fetch(&nodes[2].0, "run").await.unwrap();
        assert_eq!(seen.len(), 3);
        for (i, (node, _)) in nodes.iter().enumerate() {
            let (_, m) = seen.iter().find(|(p, _)| *p == node.peer_id()).unwrap();
            assert_eq!(m.epoch, if i == 1 { 7 } else { i as u64 });
        }
        assert!(fetch(&nodes[0].0, "other-run").await.unwrap().is_empty());
    }
}
