//! What the test modules share: a DHT node with its all-reduce inbox, and a host on loopback TCP.

use libp2p::identity::Keypair;
use potluck_allreduce::butterfly::{Group, Inbox};
use potluck_net::dht::Dht;
use potluck_net::host::{self, ClientMode, Transports};

/// A DHT node that also averages.
pub(crate) struct Node {
    pub(crate) dht: Dht,
    pub(crate) keypair: Keypair,
    pub(crate) inbox: Inbox,
}

impl Node {
    /// Starts the all-reduce inbox on `dht`'s host.
    pub(crate) fn start(dht: Dht, keypair: Keypair) -> Node {
        let inbox = Inbox::start(dht.host()).unwrap();
        Node {
            dht,
            keypair,
            inbox,
        }
    }

    /// This node's index in `group`.
    pub(crate) fn index_in(&self, group: &Group) -> usize {
        group
            .members
            .iter()
            .position(|m| m.peer == self.dht.peer_id())
            .unwrap()
    }
}

/// A host listening on a free loopback TCP port, a server (client mode off).
pub(crate) fn tcp(keypair: Keypair) -> host::Config {
    let mut cfg = host::Config::new(keypair, Transports::Network);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.client_mode = ClientMode::Off;
    cfg
}
