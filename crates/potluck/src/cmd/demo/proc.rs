//! The demo's processes: each a child of this binary whose output goes, line by line, to its
//! log and to the demo while it waits for a line.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// One process of the demo's swarm: the lines it prints go to its log, and to the demo while
/// it waits for one.
pub(super) struct Proc {
    pub(super) name: String,
    pub(super) child: Child,
    lines: Receiver<String>,
    log: PathBuf,
    /// Asked to stop (its exit status then is no failure).
    pub(super) stopping: bool,
}

impl Proc {
    pub(super) fn spawn(name: &str, dir: &Path, args: &[String]) -> Result<Proc> {
        let logs = dir.join("logs");
        let exe = std::env::current_exe().context("finding this binary")?;
        let log = logs.join(format!("{}.log", name.replace(' ', "-")));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let file = Arc::new(Mutex::new(file));
        let mut child = Command::new(exe)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            // Marks the demo's processes (its tests check that none outlives it).
            .env("POTLUCK_DEMO_DIR", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        // A bounded queue: lines nobody waits for are dropped (the log keeps them all).
        let (tx, rx) = sync_channel(1024);
        if let Some(out) = child.stdout.take() {
            copy_lines(out, file.clone(), tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            copy_lines(err, file, tx);
        }
        Ok(Proc {
            name: name.to_owned(),
            child,
            lines: rx,
            log,
            stopping: false,
        })
    }

    /// Waits for a line containing `needle`; fails if the process ends first or takes longer
    /// than `wait`.
    pub(super) fn wait_for(&mut self, needle: &str, wait: Duration) -> Result<String> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(500)))
            {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("the {} stopped: {}", self.name, self.tail())
                }
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the {} stopped ({status}): {}", self.name, self.tail());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the {} said nothing like {needle:?} within {wait:?}: {}",
                    self.name,
                    self.tail()
                );
            }
        }
    }

    /// The end of its log, to show with an error.
    pub(super) fn tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            use std::io::{Seek, SeekFrom};
            let len = f.metadata().map_or(0, |m| m.len());
            let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
            let _ = f.take(4096).read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "the end of {}:\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }

    /// Asks it to stop as Ctrl-C would (it finishes what it must: a checkpoint).
    pub(super) fn interrupt(&mut self) {
        self.stopping = true;
        // Only while it runs: once reaped, its pid may be another process's.
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid, which we have not reaped (just checked),
            // so it is not reused; no memory is involved.
            unsafe {
                libc::kill(pid, libc::SIGINT);
            }
        }
    }

    /// Its exit status if it ends within `wait`.
    pub(super) fn wait_within(&mut self, wait: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + wait;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => return None,
            }
        }
    }

    /// Its exit status once it has ended, killing it after `grace`.
    pub(super) fn stop_within(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.wait_within(grace) {
            return Some(status);
        }
        eprintln!("the {} did not stop in time: killed", self.name);
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Copies a child's output, line by line, to its log and to the demo's queue.
fn copy_lines(
    from: impl Read + Send + 'static,
    log: Arc<Mutex<std::fs::File>>,
    to: SyncSender<String>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut f) = log.lock() {
                let _ = writeln!(f, "{line}");
            }
            let _ = to.try_send(line);
        }
    });
}
