//! Where each position may look: the attention masks of the layer patterns, and the rotary
//! position angles (1-D over the text, 2-D over the image grid).
//!
//! Position `p < T` holds text token `p`; position `T + k` holds image token `k` at grid cell
//! `(k / G, k % G)`. A query never sees a later position.

use super::config::{Attention, Tokens};

/// What sits at a sequence position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    Text(usize),
    Image { row: usize, col: usize },
}

pub(crate) fn slot(tokens: &Tokens, p: usize) -> Slot {
    if p < tokens.text_len {
        Slot::Text(p)
    } else {
        let k = p - tokens.text_len;
        Slot::Image {
            row: k / tokens.image_grid,
            col: k % tokens.image_grid,
        }
    }
}

/// Whether query position `q` may attend to key position `k` under `pattern`.
pub(crate) fn allowed(tokens: &Tokens, pattern: Attention, q: usize, k: usize) -> bool {
    if k > q {
        return false;
    }
    match (slot(tokens, q), slot(tokens, k)) {
        (_, Slot::Text(_)) => true,
        (Slot::Text(_), Slot::Image { .. }) => false,
        (Slot::Image { row: qr, col: qc }, Slot::Image { row: kr, col: kc }) => match pattern {
            Attention::Full => true,
            Attention::AxialRow => kr == qr,
            Attention::AxialCol => kc == qc,
            Attention::Conv(size) => {
                let h = size / 2;
                kr + h >= qr && kc + h >= qc && kc <= qc + h
            }
        },
    }
}

/// The `len × len` mask of `pattern`, row-major, `true` where attention is allowed.
pub(crate) fn mask(tokens: &Tokens, pattern: Attention, len: usize) -> Vec<bool> {
    let mut out = Vec::with_capacity(len * len);
    for q in 0..len {
        for k in 0..len {
            out.push(allowed(tokens, pattern, q, k));
        }
    }
    out
}

/// Rotary angles `[len, pairs]`: the head's rotation pairs are split in three groups, turned by
/// the text position (image tokens all sit at `T`, just after the text), by the grid row and by
/// the grid column (text tokens at 0, image rows and columns from 1).
pub(crate) fn rotary_angles(tokens: &Tokens, pairs: usize, len: usize) -> Vec<f32> {
    let axial = pairs / 3;
    let seq = pairs - 2 * axial;
    let freq = |i: usize, n: usize| -> f64 { 10_000f64.powf(-(i as f64) / n.max(1) as f64) };
    let mut out = Vec::with_capacity(len * pairs);
    for p in 0..len {
        let (s, r, c) = match slot(tokens, p) {
            Slot::Text(t) => (t, 0, 0),
            Slot::Image { row, col } => (tokens.text_len, row + 1, col + 1),
        };
        for i in 0..pairs {
            let angle = if i < seq {
                s as f64 * freq(i, seq)
            } else if i < seq + axial {
                r as f64 * freq(i - seq, axial)
            } else {
                c as f64 * freq(i - seq - axial, axial)
            };
            out.push(angle as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tokens(text_len: usize, grid: usize) -> Tokens {
        Tokens {
            text_len,
            text_vocab: 10,
            image_grid: grid,
            image_vocab: 10,
        }
    }

    fn pattern() -> impl Strategy<Value = Attention> {
        prop_oneof![
            Just(Attention::Full),
            Just(Attention::AxialRow),
            Just(Attention::AxialCol),
            (0usize..3).prop_map(|k| Attention::Conv(2 * k + 1)),
        ]
    }

    proptest! {
        #[test]
        fn no_position_sees_the_future_or_outside_its_pattern(
            text_len in 1usize..6,
            grid in 1usize..6,
            pattern in pattern(),
        ) {
            let t = tokens(text_len, grid);
            let len = t.seq_len();
            let m = mask(&t, pattern, len);
            for q in 0..len {
                // Everyone sees itself, so no row of the mask is empty.
                prop_assert!(m[q * len + q]);
                for k in 0..len {
                    let ok = m[q * len + k];
                    if k > q {
                        prop_assert!(!ok, "{q} sees the future {k}");
                        continue;
                    }
                    match (slot(&t, q), slot(&t, k)) {
                        (_, Slot::Text(_)) => prop_assert!(ok, "{q} must see text {k}"),
                        (Slot::Image { row: qr, col: qc }, Slot::Image { row: kr, col: kc }) => {
                            let inside = match pattern {
                                Attention::Full => true,
                                Attention::AxialRow => qr == kr,
                                Attention::AxialCol => qc == kc,
                                Attention::Conv(s) => {
                                    let h = (s / 2) as isize;
                                    let (dr, dc) = (qr as isize - kr as isize, qc as isize - kc as isize);
                                    (0..=h).contains(&dr) && dc.abs() <= h
                                }
                            };
                            prop_assert_eq!(ok, inside, "{} -> {} under {}", q, k, pattern);
                        }
                        (Slot::Text(_), Slot::Image { .. }) => unreachable!("k <= q"),
                    }
                }
            }
        }
    }

    #[test]
    fn axial_row_of_the_second_row_sees_its_row_and_the_text() {
        let t = tokens(2, 3);
        // Image token 4 = row 1, col 1 sits at position 6.
        let seen: Vec<usize> = (0..t.seq_len())
            .filter(|&k| allowed(&t, Attention::AxialRow, 6, k))
            .collect();
        assert_eq!(seen, [0, 1, 5, 6]);
        let seen: Vec<usize> = (0..t.seq_len())
            .filter(|&k| allowed(&t, Attention::AxialCol, 6, k))
            .collect();
        assert_eq!(seen, [0, 1, 3, 6]);
    }

    #[test]
    fn rotary_angles_follow_text_rows_and_columns() {
        let t = tokens(3, 2);
        let pairs = 6; // 2 text, 2 row, 2 column
        let a = rotary_angles(&t, pairs, t.seq_len());
        let at = |p: usize, i: usize| a[p * pairs + i];
        assert_eq!(at(2, 0), 2.0); // text position 2
        assert_eq!(at(2, 2), 0.0); // text has no row
        assert_eq!(at(3, 0), 3.0); // image tokens sit at T
        assert_eq!(at(4, 0), 3.0);
        assert_eq!(at(3, 2), 1.0); // image 0: row 0 -> 1
        assert_eq!(at(4, 4), 2.0); // image 1: column 1 -> 2
        assert_eq!(at(5, 2), 2.0); // image 2: row 1 -> 2
    }
}
