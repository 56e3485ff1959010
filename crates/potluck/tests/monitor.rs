//! The monitor against a live local run: it sees the peers' metrics, draws the loss history,
//! serves JSON, Prometheus and the join page, and a restart keeps the history.

use std::io::{Read, Write};

use crate::train::{Peer, strs, tiny_data};

/// GET `path` from `addr` (host:port); the body of a 200 answer.
fn get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    body.to_owned()
}

fn monitor(boot: &str, data: &std::path::Path) -> (Peer, String) {
    let mut m = Peer::spawn(&[
        "monitor",
        "--run-id",
        "watched",
        "--initial-peers",
        boot,
        "--http",
        "127.0.0.1:0",
        "--data",
        data.to_str().unwrap(),
        "--every",
        "0.5",
    ]);
    let line = m.wait_for("monitor for run watched: http://");
    let addr = line.split_whitespace().next().unwrap().to_owned();
    (m, addr)
}

#[test]
fn the_monitor_shows_a_live_run_and_keeps_its_history_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let mut boot = Peer::spawn(&["dht", "serve", "--listen", "/ip4/127.0.0.1/tcp/0"]);
    let addr = format!("/ip4/127.0.0.1{}", boot.wait_for("/ip4/127.0.0.1"));
    let history = dir.path().join("monitor");
    let (m, http) = monitor(&addr, &history);
    let trainer = |name: &str| {
        let out = dir.path().join(name);
        let args: Vec<String> = [
            "train",
            "--run-id",
            "watched",
            "--config",
            "tiny",
            "--target-batch-size",
            "32",
            "--micro-batch",
            "8",
            "--epochs",
            "10",
            "--threads",
            "1",
            "--initial-peers",
            &addr,
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        Peer::spawn(&strs(&args))
    };
    let (a, b) = (trainer("a"), trainer("b"));
    let (a, b) = (a.finish(), b.finish());
    assert!(a.contains("trained to epoch 10") && b.contains("trained to epoch 10"));
    // The last records are read within a poll or two.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        let s: serde_json::Value = serde_json::from_str(&get(&http, "/api/status")).unwrap();
        if s["epoch"] == 10 && s["live"].as_array().unwrap().len() == 2 {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "{s}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let history = status["history"].as_array().unwrap();
    assert!(history.len() >= 3, "{status}");
    assert!(
        history
            .iter()
            .all(|p| p["loss"].as_f64().is_some_and(f64::is_finite))
    );
    assert_eq!(status["leaderboard"].as_array().unwrap().len(), 2);
    let page = get(&http, "/");
    assert!(
        page.contains("<svg id=\"curve\"") && !page.contains("http://cdn"),
        "{page}"
    );
    let prom = get(&http, "/metrics");
    assert!(prom.contains("potluck_epoch{run=\"watched\"} 10"), "{prom}");
    assert!(prom.contains("potluck_peers{run=\"watched\"} 2"), "{prom}");
    let join = get(&http, "/join");
    assert!(
        join.contains("--run-id watched") && join.contains(&addr),
        "{join}"
    );
    // A restart keeps the history: it is there before the first poll.
    m.kill();
    let (m, http) = monitor(&addr, &dir.path().join("monitor"));
    let again: serde_json::Value = serde_json::from_str(&get(&http, "/api/status")).unwrap();
    assert_eq!(again["history"], status["history"]);
    m.kill();
    boot.kill();
}
