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
