//! `potluck train --run-id ID`: train with a swarm. The first peer of a run starts it (no
//! initial peers needed); others join through any peer's address, download the swarm's state
//! and take part from the next epoch on.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use potluck_allreduce::balance::Mode;
use potluck_core::clock;
use potluck_data::Order;
use potluck_data::tokens::{Row, TokenSet};
use potluck_model::Device;
use potluck_model::dalle::{Dalle, TokenBatch};
use potluck_net::host::ClientMode;
use potluck_train::collab::{self, Collab, Net, Tick};
use potluck_train::optim::{self, Optimizer};
use potluck_train::stall::Stall;
use potluck_train::{checkpoint, metrics};
use serde_json::json;

use crate::cmd::joining::{
    NetArgs, follow_charter, join_failed, publish_metrics, run_seed, start_dht,
};
use crate::cmd::run;
use crate::cmd::train::{Args, fixed_loss, model_config, optimizer_config, save_state};

/// How a run's epochs go (every peer of a run gives the same).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RunArgs {
    /// Samples the swarm gathers per epoch (one optimizer step for everyone).
    #[arg(long, default_value_t = 256)]
    pub(crate) target_batch_size: u64,
    /// Average the parameters and the optimizer's moments every this many epochs (0: never).
    #[arg(long, default_value_t = 10)]
    pub(crate) state_every: u64,
    /// Roll back to the last good state (kept every --state-every epochs) when an averaged
    /// gradient's norm is more than this many times the recent median (0: never).
    #[arg(long, default_value_t = 10.0)]
    pub(crate) spike_factor: f64,
    /// Byzantine-robust averaging: reducers combine contributions with CenteredClip (radius
    /// from the contributions' own spread) instead of the mean, so no one peer can move an
    /// average far, whatever it sends; and every part is reduced by two members and the two
    /// results compared, so a reducer returning another average is caught (its part is not
    /// taken, and it is reported). Twice the averaging bytes.
    #[arg(long)]
    pub(crate) robust: bool,
    /// Epochs in a row a peer that cannot average with the others (though it sees them) steps
    /// on its own gradient before it stops stepping, until it averages again or downloads the
    /// swarm's state, which it tries once an epoch while held back (it warns from the third
    /// such epoch on; 0: never step alone while others are around).
    #[arg(long, default_value_t = 10)]
    pub(crate) max_alone_epochs: u64,
    /// How each epoch's gradient travels: auto (norms, biases and small tensors in fp16, the
    /// rest blockwise 8-bit, about a quarter of f32's bytes), none (f32), fp16 or 8bit. Lossy
    /// codecs carry their rounding into the next epoch (error feedback); the parameters'
    /// averaging every --state-every epochs is exact. Every peer of a run gives the same.
    #[arg(long, default_value = "auto")]
    pub(crate) codec: collab::Compression,
    /// Measure this peer's uplink every this many seconds, by a short bulk transfer (about
    /// half a second) to another live peer in turn: the rate it offers, and so its parts and
    /// the others' timeouts, is the median of its last three measurements (0: never, it offers
    /// 100 MB/s).
    #[arg(long, default_value_t = 300)]
    pub(crate) measure_links_every: u64,
    /// Local-update mode, as DiLoCo (0: off, every epoch's gradient is averaged): an epoch is
    /// a round of this many --target-batch-size batches, through which every peer steps its
    /// own inner optimizer (--optimizer, --lr…) on its own samples, every --inner-batch; then
    /// the peers average the change of their parameters (weighted by samples, with --codec)
    /// and all take the same outer step (Nesterov momentum). The inner learning rate follows
    /// --warmup and --decay-steps counted in batches (a round's inner steps take its rate at
    /// the round's first batch); --epochs counts rounds. A slow peer takes fewer inner
    /// steps and nobody waits for it; with --delayed-updates the averaging runs during the
    /// next round. Every peer of a run gives the same.
    #[arg(long, default_value_t = 0)]
    pub(crate) local_steps: u64,
    /// Local-update mode: samples of its own a peer takes an inner step on (default: its
    /// micro-batch).
    #[arg(long)]
    pub(crate) inner_batch: Option<u64>,
    /// Local-update mode: the outer step's learning rate.
    #[arg(long, default_value_t = 0.7)]
    pub(crate) outer_lr: f64,
    /// Local-update mode: the outer step's Nesterov momentum.
    #[arg(long, default_value_t = 0.9)]
    pub(crate) outer_momentum: f64,
}

impl RunArgs {
    /// The optimizer of the state the swarm shares: the outer one in local-update mode, else
    /// `optimizer` (the flags' inner one) itself.
    pub(crate) fn state_optimizer(&self, optimizer: optim::Config) -> Result<optim::Config> {
        if self.local_steps == 0 {
            return Ok(optimizer);
        }
        let outer = optim::Config::outer(self.outer_lr, self.outer_momentum);
        outer
            .check()
            .map_err(|e| anyhow::anyhow!("--outer-lr and --outer-momentum: {e}"))?;
        Ok(outer)
    }
}

/// What joining a run takes.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SwarmArgs {
    /// Train with the swarm of this run (peers of one run share this name).
    #[arg(long)]
    pub(crate) run_id: Option<String>,
    #[command(flatten)]
    pub(crate) net: NetArgs,
    #[command(flatten)]
    pub(crate) run: RunArgs,
    /// Start a new swarm from this checkpoint (its parameters, optimizer state and epoch), as
    /// an aux peer keeps them; a swarm already running gives its own state instead.
    #[arg(long)]
    pub(crate) init: Option<PathBuf>,
    /// Average and step in the background while the next epoch's gradients are computed
    /// (on parameters one step stale): less idle time, slightly noisier learning.
    #[arg(long)]
    pub(crate) delayed_updates: bool,
    /// Act as a machine this many times slower (to try uneven peers): every micro-batch's
    /// forward and backward passes run this many times, the extra results thrown away.
    #[arg(long, default_value_t = 1)]
    pub(crate) throttle: u32,
}

impl Default for SwarmArgs {
    /// Not in a swarm (for `--solo` callers), with the flags' defaults.
    fn default() -> SwarmArgs {
        SwarmArgs {
            run_id: None,
            net: NetArgs::default(),
            run: RunArgs {
                target_batch_size: 256,
                state_every: 10,
                spike_factor: 10.0,
                robust: false,
                max_alone_epochs: 10,
                codec: collab::Compression::Auto,
                measure_links_every: 300,
                local_steps: 0,
                inner_batch: None,
                outer_lr: 0.7,
                outer_momentum: 0.9,
            },
            init: None,
            delayed_updates: false,
            throttle: 1,
        }
    }
}

/// The line a peer prints for a state it downloaded (at `epoch`): its bytes and time, and the
/// chunks it held alike and did not download.
fn downloaded(epoch: u64, r: &potluck_train::sync::Report) -> String {
    let own = match r.own {
        (0, _) => String::new(),
        (own, all) => format!(" ({own} of {all} chunks held alike here)"),
    };
    format!(
        "downloaded the swarm's state at epoch {epoch}: {:.1} MB in {:.1} s{own}",
        r.bytes as f64 / 1e6,
        r.elapsed.as_secs_f64()
    )
}

/// The collaborative optimizer's settings for a run; in local-update mode, `inner` is the
/// inner optimizer's and `micro` the default inner batch.
pub(crate) fn collab_settings(
    run_id: &str,
    run: &RunArgs,
    inner: optim::Config,
    micro: u64,
) -> collab::Settings {
    let rounds = run.local_steps.max(1);
    let mut settings = collab::Settings::new(run_id, run.target_batch_size.saturating_mul(rounds));
    settings.local = (run.local_steps > 0).then(|| collab::LocalUpdates {
        steps: run.local_steps,
        inner,
        inner_batch: run.inner_batch.unwrap_or(micro).max(1),
    });
    settings.state_every = run.state_every;
    settings.alone_limit = run.max_alone_epochs;
    settings.codec = run.codec;
    settings.measure_every =
        (run.measure_links_every > 0).then(|| Duration::from_secs(run.measure_links_every));
    settings.spike = if run.spike_factor > 0.0 {
        run.spike_factor
    } else {
        f64::INFINITY
    };
    if run.robust {
        settings.averaging = settings.averaging.robust();
    }
    settings
}

/// Loads a checkpoint's parameters and optimizer state into `model` and `optimizer`.
pub(crate) fn init_from(
    dir: &std::path::Path,
    model: &mut Dalle,
    optimizer: &mut Optimizer,
) -> Result<()> {
    use potluck_core::Trainable;
    let (manifest, params) = checkpoint::load_params(dir, model.layout())
        .with_context(|| format!("reading --init checkpoint {}", dir.display()))?;
    checkpoint::load_optimizer(dir, &manifest, optimizer).with_context(|| {
        format!(
            "{}: its optimizer state does not fit (same --config and --state as the run?)",
            dir.display()
        )
    })?;
    model.write_params(&params)?;
    println!("starting from {} at epoch {}", dir.display(), manifest.step);
    Ok(())
}

pub(crate) fn run(args: Args) -> Result<()> {
    let Some(run_id) = args.swarm.run_id.clone() else {
        bail!("--run-id is required to train with others");
    };
    if args.resume {
        bail!("--resume is for --solo runs: a swarm peer takes the swarm's state when it joins");
    }
    if !(1..=1000).contains(&args.swarm.throttle) {
        bail!("--throttle must be between 1 and 1000");
    }
    let device = args.device.parse::<Device>()?.tch()?;
    let data = TokenSet::open(&args.data)
        .with_context(|| format!("opening prepared data {}", args.data.display()))?;
    let micro = args.micro_batch.unwrap_or(16).max(1);
    let config = model_config(&args.config, &data, args.checkpointing)?;
    potluck_model::tch::manual_seed(run_seed(&run_id, args.seed) as i64);
    let mut model = Dalle::new(config.clone(), device)?;
    let opt_cfg = optimizer_config(&args.optim, args.steps)?;
    let state_cfg = args.swarm.run.state_optimizer(opt_cfg)?;
    let mut optimizer = Optimizer::new(state_cfg, model.layout());
    if let Some(dir) = &args.swarm.init {
        init_from(dir, &mut model, &mut optimizer)?;
    }
    run::copy_tokenizers(&args.data, &args.out)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(train(args, run_id, data, model, optimizer, micro))
}

async fn train(
    args: Args,
    run_id: String,
    data: TokenSet,
    model: Dalle,
    mut optimizer: Optimizer,
    micro: usize,
) -> Result<()> {
    let swarm = &args.swarm;
    let (dht, keypair) = start_dht(&run_id, &swarm.net).await?;
    let net = Net::start(dht.clone(), keypair.clone())?;
    // The inner optimizer's schedule counts the swarm's batches: --local-steps to a round.
    let batches = args
        .steps
        .map(|s| s.saturating_mul(swarm.run.local_steps.max(1)));
    let inner = optimizer_config(&args.optim, batches)?;
    let mut settings = collab_settings(&run_id, &swarm.run, inner, micro as u64);
    settings.mode = if swarm.net.client_mode == ClientMode::On {
        Mode::Client
    } else {
        Mode::Full
    };
    settings.delayed = swarm.delayed_updates;
    follow_charter(
        &dht,
        &data,
        &mut settings,
        &mut optimizer,
        model.layout(),
        &swarm.net,
    )
    .await?;
    let config = model.config().clone();
    let local = settings.local;
    let mut peer = Collab::join(model, optimizer, net, settings)
        .await
        .map_err(|e| join_failed(e, &run_id, &swarm.net, &data))?;
    if let Some(r) = peer.joined() {
        println!("{}", downloaded(peer.epoch(), r));
    }
    println!(
        "run {run_id}: {} ({} unique parameters), target batch {} samples, at epoch {}",
        config.name,
        config.unique_params(),
        swarm.run.target_batch_size,
        peer.epoch()
    );
    if let Some(l) = &local {
        println!(
            "local updates: an epoch is a round of {} samples (--local-steps {} × {}); inner \
             steps every {} samples here; outer step: lr {}, Nesterov momentum {}",
            swarm.run.target_batch_size * l.steps,
            l.steps,
            swarm.run.target_batch_size,
            l.inner_batch,
            swarm.run.outer_lr,
            swarm.run.outer_momentum
        );
    }

    // Each peer reads the data in its own order.
    let order = Order::new(args.seed, rand::random());
    let mut rows = data.rows(order);
    let throttle = swarm.throttle;
    // The last micro-batch, for --throttle's extra passes.
    let last = std::cell::RefCell::new(None);
    let mut next =
        |at_most: usize| -> Result<TokenBatch, Box<dyn std::error::Error + Send + Sync>> {
            let rows = (0..micro.min(at_most))
                .map(|_| rows.next().ok_or("the data ran out")?.map_err(Into::into))
                .collect::<Result<Vec<Row>, Box<dyn std::error::Error + Send + Sync>>>()?;
            let batch = TokenBatch::from_rows(&rows);
            if throttle > 1 {
                *last.borrow_mut() = Some(batch.clone());
            }
            Ok(batch)
        };
    let mut scratch = Vec::new();

    let started = Instant::now();
    let limit = args.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
    let mut view = View::new(args.steps, limit);
    let mut last_checkpoint = Instant::now();
    let mut stats = Stats {
        computed: 0,
        compute_time: Duration::ZERO,
        started,
        loss: None,
        alone_epochs: 0,
    };
    let mut last_loss = None;
    let mut first_loss = None;
    let mut tally = Tally::default();
    let mut stall = Stall::new(peer.epoch(), started);
    let mut last_stall_word = None;
    let mut interrupt = super::Interrupt::new()?;
    loop {
        if args.steps.is_some_and(|n| peer.epoch() >= n)
            || limit.is_some_and(|l| started.elapsed() >= l)
        {
            break;
        }
        let t = Instant::now();
        let tick = tokio::select! {
            tick = peer.tick(&mut next) => tick?,
            () = interrupt.recv() => {
                println!("interrupted: writing a final checkpoint");
                break;
            }
        };
        match tick {
            Tick::Computed(loss) => {
                let took = t.elapsed();
                stats.computed += loss.samples as u64;
                stats.compute_time += took;
                if let Some(batch) = last.borrow_mut().take() {
                    use potluck_core::Trainable;
                    scratch.resize(peer.params().len(), 0.0);
                    for _ in 1..throttle {
                        peer.model_mut()
                            .accumulate_gradients(&batch, &mut scratch)?;
                    }
                    stats.compute_time += t.elapsed() - took;
                }
            }
            Tick::Epoch(r) => {
                if r.loss.samples > 0 {
                    last_loss = Some(r.loss.total);
                    first_loss.get_or_insert(r.loss.total);
                }
                tally.count(&r);
                stats.alone_epochs = r.alone_epochs;
                stats.loss = (r.loss.samples > 0).then_some(r.loss.total);
                let m = stats.metrics(&peer, &dht, &args.device, None);
                publish_metrics(&dht, &keypair, &run_id, m);
                let inner = peer
                    .inner_steps()
                    .map_or(String::new(), |(n, _)| format!(", {n} inner steps"));
                tracing::info!(
                    "epoch {} done: {:.0} samples ({} here{inner}) in a group of {}{}, loss \
                     {:.3}, lr {:.2e}, {:.2} s from the deadline to new parameters; sent {:.1} \
                     MB so far",
                    r.epoch,
                    r.swarm_samples,
                    r.samples,
                    r.group,
                    r.alone_because
                        .as_ref()
                        .map_or(String::new(), |w| format!(" ({w})")),
                    r.loss.total,
                    r.lr,
                    r.averaging.as_secs_f64(),
                    peer.traffic().sent as f64 / 1e6
                );
            }
            Tick::Synced(report, epoch) => println!("{}", downloaded(epoch, &report)),
            Tick::Waited => {}
        }
        stall.at(peer.epoch(), Instant::now());
        if let Some(ran) = stall.check(Instant::now()) {
            if stall.first_word() {
                let (samples, others) = peer
                    .swarm()
                    .map_or((0, 0), |(state, others)| (state.samples, others));
                tracing::warn!(
                    "epoch {} has run for {:.0} s, epochs here usually take {:.0} s: stalled \
                     ({samples} of its {} samples reported, {others} other peers live{}); see \
                     the other peers' logs and the dashboard",
                    peer.epoch(),
                    ran.as_secs_f64(),
                    stall.usual().unwrap_or_default().as_secs_f64(),
                    peer.target(),
                    peer.inner_steps()
                        .map_or(String::new(), |(n, _)| format!(", {n} inner steps here"))
                );
            }
            // Said on the dashboard too: a stalled peer publishes no epoch's metrics.
            if last_stall_word.is_none_or(|t: Instant| t.elapsed() >= STALL_WORD_EVERY) {
                last_stall_word = Some(Instant::now());
                let m = stats.metrics(&peer, &dht, &args.device, Some(ran));
                publish_metrics(&dht, &keypair, &run_id, m);
            }
        }
        view.show(&peer, started, stats.computed, last_loss);
        if last_checkpoint.elapsed().as_secs_f64() >= args.checkpoint_minutes * 60.0 {
            save(&args, &peer, &run_id, started, last_loss)?;
            last_checkpoint = Instant::now();
        }
    }
    view.finish();
    // With delayed updates the last step may still be running.
    if let Some(r) = peer.settle().await?
        && r.loss.samples > 0
    {
        last_loss = Some(r.loss.total);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let Stats {
        computed,
        compute_time,
        ..
    } = stats;
    let eval = fixed_loss(&data, peer.model_mut(), micro.min(64))?;
    println!(
        "loss on {} fixed samples: {:.4} (text {:.4}, image {:.4})",
        eval.samples, eval.total, eval.parts[0], eval.parts[1]
    );
    save(&args, &peer, &run_id, started, last_loss)?;
    println!(
        "trained to epoch {} ({} swarm samples; {computed} here, {:.1} samples/s computing, \
         {:.0}% of the time) in {:.1} min",
        peer.epoch(),
        peer.swarm_samples(),
        computed as f64 / compute_time.as_secs_f64().max(1e-9),
        100.0 * compute_time.as_secs_f64() / elapsed.max(1e-9),
        elapsed / 60.0,
    );
    if let (Some(first), Some(last)) = (first_loss, last_loss) {
        println!("training loss {first:.4} in its first epoch here, {last:.4} in its last");
    }
    match peer.link() {
        Some(rate) => println!("link: {:.1} MB/s up, measured", rate / 1e6),
        None => println!("link: not measured (offered 100 MB/s to the others)"),
    }
    println!(
        "{}",
        traffic_line(
            peer.traffic(),
            computed,
            compute_time.as_secs_f64() / elapsed.max(1e-9)
        )
    );
    for line in tally.lines() {
        println!("{line}");
    }
    println!("checkpoint: {}", args.out.display());
    Ok(())
}

/// How often a stalled peer publishes its metrics (live on the dashboard, stalled).
const STALL_WORD_EVERY: Duration = Duration::from_secs(30);

/// This peer's work so far, as its metrics record says it.
struct Stats {
    /// Samples it computed, and the time it spent computing them.
    computed: u64,
    compute_time: Duration,
    started: Instant,
    /// Its mean loss in its last epoch.
    loss: Option<f64>,
    alone_epochs: u64,
}

impl Stats {
    /// Its metrics record now; `stalled`: how long its epoch has run, if stalled.
    fn metrics(
        &self,
        peer: &Collab<Dalle>,
        dht: &potluck_net::dht::Dht,
        device: &str,
        stalled: Option<Duration>,
    ) -> metrics::Metrics {
        let traffic = peer.traffic();
        metrics::Metrics {
            epoch: peer.epoch(),
            loss: self.loss,
            samples: self.computed,
            samples_per_second: self.computed as f64 / self.compute_time.as_secs_f64().max(1e-9),
            device: device.to_owned(),
            role: "trainer".into(),
            uptime_s: self.started.elapsed().as_secs(),
            version: env!("CARGO_PKG_VERSION").into(),
            client: !dht.host().reachability().serving,
            alone_epochs: self.alone_epochs,
            stalled_s: stalled.map_or(0, |d| d.as_secs().max(1)),
            strangers: (peer.strangers().len() + peer.misfits().len()) as u64,
            recipe: peer.recipe(),
            sent: traffic.sent,
            received: traffic.received,
            computing: self.compute_time.as_secs_f64()
                / self.started.elapsed().as_secs_f64().max(1e-9),
            time: clock::now(),
        }
    }
}

/// What a peer moved over the network for its work: `traffic: sent S MB, received R MB, B bytes
/// sent per sample; computing P% of the time` (per sample this peer computed; `computing` the
/// share of its time).
fn traffic_line(traffic: collab::Traffic, computed: u64, computing: f64) -> String {
    let per_sample = match computed {
        0 => "no samples computed".to_owned(),
        n => format!(
            "{:.0} bytes sent per sample",
            traffic.sent as f64 / n as f64
        ),
    };
    format!(
        "traffic: sent {:.1} MB, received {:.1} MB, {per_sample}; computing {:.1}% of the time",
        traffic.sent as f64 / 1e6,
        traffic.received as f64 / 1e6,
        100.0 * computing
    )
}

/// The epochs that did not end in a step on the swarm's averaged gradient, by why: said once
/// the run is over.
#[derive(Debug, Default)]
struct Tally {
    non_finite: u64,
    rolled_back: u64,
    held_back: u64,
    /// Epochs this peer ended, those it averaged with at least one other peer, and the first
    /// of those.
    epochs: u64,
    together: u64,
    first_together: Option<u64>,
    /// The epochs it ended alone (a group of itself), and those whose group formed without
    /// it (too late: it took the others' state instead of stepping).
    alone: Apart,
    missed: Apart,
}

/// Epochs a peer ended without averaging: how many, and the first few.
#[derive(Debug, Default)]
struct Apart {
    count: u64,
    first: Vec<u64>,
}

impl Apart {
    /// How many epochs of each kind a peer's closing line names.
    const NAMED: usize = 8;

    fn add(&mut self, epoch: u64) {
        self.count += 1;
        if self.first.len() < Apart::NAMED {
            self.first.push(epoch);
        }
    }

    /// `word: epoch 3, 4, …`, or nothing.
    fn note(&self, word: &str) -> Option<String> {
        let named: Vec<String> = self.first.iter().map(u64::to_string).collect();
        let more = if self.count > named.len() as u64 {
            ", …"
        } else {
            ""
        };
        (self.count > 0).then(|| format!("{word}: epoch {}{more}", named.join(", ")))
    }
}

impl Tally {
    fn count(&mut self, r: &collab::EpochReport) {
        self.non_finite += u64::from(r.non_finite);
        self.rolled_back += u64::from(r.rolled_back.is_some());
        self.held_back += u64::from(r.held_back);
        self.epochs += 1;
        match r.group {
            0 => self.missed.add(r.epoch),
            1 => self.alone.add(r.epoch),
            _ => {
                self.together += 1;
                self.first_together.get_or_insert(r.epoch);
            }
        }
    }

    fn lines(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(e) = self.first_together {
            notes.push(format!("the first: epoch {e}"));
        }
        notes.extend(self.alone.note("alone"));
        notes.extend(self.missed.note("missed"));
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", notes.join("; "))
        };
        let mut lines = vec![format!(
            "averaged with other peers in {} of the {} epochs it ended here{notes}",
            self.together, self.epochs,
        )];
        if self.non_finite > 0 {
            lines.push(format!(
                "{} steps skipped: the averaged gradient was not finite",
                self.non_finite
            ));
        }
        if self.rolled_back > 0 {
            lines.push(format!(
                "{} rollbacks: the averaged gradient spiked",
                self.rolled_back
            ));
        }
        if self.held_back > 0 {
            lines.push(format!(
                "{} epochs held back: no other peer averaged with this one, so it did not step \
                 on its own gradient and took the swarm's state instead",
                self.held_back
            ));
        }
        lines
    }
}

fn save(
    args: &Args,
    peer: &Collab<Dalle>,
    run_id: &str,
    started: Instant,
    loss: Option<f64>,
) -> Result<()> {
    save_state(
        &args.out,
        peer.model(),
        peer.params(),
        peer.optimizer(),
        peer.swarm_samples(),
        json!({
            "run_id": run_id,
            "epoch": peer.epoch(),
            "data": args.data,
            "loss": loss,
            "seconds": started.elapsed().as_secs_f64(),
        }),
    )
}

/// The progress view of one peer: epoch, local samples, the swarm toward its target, loss,
/// peers online.
struct View {
    bar: crate::progress::Progress,
    epochs: Option<u64>,
    limit: Option<Duration>,
}

impl View {
    fn new(epochs: Option<u64>, limit: Option<Duration>) -> View {
        let len = match (limit, epochs) {
            (Some(l), _) => l.as_secs(),
            (None, Some(n)) => n,
            (None, None) => u64::MAX,
        };
        View {
            bar: crate::progress::Progress::new(len, "training"),
            epochs,
            limit,
        }
    }

    fn show(&mut self, peer: &Collab<Dalle>, started: Instant, computed: u64, loss: Option<f64>) {
        let pos = if self.limit.is_some() || self.epochs.is_none() {
            started.elapsed().as_secs()
        } else {
            peer.epoch()
        };
        self.bar.update(pos, || {
            let (swarm, peers) = match peer.swarm() {
                Some((s, others)) => (
                    format!("{}/{} samples", s.samples, peer.target()),
                    others + 1,
                ),
                None => ("?".into(), 1),
            };
            let loss = loss.map_or("-".into(), |l| format!("{l:.3}"));
            format!(
                "epoch {} | swarm {swarm} | {peers} peers | here {computed} samples | loss {loss}",
                peer.epoch()
            )
        });
    }

    fn finish(self) {
        self.bar.finish();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use potluck_core::Loss;
    use potluck_train::collab::{Alone, EpochReport};

    use super::Tally;

    fn report(skipped: bool, non_finite: bool, held_back: bool) -> EpochReport {
        EpochReport {
            epoch: 1,
            samples: 16,
            swarm_samples: 16.0,
            group: 1,
            alone_because: held_back.then_some(Alone::Unheard),
            alone_epochs: 0,
            held_back,
            loss: Loss::default(),
            lr: 0.0,
            grad_norm: 1.0,
            skipped,
            non_finite,
            rolled_back: None,
            state_averaged: false,
            averaging: Duration::ZERO,
            traffic: Default::default(),
        }
    }

    /// A peer held back (no step of its own) did not see a gradient that was not finite: the
    /// closing lines say which happened.
    #[test]
    fn a_held_back_epoch_is_not_told_as_a_gradient_that_was_not_finite() {
        let mut tally = Tally::default();
        tally.count(&report(true, false, true));
        tally.count(&report(false, false, false));
        let lines = tally.lines();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(
            lines[0],
            "averaged with other peers in 0 of the 2 epochs it ended here (alone: epoch 1, 1)"
        );
        let mut late = report(true, false, false);
        late.group = 0;
        assert!(lines[1].starts_with("1 epochs held back"), "{lines:?}");
        let mut together = report(false, false, false);
        together.group = 3;
        together.epoch = 7;
        tally.count(&together);
        tally.count(&report(true, true, false));
        let lines = tally.lines();
        assert_eq!(
            lines[0],
            "averaged with other peers in 1 of the 4 epochs it ended here (the first: epoch 7; \
             alone: epoch 1, 1, 1)"
        );
        tally.count(&late);
        assert!(
            tally.lines()[0]
                .ends_with("(the first: epoch 7; alone: epoch 1, 1, 1; missed: epoch 1)"),
            "{:?}",
            tally.lines()
        );
        for _ in 0..super::Apart::NAMED {
            tally.count(&report(false, false, false));
        }
        assert!(
            tally.lines()[0].contains("alone: epoch 1, 1, 1, 1, 1, 1, 1, 1, …;"),
            "{:?}",
            tally.lines()
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("1 steps skipped: the averaged gradient was not finite")),
            "{lines:?}"
        );
    }
}
