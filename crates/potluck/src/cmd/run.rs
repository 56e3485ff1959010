//! What the commands that touch a trained model share: reading a checkpoint back into a model
//! with its tokenizers, and turning prompts into images.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::RgbImage;
use potluck_core::Trainable;
use potluck_model::dalle::{Config, Dalle, Sampling};
use potluck_model::tch;
use potluck_model::text::TextTokenizer;
use potluck_model::vqvae::{self, VqVae};
use potluck_train::checkpoint;

use crate::cmd::prepare::{TOKENIZER_FILE, VQVAE_FILE};

/// Metadata key of the model configuration in a checkpoint's parameter file.
pub(crate) const META_MODEL: &str = "potluck.model";

/// Prompts of the `shapes` sample grids (the demo's, the monitor's): one of each colour, with every shape, size and position.
pub(crate) const SAMPLE_PROMPTS: [&str; 8] = [
    "a large red circle in the center",
    "a small green square at the top left",
    "a large blue triangle at the bottom right",
    "a small yellow circle at the top right",
    "a large purple square at the bottom left",
    "a small orange triangle in the center",
    "a large white circle at the top left",
    "a small cyan square at the bottom right",
];

/// A trained model with everything needed to draw with it.
pub(crate) struct Loaded {
    pub(crate) model: Dalle,
    pub(crate) tokenizer: TextTokenizer,
    pub(crate) vq: VqVae,
    pub(crate) manifest: checkpoint::Manifest,
}

/// The model configuration stored with a checkpoint.
pub(crate) fn model_meta(config: &Config) -> Result<HashMap<String, String>> {
    Ok(HashMap::from([(
        META_MODEL.to_owned(),
        serde_json::to_string(config)?,
    )]))
}

/// Reads a checkpoint directory: model, text tokenizer and image tokenizer.
pub(crate) fn load(dir: &Path, device: tch::Device) -> Result<Loaded> {
    let (_, meta) = checkpoint::read_model_meta(dir)
        .with_context(|| format!("reading checkpoint {}", dir.display()))?;
    let config = meta.get(META_MODEL).with_context(|| {
        format!(
            "{}: the parameter file has no model configuration",
            dir.display()
        )
    })?;
    let config: Config = serde_json::from_str(config).context("reading the model configuration")?;
    let mut model = Dalle::new(config, device)?;
    let (manifest, params) = checkpoint::load_params(dir, model.layout())?;
    model.write_params(&params)?;
    let tokenizer = TextTokenizer::load(&dir.join(TOKENIZER_FILE), model.config().tokens.text_len)
        .with_context(|| format!("loading the text tokenizer of {}", dir.display()))?;
    let vq = VqVae::load(&dir.join(VQVAE_FILE), device)
        .with_context(|| format!("loading the image tokenizer of {}", dir.display()))?;
    if vq.config().grid() as usize != model.config().tokens.image_grid {
        bail!(
            "{}: the image tokenizer's grid does not match the model's",
            dir.display()
        );
    }
    Ok(Loaded {
        model,
        tokenizer,
        vq,
        manifest,
    })
}

/// Copies the tokenizers from a prepared data directory into a checkpoint directory, so the
/// checkpoint is all `generate` needs.
pub(crate) fn copy_tokenizers(data: &Path, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for file in [TOKENIZER_FILE, VQVAE_FILE] {
        let bytes = std::fs::read(data.join(file))
            .with_context(|| format!("reading {}", data.join(file).display()))?;
        potluck_core::file::write_atomic(&out.join(file), &bytes)?;
    }
    Ok(())
}

/// Draws one image per prompt, in batches.
pub(crate) fn draw(
    loaded: &Loaded,
    prompts: &[String],
    sampling: &Sampling,
) -> Result<Vec<RgbImage>> {
    let mut images = Vec::with_capacity(prompts.len());
    for (b, chunk) in prompts.chunks(64).enumerate() {
        let ids = chunk
            .iter()
            .map(|p| loaded.tokenizer.encode(p))
            .collect::<Result<Vec<_>, _>>()?;
        // Each prompt keeps its own draws whatever the batch: seed by its index overall.
        let s = Sampling {
            seed: potluck_data::mix_seed(sampling.seed, b as u64),
            ..*sampling
        };
        let codes = loaded.model.generate(&ids, &s)?;
        let flat: Vec<i64> = codes.iter().flatten().map(|&c| i64::from(c)).collect();
        let grid = loaded.vq.config().grid();
        let codes = tch::Tensor::from_slice(&flat)
            .view([chunk.len() as i64, grid * grid])
            .to_device(loaded.model.device());
        images.extend(vqvae::tensor_to_images(&loaded.vq.decode(&codes))?);
    }
    Ok(images)
}

/// Writes a captioned grid of images.
pub(crate) fn write_grid(path: &PathBuf, images: &[RgbImage], captions: &[String]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let columns = (images.len() as f64).sqrt().ceil().max(1.0) as usize;
    let zoom = (128 / images.first().map_or(32, RgbImage::width).max(1)).clamp(1, 8);
    let grid = potluck_data::grid::captioned(images, captions, columns.min(8), zoom);
    grid.save(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
