//! The spike guard across a swarm: one peer's poisoned batch makes the averaged gradient spike;
//! every peer rolls back to the same good state and training goes on.

use std::time::Duration;

use libp2p::identity::Keypair;
use potluck_core::{Layout, Loss, Role, Trainable};
use potluck_net::dht::{self, Dht};
use potluck_train::collab::{self, Collab, Net, Tick};
use potluck_train::optim::{self, Optimizer, Precision, Schedule};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const N: usize = 50_000;
const MICRO: usize = 4;

/// A noisy bowl: the loss is the squared distance to a fixed point; every sample adds noise to
/// the gradient (so gradient norms stay near one level, as in real training). Large enough
/// that a micro-batch takes about a millisecond, as a model's would take longer.
struct Bowl {
    layout: Layout,
    params: Vec<f32>,
    rng: ChaCha8Rng,
}

/// A micro-batch: its samples' gradients are scaled by this (1: honest).
type Scale = f32;

impl Trainable for Bowl {
    type Batch = Scale;
    type Error = std::convert::Infallible;

    fn layout(&self) -> &Layout {
        &self.layout
    }

    fn read_params(&self, out: &mut [f32]) -> Result<(), Self::Error> {
        out.copy_from_slice(&self.params);
        Ok(())
    }

    fn write_params(&mut self, params: &[f32]) -> Result<(), Self::Error> {
        self.params.copy_from_slice(params);
        Ok(())
    }

    fn accumulate_gradients(
        &mut self,
        scale: &Scale,
        grad: &mut [f32],
    ) -> Result<Loss, Self::Error> {
        for _ in 0..MICRO {
            for (g, p) in grad.iter_mut().zip(&self.params) {
                let noise: f32 = self.rng.random_range(-1.0..1.0);
                *g += scale * (2.0 * (p - 1.0) + noise);
            }
        }
        let mut loss = self.evaluate(scale)?;
        loss.samples = MICRO;
        Ok(loss)
    }

    fn evaluate(&mut self, _: &Scale) -> Result<Loss, Self::Error> {
        let total = self
            .params
            .iter()
            .map(|p| f64::from((p - 1.0).powi(2)))
            .sum();
        Ok(Loss {
            total,
            parts: [0.0; 2],
            samples: 1,
        })
    }
}

#[test]
fn a_poisoned_batch_rolls_every_peer_back_to_the_same_good_state() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (_boot, boot_addrs) = runtime.block_on(async {
        let boot = Dht::start_memory_with(
            Keypair::generate_ed25519(),
            dht::Config::default(),
            potluck_train::records::validators(),
        )
        .await
        .unwrap();
        let addrs = boot.addrs().await.unwrap();
        (boot, addrs)
    });
    const EPOCHS: u64 = 30;
    const POISON_AT: u64 = 17;
    let mut peers = Vec::new();
    for i in 0..2u64 {
        let boot_addrs = boot_addrs.clone();
        let handle = runtime.handle().clone();
        // Each peer on its own thread: `tick` runs the model where it is called.
        peers.push(std::thread::spawn(move || {
            handle.block_on(async move {
                let net = Net::start_memory(&boot_addrs).await.unwrap();
                let mut settings = collab::Settings::in_process("guard", 32);
                settings.state_every = 5;
                let layout = Layout::new([("w", vec![N], Role::Weight)]).unwrap();
                let cfg = optim::Config {
                    precision: Precision::F32,
                    schedule: Schedule {
                        peak: 0.05,
                        warmup: 2,
                        total: 1000,
                    },
                    ..optim::Config::reference_lamb()
                };
                let optimizer = Optimizer::new(cfg, &layout).with_threads(1);
                let bowl = Bowl {
                    layout,
                    params: vec![0.5; N],
                    rng: ChaCha8Rng::seed_from_u64(i),
                };
                let mut peer = Collab::join(bowl, optimizer, net, settings).await.unwrap();
                // Both in the swarm before either trains (the first would otherwise train alone).
                assert!(peer.await_peers(1, Duration::from_secs(20)).await);
                let mut reports = Vec::new();
                let mut at = Vec::new();
                while peer.epoch() < EPOCHS {
                    // The second peer's batches of one epoch are poisoned.
                    let scale = if i == 1 && peer.epoch() == POISON_AT {
                        1e4
                    } else {
                        1.0
                    };
                    let mut next = |_| Ok(scale);
                    match peer.tick(&mut next).await.unwrap() {
                        Tick::Epoch(r) => {
                            at.push((r.epoch, peer.params().to_vec()));
                            reports.push(r);
                        }
                        Tick::Synced(_, e) => at.push((e, peer.params().to_vec())),
                        _ => {}
                    }
                }
                let loss = peer.model_mut().evaluate(&1.0).unwrap().total;
                (reports, at, loss)
            })
        }));
    }
    let results: Vec<_> = peers.into_iter().map(|p| p.join().unwrap()).collect();
    let initial = 0.25 * N as f64;
    for (reports, _, loss) in &results {
        let rolled: Vec<(u64, Option<u64>)> = reports
            .iter()
            .filter(|r| r.rolled_back.is_some())
            .map(|r| (r.epoch, r.rolled_back))
            .collect();
        // The poisoned epoch (step POISON_AT + 1) went back to the state of epoch 15, and
        // nothing else did.
        assert_eq!(rolled, [(POISON_AT + 1, Some(15))], "{reports:?}");
        assert!(*loss < 0.9 * initial, "loss {loss}");
    }
    // Both peers hold the same parameters at every epoch boundary both passed, the rollback's
    // included.
    let (a, b) = (&results[0].1, &results[1].1);
    let mut compared = 0;
    for (epoch, p) in a {
        if let Some((_, q)) = b.iter().rev().find(|(e, _)| e == epoch) {
            assert_eq!(p, q, "epoch {epoch}");
            compared += 1;
        }
    }
    assert!(compared >= (EPOCHS - 5) as usize, "{compared}");
    let rolled_to = &a.iter().find(|(e, _)| *e == 15).unwrap().1;
    let after = &a.iter().find(|(e, _)| *e == POISON_AT + 1).unwrap().1;
    assert_eq!(rolled_to, after);
}
