//! The monitor's history on disk: one SQLite database (`DATA/history.sqlite`). What each poll
//! learns is written in one transaction (write-ahead log, synced at every commit), so a kill
//! loses at most the poll under way and a restart serves everything it had before.
//!
//! Reading it back is bounded like any decoder: the newest [`MAX_POINTS`] points and evals,
//! [`MAX_PEERS`] peers, [`MAX_SAMPLES`] sample images of at most [`MAX_PNG`] bytes; a row that
//! does not decode is skipped and counted.

use std::path::Path;

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, params};

use super::watch::{Eval, Line, MAX_PEERS, MAX_POINTS, Point, Seen};

/// Sample images kept (the newest set), at most.
pub(super) const MAX_SAMPLES: usize = 64;
/// One sample image's PNG, at most.
pub(super) const MAX_PNG: usize = 1 << 20;
/// A peer's metrics as stored (JSON), at most.
const MAX_METRICS_JSON: usize = 4096;
/// The layout this version writes (`PRAGMA user_version`).
const VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS points (
    epoch INTEGER PRIMARY KEY, time INTEGER NOT NULL, loss REAL,
    samples_per_second REAL NOT NULL, peers INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS peers (
    peer TEXT PRIMARY KEY, first_seen INTEGER NOT NULL, metrics TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evals (
    epoch INTEGER PRIMARY KEY, time INTEGER NOT NULL, accuracy REAL, prompts INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    slot INTEGER PRIMARY KEY, epoch INTEGER NOT NULL, prompt TEXT NOT NULL, png BLOB NOT NULL);
";

/// The newest sample images: the epoch of the checkpoint they were drawn with, and each
/// prompt with its PNG.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct SampleSet {
    pub(super) epoch: u64,
    pub(super) images: Vec<(String, Vec<u8>)>,
}

/// The history database.
#[derive(Debug)]
pub(super) struct Store {
    db: Connection,
}

/// Everything read back at start.
#[derive(Debug, Default)]
pub(super) struct Loaded {
    pub(super) lines: Vec<Line>,
    pub(super) samples: SampleSet,
    /// Rows that did not decode (skipped).
    pub(super) damaged: usize,
}

impl Store {
    /// Opens (or creates) the database at `path`.
    pub(super) fn open(path: &Path) -> Result<Store> {
        let db = Connection::open(path)
            .with_context(|| format!("opening the monitor's history {}", path.display()))?;
        let not_ours = || {
            format!(
                "{} is not a monitor history (move it away, or point --data elsewhere)",
                path.display()
            )
        };
        let version: i64 = db
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .with_context(not_ours)?;
        if version > VERSION {
            bail!(
                "{} was written by a newer potluck (layout {version}; this one knows {VERSION}): \
                 upgrade, or point --data elsewhere",
                path.display()
            );
        }
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.execute_batch(SCHEMA).with_context(not_ours)?;
        db.pragma_update(None, "user_version", VERSION)?;
        Ok(Store { db })
    }

    /// Writes what a poll learnt, all or nothing.
    pub(super) fn append(&mut self, lines: &[Line]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let tx = self.db.transaction()?;
        for line in lines {
            match line {
                Line::Point(p) => {
                    tx.execute(
                        "INSERT OR REPLACE INTO points VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![
                            p.epoch as i64,
                            p.time as i64,
                            p.loss,
                            p.samples_per_second,
                            p.peers as i64
                        ],
                    )?;
                }
                Line::Peer(s) => {
                    tx.execute(
                        "INSERT OR REPLACE INTO peers VALUES (?1, ?2, ?3)",
                        params![
                            s.peer,
                            s.first_seen as i64,
                            serde_json::to_string(&s.metrics)?
                        ],
                    )?;
                }
                Line::Eval(e) => {
                    tx.execute(
                        "INSERT OR REPLACE INTO evals VALUES (?1, ?2, ?3, ?4)",
                        params![e.epoch as i64, e.time as i64, e.accuracy, e.prompts as i64],
                    )?;
                }
            }
        }
        tx.commit().context("writing the monitor's history")?;
        Ok(())
    }

    /// Replaces the sample images with `set`.
    pub(super) fn put_samples(&mut self, set: &SampleSet) -> Result<()> {
        let tx = self.db.transaction()?;
        tx.execute("DELETE FROM samples", [])?;
        for (slot, (prompt, png)) in set.images.iter().take(MAX_SAMPLES).enumerate() {
            tx.execute(
                "INSERT INTO samples VALUES (?1, ?2, ?3, ?4)",
                params![slot as i64, set.epoch as i64, prompt, png],
            )?;
        }
        tx.commit().context("writing the sample images")?;
        Ok(())
    }

    /// Reads everything back, oldest first, within the bounds.
    pub(super) fn load(&self) -> Result<Loaded> {
        let mut out = Loaded::default();
        let mut points = self.db.prepare(
            "SELECT epoch, time, loss, samples_per_second, peers FROM points \
             ORDER BY epoch DESC LIMIT ?1",
        )?;
        let rows = points.query_map([MAX_POINTS as i64], |r| {
            Ok(Point {
                epoch: r.get::<_, i64>(0)?.max(0) as u64,
                time: r.get::<_, i64>(1)?.max(0) as u64,
                loss: r.get(2)?,
                samples_per_second: r.get(3)?,
                peers: r.get::<_, i64>(4)?.max(0) as usize,
            })
        })?;
        let mut lines: Vec<Line> = Vec::new();
        for row in rows {
            match row {
                Ok(p) => lines.push(Line::Point(p)),
                Err(_) => out.damaged += 1,
            }
        }
        lines.reverse();
        let mut evals = self.db.prepare(
            "SELECT epoch, time, accuracy, prompts FROM evals ORDER BY epoch DESC LIMIT ?1",
        )?;
        let rows = evals.query_map([MAX_POINTS as i64], |r| {
            Ok(Eval {
                epoch: r.get::<_, i64>(0)?.max(0) as u64,
                time: r.get::<_, i64>(1)?.max(0) as u64,
                accuracy: r.get(2)?,
                prompts: r.get::<_, i64>(3)?.max(0) as usize,
            })
        })?;
        let mut back: Vec<Line> = Vec::new();
        for row in rows {
            match row {
                Ok(e) => back.push(Line::Eval(e)),
                Err(_) => out.damaged += 1,
            }
        }
        lines.extend(back.into_iter().rev());
        let mut peers = self.db.prepare(
            "SELECT peer, first_seen, metrics FROM peers WHERE length(metrics) <= ?1 \
             AND length(peer) <= 128 LIMIT ?2",
        )?;
        let rows = peers.query_map(params![MAX_METRICS_JSON as i64, MAX_PEERS as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        for row in rows {
            let decoded = row.ok().and_then(|(peer, first_seen, json)| {
                let metrics = serde_json::from_str(&json).ok()?;
                Some(Seen {
                    peer,
                    metrics,
                    first_seen: first_seen.max(0) as u64,
                })
            });
            match decoded {
                Some(s) => lines.push(Line::Peer(s)),
                None => out.damaged += 1,
            }
        }
        let mut samples = self.db.prepare(
            "SELECT epoch, prompt, png FROM samples WHERE length(png) <= ?1 \
             AND length(prompt) <= 1024 ORDER BY slot LIMIT ?2",
        )?;
        let rows = samples.query_map(params![MAX_PNG as i64, MAX_SAMPLES as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        for row in rows {
            match row {
                Ok((epoch, prompt, png)) => {
                    out.samples.epoch = epoch.max(0) as u64;
                    out.samples.images.push((prompt, png));
                }
                Err(_) => out.damaged += 1,
            }
        }
        out.lines = lines;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use potluck_train::metrics::Metrics;

    fn seen(peer: &str, epoch: u64) -> Seen {
        Seen {
            peer: peer.into(),
            metrics: Metrics {
                epoch,
                loss: Some(1.5),
                samples: 10 * epoch,
                samples_per_second: 3.0,
                device: "cpu".into(),
                role: "trainer".into(),
                uptime_s: 7,
                version: "0".into(),
                client: false,
                alone_epochs: 0,
                stalled_s: 0,
                strangers: 0,
                sent: 0,
                received: 0,
                computing: 0.0,
                recipe: String::new(),
                time: 1000 + epoch,
            },
            first_seen: 5,
        }
    }

    #[test]
    fn what_is_written_reads_back_after_a_reopen_and_bad_rows_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.sqlite");
        let point = |epoch| Point {
            epoch,
            time: 100 + epoch,
            loss: (epoch != 2).then_some(2.0 / epoch as f64),
            samples_per_second: 12.5,
            peers: 3,
        };
        {
            let mut store = Store::open(&path).unwrap();
            store
                .append(&[
                    Line::Point(point(1)),
                    Line::Peer(seen("a", 1)),
                    Line::Point(point(2)),
                ])
                .unwrap();
            store
                .append(&[
                    Line::Point(point(3)),
                    Line::Peer(seen("a", 3)),
                    Line::Eval(Eval {
                        epoch: 3,
                        time: 9,
                        accuracy: Some(0.75),
                        prompts: 32,
                    }),
                ])
                .unwrap();
            let set = SampleSet {
                epoch: 3,
                images: vec![("a red circle".into(), vec![1, 2, 3])],
            };
            store.put_samples(&set).unwrap();
            // A peer row that is not a metrics record, and one too long to read.
            store
                .db
                .execute("INSERT INTO peers VALUES ('x', 1, 'not json')", [])
                .unwrap();
            let long = "y".repeat(MAX_METRICS_JSON + 1);
            store
                .db
                .execute("INSERT INTO peers VALUES ('z', 1, ?1)", [long])
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let back = store.load().unwrap();
        assert_eq!(back.damaged, 1, "the bad JSON row is counted");
        let points: Vec<&Point> = back
            .lines
            .iter()
            .filter_map(|l| match l {
                Line::Point(p) => Some(p),
                _ => None,
            })
            .collect();
        assert_eq!(points, [&point(1), &point(2), &point(3)]);
        let peers: Vec<&Seen> = back
            .lines
            .iter()
            .filter_map(|l| match l {
                Line::Peer(s) => Some(s),
                _ => None,
            })
            .collect();
        assert_eq!(peers.len(), 1);
        assert_eq!(
            peers[0].metrics.epoch, 3,
            "a peer's newest record replaces its older"
        );
        assert!(back.lines.iter().any(|l| matches!(
            l,
            Line::Eval(Eval {
                epoch: 3,
                accuracy: Some(a),
                ..
            }) if (*a - 0.75).abs() < 1e-12
        )));
        assert_eq!(back.samples.epoch, 3);
        assert_eq!(back.samples.images[0].1, [1, 2, 3]);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.sqlite");
        std::fs::write(
            &path,
            b"these bytes are not SQLite at all, not even a header",
        )
        .unwrap();
        let err = format!("{:#}", Store::open(&path).unwrap_err());
        assert!(err.contains("history.sqlite"), "{err}");
    }
}
