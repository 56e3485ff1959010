//! The records of a direct channel as a peer (or anyone on the path) may send them: lengths,
//! sealed bytes, tags, the end record. Either the input itself is the wire, or (first byte
//! odd) the rest is plaintext sealed into valid records by the writer and then altered at one
//! place, so the fuzzer reaches the opening of real records too.
#![no_main]

use futures::executor::block_on;
use futures::{AsyncReadExt, AsyncWriteExt};
use libfuzzer_sys::fuzz_target;
use potluck_net::direct::{Records, Writer};

const KEY: [u8; 32] = [3; 32];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let wire = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        // Plaintext in pieces of up to 255 bytes (a byte says each piece's length), each
        // flushed as its own record; then one byte of the wire flipped where `mode` says.
        let mut w = Writer::with_key(Vec::new(), &KEY).unwrap();
        let mut at = rest;
        while let Some((&n, tail)) = at.split_first() {
            let n = usize::from(n).min(tail.len());
            block_on(async {
                w.write_all(&tail[..n]).await.unwrap();
                w.flush().await.unwrap();
            });
            at = &tail[n..];
        }
        block_on(w.close()).unwrap();
        let mut wire = w.into_inner();
        if mode & 2 != 0 && !wire.is_empty() {
            let i = usize::from(mode >> 2) % wire.len();
            wire[i] ^= 0x80;
        }
        wire
    };
    let mut r = Records::with_key(&wire[..], &KEY).unwrap();
    let mut out = Vec::new();
    match block_on(r.read_to_end(&mut out)) {
        // Plaintext is never longer than what came in.
        Ok(_) => assert!(out.len() <= wire.len()),
        Err(_) => {}
    }
    if mode & 3 == 1 {
        // Unaltered records read back whole.
        assert!(block_on(async {
            let mut r = Records::with_key(&wire[..], &KEY).unwrap();
            let mut again = Vec::new();
            r.read_to_end(&mut again).await.map(|_| again.len())
        })
        .is_ok());
    }
});
