//! The wire messages of `/potluck/allreduce/2`: the opener's [`Hello`], the reducer's [`Ack`],
//! and the result frame a reducer returns for every averaged chunk ([`result_frame`],
//! [`parse_result`]); their size limits. Wire I/O only: who opens what, and when, is [`super::send`]'s and
//! [`super::inbox`]'s business; the chunks themselves are [`crate::codec`]'s frames.

use potluck_net::direct;
use potluck_net::frame::read_message;
use serde::{Deserialize, Serialize};

use crate::codec::{self, Codec};

/// The protocol's name.
pub const PROTOCOL: &str = "/potluck/allreduce/2";

/// Largest control message (hello, ack).
const MAX_CONTROL: usize = 4096;

/// What the opener of a stream says first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Hello {
    pub(super) round: [u8; 32],
    /// The opener's index in the group.
    pub(super) sender: u32,
    /// Its weight (samples); 0 for one that only receives.
    pub(super) weight: f32,
    /// It can open a direct channel.
    pub(super) direct: bool,
}

/// The reducer's answer to a hello.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) enum Ack {
    Ok,
    Refused(String),
    /// Open a direct channel with this offer (then say which way on the stream, and read the
    /// final answer on the channel chosen: [`direct::choose`]).
    Direct(direct::Offer),
    /// The round ran here and is over (this member finished it or gave it up): no use waiting.
    Left,
}

/// Reads a control message (hello, ack), refusing one over [`MAX_CONTROL`] bytes.
pub(super) async fn read_control<T: for<'de> Deserialize<'de>>(
    r: &mut (impl futures::AsyncRead + Unpin),
) -> std::io::Result<T> {
    read_message(r, MAX_CONTROL).await
}

/// A result frame: the chunk's total weight (f64 LE), a bitmap of the members behind it, then
/// the encoded chunk.
pub(super) fn result_limit(members: usize, values: usize) -> usize {
    8 + members.div_ceil(8) + codec::HEADER + 4 * values
}

/// A result frame ([`result_limit`]) for a chunk of `values` encoded with `codec`, averaged
/// with total `weight` from the members `kept` of a group of `members`.
pub(super) fn result_frame(
    weight: f64,
    kept: &[usize],
    members: usize,
    codec: Codec,
    values: &[f32],
    residual: Option<&mut [f32]>,
) -> Vec<u8> {
    let mut bitmap = vec![0u8; members.div_ceil(8)];
    for &m in kept {
        bitmap[m / 8] |= 1 << (m % 8);
    }
    let mut frame = Vec::with_capacity(8 + bitmap.len() + codec.encoded_len(values.len()));
    frame.extend_from_slice(&weight.to_le_bytes());
    frame.extend_from_slice(&bitmap);
    match residual {
        Some(residual) => codec::encode_with_feedback(codec, values, residual, &mut frame),
        None => codec::encode(codec, values, &mut frame),
    }
    frame
}

/// Parses a result frame for a chunk of `out.len()` values in a group of `members`: the
/// chunk's total weight and the members behind it; the averaged values go into `out`
/// (untouched on error).
pub fn parse_result(
    frame: &[u8],
    members: usize,
    out: &mut [f32],
) -> Result<(f64, Vec<usize>), codec::Error> {
    let bitmap = members.div_ceil(8);
    if frame.len() < 8 + bitmap {
        return Err(codec::Error::Short { len: frame.len() });
    }
    let mut weight = [0u8; 8];
    weight.copy_from_slice(&frame[..8]);
    let weight = f64::from_le_bytes(weight);
    if !(weight.is_finite() && weight >= 0.0) {
        return Err(codec::Error::BadScale);
    }
    let bits = &frame[8..8 + bitmap];
    let behind = (0..members)
        .filter(|m| bits[m / 8] & (1 << (m % 8)) != 0)
        .collect();
    codec::decode_into(&frame[8 + bitmap..], out)?;
    Ok((weight, behind))
}

/// Decodes the control messages of `/potluck/allreduce/2` (hello, ack, and the choice of
/// channel) from bytes, as a reducer and an opener do; for fuzzing.
#[doc(hidden)]
pub fn decode_control(bytes: &[u8]) -> [bool; 3] {
    [
        postcard::from_bytes::<Hello>(bytes).is_ok(),
        postcard::from_bytes::<Ack>(bytes).is_ok(),
        postcard::from_bytes::<direct::Via>(bytes).is_ok(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_frame_parses_back_to_its_weight_members_and_values() {
        let values = [1.0f32, -2.5, 3.25];
        let frame = result_frame(6.5, &[0, 2, 9], 10, Codec::None, &values, None);
        assert!(frame.len() <= result_limit(10, values.len()));
        let mut out = [0f32; 3];
        let (weight, behind) = parse_result(&frame, 10, &mut out).unwrap();
        assert_eq!(weight, 6.5);
        assert_eq!(behind, vec![0, 2, 9]);
        assert_eq!(out, values);
    }
}
