//! Token shards: a data set encoded once by `potluck prepare` (text ids + image codes), so
//! training reads integers and never runs the image tokenizer.
//!
//! A prepared directory holds `data.json` (the [`Manifest`]) and shards
//! `tokens-NNNNN.safetensors`, each with two `U16` tensors, `text` `[n, text_len]` and `image`
//! `[n, image_tokens]` (PyTorch reads them with `safetensors.torch.load_file`). Readers check
//! every shard against the manifest before using it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::{Error, Order};
use potluck_core::file::{read_limited, write_atomic};

/// The format tag in manifests and shard metadata.
pub const FORMAT: &str = "potluck-tokens/1";
/// The manifest's file name in a prepared directory.
pub const MANIFEST: &str = "data.json";
/// Largest shard file we read.
const MAX_SHARD_BYTES: u64 = 2 << 30;
/// Largest manifest we read.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// What a prepared directory holds: how the data was encoded and where the shards are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// The data set it was made from, as named on the command line.
    pub dataset: String,
    /// The data seed used.
    pub seed: u64,
    /// Samples in all shards together.
    pub samples: u64,
    /// Text ids per sample (padded or truncated to this).
    pub text_len: usize,
    /// Text vocabulary size; every id is below it.
    pub vocab_size: usize,
    /// The padding id of the text.
    pub pad_id: u16,
    /// Image side in pixels that the image tokenizer takes.
    pub image_side: u32,
    /// The image-token grid, rows × columns.
    pub image_grid: [usize; 2],
    /// Codebook size of the image tokenizer; every code is below it.
    pub codebook_size: usize,
    /// The text tokenizer's file, relative to the directory.
    pub tokenizer: String,
    /// The image tokenizer's weights, relative to the directory.
    pub vqvae: String,
    /// The shards, in the order they were written.
    pub shards: Vec<ShardEntry>,
    /// How well the image tokenizer did, measured when it was made.
    #[serde(default)]
    pub quality: Option<Quality>,
}

/// Figures of the image tokenizer measured by `potluck prepare`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// Held-out images the figures are measured on.
    pub held_out: usize,
    /// Mean per-image PSNR of reconstructions, dB.
    pub psnr_db: f64,
    /// PSNR of the mean squared error over all held-out pixels, dB.
    pub psnr_pooled_db: f64,
    /// Fraction of codebook entries used by the encoded data set.
    pub codebook_usage: f64,
}

/// One shard in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub file: String,
    pub samples: u64,
}

impl Manifest {
    /// Image tokens per sample.
    pub fn image_tokens(&self) -> usize {
        self.image_grid[0] * self.image_grid[1]
    }

    /// Reads and checks `DIR/data.json`.
    pub fn load(dir: &Path) -> Result<Manifest, Error> {
        let path = dir.join(MANIFEST);
        let bytes = read_limited(&path, MAX_MANIFEST_BYTES).map_err(|e| {
            if e.is_not_found() {
                Error::Invalid(format!(
                    "{} has no {MANIFEST}: make one with `potluck prepare --out {}`",
                    dir.display(),
                    dir.display()
                ))
            } else {
                Error::File(e)
            }
        })?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let bad = |reason: String| Error::Format {
            path: path.clone(),
            reason,
        };
        if manifest.format != FORMAT {
            return Err(bad(format!(
                "format {:?}, expected {FORMAT:?}",
                manifest.format
            )));
        }
        if manifest.text_len == 0 || manifest.image_tokens() == 0 {
            return Err(bad("empty text or image token shape".into()));
        }
        if manifest.vocab_size > 1 << 16 || manifest.codebook_size > 1 << 16 {
            return Err(bad("vocabulary or codebook larger than 65,536".into()));
        }
        let total: u64 = manifest.shards.iter().map(|s| s.samples).sum();
        if total != manifest.samples {
            return Err(bad(format!(
                "shards hold {total} samples, header says {}",
                manifest.samples
            )));
        }
        for shard in &manifest.shards {
            if shard.file.contains('/') || shard.file.contains('\\') || shard.file.starts_with('.')
            {
                return Err(bad(format!(
                    "shard name {:?} leaves the directory",
                    shard.file
                )));
            }
        }
        Ok(manifest)
    }

    /// Writes `DIR/data.json` atomically.
    pub fn save(&self, dir: &Path) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(write_atomic(&dir.join(MANIFEST), &json)?)
    }
}

/// One encoded sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// `text_len` text ids.
    pub text: Vec<u16>,
    /// `image_tokens` image codes, row-major over the grid.
    pub image: Vec<u16>,
}

/// Writes rows into shards of at most `shard_samples` each.
#[derive(Debug)]
pub struct ShardWriter {
    dir: PathBuf,
    text_len: usize,
    image_tokens: usize,
    shard_samples: usize,
    text: Vec<u16>,
    image: Vec<u16>,
    written: Vec<ShardEntry>,
}

fn as_bytes(values: &[u16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl ShardWriter {
    /// A writer into `dir` (which must exist).
    pub fn new(
        dir: &Path,
        text_len: usize,
        image_tokens: usize,
        shard_samples: usize,
    ) -> ShardWriter {
        ShardWriter {
            dir: dir.to_path_buf(),
            text_len,
            image_tokens,
            shard_samples: shard_samples.max(1),
            text: Vec::new(),
            image: Vec::new(),
            written: Vec::new(),
        }
    }

    /// Adds one sample; writes a shard when one is full.
    pub fn push(&mut self, text: &[u16], image: &[u16]) -> Result<(), Error> {
        if text.len() != self.text_len || image.len() != self.image_tokens {
            return Err(Error::Invalid(format!(
                "row of {} text ids and {} image codes, expected {} and {}",
                text.len(),
                image.len(),
                self.text_len,
                self.image_tokens
            )));
        }
        self.text.extend_from_slice(text);
        self.image.extend_from_slice(image);
        if self.text.len() / self.text_len >= self.shard_samples {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Error> {
        let n = self.text.len() / self.text_len;
        if n == 0 {
            return Ok(());
        }
        let file = format!("tokens-{:05}.safetensors", self.written.len());
        let text = as_bytes(&self.text);
        let image = as_bytes(&self.image);
        let bad = |e: safetensors::SafeTensorError| Error::Invalid(e.to_string());
        let tensors = [
            (
                "text",
                TensorView::new(Dtype::U16, vec![n, self.text_len], &text).map_err(bad)?,
            ),
            (
                "image",
                TensorView::new(Dtype::U16, vec![n, self.image_tokens], &image).map_err(bad)?,
            ),
        ];
        let meta = HashMap::from([("format".to_owned(), FORMAT.to_owned())]);
        let bytes = safetensors::serialize(tensors, Some(meta)).map_err(bad)?;
        write_atomic(&self.dir.join(&file), &bytes)?;
        self.written.push(ShardEntry {
            file,
            samples: n as u64,
        });
        self.text.clear();
        self.image.clear();
        Ok(())
    }

    /// Writes the last, partial shard and returns all shards written.
    pub fn finish(mut self) -> Result<Vec<ShardEntry>, Error> {
        self.flush()?;
        Ok(self.written)
    }
}

/// A shard read into memory and checked against its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    text_len: usize,
    image_tokens: usize,
    text: Vec<u16>,
    image: Vec<u16>,
}

fn read_u16s(
    st: &SafeTensors<'_>,
    name: &str,
    rows: u64,
    cols: usize,
    bound: usize,
    path: &Path,
) -> Result<Vec<u16>, Error> {
    let bad = |reason: String| Error::Format {
        path: path.to_path_buf(),
        reason,
    };
    let view = st
        .tensor(name)
        .map_err(|e| bad(format!("tensor {name}: {e}")))?;
    if view.dtype() != Dtype::U16 || view.shape() != [rows as usize, cols] {
        return Err(bad(format!(
            "tensor {name} is {:?} {:?}, expected U16 [{rows}, {cols}]",
            view.dtype(),
            view.shape()
        )));
    }
    let values: Vec<u16> = view
        .data()
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    if let Some(v) = values.iter().find(|&&v| usize::from(v) >= bound) {
        return Err(bad(format!("tensor {name} holds {v}, not below {bound}")));
    }
    Ok(values)
}

impl Shard {
    /// Reads shard `entry` of a prepared directory and checks shapes and value ranges.
    pub fn load(dir: &Path, manifest: &Manifest, entry: &ShardEntry) -> Result<Shard, Error> {
        let path = dir.join(&entry.file);
        let bytes = read_limited(&path, MAX_SHARD_BYTES)?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let text = read_u16s(
            &st,
            "text",
            entry.samples,
            manifest.text_len,
            manifest.vocab_size,
            &path,
        )?;
        let image = read_u16s(
            &st,
            "image",
            entry.samples,
            manifest.image_tokens(),
            manifest.codebook_size,
            &path,
        )?;
        Ok(Shard {
            text_len: manifest.text_len,
            image_tokens: manifest.image_tokens(),
            text,
            image,
        })
    }

    /// Samples in the shard.
    pub fn len(&self) -> usize {
        self.text.len() / self.text_len
    }

    /// Whether the shard holds no samples.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Sample `i`.
    pub fn row(&self, i: usize) -> Row {
        Row {
            text: self.text[i * self.text_len..(i + 1) * self.text_len].to_vec(),
            image: self.image[i * self.image_tokens..(i + 1) * self.image_tokens].to_vec(),
        }
    }
}

/// A prepared directory, opened for reading.
#[derive(Debug, Clone)]
pub struct TokenSet {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl TokenSet {
    /// Opens a prepared directory (reads only the manifest).
    pub fn open(dir: &Path) -> Result<TokenSet, Error> {
        Ok(TokenSet {
            dir: dir.to_path_buf(),
            manifest: Manifest::load(dir)?,
        })
    }

    /// Loads every shard into memory, in manifest order.
    pub fn load_all(&self) -> Result<Vec<Shard>, Error> {
        self.manifest
            .shards
            .iter()
            .map(|entry| Shard::load(&self.dir, &self.manifest, entry))
            .collect()
    }

    /// Endless rows in this peer's order: pass `p` visits the shards in a permutation drawn for
    /// `(order, p)` and the rows of each shard in another; a shard that fails to load is an
    /// error item, so the caller decides whether to go on.
    pub fn rows(&self, order: Order) -> impl Iterator<Item = Result<Row, Error>> + Send + use<> {
        let this = self.clone();
        (0u64..).flat_map(move |pass| {
            let this = this.clone();
            let shards = order.permutation(this.manifest.shards.len(), 2 * pass);
            shards.into_iter().flat_map(move |s| {
                let entry = &this.manifest.shards[s];
                match Shard::load(&this.dir, &this.manifest, entry) {
                    Ok(shard) => {
                        let rows =
                            order.permutation(shard.len(), 2 * pass + 1 + ((s as u64) << 32));
                        Box::new(rows.into_iter().map(move |i| Ok(shard.row(i))))
                            as Box<dyn Iterator<Item = Result<Row, Error>> + Send>
                    }
                    Err(e) => Box::new(std::iter::once(Err(e))),
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(shards: Vec<ShardEntry>) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            dataset: "test".into(),
            seed: 0,
            samples: shards.iter().map(|s| s.samples).sum(),
            text_len: 3,
            vocab_size: 100,
            pad_id: 0,
            image_side: 8,
            image_grid: [2, 2],
            codebook_size: 16,
            tokenizer: "tokenizer.json".into(),
            vqvae: "vqvae.safetensors".into(),
            shards,
            quality: None,
        }
    }

    fn write(dir: &Path, n: u16) -> Manifest {
        let mut w = ShardWriter::new(dir, 3, 4, 4);
        for i in 0..n {
            w.push(&[i, i + 1, i + 2], &[i % 16, 1, 2, 3]).unwrap();
        }
        let m = manifest(w.finish().unwrap());
        m.save(dir).unwrap();
        m
    }

    #[test]
    fn shards_round_trip_and_every_pass_sees_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let m = write(dir.path(), 10);
        assert_eq!(
            m.shards.iter().map(|s| s.samples).collect::<Vec<_>>(),
            [4, 4, 2]
        );
        let set = TokenSet::open(dir.path()).unwrap();
        assert_eq!(set.manifest, m);
        let rows: Vec<Row> = set
            .rows(Order::new(0, 0))
            .take(20)
            .map(Result::unwrap)
            .collect();
        for pass in rows.chunks(10) {
            let mut firsts: Vec<u16> = pass.iter().map(|r| r.text[0]).collect();
            firsts.sort_unstable();
            assert_eq!(firsts, (0..10).collect::<Vec<_>>());
        }
        let other: Vec<Row> = set
            .rows(Order::new(0, 1))
            .take(10)
            .map(Result::unwrap)
            .collect();
        assert_ne!(&rows[..10], &other[..], "peers should differ");
    }

    #[test]
    fn out_of_range_values_and_wrong_shapes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = write(dir.path(), 4);
        m.codebook_size = 2; // codes 3 > bound
        assert!(Shard::load(dir.path(), &m, &m.shards[0]).is_err());
        let mut m = write(dir.path(), 4);
        m.text_len = 4;
        assert!(Shard::load(dir.path(), &m, &m.shards[0]).is_err());
    }

    #[test]
    fn garbage_shards_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let m = write(dir.path(), 4);
        let path = dir.path().join(&m.shards[0].file);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(Shard::load(dir.path(), &m, &m.shards[0]).is_err());
        std::fs::write(&path, [0xffu8; 16]).unwrap();
        assert!(Shard::load(dir.path(), &m, &m.shards[0]).is_err());
    }

    #[test]
    fn manifests_that_escape_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = write(dir.path(), 4);
        m.shards[0].file = "../etc/passwd".into();
        m.save(dir.path()).unwrap();
        assert!(TokenSet::open(dir.path()).is_err());
    }
}
