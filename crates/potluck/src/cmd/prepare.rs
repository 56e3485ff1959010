//! `potluck prepare`: train the text tokenizer and the image tokenizer (VQ-VAE) on a data set,
//! then encode it once into token shards, so training never runs the VQ-VAE.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use image::RgbImage;
use potluck_data::tokens::{FORMAT, Manifest, Quality, ShardWriter};
use potluck_data::{Dataset, Order, Sample, Skips, Spec, emoji, fit_square};
use potluck_model::tch;
use potluck_model::text::TextTokenizer;
use potluck_model::vqvae::{self, VqVae};
use potluck_model::{Device, vqvae::images_to_tensor};
use rand::{Rng, SeedableRng};

use crate::cmd::joining::{NetArgs, chartered, start_dht};
use crate::progress::Progress;

/// File names inside a prepared directory.
pub(crate) const TOKENIZER_FILE: &str = "tokenizer.json";
pub(crate) const VQVAE_FILE: &str = "vqvae.safetensors";
pub(crate) const RECONSTRUCTION_FILE: &str = "reconstruction.png";

/// Images `shapes` encodes when `--images` is not given (other data sets: all of them).
const DEFAULT_SHAPES_IMAGES: usize = 50_000;

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck prepare --dataset shapes --out data/shapes \
                        --reconstruct 16\n\
                        Then train on it with `--data data/shapes`."
)]
pub(crate) struct Args {
    /// Data set: `shapes` (built in), `emoji` (fetched with npm), `emoji:DIR`, or
    /// `webdataset:PATH` (a .tar shard, a directory of shards, or images with .txt captions).
    #[arg(long, default_value = "shapes")]
    pub(crate) dataset: String,
    /// Directory to write the tokenizers and token shards into.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Images to encode into shards [default: 50,000 for shapes, every image otherwise].
    #[arg(long)]
    pub(crate) images: Option<usize>,
    /// Training steps of the VQ-VAE.
    #[arg(long, default_value_t = 3000)]
    pub(crate) vq_steps: usize,
    /// Images per VQ-VAE training step.
    #[arg(long, default_value_t = 32)]
    pub(crate) vq_batch: usize,
    /// Peak learning rate of the VQ-VAE (Adam; warm-up, then cosine decay).
    #[arg(long, default_value_t = 2e-3)]
    pub(crate) vq_lr: f64,
    /// Images kept in memory to train the VQ-VAE on (after the held-out ones).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) vq_images: usize,
    /// Held-out images the reconstruction quality is measured on.
    #[arg(long, default_value_t = 1000)]
    pub(crate) held_out: usize,
    /// Data and initialisation seed.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Image side in pixels (images are centre-cropped and resized to it).
    #[arg(long, default_value_t = 32)]
    pub(crate) image_side: u32,
    /// VQ-VAE downsampling, 4 or 8: the code grid is side / downsample squared.
    #[arg(long, default_value_t = 4)]
    pub(crate) downsample: i64,
    /// VQ-VAE codebook size.
    #[arg(long, default_value_t = 512)]
    pub(crate) codebook: i64,
    /// Base channel width of the VQ-VAE.
    #[arg(long, default_value_t = 32)]
    pub(crate) vq_channels: i64,
    /// Largest text vocabulary (byte-level BPE).
    #[arg(long, default_value_t = 1024)]
    pub(crate) vocab: usize,
    /// Text ids per caption [default: the longest caption seen, rounded up to a multiple of 4].
    #[arg(long)]
    pub(crate) text_len: Option<usize>,
    /// Use this tokenizer.json (e.g. t5-small's) instead of training one (copied as it is).
    #[arg(long)]
    pub(crate) tokenizer: Option<PathBuf>,
    /// Use this image tokenizer (a `vqvae.safetensors` of `potluck prepare`) instead of training
    /// one (copied as it is; its image side and codebook replace the flags').
    #[arg(long)]
    pub(crate) vqvae: Option<PathBuf>,
    /// Encode the data with the tokenizers of this run, downloaded from its peers (the ones
    /// most of its live peers train with, checked against their hash) instead of training new
    /// ones: the way to join a run (data encoded with other tokenizers is refused). Give
    /// --initial-peers, and --authority and --token in an authorized run.
    #[arg(long, conflicts_with_all = ["tokenizer", "vqvae", "text_len"])]
    pub(crate) from_run: Option<String>,
    #[command(flatten)]
    pub(crate) net: NetArgs,
    /// Write a PNG grid of this many held-out originals beside their reconstructions.
    #[arg(long, default_value_t = 0)]
    pub(crate) reconstruct: usize,
    /// Samples per token shard file.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) shard_samples: usize,
    /// Where `emoji` keeps the npm packages.
    #[arg(long, default_value = "data/emoji")]
    pub(crate) emoji_dir: PathBuf,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub(crate) device: String,
}

/// What a prepare run did, for the caller to print or check.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub(crate) manifest: Manifest,
    pub(crate) vq_seconds: f64,
    pub(crate) encode_seconds: f64,
    pub(crate) encode_rate: f64,
    pub(crate) total_seconds: f64,
    pub(crate) reconstruction: Option<PathBuf>,
    pub(crate) skips: String,
}

pub(crate) fn run(mut args: Args) -> Result<()> {
    if let Some(run) = args.from_run.clone() {
        let text_len = take_from_run(&run, &args.net, &args.out)?;
        args.tokenizer = Some(args.out.join(TOKENIZER_FILE));
        args.vqvae = Some(args.out.join(VQVAE_FILE));
        args.text_len = Some(text_len);
    }
    let report = prepare(&args)?;
    print_report(&args.out, &report);
    Ok(())
}

/// How long `--from-run` looks for the run's peers' reports.
const LOOK_FOR_PEERS: std::time::Duration = std::time::Duration::from_secs(20);

/// Downloads the tokenizers of `run` from its peers into `out`; returns their caption length.
fn take_from_run(run: &str, net: &NetArgs, out: &Path) -> Result<usize> {
    use potluck_train::tokenizers;
    if net.initial_peers.is_empty() {
        bail!("--from-run {run} needs --initial-peers: the address of any peer of the run");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (bundle, peers, others) = rt.block_on(async {
        let (dht, keypair) = start_dht(run, net).await?;
        let chartered = chartered(&dht).await.map(|c| c.tokenizers);
        tokenizers::from_run(&dht, &keypair, run, chartered, LOOK_FOR_PEERS)
            .await
            .with_context(|| format!("taking the tokenizers of run {run}"))
    })?;
    rt.shutdown_background();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    potluck_core::file::write_atomic(&out.join(TOKENIZER_FILE), &bundle.text)?;
    potluck_core::file::write_atomic(&out.join(VQVAE_FILE), &bundle.image)?;
    println!(
        "took the tokenizers of run {run} from its peers: {} (live peers training with them: \
         {peers}{})",
        tokenizers::short(&bundle.id()),
        if others > 0 {
            format!("; with others: {others}")
        } else {
            String::new()
        }
    );
    Ok(bundle.text_len as usize)
}

/// Copies a given tokenizer file into the prepared directory as it is (its bytes are part of
/// the run's identity), unless it is that file already.
fn copy_verbatim(from: &Path, to: &Path) -> Result<()> {
    let same = match (from.canonicalize(), to.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        potluck_core::file::write_atomic(to, &bytes)?;
    }
    Ok(())
}

pub(crate) fn print_report(out: &Path, r: &Report) {
    let m = &r.manifest;
    println!("prepared {} into {}", m.dataset, out.display());
    println!(
        "  text tokenizer: {} ids, {} per caption -> {}",
        m.vocab_size,
        m.text_len,
        out.join(&m.tokenizer).display()
    );
    println!(
        "  image tokenizer: {}x{} px -> {}x{} codes of {} -> {} ({:.0} s to train)",
        m.image_side,
        m.image_side,
        m.image_grid[0],
        m.image_grid[1],
        m.codebook_size,
        out.join(&m.vqvae).display(),
        r.vq_seconds
    );
    if let Some(q) = &m.quality {
        println!(
            "  reconstruction on {} held-out images: PSNR {:.2} dB (pooled {:.2} dB), codebook \
             usage {:.1}%",
            q.held_out,
            q.psnr_db,
            q.psnr_pooled_db,
            100.0 * q.codebook_usage
        );
    }
    println!(
        "  token shards: {} samples in {} files, encoded at {:.0} images/s ({:.1} s)",
        m.samples,
        m.shards.len(),
        r.encode_rate,
        r.encode_seconds
    );
    if let Some(path) = &r.reconstruction {
        println!("  originals and reconstructions: {}", path.display());
    }
    println!("  skipped input: {}", r.skips);
    println!("  total time: {:.1} s", r.total_seconds);
}

/// Centre-cropped, resized samples of a data set in this peer's order.
fn fitted<'a>(
    dataset: &'a Dataset,
    order: &Order,
    skips: &Skips,
    side: u32,
) -> impl Iterator<Item = Sample> + 'a {
    dataset.stream(order, skips).map(move |s| Sample {
        caption: s.caption,
        image: fit_square(s.image, side),
    })
}

fn lr_at(step: usize, steps: usize, peak: f64) -> f64 {
    let warmup = (steps / 20).max(1);
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let t = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
    peak * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

/// `10·log10(255² / mse)` for an MSE measured on pixels scaled to [-1, 1].
fn psnr_from_unit_mse(mse: f64) -> f64 {
    10.0 * (4.0 / mse.max(1e-12)).log10()
}

pub(crate) fn prepare(args: &Args) -> Result<Report> {
    let started = Instant::now();
    let device = args.device.parse::<Device>()?.tch()?;
    tch::manual_seed(args.seed as i64);
    let spec = Dataset::spec(&args.dataset, &args.emoji_dir)?;
    if let Spec::Emoji(dir) = &spec
        && !emoji::is_fetched(dir)
    {
        emoji::fetch(dir).context("fetching the emoji data set")?;
    }
    let skips = Skips::default();
    // A given image tokenizer fixes the image side.
    let given_vq = match &args.vqvae {
        Some(path) => Some(
            VqVae::load(path, device)
                .with_context(|| format!("loading the image tokenizer {}", path.display()))?,
        ),
        None => None,
    };
    let image_side = given_vq
        .as_ref()
        .map_or(args.image_side, |vq| vq.config().image_side as u32);
    let dataset = Dataset::open(&spec, image_side, &skips)
        .with_context(|| format!("opening data set {spec}"))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let order = Order::new(args.seed, 0);

    // Held-out images first, then the VQ-VAE's training pool.
    let mut stream = fitted(&dataset, &order, &skips, image_side);
    let held: Vec<Sample> = stream.by_ref().take(args.held_out).collect();
    let training = given_vq.is_none() || args.tokenizer.is_none();
    let pool: Vec<Sample> = stream
        .take(if training { args.vq_images } else { 0 })
        .collect();
    if training && pool.len() < args.vq_batch {
        bail!(
            "{spec} gave only {} images for training after {} held out; need at least a batch \
             of {} (skipped input: {skips})",
            pool.len(),
            held.len(),
            args.vq_batch
        );
    }

    // Text tokenizer.
    let captions = || held.iter().chain(&pool).map(|s| s.caption.as_str());
    let probe = match &args.tokenizer {
        Some(path) => TextTokenizer::load(path, 1024)?,
        None => TextTokenizer::train(captions(), args.vocab, 1024)?,
    };
    let text_len = match args.text_len {
        Some(n) => n,
        None => {
            let mut longest = 1;
            for c in captions() {
                longest = longest.max(probe.natural_len(c)?);
            }
            longest.div_ceil(4) * 4
        }
    };
    let tokenizer = match &args.tokenizer {
        Some(path) => TextTokenizer::load(path, text_len)?,
        None => TextTokenizer::train(captions(), args.vocab, text_len)?,
    };
    match &args.tokenizer {
        Some(path) => copy_verbatim(path, &args.out.join(TOKENIZER_FILE))?,
        None => tokenizer.save(&args.out.join(TOKENIZER_FILE))?,
    }

    // Image tokenizer.
    let vq_started = Instant::now();
    let vq = match (given_vq, &args.vqvae) {
        (Some(vq), Some(path)) => {
            copy_verbatim(path, &args.out.join(VQVAE_FILE))?;
            vq
        }
        _ => {
            let cfg = vqvae::Config {
                image_side: i64::from(args.image_side),
                downsample: args.downsample,
                channels: args.vq_channels,
                codebook_size: args.codebook,
                ..Default::default()
            };
            let mut vq = VqVae::new(cfg, device)?;
            train_vqvae(&mut vq, &pool, args)?;
            vq.save(&args.out.join(VQVAE_FILE))?;
            vq
        }
    };
    let vq_seconds = vq_started.elapsed().as_secs_f64();
    drop(pool);

    // Quality on held-out images.
    let mut psnr_sum = 0.0;
    let mut mse_sum = 0.0;
    let mut originals = Vec::new();
    let mut reconstructions = Vec::new();
    for chunk in held.chunks(256) {
        let images: Vec<RgbImage> = chunk.iter().map(|s| s.image.clone()).collect();
        let codes = vq.encode(&images_to_tensor(&images, device)?);
        let back = vqvae::tensor_to_images(&vq.decode(&codes))?;
        for (a, b) in images.iter().zip(&back) {
            psnr_sum += vqvae::psnr(a, b);
            mse_sum += vqvae::mse(a, b);
        }
        if originals.len() < args.reconstruct {
            originals.extend(images);
            reconstructions.extend(back);
        }
    }
    let held_n = held.len().max(1) as f64;
    let psnr = psnr_sum / held_n;
    let pooled = 10.0 * (255.0f64 * 255.0 / (mse_sum / held_n).max(1e-10)).log10();
    let reconstruction = if args.reconstruct > 0 && !originals.is_empty() {
        let path = args.out.join(RECONSTRUCTION_FILE);
        write_reconstruction(&path, &originals, &reconstructions, args.reconstruct)?;
        Some(path)
    } else {
        None
    };

    // Encode the data set once.
    let total = match (args.images, dataset.len()) {
        (Some(n), Some(len)) => n.min(len),
        (Some(n), None) => n,
        (None, Some(len)) => len,
        (None, None) => DEFAULT_SHAPES_IMAGES,
    };
    let grid = vq.config().grid() as usize;
    let mut writer = ShardWriter::new(&args.out, text_len, grid * grid, args.shard_samples);
    let codebook = vq.config().codebook_size;
    let mut used = vec![false; codebook as usize];
    let mut bar = Progress::new(total as u64, "encoding");
    let encode_started = Instant::now();
    let mut encoded = 0usize;
    let mut stream = fitted(&dataset, &order, &skips, image_side)
        .take(total)
        .peekable();
    while stream.peek().is_some() {
        let batch: Vec<Sample> = stream.by_ref().take(256).collect();
        let images: Vec<RgbImage> = batch.iter().map(|s| s.image.clone()).collect();
        let codes = vq.encode(&images_to_tensor(&images, device)?);
        let codes = Vec::<i64>::try_from(&codes.reshape([-1]).to_device(tch::Device::Cpu))?;
        for (sample, row) in batch.iter().zip(codes.chunks_exact(grid * grid)) {
            let text = tokenizer.encode(&sample.caption)?;
            let row: Vec<u16> = row.iter().map(|&c| c as u16).collect();
            for &c in &row {
                used[usize::from(c)] = true;
            }
            writer.push(&text, &row)?;
        }
        encoded += batch.len();
        let rate = encoded as f64 / encode_started.elapsed().as_secs_f64().max(1e-9);
        bar.update(encoded as u64, || format!("{rate:.0} images/s"));
    }
    bar.finish();
    let encode_seconds = encode_started.elapsed().as_secs_f64();
    let shards = writer.finish()?;
    let usage = used.iter().filter(|&&u| u).count() as f64 / used.len() as f64;

    let manifest = Manifest {
        format: FORMAT.to_owned(),
        dataset: spec.to_string(),
        seed: args.seed,
        samples: shards.iter().map(|s| s.samples).sum(),
        text_len,
        vocab_size: tokenizer.vocab_size(),
        pad_id: tokenizer.pad_id(),
        image_side,
        image_grid: [grid, grid],
        codebook_size: codebook as usize,
        tokenizer: TOKENIZER_FILE.to_owned(),
        vqvae: VQVAE_FILE.to_owned(),
        shards,
        quality: Some(Quality {
            held_out: held.len(),
            psnr_db: psnr,
            psnr_pooled_db: pooled,
            codebook_usage: usage,
        }),
    };
    manifest.save(&args.out)?;
    Ok(Report {
        manifest,
        vq_seconds,
        encode_seconds,
        encode_rate: encoded as f64 / encode_seconds.max(1e-9),
        total_seconds: started.elapsed().as_secs_f64(),
        reconstruction,
        skips: skips.to_string(),
    })
}

fn train_vqvae(vq: &mut VqVae, pool: &[Sample], args: &Args) -> Result<()> {
    let device = vq.device();
    let mut opt = vq.optimizer(args.vq_lr)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(potluck_data::mix_seed(args.seed, 17));
    let mut bar = Progress::new(args.vq_steps as u64, "VQ-VAE");
    let mut smoothed: Option<f64> = None;
    let restart_until = args.vq_steps * 9 / 10;
    for step in 0..args.vq_steps {
        opt.set_lr(lr_at(step, args.vq_steps, args.vq_lr));
        let images: Vec<RgbImage> = (0..args.vq_batch)
            .map(|_| pool[rng.random_range(0..pool.len())].image.clone())
            .collect();
        let x = images_to_tensor(&images, device)?;
        let restart = step < restart_until && step % 20 == 0;
        let stats = vq.train_step(&mut opt, &x, restart)?;
        if !stats.recon.is_finite() {
            bail!(
                "the VQ-VAE diverged at step {step} (loss {}); try a lower --vq-lr",
                stats.recon
            );
        }
        let s = smoothed.map_or(stats.recon, |s| 0.95 * s + 0.05 * stats.recon);
        smoothed = Some(s);
        bar.update(step as u64 + 1, || {
            format!(
                "PSNR ~{:.1} dB, batch code usage {:.0}%",
                psnr_from_unit_mse(s),
                100.0 * stats.batch_usage
            )
        });
    }
    bar.finish();
    Ok(())
}

fn write_reconstruction(
    path: &Path,
    originals: &[RgbImage],
    reconstructions: &[RgbImage],
    k: usize,
) -> Result<()> {
    // Rows of up to 8: originals, then their reconstructions underneath.
    let k = k.min(originals.len());
    let mut cells = Vec::new();
    let columns = 8.min(k);
    for start in (0..k).step_by(columns) {
        let end = (start + columns).min(k);
        let pad = columns - (end - start);
        let blank = RgbImage::new(originals[0].width(), originals[0].height());
        cells.extend(originals[start..end].iter().cloned());
        cells.extend(std::iter::repeat_n(blank.clone(), pad));
        cells.extend(reconstructions[start..end].iter().cloned());
        cells.extend(std::iter::repeat_n(blank, pad));
    }
    let zoom = (256 / originals[0].width().max(1)).clamp(1, 8);
    let grid = potluck_data::grid::grid(&cells, columns, zoom, 2);
    grid.save(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
