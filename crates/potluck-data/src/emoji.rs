//! `emoji`: the real image–caption pairs of the npm packages `emoji-datasource-google` and
//! `emoji-datasource-twitter` (about 3,800 64×64 PNGs each, described in `emoji.json`).
//!
//! [`fetch`] downloads the two package tarballs with `npm pack` (the npm registry is the only
//! place they come from); [`Emoji::open`] reads them straight from the `.tgz` files, nothing is
//! extracted. The caption is the emoji's name in lower case, plus its skin tones where it has
//! any (`father christmas, medium-dark skin tone`); transparent pixels are composited over white.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::source::{MAX_IMAGE_BYTES, decode_rgb};
use crate::{Error, Order, Sample, SkipReason, Skips};

/// The packages and the version we read.
pub const PACKAGES: [&str; 2] = ["emoji-datasource-google", "emoji-datasource-twitter"];
/// The package version: its `emoji.json` layout is what [`Emoji::open`] expects.
pub const VERSION: &str = "16.0.0";

/// Largest package tarball we read (bytes, compressed).
const MAX_PACKAGE_BYTES: u64 = 512 << 20;
/// Largest `emoji.json` we parse.
const MAX_JSON_BYTES: u64 = 64 << 20;

/// The tarball `npm pack` writes for `package`.
pub fn tarball(dir: &Path, package: &str) -> PathBuf {
    dir.join(format!("{package}-{VERSION}.tgz"))
}

/// Whether both package tarballs are in `dir`.
pub fn is_fetched(dir: &Path) -> bool {
    PACKAGES.iter().all(|p| tarball(dir, p).is_file())
}

/// Downloads the missing package tarballs into `dir` with `npm pack NAME@VERSION`.
pub fn fetch(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for package in PACKAGES {
        if tarball(dir, package).is_file() {
            continue;
        }
        tracing::info!(
            "fetching {package}@{VERSION} with npm pack into {}",
            dir.display()
        );
        let status = Command::new("npm")
            .args(["pack", "--silent", &format!("{package}@{VERSION}")])
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| {
                Error::Invalid(format!(
                    "could not run `npm pack` to fetch {package} ({e}); install Node.js and npm, \
                     or put {} there yourself",
                    tarball(dir, package).display()
                ))
            })?;
        if !status.success() || !tarball(dir, package).is_file() {
            return Err(Error::Invalid(format!(
                "`npm pack {package}@{VERSION}` failed ({status}) in {}",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// The loaded emoji: one entry per image, with its caption and encoded PNG.
#[derive(Debug)]
pub struct Emoji {
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    caption: String,
    png: Vec<u8>,
}

#[derive(Debug, Deserialize)]
struct Record {
    name: Option<String>,
    image: String,
    #[serde(default)]
    skin_variations: HashMap<String, Variation>,
    #[serde(flatten)]
    vendors: HashMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Variation {
    image: String,
    #[serde(flatten)]
    vendors: HashMap<String, serde_json::Value>,
}

/// The words for one skin-tone modifier code point.
fn skin_tone(code: &str) -> Option<&'static str> {
    Some(match code.to_ascii_uppercase().as_str() {
        "1F3FB" => "light skin tone",
        "1F3FC" => "medium-light skin tone",
        "1F3FD" => "medium skin tone",
        "1F3FE" => "medium-dark skin tone",
        "1F3FF" => "dark skin tone",
        _ => return None,
    })
}

/// The caption of an emoji: its name in lower case, then its skin tones (`1F3FB-1F3FF` names
/// two people's tones).
pub fn caption(name: &str, tones: Option<&str>) -> String {
    let mut caption = name.to_lowercase();
    if let Some(tones) = tones {
        let words: Vec<&str> = tones.split('-').filter_map(skin_tone).collect();
        // The same tone twice (both people alike) is said once.
        let mut unique: Vec<&str> = Vec::new();
        for w in words {
            if !unique.contains(&w) {
                unique.push(w);
            }
        }
        for w in unique {
            caption.push_str(", ");
            caption.push_str(w);
        }
    }
    caption
}

/// What one package tarball holds that we need.
struct Package {
    vendor: String,
    records: Vec<Record>,
    images: HashMap<String, Vec<u8>>,
}

fn read_package(path: &Path, vendor: &str, skips: &Skips) -> Result<Package, Error> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() > MAX_PACKAGE_BYTES {
        return Err(Error::File(potluck_core::file::Error::TooLarge {
            path: path.into(),
            len: meta.len(),
            limit: MAX_PACKAGE_BYTES,
        }));
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let gz = flate2::read::GzDecoder::new(BufReader::new(file));
    let mut archive = tar::Archive::new(gz);
    let image_dir = format!("package/img/{vendor}/64/");
    let mut json: Option<Vec<u8>> = None;
    let mut images = HashMap::new();
    let entries = archive.entries().map_err(|e| Error::io(path, e))?;
    for entry in entries {
        let mut entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                skips.skip(SkipReason::TruncatedArchive, path.display(), e);
                break;
            }
        };
        let name = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(_) => continue,
        };
        let limit = if name == "package/emoji.json" {
            MAX_JSON_BYTES
        } else if name.starts_with(&image_dir) && name.ends_with(".png") {
            MAX_IMAGE_BYTES
        } else {
            continue;
        };
        let size = entry.size();
        if size > limit {
            skips.skip(SkipReason::TooLarge, &name, format!("{size} bytes"));
            continue;
        }
        let mut bytes = Vec::with_capacity(size as usize);
        if entry.read_to_end(&mut bytes).is_err() || bytes.len() as u64 != size {
            skips.skip(
                SkipReason::TruncatedArchive,
                path.display(),
                format!("inside {name}"),
            );
            break;
        }
        if limit == MAX_JSON_BYTES {
            json = Some(bytes);
        } else {
            let file = name[image_dir.len()..].to_owned();
            images.insert(file, bytes);
        }
    }
    let json = json.ok_or_else(|| {
        Error::Invalid(format!("{}: no package/emoji.json inside", path.display()))
    })?;
    let records: Vec<Record> = serde_json::from_slice(&json).map_err(|e| Error::Format {
        path: path.join("package/emoji.json"),
        reason: e.to_string(),
    })?;
    Ok(Package {
        vendor: vendor.to_owned(),
        records,
        images,
    })
}

impl Emoji {
    /// Reads both packages from `dir` (see [`fetch`]). Images missing from a package, or
    /// flagged as absent for its vendor, are skipped and counted.
    pub fn open(dir: &Path, skips: &Skips) -> Result<Emoji, Error> {
        if !is_fetched(dir) {
            return Err(Error::Invalid(format!(
                "the emoji packages are not in {}: run `potluck prepare --dataset emoji` (it \
                 fetches them with npm) or `npm pack {}@{VERSION}` there",
                dir.display(),
                PACKAGES[0]
            )));
        }
        let mut entries = Vec::new();
        for package in PACKAGES {
            let vendor = package.trim_start_matches("emoji-datasource-");
            let mut pkg = read_package(&tarball(dir, package), vendor, skips)?;
            let flag = format!("has_img_{}", pkg.vendor);
            let has = |v: &HashMap<String, serde_json::Value>| {
                v.get(&flag)
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false)
            };
            for record in std::mem::take(&mut pkg.records) {
                let Some(name) = record.name.as_deref().filter(|n| !n.trim().is_empty()) else {
                    skips.skip(SkipReason::MissingCaption, &record.image, "no name");
                    continue;
                };
                let mut wanted = Vec::new();
                if has(&record.vendors) {
                    wanted.push((caption(name, None), record.image.clone()));
                }
                let mut tones: Vec<(&String, &Variation)> = record.skin_variations.iter().collect();
                tones.sort_by(|a, b| a.0.cmp(b.0));
                for (tones, variation) in tones {
                    if has(&variation.vendors) {
                        wanted.push((caption(name, Some(tones)), variation.image.clone()));
                    }
                }
                for (caption, file) in wanted {
                    match pkg.images.remove(&file) {
                        Some(png) => entries.push(Entry { caption, png }),
                        None => skips.skip(
                            SkipReason::MissingCaption,
                            format!("{package}/{file}"),
                            "named in emoji.json but not in the package",
                        ),
                    }
                }
            }
        }
        if entries.is_empty() {
            return Err(Error::Invalid(format!(
                "no emoji images found in {}",
                dir.display()
            )));
        }
        Ok(Emoji { entries })
    }

    /// How many image–caption pairs there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// One pass over all pairs in this peer's order (a full permutation: everything is in
    /// memory). Images that fail to decode are skipped and counted.
    pub fn stream<'a>(
        &'a self,
        order: &Order,
        skips: &Skips,
    ) -> impl Iterator<Item = Sample> + Send + 'a {
        let skips = skips.clone();
        order
            .permutation(self.entries.len(), 0)
            .into_iter()
            .filter_map(move |i| {
                let entry = &self.entries[i];
                match decode_rgb(&entry.png) {
                    Ok(image) => Some(Sample {
                        caption: entry.caption.clone(),
                        image,
                    }),
                    Err(e) => {
                        skips.skip(SkipReason::CorruptImage, &entry.caption, e);
                        None
                    }
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_name_skin_tones() {
        assert_eq!(caption("FATHER CHRISTMAS", None), "father christmas");
        assert_eq!(
            caption("FATHER CHRISTMAS", Some("1F3FE")),
            "father christmas, medium-dark skin tone"
        );
        assert_eq!(
            caption("PEOPLE HOLDING HANDS", Some("1F3FB-1F3FF")),
            "people holding hands, light skin tone, dark skin tone"
        );
        assert_eq!(
            caption("KISS", Some("1F3FC-1F3FC")),
            "kiss, medium-light skin tone"
        );
    }

    #[test]
    fn open_on_an_empty_dir_says_how_to_fetch() {
        let dir = tempfile::tempdir().unwrap();
        let err = Emoji::open(dir.path(), &Skips::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("npm pack"), "{err}");
    }
}
