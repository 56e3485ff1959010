//! `potluck bench allreduce`: peer processes average a buffer over loopback, and (as root,
//! with `ip` and `tc`) over shaped links in network namespaces built by
//! `scripts/slowlinks.sh`. These check that every round completes with the right average;
//! the speed figures are for docs/BENCHMARKS.md, not for asserting.

use std::path::PathBuf;
use std::process::Command;

use crate::cli::potluck;

fn report(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check(r: &serde_json::Value, rounds: usize) {
    let all = r["rounds"].as_array().unwrap();
    assert_eq!(all.len(), rounds);
    for round in all {
        assert_eq!(round["complete"], true, "{r}");
        assert!(round["max_error"].as_f64().unwrap() < 1e-5, "{r}");
    }
}

#[test]
fn peer_processes_average_over_loopback() {
    let out = potluck(&[
        "bench",
        "allreduce",
        "--peers",
        "3",
        "--numel",
        "300000",
        "--rounds",
        "2",
        "--json",
    ]);
    let r = report(&out);
    check(&r, 2);
    assert!(r["ring_copy_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn peer_processes_average_over_shaped_links_in_namespaces() {
    if let Some(why) = crate::cli::missing_root_or(&["ip", "tc"]) {
        eprintln!("skipped: shaped links need root, ip and tc: {why}");
        return;
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/slowlinks.sh");
    let prefix = format!("sl{}", std::process::id() % 100_000);
    let lab = |cmd: &str| {
        Command::new("bash")
            .arg(&script)
            .args([cmd, &prefix, "3", "200mbit"])
            .status()
            .unwrap()
    };
    assert!(lab("up").success());
    let out = potluck(&[
        "bench",
        "allreduce",
        "--peers",
        "3",
        "--numel",
        "1000000",
        "--rounds",
        "1",
        "--netns",
        &prefix,
        "--link-mbit",
        "200",
        "--json",
    ]);
    lab("down");
    let r = report(&out);
    check(&r, 1);
    // 200 Mbit/s links: copies run at link speed, far below loopback's.
    let copy_mb_s = 4.0 / r["tcp_copy_s"].as_f64().unwrap();
    assert!(copy_mb_s < 30.0, "{r}");
}
