//! `potluck demo`: the first command a newcomer runs. For now it prepares the embedded `shapes`
//! data set with small settings and says what it did; training and the local swarm come next.

use std::path::PathBuf;

use anyhow::Result;

use crate::cmd::prepare;

#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Example: potluck demo --dir runs/demo")]
pub(crate) struct Args {
    /// Where the demo writes everything it makes.
    #[arg(long, default_value = "runs/demo")]
    dir: PathBuf,
    /// Images to encode.
    #[arg(long, default_value_t = 5000)]
    images: usize,
    /// VQ-VAE training steps.
    #[arg(long, default_value_t = 600)]
    vq_steps: usize,
    /// Data seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub(crate) fn run(args: Args) -> Result<()> {
    let data = args.dir.join("data");
    println!(
        "potluck demo: preparing the built-in `shapes` data set in {}",
        data.display()
    );
    let prepare = prepare::Args {
        dataset: "shapes".into(),
        out: data.clone(),
        images: Some(args.images),
        vq_steps: args.vq_steps,
        vq_batch: 32,
        vq_lr: 2e-3,
        vq_images: 5000,
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
    println!("next: train on it with the model (coming with the transformer).");
    Ok(())
}
