//! The messages of `/potluck/tokenizers/1` as a peer may send them: a request or an answer
//! (postcard, bounded by `MAX_CONTROL`), and the sizes an answer announces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use potluck_train::tokenizers::{self, MAX_CONTROL, Request, Response};

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_CONTROL {
        return;
    }
    let _ = postcard::from_bytes::<Request>(data);
    if let Ok(Response::Files { text, image, .. }) = postcard::from_bytes::<Response>(data)
        && tokenizers::check_sizes(text, image).is_ok()
    {
        assert!(text <= tokenizers::MAX_TEXT as u64 && image <= tokenizers::MAX_IMAGE as u64);
    }
});
