//! Scoring images against the `shapes` grammar: find the shape in an image and read off its
//! colour, kind, size and position, so generated images can be checked against their prompts.
//!
//! The detector keeps the largest connected blob of lit pixels (noise specks elsewhere do not
//! count), takes its colour as the nearest pure colour to its bright pixels' mean, its kind from
//! how much of its bounding box it fills (square ≈ 1, circle ≈ π/4, triangle ≈ ½), its size from
//! its extent and its position from its bounding box's centre.

use image::RgbImage;

use crate::shapes::{COLORS, Caption, Color, Position, Shape, Size};

/// What the detector read off an image; `None` where it found no shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detection {
    pub size: Size,
    pub color: Color,
    pub shape: Shape,
    pub position: Position,
}

/// Which slots of a caption an image got right.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Score {
    pub size: bool,
    pub color: bool,
    pub shape: bool,
    pub position: bool,
}

impl Score {
    /// Colour, shape and position all right (the headline accuracy).
    pub fn overall(&self) -> bool {
        self.color && self.shape && self.position
    }
}

/// A pixel counts as lit above this channel maximum.
const LIT: u8 = 64;

/// Finds the shape in `image`.
pub fn detect(image: &RgbImage) -> Option<Detection> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let lit: Vec<bool> = image
        .pixels()
        .map(|p| p.0.into_iter().max().unwrap_or(0) >= LIT)
        .collect();
    // Largest 4-connected blob.
    let mut label = vec![0u32; w * h];
    let mut best: Vec<usize> = Vec::new();
    let mut next = 1;
    for start in 0..w * h {
        if !lit[start] || label[start] != 0 {
            continue;
        }
        let mut blob = vec![start];
        label[start] = next;
        let mut i = 0;
        while i < blob.len() {
            let p = blob[i];
            let (x, y) = (p % w, p / w);
            let mut visit = |q: usize| {
                if lit[q] && label[q] == 0 {
                    label[q] = next;
                    blob.push(q);
                }
            };
            if x > 0 {
                visit(p - 1);
            }
            if x + 1 < w {
                visit(p + 1);
            }
            if y > 0 {
                visit(p - w);
            }
            if y + 1 < h {
                visit(p + w);
            }
            i += 1;
        }
        next += 1;
        if blob.len() > best.len() {
            best = blob;
        }
    }
    if best.len() < 4 {
        return None;
    }
    let pixel = |p: usize| image.get_pixel((p % w) as u32, (p / w) as u32).0;
    // Colour from the bright pixels (edges are darkened by anti-aliasing).
    let peak = best
        .iter()
        .map(|&p| pixel(p).into_iter().max().unwrap_or(0))
        .max()
        .unwrap_or(0);
    let bright: Vec<[u8; 3]> = best
        .iter()
        .map(|&p| pixel(p))
        .filter(|c| u32::from(c.iter().copied().max().unwrap_or(0)) * 4 >= u32::from(peak) * 3)
        .collect();
    let mut mean = [0f64; 3];
    for c in &bright {
        for k in 0..3 {
            mean[k] += f64::from(c[k]) / bright.len() as f64;
        }
    }
    let color = *COLORS.iter().min_by(|a, b| {
        let d = |c: &Color| -> f64 {
            let rgb = c.rgb();
            (0..3).map(|k| (mean[k] - f64::from(rgb[k])).powi(2)).sum()
        };
        d(a).total_cmp(&d(b))
    })?;
    // Coverage-weighted area, and extents from the most covered pixel of each row and column
    // (partly covered edge rows count partly, so the fill of a square comes out near 1).
    let full = f64::from(color.rgb().into_iter().max().unwrap_or(255).max(1));
    let mut area = 0.0;
    let mut rows = vec![0f64; h];
    let mut cols = vec![0f64; w];
    for &p in &best {
        let cover = (f64::from(pixel(p).into_iter().max().unwrap_or(0)) / full).min(1.0);
        area += cover;
        let (x, y) = (p % w, p / w);
        rows[y] = rows[y].max(cover);
        cols[x] = cols[x].max(cover);
    }
    let (bw, bh): (f64, f64) = (cols.iter().sum(), rows.iter().sum());
    if bw <= 0.0 || bh <= 0.0 {
        return None;
    }
    let centre = |profile: &[f64], total: f64| {
        profile
            .iter()
            .enumerate()
            .map(|(i, c)| c * (i as f64 + 0.5))
            .sum::<f64>()
            / total
    };
    let fill = area / (bw * bh);
    let shape = if fill > 0.89 {
        Shape::Square
    } else if fill > 0.64 {
        Shape::Circle
    } else {
        Shape::Triangle
    };
    let side = w.max(h) as f64;
    let size = if bw.max(bh) / side > 0.42 {
        Size::Large
    } else {
        Size::Small
    };
    let (cx, cy) = (centre(&cols, bw) / w as f64, centre(&rows, bh) / h as f64);
    let position = if (cx - 0.5).abs() < 0.125 && (cy - 0.5).abs() < 0.125 {
        Position::Center
    } else {
        match (cx < 0.5, cy < 0.5) {
            (true, true) => Position::TopLeft,
            (false, true) => Position::TopRight,
            (true, false) => Position::BottomLeft,
            (false, false) => Position::BottomRight,
        }
    };
    Some(Detection {
        size,
        color,
        shape,
        position,
    })
}

/// Scores an image against the caption it was drawn for.
pub fn score(caption: &Caption, image: &RgbImage) -> Score {
    match detect(image) {
        None => Score::default(),
        Some(d) => Score {
            size: d.size == caption.size,
            color: d.color == caption.color,
            shape: d.shape == caption.shape,
            position: d.position == caption.position,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::Shapes;

    #[test]
    fn reads_every_rendered_shape_right() {
        for side in [32, 64] {
            let shapes = Shapes::new(side);
            let n = 3000;
            let mut wrong = Vec::new();
            for i in 0..n {
                let (caption, image) = shapes.sample(11, i);
                let s = score(&caption, &image);
                if !(s.overall() && s.size) {
                    wrong.push((caption.to_string(), detect(&image)));
                }
            }
            assert!(
                wrong.is_empty(),
                "side {side}: {} wrong, e.g. {:?}",
                wrong.len(),
                &wrong[..wrong.len().min(5)]
            );
        }
    }

    #[test]
    fn blank_and_noisy_images_score_nothing_or_the_blob() {
        let blank = RgbImage::new(32, 32);
        assert_eq!(detect(&blank), None);
        let (caption, mut image) = Shapes::new(32).sample(2, 5);
        // A speck of noise far from the shape does not change the reading.
        let (x, y) = if caption.position == Position::TopLeft {
            (31, 31)
        } else {
            (0, 0)
        };
        image.put_pixel(x, y, image::Rgb([255, 255, 255]));
        assert!(score(&caption, &image).overall());
    }
}
