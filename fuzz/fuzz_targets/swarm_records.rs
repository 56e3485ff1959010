//! The records every member of a run reads to follow the swarm (progress reports, proposed
//! deadlines, matchmaking offers and published groups, metrics, ban reports, revocations), as a
//! node checks them before storing them; and progress reports as the swarm's state is
//! estimated from them, where a peer's epoch counts only as a majority backs it, and as each
//! peer measures them (`progress::Measure`).
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use libp2p::PeerId;
use libp2p::identity::Keypair;
use potluck_net::dht::record::{self, Limits, Validators};
use potluck_train::progress::{self, Report};

const KEYS: [&str; 7] = [
    "fuzz/progress",
    "fuzz/close/7",
    "fuzz/avg/7",
    "fuzz/avg/7/groups",
    "fuzz/metrics",
    "fuzz/reports",
    "fuzz/revoked",
];

fn fixed() -> &'static (Keypair, Validators, Vec<PeerId>) {
    static FIXED: OnceLock<(Keypair, Validators, Vec<PeerId>)> = OnceLock::new();
    FIXED.get_or_init(|| {
        let peers = (0..64)
            .map(|_| Keypair::generate_ed25519().public().to_peer_id())
            .collect();
        (
            Keypair::generate_ed25519(),
            potluck_train::records::validators(),
            peers,
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let (keypair, validators, peers) = fixed();
    let now = 1_800_000_000_000;
    if first & 0x80 == 0 {
        // One record under one of the run's keys, signed by its owner.
        let key = KEYS[first as usize % KEYS.len()];
        let r = record::signed(keypair, key.as_bytes(), rest.to_vec(), now + 60_000);
        let _ = record::check(&r, now, &Limits::default(), validators);
        return;
    }
    // Reports, one after another, as the swarm's state is estimated from them.
    let mut reports = Vec::new();
    let mut bytes = rest;
    while reports.len() < peers.len() {
        let Ok((report, more)) = postcard::take_from_bytes::<Report>(bytes) else {
            break;
        };
        reports.push((peers[reports.len()], report));
        bytes = more;
    }
    let target = u64::from(first & 0x7f) * 16 + 1;
    let state = progress::swarm_state(&reports, now, target, Duration::from_secs(30));
    let claimed: u64 = reports
        .iter()
        .map(|(_, r)| r.samples)
        .fold(0, u64::saturating_add);
    assert!(state.committed <= claimed);
    assert!(state.in_epoch <= state.peers && state.peers <= reports.len());
    let newest = progress::quorum(reports.iter().map(|(_, r)| r.epoch));
    assert!(reports.is_empty() || reports.iter().any(|(_, r)| r.epoch == newest));
    // The same reports measured: a claim is only ever cut, and no rate counts past the cap.
    let mut measure = progress::Measure::default();
    measure.begin(newest, now - 1_000);
    measure.observe(&reports, now, Duration::from_secs(30));
    let mut bounded = reports.clone();
    measure.bound(&mut bounded, now, 16);
    let cap = measure.cap();
    for ((_, raw), (_, cut)) in reports.iter().zip(&bounded) {
        assert!(cut.samples <= raw.samples);
        assert!(cut.samples_per_second <= cap, "{cut:?}");
    }
});
