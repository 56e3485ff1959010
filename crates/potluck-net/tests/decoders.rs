//! Proptest cases of the direct channels' record reader (the fuzz target `direct_records` runs
//! the same checks for longer): any bytes as the wire, and real records altered at one byte.

use futures::executor::block_on;
use futures::{AsyncReadExt, AsyncWriteExt};
use potluck_net::direct::{Records, Writer};
use proptest::prelude::*;

const KEY: [u8; 32] = [3; 32];

fn read_all(wire: &[u8]) -> Result<Vec<u8>, std::io::Error> {
    let mut r = Records::with_key(wire, &KEY).unwrap();
    let mut out = Vec::new();
    block_on(r.read_to_end(&mut out)).map(|_| out)
}

proptest! {
    #[test]
    fn any_wire_bytes_read_to_no_more_plaintext_than_came_in(
        wire in proptest::collection::vec(any::<u8>(), 0..4096),
    ) {
        if let Ok(out) = read_all(&wire) {
            prop_assert!(out.len() <= wire.len());
        }
    }

    #[test]
    fn real_records_read_back_whole_and_an_altered_byte_is_caught(
        pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
        flip in any::<usize>(),
    ) {
        let mut w = Writer::with_key(Vec::new(), &KEY).unwrap();
        for p in &pieces {
            block_on(async {
                w.write_all(p).await.unwrap();
                w.flush().await.unwrap();
            });
        }
        block_on(w.close()).unwrap();
        let wire = w.into_inner();
        prop_assert_eq!(read_all(&wire).unwrap(), pieces.concat());
        let mut altered = wire.clone();
        let at = flip % altered.len();
        altered[at] ^= 0x80;
        prop_assert!(read_all(&altered).map_or(true, |out| out != pieces.concat()));
    }
}
