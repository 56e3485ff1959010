use std::io::Cursor;
use std::path::Path;

use image::{Rgb, RgbImage, RgbaImage};

pub(crate) fn png(color: [u8; 3]) -> Vec<u8> {
    let image = RgbImage::from_pixel(8, 8, Rgb(color));
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    bytes
}

pub(crate) fn transparent_png() -> Vec<u8> {
    let image = RgbaImage::from_pixel(4, 4, image::Rgba([0, 0, 0, 0]));
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    bytes
}

pub(crate) fn jpeg(color: [u8; 3]) -> Vec<u8> {
    let image = RgbImage::from_pixel(8, 8, Rgb(color));
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Jpeg)
        .unwrap();
    bytes
}

/// A tar archive of (name, bytes) entries.
pub(crate) fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, *bytes).unwrap();
    }
    builder.into_inner().unwrap()
}

pub(crate) fn write(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(path, bytes).unwrap();
}
