//! `potluck bench allreduce`: N peer processes on loopback average a buffer of M floats for R
//! rounds; per round the wall time, bytes sent per peer, effective throughput and peak RSS per
//! peer. In the same run, between peers 0 and 1 (the same processes), copies of the buffer's
//! bytes: raw TCP, a libp2p stream over TCP with noise and with TLS, and a direct channel
//! (TCP + AES-GCM), for the machine's own limits without and with encryption; and ring copies
//! of an all-reduce's traffic over libp2p streams and over direct channels.
//!
//! The parent talks to its peers over their stdin and stdout, one JSON message per line.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use potluck_allreduce::codec::Codec;
use serde::{Deserialize, Serialize};

mod peer;

pub(crate) use peer::{PeerArgs, peer};

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example: potluck bench allreduce --peers 4 --numel 16777216 --codec none --rounds 3"
)]
pub(crate) struct Args {
    /// Peer processes.
    #[arg(long, default_value_t = 4)]
    pub(crate) peers: usize,
    /// Floats in the averaged buffer.
    #[arg(long, default_value_t = 16 << 20)]
    pub(crate) numel: usize,
    /// none, fp16, bf16, uniform8 or blockwise8.
    #[arg(long, default_value = "none")]
    pub(crate) codec: String,
    /// Reduce with `train --robust`'s rule (CenteredClip) instead of the mean: its cost in
    /// time (the max error is then against the mean, which the rule does not compute).
    #[arg(long)]
    pub(crate) robust: bool,
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// Values per chunk.
    #[arg(long, default_value_t = 1 << 16)]
    pub(crate) chunk: usize,
    /// Chunks a reducer reads ahead of its slowest sender.
    #[arg(long, default_value_t = 8)]
    pub(crate) window: usize,
    /// Security the peers offer first on TCP: noise or tls.
    #[arg(long, default_value = "noise")]
    pub(crate) security: String,
    /// Direct channels (TCP + AES-GCM) for the all-reduce's bytes: on, or off (libp2p
    /// streams only).
    #[arg(long, default_value = "on")]
    pub(crate) direct: String,
    /// Pace each peer's direct channels to this many times its probed rate, shared among its
    /// flows (0: no pacing).
    #[arg(long, default_value_t = 1.05)]
    pub(crate) pace: f64,
    /// Run peer i in network namespace PREFIX{i} at 10.98.0.{i+1}, as `scripts/slowlinks.sh`
    /// builds them (slow links; needs root).
    #[arg(long)]
    pub(crate) netns: Option<String>,
    /// The link rate of --netns in Mbit/s, for the butterfly limit printed beside.
    #[arg(long)]
    pub(crate) link_mbit: Option<f64>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// What the parent says to a peer.
#[derive(Debug, Serialize, Deserialize)]
enum ToPeer {
    Group {
        members: Vec<(String, Vec<String>)>,
        me: usize,
        numel: usize,
        codec: String,
        robust: bool,
        chunk: usize,
        window: usize,
        pace: f64,
    },
    /// Run round `round` with the members' measured rates (bytes/s), for the parts.
    Round {
        round: usize,
        rates: Vec<f64>,
    },
    /// Measure the rate to `to` ([`Host::measure`]).
    Measure {
        to: (String, Vec<String>),
        direct: bool,
    },
    /// Send `bytes` to each of `to` at once (every peer at once: the traffic of an all-reduce,
    /// without its work), over direct channels where `direct`, else libp2p streams.
    Spread {
        to: Vec<(String, Vec<String>)>,
        bytes: u64,
        direct: bool,
    },
    /// Copy `bytes` to this peer (raw TCP at `tcp`, libp2p streams at `addrs`).
    Copy {
        peer: String,
        addrs: Vec<String>,
        tcp: String,
        bytes: u64,
    },
    Exit,
}

/// What a peer says to the parent.
#[derive(Debug, Serialize, Deserialize)]
enum FromPeer {
    Ready {
        peer: String,
        addrs: Vec<String>,
        tcp: String,
        /// Resident set before the buffer exists (this binary links libtorch).
        idle_rss_mib: f64,
    },
    Done {
        round: usize,
        wall_s: f64,
        sent: u64,
        received: u64,
        complete: bool,
        max_error: f32,
        peak_rss_mib: f64,
        /// What this round measured: bytes moved each way per second.
        rate: f64,
    },
    Copied {
        tcp_s: f64,
        noise_s: f64,
        tls_s: f64,
        direct_s: f64,
    },
    Rang {
        wall_s: f64,
    },
    Measured {
        /// Bytes per second.
        rate: f64,
    },
    Failed(String),
}

#[derive(Debug, Serialize)]
struct RoundReport {
    round: usize,
    wall_s: f64,
    sent_per_peer_mb: f64,
    throughput_mb_s: f64,
    peak_rss_mib: Vec<f64>,
    complete: bool,
    max_error: f32,
}

#[derive(Debug, Serialize)]
struct Report {
    peers: usize,
    numel: usize,
    codec: String,
    robust: bool,
    security: String,
    buffer_mib: f64,
    /// Each peer's resident set before its buffer existed.
    idle_rss_mib: Vec<f64>,
    /// The largest peak over idle, per MiB of buffer.
    above_idle_per_buffer: f64,
    rounds: Vec<RoundReport>,
    median_wall_s: f64,
    tcp_copy_s: f64,
    noise_copy_s: f64,
    tls_copy_s: f64,
    direct_copy_s: f64,
    /// Whether the all-reduce used direct channels.
    direct: bool,
    /// Each peer's measured rate to the next (MB/s), for the parts and the pacing.
    rates_mb_s: Vec<f64>,
    /// Every peer sending what it sends in an all-reduce, at once, to the next peer over a
    /// libp2p stream (median).
    ring_copy_s: f64,
    /// The same over direct channels.
    direct_ring_copy_s: f64,
    /// The same traffic from every peer spread evenly over all the others at once (the
    /// all-reduce's pattern of flows), over the transport the all-reduce used.
    all_to_all_copy_s: f64,
    /// Median all-reduce wall time over the libp2p ring copy's.
    ratio_to_ring_copy: f64,
    /// Median all-reduce wall time over the ring copy's on the transport it used.
    ratio_to_own_ring_copy: f64,
    /// With --link-mbit: the time to move what one peer sends at the link's rate.
    butterfly_limit_s: Option<f64>,
}

struct PeerProc {
    child: Child,
    stdin: ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl PeerProc {
    fn send(&mut self, msg: &ToPeer) -> Result<()> {
        writeln!(self.stdin, "{}", serde_json::to_string(msg)?)?;
        self.stdin.flush()?;
        Ok(())
    }

    fn recv(&mut self) -> Result<FromPeer> {
        let line = self
            .lines
            .next()
            .context("a peer process exited early (see its errors above)")??;
        match serde_json::from_str(&line)? {
            FromPeer::Failed(why) => bail!("a peer failed: {why}"),
            msg => Ok(msg),
        }
    }
}

impl Drop for PeerProc {
    fn drop(&mut self) {
        let _ = self.send(&ToPeer::Exit);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn run(args: &Args) -> Result<()> {
    if args.peers < 2 {
        bail!("--peers must be at least 2");
    }
    args.codec
        .parse::<Codec>()
        .map_err(|e| anyhow::anyhow!(e))?;
    let direct = match args.direct.as_str() {
        "on" => true,
        "off" => false,
        other => bail!("--direct {other}: use on or off"),
    };
    let exe = std::env::current_exe()?;
    // Peers share this machine: each gets its share of the cores as runtime threads.
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let threads = (cores / args.peers).max(1).to_string();
    let mut procs = Vec::new();
    for i in 0..args.peers {
        let mut command = match &args.netns {
            Some(prefix) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &format!("{prefix}{i}")]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let ip = match &args.netns {
            Some(_) => format!("10.98.0.{}", i + 1),
            None => "127.0.0.1".to_owned(),
        };
        let mut child = command
            .args(["bench", "allreduce-peer", "--security", &args.security])
            .args(["--direct", &args.direct])
            .args(["--threads", &threads, "--ip", &ip])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a peer process")?;
        let stdin = child.stdin.take().context("peer stdin")?;
        let stdout = child.stdout.take().context("peer stdout")?;
        procs.push(PeerProc {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        });
    }
    let mut members = Vec::new();
    let mut tcp = Vec::new();
    let mut idle = Vec::new();
    for p in &mut procs {
        match p.recv()? {
            FromPeer::Ready {
                peer,
                addrs,
                tcp: t,
                idle_rss_mib,
            } => {
                members.push((peer, addrs));
                tcp.push(t);
                idle.push(idle_rss_mib);
            }
            other => bail!("unexpected {other:?}"),
        }
    }
    for (me, p) in procs.iter_mut().enumerate() {
        p.send(&ToPeer::Group {
            members: members.clone(),
            me,
            numel: args.numel,
            codec: args.codec.clone(),
            robust: args.robust,
            chunk: args.chunk,
            window: args.window,
            pace: args.pace,
        })?;
    }
    // Rates for the parts, timeouts and pacing: rings of measurements before the first round
    // (each peer's rate sending to the next, all at once); the best of three, since a
    // measurement can only fall short of a link's capacity (parts sized by rates a third off
    // on equal links made every round slower).
    let mut rates = vec![0f64; args.peers];
    for _ in 0..3 {
        for (i, p) in procs.iter_mut().enumerate() {
            p.send(&ToPeer::Measure {
                to: members[(i + 1) % args.peers].clone(),
                direct,
            })?;
        }
        for (r, p) in rates.iter_mut().zip(&mut procs) {
            match p.recv()? {
                FromPeer::Measured { rate } => *r = r.max(rate),
                other => bail!("unexpected {other:?}"),
            }
        }
    }
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        for p in &mut procs {
            p.send(&ToPeer::Round {
                round,
                rates: rates.clone(),
            })?;
        }
        let mut walls = Vec::new();
        let mut sent = 0u64;
        let mut rss = Vec::new();
        let mut complete = true;
        let mut max_error = 0f32;
        for p in &mut procs {
            match p.recv()? {
                FromPeer::Done {
                    wall_s,
                    sent: s,
                    complete: c,
                    max_error: e,
                    peak_rss_mib,
                    ..
                } => {
                    walls.push(wall_s);
                    sent += s;
                    rss.push(peak_rss_mib);
                    complete &= c;
                    max_error = max_error.max(e);
                }
                other => bail!("unexpected {other:?}"),
            }
        }
        // Not fed back from the rounds: a round's achieved rate follows the part it was given
        // (a bigger part moves more bytes in the same time), which would skew the parts round
        // after round. The probes measure capacity.
        let wall = walls.iter().copied().fold(0.0, f64::max);
        rounds.push(RoundReport {
            round,
            wall_s: wall,
            sent_per_peer_mb: sent as f64 / args.peers as f64 / 1e6,
            throughput_mb_s: (args.numel * 4) as f64 / wall / 1e6,
            peak_rss_mib: rss,
            complete,
            max_error,
        });
    }
    // The same traffic without the all-reduce's work: each peer sends 2(N−1)/N of the
    // buffer's bytes, all at once, to the next peer.
    let n = args.peers;
    let ring_bytes = (2 * (n - 1) * args.numel * 4 / n) as u64;
    // The same traffic spread evenly over the other peers (an all-reduce's pattern of flows).
    let mut copy = |direct: bool, all: bool| -> Result<f64> {
        let mut ring = Vec::new();
        for _ in 0..args.rounds.max(1) {
            for (i, p) in procs.iter_mut().enumerate() {
                let (to, bytes) = if all {
                    let others = (1..n).map(|k| members[(i + k) % n].clone()).collect();
                    (others, ring_bytes / (n as u64 - 1))
                } else {
                    (vec![members[(i + 1) % n].clone()], ring_bytes)
                };
                p.send(&ToPeer::Spread { to, bytes, direct })?;
            }
            let mut wall = 0f64;
            for p in procs.iter_mut() {
                match p.recv()? {
                    FromPeer::Rang { wall_s } => wall = wall.max(wall_s),
                    other => bail!("unexpected {other:?}"),
                }
            }
            ring.push(wall);
        }
        ring.sort_by(f64::total_cmp);
        Ok(ring[ring.len() / 2])
    };
    let ring_copy_s = copy(false, false)?;
    let direct_ring_copy_s = if direct { copy(true, false)? } else { f64::NAN };
    let all_to_all_copy_s = copy(direct, true)?;
    procs[0].send(&ToPeer::Copy {
        peer: members[1].0.clone(),
        addrs: members[1].1.clone(),
        tcp: tcp[1].clone(),
        bytes: (args.numel * 4) as u64,
    })?;
    let (tcp_s, noise_s, tls_s, direct_s) = match procs[0].recv()? {
        FromPeer::Copied {
            tcp_s,
            noise_s,
            tls_s,
            direct_s,
        } => (tcp_s, noise_s, tls_s, direct_s),
        other => bail!("unexpected {other:?}"),
    };
    drop(procs);
    let mut walls: Vec<f64> = rounds.iter().map(|r| r.wall_s).collect();
    walls.sort_by(f64::total_cmp);
    let median_wall_s = walls[walls.len() / 2];
    let buffer_mib = (args.numel * 4) as f64 / (1 << 20) as f64;
    let above_idle = rounds
        .iter()
        .flat_map(|r| r.peak_rss_mib.iter().zip(&idle).map(|(p, i)| p - i))
        .fold(0f64, f64::max);
    let report = Report {
        peers: args.peers,
        numel: args.numel,
        codec: args.codec.clone(),
        robust: args.robust,
        security: args.security.clone(),
        buffer_mib,
        idle_rss_mib: idle.clone(),
        above_idle_per_buffer: above_idle / buffer_mib,
        rounds,
        median_wall_s,
        tcp_copy_s: tcp_s,
        noise_copy_s: noise_s,
        tls_copy_s: tls_s,
        direct_copy_s: direct_s,
        direct,
        rates_mb_s: rates.iter().map(|r| r / 1e6).collect(),
        ring_copy_s,
        direct_ring_copy_s,
        all_to_all_copy_s,
        ratio_to_ring_copy: median_wall_s / ring_copy_s,
        ratio_to_own_ring_copy: median_wall_s
            / if direct {
                direct_ring_copy_s
            } else {
                ring_copy_s
            },
        butterfly_limit_s: args
            .link_mbit
            .map(|mbit| (2 * (n - 1) * args.numel * 4 / n) as f64 * 8.0 / (mbit * 1e6)),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "all-reduce of {} floats ({:.0} MiB), {} peers {}, codec {}, {}, {} first, {}",
        report.numel,
        report.buffer_mib,
        report.peers,
        if args.netns.is_some() {
            "in network namespaces"
        } else {
            "on loopback"
        },
        report.codec,
        if report.robust {
            "CenteredClip, each part reduced twice and compared (--robust)"
        } else {
            "the mean"
        },
        report.security,
        if direct {
            "direct channels"
        } else {
            "libp2p streams only"
        }
    );
    let rates: Vec<String> = report
        .rates_mb_s
        .iter()
        .map(|r| format!("{r:.1}"))
        .collect();
    println!(
        "measured rates, each peer to the next (MB/s): {}{}",
        rates.join(" "),
        if args.pace > 0.0 {
            format!("; direct channels paced to {}× them", args.pace)
        } else {
            String::new()
        }
    );
    println!("round  wall s  sent/peer MB  MB/s   peak RSS per peer (MiB)  complete  max error");
    for r in &report.rounds {
        let rss: Vec<String> = r.peak_rss_mib.iter().map(|m| format!("{m:.0}")).collect();
        println!(
            "{:>5}  {:>6.3}  {:>12.1}  {:>5.0}  {:<23}  {:<8}  {:.2e}",
            r.round,
            r.wall_s,
            r.sent_per_peer_mb,
            r.throughput_mb_s,
            rss.join(" "),
            r.complete,
            r.max_error
        );
    }
    let idle_max = idle.iter().copied().fold(0f64, f64::max);
    println!(
        "peak RSS above each peer's idle {idle_max:.0} MiB: at most {above_idle:.0} MiB = {:.2}× the {buffer_mib:.0} MiB buffer",
        report.above_idle_per_buffer
    );
    let mb = (args.numel * 4) as f64 / 1e6;
    println!("same bytes between peers 0 and 1 ({mb:.0} MB), same processes:");
    println!(
        "  raw TCP copy              {tcp_s:.3} s  ({:.0} MB/s)",
        mb / tcp_s
    );
    println!(
        "  libp2p stream, noise      {noise_s:.3} s  ({:.0} MB/s)",
        mb / noise_s
    );
    println!(
        "  libp2p stream, TLS        {tls_s:.3} s  ({:.0} MB/s)",
        mb / tls_s
    );
    println!(
        "  direct channel (AES-GCM)  {direct_s:.3} s  ({:.0} MB/s)",
        mb / direct_s
    );
    println!(
        "ring copies: every peer sends {:.0} MB to the next, at once (an all-reduce's traffic, no work):",
        ring_bytes as f64 / 1e6
    );
    println!("  over libp2p streams       {ring_copy_s:.3} s");
    if direct {
        println!("  over direct channels      {direct_ring_copy_s:.3} s");
    }
    println!(
        "  spread over all others    {all_to_all_copy_s:.3} s  (the all-reduce's flows, {})",
        if direct { "direct" } else { "libp2p" }
    );
    println!(
        "median all-reduce {:.3} s = {:.2}× the libp2p ring copy, {:.2}× the ring copy over the transport it used",
        report.median_wall_s, report.ratio_to_ring_copy, report.ratio_to_own_ring_copy
    );
    if let Some(limit) = report.butterfly_limit_s {
        println!(
            "butterfly limit at {} Mbit/s (what one peer sends, uncompressed): {limit:.3} s; \
             the all-reduce takes {:.2}× that",
            args.link_mbit.unwrap_or_default(),
            report.median_wall_s / limit
        );
    }
    Ok(())
}
