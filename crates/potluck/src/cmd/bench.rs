//! `potluck bench train`: how fast a full training step runs (forward, backward, the flat-buffer
//! copies and the optimizer), next to the sgemm rate of the same machine measured in the same
//! run, with f32 or 8-bit optimizer state and with or without activation checkpointing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use potluck_data::tokens::TokenSet;
use potluck_model::Device;
use potluck_model::dalle::{Config, Dalle, TokenBatch, Tokens};
use potluck_model::tch::{self, Kind, Tensor};
use potluck_train::optim::{self, Optimizer, Precision, Rule, Schedule};
use potluck_train::solo::Solo;
use serde::Serialize;

use crate::cmd::train::model_config;

#[derive(Debug, Clone, clap::Subcommand)]
pub(crate) enum Bench {
    /// Samples/s and GFLOP/s of a training step next to sgemm, per optimizer state and
    /// checkpointing.
    Train(TrainArgs),
    /// Time of one inner-optimizer step per parameter: AdamW and LAMB, f32 and 8-bit state.
    Optimizer(OptimizerArgs),
    /// DHT store and get latency and success across many nodes in one process.
    Dht(DhtArgs),
    /// Drawing images: generation with the key/value cache next to recomputing the prefix.
    Generate(GenerateArgs),
    /// All-reduce of a buffer among peer processes on loopback, next to plain copies.
    Allreduce(crate::cmd::bench_allreduce::Args),
    /// One peer of `bench allreduce` (started by it).
    #[command(hide = true)]
    AllreducePeer(crate::cmd::bench_allreduce::PeerArgs),
}

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Example: potluck bench dht --nodes 1024 --json")]
pub(crate) struct DhtArgs {
    /// Nodes in the DHT.
    #[arg(long, default_value_t = 256)]
    pub(crate) nodes: usize,
    /// Keys stored, then read back (one operation at a time, each from a random node).
    #[arg(long, default_value_t = 100)]
    pub(crate) keys: usize,
    /// Transport between the nodes: memory (in-process) or tcp (loopback).
    #[arg(long, default_value = "memory")]
    pub(crate) transport: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Example: potluck bench optimizer --params 42000000")]
pub(crate) struct OptimizerArgs {
    /// Parameters (one tensor per 4 M, like a model's large matrices).
    #[arg(long, default_value_t = 16 << 20)]
    pub(crate) params: usize,
    /// Timed steps per variant.
    #[arg(long, default_value_t = 5)]
    pub(crate) steps: usize,
}

fn bench_optimizer(args: &OptimizerArgs) -> Result<()> {
    use potluck_core::{Layout, Role};
    let chunk = 4 << 20;
    let sizes: Vec<usize> = (0..args.params.div_ceil(chunk))
        .map(|i| chunk.min(args.params - i * chunk))
        .collect();
    let layout = Layout::new(
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (format!("t{i}"), vec![n], Role::Weight)),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let n = layout.numel();
    let grad: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.013).sin() * 1e-3).collect();
    println!(
        "inner optimizer on {n} parameters, {} threads",
        std::thread::available_parallelism().map_or(1, |t| t.get())
    );
    println!(
        "{:<8} {:<6} {:>10} {:>12} {:>12}",
        "rule", "state", "ms/step", "ns/param", "state bytes/param"
    );
    for precision in [Precision::F32, Precision::Blockwise8] {
        for rule in [Rule::AdamW, Rule::Lamb] {
            let cfg = optim::Config {
                rule,
                precision,
                ..optim::Config::reference_lamb()
            };
            let mut opt = Optimizer::new(cfg, &layout);
            let mut p: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.007).cos()).collect();
            let mut g = grad.clone();
            opt.step(&mut p, &mut g)?;
            let mut times = Vec::new();
            for _ in 0..args.steps.max(1) {
                g.copy_from_slice(&grad);
                let t = Instant::now();
                opt.step(&mut p, &mut g)?;
                times.push(t.elapsed().as_secs_f64());
            }
            let per = median(times);
            println!(
                "{:<8} {:<6} {:>10.1} {:>12.2} {:>12.2}",
                format!("{rule:?}"),
                if precision == Precision::F32 {
                    "f32"
                } else {
                    "8bit"
                },
                per * 1e3,
                per * 1e9 / n as f64,
                opt.moments().bytes() as f64 / n as f64
            );
        }
    }
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Example: potluck bench train --config small --json")]
pub(crate) struct TrainArgs {
    /// Model preset (tiny, small, gpt, dalle-1.1b).
    #[arg(long, default_value = "small")]
    pub(crate) config: String,
    /// Prepared data whose token shapes `tiny` and `small` take [default: the shapes defaults].
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Samples per step.
    #[arg(long, default_value_t = 32)]
    pub(crate) batch: usize,
    /// Timed steps per variant (after the warm-up steps).
    #[arg(long, default_value_t = 10)]
    pub(crate) steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub(crate) warmup: usize,
    /// Only these variants (comma-separated of f32, 8bit, f32+ckpt, 8bit+ckpt) [default: all].
    #[arg(long)]
    pub(crate) variants: Option<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Inner optimizer: lamb or adamw.
    #[arg(long, default_value = "lamb")]
    pub(crate) optimizer: String,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
}

#[derive(Debug, Clone, Serialize)]
struct Variant {
    name: String,
    samples_per_s: f64,
    step_s: f64,
    gflops: f64,
    sgemm_fraction: f64,
    compute_s: f64,
    optimizer_s: f64,
    copy_s: f64,
    optimizer_share: f64,
    peak_rss_mib: f64,
    rss_growth_mib: f64,
    optimizer_state_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Report {
    config: String,
    device: String,
    threads: i32,
    batch: usize,
    unique_params: usize,
    train_gflop_per_sample: f64,
    sgemm_gflops: f64,
    variants: Vec<Variant>,
}

/// Resident-set figures of this process from /proc (MiB); the peak is reset by
/// [`reset_peak_rss`].
pub(crate) fn rss() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn reset_peak_rss() {
    // Writing 5 to clear_refs resets the peak resident set size (Linux ≥ 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// sgemm rate of libtorch on this device, 1024³, all threads: the best of several runs.
fn sgemm_gflops(device: tch::Device) -> f64 {
    let n = 1024;
    let a = Tensor::randn([n, n], (Kind::Float, device));
    let b = Tensor::randn([n, n], (Kind::Float, device));
    let mut best = Duration::MAX;
    for _ in 0..12 {
        let t = Instant::now();
        let c = a.matmul(&b);
        let _ = c.double_value(&[0, 0]);
        best = best.min(t.elapsed());
    }
    2.0 * (n as f64).powi(3) / best.as_secs_f64() / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Example: potluck bench generate --config small --images 32 --threads 2")]
pub(crate) struct GenerateArgs {
    /// Model preset (the `shapes` token shapes), randomly initialised.
    #[arg(long, default_value = "small")]
    pub(crate) config: String,
    /// Images drawn at once.
    #[arg(long, default_value_t = 32)]
    pub(crate) images: usize,
    /// Timed rounds of each (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// CPU threads [default: every core].
    #[arg(long)]
    pub(crate) threads: Option<usize>,
}

/// Times cached and uncached generation of the same prompts in one process, alternating.
fn bench_generate(args: &GenerateArgs) -> Result<()> {
    use potluck_model::dalle::Sampling;
    crate::cmd::train::set_threads(args.threads);
    let config = Config::preset(&args.config, Some(shapes_tokens()))?;
    tch::manual_seed(0);
    let model = Dalle::new(config, tch::Device::Cpu)?;
    let t = model.config().tokens;
    let batch = random_batch(&t, args.images.max(1));
    let prompts: Vec<Vec<u16>> = batch.text.chunks(t.text_len).map(<[u16]>::to_vec).collect();
    let sampling = Sampling::default();
    let (mut cached, mut uncached) = (Vec::new(), Vec::new());
    let mut same = true;
    for _ in 0..args.rounds.max(1) {
        let start = Instant::now();
        let a = model.generate(&prompts, &sampling)?;
        cached.push(start.elapsed().as_secs_f64());
        let start = Instant::now();
        let b = model.generate_uncached(&prompts, &sampling)?;
        uncached.push(start.elapsed().as_secs_f64());
        same &= a == b;
    }
    let (c, u) = (median(cached), median(uncached));
    let n = prompts.len() as f64;
    println!(
        "{} images of {} codes with `{}`: cached {:.3} s ({:.1} ms an image), recomputing the \
         prefix {:.3} s ({:.1} ms an image): {:.1}× faster; the same codes: {}",
        prompts.len(),
        t.image_len(),
        args.config,
        c,
        1000.0 * c / n,
        u,
        1000.0 * u / n,
        u / c.max(1e-12),
        if same { "yes" } else { "no" }
    );
    Ok(())
}

pub(crate) fn run(bench: Bench) -> Result<()> {
    let args = match bench {
        Bench::Train(args) => args,
        Bench::Optimizer(args) => return bench_optimizer(&args),
        Bench::Dht(args) => return crate::cmd::bench_dht::run(&args),
        Bench::Generate(args) => return bench_generate(&args),
        Bench::Allreduce(args) => return crate::cmd::bench_allreduce::run(&args),
        Bench::AllreducePeer(args) => return crate::cmd::bench_allreduce::peer(&args),
    };
    let device = args.device.parse::<Device>()?.tch()?;
    let base = match &args.data {
        Some(dir) => model_config(&args.config, &TokenSet::open(dir)?, false)?,
        None => Config::preset(&args.config, Some(shapes_tokens()))
            .or_else(|_| Config::preset(&args.config, None))?,
    };
    let all = ["f32", "8bit", "f32+ckpt", "8bit+ckpt"];
    let wanted: Vec<&str> = match &args.variants {
        Some(list) => list.split(',').map(str::trim).collect(),
        None => all.to_vec(),
    };
    if let Some(bad) = wanted.iter().find(|v| !all.contains(v)) {
        bail!("unknown variant {bad:?}: one of {}", all.join(", "));
    }
    let rule = match args.optimizer.as_str() {
        "lamb" => Rule::Lamb,
        "adamw" => Rule::AdamW,
        other => bail!("unknown optimizer {other:?}: use lamb or adamw"),
    };
    let sgemm = sgemm_gflops(device);
    let gflop_per_sample = 6.0 * base.forward_macs() / 1e9;
    let mut variants = Vec::new();
    for name in wanted {
        let precision = if name.starts_with("8bit") {
            Precision::Blockwise8
        } else {
            Precision::F32
        };
        let config = Config {
            checkpointing: name.ends_with("+ckpt"),
            ..base.clone()
        };
        reset_peak_rss();
        let (rss_before, _) = rss();
        tch::manual_seed(0);
        let model = Dalle::new(config.clone(), device)?;
        let opt = Optimizer::new(
            optim::Config {
                rule,
                precision,
                schedule: Schedule::constant(1e-3),
                beta1: 0.9,
                beta2: 0.96,
                eps: 1e-6,
                weight_decay: 0.01,
                bias_correction: true,
                clamp: 10.0,
                max_grad_norm: 4.0,
            },
            model.layout(),
        );
        let state_mib = opt.moments().bytes() as f64 / (1 << 20) as f64;
        let mut solo = Solo::new(model, opt)?;
        let batch = random_batch(&config.tokens, args.batch);
        for _ in 0..args.warmup {
            solo.step(std::slice::from_ref(&batch))?;
        }
        let (mut total, mut compute, mut optimizer, mut copy) = (vec![], vec![], vec![], vec![]);
        for _ in 0..args.steps.max(1) {
            let t = Instant::now();
            let r = solo.step(std::slice::from_ref(&batch))?;
            total.push(t.elapsed().as_secs_f64());
            compute.push(r.compute.as_secs_f64());
            optimizer.push(r.optimizer.as_secs_f64());
            copy.push(r.copy.as_secs_f64());
        }
        let (_, peak) = rss();
        drop(solo);
        let step = median(total);
        let samples_per_s = args.batch as f64 / step;
        let gflops = samples_per_s * gflop_per_sample;
        let optimizer_s = median(optimizer);
        variants.push(Variant {
            name: name.to_owned(),
            samples_per_s,
            step_s: step,
            gflops,
            sgemm_fraction: gflops / sgemm,
            compute_s: median(compute),
            optimizer_s,
            copy_s: median(copy),
            optimizer_share: optimizer_s / step,
            peak_rss_mib: peak,
            rss_growth_mib: peak - rss_before,
            optimizer_state_mib: state_mib,
        });
    }
    let report = Report {
        config: base.name.clone(),
        device: args.device.clone(),
        threads: tch::get_num_threads(),
        batch: args.batch,
        unique_params: base.unique_params(),
        train_gflop_per_sample: gflop_per_sample,
        sgemm_gflops: sgemm,
        variants,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "bench train: {} ({} unique parameters), batch {}, {} on {} threads; {:.2} GFLOP per \
         sample (forward + backward)",
        report.config,
        report.unique_params,
        report.batch,
        report.device,
        report.threads,
        report.train_gflop_per_sample
    );
    println!(
        "sgemm 1024^3 in the same run: {:.0} GFLOP/s",
        report.sgemm_gflops
    );
    println!(
        "{:<10} {:>10} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10} {:>10}",
        "variant",
        "samples/s",
        "step s",
        "GFLOP/s",
        "of sgemm",
        "optim s",
        "copy s",
        "peak MiB",
        "state MiB"
    );
    for v in &report.variants {
        println!(
            "{:<10} {:>10.2} {:>8.3} {:>8.1} {:>7.0}% {:>9.4} {:>9.4} {:>10.0} {:>10.1}",
            v.name,
            v.samples_per_s,
            v.step_s,
            v.gflops,
            100.0 * v.sgemm_fraction,
            v.optimizer_s,
            v.copy_s,
            v.peak_rss_mib,
            v.optimizer_state_mib
        );
    }
    Ok(())
}

/// A fixed batch of in-range random tokens.
fn random_batch(t: &Tokens, size: usize) -> TokenBatch {
    let mut x = 0x5eed_u64;
    let mut next = |n: usize| {
        x = potluck_data::mix_seed(x, 7);
        (x % n as u64) as u16
    };
    TokenBatch {
        text: (0..size * t.text_len).map(|_| next(t.text_vocab)).collect(),
        image: (0..size * t.image_len())
            .map(|_| next(t.image_vocab))
            .collect(),
        size,
    }
}

/// The token shapes `potluck prepare --dataset shapes` makes with its defaults.
pub(crate) fn shapes_tokens() -> Tokens {
    Tokens {
        text_len: 8,
        text_vocab: 339,
        image_grid: 8,
        image_vocab: 512,
    }
}
