//! What the monitor knows about a run: one point per global epoch (the mean loss the peers
//! reported for it, the swarm's samples/s, the peers live), each peer's last record, the
//! accuracy of each checkpoint it scored and the newest sample images; and the views of it the
//! HTTP side serves (JSON, Prometheus).

use std::collections::BTreeMap;

use potluck_train::collab::ALONE_WARN;
use potluck_train::metrics::Metrics;
use serde::Serialize;

use super::store::SampleSet;

/// Points, evals and peers kept in memory, at most (the oldest go first).
pub(super) const MAX_POINTS: usize = 100_000;
pub(super) const MAX_PEERS: usize = 10_000;
/// A peer whose record is older than this is not live.
pub(super) const LIVE_MS: u64 = 120_000;

/// The swarm at one global epoch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct Point {
    pub(super) epoch: u64,
    /// Wall clock (ms) when the monitor saw it.
    pub(super) time: u64,
    /// The mean of the losses the peers reported for it.
    pub(super) loss: Option<f64>,
    pub(super) samples_per_second: f64,
    pub(super) peers: usize,
}

/// A peer as the monitor knows it.
#[derive(Debug, Clone)]
pub(super) struct Seen {
    pub(super) peer: String,
    pub(super) metrics: Metrics,
    pub(super) first_seen: u64,
}

/// The score of one checkpoint: the share of prompts of the `shapes` grammar whose image the
/// detector reads back right (none for other data).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct Eval {
    pub(super) epoch: u64,
    pub(super) time: u64,
    pub(super) accuracy: Option<f64>,
    pub(super) prompts: usize,
}

/// One thing learnt, as the history keeps it.
#[derive(Debug, Clone)]
pub(super) enum Line {
    Point(Point),
    Peer(Seen),
    Eval(Eval),
}

/// What the monitor holds.
#[derive(Debug, Default)]
pub(super) struct Watch {
    pub(super) points: Vec<Point>,
    pub(super) peers: BTreeMap<String, Seen>,
    pub(super) evals: Vec<Eval>,
    pub(super) reports: Vec<(String, String, String)>,
    pub(super) samples: SampleSet,
    /// Why the newest checkpoint could not be drawn with, if it could not.
    pub(super) samples_error: Option<String>,
}

fn push_bounded<T>(v: &mut Vec<T>, item: T) {
    if v.len() >= MAX_POINTS {
        v.remove(0);
    }
    v.push(item);
}

impl Watch {
    pub(super) fn take(&mut self, line: Line) {
        match line {
            Line::Point(p) => {
                if self.points.last().is_none_or(|last| last.epoch < p.epoch) {
                    push_bounded(&mut self.points, p);
                }
            }
            Line::Eval(e) => {
                if self.evals.last().is_none_or(|last| last.epoch < e.epoch) {
                    push_bounded(&mut self.evals, e);
                }
            }
            Line::Peer(s) => {
                if self.peers.len() >= MAX_PEERS && !self.peers.contains_key(&s.peer) {
                    return;
                }
                self.peers.insert(s.peer.clone(), s);
            }
        }
    }

    /// Takes what the peers say now; returns what is new (to append to the history).
    pub(super) fn update(&mut self, records: Vec<(String, Metrics)>, now: u64) -> Vec<Line> {
        let mut new = Vec::new();
        for (peer, m) in records {
            let changed = self
                .peers
                .get(&peer)
                .is_none_or(|s| s.metrics.time < m.time);
            if changed {
                let first_seen = self.peers.get(&peer).map_or(now, |s| s.first_seen);
                new.push(Line::Peer(Seen {
                    peer,
                    metrics: m,
                    first_seen,
                }));
            }
        }
        for line in &new {
            self.take(line.clone());
        }
        // The newest epoch a live trainer reported a loss for is a point of the curve.
        let live: Vec<&Seen> = self.live(now);
        let newest = live
            .iter()
            .filter(|s| s.metrics.loss.is_some())
            .map(|s| s.metrics.epoch)
            .max();
        if let Some(epoch) = newest
            && self.points.last().is_none_or(|p| p.epoch < epoch)
        {
            let losses: Vec<f64> = live
                .iter()
                .filter(|s| s.metrics.epoch == epoch)
                .filter_map(|s| s.metrics.loss)
                .collect();
            let point = Point {
                epoch,
                time: now,
                loss: (!losses.is_empty())
                    .then(|| losses.iter().sum::<f64>() / losses.len() as f64),
                samples_per_second: live.iter().map(|s| s.metrics.samples_per_second).sum(),
                peers: live.len(),
            };
            self.take(Line::Point(point.clone()));
            new.push(Line::Point(point));
        }
        new
    }

    pub(super) fn live(&self, now: u64) -> Vec<&Seen> {
        let live = |s: &&Seen| s.metrics.time + LIVE_MS >= now;
        self.peers.values().filter(live).collect()
    }

    /// Everything the dashboard shows.
    pub(super) fn status(&self, run: &str, join: &str, now: u64) -> serde_json::Value {
        let live = self.live(now);
        let mut board: Vec<&Seen> = self.peers.values().collect();
        board.sort_by_key(|s| std::cmp::Reverse(s.metrics.samples));
        let peer = |s: &Seen| {
            serde_json::json!({
                "peer": s.peer,
                "role": s.metrics.role,
                "epoch": s.metrics.epoch,
                "loss": s.metrics.loss,
                "samples": s.metrics.samples,
                "samples_per_second": s.metrics.samples_per_second,
                "device": s.metrics.device,
                "uptime_s": s.metrics.uptime_s,
                "version": s.metrics.version,
                "client": s.metrics.client,
                "alone_epochs": s.metrics.alone_epochs,
                "stalled_s": s.metrics.stalled_s,
                "strangers": s.metrics.strangers,
                "sent": s.metrics.sent,
                "received": s.metrics.received,
                "computing": s.metrics.computing,
                "recipe": s.metrics.recipe,
                "bytes_per_sample": (s.metrics.samples > 0)
                    .then(|| s.metrics.sent as f64 / s.metrics.samples as f64),
                "seen_s_ago": now.saturating_sub(s.metrics.time) / 1000,
            })
        };
        let samples = (!self.samples.images.is_empty()).then(|| {
            serde_json::json!({
                "epoch": self.samples.epoch,
                "images": self.samples.images.iter().enumerate().map(|(i, (prompt, _))| {
                    serde_json::json!({
                        "prompt": prompt,
                        "url": format!("/samples/{}/{i}", self.samples.epoch),
                    })
                }).collect::<Vec<_>>(),
            })
        });
        serde_json::json!({
            "run": run,
            "join": join,
            "epoch": live.iter().map(|s| s.metrics.epoch).max(),
            "samples_per_second": live.iter().map(|s| s.metrics.samples_per_second).sum::<f64>(),
            "live": live.iter().map(|s| peer(s)).collect::<Vec<_>>(),
            "alone": live
                .iter()
                .filter(|s| s.metrics.alone_epochs >= ALONE_WARN)
                .map(|s| serde_json::json!({"peer": s.peer, "epochs": s.metrics.alone_epochs}))
                .collect::<Vec<_>>(),
            "stalled": live
                .iter()
                .filter(|s| s.metrics.stalled_s > 0)
                .map(|s| serde_json::json!({
                    "peer": s.peer,
                    "epoch": s.metrics.epoch,
                    "seconds": s.metrics.stalled_s,
                }))
                .collect::<Vec<_>>(),
            "split": live
                .iter()
                .filter(|s| s.metrics.strangers > 0)
                .map(|s| serde_json::json!({"peer": s.peer, "strangers": s.metrics.strangers}))
                .collect::<Vec<_>>(),
            "leaderboard": board.iter().take(100).map(|s| peer(s)).collect::<Vec<_>>(),
            "history": self.points,
            "evals": self.evals,
            "samples": samples,
            "samples_error": self.samples_error,
            "reports": self.reports.iter().map(|(by, who, why)| {
                serde_json::json!({"by": by, "peer": who, "why": why})
            }).collect::<Vec<_>>(),
        })
    }

    /// Prometheus' text format.
    pub(super) fn prometheus(&self, run: &str, now: u64) -> String {
        let live = self.live(now);
        let run = run.replace(['"', '\\', '\n'], "_");
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, value: f64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{run=\"{run}\"}} {value}\n"
            ));
        };
        let epoch = live.iter().map(|s| s.metrics.epoch).max().unwrap_or(0);
        gauge("potluck_epoch", "The swarm's global epoch.", epoch as f64);
        gauge(
            "potluck_peers",
            "Peers live (a record in the last 2 minutes).",
            live.len() as f64,
        );
        gauge(
            "potluck_peers_alone",
            "Live peers that could not average with the swarm for 3 epochs or more in a row.",
            live.iter()
                .filter(|s| s.metrics.alone_epochs >= ALONE_WARN)
                .count() as f64,
        );
        gauge(
            "potluck_peers_stalled",
            "Live peers whose epoch has run far longer than their epochs usually take (a round \
             that does not close).",
            live.iter().filter(|s| s.metrics.stalled_s > 0).count() as f64,
        );
        gauge(
            "potluck_peers_seeing_other_tokenizers",
            "Live peers that see peers training on data encoded with other tokenizers, or by \
             another recipe (the run is split: each side leaves the other out).",
            live.iter().filter(|s| s.metrics.strangers > 0).count() as f64,
        );
        let rate: f64 = live.iter().map(|s| s.metrics.samples_per_second).sum();
        gauge(
            "potluck_samples_per_second",
            "The swarm's samples per second.",
            rate,
        );
        if let Some(loss) = self.points.last().and_then(|p| p.loss) {
            gauge(
                "potluck_loss",
                "Mean training loss of the last epoch.",
                loss,
            );
        }
        if let Some(accuracy) = self.evals.last().and_then(|e| e.accuracy) {
            gauge(
                "potluck_eval_accuracy",
                "Share of the newest checkpoint's images the detector reads back right.",
                accuracy,
            );
        }
        out.push_str(
            "# HELP potluck_peer_samples Samples a peer computed since it started.\n\
             # TYPE potluck_peer_samples gauge\n",
        );
        for s in &live {
            let role = s.metrics.role.replace(['"', '\\', '\n'], "_");
            out.push_str(&format!(
                "potluck_peer_samples{{run=\"{run}\",peer=\"{}\",role=\"{role}\"}} {}\n",
                s.peer, s.metrics.samples
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(epoch: u64, loss: Option<f64>, samples: u64, time: u64) -> Metrics {
        Metrics {
            epoch,
            loss,
            samples,
            samples_per_second: 10.0,
            device: "cpu".into(),
            role: "trainer".into(),
            uptime_s: 1,
            version: "0".into(),
            client: false,
            alone_epochs: 0,
            stalled_s: 0,
            strangers: 0,
            sent: 0,
            received: 0,
            computing: 0.0,
            recipe: String::new(),
            time,
        }
    }

    #[test]
    fn points_follow_the_newest_epoch_and_only_news_is_returned() {
        let now = 1_000_000;
        let mut w = Watch::default();
        let mut lines = Vec::new();
        lines.extend(w.update(
            vec![
                ("a".into(), m(1, Some(4.0), 10, now)),
                ("b".into(), m(1, Some(2.0), 30, now)),
            ],
            now,
        ));
        lines.extend(w.update(vec![("a".into(), m(2, Some(3.0), 20, now + 1))], now + 1));
        // Nothing new: nothing to append.
        assert!(
            w.update(vec![("a".into(), m(2, Some(3.0), 20, now + 1))], now + 2)
                .is_empty()
        );
        assert_eq!(lines.len(), 5, "three records and two points");
        assert_eq!(w.points.iter().map(|p| p.epoch).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(w.points[0].loss, Some(3.0));
        w.take(Line::Eval(Eval {
            epoch: 2,
            time: now,
            accuracy: Some(0.5),
            prompts: 8,
        }));
        let status = w.status("r", "join", now + 2);
        assert_eq!(status["leaderboard"][0]["peer"], "b");
        assert_eq!(status["epoch"], 2);
        assert_eq!(status["evals"][0]["accuracy"], 0.5);
        let prom = w.prometheus("r", now + 2);
        assert!(prom.contains("potluck_epoch{run=\"r\"} 2"), "{prom}");
        assert!(
            prom.contains("potluck_eval_accuracy{run=\"r\"} 0.5"),
            "{prom}"
        );
        assert!(
            prom.contains("potluck_peer_samples{run=\"r\",peer=\"b\",role=\"trainer\"} 30"),
            "{prom}"
        );
        // A peer that could not average for epochs on end is named, and counted.
        let alone = Metrics {
            alone_epochs: 4,
            ..m(2, Some(3.0), 20, now + 3)
        };
        w.update(vec![("a".into(), alone)], now + 3);
        let status = w.status("r", "join", now + 3);
        assert_eq!(status["alone"][0]["peer"], "a");
        assert_eq!(status["alone"][0]["epochs"], 4);
        let prom = w.prometheus("r", now + 3);
        assert!(prom.contains("potluck_peers_alone{run=\"r\"} 1"), "{prom}");
        assert!(
            prom.contains("potluck_peers_stalled{run=\"r\"} 0"),
            "{prom}"
        );
        // A peer whose epoch does not end: named with how long, and counted.
        let stalled = Metrics {
            stalled_s: 640,
            ..m(2, Some(3.0), 20, now + 3)
        };
        w.update(vec![("b".into(), stalled)], now + 3);
        let status = w.status("r", "join", now + 3);
        assert_eq!(status["stalled"][0]["peer"], "b");
        assert_eq!(status["stalled"][0]["seconds"], 640);
        assert!(
            w.prometheus("r", now + 3)
                .contains("potluck_peers_stalled{run=\"r\"} 1")
        );
        // A peer that sees peers of other tokenizers: the run is split, said so.
        let split = Metrics {
            strangers: 2,
            ..m(2, Some(3.0), 20, now + 4)
        };
        w.update(vec![("b".into(), split)], now + 4);
        let status = w.status("r", "join", now + 4);
        assert_eq!(status["split"][0]["peer"], "b");
        assert_eq!(status["split"][0]["strangers"], 2);
        let prom = w.prometheus("r", now + 4);
        assert!(
            prom.contains("potluck_peers_seeing_other_tokenizers{run=\"r\"} 1"),
            "{prom}"
        );
        // What a peer sent per sample it computed, its time computing and how it trains, for
        // the board.
        let busy = Metrics {
            sent: 6_000,
            computing: 0.9,
            recipe: "local updates, rounds of 32 batches, codec auto".into(),
            ..m(2, Some(3.0), 20, now + 5)
        };
        w.update(vec![("c".into(), busy)], now + 5);
        let status = w.status("r", "join", now + 5);
        let live = status["live"].as_array().unwrap();
        let c = live.iter().find(|p| p["peer"] == "c").unwrap();
        assert_eq!(c["bytes_per_sample"], 300.0, "{c}");
        assert_eq!(c["computing"], 0.9, "{c}");
        assert_eq!(
            c["recipe"],
            "local updates, rounds of 32 batches, codec auto"
        );
        // Gone for long: not live.
        assert_eq!(w.live(now + LIVE_MS + 10).len(), 0);
    }
}
