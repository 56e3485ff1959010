//! `potluck generate`: draw images for prompts with a trained checkpoint.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use potluck_model::Device;
use potluck_model::dalle::Sampling;

use crate::cmd::run;

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck generate --checkpoint runs/small --seed 1 \
                        --out grid.png \"a large red circle in the center\" \
                        \"a small blue square at the top left\""
)]
pub(crate) struct Args {
    /// Checkpoint directory (from `potluck train`).
    #[arg(long)]
    pub(crate) checkpoint: PathBuf,
    /// Seed of the draws: the same seed and prompts give the same images.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Write a grid of all images, captioned, here [default: samples.png unless --out-dir].
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Also write one PNG per prompt here: 000.png, 001.png, … in the order given.
    #[arg(long)]
    pub(crate) out_dir: Option<PathBuf>,
    /// Sampling temperature (lower is more conservative).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) temperature: f64,
    /// Keep only the k most likely codes at each step (0: all).
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
    /// Keep the most likely codes up to this total probability (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) top_p: f64,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
    /// What to draw: one image per prompt.
    #[arg(required = true)]
    pub(crate) prompts: Vec<String>,
}

pub(crate) fn run(args: Args) -> Result<()> {
    let valid = args.temperature > 0.0 && args.top_p > 0.0 && args.top_p <= 1.0;
    if !valid {
        bail!("--temperature must be above 0 and --top-p in (0, 1]");
    }
    let device = args.device.parse::<Device>()?.tch()?;
    let loaded = run::load(&args.checkpoint, device)?;
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    let images = run::draw(&loaded, &args.prompts, &sampling)?;
    if let Some(dir) = &args.out_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (i, image) in images.iter().enumerate() {
            let path = dir.join(format!("{i:03}.png"));
            image
                .save(&path)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        println!("wrote {} images to {}", images.len(), dir.display());
    }
    let grid = args
        .out
        .clone()
        .or_else(|| args.out_dir.is_none().then(|| "samples.png".into()));
    if let Some(path) = grid {
        run::write_grid(&path, &images, &args.prompts)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
