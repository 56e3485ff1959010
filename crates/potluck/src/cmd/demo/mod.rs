//! `potluck demo`: the first command a newcomer runs. On the embedded `shapes` data set it
//! prepares the tokenizers and token shards, then runs a whole swarm on this machine's loopback:
//! a bootstrap node, three training peers, an aux peer keeping checkpoints and the monitor with
//! its dashboard, each its own process of this binary (as on separate machines) with its output
//! in `DIR/logs`. It shows one combined progress view (read from the monitor's API, like any
//! client of it), and at the end draws a captioned sample grid and scores the model with the
//! detector. Ctrl-C stops every process cleanly, each writing its final checkpoint.

mod proc;
mod swarm;
mod view;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use potluck_data::Order;
use potluck_data::tokens::{Row, TokenSet};
use potluck_model::dalle::{Dalle, Sampling, TokenBatch};

use crate::cmd::{eval, prepare, run};
use swarm::{Outcome, Swarm};

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Example: potluck demo --minutes 10
Then open the dashboard it prints (http://127.0.0.1:8080 unless that port is taken).
Everything lands in --dir: the prepared data (kept and reused by the next demo), each peer's
checkpoint, the aux peer's checkpoints, the monitor's history, every process's log, the sample
grid.")]
pub(crate) struct Args {
    /// Where the demo writes everything it makes (all but the prepared data made afresh).
    #[arg(long, default_value = "runs/demo")]
    pub(super) dir: PathBuf,
    /// Minutes of training (the swarm's epochs are sized to fit them on this machine).
    #[arg(long, default_value_t = 11.0)]
    pub(super) minutes: f64,
    /// Training peers.
    #[arg(long, default_value_t = 3)]
    pub(super) trainers: usize,
    /// Model preset.
    #[arg(long, default_value = "small")]
    pub(super) config: String,
    /// Samples the swarm gathers per epoch.
    #[arg(long, default_value_t = 64)]
    pub(super) target_batch_size: u64,
    /// Where the monitor serves the dashboard (a free port is taken if this one is busy).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(super) http: SocketAddr,
    /// Images encoded into token shards.
    #[arg(long, default_value_t = 20_000)]
    pub(super) images: usize,
    /// VQ-VAE training steps.
    #[arg(long, default_value_t = 1500)]
    pub(super) vq_steps: usize,
    /// Sampling temperature of the demo's drawings (the monitor's, the grid, the evaluation);
    /// the evaluation is also given at 1.
    #[arg(long, default_value_t = 0.5)]
    pub(super) temperature: f64,
    /// Prompts the final evaluation draws.
    #[arg(long, default_value_t = 100)]
    pub(super) eval_prompts: usize,
    /// Data and model seed.
    #[arg(long, default_value_t = 0)]
    pub(super) seed: u64,
}

/// Samples per forward/backward pass of each trainer.
pub(super) const MICRO_BATCH: usize = 16;
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
pub(super) const RUN: &str = "demo";
/// A process asked to stop gets this long before it is killed.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(60);
/// A process that started must say where it is within this long.
pub(super) const START_WAIT: Duration = Duration::from_secs(120);

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
        vqvae: None,
        from_run: None,
        net: crate::cmd::joining::NetArgs::default(),
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
    for (what, path) in [
        ("data and tokenizers:  ", args.dir.join("data")),
        ("trainers' checkpoints:", args.dir.join("peer-N")),
        ("aux checkpoints:      ", args.dir.join("aux")),
        (
            "monitor history:      ",
            args.dir.join("monitor/history.sqlite"),
        ),
        ("logs:                 ", args.dir.join("logs")),
    ] {
        println!("  {what} {}", path.display());
    }
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
