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
//! Rounding to the nearest level is a table lookup on the top 17 bits of the float plus one
//! comparison: levels are more than a table cell (1/256 relative) apart.

use std::sync::OnceLock;

/// Values per quantization block.
pub const BLOCK: usize = 4096;

/// A quantization map: sorted magnitudes in [0, 1] and a lookup table from a float's top bits
/// to the largest level below it.
#[derive(Debug)]
pub struct Map {
    levels: Vec<f32>,
    /// `mid[c]`: halfway between level `c` and the next (+∞ after the last).
    mid: Vec<f32>,
    /// Per table cell: the level nearest to the cell's start.
    base: Vec<u8>,
    /// `base` followed by 3 bytes, so 4-byte vector gathers at any cell stay inside it.
    base_padded: Vec<u8>,
    signed: bool,
}

/// The first table cell: floats below 2⁻²⁷ (far below every map's first midpoint, 5·10⁻⁸)
/// all round to level 0, so the table starts there and stays small enough for the L1 cache.
const FIRST_CELL: usize = 100 << 8;

/// Index into the lookup table: the top 17 bits of a non-negative float ≤ 1 (sign, exponent
/// and 8 mantissa bits: cells 1/256 relative wide), counted from [`FIRST_CELL`].
fn table_index(x: f32) -> usize {
    ((x.to_bits() >> 15) as usize).saturating_sub(FIRST_CELL)
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
        let mut mid: Vec<f32> = levels.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        mid.push(f32::INFINITY);
        let top = table_index(1.0);
        let mut base = vec![0u8; top + 1];
        let mut c = 0usize;
        for (i, slot) in base.iter_mut().enumerate() {
            let start = f32::from_bits(((i + FIRST_CELL) as u32) << 15);
            while start > mid[c] {
                c += 1;
            }
            *slot = c as u8;
        }
        let mut base_padded = base.clone();
        base_padded.extend([0u8; 3]);
        Map {
            levels,
            mid,
            base,
            base_padded,
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

    /// Code of the level nearest to `m` ∈ [0, 1]: the table gives the level nearest to the
    /// start of `m`'s cell, and since levels (so midpoints) are more than a cell apart, at most
    /// one midpoint lies between: one comparison decides.
    #[inline(always)]
    fn nearest(&self, m: f32) -> usize {
        // `m` ≤ 1, so the index is in the table; the `min` only spares a bounds check.
        let c = usize::from(self.base[table_index(m).min(self.base.len() - 1)]);
        c + usize::from(m > self.mid[c.min(self.mid.len() - 1)])
    }

    /// Quantizes `values` (one block) into `codes` and returns the block's scale (absmax);
    /// `values` is overwritten with what the codes stand for, so the caller can go on with
    /// exactly the stored state without decoding it again.
    #[inline(always)]
    pub fn quantize(&self, values: &mut [f32], codes: &mut [u8]) -> f32 {
        const LANES: usize = 8;
        // Absolute maximum in eight lanes (vectorises; `f32::max` would keep it scalar).
        let mut lanes = [0f32; LANES];
        let whole = values.len() / LANES * LANES;
        for chunk in values[..whole].chunks_exact(LANES) {
            for i in 0..LANES {
                let a = chunk[i].abs();
                lanes[i] = if a > lanes[i] { a } else { lanes[i] };
            }
        }
        let mut absmax = lanes.iter().fold(0f32, |a, &b| if b > a { b } else { a });
        for &v in &values[whole..] {
            absmax = if v.abs() > absmax { v.abs() } else { absmax };
        }
        if !(absmax > 0.0 && absmax.is_finite()) {
            codes.fill(0);
            values.fill(0.0);
            return 0.0;
        }
        let inv = 1.0 / absmax;
        let n = values.len().min(codes.len());
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor has AVX2 (checked just above).
            done = unsafe { self.round_avx2(&mut values[..n], &mut codes[..n], absmax, inv) };
        }
        for (code, v) in codes[done..n].iter_mut().zip(values[done..n].iter_mut()) {
            (*code, *v) = self.round(*v, absmax, inv);
        }
        absmax
    }

    /// The code of `x` in a block of scale `absmax` (`inv` = 1 / absmax), and what it stands
    /// for.
    #[inline(always)]
    fn round(&self, x: f32, absmax: f32, inv: f32) -> (u8, f32) {
        let m = self.nearest((x.abs() * inv).min(1.0));
        let level = self.levels[m.min(self.levels.len() - 1)] * absmax;
        if self.signed {
            let negative = x < 0.0 && m > 0;
            (
                (m as u8) | (u8::from(negative) << 7),
                if negative { -level } else { level },
            )
        } else {
            (m as u8, level)
        }
    }

    /// [`Map::round`] eight values at a time with AVX2 gathers; returns how many values it did
    /// (a multiple of eight), the caller rounds the rest. Bit-for-bit the same results.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn round_avx2(&self, values: &mut [f32], codes: &mut [u8], absmax: f32, inv: f32) -> usize {
        use std::arch::x86_64::*;
        let n = values.len() / 8 * 8;
        // Table lookups read 4 bytes at a byte offset: the table is padded (see `build`).
        let base = self.base_padded.as_ptr().cast::<i32>();
        let top = (self.base.len() - 1) as i32;
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let inv = _mm256_set1_ps(inv);
        let scale = _mm256_set1_ps(absmax);
        let one = _mm256_set1_ps(1.0);
        let first = _mm256_set1_epi32(FIRST_CELL as i32);
        let zero = _mm256_setzero_si256();
        let topv = _mm256_set1_epi32(top);
        let low_byte = _mm256_set1_epi32(0xff);
        let last_level = _mm256_set1_epi32(self.levels.len() as i32 - 1);
        let mut out = [0i32; 8];
        for i in (0..n).step_by(8) {
            // SAFETY (all loads, gathers and stores below): `i + 8 <= n <= values.len()`;
            // gather indices are clamped into the tables (`base_padded` has 3 bytes of slack
            // for the 4-byte reads, `mid` and `levels` are indexed by codes below their
            // lengths).
            unsafe {
                let x = _mm256_loadu_ps(values.as_ptr().add(i));
                let m = _mm256_min_ps(_mm256_mul_ps(_mm256_and_ps(x, abs_mask), inv), one);
                let cell = _mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(m), 15), first);
                let cell = _mm256_min_epi32(_mm256_max_epi32(cell, zero), topv);
                let c = _mm256_and_si256(_mm256_i32gather_epi32::<1>(base, cell), low_byte);
                let mid = _mm256_i32gather_ps::<4>(self.mid.as_ptr(), c);
                let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(m, mid));
                let c = _mm256_min_epi32(_mm256_sub_epi32(c, up), last_level);
                let level = _mm256_mul_ps(_mm256_i32gather_ps::<4>(self.levels.as_ptr(), c), scale);
                let (code, value) = if self.signed {
                    let negative = _mm256_and_si256(
                        _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps())),
                        _mm256_cmpgt_epi32(c, zero),
                    );
                    let code =
                        _mm256_or_si256(c, _mm256_and_si256(negative, _mm256_set1_epi32(0x80)));
                    let sign = _mm256_and_si256(negative, _mm256_set1_epi32(i32::MIN));
                    (
                        code,
                        _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(level), sign)),
                    )
                } else {
                    (c, level)
                };
                _mm256_storeu_ps(values.as_mut_ptr().add(i), value);
                _mm256_storeu_si256(out.as_mut_ptr().cast(), code);
            }
            for (k, &code) in out.iter().enumerate() {
                codes[i + k] = code as u8;
            }
        }
        n
    }

    /// Turns `codes` of one block with scale `absmax` back into values (one table lookup
    /// per value: the block's 256 possible values are computed first).
    #[inline(always)]
    pub fn dequantize(&self, codes: &[u8], absmax: f32, values: &mut [f32]) {
        let mut table = [0f32; 256];
        for (code, t) in table.iter_mut().enumerate() {
            *t = if self.signed {
                let m = self.levels[code & 0x7f] * absmax;
                if code & 0x80 != 0 { -m } else { m }
            } else {
                self.levels[code] * absmax
            };
        }
        let n = values.len().min(codes.len());
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor has AVX2 (checked just above).
            done = unsafe { lookup_avx2(&table, &codes[..n], &mut values[..n]) };
        }
        for (v, &code) in values[done..n].iter_mut().zip(&codes[done..n]) {
            *v = table[usize::from(code)];
        }
    }
}

/// `values[i] = table[codes[i]]` eight at a time (AVX2 gathers); returns how many it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn lookup_avx2(table: &[f32; 256], codes: &[u8], values: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let n = codes.len().min(values.len()) / 8 * 8;
    for i in (0..n).step_by(8) {
        // SAFETY: `i + 8 <= n` bounds the 8-byte load and the 8-float store; codes index the
        // 256-entry table.
        unsafe {
            let bytes = _mm_loadl_epi64(codes.as_ptr().add(i).cast());
            let idx = _mm256_cvtepu8_epi32(bytes);
            let v = _mm256_i32gather_ps::<4>(table.as_ptr(), idx);
            _mm256_storeu_ps(values.as_mut_ptr().add(i), v);
        }
    }
    n
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
        // Everything below the table's first cell rounds to 0.
        for map in [Map::signed(), Map::unsigned()] {
            assert!(f32::from_bits((FIRST_CELL as u32) << 15) < map.mid[0]);
        }
        assert!((u[1] - 1e-7).abs() < 1e-13);
    }

    fn brute_nearest(levels: &[f32], m: f32) -> f32 {
        *levels
            .iter()
            .min_by(|a, b| (*a - m).abs().total_cmp(&(*b - m).abs()))
            .unwrap()
    }

    #[test]
    fn lookup_finds_the_nearest_level_around_every_midpoint() {
        for map in [Map::signed(), Map::unsigned()] {
            let mut probes: Vec<f32> = (0..=200_000)
                .map(|i| (i as f32 / 200_000.0).powi(3))
                .collect();
            for w in map.levels.windows(2) {
                let mid = (w[0] + w[1]) / 2.0;
                probes.extend([
                    mid,
                    f32::from_bits(mid.to_bits() + 1),
                    f32::from_bits(mid.to_bits() - 1),
                ]);
            }
            for m in probes {
                let got = map.levels[map.nearest(m)];
                let want = brute_nearest(&map.levels, m);
                // Equally near (a tie up to rounding) counts as nearest.
                assert!(
                    (got - m).abs() <= (want - m).abs() + f32::EPSILON * m,
                    "{m}: {got} vs {want}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn lookup_finds_the_nearest_level(m in 0.0f32..=1.0) {
            for map in [Map::signed(), Map::unsigned()] {
                let got = map.levels[map.nearest(m)];
                let want = brute_nearest(&map.levels, m);
                prop_assert!((got - m).abs() <= (want - m).abs() + f32::EPSILON * m);
            }
        }

        #[test]
        fn blocks_round_trip_within_the_level_spacing(
            values in proptest::collection::vec(-1e3f32..1e3, 1..200),
        ) {
            let map = Map::signed();
            let mut codes = vec![0u8; values.len()];
            let mut stored = values.clone();
            let absmax = map.quantize(&mut stored, &mut codes);
            let mut back = vec![0f32; values.len()];
            map.dequantize(&codes, absmax, &mut back);
            prop_assert_eq!(&stored, &back);
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
            let absmax = map.quantize(&mut values.clone(), &mut codes);
            let mut back = vec![0f32; values.len()];
            map.dequantize(&codes, absmax, &mut back);
            for (&v, &b) in values.iter().zip(&back) {
                let want = brute_nearest(&map.levels, v * (1.0 / absmax)) * absmax;
                // Nearest up to rounding: scaling by the block's absmax moves a tie by a few ulps.
                let slack = 4.0 * f32::EPSILON * absmax;
                prop_assert!((b - v).abs() <= (want - v).abs() + slack, "{} -> {} not {}", v, b, want);
            }
        }
    }

    #[test]
    fn the_vector_path_rounds_exactly_like_the_scalar_one() {
        // Values of every magnitude, both signs, around every midpoint.
        let mut values: Vec<f32> = (0..20_000)
            .map(|i| ((i as f32) * 0.618).sin() * 10f32.powi(-(i % 9)))
            .collect();
        for map in [Map::signed(), Map::unsigned()] {
            for w in map.levels.windows(2) {
                let mid = (w[0] + w[1]) / 2.0;
                values.extend([
                    mid,
                    -mid,
                    f32::from_bits(mid.to_bits() + 1),
                    f32::from_bits(mid.to_bits() - 1),
                ]);
            }
        }
        values.push(1.0);
        for map in [Map::signed(), Map::unsigned()] {
            let (absmax, inv) = (1.0f32, 1.0f32);
            for chunk in values.chunks(4096) {
                let scalar: Vec<(u8, f32)> =
                    chunk.iter().map(|&x| map.round(x, absmax, inv)).collect();
                let mut vals = chunk.to_vec();
                let mut codes = vec![0u8; chunk.len()];
                let mut done = 0;
                #[cfg(target_arch = "x86_64")]
                if std::is_x86_feature_detected!("avx2") {
                    done = unsafe { map.round_avx2(&mut vals, &mut codes, absmax, inv) };
                }
                for k in 0..done {
                    assert_eq!(
                        (codes[k], vals[k].to_bits()),
                        (scalar[k].0, scalar[k].1.to_bits()),
                        "{}",
                        chunk[k]
                    );
                }
            }
        }
    }

    #[test]
    fn zeros_and_non_finite_scales_do_not_panic() {
        let map = Map::signed();
        let mut codes = [0u8; 4];
        assert_eq!(map.quantize(&mut [0.0; 4], &mut codes), 0.0);
        assert_eq!(map.quantize(&mut [f32::NAN; 4], &mut codes), 0.0);
        let mut back = [1.0f32; 4];
        map.dequantize(&codes, 0.0, &mut back);
        assert_eq!(back, [0.0; 4]);
    }
}
