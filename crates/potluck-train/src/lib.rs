//! Training in potluck, on flat buffers (no tensors here): one peer's training state
//! ([`state`]: parameters, optimizer, epoch, samples), the inner optimizers ([`optim`]),
//! checkpoints ([`checkpoint`]), training on one machine ([`solo`]), and training with a swarm:
//! the collaborative optimizer ([`collab`]), the swarm's progress over the DHT ([`progress`]),
//! state sync ([`sync`]), the spike guard ([`guard`]), stalled epochs ([`stall`]), metrics and
//! reports for the monitor, and the checks of every typed record of a run ([`records`]).

pub mod charter;
pub mod checkpoint;
pub mod collab;
pub mod guard;
pub mod metrics;
pub mod optim;
pub mod progress;
pub mod records;
pub mod reports;
pub mod solo;
pub mod stall;
pub mod state;
pub mod sync;
pub mod tokenizers;

/// `n` DHT nodes on the in-memory transport, each joined through the first, with their keys
/// (unit tests of the records peers publish).
#[cfg(test)]
pub(crate) async fn test_nodes(
    n: usize,
) -> Vec<(potluck_net::dht::Dht, libp2p::identity::Keypair)> {
    use potluck_net::dht::{self, Dht};
    let mut nodes: Vec<(Dht, libp2p::identity::Keypair)> = Vec::new();
    for _ in 0..n {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let node = Dht::start_memory(key.clone(), dht::Config::default())
            .await
            .unwrap();
        if let Some((first, _)) = nodes.first() {
            node.bootstrap(&first.addrs().await.unwrap()).await.unwrap();
        }
        nodes.push((node, key));
    }
    nodes
}
