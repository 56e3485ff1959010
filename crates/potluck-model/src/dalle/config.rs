//! The transformer's shape: presets and the attention pattern of every layer.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// Which positions a layer's image queries attend to (text queries always attend causally to
/// the text before them, and every image query sees the whole text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Attention {
    /// Every earlier position.
    Full,
    /// Earlier image positions in the same row.
    AxialRow,
    /// Earlier image positions in the same column.
    AxialCol,
    /// Earlier image positions in the `k × k` window centred on the query (k odd).
    Conv(usize),
}

impl fmt::Display for Attention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attention::Full => f.write_str("full"),
            Attention::AxialRow => f.write_str("axial_row"),
            Attention::AxialCol => f.write_str("axial_col"),
            Attention::Conv(k) => write!(f, "conv{k}"),
        }
    }
}

impl FromStr for Attention {
    type Err = Error;

    fn from_str(s: &str) -> Result<Attention, Error> {
        match s {
            "full" => Ok(Attention::Full),
            "axial_row" => Ok(Attention::AxialRow),
            "axial_col" => Ok(Attention::AxialCol),
            _ => s
                .strip_prefix("conv")
                .and_then(|k| k.parse().ok())
                .filter(|k| k % 2 == 1)
                .map(Attention::Conv)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "unknown attention {s:?}: full, axial_row, axial_col or convK (K odd)"
                    ))
                }),
        }
    }
}

/// The shape of the text and image token sequences a model reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    /// Text ids per sample.
    pub text_len: usize,
    /// Text vocabulary size.
    pub text_vocab: usize,
    /// Side of the image-code grid.
    pub image_grid: usize,
    /// Image codebook size.
    pub image_vocab: usize,
}

impl Tokens {
    /// Image tokens per sample.
    pub fn image_len(&self) -> usize {
        self.image_grid * self.image_grid
    }

    /// Length of the model's input: every text token and every image token but the last (token
    /// `p` predicts token `p + 1`).
    pub fn seq_len(&self) -> usize {
        self.text_len + self.image_len() - 1
    }
}

/// A DALL-E-style decoder-only transformer over `[text tokens; image tokens]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// The preset's name, or `custom`.
    pub name: String,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Attention heads (`d_model / heads` per head).
    pub heads: usize,
    /// Layers; layer `i` runs unique block `i % blocks.len()` with its own LayerNorms.
    pub layers: usize,
    /// Attention pattern of each unique (weight-shared) block.
    pub blocks: Vec<Attention>,
    /// GEGLU hidden width as a multiple of `d_model`.
    pub ff_mult: usize,
    /// What the model reads.
    pub tokens: Tokens,
    /// Recompute each block's activations in the backward pass instead of keeping them.
    pub checkpointing: bool,
}

/// The reference run's text shape: t5-small's vocabulary, 256 tokens.
const REFERENCE_TOKENS: Tokens = Tokens {
    text_len: 256,
    text_vocab: 32_100,
    image_grid: 32,
    image_vocab: 8192,
};

/// Names of the presets, for help texts.
pub const PRESETS: [&str; 4] = ["tiny", "small", "gpt", "dalle-1.1b"];

impl Config {
    /// `tiny`: seconds per step, for tests; the token shapes are the data's.
    pub fn tiny(tokens: Tokens) -> Config {
        Config {
            name: "tiny".into(),
            d_model: 32,
            heads: 2,
            layers: 4,
            blocks: vec![
                Attention::Full,
                Attention::AxialRow,
                Attention::AxialCol,
                Attention::Conv(3),
            ],
            ff_mult: 2,
            tokens,
            checkpointing: false,
        }
    }

    /// `small`: the CPU demo, 8 layers on 4 unique blocks; the token shapes are the data's.
    pub fn small(tokens: Tokens) -> Config {
        Config {
            name: "small".into(),
            d_model: 256,
            heads: 8,
            layers: 8,
            blocks: vec![Attention::Full; 4],
            ff_mult: 4,
            tokens,
            checkpointing: false,
        }
    }

    /// `gpt`: the GPT-sized model of ANCHORS.md (8 layers, d 512, 8 heads, vocabulary 16,384,
    /// 64 text + 256 image tokens), no weight sharing: for speed comparisons.
    pub fn gpt() -> Config {
        Config {
            name: "gpt".into(),
            d_model: 512,
            heads: 8,
            layers: 8,
            blocks: vec![Attention::Full; 8],
            ff_mult: 4,
            tokens: Tokens {
                text_len: 64,
                text_vocab: 8192,
                image_grid: 16,
                image_vocab: 8192,
            },
            checkpointing: false,
        }
    }

    /// `dalle-1.1b`: the reference run, exactly: 64 layers on 4 axial + 1 conv-like unique
    /// blocks, with checkpointing.
    pub fn dalle_1_1b() -> Config {
        Config {
            name: "dalle-1.1b".into(),
            d_model: 1024,
            heads: 16,
            layers: 64,
            blocks: vec![
                Attention::AxialRow,
                Attention::AxialCol,
                Attention::AxialRow,
                Attention::AxialCol,
                Attention::Conv(5),
            ],
            ff_mult: 4,
            tokens: REFERENCE_TOKENS,
            checkpointing: true,
        }
    }

    /// A preset by name (see [`PRESETS`]). `tiny` and `small` take their token shapes from the
    /// data (`tokens`); `gpt` and `dalle-1.1b` have fixed shapes, and data must fit inside them.
    pub fn preset(name: &str, tokens: Option<Tokens>) -> Result<Config, Error> {
        let data = || {
            tokens.ok_or_else(|| {
                Error::Config(format!(
                    "preset {name} takes its token shapes from the data"
                ))
            })
        };
        let config = match name {
            "tiny" => Config::tiny(data()?),
            "small" => Config::small(data()?),
            "gpt" => Config::gpt(),
            "dalle-1.1b" => Config::dalle_1_1b(),
            _ => {
                return Err(Error::Config(format!(
                    "unknown model config {name:?}: one of {}",
                    PRESETS.join(", ")
                )));
            }
        };
        if let (Some(data), false) = (tokens, matches!(name, "tiny" | "small")) {
            let t = config.tokens;
            if data.text_len > t.text_len
                || data.text_vocab > t.text_vocab
                || data.image_grid != t.image_grid
                || data.image_vocab > t.image_vocab
            {
                return Err(Error::Config(format!(
                    "the data ({} text ids of {}, {}×{} image codes of {}) does not fit {name} \
                     ({} of {}, {}×{} of {})",
                    data.text_len,
                    data.text_vocab,
                    data.image_grid,
                    data.image_grid,
                    data.image_vocab,
                    t.text_len,
                    t.text_vocab,
                    t.image_grid,
                    t.image_grid,
                    t.image_vocab
                )));
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks that the shapes fit together.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        if self.heads == 0 || !self.d_model.is_multiple_of(self.heads) {
            return bad(format!(
                "d_model {} is not a multiple of {} heads",
                self.d_model, self.heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() < 6 {
            return bad(format!(
                "head width {} must be even and at least 6",
                self.head_dim()
            ));
        }
        if self.blocks.is_empty() || self.layers < self.blocks.len() {
            return bad(format!(
                "{} layers cannot use {} unique blocks",
                self.layers,
                self.blocks.len()
            ));
        }
        let t = &self.tokens;
        if t.text_len < 1 || t.image_grid < 1 || t.text_vocab < 1 || t.image_vocab < 1 {
            return bad("empty token shapes".into());
        }
        if self.ff_mult == 0 {
            return bad("ff_mult must be at least 1".into());
        }
        Ok(())
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.heads
    }

    /// The attention pattern of layer `i`.
    pub fn attention(&self, layer: usize) -> Attention {
        self.blocks[layer % self.blocks.len()]
    }

    /// Parameters stored (and sent over the network): shared blocks counted once.
    pub fn unique_params(&self) -> usize {
        let d = self.d_model;
        let vocab = self.tokens.text_vocab + self.tokens.image_vocab;
        vocab * d + self.blocks.len() * self.block_params() + self.layers * 4 * d + 2 * d
    }

    /// Parameters as if no block were shared.
    pub fn effective_params(&self) -> usize {
        let d = self.d_model;
        let vocab = self.tokens.text_vocab + self.tokens.image_vocab;
        vocab * d + self.layers * self.block_params() + self.layers * 4 * d + 2 * d
    }

    /// Parameters of one attention + feed-forward block.
    fn block_params(&self) -> usize {
        let d = self.d_model;
        let h = self.ff_mult * d;
        // qkv (no bias), output projection with bias, GEGLU in (2h) and out, with biases.
        3 * d * d + d * d + d + d * 2 * h + 2 * h + h * d + d
    }

    /// Multiply-accumulates of a forward pass per sample (matrix products only), for GFLOP/s.
    pub fn forward_macs(&self) -> f64 {
        let d = self.d_model as f64;
        let l = self.tokens.seq_len() as f64;
        let h = (self.ff_mult * self.d_model) as f64;
        let per_layer = l * (4.0 * d * d + 3.0 * d * h) + 2.0 * l * l * d;
        let t = self.tokens;
        let head = (t.text_len - 1) as f64 * t.text_vocab as f64 * d
            + t.image_len() as f64 * t.image_vocab as f64 * d;
        self.layers as f64 * per_layer + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_preset_has_the_reference_sizes() {
        let c = Config::dalle_1_1b();
        let unique = c.unique_params() as f64;
        let effective = c.effective_params() as f64;
        assert!((unique / 126e6 - 1.0).abs() < 0.03, "{unique}");
        assert!((effective / 1.1e9 - 1.0).abs() < 0.05, "{effective}");
        assert_eq!(c.tokens.seq_len(), 256 + 1024 - 1);
    }

    #[test]
    fn attention_names_round_trip() {
        for a in [
            Attention::Full,
            Attention::AxialRow,
            Attention::AxialCol,
            Attention::Conv(5),
        ] {
            assert_eq!(a.to_string().parse::<Attention>().unwrap(), a);
        }
        assert!("conv4".parse::<Attention>().is_err());
        assert!("sparse".parse::<Attention>().is_err());
    }

    #[test]
    fn data_must_fit_fixed_presets() {
        let small_data = Tokens {
            text_len: 8,
            text_vocab: 339,
            image_grid: 8,
            image_vocab: 512,
        };
        assert!(Config::preset("small", Some(small_data)).is_ok());
        assert!(Config::preset("dalle-1.1b", Some(small_data)).is_err());
        assert!(Config::preset("small", None).is_err());
        assert!(Config::preset("huge", None).is_err());
    }
}
