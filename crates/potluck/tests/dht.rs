use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::cli::{ok, potluck, text};

/// A `potluck dht serve` process, killed when dropped.
struct Node {
    child: Child,
    peer: String,
    addr: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(identity: &Path, listen: &str, initial: Option<&str>) -> Node {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_potluck"));
    cmd.args([
        "dht",
        "serve",
        "--listen",
        listen,
        "--identity",
        identity.to_str().unwrap(),
    ]);
    if let Some(initial) = initial {
        cmd.args(["--initial-peers", initial]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut peer = String::new();
    let mut addr = String::new();
    // The node prints its id and addresses once it listens (and has joined).
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(p) = line.strip_prefix("peer id: ") {
            peer = p.to_owned();
        } else if line.trim_start().starts_with("/ip4/127.0.0.1/tcp/") {
            addr = line.trim().to_owned();
        } else if line.starts_with("pass one of these") {
            break;
        }
    }
    assert!(!addr.is_empty(), "the node printed no address");
    Node { child, peer, addr }
}

fn get(via: &Node, key: &str) -> String {
    let out = potluck(&["dht", "get", "--initial-peers", &via.addr, key]);
    text(&out.stdout)
}

#[test]
fn eight_dht_serve_processes_see_each_others_records_and_a_restarted_one_is_found_again() {
    let dir = tempfile::tempdir().unwrap();
    let key = |i: usize| dir.path().join(format!("node{i}.key"));
    let first = serve(&key(0), "/ip4/127.0.0.1/tcp/0", None);
    let mut nodes = vec![first];
    for i in 1..8 {
        let boot = nodes[0].addr.clone();
        nodes.push(serve(&key(i), "/ip4/127.0.0.1/tcp/0", Some(&boot)));
    }
    for (i, node) in nodes.iter().enumerate() {
        ok(&[
            "dht",
            "put",
            "--initial-peers",
            &node.addr,
            &format!("run.k{i}"),
            &format!("v{i}"),
        ]);
    }
    for node in &nodes {
        for i in 0..nodes.len() {
            let out = get(node, &format!("run.k{i}"));
            assert!(
                out.contains(&format!("\"v{i}\"")),
                "run.k{i} via {}: {out}",
                node.addr
            );
        }
    }
    // Restart node 3 with the same identity (and port): same peer id, and it serves again.
    let (peer, listen) = (
        nodes[3].peer.clone(),
        nodes[3].addr.split("/p2p/").next().unwrap().to_owned(),
    );
    nodes.remove(3);
    let boot = nodes[0].addr.clone();
    let again = serve(&key(3), &listen, Some(&boot));
    assert_eq!(again.peer, peer);
    ok(&[
        "dht",
        "put",
        "--initial-peers",
        &again.addr,
        "run.back",
        "again",
    ]);
    for node in &nodes {
        assert!(get(node, "run.back").contains("\"again\""));
    }
    for i in [0, 1, 7] {
        assert!(get(&again, &format!("run.k{i}")).contains(&format!("\"v{i}\"")));
    }
}

/// A node that stops answering without a word (SIGSTOP: its connections stay open, as those
/// of a peer whose machine froze or whose QUIC connection outlives it) holds no store or get
/// of the others back past its patience (three of its round trips; 0.25 s here): the lookups
/// ask the next peers in its place and end without it. Before, every store (which waits for
/// all of the k closest) and every get it was among the nearest of waited out its request's
/// deadline (2 s at least), and a swarm that lost a peer over QUIC read its own progress too
/// late to see itself. Its requests still run to their end: it leaves the others' tables.
#[test]
fn a_node_that_stops_answering_holds_no_lookup_back_and_leaves_the_tables() {
    use std::time::{Duration, Instant};

    use futures::future::join_all;
    use libp2p::identity::Keypair;
    use potluck_net::dht::record::Validators;
    use potluck_net::dht::store::Entry;
    use potluck_net::dht::{self, Dht};
    use potluck_net::host::{self, ClientMode, Transports};

    let dir = tempfile::tempdir().unwrap();
    let frozen = serve(&dir.path().join("frozen.key"), "/ip4/127.0.0.1/tcp/0", None);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let boot = [frozen.addr.parse().unwrap()];
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let mut config = host::Config::new(Keypair::generate_ed25519(), Transports::Network);
            config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
            config.client_mode = ClientMode::Off;
            let dht_config = dht::Config {
                client_mode: ClientMode::Off,
                ..dht::Config::default()
            };
            let node = Dht::start(config, dht_config, Validators::default())
                .await
                .unwrap();
            node.bootstrap(&boot).await.unwrap();
            nodes.push(node);
        }
        // Each node holds the two others and the node about to freeze.
        let joined = Instant::now();
        while nodes.iter().any(|n| n.routing_len() < nodes.len()) {
            join_all(nodes.iter().map(|n| n.bootstrap(&boot))).await;
            assert!(
                joined.elapsed() < Duration::from_secs(30),
                "the nodes never all knew one another"
            );
        }
        // SAFETY: kill(2) on our own child; SIGSTOP leaves its sockets open and unread.
        assert_eq!(
            unsafe { libc::kill(frozen.child.id() as i32, libc::SIGSTOP) },
            0
        );
        let expiration = potluck_core::clock::now() + 600_000;
        let mut slowest = Duration::ZERO;
        for (i, node) in nodes.iter().enumerate() {
            let key = format!("run.frozen{i}");
            let started = Instant::now();
            let stored = node
                .store(key.as_bytes(), None, b"v".to_vec(), expiration)
                .await
                .unwrap();
            assert!(stored >= nodes.len(), "{key} stored on {stored} nodes");
            slowest = slowest.max(started.elapsed());
            let reader = &nodes[(i + 1) % nodes.len()];
            let started = Instant::now();
            let got = reader.get(key.as_bytes()).await.unwrap();
            assert!(matches!(got, Some(Entry::Value(_))), "{key} not found");
            slowest = slowest.max(started.elapsed());
        }
        assert!(
            slowest < Duration::from_millis(1500),
            "a lookup waited {slowest:?} for the frozen node (its requests' deadline: 2 s)"
        );
        // Its requests ran out and failed: it leaves the table of every node that asked it
        // three times, though the others' answers name it still.
        let frozen_at = Instant::now();
        let mut round = 0;
        while nodes.iter().any(|n| n.routing_len() >= nodes.len()) {
            for (i, node) in nodes.iter().enumerate() {
                let _ = node.get(format!("run.frozen{i}-{round}").as_bytes()).await;
            }
            round += 1;
            assert!(
                frozen_at.elapsed() < Duration::from_secs(60),
                "the frozen node is still in a table a minute on: {:?}",
                nodes.iter().map(Dht::routing_len).collect::<Vec<_>>()
            );
        }
        eprintln!(
            "slowest store or get beside a frozen node: {slowest:?}; out of every table in {:?}",
            frozen_at.elapsed()
        );
    });
    // SAFETY: as above; the node is killed when dropped.
    unsafe { libc::kill(frozen.child.id() as i32, libc::SIGCONT) };
}
