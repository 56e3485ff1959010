//! End-to-end tests of swarms whose peers come and go: peers killed (SIGKILL) and fresh ones
//! joining, every step and in local-update mode.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use potluck_train::collab::{self, Collab, Net};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::collab::{MICRO, batch, initial, local_updates, model, runtime_and_boot};
use crate::harness::{Peer, metrics_records, peer_args, s, strs, tiny_data, wait_for_metrics};

#[test]
fn a_swarm_keeps_training_while_peers_are_killed_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    // A bootstrap node that stays: peers come and go.
    let mut boot = Peer::spawn(&["dht", "serve", "--listen", "/ip4/127.0.0.1/tcp/0"]);
    let addr = format!("/ip4/127.0.0.1{}", boot.wait_for("/ip4/127.0.0.1"));
    const EPOCHS: &str = "30";
    let start = |i: usize| {
        let out = dir.path().join(format!("peer{i}"));
        let args = [
            "train",
            "--run-id",
            "churn",
            "--config",
            "tiny",
            "--target-batch-size",
            "64",
            "--micro-batch",
            "8",
            "--warmup",
            "5",
            "--epochs",
            EPOCHS,
            "--state-every",
            "5",
            "--threads",
            "1",
            "--initial-peers",
            &addr,
            "--data",
            s(&data),
            "--out",
            s(&out),
        ];
        let mut peer = Peer::spawn(&args);
        peer.wait_for("run churn:");
        peer
    };
    let mut live: std::collections::VecDeque<(usize, Peer)> =
        (0..4).map(|i| (i, start(i))).collect();
    // Every few seconds the oldest peer is killed (SIGKILL) and a fresh one joins.
    for i in 4..7 {
        std::thread::sleep(std::time::Duration::from_secs(5));
        let (_, oldest) = live.pop_front().unwrap();
        oldest.kill();
        live.push_back((i, start(i)));
    }
    let mut fixed = Vec::new();
    for (i, peer) in live {
        let out = peer.finish();
        assert!(out.contains(&format!("trained to epoch {EPOCHS}")), "{out}");
        assert!(!out.contains("not finite"), "{out}");
        if i >= 4 {
            assert!(
                out.contains("downloaded the swarm's state at epoch"),
                "{out}"
            );
        }
        let loss: f64 = out
            .lines()
            .find_map(|l| {
                l.strip_prefix("loss on ")?
                    .split(": ")
                    .nth(1)?
                    .split(' ')
                    .next()
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no fixed loss in {out}"));
        assert!(loss.is_finite(), "{out}");
        fixed.push(loss);
        // The one original peer left saw the loss fall over the run.
        if i == 3 {
            let line = out
                .lines()
                .find(|l| l.starts_with("training loss "))
                .unwrap_or_else(|| panic!("{out}"));
            let v: Vec<f64> = line
                .split(' ')
                .filter_map(|w| w.trim_end_matches(',').parse().ok())
                .collect();
            assert!(v.len() == 2 && v[1] < v[0], "{line}");
        }
    }
    // The peers hold (nearly) the same model: their parameters were averaged at the end.
    let (lo, hi) = fixed
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    assert!(hi - lo <= 0.01 * lo, "fixed losses {fixed:?}");
    // Every peer published its metrics once an epoch, signed: the killed ones' records are
    // there too (they live ten minutes).
    let (subkeys, got) = metrics_records(&addr, "churn");
    assert!((4..=7).contains(&subkeys), "{got}");
    boot.kill();
}

/// Churn in local-update mode: a peer killed in the middle of a round and a fresh one joining.
/// The round completes for the others, who go on averaging together and hold one outer state;
/// the newcomer downloads the outer state (parameters, outer momentum, round) and trains to
/// the end. Each peer's closing line says in which rounds it averaged.
#[test]
fn in_local_update_mode_a_killed_peer_holds_no_round_back_and_a_newcomer_takes_the_outer_state() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let mut boot = Peer::spawn(&["dht", "serve", "--listen", "/ip4/127.0.0.1/tcp/0"]);
    let addr = format!("/ip4/127.0.0.1{}", boot.wait_for("/ip4/127.0.0.1"));
    const ROUNDS: &str = "20";
    let start = |i: usize| {
        let out = dir.path().join(format!("peer{i}"));
        let extra = [
            "--target-batch-size",
            "32",
            "--local-steps",
            "4",
            "--epochs",
            ROUNDS,
            "--measure-links-every",
            "0",
            "--initial-peers",
            &addr,
        ];
        let mut peer = Peer::spawn(&strs(&peer_args("churn-local", &data, &out, &extra)));
        let joined = peer.wait_for("run churn-local:");
        (peer, joined)
    };
    // Each peer joins once the one before it has ended a round (published its metrics): two
    // peers that join a peer stepping alone within its one round of each other are a case of
    // their own (see docs/ARCHITECTURE.md, "Fall behind, catch up").
    let mut peers: Vec<(Peer, String)> = Vec::new();
    for i in 0..3 {
        peers.push(start(i));
        wait_for_metrics(&addr, "churn-local", i + 1);
    }
    // The swarm trains a few rounds; then its first peer is killed (SIGKILL) in the middle of a
    // round (rounds are nearly all of the time) and a fresh one joins.
    std::thread::sleep(std::time::Duration::from_secs(5));
    peers.remove(0).0.kill();
    let (newcomer, joined) = start(3);
    let survivors: Vec<String> = peers.into_iter().map(|(p, _)| p.finish()).collect();
    let newcomer = newcomer.finish();
    let at = |out: &str, prefix: &str| -> u64 {
        let line = out
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {out}"));
        line[prefix.len()..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"))
    };
    let downloaded = at(&newcomer, "downloaded the swarm's state at epoch ");
    assert!(
        joined.contains(&format!("at epoch {downloaded}")),
        "{joined}"
    );
    assert!(
        downloaded > 0,
        "it joined before the first round ended:\n{newcomer}"
    );
    // The epochs a peer's closing line names after `word: epoch ` (none if it names none).
    let named = |out: &str, word: &str| -> Vec<u64> {
        out.lines()
            .find_map(|l| l.split(&format!("{word}: epoch ")).nth(1))
            .map(|r| {
                r.split([';', ')'])
                    .next()
                    .unwrap_or_default()
                    .split(", ")
                    .filter(|e| *e != "…")
                    .map(|e| e.parse().unwrap_or_else(|_| panic!("{out}")))
                    .collect()
            })
            .unwrap_or_default()
    };
    for out in survivors.iter().chain([&newcomer]) {
        println!(
            "joined at {downloaded}: {}",
            out.lines()
                .find(|l| l.starts_with("averaged with other"))
                .unwrap_or_default()
        );
        assert!(out.contains(&format!("trained to epoch {ROUNDS}")), "{out}");
        assert!(!out.contains("not finite"), "{out}");
    }
    // The survivors' rounds went on without the killed peer: of the rounds from the kill on,
    // each survivor averaged with the others in all but at most one (in 32 runs, 30 lost none
    // and 2 lost one).
    for out in &survivors {
        let apart: Vec<u64> = ["alone", "missed"]
            .iter()
            .flat_map(|word| named(out, word))
            .filter(|&e| e >= downloaded)
            .collect();
        assert!(apart.len() <= 1, "{apart:?}: {out}");
    }
    // And they hold the same outer parameters at the end.
    let fixed = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("loss on "))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no fixed loss in {out}"))
    };
    assert_eq!(fixed(&survivors[0]), fixed(&survivors[1]));
    // The newcomer holds the outer state from the start (it downloaded it on joining, and
    // the next state each time it missed a round), and averages with the survivors in most of
    // its rounds: in 10 runs, in all from the round after it joined in 7, and from three
    // rounds on in the others. Before it learned early that it had missed a round
    // (`Matchmaker::wait_for`), it came to each next round as late, and in 3 of 22 runs it
    // averaged in none (see docs/ARCHITECTURE.md, "Fall behind").
    let line = newcomer
        .lines()
        .find_map(|l| l.strip_prefix("averaged with other peers in "))
        .unwrap_or_else(|| panic!("no closing line of rounds in {newcomer}"));
    let counts: Vec<u64> = line
        .split(' ')
        .filter_map(|w| w.parse().ok())
        .take(2)
        .collect();
    assert!(
        counts.len() == 2 && counts[0] >= 1 && 2 * counts[0] >= counts[1],
        "the newcomer averaged in few of its rounds: {line}\n{newcomer}"
    );
    boot.kill();
}

/// A peer's offer for its epoch's round goes out as the epoch begins, before anyone knows the
/// round's deadline; it lives only as long as its peer refreshes it. Three peers in local-update
/// mode in a round that does not end; once all three offers are out, one peer stops (as if
/// killed): its offer lapses while the two others' stay, so the round's group will not name it.
/// (An early offer lived five minutes: a peer killed mid-round was put in the round's group,
/// and its part of the values went unaveraged.)
#[test]
fn an_offer_lapses_once_its_peer_is_gone() {
    let init = initial();
    let (runtime, boot) = runtime_and_boot();
    let mut settings = collab::Settings::in_process("lapse", 1 << 40);
    settings.local = Some(local_updates(2));
    let scope = settings.scope();
    let peers: Vec<_> = (0..3)
        .map(|i| {
            let (handle, init, boot) = (runtime.handle().clone(), init.clone(), boot.1.clone());
            let settings = settings.clone();
            let stop = Arc::new(AtomicBool::new(false));
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let flag = stop.clone();
            let thread = std::thread::spawn(move || {
                handle.block_on(async move {
                    let net = Net::start_memory(&boot).await.unwrap();
                    let m = model(&init);
                    let opt = potluck_train::optim::Optimizer::new(
                        potluck_train::optim::Config::outer(0.7, 0.9),
                        m.layout(),
                    );
                    let mut peer = Collab::join(m, opt, net, settings).await.unwrap();
                    tx.send(peer.peer_id()).unwrap();
                    let mut rng = ChaCha8Rng::seed_from_u64(700 + i);
                    let mut next = |n: usize| Ok(batch(&mut rng, MICRO.min(n)));
                    while !flag.load(Ordering::SeqCst) {
                        peer.tick(&mut next).await.unwrap();
                    }
                    assert_eq!(peer.epoch(), 0, "the round ended");
                })
            });
            (rx.recv().unwrap(), stop, thread)
        })
        .collect();
    let ids: Vec<libp2p::PeerId> = peers.iter().map(|(id, _, _)| *id).collect();
    let (dht, keypair) = runtime.block_on(async {
        let net = Net::start_memory(&boot.1).await.unwrap();
        (net.dht.clone(), net.keypair.clone())
    });
    let offers = || {
        runtime.block_on(async {
            let mm = potluck_allreduce::matchmaking::Matchmaker {
                dht: &dht,
                keypair: &keypair,
                run: &scope,
                settings: Default::default(),
            };
            mm.offers(0).await.unwrap_or_default()
        })
    };
    let started = Instant::now();
    while !ids.iter().all(|id| offers().contains_key(id)) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the three offers never were out: {:?} of {ids:?}",
            offers().keys().collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let [gone, stay @ ..] = &peers[..] else {
        unreachable!()
    };
    gone.1.store(true, Ordering::SeqCst);
    let stopped = Instant::now();
    loop {
        let now = offers();
        assert!(
            stay.iter().all(|(id, _, _)| now.contains_key(id)),
            "a live peer's offer lapsed: {:?}",
            now.keys().collect::<Vec<_>>()
        );
        if !now.contains_key(&gone.0) {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(60),
            "the stopped peer's offer outlived it by a minute"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "the stopped peer's offer lapsed {:?} after it stopped",
        stopped.elapsed()
    );
    for (_, stop, thread) in peers {
        stop.store(true, Ordering::SeqCst);
        thread.join().unwrap();
    }
}
