//! A 5×7 pixel font for captions under sample images (lower-case letters, digits and common
//! punctuation; anything else prints as `?`).

use image::{Rgb, RgbImage};

/// Glyph width and height in pixels; characters advance by `WIDTH + 1`.
pub const WIDTH: u32 = 5;
pub const HEIGHT: u32 = 7;

/// Rows of `#` (ink) and `.` (paper), top to bottom.
fn glyph(c: char) -> &'static str {
    match c.to_ascii_lowercase() {
        'a' => ".....|.....|.###.|....#|.####|#...#|.####",
        'b' => "#....|#....|####.|#...#|#...#|#...#|####.",
        'c' => ".....|.....|.####|#....|#....|#....|.####",
        'd' => "....#|....#|.####|#...#|#...#|#...#|.####",
        'e' => ".....|.....|.###.|#...#|#####|#....|.####",
        'f' => "..##.|.#...|####.|.#...|.#...|.#...|.#...",
        'g' => ".....|.####|#...#|#...#|.####|....#|.###.",
        'h' => "#....|#....|####.|#...#|#...#|#...#|#...#",
        'i' => "..#..|.....|.##..|..#..|..#..|..#..|.###.",
        'j' => "...#.|.....|..##.|...#.|...#.|#..#.|.##..",
        'k' => "#....|#....|#..#.|#.#..|##...|#.#..|#..#.",
        'l' => ".##..|..#..|..#..|..#..|..#..|..#..|.###.",
        'm' => ".....|.....|##.#.|#.#.#|#.#.#|#.#.#|#.#.#",
        'n' => ".....|.....|####.|#...#|#...#|#...#|#...#",
        'o' => ".....|.....|.###.|#...#|#...#|#...#|.###.",
        'p' => ".....|####.|#...#|#...#|####.|#....|#....",
        'q' => ".....|.####|#...#|#...#|.####|....#|....#",
        'r' => ".....|.....|#.##.|##...|#....|#....|#....",
        's' => ".....|.....|.####|#....|.###.|....#|####.",
        't' => ".#...|.#...|####.|.#...|.#...|.#..#|..##.",
        'u' => ".....|.....|#...#|#...#|#...#|#..##|.##.#",
        'v' => ".....|.....|#...#|#...#|#...#|.#.#.|..#..",
        'w' => ".....|.....|#...#|#.#.#|#.#.#|#.#.#|.#.#.",
        'x' => ".....|.....|#...#|.#.#.|..#..|.#.#.|#...#",
        'y' => ".....|#...#|#...#|#...#|.####|....#|.###.",
        'z' => ".....|.....|#####|...#.|..#..|.#...|#####",
        '0' => ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.",
        '1' => "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
        '2' => ".###.|#...#|....#|...#.|..#..|.#...|#####",
        '3' => "####.|....#|....#|.###.|....#|....#|####.",
        '4' => "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.",
        '5' => "#####|#....|####.|....#|....#|#...#|.###.",
        '6' => "..##.|.#...|#....|####.|#...#|#...#|.###.",
        '7' => "#####|....#|...#.|..#..|.#...|.#...|.#...",
        '8' => ".###.|#...#|#...#|.###.|#...#|#...#|.###.",
        '9' => ".###.|#...#|#...#|.####|....#|...#.|.##..",
        ' ' => ".....|.....|.....|.....|.....|.....|.....",
        ',' => ".....|.....|.....|.....|.##..|..#..|.#...",
        '.' => ".....|.....|.....|.....|.....|.##..|.##..",
        '-' => ".....|.....|.....|.###.|.....|.....|.....",
        '\'' => "..#..|..#..|.#...|.....|.....|.....|.....",
        ':' => ".....|.##..|.##..|.....|.##..|.##..|.....",
        '!' => "..#..|..#..|..#..|..#..|..#..|.....|..#..",
        '(' => "...#.|..#..|.#...|.#...|.#...|..#..|...#.",
        ')' => ".#...|..#..|...#.|...#.|...#.|..#..|.#...",
        '/' => "....#|....#|...#.|..#..|.#...|#....|#....",
        '&' => ".##..|#..#.|#.#..|.#...|#.#.#|#..#.|.##.#",
        _ => ".###.|#...#|....#|...#.|..#..|.....|..#..",
    }
}

/// Draws `text` with its top-left corner at (x, y), clipped to the image.
pub fn draw(image: &mut RgbImage, x: u32, y: u32, text: &str, color: Rgb<u8>) {
    for (i, c) in text.chars().enumerate() {
        let x0 = x + i as u32 * (WIDTH + 1);
        for (row, bits) in glyph(c).split('|').enumerate() {
            for (col, b) in bits.chars().enumerate() {
                let (px, py) = (x0 + col as u32, y + row as u32);
                if b == '#' && px < image.width() && py < image.height() {
                    image.put_pixel(px, py, color);
                }
            }
        }
    }
}

/// Splits `text` into lines of at most `width` characters at spaces (long words are cut).
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let mut word = word.to_owned();
        while word.chars().count() > width {
            if !line.is_empty() {
                lines.push(std::mem::take(&mut line));
            }
            let head: String = word.chars().take(width).collect();
            word = word.chars().skip(width).collect();
            lines.push(head);
        }
        let needed = line.chars().count() + usize::from(!line.is_empty()) + word.chars().count();
        if needed > width && !line.is_empty() {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_glyph_is_seven_rows_of_five() {
        for c in "abcdefghijklmnopqrstuvwxyz0123456789 ,.-':!()/&?é".chars() {
            let rows: Vec<&str> = glyph(c).split('|').collect();
            assert_eq!(rows.len(), HEIGHT as usize, "{c}");
            assert!(rows.iter().all(|r| r.len() == WIDTH as usize), "{c}");
        }
    }

    #[test]
    fn wrapping_keeps_words_and_width() {
        assert_eq!(
            wrap("a small red circle at the top left", 12),
            ["a small red", "circle at", "the top left"]
        );
        assert_eq!(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        assert!(wrap("", 5).is_empty());
    }

    #[test]
    fn drawing_inks_pixels_and_clips() {
        let mut image = RgbImage::new(8, 8);
        draw(&mut image, 0, 0, "l", Rgb([255, 255, 255]));
        assert_eq!(image.get_pixel(2, 3).0, [255, 255, 255]);
        assert_eq!(image.get_pixel(0, 3).0, [0, 0, 0]);
        draw(&mut image, 6, 6, "www", Rgb([255, 0, 0]));
    }
}
