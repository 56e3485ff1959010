//! 8-bit blockwise quantization of optimizer state, in the manner of bitsandbytes' dynamic
//! quantization: each block of 4,096 values is scaled by its absolute maximum, then every value
//! is rounded to the nearest of 256 levels that are dense near zero and spread over decades, so
//! small moments keep their relative precision.
//!
//! Two maps, both written here: **signed** (first moments): a sign bit and 128 magnitudes, 0 and
//! seven decades `10^(e-6) · (0.1 + 0.9·(j+1)/2^e)` for `e = 0..7`, `j < 2^e` (2^e levels in
//! decade `e`; the largest is exactly 1); **unsigned** (second moments): 256 magnitudes, 0 and
//! eight decades `10^(e-7) · (0.1 + 0.9·(j+1)/2^e)`, `e = 0..8`.
//!
//! Rounding to the nearest level is a table lookup on the top 16 bits of the float plus two
//! comparisons: a table cell (1/128 relative wide) never holds more than two levels.

use std::sync::OnceLock;

/// Values per quantization block.
pub const BLOCK: usize = 4096;

/// A quantization map: sorted magnitudes in [0, 1] and a lookup table from a float's top bits
/// to the largest level below it.
#[derive(Debug)]
pub struct Map {
    levels: Vec<f32>,
    floor: Vec<u8>,
    signed: bool,
}

/// Index into the lookup table: the top 16 bits of a non-negative float ≤ 1.
fn table_index(x: f32) -> usize {
    (x.to_bits() >> 16) as usize
}

impl Map {
    fn build(decades: u32, signed: bool) -> Map {
        let mut levels = vec![0.0f32];
        for e in 0..decades {
            let scale = 10f64.powi(e as i32 - (decades as i32 - 1));
            let n = 1u32 << e;
            for j in 0..n {
                levels.push((scale * (0.1 + 0.9 * f64::from(j + 1) / f64::from(n))) as f32);
            }
        }
        // The largest level is exactly 1 so a block's absmax round-trips exactly.
        if let Some(last) = levels.last_mut() {
            *last = 1.0;
        }
        let top = table_index(1.0);
        let mut floor = vec![0u8; top + 1];
        let mut c = 0usize;
        for (i, slot) in floor.iter_mut().enumerate() {
            let start = f32::from_bits((i as u32) << 16);
            while c + 1 < levels.len() && levels[c + 1] <= start {
                c += 1;
            }
            *slot = c as u8;
        }
        Map {
            levels,
            floor,
            signed,
        }
    }

    /// The map for signed values (first moments).
    pub fn signed() -> &'static Map {
        static MAP: OnceLock<Map> = OnceLock::new();
        MAP.get_or_init(|| Map::build(7, true))
    }

    /// The map for non-negative values (second moments).
    pub fn unsigned() -> &'static Map {
        static MAP: OnceLock<Map> = OnceLock::new();
        MAP.get_or_init(|| Map::build(8, false))
    }

    /// The magnitude levels, ascending.
    pub fn levels(&self) -> &[f32] {
        &self.levels
    }

    /// Code of the level nearest to `m` ∈ [0, 1].
    #[inline]
    fn nearest(&self, m: f32) -> usize {
        let m = m.clamp(0.0, 1.0);
        let c = usize::from(self.floor[table_index(m)]);
        // The level above may still be below `m` (within the table cell), or nearer.
        let mut best = c;
        for cand in [c + 1, c + 2] {
            if let Some(&level) = self.levels.get(cand)
                && (level - m).abs() < (self.levels[best] - m).abs()
            {
                best = cand;
            }
        }
        best
    }

    /// Quantizes `values` (one block) into `codes`; returns the block's scale (absmax).
    pub fn quantize(&self, values: &[f32], codes: &mut [u8]) -> f32 {
        let absmax = values.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
        let inv = if absmax > 0.0 && absmax.is_finite() {
            1.0 / absmax
        } else {
            0.0
        };
        for (code, &v) in codes.iter_mut().zip(values) {
            let m = self.nearest(v.abs() * inv);
            *code = if self.signed {
                (m as u8) | if v < 0.0 && m > 0 { 0x80 } else { 0 }
            } else {
                m as u8
            };
        }
        absmax
    }

    /// Turns `codes` of one block with scale `absmax` back into values.
    pub fn dequantize(&self, codes: &[u8], absmax: f32, values: &mut [f32]) {
        for (v, &code) in values.iter_mut().zip(codes) {
            *v = if self.signed {
                let m = self.levels[usize::from(code & 0x7f)] * absmax;
                if code & 0x80 != 0 { -m } else { m }
            } else {
                self.levels[usize::from(code)] * absmax
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn maps_have_the_documented_levels() {
        let s = Map::signed().levels();
        let u = Map::unsigned().levels();
        assert_eq!(s.len(), 128);
        assert_eq!(u.len(), 256);
        for levels in [s, u] {
            assert_eq!(levels[0], 0.0);
            assert_eq!(*levels.last().unwrap(), 1.0);
            assert!(levels.windows(2).all(|w| w[0] < w[1]), "not ascending");
            // The lookup relies on a table cell (1/128 relative wide) holding at most two
            // levels: levels are never closer than 1/256 relative.
            assert!(
                levels[1..]
                    .windows(2)
                    .all(|w| (w[1] - w[0]) / w[1] > 1.0 / 256.0)
            );
        }
        assert!((s[1] - 1e-6).abs() < 1e-12);
        assert!((u[1] - 1e-7).abs() < 1e-13);
    }

    fn brute_nearest(levels: &[f32], m: f32) -> f32 {
        *levels
            .iter()
            .min_by(|a, b| (*a - m).abs().total_cmp(&(*b - m).abs()))
            .unwrap()
    }

    proptest! {
        #[test]
        fn lookup_finds_the_nearest_level(m in 0.0f32..=1.0) {
            for map in [Map::signed(), Map::unsigned()] {
                let got = map.levels[map.nearest(m)];
                let want = brute_nearest(&map.levels, m);
                prop_assert_eq!((got - m).abs(), (want - m).abs());
            }
        }

        #[test]
        fn blocks_round_trip_within_the_level_spacing(
            values in proptest::collection::vec(-1e3f32..1e3, 1..200),
        ) {
            let map = Map::signed();
            let mut codes = vec![0u8; values.len()];
            let absmax = map.quantize(&values, &mut codes);
            let mut back = vec![0f32; values.len()];
            map.dequantize(&codes, absmax, &mut back);
            for (&v, &b) in values.iter().zip(&back) {
                // Half the widest gap between levels (0.9/64 at the top) times the scale.
                prop_assert!((v - b).abs() <= absmax * 0.0071 + 1e-6, "{} -> {}", v, b);
                prop_assert!(v * b >= 0.0, "sign flipped: {} -> {}", v, b);
            }
            let max = values.iter().fold(0f32, |a, v| a.max(v.abs()));
            prop_assert!(back.iter().any(|b| b.abs() == max), "absmax not exact");
        }

        #[test]
        fn unsigned_blocks_round_to_the_nearest_level(
            values in proptest::collection::vec(0.0f32..1.0, 1..200),
        ) {
            let map = Map::unsigned();
            let mut codes = vec![0u8; values.len()];
            let absmax = map.quantize(&values, &mut codes);
            let mut back = vec![0f32; values.len()];
            map.dequantize(&codes, absmax, &mut back);
            for (&v, &b) in values.iter().zip(&back) {
                let want = brute_nearest(&map.levels, v * (1.0 / absmax)) * absmax;
                prop_assert!((b - want).abs() <= want * 1e-6, "{} -> {} not {}", v, b, want);
            }
        }
    }

    #[test]
    fn zeros_and_non_finite_scales_do_not_panic() {
        let map = Map::signed();
        let mut codes = [0u8; 4];
        assert_eq!(map.quantize(&[0.0; 4], &mut codes), 0.0);
        let mut back = [1.0f32; 4];
        map.dequantize(&codes, 0.0, &mut back);
        assert_eq!(back, [0.0; 4]);
    }
}
