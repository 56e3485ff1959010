//! Proptest cases of the all-reduce's frame decoders (the fuzz target `allreduce_frames` runs
//! the same checks for longer): control messages and averaged-chunk results from a peer.

use potluck_allreduce::butterfly;
use proptest::prelude::*;

proptest! {
    #[test]
    fn any_frame_decodes_or_is_refused_and_a_refused_result_changes_nothing(
        data in proptest::collection::vec(any::<u8>(), 0..2048),
        members in 1usize..64,
        n in 0usize..1024,
    ) {
        let _ = butterfly::decode_control(&data);
        let mut out = vec![1.5f32; n];
        match butterfly::parse_result(&data, members, &mut out) {
            Ok((weight, behind)) => {
                prop_assert!(weight.is_finite() && weight >= 0.0);
                prop_assert!(behind.iter().all(|&m| m < members));
            }
            Err(_) => prop_assert!(out.iter().all(|v| *v == 1.5)),
        }
    }
}
