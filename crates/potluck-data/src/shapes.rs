//! `shapes`, the embedded default data set: one coloured shape on a black background, with a
//! caption in a fixed grammar that outside evaluators score generated images against:
//!
//! ```text
//! a {size} {color} {shape} {position}
//! ```
//!
//! Generated, so it needs no download, is deterministic for a seed and never runs out. Sample `i`
//! of a stream depends only on the stream's seed and `i`.

use std::fmt;
use std::str::FromStr;

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Order, Sample, mix_seed};

/// Slot values of the caption grammar, in the order they are listed in the spec.
pub const SIZES: [Size; 2] = [Size::Small, Size::Large];
/// All colours, with their pure RGB values in [`Color::rgb`].
pub const COLORS: [Color; 8] = [
    Color::Red,
    Color::Green,
    Color::Blue,
    Color::Yellow,
    Color::Purple,
    Color::Orange,
    Color::White,
    Color::Cyan,
];
/// All shapes.
pub const SHAPES: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];
/// All positions.
pub const POSITIONS: [Position; 5] = [
    Position::TopLeft,
    Position::TopRight,
    Position::BottomLeft,
    Position::BottomRight,
    Position::Center,
];

/// How large the shape is relative to the image side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Size {
    /// About a third of the side.
    Small,
    /// About half of the side.
    Large,
}

/// The shape's colour; always one of eight pure colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    White,
    Cyan,
}

/// The kind of shape. Triangles point up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

/// Where the shape's centre lies: in a quadrant, or in the middle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Position {
    TopLeft,
    TopRight,
    BottomLeft,
    BottomRight,
    Center,
}

impl Size {
    /// The words of this slot value in a caption.
    pub fn word(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }

    /// The shape's extent (bounding-box side) as a fraction of the image side.
    pub fn fraction(self) -> f32 {
        match self {
            Size::Small => 1.0 / 3.0,
            Size::Large => 0.5,
        }
    }
}

impl Color {
    /// The words of this slot value in a caption.
    pub fn word(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Orange => "orange",
            Color::White => "white",
            Color::Cyan => "cyan",
        }
    }

    /// The pure colour this name stands for.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [255, 0, 0],
            Color::Green => [0, 255, 0],
            Color::Blue => [0, 0, 255],
            Color::Yellow => [255, 255, 0],
            Color::Purple => [128, 0, 128],
            Color::Orange => [255, 165, 0],
            Color::White => [255, 255, 255],
            Color::Cyan => [0, 255, 255],
        }
    }
}

impl Shape {
    /// The words of this slot value in a caption.
    pub fn word(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

impl Position {
    /// The words of this slot value in a caption.
    pub fn words(self) -> &'static str {
        match self {
            Position::TopLeft => "at the top left",
            Position::TopRight => "at the top right",
            Position::BottomLeft => "at the bottom left",
            Position::BottomRight => "at the bottom right",
            Position::Center => "in the center",
        }
    }

    /// The nominal centre as fractions (x, y) of the image side; y grows downwards.
    pub fn anchor(self) -> (f32, f32) {
        match self {
            Position::TopLeft => (0.25, 0.25),
            Position::TopRight => (0.75, 0.25),
            Position::BottomLeft => (0.25, 0.75),
            Position::BottomRight => (0.75, 0.75),
            Position::Center => (0.5, 0.5),
        }
    }
}

/// One caption of the grammar: the four slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Caption {
    pub size: Size,
    pub color: Color,
    pub shape: Shape,
    pub position: Position,
}

impl Caption {
    /// Every caption of the grammar (2 × 8 × 3 × 5 = 240), in slot order.
    pub fn all() -> impl Iterator<Item = Caption> {
        SIZES.into_iter().flat_map(|size| {
            COLORS.into_iter().flat_map(move |color| {
                SHAPES.into_iter().flat_map(move |shape| {
                    POSITIONS.into_iter().map(move |position| Caption {
                        size,
                        color,
                        shape,
                        position,
                    })
                })
            })
        })
    }

    /// A caption drawn uniformly from the grammar.
    pub fn random(rng: &mut impl Rng) -> Caption {
        Caption {
            size: SIZES[rng.random_range(0..SIZES.len())],
            color: COLORS[rng.random_range(0..COLORS.len())],
            shape: SHAPES[rng.random_range(0..SHAPES.len())],
            position: POSITIONS[rng.random_range(0..POSITIONS.len())],
        }
    }
}

impl fmt::Display for Caption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a {} {} {} {}",
            self.size.word(),
            self.color.word(),
            self.shape.word(),
            self.position.words()
        )
    }
}

/// A caption that does not follow the grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a shapes caption (expected `a SIZE COLOR SHAPE POSITION`): {0:?}")]
pub struct ParseCaptionError(pub String);

impl FromStr for Caption {
    type Err = ParseCaptionError;

    fn from_str(s: &str) -> Result<Caption, ParseCaptionError> {
        let fail = || ParseCaptionError(s.to_owned());
        let words: Vec<&str> = s.split(' ').collect();
        let [a, size, color, shape, position @ ..] = words.as_slice() else {
            return Err(fail());
        };
        if *a != "a" {
            return Err(fail());
        }
        let size = SIZES
            .into_iter()
            .find(|v| v.word() == *size)
            .ok_or_else(fail)?;
        let color = COLORS
            .into_iter()
            .find(|v| v.word() == *color)
            .ok_or_else(fail)?;
        let shape = SHAPES
            .into_iter()
            .find(|v| v.word() == *shape)
            .ok_or_else(fail)?;
        let position = position.join(" ");
        let position = POSITIONS
            .into_iter()
            .find(|v| v.words() == position)
            .ok_or_else(fail)?;
        Ok(Caption {
            size,
            color,
            shape,
            position,
        })
    }
}

/// The `shapes` data set: an unbounded, deterministic stream of rendered captions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shapes {
    /// Side of the square image in pixels (default 32).
    pub side: u32,
}

impl Default for Shapes {
    fn default() -> Shapes {
        Shapes { side: 32 }
    }
}

impl Shapes {
    /// A data set of `side × side` images.
    pub fn new(side: u32) -> Shapes {
        Shapes { side }
    }

    /// Sample `index` of the stream with seed `seed`: its caption and its image.
    pub fn sample(&self, seed: u64, index: u64) -> (Caption, RgbImage) {
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, index));
        let caption = Caption::random(&mut rng);
        let image = render(&caption, self.side, &mut rng);
        (caption, image)
    }

    /// This peer's endless stream of samples: sample `i` is `sample(order.stream_seed(), i)`.
    pub fn stream(&self, order: &Order) -> impl Iterator<Item = Sample> + Send + use<> {
        let this = *self;
        let seed = order.stream_seed();
        (0u64..).map(move |i| {
            let (caption, image) = this.sample(seed, i);
            Sample {
                caption: caption.to_string(),
                image,
            }
        })
    }
}

/// Renders a caption: the shape's centre is the named anchor plus up to ±side/16 of jitter on
/// each axis, clamped so the whole shape stays inside. Edges are anti-aliased (4×4 samples per
/// pixel); inside, the colour is exactly the pure colour.
pub fn render(caption: &Caption, side: u32, rng: &mut impl Rng) -> RgbImage {
    let s = side as f32;
    let extent = caption.size.fraction() * s;
    let half = extent / 2.0;
    let jitter = s / 16.0;
    let (ax, ay) = caption.position.anchor();
    let cx = (ax * s + rng.random_range(-jitter..=jitter)).clamp(half, s - half);
    let cy = (ay * s + rng.random_range(-jitter..=jitter)).clamp(half, s - half);
    let inside = |x: f32, y: f32| -> bool {
        let (dx, dy) = (x - cx, y - cy);
        match caption.shape {
            Shape::Circle => dx * dx + dy * dy <= half * half,
            Shape::Square => dx.abs() <= half && dy.abs() <= half,
            Shape::Triangle => {
                // Apex at the top centre, base along the bottom edge of the bounding box.
                let depth = dy + half; // 0 at the apex, `extent` at the base
                (0.0..=extent).contains(&depth) && dx.abs() <= depth / 2.0
            }
        }
    };
    const SUB: u32 = 4;
    let rgb = caption.color.rgb();
    let mut image = RgbImage::new(side, side);
    for (px, py, pixel) in image.enumerate_pixels_mut() {
        let mut hits = 0u32;
        for sy in 0..SUB {
            for sx in 0..SUB {
                let x = px as f32 + (sx as f32 + 0.5) / SUB as f32;
                let y = py as f32 + (sy as f32 + 0.5) / SUB as f32;
                hits += u32::from(inside(x, y));
            }
        }
        let cover = hits as f32 / (SUB * SUB) as f32;
        *pixel = Rgb(rgb.map(|c| (f32::from(c) * cover).round() as u8));
    }
    image
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn grammar_has_240_distinct_captions_that_round_trip() {
        let all: Vec<Caption> = Caption::all().collect();
        assert_eq!(all.len(), 240);
        let texts: HashSet<String> = all.iter().map(ToString::to_string).collect();
        assert_eq!(texts.len(), 240);
        for caption in all {
            assert_eq!(caption.to_string().parse::<Caption>(), Ok(caption));
        }
    }

    #[test]
    fn bad_captions_are_refused() {
        for bad in [
            "",
            "a",
            "a small red circle",
            "a small red circle in the middle",
            "the small red circle in the center",
            "a tiny red circle in the center",
            "a small red circle in the center ",
            "a small magenta circle in the center",
        ] {
            assert!(bad.parse::<Caption>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn stream_is_deterministic_and_every_caption_parses_and_every_value_occurs() {
        let shapes = Shapes::default();
        let order = Order::new(7, 0);
        let a: Vec<Sample> = shapes.stream(&order).take(2000).collect();
        let b: Vec<Sample> = shapes.stream(&order).take(2000).collect();
        assert_eq!(a, b);
        let captions: Vec<Caption> = a.iter().map(|s| s.caption.parse().unwrap()).collect();
        for size in SIZES {
            assert!(
                captions.iter().any(|c| c.size == size),
                "{size:?} never drawn"
            );
        }
        for color in COLORS {
            assert!(
                captions.iter().any(|c| c.color == color),
                "{color:?} never drawn"
            );
        }
        for shape in SHAPES {
            assert!(
                captions.iter().any(|c| c.shape == shape),
                "{shape:?} never drawn"
            );
        }
        for position in POSITIONS {
            assert!(
                captions.iter().any(|c| c.position == position),
                "{position:?} never drawn"
            );
        }
    }

    #[test]
    fn image_matches_its_caption() {
        let shapes = Shapes::new(32);
        for i in 0..500 {
            let (caption, image) = shapes.sample(3, i);
            let rgb = caption.color.rgb();
            // Pixels are black or a shade of the pure colour; at least one is exactly it.
            let mut lit = 0.0f32;
            let (mut sx, mut sy) = (0.0f32, 0.0f32);
            let mut exact = false;
            for (x, y, p) in image.enumerate_pixels() {
                if p.0 == [0, 0, 0] {
                    continue;
                }
                exact |= p.0 == rgb;
                let w = f32::from(p.0.into_iter().max().unwrap())
                    / f32::from(rgb.into_iter().max().unwrap());
                lit += w;
                sx += w * (x as f32 + 0.5);
                sy += w * (y as f32 + 0.5);
            }
            assert!(exact, "{caption}: pure colour missing");
            let area = lit / (32.0 * 32.0);
            let extent = caption.size.fraction();
            let expected = match caption.shape {
                Shape::Circle => std::f32::consts::FRAC_PI_4,
                Shape::Square => 1.0,
                Shape::Triangle => 0.5,
            } * extent
                * extent;
            assert!(
                (area / expected - 1.0).abs() < 0.2,
                "{caption}: area {area} vs {expected}"
            );
            // The centroid lies in the named region (the triangle's centroid sits low).
            let (cx, cy) = (sx / lit / 32.0, sy / lit / 32.0);
            let (ax, ay) = caption.position.anchor();
            let tol = 0.125;
            assert!((cx - ax).abs() <= tol, "{caption}: centroid x {cx}");
            let dy = if caption.shape == Shape::Triangle {
                extent / 6.0
            } else {
                0.0
            };
            assert!((cy - dy - ay).abs() <= tol, "{caption}: centroid y {cy}");
        }
    }

    #[test]
    fn peers_get_different_streams() {
        let shapes = Shapes::default();
        let a: Vec<String> = shapes
            .stream(&Order::new(1, 0))
            .take(50)
            .map(|s| s.caption)
            .collect();
        let b: Vec<String> = shapes
            .stream(&Order::new(1, 1))
            .take(50)
            .map(|s| s.caption)
            .collect();
        assert_ne!(a, b);
    }
}
