use std::time::Instant;

use futures::future::join_all;
use libp2p::identity::Keypair;
use potluck_core::clock;
use potluck_net::dht::record::{self, Rejection, Subkey};
use potluck_net::dht::store::Entry;
use potluck_net::dht::{Config, Dht, Error};

async fn swarm(n: usize) -> Vec<Dht> {
    let first = Dht::start_memory(Keypair::generate_ed25519(), Config::default())
        .await
        .unwrap();
    let boot = first.addrs().await.unwrap();
    let mut nodes = vec![first];
    for _ in 1..n {
        let node = Dht::start_memory(Keypair::generate_ed25519(), Config::default())
            .await
            .unwrap();
        node.bootstrap(&boot).await.unwrap();
        nodes.push(node);
    }
    // A second self-lookup once everyone is in fills the tables out.
    join_all(nodes.iter().map(|n| n.bootstrap(&boot))).await;
    nodes
}

/// How many of `keys` each node finds with the value `value_of(key)`.
async fn find_all(nodes: &[Dht], keys: &[String]) -> usize {
    let per_node = nodes.iter().map(|node| async move {
        let mut found = 0;
        for key in keys {
            if let Ok(Some(Entry::Value(item))) = node.get(key.as_bytes()).await
                && item.value == key.as_bytes()
            {
                found += 1;
            }
        }
        found
    });
    join_all(per_node).await.into_iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_nodes_find_every_key_and_survive_losing_a_tenth() {
    let started = Instant::now();
    let mut nodes = swarm(64).await;
    let expiration = clock::now() + 600_000;
    let keys: Vec<String> = (0..nodes.len()).map(|i| format!("run.key{i}")).collect();
    for (node, key) in nodes.iter().zip(&keys) {
        let stored = node
            .store(key.as_bytes(), None, key.as_bytes().to_vec(), expiration)
            .await
            .unwrap();
        assert!(stored >= 10, "{key} stored on only {stored} nodes");
    }
    let found = find_all(&nodes, &keys).await;
    assert_eq!(
        found,
        nodes.len() * keys.len(),
        "not every node found every key"
    );
    // Kill a tenth of the nodes: what was stored is still found by every survivor.
    nodes.truncate(nodes.len() - nodes.len() / 10);
    let found = find_all(&nodes, &keys).await;
    assert_eq!(found, nodes.len() * keys.len(), "survivors lost keys");
    eprintln!("64 nodes: {:.1} s", started.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_records_need_the_owners_signature_and_subkeys_merge() {
    let nodes = swarm(8).await;
    let exp = clock::now() + 60_000;
    let alice = Keypair::generate_ed25519();
    let bob = Keypair::generate_ed25519();
    nodes[0]
        .store_signed(&alice, b"run.progress", b"alice 1".to_vec(), exp)
        .await
        .unwrap();
    nodes[1]
        .store_signed(&bob, b"run.progress", b"bob 1".to_vec(), exp)
        .await
        .unwrap();
    nodes[2]
        .store(
            b"run.progress",
            Some(Subkey::Plain(b"note".to_vec())),
            b"hi".to_vec(),
            exp,
        )
        .await
        .unwrap();
    // A later value replaces an earlier one per subkey; an earlier one is refused as stale.
    nodes[3]
        .store_signed(&alice, b"run.progress", b"alice 2".to_vec(), exp + 10)
        .await
        .unwrap();
    let Some(Entry::Dict(d)) = nodes[7].get(b"run.progress").await.unwrap() else {
        panic!("no dictionary")
    };
    assert_eq!(d.len(), 3);
    assert_eq!(
        d[&Subkey::owner(&alice.public().to_peer_id())].value,
        b"alice 2"
    );
    // Forgeries: Bob's signature under Alice's subkey, and no signature at all.
    let mut forged = record::signed(&bob, b"run.progress", b"alice 99".to_vec(), exp + 20);
    forged.subkey = Some(Subkey::owner(&alice.public().to_peer_id()));
    assert!(matches!(
        nodes[4].store_record(forged).await,
        Err(Error::Rejected(Rejection::BadSignature))
    ));
    let mut unsigned = record::signed(&alice, b"run.progress", b"alice 99".to_vec(), exp + 20);
    unsigned.item.signature = None;
    assert!(matches!(
        nodes[5].store_record(unsigned).await,
        Err(Error::Rejected(Rejection::Unsigned))
    ));
    // A replay: Alice's first record, signed and intact, sent again after her second one.
    // Its expiration is its timestamp: older than what is held, it changes nothing.
    let replayed = record::signed(&alice, b"run.progress", b"alice 1".to_vec(), exp);
    let _ = nodes[6].store_record(replayed).await;
    // Oversize.
    let big = vec![0u8; 100 << 10];
    assert!(matches!(
        nodes[6].store(b"run.big", None, big, exp).await,
        Err(Error::Rejected(Rejection::TooLarge { .. }))
    ));
    let Some(Entry::Dict(d)) = nodes[0].get(b"run.progress").await.unwrap() else {
        panic!("no dictionary")
    };
    assert_eq!(
        d[&Subkey::owner(&alice.public().to_peer_id())].value,
        b"alice 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mode_nodes_store_and_get_but_stay_out_of_routing_tables() {
    let nodes = swarm(6).await;
    let boot = nodes[0].addrs().await.unwrap();
    let client = Dht::start_memory(
        Keypair::generate_ed25519(),
        Config {
            client_mode: potluck_net::host::ClientMode::On,
            ..Config::default()
        },
    )
    .await
    .unwrap();
    client.bootstrap(&boot).await.unwrap();
    let exp = clock::now() + 60_000;
    client
        .store(b"run.c", None, b"from a client".to_vec(), exp)
        .await
        .unwrap();
    let got = nodes[3].get(b"run.c").await.unwrap();
    assert!(matches!(got, Some(Entry::Value(i)) if i.value == b"from a client"));
    assert!(matches!(
        client.get(b"run.c").await.unwrap(),
        Some(Entry::Value(_))
    ));
    // Nobody learned the client as a routing contact.
    for n in &nodes {
        n.bootstrap(&boot).await.unwrap();
    }
    let total: usize = nodes.iter().map(Dht::routing_len).sum();
    assert!(total > 0);
    for n in &nodes {
        assert!(
            n.routing_len() < nodes.len(),
            "a server holds {} contacts",
            n.routing_len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_records_vanish() {
    let nodes = swarm(4).await;
    let exp = clock::now() + 3_000;
    nodes[0]
        .store(b"run.short", None, b"soon gone".to_vec(), exp)
        .await
        .unwrap();
    assert!(nodes[1].get(b"run.short").await.unwrap().is_some());
    // Expiration is wall-clock time: let it pass.
    let left = exp.saturating_sub(clock::now()) + 50;
    tokio::time::sleep(std::time::Duration::from_millis(left)).await;
    assert!(nodes[2].get(b"run.short").await.unwrap().is_none());
}

/// A flooder that stays just under the ban in each connection, disconnects and comes back
/// with the same id keeps its refusals: it is banned on its second connection (before, the
/// host forgot a peer's bucket when it disconnected, and a fresh burst came with every
/// reconnect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooder_that_reconnects_is_banned_all_the_same() {
    use std::sync::Arc;
    use std::time::Duration;

    use potluck_net::dht::record::Validators;
    use potluck_net::dht::wire::{self, Request, RequestBody, ResponseBody};
    use potluck_net::host::{self, ClientMode, Host, Transports};
    use potluck_net::limit::Rate;

    let memory = || libp2p::multiaddr::Protocol::Memory(rand::random::<u64>() | 1).into();
    let mut node_config = host::Config::new(Keypair::generate_ed25519(), Transports::Memory);
    node_config.listen = vec![memory()];
    node_config.requests = Rate {
        per_second: 2.0,
        burst: 10.0,
        ban_after: 15.0,
        ban_for: Duration::from_secs(60),
    };
    let node = Dht::start(node_config, Config::default(), Validators::default())
        .await
        .unwrap();
    let mut attacker_config = host::Config::new(Keypair::generate_ed25519(), Transports::Memory);
    attacker_config.listen = vec![memory()];
    attacker_config.client_mode = ClientMode::On;
    let attacker = Host::start(attacker_config, Arc::new(potluck_net::dht::Refusing))
        .await
        .unwrap();
    let addrs = node.addrs().await.unwrap();
    let request = Request {
        client: true,
        body: RequestBody::Get {
            key: b"run.key".to_vec(),
        },
    };
    // 24 requests at once: 10 in the burst, about 14 refused (the bucket refills by 2 a
    // second), short of the ban at 15.
    let burst = || async {
        let mut refused = 0;
        for _ in 0..24 {
            let answer = wire::rpc(
                &attacker,
                node.peer_id(),
                addrs.clone(),
                &request,
                Duration::from_secs(5),
            )
            .await;
            match answer {
                Ok(r) if matches!(r.body, ResponseBody::Refused { .. }) => refused += 1,
                Ok(_) => {}
                // Banned: disconnected, and its connections refused.
                Err(_) => break,
            }
        }
        refused
    };
    let refused = burst().await;
    assert!((12..15).contains(&refused), "{refused} refused");
    assert_eq!(
        node.host().refusals(),
        (refused, 0),
        "banned in one connection"
    );
    attacker.disconnect(node.peer_id()).await;
    let gone = tokio::time::timeout(Duration::from_secs(10), async {
        while !node
            .host()
            .connections(attacker.peer_id())
            .await
            .unwrap()
            .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "the attacker's connection did not close");
    burst().await;
    assert_eq!(
        node.host().refusals().1,
        1,
        "the reconnected flooder was not banned"
    );
}

/// A node whose clock is an hour ahead: it answers every request with its clock and no peers.
#[derive(Debug)]
struct Skewed;

impl potluck_net::host::Inbound for Skewed {
    type Request = potluck_net::dht::wire::Request;

    fn rpc(&self) -> Option<potluck_net::host::Rpc> {
        Some(potluck_net::dht::wire::RPC)
    }

    fn decode(&self, frame: &[u8]) -> Result<Self::Request, String> {
        potluck_net::dht::wire::Request::decode(frame).map_err(|e| e.to_string())
    }

    fn request(
        &self,
        _: libp2p::PeerId,
        _: Option<potluck_net::auth::Role>,
        _: Self::Request,
    ) -> Vec<u8> {
        potluck_net::dht::wire::encode(&potluck_net::dht::wire::Response {
            now: clock::now() + 3_600_000,
            body: potluck_net::dht::wire::ResponseBody::Nodes { peers: Vec::new() },
        })
    }

    fn refusal(&self, reason: &str) -> Vec<u8> {
        potluck_net::dht::wire::encode(&potluck_net::dht::wire::Response {
            now: clock::now(),
            body: potluck_net::dht::wire::ResponseBody::Refused {
                reason: reason.into(),
            },
        })
    }

    fn identified(&self, _: libp2p::PeerId, _: Vec<libp2p::Multiaddr>, _: bool) {}
}

/// One initial peer with a skewed clock does not stop a join through the others: it is left
/// out (before, the first skewed answer aborted the join). When every initial peer is off, it
/// is this machine's clock that is: the join fails, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skewed_initial_peer_is_left_out_and_the_join_goes_on() {
    use std::sync::Arc;

    use potluck_net::host::{self, Host, Transports};

    let mut config = host::Config::new(Keypair::generate_ed25519(), Transports::Memory);
    config.listen = vec![libp2p::multiaddr::Protocol::Memory(rand::random::<u64>() | 1).into()];
    let skewed = Host::start(config, Arc::new(Skewed)).await.unwrap();
    let mut skewed_addr = skewed.listen_addrs().await.unwrap().remove(0);
    skewed_addr.push(libp2p::multiaddr::Protocol::P2p(skewed.peer_id()));
    let honest = swarm(1).await.remove(0);
    let honest_addr = honest.addrs().await.unwrap().remove(0);
    let newcomer = Dht::start_memory(Keypair::generate_ed25519(), Config::default())
        .await
        .unwrap();
    let worst = newcomer
        .bootstrap(&[skewed_addr.clone(), honest_addr])
        .await
        .unwrap();
    assert!(
        worst.abs() < 30_000,
        "joined through the skewed peer: {worst} ms"
    );
    let alone = Dht::start_memory(Keypair::generate_ed25519(), Config::default())
        .await
        .unwrap();
    assert!(matches!(
        alone.bootstrap(&[skewed_addr]).await,
        Err(Error::ClockSkew { .. })
    ));
}
