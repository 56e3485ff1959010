//! `/potluck/auth/1` as a stranger may send it: the token (postcard) and the answer, and the
//! text form of a token file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use potluck_net::auth::{Authority, Reply, Role, Token, Verifier};

fuzz_target!(|data: &[u8]| {
    let _ = postcard::from_bytes::<Reply>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Token::from_text(text);
    }
    let Ok(token) = postcard::from_bytes::<Token>(data) else {
        return;
    };
    let _ = token.grant();
    // Whatever it says, no token the fuzzer makes up is signed by a fresh authority.
    let authority = Authority::generate();
    let verifier = Verifier {
        run: "fuzz".into(),
        authority: authority.public(),
    };
    let peer = libp2p::PeerId::random();
    assert!(verifier.check(&token, peer, 0).is_err());
    assert!(verifier.check(&token, peer, u64::MAX).is_err());
    // A real token altered anywhere in its grant is refused.
    let real = authority.grant_at("fuzz", peer, Role::Trainer, 1, 1000);
    if let Some(&b) = data.first() {
        let mut forged = real.clone();
        let at = usize::from(b) % forged.grant.len();
        forged.grant[at] ^= data.get(1).copied().unwrap_or(1) | 1;
        assert!(verifier.check(&forged, peer, 500).is_err());
    }
});
