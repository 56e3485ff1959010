//! `/potluck/dht/1` responses as a peer may send them: the frame decoder, the peer ids and
//! addresses inside, and the records of a found value (owner signatures checked).
#![no_main]

use libfuzzer_sys::fuzz_target;
use libp2p::{Multiaddr, PeerId};
use potluck_net::dht::record::{self, Limits, Record};
use potluck_net::dht::wire::{self, PeerInfo, Response, ResponseBody, WireEntry};
use potluck_net::identity;

fn peers(infos: &[PeerInfo]) {
    for p in infos {
        if let Ok(peer) = PeerId::from_bytes(&p.id) {
            let _ = identity::public_key(&peer);
        }
        for a in &p.addrs {
            let _ = Multiaddr::try_from(a.clone());
        }
    }
}

fuzz_target!(|frame: &[u8]| {
    let Ok(response) = Response::decode(frame) else {
        return;
    };
    let again = Response::decode(&wire::encode(&response)).expect("a re-encoded response decodes");
    assert_eq!(again, response);
    match &response.body {
        ResponseBody::Nodes { peers: p } | ResponseBody::StoredNear { peers: p, .. } => peers(p),
        ResponseBody::Value { entry, closer } => {
            peers(closer);
            let items = match entry {
                Some(WireEntry::Value(item)) => vec![(None, item.clone())],
                Some(WireEntry::Dict(d)) => d.iter().map(|(s, i)| (Some(s.clone()), i.clone())).collect(),
                None => Vec::new(),
            };
            let limits = Limits::default();
            for (subkey, item) in items {
                let r = Record { key: b"key".to_vec(), subkey, item };
                let _ = record::check(&r, record::now(), &limits, &Default::default());
            }
        }
        _ => {}
    }
});
