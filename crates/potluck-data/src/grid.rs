//! Putting images side by side: sample grids and original/reconstruction comparisons.

use image::{Rgb, RgbImage};

use crate::font;

/// Lays `images` out in rows of `columns`, each scaled by the whole factor `zoom` (nearest
/// neighbour, so pixels stay crisp), with a `gap`-pixel grey border between cells. Cells take
/// the size of the largest image.
pub fn grid(images: &[RgbImage], columns: usize, zoom: u32, gap: u32) -> RgbImage {
    let columns = columns.max(1);
    let rows = images.len().div_ceil(columns).max(1);
    let zoom = zoom.max(1);
    let cell_w = images.iter().map(RgbImage::width).max().unwrap_or(1) * zoom;
    let cell_h = images.iter().map(RgbImage::height).max().unwrap_or(1) * zoom;
    let width = columns as u32 * (cell_w + gap) + gap;
    let height = rows as u32 * (cell_h + gap) + gap;
    let mut out = RgbImage::from_pixel(width, height, Rgb([96, 96, 96]));
    for (i, image) in images.iter().enumerate() {
        let x0 = gap + (i % columns) as u32 * (cell_w + gap);
        let y0 = gap + (i / columns) as u32 * (cell_h + gap);
        for (x, y, p) in image.enumerate_pixels() {
            for dy in 0..zoom {
                for dx in 0..zoom {
                    out.put_pixel(x0 + x * zoom + dx, y0 + y * zoom + dy, *p);
                }
            }
        }
    }
    out
}

/// A grid like [`grid`] with each image's caption written under it (up to three lines).
pub fn captioned(images: &[RgbImage], captions: &[String], columns: usize, zoom: u32) -> RgbImage {
    let columns = columns.max(1);
    let zoom = zoom.max(1);
    let gap = 4;
    let cell_w = images.iter().map(RgbImage::width).max().unwrap_or(1) * zoom;
    let cell_h = images.iter().map(RgbImage::height).max().unwrap_or(1) * zoom;
    let per_line = (cell_w / (font::WIDTH + 1)).max(1) as usize;
    let text_h = 3 * (font::HEIGHT + 2) + 2;
    let rows = images.len().div_ceil(columns).max(1);
    let width = columns as u32 * (cell_w + gap) + gap;
    let height = rows as u32 * (cell_h + text_h + gap) + gap;
    let mut out = RgbImage::from_pixel(width, height, Rgb([40, 40, 40]));
    for (i, image) in images.iter().enumerate() {
        let x0 = gap + (i % columns) as u32 * (cell_w + gap);
        let y0 = gap + (i / columns) as u32 * (cell_h + text_h + gap);
        for (x, y, p) in image.enumerate_pixels() {
            for dy in 0..zoom {
                for dx in 0..zoom {
                    out.put_pixel(x0 + x * zoom + dx, y0 + y * zoom + dy, *p);
                }
            }
        }
        let caption = captions.get(i).map_or("", String::as_str);
        for (l, line) in font::wrap(caption, per_line).iter().take(3).enumerate() {
            let y = y0 + cell_h + 2 + l as u32 * (font::HEIGHT + 2);
            font::draw(&mut out, x0, y, line, Rgb([230, 230, 230]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_places_cells() {
        let a = RgbImage::from_pixel(2, 2, Rgb([255, 0, 0]));
        let b = RgbImage::from_pixel(2, 2, Rgb([0, 255, 0]));
        let g = grid(&[a, b.clone(), b], 2, 2, 1);
        assert_eq!(g.dimensions(), (2 * 5 + 1, 2 * 5 + 1));
        assert_eq!(g.get_pixel(1, 1).0, [255, 0, 0]);
        assert_eq!(g.get_pixel(4, 4).0, [255, 0, 0]);
        assert_eq!(g.get_pixel(6, 1).0, [0, 255, 0]);
        assert_eq!(g.get_pixel(1, 6).0, [0, 255, 0]);
        assert_eq!(g.get_pixel(6, 6).0, [96, 96, 96]);
    }
}
