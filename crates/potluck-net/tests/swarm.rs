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
