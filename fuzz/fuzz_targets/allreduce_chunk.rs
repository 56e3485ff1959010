//! A compressed chunk of an all-reduce part as a peer may send it: the header (codec, count)
//! and the payload, decoded into a part of the size the receiver expects.
#![no_main]

use libfuzzer_sys::fuzz_target;
use potluck_allreduce::codec::{self, Codec};

fuzz_target!(|data: &[u8]| {
    // The first two bytes: how many values the receiver expects; the rest: the chunk.
    let Some((expect, chunk)) = data.split_first_chunk::<2>() else {
        return;
    };
    let n = usize::from(u16::from_le_bytes(*expect));
    let mut out = vec![0f32; n];
    if let Ok(codec) = codec::decode_into(chunk, &mut out) {
        assert_eq!(chunk.len(), codec.encoded_len(n));
        if codec == Codec::None {
            // Exact: encoding what came out gives the same bytes.
            let mut again = Vec::new();
            codec::encode(codec, &out, &mut again);
            assert_eq!(again, chunk);
        }
    }
});
