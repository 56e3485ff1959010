//! The demo's swarm: starting its processes in order, watching them train with the combined
//! view, and stopping them (trainers and aux peer first, each with its checkpoint).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use potluck_train::checkpoint;

use super::proc::Proc;
use super::view::{View, http_get};
use super::{Args, MICRO_BATCH, RUN, START_WAIT, STOP_GRACE};

/// What the swarm's training came to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Outcome {
    /// Every trainer reached the last epoch.
    Done,
    /// Ctrl-C.
    Interrupted,
    /// Past the time allowed (the machine is slower than measured).
    Late,
}

/// The demo's processes.
pub(super) struct Swarm {
    boot: Proc,
    aux: Proc,
    monitor: Proc,
    trainers: Vec<Proc>,
    /// host:port of the dashboard.
    http: String,
    interrupts: Arc<AtomicUsize>,
    dir: PathBuf,
}

/// Counts Ctrl-Cs from now on (instead of dying at the first).
fn count_interrupts() -> Result<Arc<AtomicUsize>> {
    let count = Arc::new(AtomicUsize::new(0));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let seen = count.clone();
    let (ready_tx, ready) = sync_channel(1);
    std::thread::spawn(move || {
        rt.block_on(async move {
            let Ok(mut interrupt) = crate::cmd::Interrupt::new() else {
                return;
            };
            let _ = ready_tx.send(());
            loop {
                interrupt.recv().await;
                seen.fetch_add(1, Ordering::SeqCst);
            }
        });
    });
    let _ = ready.recv_timeout(Duration::from_secs(5));
    Ok(count)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

impl Swarm {
    pub(super) fn start(args: &Args, data: &Path, epochs: u64, warmup: u64) -> Result<Swarm> {
        let dir = &args.dir;
        for old in ["aux", "monitor", "logs"] {
            let _ = std::fs::remove_dir_all(dir.join(old));
        }
        for i in 1..=16 {
            let _ = std::fs::remove_dir_all(dir.join(format!("peer-{i}")));
        }
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let interrupts = count_interrupts()?;
        let s = |p: &Path| p.display().to_string();
        let local = "/ip4/127.0.0.1/tcp/0";

        let mut boot = Proc::spawn(
            "bootstrap node",
            dir,
            &strings(&["dht", "serve", "--listen", local]),
        )?;
        let line = boot.wait_for("/ip4/127.0.0.1/tcp/", START_WAIT)?;
        let addr = line.trim().to_owned();
        // How every process of the swarm joins it.
        let joining = |command: &str| {
            strings(&[
                command,
                "--run-id",
                RUN,
                "--initial-peers",
                &addr,
                "--listen",
                local,
            ])
        };
        let run_args = |command: &str, extra: &[String]| -> Vec<String> {
            let mut v = joining(command);
            v.extend(strings(&[
                "--data",
                &s(data),
                "--config",
                &args.config,
                "--target-batch-size",
                &args.target_batch_size.to_string(),
                "--epochs",
                &epochs.to_string(),
                "--warmup",
                &warmup.to_string(),
            ]));
            v.extend_from_slice(extra);
            v
        };
        // The aux peer first: it is the swarm's helper and keeps its checkpoints (about one a
        // minute, five at least) for the monitor to draw with.
        let every = ((epochs as f64 / args.minutes).ceil() as u64).clamp(1, (epochs / 5).max(1));
        let aux_args = run_args(
            "aux",
            &strings(&[
                "--checkpoint-dir",
                &s(&dir.join("aux")),
                "--keep",
                "3",
                "--every",
                &every.to_string(),
            ]),
        );
        let mut aux = Proc::spawn("aux peer", dir, &aux_args)?;
        aux.wait_for("aux for run", START_WAIT)?;
        // The dashboard's port, or any free one if it is taken.
        let http = match std::net::TcpListener::bind(args.http) {
            Ok(l) => {
                drop(l);
                args.http
            }
            Err(_) => {
                println!("{} is busy: the dashboard takes a free port", args.http);
                SocketAddr::new(args.http.ip(), 0)
            }
        };
        let mut monitor = Proc::spawn(
            "monitor",
            dir,
            &[
                joining("monitor"),
                strings(&[
                    "--http",
                    &http.to_string(),
                    "--data",
                    &s(&dir.join("monitor")),
                    "--checkpoints",
                    &s(&dir.join("aux")),
                    "--every",
                    "2",
                    "--samples-every",
                    "10",
                    "--temperature",
                    &args.temperature.to_string(),
                ]),
            ]
            .concat(),
        )?;
        let line = monitor.wait_for("monitor for run", START_WAIT)?;
        let http = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .context("the monitor did not say where it serves")?
            .to_owned();
        let mut trainers = Vec::new();
        for i in 1..=args.trainers {
            let a = run_args(
                "train",
                &strings(&[
                    "--out",
                    &s(&dir.join(format!("peer-{i}"))),
                    "--threads",
                    "1",
                    "--micro-batch",
                    &MICRO_BATCH.to_string(),
                    "--seed",
                    &args.seed.to_string(),
                ]),
            );
            trainers.push(Proc::spawn(&format!("trainer {i}"), dir, &a)?);
        }
        for t in &mut trainers {
            t.wait_for("run demo:", START_WAIT)?;
        }
        println!("dashboard: http://{http}   (logs in {})", logs.display());
        Ok(Swarm {
            boot,
            aux,
            monitor,
            trainers,
            http,
            interrupts,
            dir: dir.clone(),
        })
    }

    /// Shows the combined view until every trainer is done, Ctrl-C, or well past the time
    /// the epochs were sized for.
    pub(super) fn train(&mut self, epochs: u64, minutes: f64) -> Result<Outcome> {
        let started = Instant::now();
        let late = Duration::from_secs_f64(minutes * 60.0 * 1.5 + 180.0);
        let mut view = View::new(epochs);
        let outcome = loop {
            if self.interrupts.load(Ordering::SeqCst) > 0 {
                break Outcome::Interrupted;
            }
            if started.elapsed() > late {
                break Outcome::Late;
            }
            let mut running = 0;
            for t in &mut self.trainers {
                match t.child.try_wait()? {
                    None => running += 1,
                    Some(status) if !status.success() => {
                        view.finish();
                        bail!("the {} failed ({status}): {}", t.name, t.tail());
                    }
                    Some(_) => {}
                }
            }
            if running == 0 {
                break Outcome::Done;
            }
            if let Ok(status) = http_get(&self.http, "/api/status") {
                view.show(&status, started);
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        view.finish();
        Ok(outcome)
    }

    /// Stops everything (the trainers and the aux peer first, each with a final checkpoint);
    /// returns the checkpoint to draw and score with.
    pub(super) fn finish(&mut self, outcome: Outcome) -> Result<PathBuf> {
        match outcome {
            Outcome::Done => {}
            Outcome::Interrupted => {
                println!(
                    "interrupted: every peer writes its final checkpoint (Ctrl-C again to kill them)"
                );
            }
            Outcome::Late => {
                println!("the swarm is slower than this machine measured: stopping it where it is")
            }
        }
        let hard = |s: &Swarm| s.interrupts.load(Ordering::SeqCst) > 1;
        let grace = |s: &Swarm| {
            if hard(s) { Duration::ZERO } else { STOP_GRACE }
        };
        if outcome != Outcome::Done {
            for t in &mut self.trainers {
                t.interrupt();
            }
            self.aux.interrupt();
        }
        let mut failed = Vec::new();
        for i in 0..self.trainers.len() {
            let g = grace(self);
            let t = &mut self.trainers[i];
            if let Some(status) = t.stop_within(g)
                && !status.success()
                && !t.stopping
            {
                failed.push(format!("the {} failed ({status}): {}", t.name, t.tail()));
            }
        }
        // The aux peer ends by itself at the last epoch; it is asked to if it has not a
        // while after the trainers.
        let wait = grace(self).min(Duration::from_secs(30));
        if self.aux.wait_within(wait).is_none() {
            self.aux.interrupt();
            let g = grace(self);
            self.aux.stop_within(g);
        }
        if let Some(first) = failed.into_iter().next() {
            self.stop_the_rest();
            bail!(first);
        }
        let ckpt = (1..=self.trainers.len())
            .map(|i| self.dir.join(format!("peer-{i}")))
            .find(|d| checkpoint::read_manifest(d).is_ok());
        match ckpt {
            Some(c) => Ok(c),
            None => {
                self.stop_the_rest();
                bail!(
                    "no trainer wrote a checkpoint: see the logs in {}",
                    self.dir.join("logs").display()
                )
            }
        }
    }

    fn stop_the_rest(&mut self) {
        for p in [&mut self.monitor, &mut self.boot] {
            p.interrupt();
            p.stop_within(Duration::from_secs(10));
        }
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        self.stop_the_rest();
    }
}
