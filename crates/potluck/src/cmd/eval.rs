//! `potluck eval`: score a `shapes` checkpoint by drawing images for prompts of the grammar and
//! reading them back with the detector.

use std::path::PathBuf;

use anyhow::Result;
use image::RgbImage;
use potluck_data::detect::score;
use potluck_data::shapes::Caption;
use potluck_model::Device;
use potluck_model::dalle::Sampling;
use rand::SeedableRng;

use crate::cmd::run;

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Example: potluck eval --checkpoint runs/small --prompts 200")]
pub(crate) struct Args {
    /// Checkpoint directory of a model trained on `shapes`.
    #[arg(long)]
    pub(crate) checkpoint: PathBuf,
    /// Prompts to draw from the grammar.
    #[arg(long, default_value_t = 200)]
    pub(crate) prompts: usize,
    /// Seed of the prompts and of the draws.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) temperature: f64,
    /// Keep only the k most likely codes at each step (0: all).
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
    /// Also write the generated images, captioned, to this PNG.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
}

/// Accuracy figures of an evaluation.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Accuracy {
    pub(crate) prompts: usize,
    pub(crate) color: f64,
    pub(crate) shape: f64,
    pub(crate) position: f64,
    pub(crate) size: f64,
    pub(crate) overall: f64,
}

pub(crate) fn evaluate(args: &Args) -> Result<Accuracy> {
    let device = args.device.parse::<Device>()?.tch()?;
    let loaded = run::load(&args.checkpoint, device)?;
    tracing::info!(
        "checkpoint {} at step {} ({} samples)",
        args.checkpoint.display(),
        loaded.manifest.step,
        loaded.manifest.samples
    );
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        seed: args.seed,
        ..Sampling::default()
    };
    let (a, images, prompts) = score_loaded(&loaded, args.prompts, &sampling)?;
    if let Some(path) = &args.out {
        run::write_grid(path, &images, &prompts)?;
    }
    Ok(a)
}

/// Draws `n` prompts of the grammar (chosen by the sampling's seed) with a loaded model and
/// reads the images back with the detector; also returns the images and their prompts.
pub(crate) fn score_loaded(
    loaded: &run::Loaded,
    n: usize,
    sampling: &Sampling,
) -> Result<(Accuracy, Vec<RgbImage>, Vec<String>)> {
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(potluck_data::mix_seed(sampling.seed, 0xE7A1));
    let captions: Vec<Caption> = (0..n).map(|_| Caption::random(&mut rng)).collect();
    let prompts: Vec<String> = captions.iter().map(ToString::to_string).collect();
    let images = run::draw(loaded, &prompts, sampling)?;
    let mut a = Accuracy {
        prompts: prompts.len(),
        ..Accuracy::default()
    };
    for (caption, image) in captions.iter().zip(&images) {
        let s = score(caption, image);
        a.color += f64::from(u8::from(s.color));
        a.shape += f64::from(u8::from(s.shape));
        a.position += f64::from(u8::from(s.position));
        a.size += f64::from(u8::from(s.size));
        a.overall += f64::from(u8::from(s.overall()));
    }
    let total = prompts.len().max(1) as f64;
    for v in [
        &mut a.color,
        &mut a.shape,
        &mut a.position,
        &mut a.size,
        &mut a.overall,
    ] {
        *v /= total;
    }
    Ok((a, images, prompts))
}

pub(crate) fn run(args: Args) -> Result<()> {
    let a = evaluate(&args)?;
    println!("evaluated {} prompts of the shapes grammar", a.prompts);
    println!("  colour:   {:.3}", a.color);
    println!("  shape:    {:.3}", a.shape);
    println!("  position: {:.3}", a.position);
    println!("  size:     {:.3}", a.size);
    println!("accuracy: {:.3}", a.overall);
    Ok(())
}
