//! Reports of misbehaving peers: each peer publishes the members its reducer banned (their
//! contributions dropped again and again, see [`potluck_allreduce::butterfly::Inbox`]) under
//! `RUN/reports`, its own subkey, signed. Anyone can read who reported whom (the monitor, the
//! run's organiser deciding on a revocation); a report alone bans no one anywhere else.

use libp2p::PeerId;
use potluck_net::dht::record::{self, Subkey};
use potluck_net::dht::store::Entry;
use potluck_net::dht::{self, Dht};
use serde::{Deserialize, Serialize};

/// Peers one report names, at most (the rest are left out).
pub const MAX_NAMED: usize = 256;
/// A reason's length, at most (longer ones are cut).
pub const MAX_WHY: usize = 200;
/// How long a published report lives (it is published again at every new ban).
pub const LIFETIME_MS: u64 = 3_600_000;

/// What one peer reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Banned peers (their id bytes) and why.
    pub banned: Vec<(Vec<u8>, String)>,
}

/// The DHT key of `run`'s reports.
pub fn key(run: &str) -> Vec<u8> {
    format!("{run}/reports").into_bytes()
}

/// Publishes the bans of `net`'s reducer as this peer's report.
pub async fn publish(
    dht: &Dht,
    keypair: &libp2p::identity::Keypair,
    run: &str,
    bans: &[(PeerId, String)],
) -> Result<usize, dht::Error> {
    let report = Report {
        banned: bans
            .iter()
            .take(MAX_NAMED)
            .map(|(p, why)| (p.to_bytes(), why.chars().take(MAX_WHY).collect()))
            .collect(),
    };
    let value = postcard::to_allocvec(&report).unwrap_or_default();
    dht.store_signed(keypair, &key(run), value, record::now() + LIFETIME_MS)
        .await
}

/// Every report in what a node holds under the key: (reporter, reported, why). A report that
/// does not decode, or names too many, is skipped.
pub fn decode(entry: &Entry) -> Vec<(PeerId, PeerId, String)> {
    let Entry::Dict(subkeys) = entry else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (subkey, item) in subkeys {
        let Subkey::Owner(owner) = subkey else {
            continue;
        };
        let Ok(reporter) = PeerId::from_bytes(owner) else {
            continue;
        };
        let Ok(report) = postcard::from_bytes::<Report>(&item.value) else {
            continue;
        };
        if report.banned.len() > MAX_NAMED {
            continue;
        }
        for (peer, why) in report.banned {
            if let Ok(peer) = PeerId::from_bytes(&peer) {
                out.push((reporter, peer, why));
            }
        }
    }
    out
}

/// The reports of `run` the DHT holds now.
pub async fn fetch(dht: &Dht, run: &str) -> Result<Vec<(PeerId, PeerId, String)>, dht::Error> {
    Ok(dht
        .get(&key(run))
        .await?
        .map_or_else(Vec::new, |e| decode(&e)))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use potluck_net::dht::record::Item;

    proptest::proptest! {
        #[test]
        fn any_report_bytes_decode_or_are_skipped(
            value in proptest::collection::vec(proptest::num::u8::ANY, 0..512)
        ) {
            let owner = Subkey::owner(&PeerId::random());
            let item = Item { value, expiration: 1, signature: None };
            let _ = decode(&Entry::Dict(BTreeMap::from([(owner, item)])));
        }
    }
}
