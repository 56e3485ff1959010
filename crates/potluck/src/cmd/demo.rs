//! `potluck demo`: the first command a newcomer runs. On the embedded `shapes` data set it
//! prepares the tokenizers and token shards, then runs a whole swarm on this machine's loopback:
//! a bootstrap node, three training peers, an aux peer keeping checkpoints and the monitor with
//! its dashboard, each its own process of this binary (as on separate machines) with its output
//! in `DIR/logs`. It shows one combined progress view (read from the monitor's API, like any
//! client of it), and at the end draws a captioned sample grid and scores the model with the
//! detector. Ctrl-C stops every process cleanly, each writing its final checkpoint.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use potluck_data::Order;
use potluck_data::tokens::{Row, TokenSet};
use potluck_model::dalle::{Dalle, Sampling, TokenBatch};
use potluck_train::checkpoint;

use crate::cmd::{eval, prepare, run};

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Example: potluck demo --minutes 10
Then open the dashboard it prints (http://127.0.0.1:8080 unless that port is taken).
Everything lands in --dir: the prepared data (kept and reused by the next demo), each peer's
checkpoint, the aux peer's checkpoints, the monitor's history, every process's log, the sample
grid.")]
pub(crate) struct Args {
    /// Where the demo writes everything it makes (all but the prepared data made afresh).
    #[arg(long, default_value = "runs/demo")]
    dir: PathBuf,
    /// Minutes of training (the swarm's epochs are sized to fit them on this machine).
    #[arg(long, default_value_t = 11.0)]
    minutes: f64,
    /// Training peers.
    #[arg(long, default_value_t = 3)]
    trainers: usize,
    /// Model preset.
    #[arg(long, default_value = "small")]
    config: String,
    /// Samples the swarm gathers per epoch.
    #[arg(long, default_value_t = 64)]
    target_batch_size: u64,
    /// Where the monitor serves the dashboard (a free port is taken if this one is busy).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Images encoded into token shards.
    #[arg(long, default_value_t = 20_000)]
    images: usize,
    /// VQ-VAE training steps.
    #[arg(long, default_value_t = 1500)]
    vq_steps: usize,
    /// Sampling temperature of the demo's drawings (the monitor's, the grid, the evaluation);
    /// the evaluation is also given at 1.
    #[arg(long, default_value_t = 0.5)]
    temperature: f64,
    /// Prompts the final evaluation draws.
    #[arg(long, default_value_t = 100)]
    eval_prompts: usize,
    /// Data and model seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Samples per forward/backward pass of each trainer.
const MICRO_BATCH: usize = 16;
/// The swarm's samples per second against `cores / (one thread's seconds per sample)`, as
/// measured on 2 cores with three `small` trainers, an aux peer and the monitor (the rest goes
/// to coordination, averaging, and the processes sharing the cores).
const EFFICIENCY: f64 = 0.78;
/// Epochs come out this much larger than the target (the last reports overshoot it).
const OVERSHOOT: f64 = 1.1;
/// Seconds an epoch takes at least, however little there is to compute (reports, forming a
/// group, averaging), measured with `tiny` on 2 cores; with more to compute it overlaps.
const EPOCH_MIN: f64 = 1.3;
/// The demo's run.
const RUN: &str = "demo";
/// A process asked to stop gets this long before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(60);
/// A process that started must say where it is within this long.
const START_WAIT: Duration = Duration::from_secs(120);

pub(crate) fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    if !(args.minutes.is_finite() && args.minutes > 0.0 && args.minutes <= 24.0 * 60.0) {
        bail!("--minutes must be above 0 and at most a day");
    }
    if !(args.temperature.is_finite() && args.temperature > 0.0) {
        bail!("--temperature must be above 0");
    }
    if !(1..=16).contains(&args.trainers) {
        bail!("--trainers must be between 1 and 16");
    }
    let data = args.dir.join("data");
    let tokens = prepared(&args, &data)?;
    let config = crate::cmd::train::model_config(&args.config, &tokens, false)?;

    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let per_sample = calibrate(&tokens, &config)?;
    let rate = (cores.min(args.trainers) as f64) / per_sample * EFFICIENCY;
    let epoch_seconds = (args.target_batch_size as f64 * OVERSHOOT / rate).max(EPOCH_MIN);
    let epochs = ((args.minutes * 60.0 / epoch_seconds) as u64).max(10);
    let warmup = (epochs / 12).clamp(2, 50);
    println!(
        "potluck demo: 2/3 a swarm on this machine: {} `{}` trainers, an aux peer, the monitor; \
         one thread computes {:.1} samples/s here, so {epochs} epochs of {} samples fit in \
         about {} minutes",
        args.trainers,
        args.config,
        1.0 / per_sample,
        args.target_batch_size,
        args.minutes
    );
    // The monitor stays up while the model is scored: the dashboard shows the end too.
    let mut swarm = Swarm::start(&args, &data, epochs, warmup)?;
    let outcome = swarm.train(epochs, args.minutes)?;
    let ckpt = swarm.finish(outcome)?;
    let done = finish(&args, &ckpt, started, outcome == Outcome::Interrupted);
    drop(swarm);
    done
}

/// The prepared data set in `data`: made unless a previous demo left it there.
fn prepared(args: &Args, data: &Path) -> Result<TokenSet> {
    if let Ok(set) = TokenSet::open(data)
        && set.manifest.dataset == "shapes"
    {
        println!(
            "potluck demo: 1/3 reusing the prepared `shapes` data in {} (delete it to prepare \
             afresh)",
            data.display()
        );
        return Ok(set);
    }
    println!(
        "potluck demo: 1/3 preparing the built-in `shapes` data set in {}",
        data.display()
    );
    let prepare = prepare::Args {
        dataset: "shapes".into(),
        out: data.to_path_buf(),
        images: Some(args.images),
        vq_steps: args.vq_steps,
        vq_batch: 32,
        vq_lr: 2e-3,
        vq_images: 10_000,
        held_out: 500,
        seed: args.seed,
        image_side: 32,
        downsample: 4,
        codebook: 512,
        vq_channels: 32,
        vocab: 1024,
        text_len: None,
        tokenizer: None,
        reconstruct: 16,
        shard_samples: 10_000,
        emoji_dir: "data/emoji".into(),
        device: "cpu".into(),
    };
    let report = prepare::prepare(&prepare)?;
    prepare::print_report(data, &report);
    TokenSet::open(data).with_context(|| format!("opening {}", data.display()))
}

/// One kernel thread's seconds per sample of forward and backward passes (the trainers run one
/// thread each): the median of four micro-batches after a warm-up one.
fn calibrate(data: &TokenSet, config: &potluck_model::dalle::Config) -> Result<f64> {
    use potluck_core::Trainable;
    crate::cmd::train::set_threads(Some(1));
    let mut model = Dalle::new(config.clone(), potluck_model::tch::Device::Cpu)?;
    let rows = data
        .rows(Order::new(0, 0))
        .take(MICRO_BATCH)
        .collect::<Result<Vec<Row>, _>>()?;
    let batch = TokenBatch::from_rows(&rows);
    let mut grads = vec![0.0f32; model.layout().numel()];
    model.accumulate_gradients(&batch, &mut grads)?;
    let mut times = Vec::new();
    for _ in 0..4 {
        let t = Instant::now();
        model.accumulate_gradients(&batch, &mut grads)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok((times[1] + times[2]) / 2.0 / rows.len().max(1) as f64)
}

/// What the swarm's training came to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// Every trainer reached the last epoch.
    Done,
    /// Ctrl-C.
    Interrupted,
    /// Past the time allowed (the machine is slower than measured).
    Late,
}

/// One process of the demo's swarm: the lines it prints go to its log, and to the demo while
/// it waits for one.
struct Proc {
    name: String,
    child: Child,
    lines: Receiver<String>,
    log: PathBuf,
    /// Asked to stop (its exit status then is no failure).
    stopping: bool,
}

impl Proc {
    fn spawn(name: &str, dir: &Path, args: &[String]) -> Result<Proc> {
        let logs = dir.join("logs");
        let exe = std::env::current_exe().context("finding this binary")?;
        let log = logs.join(format!("{}.log", name.replace(' ', "-")));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let file = Arc::new(Mutex::new(file));
        let mut child = Command::new(exe)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            // Marks the demo's processes (its tests check that none outlives it).
            .env("POTLUCK_DEMO_DIR", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        // A bounded queue: lines nobody waits for are dropped (the log keeps them all).
        let (tx, rx) = sync_channel(1024);
        if let Some(out) = child.stdout.take() {
            copy_lines(out, file.clone(), tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            copy_lines(err, file, tx);
        }
        Ok(Proc {
            name: name.to_owned(),
            child,
            lines: rx,
            log,
            stopping: false,
        })
    }

    /// Waits for a line containing `needle`; fails if the process ends first or takes longer
    /// than `wait`.
    fn wait_for(&mut self, needle: &str, wait: Duration) -> Result<String> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(500)))
            {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("the {} stopped: {}", self.name, self.tail())
                }
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the {} stopped ({status}): {}", self.name, self.tail());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the {} said nothing like {needle:?} within {wait:?}: {}",
                    self.name,
                    self.tail()
                );
            }
        }
    }

    /// The end of its log, to show with an error.
    fn tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            use std::io::{Seek, SeekFrom};
            let len = f.metadata().map_or(0, |m| m.len());
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
            let _ = f.take(4096).read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "the end of {}:\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }

    /// Asks it to stop as Ctrl-C would (it finishes what it must: a checkpoint).
    fn interrupt(&mut self) {
        self.stopping = true;
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid, which we have not reaped yet (so it is
            // not reused); no memory is involved.
            unsafe {
                libc::kill(pid, libc::SIGINT);
            }
        }
    }

    /// Its exit status if it ends within `wait`.
    fn wait_within(&mut self, wait: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + wait;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => return None,
            }
        }
    }

    /// Its exit status once it has ended, killing it after `grace`.
    fn stop_within(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.wait_within(grace) {
            return Some(status);
        }
        eprintln!("the {} did not stop in time: killed", self.name);
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Copies a child's output, line by line, to its log and to the demo's queue.
fn copy_lines(
    from: impl Read + Send + 'static,
    log: Arc<Mutex<std::fs::File>>,
    to: SyncSender<String>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut f) = log.lock() {
                let _ = writeln!(f, "{line}");
            }
            let _ = to.try_send(line);
        }
    });
}

/// The demo's processes.
struct Swarm {
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
            let Ok(mut interrupt) = super::Interrupt::new() else {
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
    fn start(args: &Args, data: &Path, epochs: u64, warmup: u64) -> Result<Swarm> {
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
        let run_args = |extra: &[String]| -> Vec<String> {
            let mut v = strings(&[
                "--run-id",
                RUN,
                "--initial-peers",
                &addr,
                "--listen",
                local,
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
            ]);
            v.extend_from_slice(extra);
            v
        };
        // The aux peer first: it is the swarm's helper and keeps its checkpoints (about one a
        // minute, five at least) for the monitor to draw with.
        let every = ((epochs as f64 / args.minutes).ceil() as u64).clamp(1, (epochs / 5).max(1));
        let mut aux_args = strings(&["aux"]);
        aux_args.extend(run_args(&strings(&[
            "--checkpoint-dir",
            &s(&dir.join("aux")),
            "--keep",
            "3",
            "--every",
            &every.to_string(),
        ])));
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
            &strings(&[
                "monitor",
                "--run-id",
                RUN,
                "--initial-peers",
                &addr,
                "--listen",
                local,
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
            let mut a = strings(&["train"]);
            a.extend(run_args(&strings(&[
                "--out",
                &s(&dir.join(format!("peer-{i}"))),
                "--threads",
                "1",
                "--micro-batch",
                &MICRO_BATCH.to_string(),
                "--seed",
                &args.seed.to_string(),
            ])));
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
    fn train(&mut self, epochs: u64, minutes: f64) -> Result<Outcome> {
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
    fn finish(&mut self, outcome: Outcome) -> Result<PathBuf> {
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

/// A GET of the monitor's JSON API on loopback (bounded: 16 MiB, 5 s).
fn http_get(hostport: &str, path: &str) -> Result<serde_json::Value> {
    let timeout = Duration::from_secs(5);
    let addr: SocketAddr = hostport.parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    s.take(16 << 20).read_to_end(&mut reply)?;
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text.split_once("\r\n\r\n").context("a malformed reply")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(serde_json::from_str(body)?)
}

/// The combined progress view: the swarm's epoch toward the last, its loss, samples/s and
/// accuracy, and a line per live peer. Without a terminal, a text report every half minute.
struct View {
    multi: MultiProgress,
    main: ProgressBar,
    peers: Vec<ProgressBar>,
    last_text: Option<Instant>,
}

impl View {
    fn new(epochs: u64) -> View {
        let multi = MultiProgress::new();
        let main = multi.add(ProgressBar::new(epochs));
        let style = ProgressStyle::with_template(
            "{prefix:>8} [{elapsed_precise}] {wide_bar} epoch {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        main.set_style(style);
        main.set_prefix("swarm");
        View {
            multi,
            main,
            peers: Vec::new(),
            last_text: None,
        }
    }

    fn show(&mut self, s: &serde_json::Value, started: Instant) {
        let f = |v: &serde_json::Value, d: usize| {
            v.as_f64().map_or("–".to_owned(), |x| format!("{x:.d$}"))
        };
        let epoch = s["epoch"].as_u64().unwrap_or(0);
        let history = s["history"].as_array().map_or(&[][..], Vec::as_slice);
        let loss = history.last().map_or("–".into(), |p| f(&p["loss"], 3));
        let evals = s["evals"].as_array().map_or(&[][..], Vec::as_slice);
        let accuracy = evals
            .iter()
            .rev()
            .find(|e| e["accuracy"].is_number())
            .map_or("–".into(), |e| {
                format!("{} at epoch {}", f(&e["accuracy"], 2), e["epoch"])
            });
        let live = s["live"].as_array().map_or(&[][..], Vec::as_slice);
        if live.is_empty() {
            return;
        }
        let summary = format!(
            "| loss {loss} | {} samples/s | {} peers | accuracy {accuracy}",
            f(&s["samples_per_second"], 1),
            live.len()
        );
        let lines: Vec<String> = live
            .iter()
            .map(|p| {
                let id = p["peer"].as_str().unwrap_or("?");
                let short = &id[id.len().saturating_sub(6)..];
                format!(
                    "{:>8} …{short}  epoch {:>5}  loss {:>6}  {:>6} samples/s  {:>7} samples",
                    p["role"].as_str().unwrap_or("?"),
                    p["epoch"],
                    f(&p["loss"], 3),
                    f(&p["samples_per_second"], 1),
                    p["samples"]
                )
            })
            .collect();
        self.main.set_position(epoch);
        if self.main.is_hidden() {
            if self
                .last_text
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(30))
            {
                self.last_text = Some(Instant::now());
                println!(
                    "[{:>4.0} s] epoch {epoch}/{} {summary}",
                    started.elapsed().as_secs_f64(),
                    self.main.length().unwrap_or(0)
                );
                for l in &lines {
                    println!("    {l}");
                }
            }
            return;
        }
        self.main.set_message(summary);
        while self.peers.len() < lines.len() {
            let bar = self.multi.add(ProgressBar::new(1));
            bar.set_style(
                ProgressStyle::with_template("{msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            self.peers.push(bar);
        }
        for (i, bar) in self.peers.iter().enumerate() {
            bar.set_message(lines.get(i).cloned().unwrap_or_default());
        }
    }

    fn finish(&self) {
        for bar in &self.peers {
            bar.finish_and_clear();
        }
        self.main.finish_and_clear();
    }
}

/// Draws the sample grid and scores the model; prints where everything is.
fn finish(args: &Args, ckpt: &Path, started: Instant, interrupted: bool) -> Result<()> {
    println!(
        "potluck demo: 3/3 drawing samples and scoring them with {}",
        ckpt.display()
    );
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    crate::cmd::train::set_threads(Some(cores));
    let loaded = run::load(ckpt, potluck_model::tch::Device::Cpu)?;
    let prompts: Vec<String> = run::SAMPLE_PROMPTS
        .iter()
        .map(|p| (*p).to_owned())
        .collect();
    let sampling = Sampling {
        seed: args.seed,
        temperature: args.temperature,
        ..Sampling::default()
    };
    let images = run::draw(&loaded, &prompts, &sampling)?;
    let grid = args.dir.join("samples.png");
    run::write_grid(&grid, &images, &prompts)?;
    let eval_grid = args.dir.join("eval.png");
    let scored = if interrupted {
        None
    } else {
        let (accuracy, images, prompts) =
            eval::score_loaded(&loaded, args.eval_prompts, &sampling)?;
        run::write_grid(&eval_grid, &images, &prompts)?;
        let plain = Sampling {
            temperature: 1.0,
            ..sampling
        };
        let (at_one, _, _) = eval::score_loaded(&loaded, args.eval_prompts, &plain)?;
        Some((accuracy, at_one))
    };
    let epoch = loaded
        .manifest
        .extra
        .get("epoch")
        .cloned()
        .unwrap_or_default();
    println!();
    println!(
        "done in {:.1} minutes (epoch {epoch}, {} samples):",
        started.elapsed().as_secs_f64() / 60.0,
        loaded.manifest.samples
    );
    println!(
        "  data and tokenizers:   {}",
        args.dir.join("data").display()
    );
    println!(
        "  trainers' checkpoints: {}",
        args.dir.join("peer-N").display()
    );
    println!(
        "  aux checkpoints:       {}",
        args.dir.join("aux").display()
    );
    println!(
        "  monitor history:       {}",
        args.dir.join("monitor/history.sqlite").display()
    );
    println!(
        "  logs:                  {}",
        args.dir.join("logs").display()
    );
    println!("  sample grid:           {}", grid.display());
    if let Some((a, at_one)) = &scored {
        println!(
            "  eval on {} prompts:    colour {:.2}, shape {:.2}, position {:.2}, size {:.2} at \
             temperature {} ({}); accuracy {:.3} at temperature 1",
            a.prompts,
            a.color,
            a.shape,
            a.position,
            a.size,
            args.temperature,
            eval_grid.display(),
            at_one.overall
        );
    } else {
        println!(
            "  eval:                  skipped (interrupted): potluck eval --checkpoint {}",
            ckpt.display()
        );
    }
    println!(
        "  draw your own:         potluck generate --checkpoint {} \"a small red circle in the center\"",
        ckpt.display()
    );
    if let Some((a, _)) = scored {
        println!("accuracy: {:.3}", a.overall);
    }
    Ok(())
}
