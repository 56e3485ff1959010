//! The text tokenizer: a byte-level BPE trained on the data set's captions (pure Rust,
//! `tokenizers`), saved as a Hugging Face `tokenizer.json`. Any `tokenizer.json` loads instead
//! (t5-small's, which the reference run used, for one). Every text becomes exactly `len` ids:
//! longer ones are truncated, shorter ones padded with the pad id.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::utils::padding::{PaddingDirection, PaddingParams, PaddingStrategy};
use tokenizers::utils::truncation::{TruncationDirection, TruncationParams, TruncationStrategy};
use tokenizers::{AddedToken, Tokenizer};

use crate::Error;

/// The padding token of tokenizers we train.
pub const PAD: &str = "<pad>";
/// Pad tokens we recognise in tokenizers we load.
const PAD_CANDIDATES: [&str; 4] = ["<pad>", "[PAD]", "<|pad|>", "<|endoftext|>"];
/// Largest `tokenizer.json` we read.
const MAX_FILE_BYTES: u64 = 64 << 20;

/// A tokenizer with a fixed output length.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    len: usize,
    pad_id: u32,
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl TextTokenizer {
    /// Trains a byte-level BPE of at most `vocab_size` ids (256 bytes, `<pad>`, merges) on
    /// `texts`.
    pub fn train<I, S>(texts: I, vocab_size: usize, len: usize) -> Result<TextTokenizer, Error>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if vocab_size > 1 << 16 {
            return Err(Error::Config(format!(
                "vocabulary of {vocab_size} is above 65,536"
            )));
        }
        let mut inner = Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(ByteLevel::default()));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let mut trainer: TrainerWrapper = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(PAD, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        inner.train(&mut trainer, texts).map_err(err)?;
        TextTokenizer::with_len(inner, len)
    }

    /// Loads any Hugging Face `tokenizer.json`, fixing its output to `len` ids.
    pub fn load(path: &Path, len: usize) -> Result<TextTokenizer, Error> {
        let bytes = potluck_core::file::read_limited(path, MAX_FILE_BYTES)?;
        let inner = Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        TextTokenizer::with_len(inner, len)
    }

    fn with_len(mut inner: Tokenizer, len: usize) -> Result<TextTokenizer, Error> {
        if len == 0 {
            return Err(Error::Config("text length must be at least 1".into()));
        }
        let vocab = inner.get_vocab_size(true);
        if vocab > 1 << 16 {
            return Err(Error::Config(format!(
                "the tokenizer has {vocab} ids; token shards hold ids below 65,536"
            )));
        }
        let (pad_id, pad_token) = match inner.get_padding() {
            Some(p) => (p.pad_id, p.pad_token.clone()),
            None => PAD_CANDIDATES
                .iter()
                .find_map(|t| inner.token_to_id(t).map(|id| (id, (*t).to_owned())))
                .ok_or_else(|| {
                    Error::Tokenizer(format!("no padding token (looked for {PAD_CANDIDATES:?})"))
                })?,
        };
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(len),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(err)?;
        Ok(TextTokenizer { inner, len, pad_id })
    }

    /// Writes the tokenizer as `tokenizer.json` (atomically).
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let json = self.inner.to_string(true).map_err(err)?;
        potluck_core::file::write_atomic(path, json.as_bytes())?;
        Ok(())
    }

    /// Exactly `len` ids for `text`.
    pub fn encode(&self, text: &str) -> Result<Vec<u16>, Error> {
        let encoding = self.inner.encode(text, true).map_err(err)?;
        let ids = encoding.get_ids();
        if ids.len() != self.len {
            return Err(Error::Tokenizer(format!(
                "{} ids, expected {}",
                ids.len(),
                self.len
            )));
        }
        // Every id is below the vocabulary size, which `with_len` bounded by 65,536.
        Ok(ids.iter().map(|&id| id as u16).collect())
    }

    /// The text of `ids`, padding dropped.
    pub fn decode(&self, ids: &[u16]) -> Result<String, Error> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|&id| u32::from(id))
            .filter(|&id| id != self.pad_id)
            .collect();
        let text = self.inner.decode(&ids, true).map_err(err)?;
        Ok(text.trim().to_owned())
    }

    /// How many ids there are (every id is below this).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The padding id.
    pub fn pad_id(&self) -> u16 {
        self.pad_id as u16
    }

    /// Ids per text.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether texts become no ids at all (never: the length is at least 1).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many ids `text` has before padding or truncation.
    pub fn natural_len(&self, text: &str) -> Result<usize, Error> {
        let mut plain = self.inner.clone();
        plain.with_padding(None);
        plain.with_truncation(None).map_err(err)?;
        Ok(plain.encode(text, true).map_err(err)?.get_ids().len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use potluck_data::shapes::Caption;

    fn shapes_tokenizer(len: usize) -> TextTokenizer {
        TextTokenizer::train(Caption::all().map(|c| c.to_string()), 512, len).unwrap()
    }

    #[test]
    fn captions_round_trip_at_fixed_length() {
        let tok = shapes_tokenizer(16);
        assert!(tok.vocab_size() <= 512);
        for caption in Caption::all() {
            let text = caption.to_string();
            let ids = tok.encode(&text).unwrap();
            assert_eq!(ids.len(), 16);
            assert!(tok.natural_len(&text).unwrap() <= 16, "{text} is truncated");
            assert_eq!(tok.decode(&ids).unwrap(), text);
        }
    }

    #[test]
    fn unseen_text_survives_byte_fallback_and_long_text_is_truncated() {
        let tok = shapes_tokenizer(8);
        let text = "a zebra, naïve café 🦓";
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids.len(), 8);
        let long = shapes_tokenizer(64);
        assert_eq!(long.decode(&long.encode(text).unwrap()).unwrap(), text);
        assert!(ids.iter().all(|&id| usize::from(id) < tok.vocab_size()));
    }

    #[test]
    fn save_and_load_give_the_same_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let tok = shapes_tokenizer(12);
        tok.save(&path).unwrap();
        let loaded = TextTokenizer::load(&path, 12).unwrap();
        for caption in Caption::all().take(50) {
            let text = caption.to_string();
            assert_eq!(tok.encode(&text).unwrap(), loaded.encode(&text).unwrap());
        }
        assert_eq!(loaded.pad_id(), tok.pad_id());
    }

    #[test]
    fn a_corrupt_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, b"{\"model\": 3").unwrap();
        assert!(TextTokenizer::load(&path, 8).is_err());
    }
}
