//! `potluck train --solo`: train the transformer on one machine from prepared token shards,
//! with a progress bar and periodic checkpoints.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use potluck_data::Order;
use potluck_data::tokens::{Row, TokenSet};
use potluck_model::Device;
use potluck_model::dalle::{Config, Dalle, PRESETS, TokenBatch, Tokens};
use potluck_train::checkpoint::{self, Save};
use potluck_train::optim::{self, Optimizer, Precision, Rule, Schedule};
use potluck_train::solo::Solo;
use serde::{Deserialize, Serialize};

use crate::cmd::run;
use crate::progress::Progress;

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck train --run-id shapes1 --data data/shapes \
                        --out runs/peer1 --epochs 200
Others join it: potluck train --run-id shapes1 --data data/shapes --out runs/peer2 \
                        --initial-peers /ip4/1.2.3.4/tcp/31337/p2p/12D3KooW… --epochs 200
Alone: potluck train --solo --data data/shapes --config small --out runs/small --minutes 20
From a file: potluck train --config-file peer1.toml --epochs 300   (the command line wins)",
    args_override_self = true
)]
pub(crate) struct Args {
    /// A TOML file holding any of these flags (`run-id = "shapes1"`, `delayed-updates = true`,
    /// `initial-peers = ["…"]`); flags on the command line win over the file's (repeated
    /// ones add to them).
    #[arg(long)]
    pub(crate) config_file: Option<PathBuf>,
    /// Train on this machine alone.
    #[arg(long, conflicts_with = "run_id")]
    pub(crate) solo: bool,
    #[command(flatten)]
    pub(crate) swarm: crate::cmd::together::SwarmArgs,
    /// A directory written by `potluck prepare`.
    #[arg(long)]
    pub(crate) data: PathBuf,
    /// Model preset (tiny, small, gpt, dalle-1.1b).
    #[arg(long, default_value = "small")]
    pub(crate) config: String,
    /// Checkpoint directory to write (and to resume from with --resume).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Stop after this many minutes.
    #[arg(long, conflicts_with = "steps")]
    pub(crate) minutes: Option<f64>,
    /// Stop after this many optimizer steps (in all, counting resumed ones); with --run-id,
    /// after this global epoch.
    #[arg(long, visible_alias = "epochs")]
    pub(crate) steps: Option<u64>,
    /// Continue from the checkpoint in --out.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Samples per optimizer step (alone; a run's is --target-batch-size).
    #[arg(long, default_value_t = 64)]
    pub(crate) batch_size: usize,
    /// Samples per forward/backward pass (gradients accumulate up to --batch-size).
    #[arg(long)]
    pub(crate) micro_batch: Option<usize>,
    #[command(flatten)]
    pub(crate) optim: OptimArgs,
    /// Recompute activations in the backward pass (less memory, ~1/3 more compute).
    #[arg(long)]
    pub(crate) checkpointing: bool,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// CPU threads for the model's kernels [default: every core]. Give each of several peers
    /// on one machine its share: oversubscribed kernel threads spin and run ~20× slower.
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Seed of the initial weights and the data order.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Minutes between checkpoints.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) checkpoint_minutes: f64,
}

/// The optimizer of a run: every peer of a run gives the same (aux peers too: a swarm an aux
/// peer starts takes its settings), and one that joins a swarm takes the swarm's.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct OptimArgs {
    /// Inner optimizer: lamb or adamw.
    #[arg(long, default_value = "lamb")]
    pub(crate) optimizer: String,
    /// Peak learning rate [default: 0.01 for LAMB, 0.001 for AdamW].
    #[arg(long)]
    pub(crate) lr: Option<f64>,
    /// Optimizer state precision: 8bit or f32.
    #[arg(long, default_value = "8bit")]
    pub(crate) state: String,
    /// Warm-up steps of the learning rate.
    #[arg(long, default_value_t = 100)]
    pub(crate) warmup: u64,
    /// Step at which the learning rate has decayed to zero [default: the run's length, from
    /// --steps or estimated from --minutes].
    #[arg(long)]
    pub(crate) decay_steps: Option<u64>,
    /// Weight decay (not on norms and biases).
    #[arg(long, default_value_t = 0.01)]
    pub(crate) weight_decay: f64,
}

/// Batches of the fixed evaluation at the end of a run.
pub(crate) const EVAL_BATCHES: usize = 8;

/// What a checkpoint keeps about the run, to resume it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RunInfo {
    pub(crate) data: PathBuf,
    pub(crate) seed: u64,
    pub(crate) batch_size: usize,
    pub(crate) loss: f64,
    pub(crate) text_loss: f64,
    pub(crate) image_loss: f64,
    pub(crate) seconds: f64,
}

/// The optimizer's settings; `steps` (the run's length) is where the learning rate has decayed
/// to zero unless `--decay-steps` says otherwise.
pub(crate) fn optimizer_config(args: &OptimArgs, steps: Option<u64>) -> Result<optim::Config> {
    let rule = match args.optimizer.as_str() {
        "lamb" => Rule::Lamb,
        "adamw" => Rule::AdamW,
        other => bail!("unknown optimizer {other:?}: use lamb or adamw"),
    };
    let precision = match args.state.as_str() {
        "8bit" => Precision::Blockwise8,
        "f32" => Precision::F32,
        other => bail!("unknown optimizer state {other:?}: use 8bit or f32"),
    };
    let peak = args
        .lr
        .unwrap_or(if rule == Rule::Lamb { 0.01 } else { 1e-3 });
    Ok(optim::Config {
        rule,
        precision,
        schedule: Schedule {
            peak,
            warmup: args.warmup,
            total: args.decay_steps.or(steps).unwrap_or(u64::MAX),
        },
        beta1: 0.9,
        beta2: 0.96,
        eps: 1e-6,
        weight_decay: args.weight_decay,
        bias_correction: true,
        clamp: 10.0,
        max_grad_norm: 4.0,
    })
}

/// The model configuration for a preset and the prepared data.
pub(crate) fn model_config(name: &str, data: &TokenSet, checkpointing: bool) -> Result<Config> {
    let m = &data.manifest;
    if m.image_grid[0] != m.image_grid[1] {
        bail!(
            "only square image grids are supported, the data has {:?}",
            m.image_grid
        );
    }
    let tokens = Tokens {
        text_len: m.text_len,
        text_vocab: m.vocab_size,
        image_grid: m.image_grid[0],
        image_vocab: m.codebook_size,
    };
    let mut config = Config::preset(name, Some(tokens))
        .with_context(|| format!("presets: {}", PRESETS.join(", ")))?;
    config.checkpointing |= checkpointing;
    // Fixed-shape presets keep their own sizes; the data's ids fit inside them.
    Ok(config)
}

/// Sets the model's CPU threads, if asked.
pub(crate) fn set_threads(threads: Option<usize>) {
    if let Some(n) = threads {
        potluck_model::tch::set_num_threads(n.max(1) as i32);
    }
}

pub(crate) fn run(args: Args) -> Result<()> {
    if args.swarm.run_id.is_some() {
        set_threads(args.threads);
        return crate::cmd::together::run(args);
    }
    set_threads(args.threads);
    if !args.solo {
        bail!(
            "say --run-id ID to train with others (add --initial-peers to join them), or --solo to train on this machine alone"
        );
    }
    let device = args.device.parse::<Device>()?.tch()?;
    let data = TokenSet::open(&args.data)
        .with_context(|| format!("opening prepared data {}", args.data.display()))?;
    let micro = args
        .micro_batch
        .unwrap_or(args.batch_size)
        .clamp(1, args.batch_size.max(1));
    let config = model_config(&args.config, &data, args.checkpointing)?;
    potluck_model::tch::manual_seed(args.seed as i64);
    let model = Dalle::new(config.clone(), device)?;
    let mut opt_cfg = optimizer_config(&args.optim, args.steps)?;
    let (mut solo, info) = if args.resume {
        let (manifest, params) = checkpoint::load_params(&args.out, model.layout())
            .with_context(|| format!("resuming from {}", args.out.display()))?;
        let saved_cfg: Option<optim::Config> = manifest
            .extra
            .get("optimizer")
            .and_then(|v| serde_json::from_value(v.clone()).ok());
        if let Some(saved) = saved_cfg {
            opt_cfg = saved;
        }
        let mut opt = Optimizer::new(opt_cfg, model.layout());
        checkpoint::load_optimizer(&args.out, &manifest, &mut opt)?;
        let info: Option<RunInfo> = manifest
            .extra
            .get("run")
            .and_then(|v| serde_json::from_value(v.clone()).ok());
        tracing::info!(
            "resuming at step {} ({} samples)",
            manifest.step,
            manifest.samples
        );
        (Solo::resume(model, opt, params, manifest.samples)?, info)
    } else {
        let opt = Optimizer::new(opt_cfg, model.layout());
        (Solo::new(model, opt)?, None)
    };
    run::copy_tokenizers(&args.data, &args.out)?;
    let prior_seconds = info.as_ref().map_or(0.0, |i| i.seconds);

    let unique = config.unique_params();
    println!(
        "training {} ({} unique / {} effective parameters) on {} samples of {}, batch {} in \
         micro-batches of {micro}, {:?} {:?} state, on {}",
        config.name,
        unique,
        config.effective_params(),
        data.manifest.samples,
        data.manifest.dataset,
        args.batch_size,
        opt_cfg.rule,
        opt_cfg.precision,
        args.device
    );

    // Each resumed run reads the data in a fresh order (the seed moves with the step).
    let order = Order::new(args.seed, solo.optimizer().steps());
    let mut rows = data.rows(order);
    let mut next_rows = |n: usize| -> Result<Vec<Row>> {
        (0..n)
            .map(|_| rows.next().context("the data ran out")?.map_err(Into::into))
            .collect()
    };

    let started = Instant::now();
    let limit = args.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
    let total_steps = args.steps;
    let first_step = solo.optimizer().steps();
    let mut progress = match (limit, total_steps) {
        (Some(limit), _) => Progress::new(limit.as_secs(), "training"),
        (None, Some(n)) => Progress::new(n.saturating_sub(first_step), "training"),
        (None, None) => Progress::new(u64::MAX, "training"),
    };
    let mut last_checkpoint = Instant::now();
    let mut smoothed: Option<(f64, f64, f64)> = None;
    let mut step_samples = 0u64;
    let mut skipped = 0u64;
    let mut timing_from: Option<Instant> = None;
    loop {
        let done_steps = solo.optimizer().steps();
        if total_steps.is_some_and(|n| done_steps >= n)
            || limit.is_some_and(|l| started.elapsed() >= l)
        {
            break;
        }
        let mut batches = Vec::new();
        let mut left = args.batch_size;
        while left > 0 {
            let n = left.min(micro);
            batches.push(TokenBatch::from_rows(&next_rows(n)?));
            left -= n;
        }
        let report = solo.step(&batches)?;
        skipped += u64::from(report.skipped);
        step_samples += report.loss.samples as u64;
        let l = report.loss;
        let s = match smoothed {
            None => (l.total, l.parts[0], l.parts[1]),
            Some((a, b, c)) => (
                0.9 * a + 0.1 * l.total,
                0.9 * b + 0.1 * l.parts[0],
                0.9 * c + 0.1 * l.parts[1],
            ),
        };
        smoothed = Some(s);
        // With only a time limit, the decay ends when time does: estimate the run's steps from
        // the measured step time (from step 5 on, past start-up), refined a few times early.
        if report.step == first_step + 5 {
            timing_from = Some(Instant::now());
        }
        if args.optim.decay_steps.is_none()
            && total_steps.is_none()
            && let (Some(limit), Some(from)) = (limit, timing_from)
            && [20, 100, 300].contains(&(report.step - first_step))
        {
            let per_step = from.elapsed().as_secs_f64() / (report.step - first_step - 5) as f64;
            let left = limit.saturating_sub(started.elapsed()).as_secs_f64();
            let total = report.step + (left / per_step) as u64;
            let mut sched = solo.optimizer().config().schedule;
            sched.total = total.max(sched.warmup + 1);
            solo.optimizer_mut().set_schedule(sched);
            tracing::debug!(
                "{per_step:.2} s per step: the learning rate decays to 0 at step {total}"
            );
        }
        let elapsed = started.elapsed().as_secs_f64();
        let rate = step_samples as f64 / elapsed.max(1e-9);
        let pos = if limit.is_some() {
            elapsed as u64
        } else {
            report.step - first_step
        };
        progress.update(pos, || {
            format!(
                "step {} loss {:.3} (text {:.3}, image {:.3}) {:.1} samples/s lr {:.2e}",
                report.step, s.0, s.1, s.2, rate, report.lr
            )
        });
        if last_checkpoint.elapsed().as_secs_f64() >= args.checkpoint_minutes * 60.0 {
            save(&args, &solo, s, prior_seconds + elapsed)?;
            last_checkpoint = Instant::now();
        }
    }
    progress.finish();
    let elapsed = started.elapsed().as_secs_f64();
    let s = smoothed.unwrap_or_default();
    let eval = fixed_loss(&data, solo.model_mut(), args.batch_size.min(micro))?;
    println!(
        "loss on {} fixed samples: {:.4} (text {:.4}, image {:.4})",
        eval.samples, eval.total, eval.parts[0], eval.parts[1]
    );
    save(&args, &solo, s, prior_seconds + elapsed)?;
    println!(
        "trained to step {} ({} samples) in {:.1} min, {:.1} samples/s; loss {:.3} (text {:.3}, \
         image {:.3}){}",
        solo.optimizer().steps(),
        solo.samples(),
        elapsed / 60.0,
        step_samples as f64 / elapsed.max(1e-9),
        s.0,
        s.1,
        s.2,
        if skipped > 0 {
            format!(", {skipped} steps skipped (non-finite gradients)")
        } else {
            String::new()
        }
    );
    println!("checkpoint: {}", args.out.display());
    Ok(())
}

fn save(args: &Args, solo: &Solo<Dalle>, loss: (f64, f64, f64), seconds: f64) -> Result<()> {
    let info = RunInfo {
        data: args.data.clone(),
        seed: args.seed,
        batch_size: args.batch_size,
        loss: loss.0,
        text_loss: loss.1,
        image_loss: loss.2,
        seconds,
    };
    save_state(
        &args.out,
        solo.model(),
        solo.params(),
        solo.optimizer(),
        solo.samples(),
        serde_json::json!({ "run": info }),
    )
}

/// Writes a checkpoint of `model` with `params` and `optimizer`'s state into `dir`; `extra`
/// (an object) is kept in its manifest beside the optimizer and model configurations.
pub(crate) fn save_state(
    dir: &std::path::Path,
    model: &Dalle,
    params: &[f32],
    optimizer: &Optimizer,
    samples: u64,
    mut extra: serde_json::Value,
) -> Result<()> {
    extra["optimizer"] = serde_json::to_value(optimizer.config())?;
    extra["model"] = serde_json::to_value(model.config())?;
    checkpoint::save(
        dir,
        Save {
            layout: model.layout(),
            params,
            optimizer: Some(optimizer),
            samples,
            model_meta: run::model_meta(model.config())?,
            extra,
        },
    )
    .with_context(|| format!("writing checkpoint {}", dir.display()))?;
    Ok(())
}

/// The loss on a fixed set of samples (the same for every run on this data), so runs can be
/// compared without the noise of the training batches.
pub(crate) fn fixed_loss(
    data: &TokenSet,
    model: &mut Dalle,
    batch: usize,
) -> Result<potluck_core::Loss> {
    let mut fixed = data.rows(Order::new(u64::MAX, u64::MAX));
    let mut eval = potluck_core::Loss::default();
    for _ in 0..EVAL_BATCHES {
        let rows = (0..batch)
            .map(|_| {
                fixed
                    .next()
                    .context("the data ran out")?
                    .map_err(anyhow::Error::from)
            })
            .collect::<Result<Vec<Row>>>()?;
        let l = potluck_core::Trainable::evaluate(model, &TokenBatch::from_rows(&rows))?;
        eval.total += l.total / EVAL_BATCHES as f64;
        eval.parts[0] += l.parts[0] / EVAL_BATCHES as f64;
        eval.parts[1] += l.parts[1] / EVAL_BATCHES as f64;
        eval.samples += l.samples;
    }
    Ok(eval)
}
