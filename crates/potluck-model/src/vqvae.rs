//! The image tokenizer: a VQ-VAE that turns an image into a grid of codes and back.
//!
//! A convolutional encoder downsamples `image_side` by `downsample` (4 or 8) to a grid of
//! `code_dim` vectors; each is replaced by its nearest codebook entry; a mirrored decoder draws
//! the image back. The codebook (default 512 entries) is learned by exponential moving averages
//! of the vectors assigned to it, with dead entries restarted from the current batch; gradients
//! pass the quantiser straight through, and a commitment loss keeps the encoder near the codes.
//! The reference run used a pretrained VQGAN f8 with 8,192 codes; no weights can be downloaded
//! here, so we train our own (on `shapes` it takes minutes).
//!
//! Shapes: images are `[B, 3, S, S]` floats in [-1, 1]; codes are `[B, G·G]` `i64`, row-major
//! over the `G × G` grid, `G = S / downsample`.

use std::collections::HashMap;
use std::path::Path;

use image::RgbImage;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

use crate::{Error, store};

/// Metadata key holding the configuration in a weights file.
const META_CONFIG: &str = "potluck.vqvae";

/// The shape of a VQ-VAE and how it learns.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Side of the square input image in pixels.
    pub image_side: i64,
    /// Side reduction from image to code grid: 4 or 8 (or any power of two ≥ 2).
    pub downsample: i64,
    /// Channels at full resolution; doubled after each downsampling, up to four times.
    pub channels: i64,
    /// Residual blocks at the code-grid resolution, in the encoder and in the decoder.
    pub res_blocks: i64,
    /// Number of codebook entries.
    pub codebook_size: i64,
    /// Dimension of a code vector.
    pub code_dim: i64,
    /// Weight of the commitment loss.
    pub commitment: f64,
    /// Decay of the codebook's moving averages.
    pub decay: f64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            image_side: 32,
            downsample: 4,
            channels: 32,
            res_blocks: 2,
            codebook_size: 512,
            code_dim: 64,
            commitment: 0.25,
            decay: 0.99,
        }
    }
}

impl Config {
    /// Side of the code grid.
    pub fn grid(&self) -> i64 {
        self.image_side / self.downsample
    }

    /// Checks that the shapes fit together.
    pub fn validate(&self) -> Result<(), Error> {
        let ds = self.downsample;
        if ds < 2 || ds & (ds - 1) != 0 {
            return Err(Error::Config(format!(
                "downsample {ds} is not a power of two ≥ 2"
            )));
        }
        if self.image_side % ds != 0 {
            return Err(Error::Config(format!(
                "image side {} is not a multiple of the downsampling {ds}",
                self.image_side
            )));
        }
        if !(2..=1 << 16).contains(&self.codebook_size) {
            return Err(Error::Config(format!(
                "codebook size {} outside 2..=65,536",
                self.codebook_size
            )));
        }
        if self.channels < 1 || self.code_dim < 1 || self.res_blocks < 0 {
            return Err(Error::Config(
                "channels and code_dim must be positive".into(),
            ));
        }
        Ok(())
    }

    fn levels(&self) -> i64 {
        self.downsample.trailing_zeros() as i64
    }

    /// Channels after `level` downsamplings (0 = full resolution): doubling per level, at most
    /// four times the base, so the cheap low resolutions get the width.
    fn width(&self, level: i64) -> i64 {
        self.channels << level.min(2)
    }
}

fn conv(vs: nn::Path<'_>, i: i64, o: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    nn::conv2d(
        vs,
        i,
        o,
        k,
        nn::ConvConfig {
            stride,
            padding,
            ..Default::default()
        },
    )
}

/// `x + conv1x1(relu(conv3x3(relu(x))))`.
#[derive(Debug)]
struct ResBlock {
    a: nn::Conv2D,
    b: nn::Conv2D,
}

impl ResBlock {
    fn new(vs: nn::Path<'_>, c: i64) -> ResBlock {
        ResBlock {
            a: conv(&vs / "a", c, c, 3, 1, 1),
            b: conv(&vs / "b", c, c, 1, 1, 0),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x + self.b.forward(&self.a.forward(&x.relu()).relu())
    }
}

#[derive(Debug)]
struct Encoder {
    stem: nn::Conv2D,
    down: Vec<nn::Conv2D>,
    res: Vec<ResBlock>,
    out: nn::Conv2D,
}

impl Encoder {
    fn new(vs: nn::Path<'_>, cfg: &Config) -> Encoder {
        let stem = conv(&vs / "stem", 3, cfg.width(0), 3, 1, 1);
        let down = (0..cfg.levels())
            .map(|l| conv(&vs / "down" / l, cfg.width(l), cfg.width(l + 1), 4, 2, 1))
            .collect();
        let top = cfg.width(cfg.levels());
        let res = (0..cfg.res_blocks)
            .map(|i| ResBlock::new(&vs / "res" / i, top))
            .collect();
        let out = conv(&vs / "out", top, cfg.code_dim, 1, 1, 0);
        Encoder {
            stem,
            down,
            res,
            out,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.stem.forward(x);
        for d in &self.down {
            h = d.forward(&h.relu());
        }
        for r in &self.res {
            h = r.forward(&h);
        }
        self.out.forward(&h.relu())
    }
}

#[derive(Debug)]
struct Decoder {
    stem: nn::Conv2D,
    res: Vec<ResBlock>,
    up: Vec<nn::ConvTranspose2D>,
    out: nn::Conv2D,
}

impl Decoder {
    fn new(vs: nn::Path<'_>, cfg: &Config) -> Decoder {
        let top = cfg.width(cfg.levels());
        let stem = conv(&vs / "stem", cfg.code_dim, top, 3, 1, 1);
        let res = (0..cfg.res_blocks)
            .map(|i| ResBlock::new(&vs / "res" / i, top))
            .collect();
        let up = (0..cfg.levels())
            .rev()
            .map(|l| {
                let c = nn::ConvTransposeConfig {
                    stride: 2,
                    padding: 1,
                    ..Default::default()
                };
                nn::conv_transpose2d(&vs / "up" / l, cfg.width(l + 1), cfg.width(l), 4, c)
            })
            .collect();
        let out = conv(&vs / "out", cfg.width(0), 3, 3, 1, 1);
        Decoder { stem, res, up, out }
    }

    fn forward(&self, z: &Tensor) -> Tensor {
        let mut h = self.stem.forward(z);
        for r in &self.res {
            h = r.forward(&h);
        }
        for u in &self.up {
            h = u.forward(&h.relu());
        }
        self.out.forward(&h.relu())
    }
}

/// The codebook and its moving averages (not trained by gradients).
#[derive(Debug)]
struct Codebook {
    embed: Tensor,
    cluster_size: Tensor,
    embed_sum: Tensor,
    /// 1 once the entries were seeded from encoder outputs.
    initialized: Tensor,
}

impl Codebook {
    fn new(vs: nn::Path<'_>, cfg: &Config) -> Codebook {
        Codebook {
            // Updated by moving averages only, never by the optimiser; seeded from the first
            // batch's encoder outputs.
            embed: vs.zeros_no_train("embed", &[cfg.codebook_size, cfg.code_dim]),
            cluster_size: vs.zeros_no_train("cluster_size", &[cfg.codebook_size]),
            embed_sum: vs.zeros_no_train("embed_sum", &[cfg.codebook_size, cfg.code_dim]),
            initialized: vs.zeros_no_train("initialized", &[1]),
        }
    }

    /// Index of the nearest entry for each row of `flat` `[N, D]`.
    fn nearest(&self, flat: &Tensor) -> Tensor {
        let e = &self.embed;
        let dist = flat
            .pow_tensor_scalar(2)
            .sum_dim_intlist(1, true, Kind::Float)
            - flat.matmul(&e.tr()) * 2.0
            + e.pow_tensor_scalar(2)
                .sum_dim_intlist(1, false, Kind::Float)
                .unsqueeze(0);
        dist.argmin(1, false)
    }
}

/// Figures of one training step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean squared reconstruction error on [-1, 1] pixels.
    pub recon: f64,
    /// Commitment loss (mean squared distance of encoder outputs to their codes).
    pub commit: f64,
    /// Fraction of codebook entries used in this batch.
    pub batch_usage: f64,
    /// Dead entries restarted in this step.
    pub restarted: i64,
}

/// The VQ-VAE with its weights.
#[derive(Debug)]
pub struct VqVae {
    cfg: Config,
    vs: nn::VarStore,
    encoder: Encoder,
    decoder: Decoder,
    codebook: Codebook,
    /// Assignments per entry since the last restart check (training state, not saved).
    window: Option<Tensor>,
}

impl VqVae {
    /// A freshly initialised model on `device`.
    pub fn new(cfg: Config, device: tch::Device) -> Result<VqVae, Error> {
        cfg.validate()?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let encoder = Encoder::new(&root / "encoder", &cfg);
        let decoder = Decoder::new(&root / "decoder", &cfg);
        let codebook = Codebook::new(&root / "codebook", &cfg);
        Ok(VqVae {
            cfg,
            vs,
            encoder,
            decoder,
            codebook,
            window: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The variables (for optimisers and parameter counts).
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The device the model lives on.
    pub fn device(&self) -> tch::Device {
        self.vs.device()
    }

    /// An Adam optimiser over the encoder and decoder.
    pub fn optimizer(&self, lr: f64) -> Result<nn::Optimizer, Error> {
        Ok(nn::Adam::default().build(&self.vs, lr)?)
    }

    fn latent(&self, images: &Tensor) -> (Tensor, [i64; 4]) {
        let z = self.encoder.forward(images);
        let size = z.size();
        let (b, d, h, w) = (size[0], size[1], size[2], size[3]);
        let flat = z.permute([0, 2, 3, 1]).reshape([-1, d]);
        (flat, [b, d, h, w])
    }

    fn unflatten(flat: &Tensor, [b, d, h, w]: [i64; 4]) -> Tensor {
        flat.reshape([b, h, w, d]).permute([0, 3, 1, 2])
    }

    /// One training step on `images` `[B, 3, S, S]` in [-1, 1]. With `restart`, entries that
    /// nothing was assigned to since the last restart step start again at random encoder
    /// outputs of this batch.
    pub fn train_step(
        &mut self,
        opt: &mut nn::Optimizer,
        images: &Tensor,
        restart: bool,
    ) -> Result<StepStats, Error> {
        let (flat, shape) = self.latent(images);
        let detached = flat.detach();
        let k = self.cfg.codebook_size;
        let cb = &mut self.codebook;
        let n = detached.size()[0];
        let mut restarted = 0;
        tch::no_grad(|| {
            if cb.initialized.double_value(&[0]) == 0.0 {
                // Seed the entries with encoder outputs, so none starts far from the data.
                let pick = Tensor::randint(n, [k], (Kind::Int64, detached.device()));
                cb.embed.copy_(&detached.index_select(0, &pick));
                cb.embed_sum.copy_(&cb.embed);
                let _ = cb.cluster_size.fill_(1.0);
                let _ = cb.initialized.fill_(1.0);
            }
        });
        let idx = tch::no_grad(|| cb.nearest(&detached));
        let quantized = cb.embed.index_select(0, &idx);
        let commit = (&flat - &quantized).pow_tensor_scalar(2).mean(Kind::Float);
        let straight = &flat + (&quantized - &flat).detach();
        let recon = self.decoder.forward(&Self::unflatten(&straight, shape));
        let recon_loss = (&recon - images).pow_tensor_scalar(2).mean(Kind::Float);
        let loss = &recon_loss + &commit * self.cfg.commitment;
        opt.backward_step(&loss);

        let decay = self.cfg.decay;
        let cb = &mut self.codebook;
        let window = &mut self.window;
        let batch_usage = tch::no_grad(|| -> Result<f64, Error> {
            let ones = Tensor::ones([n], (Kind::Float, detached.device()));
            let counts =
                Tensor::zeros([k], (Kind::Float, detached.device())).index_add(0, &idx, &ones);
            let sums = Tensor::zeros([k, self.cfg.code_dim], (Kind::Float, detached.device()))
                .index_add(0, &idx, &detached);
            let _ = cb
                .cluster_size
                .g_mul_scalar_(decay)
                .g_add_(&(&counts * (1.0 - decay)));
            let _ = cb
                .embed_sum
                .g_mul_scalar_(decay)
                .g_add_(&(&sums * (1.0 - decay)));
            // Laplace smoothing keeps rarely used entries from dividing by zero.
            let total = cb.cluster_size.sum(Kind::Float);
            let eps = 1e-5;
            let smoothed = (&cb.cluster_size + eps) / (&total + k as f64 * eps) * &total;
            cb.embed.copy_(&(&cb.embed_sum / smoothed.unsqueeze(1)));
            let seen = match window.take() {
                Some(w) => w + &counts,
                None => counts.shallow_clone(),
            };
            if restart {
                let dead = seen.eq(0.0).nonzero().squeeze_dim(1);
                restarted = dead.size()[0];
                if restarted > 0 {
                    // Like k-means++: restart at vectors the codebook serves worst.
                    let err = (&detached - &quantized.detach())
                        .pow_tensor_scalar(2)
                        .sum_dim_intlist(1, false, Kind::Float);
                    let pick = if err.sum(Kind::Float).double_value(&[]) > 0.0 {
                        err.multinomial(restarted, true)
                    } else {
                        Tensor::randint(n, [restarted], (Kind::Int64, detached.device()))
                    };
                    let fresh = detached.index_select(0, &pick);
                    let _ = cb.embed.index_copy_(0, &dead, &fresh);
                    let _ = cb.embed_sum.index_copy_(0, &dead, &fresh);
                    let _ = cb.cluster_size.index_fill_(0, &dead, 1.0);
                }
            } else {
                *window = Some(seen);
            }
            Ok(counts
                .gt(0.0)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[]))
        })?;
        Ok(StepStats {
            recon: recon_loss.double_value(&[]),
            commit: commit.double_value(&[]),
            batch_usage,
            restarted,
        })
    }

    /// Codes `[B, G·G]` for images `[B, 3, S, S]`.
    pub fn encode(&self, images: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let (flat, [b, _, h, w]) = self.latent(images);
            self.codebook.nearest(&flat).reshape([b, h * w])
        })
    }

    /// Images `[B, 3, S, S]` in [-1, 1] for codes `[B, G·G]`.
    pub fn decode(&self, codes: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let b = codes.size()[0];
            let g = self.cfg.grid();
            let flat = self.codebook.embed.index_select(0, &codes.reshape([-1]));
            let z = Self::unflatten(&flat, [b, self.cfg.code_dim, g, g]);
            self.decoder.forward(&z).clamp(-1.0, 1.0)
        })
    }

    /// Saves weights, codebook and configuration to one safetensors file.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let config = serde_json::to_string(&self.cfg).map_err(|e| Error::Config(e.to_string()))?;
        store::save(
            &self.vs,
            path,
            HashMap::from([(META_CONFIG.to_owned(), config)]),
        )
    }

    /// Loads a file written by [`VqVae::save`].
    pub fn load(path: &Path, device: tch::Device) -> Result<VqVae, Error> {
        let (bytes, meta) = store::read_metadata(path)?;
        let config = meta.get(META_CONFIG).ok_or_else(|| Error::Format {
            path: path.into(),
            reason: format!("no {META_CONFIG} metadata: not a potluck VQ-VAE"),
        })?;
        let cfg: Config = serde_json::from_str(config).map_err(|e| Error::Format {
            path: path.into(),
            reason: e.to_string(),
        })?;
        let vq = VqVae::new(cfg, device)?;
        store::load_into(&vq.vs, &bytes, path)?;
        Ok(vq)
    }
}

/// A batch of RGB images as a `[B, 3, S, S]` float tensor in [-1, 1]; all must be `S × S`.
pub fn images_to_tensor(images: &[RgbImage], device: tch::Device) -> Result<Tensor, Error> {
    let Some(first) = images.first() else {
        return Err(Error::Config("no images".into()));
    };
    let (w, h) = first.dimensions();
    if images.iter().any(|i| i.dimensions() != (w, h)) {
        return Err(Error::Config(
            "images of different sizes in one batch".into(),
        ));
    }
    let mut bytes = Vec::with_capacity(images.len() * (w * h * 3) as usize);
    for image in images {
        bytes.extend_from_slice(image.as_raw());
    }
    let t = Tensor::from_slice(&bytes)
        .view([images.len() as i64, h as i64, w as i64, 3])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        .to_device(device);
    Ok(t / 127.5 - 1.0)
}

/// The images of a `[B, 3, S, S]` tensor in [-1, 1], rounded to bytes.
pub fn tensor_to_images(t: &Tensor) -> Result<Vec<RgbImage>, Error> {
    let size = t.size();
    let (b, h, w) = (size[0], size[2], size[3]);
    let bytes = ((t.clamp(-1.0, 1.0) + 1.0) * 127.5)
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous()
        .to_device(tch::Device::Cpu)
        .view(-1);
    let bytes = Vec::<u8>::try_from(&bytes)?;
    let per = (h * w * 3) as usize;
    bytes
        .chunks_exact(per)
        .take(b as usize)
        .map(|c| {
            RgbImage::from_raw(w as u32, h as u32, c.to_vec())
                .ok_or_else(|| Error::Config("image buffer of the wrong size".into()))
        })
        .collect()
}

/// Peak signal-to-noise ratio of `b` against `a` (8-bit pixels) in dB, capped at 100 dB for
/// identical images.
pub fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let mse = mse(a, b);
    if mse <= 1e-10 {
        100.0
    } else {
        10.0 * (255.0f64 * 255.0 / mse).log10()
    }
}

/// Mean squared error between two images of 8-bit pixels.
pub fn mse(a: &RgbImage, b: &RgbImage) -> f64 {
    let n = a.as_raw().len().max(1) as f64;
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        / n
}

#[cfg(test)]
mod tests {
    use super::*;
    use potluck_data::shapes::Shapes;

    fn tiny() -> Config {
        Config {
            image_side: 16,
            downsample: 4,
            channels: 8,
            res_blocks: 1,
            codebook_size: 32,
            code_dim: 8,
            ..Config::default()
        }
    }

    fn batch(n: u64, side: u32) -> Vec<RgbImage> {
        let shapes = Shapes::new(side);
        (0..n).map(|i| shapes.sample(1, i).1).collect()
    }

    #[test]
    fn configs_are_checked() {
        assert!(
            Config {
                downsample: 3,
                ..tiny()
            }
            .validate()
            .is_err()
        );
        assert!(
            Config {
                image_side: 18,
                ..tiny()
            }
            .validate()
            .is_err()
        );
        assert!(
            Config {
                codebook_size: 1,
                ..tiny()
            }
            .validate()
            .is_err()
        );
        assert_eq!(Config::default().grid(), 8);
        assert_eq!(
            Config {
                downsample: 8,
                ..Config::default()
            }
            .grid(),
            4
        );
    }

    #[test]
    fn images_survive_the_tensor_round_trip() {
        let images = batch(3, 16);
        let t = images_to_tensor(&images, tch::Device::Cpu).unwrap();
        assert_eq!(t.size(), [3, 3, 16, 16]);
        assert_eq!(tensor_to_images(&t).unwrap(), images);
        assert_eq!(psnr(&images[0], &images[0]), 100.0);
    }

    #[test]
    fn training_lowers_the_error_and_uses_the_codebook() {
        tch::manual_seed(0);
        let mut vq = VqVae::new(tiny(), tch::Device::Cpu).unwrap();
        let mut opt = vq.optimizer(3e-3).unwrap();
        let x = images_to_tensor(&batch(16, 16), tch::Device::Cpu).unwrap();
        let first = vq.train_step(&mut opt, &x, true).unwrap();
        let mut last = first;
        for step in 1..60 {
            last = vq.train_step(&mut opt, &x, step % 10 == 0).unwrap();
        }
        assert!(last.recon < first.recon * 0.5, "{first:?} -> {last:?}");
        assert!(last.batch_usage > 0.1, "{last:?}");
        let codes = vq.encode(&x);
        assert_eq!(codes.size(), [16, 16]);
        assert_eq!(vq.decode(&codes).size(), [16, 3, 16, 16]);
    }

    #[test]
    fn save_then_load_gives_identical_codes_and_images() {
        tch::manual_seed(1);
        let mut vq = VqVae::new(tiny(), tch::Device::Cpu).unwrap();
        let mut opt = vq.optimizer(3e-3).unwrap();
        let x = images_to_tensor(&batch(8, 16), tch::Device::Cpu).unwrap();
        for step in 0..5 {
            vq.train_step(&mut opt, &x, step == 0).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vq.safetensors");
        vq.save(&path).unwrap();
        let loaded = VqVae::load(&path, tch::Device::Cpu).unwrap();
        assert_eq!(loaded.config(), vq.config());
        let codes = vq.encode(&x);
        assert!(codes.equal(&loaded.encode(&x)));
        assert!(vq.decode(&codes).equal(&loaded.decode(&codes)));
    }

    #[test]
    fn damaged_or_foreign_files_are_refused() {
        let vq = VqVae::new(tiny(), tch::Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vq.safetensors");
        vq.save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        assert!(VqVae::load(&path, tch::Device::Cpu).is_err());
        std::fs::write(&path, b"\x08\0\0\0\0\0\0\0{}      ").unwrap();
        assert!(VqVae::load(&path, tch::Device::Cpu).is_err());
        // Weights of another shape under a valid header.
        let other = VqVae::new(
            Config {
                channels: 4,
                ..tiny()
            },
            tch::Device::Cpu,
        )
        .unwrap();
        other.save(&path).unwrap();
        let (bytes, _) = store::read_metadata(&path).unwrap();
        assert!(store::load_into(&vq.vs, &bytes, &path).is_err());
    }
}
