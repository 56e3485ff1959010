//! Peers behind NATs, in network namespaces built by `scripts/natlab.sh` (needs root, `ip` and
//! `iptables`; skipped with a message otherwise): a public peer finds itself reachable and
//! serves; a peer behind a NAT finds itself unreachable, switches to client mode and listens
//! through the relay; a second peer behind another NAT reaches it through the relay, exchanges
//! data, and dcutr replaces the relayed connection by a direct one.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::{Duration, Instant};

fn natlab() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/natlab.sh")
}

/// The namespaces, removed when dropped.
struct Lab(String);

impl Lab {
    fn up() -> Result<Lab, String> {
        let prefix = format!("pl{}", std::process::id() % 100_000);
        let out = Command::new("bash")
            .arg(natlab())
            .args(["up", &prefix])
            .output()
            .map_err(|e| e.to_string())?;
        let lab = Lab(prefix);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(lab)
    }

    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.0)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(natlab())
            .args(["down", &self.0])
            .status();
    }
}

/// A potluck process in a namespace, its stdout lines on a channel; killed when dropped.
struct Proc {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn spawn(lab: &Lab, ns: &str, args: &[&str]) -> Proc {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(ns), env!("CARGO_BIN_EXE_potluck")])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = sync_channel(256);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line (from now on) that `matches`, or a panic with what was printed.
    fn wait_for(&mut self, what: &str, within: Duration, matches: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + within;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!(
            "no {what} within {within:?}; printed:\n{}",
            self.seen.join("\n")
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn peers_behind_nats_go_client_reserve_a_relay_exchange_data_and_punch_holes() {
    if let Some(why) = crate::cli::missing_root_or(&["ip", "iptables"]) {
        eprintln!("skipped: the NAT test needs root, ip and iptables: {why}");
        return;
    }
    let lab = Lab::up().expect("building the namespaces");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("relay.key");
    let mut relay = Proc::spawn(
        &lab,
        "pub",
        &[
            "dht",
            "serve",
            "--listen",
            "/ip4/10.99.0.1/tcp/4001",
            "--identity",
            key.to_str().unwrap(),
        ],
    );
    let relay_addr = relay
        .wait_for("relay address", Duration::from_secs(30), |l| {
            l.contains("/ip4/10.99.0.1/tcp/4001/p2p/")
        })
        .trim()
        .to_owned();
    // Autonat's dial-backs to a NATed peer are dropped, not refused: they take a while.
    let verdict = Duration::from_secs(120);

    let mut public = Proc::spawn(
        &lab,
        "pub",
        &[
            "dht",
            "serve",
            "--client-mode",
            "auto",
            "--listen",
            "/ip4/10.99.0.1/tcp/0",
            "--initial-peers",
            &relay_addr,
        ],
    );
    public.wait_for("public verdict", verdict, |l| {
        l.starts_with("reachability:")
    });
    assert!(
        public
            .seen
            .iter()
            .any(|l| l.contains("reachability: public")),
        "the public peer: {:?}",
        public.seen
    );
    assert!(!public.seen.iter().any(|l| l.contains("client mode")));

    let mut home_a = Proc::spawn(
        &lab,
        "a",
        &[
            "dht",
            "serve",
            "--client-mode",
            "auto",
            "--initial-peers",
            &relay_addr,
        ],
    );
    let circuit = home_a.wait_for("relay reservation", verdict, |l| {
        l.starts_with("reachable through a relay: /ip4/10.99.0.1/tcp/")
    });
    let circuit = circuit.rsplit(' ').next().unwrap().to_owned();
    assert!(
        home_a
            .seen
            .iter()
            .any(|l| l == "reachability: private (behind a NAT or firewall)")
            && home_a.seen.iter().any(|l| l == "now in client mode"),
        "the NATed peer: {:?}",
        home_a.seen
    );

    let probe = Command::new("ip")
        .args(["netns", "exec", &lab.ns("b"), env!("CARGO_BIN_EXE_potluck")])
        .args([
            "dht",
            "probe",
            "--initial-peers",
            &relay_addr,
            "--peer",
            &circuit,
            "--bytes",
            "4000000",
            "--rounds",
            "2",
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&probe.stdout);
    assert!(
        probe.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    println!("{out}");
    assert!(out.contains("round 1: 4000000 bytes") && out.contains("round 2: 4000000 bytes"));
    assert!(
        out.contains("round 2: 4000000 bytes") && out.contains("over a direct connection"),
        "dcutr did not replace the relayed connection: {out}"
    );
}
