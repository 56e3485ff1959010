//! `potluck monitor`: joins a run as a reader, gathers every peer's metrics record
//! ([`potluck_train::metrics`]) and the swarm's reports of banned peers, keeps the history on
//! disk (a restart loses nothing) and serves it over HTTP: a dashboard with everything
//! embedded (no outside assets), a JSON API behind it, Prometheus `/metrics` and a join page.
//!
//! History: one point per global epoch (the mean loss the peers reported for it, the swarm's
//! samples/s, the peers live) and, per peer, what it last said; appended as JSON lines to
//! `DATA/history.jsonl` and read back at start.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::{Json, Router, routing};
use potluck_net::dht::record;
use potluck_net::host::ClientMode;
use potluck_train::metrics::{self, Metrics};
use serde::{Deserialize, Serialize};

use crate::cmd::together::{NetArgs, start_dht};

/// The history file is read whole at start: at most this many bytes.
const MAX_HISTORY_FILE: u64 = 256 << 20;
/// Points and peers kept in memory, at most (the oldest go first).
const MAX_POINTS: usize = 100_000;
const MAX_PEERS: usize = 10_000;
/// A peer whose record is older than this is not live.
const LIVE_MS: u64 = 120_000;

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck monitor --run-id shapes1 --initial-peers \
                  /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW… --http 127.0.0.1:8080 --data monitor\n\
                  Then open http://127.0.0.1:8080 (JSON at /api/status, Prometheus at /metrics)"
)]
pub(crate) struct Args {
    /// The run to watch.
    #[arg(long)]
    pub(crate) run_id: String,
    #[command(flatten)]
    pub(crate) net: NetArgs,
    /// Where to serve the dashboard.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) http: SocketAddr,
    /// Where the history is kept (created if missing).
    #[arg(long, default_value = "monitor")]
    pub(crate) data: PathBuf,
    /// Seconds between reads of the run's records.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) every: f64,
}

/// The swarm at one global epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Point {
    epoch: u64,
    /// Wall clock (ms) when the monitor saw it.
    time: u64,
    /// The mean of the losses the peers reported for it.
    loss: Option<f64>,
    samples_per_second: f64,
    peers: usize,
}

/// A peer as the monitor knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Seen {
    peer: String,
    metrics: Metrics,
    first_seen: u64,
}

/// One line of the history file.
#[derive(Debug, Serialize, Deserialize)]
enum Line {
    Point(Point),
    Peer(Seen),
}

/// What the monitor holds.
#[derive(Debug, Default)]
struct Watch {
    points: Vec<Point>,
    peers: BTreeMap<String, Seen>,
    reports: Vec<(String, String, String)>,
}

impl Watch {
    fn take(&mut self, line: Line) {
        match line {
            Line::Point(p) => {
                if self.points.last().is_none_or(|last| last.epoch < p.epoch) {
                    if self.points.len() >= MAX_POINTS {
                        self.points.remove(0);
                    }
                    self.points.push(p);
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
    fn update(&mut self, records: Vec<(String, Metrics)>, now: u64) -> Vec<Line> {
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
            if let Line::Peer(s) = line {
                self.take(Line::Peer(s.clone()));
            }
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

    fn live(&self, now: u64) -> Vec<&Seen> {
        let live = |s: &&Seen| s.metrics.time + LIVE_MS >= now;
        self.peers.values().filter(live).collect()
    }

    /// Everything the dashboard shows.
    fn status(&self, run: &str, join: &str, now: u64) -> serde_json::Value {
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
                "seen_s_ago": now.saturating_sub(s.metrics.time) / 1000,
            })
        };
        serde_json::json!({
            "run": run,
            "join": join,
            "epoch": live.iter().map(|s| s.metrics.epoch).max(),
            "samples_per_second": live.iter().map(|s| s.metrics.samples_per_second).sum::<f64>(),
            "live": live.iter().map(|s| peer(s)).collect::<Vec<_>>(),
            "leaderboard": board.iter().take(100).map(|s| peer(s)).collect::<Vec<_>>(),
            "history": self.points,
            "reports": self.reports.iter().map(|(by, who, why)| {
                serde_json::json!({"by": by, "peer": who, "why": why})
            }).collect::<Vec<_>>(),
        })
    }

    /// Prometheus' text format.
    fn prometheus(&self, run: &str, now: u64) -> String {
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

/// Reads the history file back (a damaged line is skipped and counted).
fn load(path: &Path) -> Result<Watch> {
    let mut watch = Watch::default();
    if !path.exists() {
        return Ok(watch);
    }
    // (Over the limit: move the file away to start afresh.)
    let text = super::read_bounded(path, MAX_HISTORY_FILE, "the monitor's history")?;
    let mut damaged = 0;
    for line in text.lines() {
        match serde_json::from_str::<Line>(line) {
            Ok(line) => watch.take(line),
            Err(_) => damaged += 1,
        }
    }
    if damaged > 0 {
        tracing::warn!("{}: {damaged} damaged lines skipped", path.display());
    }
    Ok(watch)
}

const DASHBOARD: &str = include_str!("monitor.html");

pub(crate) fn run(mut args: Args) -> Result<()> {
    if !args.every.is_finite() || args.every < 0.1 {
        bail!("--every must be at least 0.1 seconds");
    }
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating {}", args.data.display()))?;
    let path = args.data.join("history.jsonl");
    let watch = Arc::new(Mutex::new(load(&path)?));
    // A monitor reads the run: it serves nobody.
    args.net.client_mode = ClientMode::On;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (dht, _) = start_dht(&args.run_id, &args.net).await?;
        let join = join_command(&args);
        let listener = tokio::net::TcpListener::bind(args.http)
            .await
            .with_context(|| {
                format!(
                    "listening on {} (in use? pick another with --http)",
                    args.http
                )
            })?;
        println!(
            "monitor for run {}: http://{} (history in {})",
            args.run_id,
            listener.local_addr()?,
            path.display()
        );
        let app = router(watch.clone(), args.run_id.clone(), join);
        let server = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        let poll = poll(dht, args.run_id.clone(), watch, path, args.every);
        tokio::select! {
            served = server => served.context("serving HTTP"),
            polled = poll => polled,
        }
    })
}

/// Reads the run's records every `every` seconds and appends what is new to the history.
async fn poll(
    dht: potluck_net::dht::Dht,
    run: String,
    watch: Arc<Mutex<Watch>>,
    path: PathBuf,
    every: f64,
) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let records = match metrics::fetch(&dht, &run).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("reading the run's metrics: {e}");
                continue;
            }
        };
        let reports = potluck_train::reports::fetch(&dht, &run)
            .await
            .unwrap_or_default();
        let records = records
            .into_iter()
            .map(|(p, m)| (p.to_string(), m))
            .collect();
        let new = {
            let mut w = watch
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            w.reports = reports
                .into_iter()
                .map(|(by, who, why)| (by.to_string(), who.to_string(), why))
                .collect();
            w.update(records, record::now())
        };
        for line in new {
            let text = serde_json::to_string(&line)?;
            writeln!(file, "{text}").with_context(|| format!("writing {}", path.display()))?;
        }
        file.flush()?;
    }
}

/// The command a newcomer runs to join (the join page).
fn join_command(args: &Args) -> String {
    let peers = if args.net.initial_peers.is_empty() {
        "ADDRESS_OF_A_PEER".to_owned()
    } else {
        args.net.initial_peers.join(",")
    };
    let auth = match &args.net.auth.authority {
        Some(key) => format!(
            " --authority {key} --identity id.key --token my.token   # a token from the \
             run's organiser: potluck authority request --url … --invite CODE --identity id.key \
             --out my.token"
        ),
        None => String::new(),
    };
    format!(
        "potluck prepare --dataset shapes --out data/shapes && potluck train --run-id {} \
         --initial-peers {peers} --data data/shapes --config small --out my-checkpoint{auth}",
        args.run_id
    )
}

/// What the handlers share: the watch, the run's name and the join command.
type Shared = Arc<(Arc<Mutex<Watch>>, String, String)>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Watch> {
    s.0.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn router(watch: Arc<Mutex<Watch>>, run: String, join: String) -> Router {
    let shared: Shared = Arc::new((watch, run, join));
    Router::new()
        .route("/", routing::get(|| async { Html(DASHBOARD) }))
        .route(
            "/api/status",
            routing::get(|State(s): State<Shared>| async move {
                let value = lock(&s).status(&s.1, &s.2, record::now());
                Json(value)
            }),
        )
        .route(
            "/metrics",
            routing::get(|State(s): State<Shared>| async move {
                let text = lock(&s).prometheus(&s.1, record::now());
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
            }),
        )
        .route(
            "/join",
            routing::get(|State(s): State<Shared>| async move {
                format!(
                    "Join run {}\n\nOn a machine with 4 GB of memory or more (a GPU helps: add \
                     --device cuda), with potluck built (`make build`):\n\n{}\n",
                    s.1, s.2
                )
            }),
        )
        .with_state(shared)
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
            time,
        }
    }

    #[test]
    fn points_follow_the_newest_epoch_and_the_history_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
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
        assert_eq!(w.points.iter().map(|p| p.epoch).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(w.points[0].loss, Some(3.0));
        let status = w.status("r", "join", now + 2);
        assert_eq!(status["leaderboard"][0]["peer"], "b");
        assert_eq!(status["epoch"], 2);
        let text: String = lines
            .iter()
            .map(|l| serde_json::to_string(l).unwrap() + "\n")
            .collect();
        std::fs::write(&path, text + "not json\n").unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.points, w.points);
        assert_eq!(back.peers.len(), 2);
        let prom = back.prometheus("r", now + 2);
        assert!(prom.contains("potluck_epoch{run=\"r\"} 2"), "{prom}");
        assert!(
            prom.contains("potluck_peer_samples{run=\"r\",peer=\"b\",role=\"trainer\"} 30"),
            "{prom}"
        );
        // Gone for long: not live.
        assert_eq!(back.live(now + LIVE_MS + 10).len(), 0);
    }
}
