//! `/potluck/state/1` as a donor or a downloader may send it: the control messages and a
//! manifest, checked against the shape the receiver expects.
#![no_main]

use libfuzzer_sys::fuzz_target;
use potluck_train::optim::Precision;
use potluck_train::sync::{self, Request, Response, Shape};

fuzz_target!(|data: &[u8]| {
    if data.len() <= sync::MAX_CONTROL {
        let _ = postcard::from_bytes::<Request>(data);
        let _ = postcard::from_bytes::<Response>(data);
    }
    // First byte: the receiver's model (precision, size); the rest: the manifest.
    let [pick, manifest @ ..] = data else {
        return;
    };
    let numel = 1 + u64::from(*pick >> 1) * 997;
    let shape = match pick & 1 {
        0 => Shape {
            numel,
            precision: Precision::F32,
            scales: 0,
        },
        _ => Shape {
            numel,
            precision: Precision::Blockwise8,
            scales: 2 * numel.div_ceil(256),
        },
    };
    if let Ok(m) = sync::decode_manifest(manifest, &shape) {
        // What passes is what this peer can download: its size, sane chunks, a hash each.
        assert_eq!(m.total, shape.bytes());
        assert!(m.chunk > 0 && m.chunk as usize <= sync::MAX_CHUNK);
        assert_eq!(m.hashes.len() as u64, m.total.div_ceil(u64::from(m.chunk)));
    }
});
