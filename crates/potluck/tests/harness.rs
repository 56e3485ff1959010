//! What the end-to-end tests share: `potluck` runs and processes read on threads ([`Peer`]), a
//! tiny prepared data set, a tiny swarm peer's arguments.

use std::path::Path;

use crate::cli::{ok, potluck, text};

pub(crate) fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `potluck` with `words` (split at spaces) followed by `more`.
pub(crate) fn run(words: &str, more: &[&str]) -> String {
    let mut args: Vec<&str> = words.split_whitespace().collect();
    args.extend_from_slice(more);
    ok(&args)
}

/// A `potluck` process whose output is read on threads (so its pipes never fill).
/// How long a peer of these tests may take to finish: many times what any of them needs on a
/// loaded 2-core machine; a peer still running then is stuck, and the test says so.
const FINISH: std::time::Duration = std::time::Duration::from_secs(600);

pub(crate) struct Peer {
    child: std::process::Child,
    /// Its standard output, line by line.
    pub(crate) lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Peer {
    pub(crate) fn spawn(args: &[&str]) -> Peer {
        use std::io::{BufRead, Read};
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_potluck"));
        // `POTLUCK_TEST_LOG=debug` shows the peers' logs in a failing test's output.
        match std::env::var("POTLUCK_TEST_LOG") {
            Ok(filter) => command.env("RUST_LOG", filter),
            Err(_) => command.env_remove("RUST_LOG"),
        };
        let mut child = command
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::sync_channel(1 << 16);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err);
            err
        });
        Peer {
            child,
            lines,
            seen: Vec::new(),
            stderr: Some(stderr),
        }
    }

    /// Waits for a line starting with `prefix` (within a minute) and returns the rest of it.
    pub(crate) fn wait_for(&mut self, prefix: &str) -> String {
        loop {
            let Ok(line) = self.lines.recv_timeout(std::time::Duration::from_secs(60)) else {
                // What the peer said on its way out (or what it said so far: it is killed).
                let _ = self.child.kill();
                let err = self.stderr.take().map(|h| h.join().unwrap_or_default());
                panic!(
                    "no line {prefix:?} in {:?}; stderr: {}",
                    self.seen,
                    err.unwrap_or_default()
                );
            };
            self.seen.push(line.clone());
            if let Some(rest) = line.trim().strip_prefix(prefix) {
                return rest.to_owned();
            }
        }
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it (SIGKILL). With `POTLUCK_TEST_LOG`, a failing test shows its log.
    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var_os("POTLUCK_TEST_LOG").is_some()
            && let Some(err) = self.stderr.take()
        {
            println!(
                "--- a killed peer's log ---\n{}",
                err.join().unwrap_or_default()
            );
        }
    }

    /// Waits for it to exit successfully (within `FINISH`, or it is killed and the test fails
    /// with its output); returns its whole standard output.
    pub(crate) fn finish(mut self) -> String {
        let deadline = std::time::Instant::now() + FINISH;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        self.seen.extend(self.lines.iter());
        let err = self
            .stderr
            .take()
            .map(|t| t.join().unwrap())
            .unwrap_or_default();
        let out = self.seen.join("\n");
        // With `POTLUCK_TEST_LOG`, a failing test shows the logs of peers that finished too.
        if std::env::var_os("POTLUCK_TEST_LOG").is_some() {
            println!("--- a peer's log ---\n{err}");
        }
        let status =
            status.unwrap_or_else(|| panic!("still running after {FINISH:?}:\n{out}\n{err}"));
        assert!(status.success(), "{out}\n{err}");
        out
    }
}

/// A peer left over by a failing test does not outlive it.
impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Prepares a tiny `shapes` data set in `dir` (seconds).
pub(crate) fn tiny_data(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data");
    run(
        "prepare --dataset shapes --images 256 --vq-steps 20 --vq-batch 8 --held-out 8 \
         --vq-images 64 --vq-channels 8 --codebook 64",
        &["--out", s(&data)],
    );
    data
}

/// `train` arguments for a tiny swarm peer of run `run`.
pub(crate) fn peer_args(run_id: &str, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--run-id",
        run_id,
        "--config",
        "tiny",
        "--micro-batch",
        "8",
        "--warmup",
        "5",
        "--threads",
        "1",
        "--data",
        s(data),
        "--out",
        s(out),
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .collect();
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

pub(crate) fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Waits (a minute at most) until `n` peers of run `run` have published their metrics, as
/// the DHT reached through `addr` holds them.
pub(crate) fn wait_for_metrics(addr: &str, run: &str, n: usize) {
    let started = std::time::Instant::now();
    loop {
        let (records, got) = metrics_records(addr, run);
        if records >= n {
            return;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "{records} of {n} peers published metrics in a minute: {got}"
        );
        // No event tells a test that a record was stored: the DHT is read again.
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// How many peers' metrics records of run `run` the DHT reached through `addr` holds (0 if it
/// holds none), and what `potluck dht get` said.
pub(crate) fn metrics_records(addr: &str, run: &str) -> (usize, String) {
    let key = format!("{run}/metrics");
    let out = potluck(&["dht", "get", "--initial-peers", addr, &key]);
    let got = format!("{}{}", text(&out.stdout), text(&out.stderr));
    let records = got
        .strip_prefix(&format!("{key}: "))
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    (records, got)
}
