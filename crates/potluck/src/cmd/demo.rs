//! `potluck demo`: the first command a newcomer runs. On the embedded `shapes` data set it
//! prepares the tokenizers and token shards, trains the `small` model on this machine for a few
//! minutes, draws a captioned sample grid and scores the model with the detector. (A later
//! version runs a local swarm.)

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use potluck_model::dalle::Sampling;

use crate::cmd::{eval, prepare, run, train};

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Example: potluck demo --minutes 8")]
pub(crate) struct Args {
    /// Where the demo writes everything it makes.
    #[arg(long, default_value = "runs/demo")]
    dir: PathBuf,
    /// Minutes of training.
    #[arg(long, default_value_t = 8.0)]
    minutes: f64,
    /// Images encoded into token shards.
    #[arg(long, default_value_t = 20_000)]
    images: usize,
    /// VQ-VAE training steps.
    #[arg(long, default_value_t = 1500)]
    vq_steps: usize,
    /// Prompts the final evaluation draws.
    #[arg(long, default_value_t = 100)]
    eval_prompts: usize,
    /// Data and model seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Prompts of the sample grid: one of each colour, with every shape, size and position.
const SAMPLE_PROMPTS: [&str; 8] = [
    "a large red circle in the center",
    "a small green square at the top left",
    "a large blue triangle at the bottom right",
    "a small yellow circle at the top right",
    "a large purple square at the bottom left",
    "a small orange triangle in the center",
    "a large white circle at the top left",
    "a small cyan square at the bottom right",
];

pub(crate) fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let data = args.dir.join("data");
    let ckpt = args.dir.join("model");
    println!(
        "potluck demo: 1/3 preparing the built-in `shapes` data set in {}",
        data.display()
    );
    let prepare = prepare::Args {
        dataset: "shapes".into(),
        out: data.clone(),
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
    prepare::print_report(&data, &report);

    println!(
        "potluck demo: 2/3 training `small` on this machine for {} minutes",
        args.minutes
    );
    train::run(train::Args {
        config_file: None,
        solo: true,
        swarm: Default::default(),
        data: data.clone(),
        config: "small".into(),
        out: ckpt.clone(),
        minutes: Some(args.minutes),
        steps: None,
        resume: false,
        batch_size: 32,
        micro_batch: None,
        optimizer: "lamb".into(),
        lr: None,
        state: "8bit".into(),
        warmup: 100,
        decay_steps: None,
        weight_decay: 0.01,
        checkpointing: false,
        device: "cpu".into(),
        threads: None,
        seed: args.seed,
        checkpoint_minutes: 5.0,
    })?;

    println!("potluck demo: 3/3 drawing samples and scoring them");
    let loaded = run::load(&ckpt, potluck_model::tch::Device::Cpu)?;
    let prompts: Vec<String> = SAMPLE_PROMPTS.iter().map(|p| (*p).to_owned()).collect();
    let sampling = Sampling {
        seed: args.seed,
        ..Sampling::default()
    };
    let images = run::draw(&loaded, &prompts, &sampling)?;
    let grid = args.dir.join("samples.png");
    run::write_grid(&grid, &images, &prompts)?;
    drop(loaded);
    let accuracy = eval::evaluate(&eval::Args {
        checkpoint: ckpt.clone(),
        prompts: args.eval_prompts,
        seed: args.seed,
        temperature: 1.0,
        top_k: 0,
        out: Some(args.dir.join("eval.png")),
        device: "cpu".into(),
    })?;
    println!();
    println!(
        "done in {:.1} minutes:",
        started.elapsed().as_secs_f64() / 60.0
    );
    println!("  data and tokenizers:  {}", data.display());
    println!("  model checkpoint:     {}", ckpt.display());
    println!("  sample grid:          {}", grid.display());
    println!(
        "  eval on {} prompts:  colour {:.2}, shape {:.2}, position {:.2}, size {:.2} ({})",
        accuracy.prompts,
        accuracy.color,
        accuracy.shape,
        accuracy.position,
        accuracy.size,
        args.dir.join("eval.png").display()
    );
    println!(
        "  draw your own:        potluck generate --checkpoint {} \"a small red circle in the center\"",
        ckpt.display()
    );
    println!("accuracy: {:.3}", accuracy.overall);
    Ok(())
}
