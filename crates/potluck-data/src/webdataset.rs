//! How a real run brings its own data: WebDataset tar shards (`KEY.jpg|png` + `KEY.txt`, the
//! LAION / img2dataset convention) or a plain folder of images with `.txt` sidecars.
//!
//! Shards are streamed: a reader thread walks this peer's permutation of the shards and hands
//! samples over a bounded channel, then a shuffle buffer mixes them. A truncated shard ends that
//! shard (counted), not the pass.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, sync_channel};

use crate::source::{MAX_CAPTION_BYTES, MAX_IMAGE_BYTES, decode_rgb};
use crate::{Error, Order, Sample, ShuffleBuffer, SkipReason, Skips};

const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// A set of tar shards or a folder of captioned images.
#[derive(Debug)]
pub enum WebDataset {
    /// Tar shards, read in a per-peer order.
    Shards(Vec<PathBuf>),
    /// Image files paired with their caption files.
    Folder(Vec<(PathBuf, PathBuf)>),
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), Error> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

impl WebDataset {
    /// Opens `path`: a `.tar` file, a directory holding `.tar` shards, or else a folder (walked
    /// recursively) of images whose captions sit beside them as `NAME.txt`. Images without a
    /// caption file are skipped and counted here.
    pub fn open(path: &Path, skips: &Skips) -> Result<WebDataset, Error> {
        if path.is_file() {
            return Ok(WebDataset::Shards(vec![path.to_path_buf()]));
        }
        if !path.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: no such file or directory (expected a .tar shard, a directory of shards or \
                 a folder of images with .txt captions)",
                path.display()
            )));
        }
        let mut files = Vec::new();
        walk(path, &mut files)?;
        let shards: Vec<PathBuf> = files
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "tar"))
            .cloned()
            .collect();
        if !shards.is_empty() {
            return Ok(WebDataset::Shards(shards));
        }
        let mut pairs = Vec::new();
        for image in files.iter().filter(|p| is_image(p)) {
            let caption = image.with_extension("txt");
            if caption.is_file() {
                pairs.push((image.clone(), caption));
            } else {
                skips.skip(
                    SkipReason::MissingCaption,
                    image.display(),
                    "no .txt beside it",
                );
            }
        }
        if pairs.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: found no .tar shards and no images with .txt captions",
                path.display()
            )));
        }
        Ok(WebDataset::Folder(pairs))
    }

    /// The number of samples in a pass where it is known without reading the shards.
    pub fn len_hint(&self) -> Option<usize> {
        match self {
            WebDataset::Shards(_) => None,
            WebDataset::Folder(pairs) => Some(pairs.len()),
        }
    }

    /// One pass in this peer's order.
    pub fn stream(&self, order: &Order, skips: &Skips) -> Box<dyn Iterator<Item = Sample> + Send> {
        match self {
            WebDataset::Shards(shards) => {
                let shards: Vec<PathBuf> = order
                    .permutation(shards.len(), 0)
                    .into_iter()
                    .map(|i| shards[i].clone())
                    .collect();
                let samples = read_shards_in_background(shards, skips.clone());
                Box::new(ShuffleBuffer::new(
                    samples.into_iter(),
                    order.buffer,
                    order.rng(1),
                ))
            }
            WebDataset::Folder(pairs) => {
                let pairs: Vec<(PathBuf, PathBuf)> = order
                    .permutation(pairs.len(), 0)
                    .into_iter()
                    .map(|i| pairs[i].clone())
                    .collect();
                let skips = skips.clone();
                Box::new(
                    pairs
                        .into_iter()
                        .filter_map(move |(image, caption)| read_pair(&image, &caption, &skips)),
                )
            }
        }
    }
}

fn read_limited(path: &Path, limit: u64, skips: &Skips) -> Option<Vec<u8>> {
    let len = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) => {
            skips.skip(SkipReason::Unreadable, path.display(), e);
            return None;
        }
    };
    if len > limit {
        skips.skip(SkipReason::TooLarge, path.display(), format!("{len} bytes"));
        return None;
    }
    match std::fs::read(path) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            skips.skip(SkipReason::Unreadable, path.display(), e);
            None
        }
    }
}

fn read_pair(image: &Path, caption: &Path, skips: &Skips) -> Option<Sample> {
    let caption_bytes = read_limited(caption, MAX_CAPTION_BYTES, skips)?;
    let caption_text = String::from_utf8_lossy(&caption_bytes).trim().to_owned();
    if caption_text.is_empty() {
        skips.skip(
            SkipReason::MissingCaption,
            caption.display(),
            "empty caption",
        );
        return None;
    }
    let bytes = read_limited(image, MAX_IMAGE_BYTES, skips)?;
    match decode_rgb(&bytes) {
        Ok(image) => Some(Sample {
            caption: caption_text,
            image,
        }),
        Err(e) => {
            skips.skip(SkipReason::CorruptImage, image.display(), e);
            None
        }
    }
}

/// Samples read by a thread over a bounded channel; dropping the receiver stops the thread.
fn read_shards_in_background(shards: Vec<PathBuf>, skips: Skips) -> Receiver<Sample> {
    let (tx, rx) = sync_channel(64);
    std::thread::Builder::new()
        .name("webdataset".into())
        .spawn(move || {
            for shard in shards {
                let keep_going = read_shard(&shard, &skips, &mut |sample| tx.send(sample).is_ok());
                if !keep_going {
                    return;
                }
            }
        })
        .map_err(|e| tracing::error!("could not start the shard reader: {e}"))
        .ok();
    rx
}

/// The parts of one sample seen so far in a shard.
#[derive(Default)]
struct Group {
    key: String,
    image: Option<(String, Vec<u8>)>,
    caption: Option<Vec<u8>>,
}

impl Group {
    /// Turns a complete group into a sample; counts what is wrong with an incomplete one.
    fn finish(self, shard: &Path, skips: &Skips) -> Option<Sample> {
        if self.key.is_empty() {
            return None;
        }
        let what = || format!("{}:{}", shard.display(), self.key);
        let caption = self
            .caption
            .map(|c| String::from_utf8_lossy(&c).trim().to_owned())
            .filter(|c| !c.is_empty());
        let (Some((name, bytes)), Some(caption)) = (self.image, caption) else {
            skips.skip(
                SkipReason::MissingCaption,
                what(),
                "needs an image and a caption",
            );
            return None;
        };
        match decode_rgb(&bytes) {
            Ok(image) => Some(Sample { caption, image }),
            Err(e) => {
                skips.skip(
                    SkipReason::CorruptImage,
                    format!("{}:{name}", shard.display()),
                    e,
                );
                None
            }
        }
    }
}

/// Splits an entry name into (key, extension): the key is everything before the first dot of the
/// file name, as WebDataset does (`dir/000123.jpg` → `dir/000123`, `jpg`).
fn split_key(name: &str) -> Option<(&str, &str)> {
    let base_start = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[base_start..].find('.')? + base_start;
    Some((&name[..dot], &name[dot + 1..]))
}

/// Reads one shard, handing each sample to `emit`; returns false when `emit` asked to stop.
fn read_shard(path: &Path, skips: &Skips, emit: &mut dyn FnMut(Sample) -> bool) -> bool {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) => {
            skips.skip(SkipReason::Unreadable, path.display(), e);
            return true;
        }
    };
    let mut archive = tar::Archive::new(BufReader::new(file));
    let entries = match archive.entries() {
        Ok(entries) => entries,
        Err(e) => {
            skips.skip(SkipReason::TruncatedArchive, path.display(), e);
            return true;
        }
    };
    let mut group = Group::default();
    for entry in entries {
        let mut entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                skips.skip(SkipReason::TruncatedArchive, path.display(), e);
                return true;
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(e) => {
                skips.skip(SkipReason::Unreadable, path.display(), e);
                continue;
            }
        };
        let Some((key, ext)) = split_key(&name) else {
            continue;
        };
        let ext = ext.to_ascii_lowercase();
        let limit = match ext.as_str() {
            "txt" => MAX_CAPTION_BYTES,
            e if IMAGE_EXTENSIONS.contains(&e) => MAX_IMAGE_BYTES,
            _ => continue,
        };
        if key != group.key {
            let done = std::mem::take(&mut group);
            if let Some(sample) = done.finish(path, skips)
                && !emit(sample)
            {
                return false;
            }
            group.key = key.to_owned();
        }
        let size = entry.size();
        if size > limit {
            skips.skip(
                SkipReason::TooLarge,
                format!("{}:{name}", path.display()),
                size,
            );
            continue;
        }
        let mut bytes = Vec::with_capacity(size as usize);
        let read = entry.read_to_end(&mut bytes);
        if read.is_err() || bytes.len() as u64 != size {
            // The archive ends inside this entry: the group is lost with it.
            let detail = read.err().map_or_else(
                || format!("{name} has {} of its {size} bytes", bytes.len()),
                |e| e.to_string(),
            );
            skips.skip(SkipReason::TruncatedArchive, path.display(), detail);
            return true;
        }
        if ext == "txt" {
            group.caption = Some(bytes);
        } else {
            group.image = Some((name, bytes));
        }
    }
    match group.finish(path, skips) {
        Some(sample) => emit(sample),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_at_the_first_dot_of_the_file_name() {
        assert_eq!(split_key("000123.jpg"), Some(("000123", "jpg")));
        assert_eq!(
            split_key("a.b/000123.seg.png"),
            Some(("a.b/000123", "seg.png"))
        );
        assert_eq!(split_key("noext"), None);
    }
}
