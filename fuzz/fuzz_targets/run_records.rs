//! Run records any peer can read from the DHT: the authority's revocation list and the peers'
//! reports of banned members, as a node would hold them under their keys.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use potluck_net::auth::{Authority, Verifier};
use potluck_net::dht::record::{Item, Subkey};
use potluck_net::dht::store::Entry;
use potluck_net::revoke;

fuzz_target!(|data: &[u8]| {
    let authority = Authority::generate();
    let verifier = Verifier {
        run: "fuzz".into(),
        authority: authority.public(),
    };
    let item = Item {
        value: data.to_vec(),
        expiration: 1,
        signature: None,
    };
    let owner = Subkey::owner(&revoke::owner(&authority.public()));
    let entry = Entry::Dict(BTreeMap::from([(owner, item.clone())]));
    if let Ok(peers) = revoke::decode(&entry, &verifier) {
        assert!(peers.len() <= revoke::MAX_REVOKED);
    }
    let _ = potluck_train::reports::decode(&entry);
    let _ = potluck_train::reports::decode(&Entry::Value(item));
});
