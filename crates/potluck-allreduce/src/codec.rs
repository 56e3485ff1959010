//! Per-chunk compression of `f32` values for the wire: none, fp16, bf16, 8-bit uniform (affine
//! over the chunk's range) and 8-bit blockwise (absmax per block of [`BLOCK`] values), with
//! optional error feedback.
//!
//! A chunk on the wire is `codec: u8`, `count: u32 LE`, then the codec's payload, whose size
//! follows from the two. [`decode_into`] checks the count against the caller's expectation and
//! the payload's exact size before it reads a value, and writes into the caller's buffer: bytes
//! from a peer never decide an allocation.

use std::ops::Range;

/// Values per block of [`Codec::Blockwise8`].
pub const BLOCK: usize = 256;

/// Bytes of a chunk's header.
pub const HEADER: usize = 5;

/// How a chunk's values are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// `f32` as they are (exact).
    None,
    /// IEEE half precision, round to nearest even; magnitudes past 65504 saturate.
    Fp16,
    /// bfloat16 (f32's exponent, 8 bits of mantissa), round to nearest even.
    Bf16,
    /// One byte per value on 256 even steps between the chunk's minimum and maximum.
    Uniform8,
    /// One signed byte per value, scaled by the absolute maximum of its block of [`BLOCK`].
    Blockwise8,
}

impl Codec {
    pub const ALL: [Codec; 5] = [
        Codec::None,
        Codec::Fp16,
        Codec::Bf16,
        Codec::Uniform8,
        Codec::Blockwise8,
    ];

    fn id(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Fp16 => 1,
            Codec::Bf16 => 2,
            Codec::Uniform8 => 3,
            Codec::Blockwise8 => 4,
        }
    }

    fn from_id(id: u8) -> Option<Codec> {
        Codec::ALL.into_iter().find(|c| c.id() == id)
    }

    /// Whether decoding gives back exactly what was encoded.
    pub fn is_exact(self) -> bool {
        self == Codec::None
    }

    /// Payload bytes for `n` values.
    pub fn payload_len(self, n: usize) -> usize {
        match self {
            Codec::None => 4 * n,
            Codec::Fp16 | Codec::Bf16 => 2 * n,
            Codec::Uniform8 => 8 + n,
            Codec::Blockwise8 => 4 * n.div_ceil(BLOCK) + n,
        }
    }

    /// Bytes on the wire for `n` values, header included.
    pub fn encoded_len(self, n: usize) -> usize {
        HEADER + self.payload_len(n)
    }

    /// The largest absolute error decoding may show on these (finite) values.
    pub fn max_error(self, values: &[f32]) -> f32 {
        let absmax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        match self {
            Codec::None => 0.0,
            // Half a unit in the last place, relative, plus half the smallest subnormal; past
            // the largest finite half, values saturate: no bound.
            Codec::Fp16 if absmax > F16_MAX => f32::INFINITY,
            Codec::Fp16 => absmax * 2f32.powi(-11) + 2f32.powi(-25),
            Codec::Bf16 => absmax * 2f32.powi(-8),
            Codec::Uniform8 => {
                let (lo, hi) = range(values);
                // Half a step, and f32 rounding of lo + q·step.
                (hi - lo) / 255.0 * 0.5 + absmax * 4.0 * f32::EPSILON
            }
            Codec::Blockwise8 => values
                .chunks(BLOCK)
                .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())))
                .fold(0f32, f32::max)
                .mul_add(0.5 / 127.0 + 2.0 * f32::EPSILON, 0.0),
        }
    }
}

impl std::str::FromStr for Codec {
    type Err = String;
    fn from_str(s: &str) -> Result<Codec, String> {
        match s {
            "none" => Ok(Codec::None),
            "fp16" => Ok(Codec::Fp16),
            "bf16" => Ok(Codec::Bf16),
            "uniform8" => Ok(Codec::Uniform8),
            "blockwise8" | "8bit" => Ok(Codec::Blockwise8),
            _ => Err(format!(
                "codec `{s}`: use none, fp16, bf16, uniform8 or blockwise8"
            )),
        }
    }
}

/// Which codec each stretch of the buffer travels in.
#[derive(Debug, Clone, PartialEq)]
pub struct CodecPlan {
    /// `(end, codec)`: values before `end` (and after the previous end) use `codec`.
    spans: Vec<(usize, Codec)>,
}

impl CodecPlan {
    /// One codec for everything.
    pub fn uniform(codec: Codec) -> CodecPlan {
        CodecPlan {
            spans: vec![(usize::MAX, codec)],
        }
    }

    /// As the reference run: tensors (given as consecutive lengths) under `threshold` values
    /// in `small` (fp16: norms, biases), the others in `large` (8-bit).
    pub fn by_size(lengths: &[usize], threshold: usize, small: Codec, large: Codec) -> CodecPlan {
        let mut spans: Vec<(usize, Codec)> = Vec::new();
        let mut end = 0;
        for &len in lengths {
            end += len;
            let codec = if len < threshold { small } else { large };
            match spans.last_mut() {
                Some((e, c)) if *c == codec => *e = end,
                _ => spans.push((end, codec)),
            }
        }
        spans.push((usize::MAX, large));
        CodecPlan { spans }
    }

    /// As the reference run, from a model's layout: norms, biases and tensors under
    /// `threshold` values in `small` (fp16), the others (weights, embeddings) in `large`
    /// (8-bit). Entries are taken in buffer order.
    pub fn for_layout(
        layout: &potluck_core::Layout,
        threshold: usize,
        small: Codec,
        large: Codec,
    ) -> CodecPlan {
        use potluck_core::Role;
        let mut entries: Vec<&potluck_core::Entry> = layout.entries().iter().collect();
        entries.sort_by_key(|e| e.offset);
        let mut spans: Vec<(usize, Codec)> = Vec::new();
        for e in entries {
            let codec = match e.role {
                Role::Norm | Role::Bias => small,
                _ if e.numel() < threshold => small,
                _ => large,
            };
            let end = e.offset + e.numel();
            match spans.last_mut() {
                Some((last, c)) if *c == codec => *last = end,
                _ => spans.push((end, codec)),
            }
        }
        spans.push((usize::MAX, large));
        CodecPlan { spans }
    }

    /// Whether every stretch travels exactly (nothing for error feedback to carry).
    pub fn is_exact(&self) -> bool {
        self.spans.iter().all(|(_, c)| c.is_exact())
    }

    /// The codec at `offset`, and where its stretch ends.
    pub(crate) fn at(&self, offset: usize) -> (Codec, usize) {
        let i = self.spans.partition_point(|(end, _)| *end <= offset);
        let (end, codec) = self.spans[i.min(self.spans.len() - 1)];
        (codec, end)
    }

    /// `range` cut into chunks of at most `chunk` values, none crossing a codec boundary.
    pub(crate) fn chunks(&self, range: Range<usize>, chunk: usize) -> Vec<(Range<usize>, Codec)> {
        let mut out = Vec::new();
        let mut at = range.start;
        while at < range.end {
            let (codec, end) = self.at(at);
            let stop = range.end.min(end).min(at + chunk.max(1));
            out.push((at..stop, codec));
            at = stop;
        }
        out
    }
}

/// Why a chunk did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("chunk of {len} bytes is shorter than its {HEADER}-byte header")]
    Short { len: usize },
    #[error("unknown codec {0}")]
    UnknownCodec(u8),
    #[error("chunk holds {got} values, {expected} expected")]
    Count { got: usize, expected: usize },
    #[error("chunk of {got} bytes, {expected} expected for its codec and count")]
    Length { got: usize, expected: usize },
    #[error("a chunk's scale is not finite")]
    BadScale,
}

/// Appends the chunk encoding `values` with `codec` to `out`.
pub fn encode(codec: Codec, values: &[f32], out: &mut Vec<u8>) {
    let n = values.len();
    assert!(
        u32::try_from(n).is_ok(),
        "a chunk holds at most 2^32 - 1 values"
    );
    out.reserve(codec.encoded_len(n));
    out.push(codec.id());
    out.extend_from_slice(&(n as u32).to_le_bytes());
    match codec {
        Codec::None => {
            let start = out.len();
            out.resize(start + 4 * n, 0);
            for (dst, v) in out[start..].chunks_exact_mut(4).zip(values) {
                dst.copy_from_slice(&v.to_le_bytes());
            }
        }
        Codec::Fp16 => {
            let start = out.len();
            out.resize(start + 2 * n, 0);
            for (dst, v) in out[start..].chunks_exact_mut(2).zip(values) {
                dst.copy_from_slice(&f32_to_f16(v.clamp(-F16_MAX, F16_MAX)).to_le_bytes());
            }
        }
        Codec::Bf16 => {
            let start = out.len();
            out.resize(start + 2 * n, 0);
            for (dst, v) in out[start..].chunks_exact_mut(2).zip(values) {
                dst.copy_from_slice(&f32_to_bf16(*v).to_le_bytes());
            }
        }
        Codec::Uniform8 => {
            let (lo, hi) = range(values);
            let step = if hi > lo { (hi - lo) / 255.0 } else { 0.0 };
            out.extend_from_slice(&lo.to_le_bytes());
            out.extend_from_slice(&step.to_le_bytes());
            let inv = if step > 0.0 { 1.0 / step } else { 0.0 };
            out.extend(
                values
                    .iter()
                    .map(|v| ((v - lo) * inv).round().clamp(0.0, 255.0) as u8),
            );
        }
        Codec::Blockwise8 => {
            let scales_at = out.len();
            out.resize(scales_at + 4 * n.div_ceil(BLOCK), 0);
            for (i, block) in values.chunks(BLOCK).enumerate() {
                let absmax = block
                    .iter()
                    .filter(|v| v.is_finite())
                    .fold(0f32, |m, v| m.max(v.abs()));
                out[scales_at + 4 * i..scales_at + 4 * i + 4]
                    .copy_from_slice(&absmax.to_le_bytes());
                let inv = if absmax > 0.0 { 127.0 / absmax } else { 0.0 };
                out.extend(
                    block
                        .iter()
                        .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8),
                );
            }
        }
    }
}

/// The codec and value count a chunk declares, its header checked against `len`.
pub fn peek(chunk: &[u8]) -> Result<(Codec, usize), Error> {
    if chunk.len() < HEADER {
        return Err(Error::Short { len: chunk.len() });
    }
    let codec = Codec::from_id(chunk[0]).ok_or(Error::UnknownCodec(chunk[0]))?;
    let n = u32::from_le_bytes([chunk[1], chunk[2], chunk[3], chunk[4]]) as usize;
    Ok((codec, n))
}

/// Decodes a chunk of exactly `out.len()` values into `out`; on error `out` is untouched.
pub fn decode_into(chunk: &[u8], out: &mut [f32]) -> Result<Codec, Error> {
    let (codec, n) = peek(chunk)?;
    if n != out.len() {
        return Err(Error::Count {
            got: n,
            expected: out.len(),
        });
    }
    let expected = codec.encoded_len(n);
    if chunk.len() != expected {
        return Err(Error::Length {
            got: chunk.len(),
            expected,
        });
    }
    let payload = &chunk[HEADER..];
    let f32_at = |b: &[u8], i: usize| f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    match codec {
        Codec::None => {
            for (o, b) in out.iter_mut().zip(payload.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Codec::Fp16 => {
            for (o, b) in out.iter_mut().zip(payload.chunks_exact(2)) {
                *o = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
            }
        }
        Codec::Bf16 => {
            for (o, b) in out.iter_mut().zip(payload.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
            }
        }
        Codec::Uniform8 => {
            let (lo, step) = (f32_at(payload, 0), f32_at(payload, 4));
            if !lo.is_finite() || !step.is_finite() || step < 0.0 {
                return Err(Error::BadScale);
            }
            for (o, q) in out.iter_mut().zip(&payload[8..]) {
                *o = lo + f32::from(*q) * step;
            }
        }
        Codec::Blockwise8 => {
            let blocks = n.div_ceil(BLOCK);
            let (scales, codes) = payload.split_at(4 * blocks);
            // Every scale checked before a value is written: on error `out` is untouched.
            if (0..blocks).any(|i| {
                let absmax = f32_at(scales, 4 * i);
                !absmax.is_finite() || absmax < 0.0
            }) {
                return Err(Error::BadScale);
            }
            for (i, (o, c)) in out.chunks_mut(BLOCK).zip(codes.chunks(BLOCK)).enumerate() {
                let scale = f32_at(scales, 4 * i) / 127.0;
                for (o, q) in o.iter_mut().zip(c) {
                    *o = f32::from(*q as i8) * scale;
                }
            }
        }
    }
    Ok(codec)
}

/// Error feedback: what lossy compression left out of one buffer is added to the next values
/// sent from it, so the error does not accumulate over rounds.
#[derive(Debug, Clone, Default)]
pub struct Feedback {
    residual: Vec<f32>,
}

impl Feedback {
    pub fn new(len: usize) -> Feedback {
        Feedback {
            residual: vec![0.0; len],
        }
    }

    /// Encodes `values` (the slice at `offset` of the buffer this feedback follows) plus the
    /// error left from last time, and keeps this time's error.
    pub fn encode(&mut self, codec: Codec, offset: usize, values: &[f32], out: &mut Vec<u8>) {
        let residual = &mut self.residual[offset..offset + values.len()];
        encode_with_feedback(codec, values, residual, out);
    }
}

/// Encodes `values + residual` and leaves in `residual` what this encoding left out.
pub fn encode_with_feedback(codec: Codec, values: &[f32], residual: &mut [f32], out: &mut Vec<u8>) {
    let corrected: Vec<f32> = values
        .iter()
        .zip(residual.iter())
        .map(|(v, r)| v + r)
        .collect();
    let start = out.len();
    encode(codec, &corrected, out);
    let mut sent = vec![0f32; values.len()];
    // Our own encoding always decodes.
    if decode_into(&out[start..], &mut sent).is_ok() {
        for ((r, c), s) in residual.iter_mut().zip(&corrected).zip(&sent) {
            *r = if (c - s).is_finite() { c - s } else { 0.0 };
        }
    }
}

/// The largest finite half-precision value.
const F16_MAX: f32 = 65504.0;

fn range(values: &[f32]) -> (f32, f32) {
    let finite = values.iter().filter(|v| v.is_finite());
    let lo = finite.clone().fold(f32::INFINITY, |m, v| m.min(*v));
    let hi = finite.fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    if lo > hi { (0.0, 0.0) } else { (lo, hi) }
}

/// f32 to IEEE half, round to nearest even (out-of-range magnitudes become infinities).
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let mut r = m >> shift;
        let rem = m & ((1 << shift) - 1);
        if rem > half || (rem == half && r & 1 == 1) {
            r += 1;
        }
        return sign | r as u16;
    }
    let mut h = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    // A carry out of the mantissa moves to the next binade (or to infinity): still right.
    if rem > 0x1000 || (rem == 0x1000 && h & 1 == 1) {
        h += 1;
    }
    sign | h as u16
}

/// IEEE half to f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    if exp == 0 {
        let v = man as f32 * 2f32.powi(-24);
        return if sign != 0 { -v } else { v };
    }
    let bits = if exp == 0x1f {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 127 - 15) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// f32 to bfloat16, round to nearest even (NaN stays NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(codec: Codec, values: &[f32]) -> Vec<f32> {
        let mut bytes = Vec::new();
        encode(codec, values, &mut bytes);
        assert_eq!(bytes.len(), codec.encoded_len(values.len()));
        let mut out = vec![f32::NAN; values.len()];
        assert_eq!(decode_into(&bytes, &mut out), Ok(codec));
        out
    }

    #[test]
    fn every_half_survives_the_trip_through_f32() {
        for h in 0..=u16::MAX {
            let x = f16_to_f32(h);
            if x.is_nan() {
                assert!(f16_to_f32(f32_to_f16(x)).is_nan());
            } else {
                assert_eq!(f32_to_f16(x), h, "{h:#06x} = {x}");
            }
        }
    }

    #[test]
    fn halves_round_to_nearest_even_at_ties() {
        // 1 + 2^-11 lies halfway between 1 and 1 + 2^-10: even (1) wins; 1 + 3·2^-11 lies
        // between 1 + 2^-10 and 1 + 2^-9: even (1 + 2^-9) wins.
        assert_eq!(f16_to_f32(f32_to_f16(1.0 + 2f32.powi(-11))), 1.0);
        assert_eq!(
            f16_to_f32(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11))),
            1.0 + 2f32.powi(-9)
        );
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), f32_to_bf16(1.0));
        assert_eq!(f16_to_f32(f32_to_f16(1e-8)), 0.0);
        assert_eq!(f16_to_f32(f32_to_f16(6e-8)), 2f32.powi(-24));
    }

    #[test]
    fn none_is_exact_and_extremes_are_kept_finite() {
        let values = [0.0, -0.0, 1.5, f32::MAX, f32::MIN_POSITIVE, -3.25e-30];
        assert_eq!(round_trip(Codec::None, &values), values);
        let big = round_trip(Codec::Fp16, &[1e9, -1e9]);
        assert_eq!(big, [65504.0, -65504.0]);
        // A NaN stays visible (the aggregation drops such contributions).
        assert!(round_trip(Codec::Fp16, &[f32::NAN])[0].is_nan());
        assert!(round_trip(Codec::Bf16, &[f32::NAN])[0].is_nan());
        assert_eq!(round_trip(Codec::Uniform8, &[2.0; 7]), [2.0; 7]);
        assert_eq!(round_trip(Codec::Blockwise8, &[0.0; 300]), [0.0; 300]);
    }

    #[test]
    fn bad_chunks_are_refused_before_reading_values() {
        let mut bytes = Vec::new();
        encode(Codec::Blockwise8, &[1.0; 1000], &mut bytes);
        let mut out = vec![0f32; 1000];
        assert!(matches!(
            decode_into(&bytes[..3], &mut out),
            Err(Error::Short { .. })
        ));
        assert!(matches!(
            decode_into(&bytes[..bytes.len() - 1], &mut out),
            Err(Error::Length { .. })
        ));
        assert!(matches!(
            decode_into(&bytes, &mut out[..999]),
            Err(Error::Count { .. })
        ));
        let mut bad = bytes.clone();
        bad[0] = 9;
        assert_eq!(decode_into(&bad, &mut out), Err(Error::UnknownCodec(9)));
        // A declared count of 4 billion values is refused by the count check alone.
        let mut huge = bytes.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_into(&huge, &mut out),
            Err(Error::Count { .. })
        ));
        // A bad scale in the last block: refused, and nothing written.
        let mut nan_scale = bytes;
        let last = HEADER + 4 * (1000usize.div_ceil(BLOCK) - 1);
        nan_scale[last..last + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        out.fill(7.0);
        assert_eq!(decode_into(&nan_scale, &mut out), Err(Error::BadScale));
        assert!(out.iter().all(|v| *v == 7.0));
    }

    #[test]
    fn error_feedback_keeps_the_sum_of_what_was_sent_close_to_the_truth() {
        // The same small gradient sent 100 times: without feedback 8-bit rounding biases the
        // sum; with it, the sum of what arrived stays within one round's error of the truth.
        let values: Vec<f32> = (0..1024)
            .map(|i| ((i * 37) % 101) as f32 * 1e-3 + 1e-4)
            .collect();
        let mut feedback = Feedback::new(values.len());
        let mut sum_fb = vec![0f64; values.len()];
        let mut sum_plain = vec![0f64; values.len()];
        let plain = round_trip(Codec::Blockwise8, &values);
        for _ in 0..100 {
            let mut bytes = Vec::new();
            feedback.encode(Codec::Blockwise8, 0, &values, &mut bytes);
            let mut got = vec![0f32; values.len()];
            decode_into(&bytes, &mut got).unwrap();
            for i in 0..values.len() {
                sum_fb[i] += f64::from(got[i]);
                sum_plain[i] += f64::from(plain[i]);
            }
        }
        let bound = f64::from(Codec::Blockwise8.max_error(&values)) * 2.0;
        let worst = |sum: &[f64]| {
            sum.iter()
                .zip(&values)
                .map(|(s, v)| (s - 100.0 * f64::from(*v)).abs())
                .fold(0f64, f64::max)
        };
        assert!(worst(&sum_fb) <= bound, "{} > {bound}", worst(&sum_fb));
        assert!(worst(&sum_plain) > 10.0 * bound);
    }

    #[test]
    fn plans_cut_chunks_at_codec_boundaries_and_follow_roles_and_sizes() {
        use potluck_core::{Layout, Role};
        let layout = Layout::new([
            ("emb", vec![1000, 8], Role::Embedding),
            ("norm", vec![8], Role::Norm),
            ("w", vec![8, 8], Role::Weight),
            ("big", vec![300, 10], Role::Weight),
        ])
        .unwrap();
        let plan = CodecPlan::for_layout(&layout, 100, Codec::Fp16, Codec::Blockwise8);
        assert_eq!(plan.at(0), (Codec::Blockwise8, 8000));
        assert_eq!(plan.at(8000), (Codec::Fp16, 8072));
        assert_eq!(plan.at(8071).0, Codec::Fp16);
        assert_eq!(plan.at(8072).0, Codec::Blockwise8);
        let chunks = plan.chunks(7990..8100, 50);
        let cut: Vec<(Range<usize>, Codec)> = vec![
            (7990..8000, Codec::Blockwise8),
            (8000..8050, Codec::Fp16),
            (8050..8072, Codec::Fp16),
            (8072..8100, Codec::Blockwise8),
        ];
        assert_eq!(chunks, cut);
        let sizes = CodecPlan::by_size(&[10, 1000, 5], 100, Codec::Fp16, Codec::Bf16);
        assert_eq!(sizes.at(0), (Codec::Fp16, 10));
        assert_eq!(sizes.at(10), (Codec::Bf16, 1010));
        assert_eq!(sizes.at(1012).0, Codec::Fp16);
        assert_eq!(CodecPlan::uniform(Codec::None).chunks(0..5, 2).len(), 3);
    }

    proptest! {
        #[test]
        fn decoding_stays_within_the_codecs_error_bound(
            values in prop::collection::vec(-1e4f32..1e4, 0..700),
            scale in -20i32..20,
        ) {
            let values: Vec<f32> = values.iter().map(|v| v * 2f32.powi(scale)).collect();
            for codec in Codec::ALL {
                let out = round_trip(codec, &values);
                let bound = codec.max_error(&values);
                for (v, o) in values.iter().zip(&out) {
                    prop_assert!((v - o).abs() <= bound, "{codec:?}: {v} -> {o}, bound {bound}");
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2000), n in 0usize..600) {
            let mut out = vec![0f32; n];
            let _ = decode_into(&bytes, &mut out);
        }
    }
}
