//! `/potluck/dht/1` requests as a peer may send them: the frame decoder (length prefix, size
//! and count limits), then what a node does with records it is asked to store.
#![no_main]

use libfuzzer_sys::fuzz_target;
use potluck_net::dht::record::{self, Limits};
use potluck_net::dht::store::Store;
use potluck_net::dht::wire::{self, Request, RequestBody};

fuzz_target!(|frame: &[u8]| {
    let Ok(request) = Request::decode(frame) else {
        return;
    };
    // Whatever decodes re-encodes to a frame that decodes to the same request.
    let again = Request::decode(&wire::encode(&request)).expect("a re-encoded request decodes");
    assert_eq!(again, request);
    if let RequestBody::Store { records } | RequestBody::StoreNear { records, .. } = &request.body {
        let limits = Limits::default();
        let mut store = Store::new(1 << 20, limits);
        let now = record::now();
        for r in records {
            if record::check(r, now, &limits, &Default::default()).is_ok() {
                let _ = store.put(r, now);
            }
        }
        assert!(store.bytes() <= 1 << 20);
    }
});
