//! Choosing a data set by name, and the image handling every loader shares.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{ImageReader, Limits, RgbImage, imageops::FilterType};

use crate::emoji::Emoji;
use crate::shapes::Shapes;
use crate::webdataset::WebDataset;
use crate::{Error, Order, Sample, Skips};

/// Largest encoded image we read (bytes).
pub(crate) const MAX_IMAGE_BYTES: u64 = 32 << 20;
/// Largest decoded image we allocate (bytes of pixels), checked by the decoder before it
/// allocates.
const MAX_IMAGE_ALLOC: u64 = 256 << 20;
/// Largest caption file we read (bytes).
pub(crate) const MAX_CAPTION_BYTES: u64 = 64 << 10;

/// A data set, chosen by the name a user types: `shapes`, `emoji[:DIR]`, `webdataset:PATH`.
#[derive(Debug)]
pub enum Dataset {
    Shapes(Shapes),
    Emoji(Emoji),
    WebDataset(WebDataset),
}

impl Dataset {
    /// Parses a data set name without touching the disk; `emoji` alone means the emoji
    /// packages in `default_emoji_dir`.
    pub fn spec(name: &str, default_emoji_dir: &Path) -> Result<Spec, Error> {
        let (kind, arg) = match name.split_once(':') {
            Some((kind, arg)) => (kind, Some(arg)),
            None => (name, None),
        };
        match (kind, arg) {
            ("shapes", None) => Ok(Spec::Shapes),
            ("emoji", None) => Ok(Spec::Emoji(default_emoji_dir.to_path_buf())),
            ("emoji", Some(dir)) if !dir.is_empty() => Ok(Spec::Emoji(dir.into())),
            ("webdataset", Some(path)) if !path.is_empty() => Ok(Spec::WebDataset(path.into())),
            _ => Err(Error::UnknownDataset(name.to_owned())),
        }
    }

    /// Opens a data set; `side` is the image side that `shapes` renders at.
    pub fn open(spec: &Spec, side: u32, skips: &Skips) -> Result<Dataset, Error> {
        Ok(match spec {
            Spec::Shapes => Dataset::Shapes(Shapes::new(side)),
            Spec::Emoji(dir) => Dataset::Emoji(Emoji::open(dir, skips)?),
            Spec::WebDataset(path) => Dataset::WebDataset(WebDataset::open(path, skips)?),
        })
    }

    /// How many samples one pass holds, or `None` for an unbounded stream.
    pub fn len(&self) -> Option<usize> {
        match self {
            Dataset::Shapes(_) => None,
            Dataset::Emoji(emoji) => Some(emoji.len()),
            Dataset::WebDataset(web) => web.len_hint(),
        }
    }

    /// Whether a pass yields nothing at all.
    pub fn is_empty(&self) -> bool {
        self.len() == Some(0)
    }

    /// One pass over the data set in this peer's order (unbounded for `shapes`). Images come in
    /// their stored size; see [`fit_square`].
    pub fn stream<'a>(
        &'a self,
        order: &Order,
        skips: &Skips,
    ) -> Box<dyn Iterator<Item = Sample> + Send + 'a> {
        match self {
            Dataset::Shapes(shapes) => Box::new(shapes.stream(order)),
            Dataset::Emoji(emoji) => Box::new(emoji.stream(order, skips)),
            Dataset::WebDataset(web) => web.stream(order, skips),
        }
    }
}

/// A data set named on the command line, before it is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Shapes,
    /// The directory holding the emoji packages' `.tgz` files.
    Emoji(PathBuf),
    /// A `.tar` shard, a directory of shards, or a folder of images with `.txt` sidecars.
    WebDataset(PathBuf),
}

impl std::fmt::Display for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Spec::Shapes => f.write_str("shapes"),
            Spec::Emoji(dir) => write!(f, "emoji:{}", dir.display()),
            Spec::WebDataset(path) => write!(f, "webdataset:{}", path.display()),
        }
    }
}

/// Decodes PNG or JPEG bytes into RGB, with the decoder's allocation bounded first; transparent
/// pixels are composited over white.
pub(crate) fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, image::ImageError> {
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format()?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    limits.max_image_width = Some(16_384);
    limits.max_image_height = Some(16_384);
    reader.limits(limits);
    let image = reader.decode()?;
    if !image.color().has_alpha() {
        return Ok(image.into_rgb8());
    }
    let rgba = image.into_rgba8();
    let mut rgb = RgbImage::new(rgba.width(), rgba.height());
    for (out, px) in rgb.pixels_mut().zip(rgba.pixels()) {
        let alpha = u32::from(px.0[3]);
        for c in 0..3 {
            // over white: c·α + 255·(1 − α), rounded
            let v = u32::from(px.0[c]) * alpha + 255 * (255 - alpha);
            out.0[c] = ((v + 127) / 255) as u8;
        }
    }
    Ok(rgb)
}

/// Centre-crops an image to a square and resizes it to `side × side`.
pub fn fit_square(image: RgbImage, side: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    if w == side && h == side {
        return image;
    }
    let s = w.min(h);
    let cropped = if w == h {
        image
    } else {
        image::imageops::crop_imm(&image, (w - s) / 2, (h - s) / 2, s, s).to_image()
    };
    image::imageops::resize(&cropped, side, side, FilterType::Triangle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let d = Path::new("data/emoji");
        assert_eq!(Dataset::spec("shapes", d).unwrap(), Spec::Shapes);
        assert_eq!(Dataset::spec("emoji", d).unwrap(), Spec::Emoji(d.into()));
        assert_eq!(
            Dataset::spec("emoji:/x", d).unwrap(),
            Spec::Emoji("/x".into())
        );
        assert_eq!(
            Dataset::spec("webdataset:/a/b.tar", d).unwrap(),
            Spec::WebDataset("/a/b.tar".into())
        );
        for bad in [
            "",
            "shape",
            "webdataset",
            "webdataset:",
            "emoji:",
            "shapes:3",
        ] {
            assert!(Dataset::spec(bad, d).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn alpha_is_composited_over_white() {
        let mut rgba = image::RgbaImage::new(2, 1);
        rgba.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        rgba.put_pixel(1, 0, image::Rgba([255, 0, 0, 255]));
        let mut png = Vec::new();
        rgba.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let rgb = decode_rgb(&png).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [255, 0, 0]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_rgb(b"\x89PNG\r\n\x1a\nnot really").is_err());
        assert!(decode_rgb(&[]).is_err());
    }

    #[test]
    fn fit_square_crops_and_resizes() {
        let image = RgbImage::from_pixel(64, 48, image::Rgb([10, 20, 30]));
        let out = fit_square(image, 32);
        assert_eq!(out.dimensions(), (32, 32));
        assert_eq!(out.get_pixel(5, 5).0, [10, 20, 30]);
    }
}
