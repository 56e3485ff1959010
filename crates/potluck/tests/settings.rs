//! Peers of one run that start together: a peer that joins a run at its first epoch holds
//! the first peer's state already (the run seeds the parameters) and downloads none of it; one
//! that started with other optimizer settings takes those most peers report.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use potluck_train::collab::{self, Collab, Net, Tick};
use potluck_train::optim::{self, Optimizer};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::collab::{MICRO, TARGET, batch, initial, model, optimizer, run_node, runtime_and_boot};

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
        let own = run_node().await;
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

/// A peer joining a run whose peers still hold its first state (epoch 0, the parameters the
/// run's seed gives every peer) takes every chunk from its own state and downloads nothing: on
/// a 10 Mbit/s link the 53 MB of a `small` state took 47 s, most of a round.
#[test]
fn a_peer_joining_a_run_at_its_first_state_downloads_none_of_it() {
    let init = initial();
    let (runtime, boot) = runtime_and_boot();
    let (boot, init) = (&boot.1, &init);
    runtime.block_on(async {
        let join = |wait| async move {
            let mut settings = collab::Settings::in_process("first", TARGET);
            settings.join_wait = wait;
            let net = Net::start_memory(boot).await.unwrap();
            let m = model(init);
            let opt = optimizer(m.layout());
            Collab::join(m, opt, net, settings).await.unwrap()
        };
        // The first peer starts the run and computes nothing: the run stays at its first state.
        let first = join(Duration::from_millis(300)).await;
        assert!(first.joined().is_none());
        // The second waits for the first's report however slow the DHT (it joins as soon as
        // it sees it).
        let second = join(Duration::from_secs(60)).await;
        let report = second
            .joined()
            .expect("the second peer downloaded no state");
        let (own, chunks) = report.own;
        assert!(chunks > 1);
        assert_eq!(own, chunks, "chunks held alike were downloaded");
        assert_eq!(report.bytes, 0);
        assert_eq!(second.params(), first.params());
        assert_eq!(second.epoch(), 0);
    });
}
