//! Proptest cases of the state download's decoders (the fuzz target `state_messages` runs the
//! same checks for longer): control messages and a manifest against the receiver's shape.

use potluck_train::optim::Precision;
use potluck_train::sync::{self, Request, Response, Shape};
use proptest::prelude::*;

proptest! {
    #[test]
    fn any_message_or_manifest_decodes_to_something_downloadable_or_is_refused(
        data in proptest::collection::vec(any::<u8>(), 0..4096),
        numel in 1u64..100_000,
        eight_bit in any::<bool>(),
    ) {
        if data.len() <= sync::MAX_CONTROL {
            let _ = postcard::from_bytes::<Request>(&data);
            let _ = postcard::from_bytes::<Response>(&data);
        }
        let shape = if eight_bit {
            Shape { numel, precision: Precision::Blockwise8, scales: 2 * numel.div_ceil(256) }
        } else {
            Shape { numel, precision: Precision::F32, scales: 0 }
        };
        if let Ok(m) = sync::decode_manifest(&data, &shape) {
            prop_assert_eq!(m.total, shape.bytes());
            prop_assert!(m.chunk > 0 && m.chunk as usize <= sync::MAX_CHUNK);
            prop_assert_eq!(m.hashes.len() as u64, m.total.div_ceil(u64::from(m.chunk)));
        }
    }
}
