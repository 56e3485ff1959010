//! `potluck demo` on `tiny`: a whole swarm on loopback (bootstrap node, three trainers, an aux
//! peer, the monitor), the combined view, the sample grid and the score; and Ctrl-C, which
//! stops every process, each with its final checkpoint.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{Peer, tiny_data};

fn demo(dir: &Path, minutes: &str) -> Peer {
    Peer::spawn(&[
        "demo",
        "--dir",
        dir.to_str().unwrap(),
        "--config",
        "tiny",
        "--minutes",
        minutes,
        "--target-batch-size",
        "32",
        "--eval-prompts",
        "8",
        "--http",
        "127.0.0.1:0",
    ])
}

fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join("logs").join(name)).unwrap()
}

/// Processes still running that the demo in `dir` started (it marks them).
fn left_over(dir: &Path) -> Vec<String> {
    let mark = format!("POTLUCK_DEMO_DIR={}", dir.display());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if env.split(|&b| b == 0).any(|v| v == mark.as_bytes()) {
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push(String::from_utf8_lossy(&cmd).replace('\0', " "));
        }
    }
    found
}

#[test]
fn the_demo_runs_a_whole_swarm_and_scores_its_model() {
    let dir = tempfile::tempdir().unwrap();
    // Prepared like the demo would, only smaller: the demo reuses it.
    tiny_data(dir.path());
    let out = demo(dir.path(), "0.3").finish();
    assert!(out.contains("reusing the prepared `shapes` data"), "{out}");
    assert!(out.contains("dashboard: http://127.0.0.1:"), "{out}");
    assert!(out.contains("] epoch "), "the combined view: {out}");
    let accuracy: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("accuracy: "))
        .unwrap_or_else(|| panic!("{out}"))
        .parse()
        .unwrap();
    assert!((0.0..=1.0).contains(&accuracy));
    for file in [
        "samples.png",
        "eval.png",
        "peer-1/checkpoint.json",
        "peer-2/checkpoint.json",
        "peer-3/checkpoint.json",
        "monitor/history.sqlite",
    ] {
        assert!(dir.path().join(file).is_file(), "{file}: {out}");
    }
    let aux = std::fs::read_dir(dir.path().join("aux")).unwrap().count();
    assert!(aux >= 1, "the aux peer's checkpoints");
    let epochs = |name: &str| -> u64 {
        let text = log(dir.path(), name);
        let line = text
            .lines()
            .find(|l| l.starts_with("trained to epoch "))
            .unwrap();
        line.split(' ').nth(3).unwrap().parse().unwrap()
    };
    let last = epochs("trainer-1.log");
    assert!(last >= 10, "{last}");
    assert_eq!(epochs("trainer-2.log"), last);
    assert_eq!(epochs("trainer-3.log"), last);
    assert!(
        left_over(dir.path()).is_empty(),
        "{:?}",
        left_over(dir.path())
    );
}

#[test]
fn ctrl_c_stops_the_demo_and_every_peer_writes_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    tiny_data(dir.path());
    let mut d = demo(dir.path(), "10");
    let http = d.wait_for("dashboard: http://");
    let http = http.split_whitespace().next().unwrap().to_owned();
    // Some epochs in, as the monitor sees it.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = crate::monitor::get(&http, "/api/status");
        let s: serde_json::Value = serde_json::from_str(&status).unwrap();
        if s["epoch"].as_u64().is_some_and(|e| e >= 3) {
            break;
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = d.finish();
    assert!(
        out.contains("interrupted: every peer writes its final checkpoint"),
        "{out}"
    );
    assert!(out.contains("skipped (interrupted)"), "{out}");
    assert!(dir.path().join("samples.png").is_file());
    for i in 1..=3 {
        let text = log(dir.path(), &format!("trainer-{i}.log"));
        assert!(
            text.contains("interrupted: writing a final checkpoint"),
            "{text}"
        );
        assert!(
            dir.path()
                .join(format!("peer-{i}/checkpoint.json"))
                .is_file()
        );
    }
    let aux = log(dir.path(), "aux-peer.log");
    assert!(aux.contains("stopped at epoch"), "{aux}");
    assert!(
        left_over(dir.path()).is_empty(),
        "{:?}",
        left_over(dir.path())
    );
}
