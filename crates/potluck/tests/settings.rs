//! Peers of one run that started with other optimizer settings: the run's settings are those
//! most peers report, and a peer with others takes them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use potluck_net::dht::{self, Dht};
use potluck_train::collab::{self, Collab, Net, Tick};
use potluck_train::optim::{self, Optimizer};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::collab::{MICRO, TARGET, batch, initial, model, optimizer, runtime_and_boot};

/// Two peers start a run with one learning rate; a third, with another, starts on a DHT of
/// its own (it sees no one, so it settles its own settings, as an aux peer started with the
/// trainers but without their --epochs did) and steps alone. Once its DHT meets theirs, it
/// sees that the run's settings are the two others' (two reports against its one): it takes
/// them, with their state, and averages with them. The two keep theirs. Without the check it
/// keeps its own for ever (and passes over every donor of the run's settings).
#[test]
fn a_peer_that_started_with_other_optimizer_settings_takes_the_runs() {
    let init = initial();
    let (runtime, boot) = runtime_and_boot();
    let stop = Arc::new(AtomicBool::new(false));
    let least_epoch = Arc::new(AtomicU64::new(0));
    let run = optimizer(model(&init).layout()).config().to_owned();
    let pair: Vec<_> = (0..2)
        .map(|i| {
            let (handle, init, boot) = (runtime.handle().clone(), init.clone(), boot.1.clone());
            let (stop, least_epoch) = (stop.clone(), least_epoch.clone());
            std::thread::spawn(move || {
                handle.block_on(async move {
                    let net = Net::start_memory(&boot).await.unwrap();
                    let m = model(&init);
                    let opt = optimizer(m.layout());
                    let settings = collab::Settings::in_process("settings", TARGET);
                    let mut peer = Collab::join(m, opt, net, settings).await.unwrap();
                    let mut rng = ChaCha8Rng::seed_from_u64(500 + i);
                    let mut next = |n: usize| Ok(batch(&mut rng, MICRO.min(n)));
                    while !stop.load(Ordering::SeqCst) {
                        if let Tick::Epoch(r) = peer.tick(&mut next).await.unwrap() {
                            least_epoch.fetch_max(r.epoch, Ordering::SeqCst);
                        }
                    }
                    *peer.optimizer().config()
                })
            })
        })
        .collect();
    let (odd, adopted_at, group) = runtime.block_on(async {
        // A DHT of its own: it meets the others' only when told their bootstrap node.
        let own = Dht::start_memory_with(
            Keypair::generate_ed25519(),
            dht::Config::default(),
            potluck_train::records::validators(),
        )
        .await
        .unwrap();
        let net = Net::start_memory(&own.addrs().await.unwrap())
            .await
            .unwrap();
        let dht = net.dht.clone();
        let m = model(&init);
        let mut cfg = run;
        cfg.schedule.peak /= 2.0;
        cfg.schedule.total = u64::MAX;
        let opt = Optimizer::new(cfg, m.layout()).with_threads(1);
        let settings = collab::Settings::in_process("settings", TARGET);
        let mut peer = Collab::join(m, opt, net, settings).await.unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(599);
        let mut next = |n: usize| Ok(batch(&mut rng, MICRO.min(n)));
        // Alone, on its own settings, for two epochs; the others well under way.
        while peer.epoch() < 2 || least_epoch.load(Ordering::SeqCst) < 2 {
            peer.tick(&mut next).await.unwrap();
        }
        assert_eq!(*peer.optimizer().config(), cfg);
        dht.bootstrap(&boot.1).await.unwrap();
        let met = Instant::now();
        let mut adopted_at = None;
        loop {
            assert!(
                met.elapsed() < Duration::from_secs(120),
                "two minutes after meeting the run, this peer still trains with {:?} \
                 (adopted: {adopted_at:?})",
                peer.optimizer().config()
            );
            let tick = peer.tick(&mut next).await.unwrap();
            if adopted_at.is_none() && *peer.optimizer().config() == run {
                adopted_at = Some(met.elapsed());
            }
            // Back in the run: an epoch averaged with both others.
            if let Tick::Epoch(r) = tick
                && adopted_at.is_some()
                && r.group == 3
            {
                return (*peer.optimizer().config(), adopted_at, r.group);
            }
        }
    });
    stop.store(true, Ordering::SeqCst);
    let kept: Vec<optim::Config> = pair.into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!("the odd peer took the run's settings {adopted_at:?} after meeting it");
    assert_eq!(odd, run);
    assert_eq!(group, 3);
    assert_eq!(
        kept,
        vec![run, run],
        "the two of the run's settings changed theirs"
    );
}
