//! The demo's combined progress view, read from the monitor's JSON API.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// A GET of the monitor's JSON API on loopback (bounded: 16 MiB, 5 s).
pub(super) fn http_get(hostport: &str, path: &str) -> Result<serde_json::Value> {
    let timeout = Duration::from_secs(5);
    let addr: SocketAddr = hostport.parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    s.take(16 << 20).read_to_end(&mut reply)?;
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text.split_once("\r\n\r\n").context("a malformed reply")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(serde_json::from_str(body)?)
}

/// The combined progress view: the swarm's epoch toward the last, its loss, samples/s and
/// accuracy, and a line per live peer. Without a terminal, a text report every half minute.
pub(super) struct View {
    multi: MultiProgress,
    main: ProgressBar,
    peers: Vec<ProgressBar>,
    last_text: Option<Instant>,
}

impl View {
    pub(super) fn new(epochs: u64) -> View {
        let multi = MultiProgress::new();
        let main = multi.add(ProgressBar::new(epochs));
        let style = ProgressStyle::with_template(
            "{prefix:>8} [{elapsed_precise}] {wide_bar} epoch {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        main.set_style(style);
        main.set_prefix("swarm");
        View {
            multi,
            main,
            peers: Vec::new(),
            last_text: None,
        }
    }

    pub(super) fn show(&mut self, s: &serde_json::Value, started: Instant) {
        let f = |v: &serde_json::Value, d: usize| {
            v.as_f64().map_or("–".to_owned(), |x| format!("{x:.d$}"))
        };
        let epoch = s["epoch"].as_u64().unwrap_or(0);
        let history = s["history"].as_array().map_or(&[][..], Vec::as_slice);
        let loss = history.last().map_or("–".into(), |p| f(&p["loss"], 3));
        let evals = s["evals"].as_array().map_or(&[][..], Vec::as_slice);
        let accuracy = evals
            .iter()
            .rev()
            .find(|e| e["accuracy"].is_number())
            .map_or("–".into(), |e| {
                format!("{} at epoch {}", f(&e["accuracy"], 2), e["epoch"])
            });
        let live = s["live"].as_array().map_or(&[][..], Vec::as_slice);
        if live.is_empty() {
            return;
        }
        let summary = format!(
            "| loss {loss} | {} samples/s | {} peers | accuracy {accuracy}",
            f(&s["samples_per_second"], 1),
            live.len()
        );
        let lines: Vec<String> = live
            .iter()
            .map(|p| {
                let id = p["peer"].as_str().unwrap_or("?");
                let short = &id[id.len().saturating_sub(6)..];
                format!(
                    "{:>8} …{short}  epoch {:>5}  loss {:>6}  {:>6} samples/s  {:>7} samples",
                    p["role"].as_str().unwrap_or("?"),
                    p["epoch"],
                    f(&p["loss"], 3),
                    f(&p["samples_per_second"], 1),
                    p["samples"]
                )
            })
            .collect();
        self.main.set_position(epoch);
        if self.main.is_hidden() {
            if self
                .last_text
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(30))
            {
                self.last_text = Some(Instant::now());
                println!(
                    "[{:>4.0} s] epoch {epoch}/{} {summary}",
                    started.elapsed().as_secs_f64(),
                    self.main.length().unwrap_or(0)
                );
                for l in &lines {
                    println!("    {l}");
                }
            }
            return;
        }
        self.main.set_message(summary);
        while self.peers.len() < lines.len() {
            let bar = self.multi.add(ProgressBar::new(1));
            bar.set_style(
                ProgressStyle::with_template("{msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            self.peers.push(bar);
        }
        for (i, bar) in self.peers.iter().enumerate() {
            bar.set_message(lines.get(i).cloned().unwrap_or_default());
        }
    }

    pub(super) fn finish(&self) {
        for bar in &self.peers {
            bar.finish_and_clear();
        }
        self.main.finish_and_clear();
    }
}
