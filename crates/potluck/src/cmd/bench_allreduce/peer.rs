//! The hidden peer side of `potluck bench allreduce`: one process of the benchmark's swarm,
//! told what to do by the parent over stdin, answering over stdout.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use libp2p::{Multiaddr, PeerId};
use potluck_allreduce::balance::Mode;
use potluck_allreduce::butterfly::{self, CodecPlan, Group, Inbox, Member, Settings};
use potluck_allreduce::codec::Codec;
use potluck_net::host::{self, ClientMode, Host, Security, Transports};
use potluck_net::identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{FromPeer, ToPeer};

/// The hidden peer side: `potluck bench allreduce-peer`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct PeerArgs {
    #[arg(long, default_value = "noise")]
    pub(crate) security: String,
    /// Direct channels for the all-reduce: on or off.
    #[arg(long, default_value = "on")]
    pub(crate) direct: String,
    /// Runtime worker threads (the parent gives each peer its share of the cores).
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) ip: String,
}

fn security(s: &str) -> Result<Security> {
    match s {
        "noise" => Ok(Security::Noise),
        "tls" => Ok(Security::Tls),
        _ => bail!("security `{s}`: use noise or tls"),
    }
}

fn say(msg: &FromPeer) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(msg)?)?;
    out.flush()?;
    Ok(())
}

async fn start_host(security: Security, listen: Option<&str>, direct: bool) -> Result<Host> {
    let mut cfg = host::Config::new(identity::generate(), Transports::Network);
    cfg.client_mode = ClientMode::Off;
    cfg.security = security;
    cfg.direct = direct;
    if let Some(ip) = listen {
        cfg.listen = vec![format!("/ip4/{ip}/tcp/0").parse()?];
    }
    Ok(Host::start(cfg, Arc::new(host::NoDht)).await?)
}

/// The value peer `me` starts round `round` with at index `j`; the mean over peers is known.
fn initial(me: usize, j: usize) -> f32 {
    (me as f32 + 1.0) * 0.25 + ((j % 1024) as f32) * 1e-3
}

pub(crate) fn peer(args: &PeerArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async {
        if let Err(e) = peer_main(args).await {
            let _ = say(&FromPeer::Failed(format!("{e:#}")));
        }
    });
    Ok(())
}

async fn peer_main(args: &PeerArgs) -> Result<()> {
    let host = start_host(
        security(&args.security)?,
        Some(&args.ip),
        args.direct == "on",
    )
    .await?;
    let inbox = Inbox::start(&host)?;
    let tcp = tokio::net::TcpListener::bind((args.ip.as_str(), 0)).await?;
    let tcp_addr = tcp.local_addr()?.to_string();
    tokio::spawn(serve_tcp_copies(tcp));
    say(&FromPeer::Ready {
        peer: host.peer_id().to_string(),
        addrs: host
            .listen_addrs()
            .await?
            .iter()
            .map(|a| a.to_string())
            .collect(),
        tcp: tcp_addr,
        idle_rss_mib: crate::cmd::bench::rss().0,
    })?;
    // Stdin lines arrive on a blocking thread, passed over a bounded channel.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let mut group: Option<(Group, usize, Settings)> = None;
    let mut buffer = Vec::new();
    while let Some(line) = rx.recv().await {
        match serde_json::from_str::<ToPeer>(&line)? {
            ToPeer::Group {
                members,
                me,
                numel,
                codec,
                chunk,
                window,
                pace,
                robust,
            } => {
                let members = members
                    .iter()
                    .map(|(peer, addrs)| {
                        Ok(Member {
                            peer: peer.parse()?,
                            addrs: addrs.iter().map(|a| a.parse()).collect::<Result<_, _>>()?,
                            mode: Mode::Full,
                            // Replaced by measured rates before every round.
                            rate: 1e9,
                            max_weight: f64::INFINITY,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let codec: Codec = codec.parse().map_err(|e: String| anyhow::anyhow!(e))?;
                let g = Group::new([0; 32], members, numel)?;
                let settings = Settings {
                    chunk,
                    window,
                    plan: CodecPlan::uniform(codec),
                    pace: (pace > 0.0).then_some(pace),
                    ..Settings::default()
                };
                let settings = if robust { settings.robust() } else { settings };
                buffer = vec![0f32; numel];
                group = Some((g, me, settings));
            }
            ToPeer::Round { round, rates } => {
                let (g, me, settings) = group.as_mut().context("round before group")?;
                let mut members = g.members.clone();
                for (m, r) in members.iter_mut().zip(&rates) {
                    m.rate = *r;
                }
                *g = Group::new([round as u8 + 1; 32], members, buffer.len())?;
                let n = g.members.len();
                for (j, v) in buffer.iter_mut().enumerate() {
                    *v = initial(*me, j);
                }
                let t = Instant::now();
                let report =
                    butterfly::all_reduce(&inbox, g, *me, 1.0, &mut buffer, settings).await?;
                let wall_s = t.elapsed().as_secs_f64();
                // The mean of `initial` over the peers, in closed form.
                let offset = (n as f32 + 1.0) * 0.5 * 0.25;
                let max_error = buffer
                    .iter()
                    .enumerate()
                    .map(|(j, v)| (v - (offset + ((j % 1024) as f32) * 1e-3)).abs())
                    .fold(0f32, f32::max);
                say(&FromPeer::Done {
                    round,
                    wall_s,
                    sent: report.bytes_sent,
                    received: report.bytes_received,
                    complete: report.complete(),
                    max_error,
                    peak_rss_mib: crate::cmd::bench::rss().1,
                    rate: report.rate(),
                })?;
            }
            ToPeer::Measure { to, direct } => {
                let peer: PeerId = to.0.parse()?;
                let addrs: Vec<Multiaddr> =
                    to.1.iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
                let probe = host
                    .measure(
                        peer,
                        addrs,
                        Duration::from_millis(400),
                        Duration::from_secs(120),
                        direct,
                    )
                    .await?;
                say(&FromPeer::Measured {
                    rate: probe.bytes_per_second(),
                })?;
            }
            ToPeer::Spread { to, bytes, direct } => {
                let mut probes = Vec::new();
                for (peer, addrs) in to {
                    let peer: PeerId = peer.parse()?;
                    let addrs: Vec<Multiaddr> =
                        addrs.iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
                    let host = &host;
                    probes.push(async move {
                        let t = Instant::now();
                        host.probe_via(peer, addrs, bytes, Duration::from_secs(600), direct)
                            .await?;
                        Ok::<f64, host::Error>(t.elapsed().as_secs_f64())
                    });
                }
                let walls = futures::future::try_join_all(probes).await?;
                say(&FromPeer::Rang {
                    wall_s: walls.into_iter().fold(0.0, f64::max),
                })?;
            }
            ToPeer::Copy {
                peer,
                addrs,
                tcp,
                bytes,
            } => {
                let peer: PeerId = peer.parse()?;
                let addrs: Vec<Multiaddr> =
                    addrs.iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
                let tcp_s = tcp_copy(&tcp, bytes).await?;
                let deadline = Duration::from_secs(600);
                let mut stream_s = Vec::new();
                for s in [Security::Noise, Security::Tls] {
                    // A dialer's first offer is what gets negotiated (both sides accept both).
                    let dialer = start_host(s, None, false).await?;
                    let probe = dialer.probe(peer, addrs.clone(), bytes, deadline).await?;
                    stream_s.push(probe.elapsed.as_secs_f64());
                }
                let direct = start_host(Security::Noise, None, true)
                    .await?
                    .probe_via(peer, addrs.clone(), bytes, deadline, true)
                    .await?;
                say(&FromPeer::Copied {
                    tcp_s,
                    noise_s: stream_s[0],
                    tls_s: stream_s[1],
                    direct_s: direct.elapsed.as_secs_f64(),
                })?;
            }
            ToPeer::Exit => break,
        }
    }
    Ok(())
}

/// Reads `u64 n` then `n` bytes per connection, answers one byte.
async fn serve_tcp_copies(listener: tokio::net::TcpListener) {
    while let Ok((mut socket, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut len = [0u8; 8];
            if socket.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut left = u64::from_le_bytes(len).min(host::MAX_PROBE);
            let mut buf = vec![0u8; 1 << 16];
            while left > 0 {
                let want = left.min(buf.len() as u64) as usize;
                match socket.read(&mut buf[..want]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => left -= n as u64,
                }
            }
            let _ = socket.write_all(&[1]).await;
        });
    }
}

async fn tcp_copy(addr: &str, bytes: u64) -> Result<f64> {
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    let t = Instant::now();
    socket.write_all(&bytes.to_le_bytes()).await?;
    let chunk = vec![0x5au8; 1 << 16];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        socket.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    let mut ack = [0u8; 1];
    socket.read_exact(&mut ack).await?;
    Ok(t.elapsed().as_secs_f64())
}
