//! The other frames of `/potluck/allreduce/2` as a peer may send them: control messages
//! (hello, ack, via) and averaged-chunk results (weight, member bitmap, chunk).
#![no_main]

use libfuzzer_sys::fuzz_target;
use potluck_allreduce::butterfly;

fuzz_target!(|data: &[u8]| {
    let _ = butterfly::decode_control(data);
    // First byte: members; next two: values expected; the rest: the result frame.
    let [members, a, b, frame @ ..] = data else {
        return;
    };
    let members = usize::from(*members).max(1);
    let n = usize::from(u16::from_le_bytes([*a, *b]));
    let mut out = vec![1.5f32; n];
    match butterfly::parse_result(frame, members, &mut out) {
        Ok((weight, behind)) => {
            assert!(weight.is_finite() && weight >= 0.0);
            assert!(behind.iter().all(|&m| m < members));
        }
        // A refused frame leaves the values as they were.
        Err(_) => assert!(out.iter().all(|v| *v == 1.5)),
    }
});
