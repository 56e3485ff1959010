//! `potluck bench dht`: store and get latency and success rate of the DHT with many nodes in
//! one process (in-memory transport or loopback TCP). hivemind publishes, for 1,024 peers on one
//! host, mean store 14.9 ms and mean get 6.6 ms at 100% success.

use std::time::Instant;

use anyhow::{Result, bail};
use futures::future::join_all;
use potluck_core::clock;
use potluck_net::dht::store::Entry;
use potluck_net::dht::{Config, Dht};
use potluck_net::host::{self, Transports};
use potluck_net::identity;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::cmd::bench::DhtArgs;

#[derive(Debug, Serialize)]
struct Latency {
    median_ms: f64,
    p99_ms: f64,
    mean_ms: f64,
    success: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    nodes: usize,
    keys: usize,
    transport: String,
    setup_s: f64,
    store: Latency,
    get: Latency,
    peak_rss_mib: f64,
}

fn latency(mut ms: Vec<f64>, ok: usize, total: usize) -> Latency {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        ms.get(((ms.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Latency {
        median_ms: at(0.5),
        p99_ms: at(0.99),
        mean_ms: ms.iter().sum::<f64>() / ms.len().max(1) as f64,
        success: ok as f64 / total.max(1) as f64,
    }
}

async fn start(transport: Transports) -> Result<Dht> {
    Ok(match transport {
        Transports::Memory => Dht::start_memory(identity::generate(), Config::default()).await?,
        Transports::Network => {
            let mut cfg = host::Config::new(identity::generate(), Transports::Network);
            cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
            Dht::start(cfg, Config::default(), Default::default()).await?
        }
    })
}

async fn bench(args: &DhtArgs) -> Result<Report> {
    let transport = match args.transport.as_str() {
        "memory" => Transports::Memory,
        "tcp" => Transports::Network,
        other => bail!("unknown transport {other:?}: memory or tcp"),
    };
    let started = Instant::now();
    let first = start(transport).await?;
    let mut addrs = vec![first.addrs().await?];
    let mut nodes = vec![first];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    // Join in waves, each newcomer through a random node already in (as peers of a real run
    // would be given different initial peers): one by one at first, then many at a time.
    while nodes.len() < args.nodes {
        let wave = (nodes.len() / 2).clamp(1, 32).min(args.nodes - nodes.len());
        let boots: Vec<_> = (0..wave)
            .map(|_| addrs[rng.random_range(0..addrs.len())].clone())
            .collect();
        let joined = join_all(boots.iter().map(|boot| async move {
            let node = start(transport).await?;
            node.bootstrap(boot).await?;
            Ok::<_, anyhow::Error>(node)
        }))
        .await;
        for node in joined {
            let node = node?;
            addrs.push(node.addrs().await?);
            nodes.push(node);
        }
    }
    let setup = started.elapsed().as_secs_f64();
    tracing::info!("{} nodes up in {setup:.1} s", nodes.len());

    let expiration = clock::now() + 3_600_000;
    let (mut store_ms, mut stored) = (Vec::new(), 0);
    for k in 0..args.keys {
        let node = &nodes[rng.random_range(0..nodes.len())];
        let key = format!("bench.key{k}");
        let t = Instant::now();
        let ok = node
            .store(key.as_bytes(), None, key.as_bytes().to_vec(), expiration)
            .await
            .is_ok();
        store_ms.push(t.elapsed().as_secs_f64() * 1e3);
        stored += usize::from(ok);
    }
    let (mut get_ms, mut found) = (Vec::new(), 0);
    for k in 0..args.keys {
        let node = &nodes[rng.random_range(0..nodes.len())];
        let key = format!("bench.key{k}");
        let t = Instant::now();
        let got = node.get(key.as_bytes()).await;
        get_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if matches!(got, Ok(Some(Entry::Value(item))) if item.value == key.as_bytes()) {
            found += 1;
        }
    }
    let peak = crate::cmd::bench::rss().1;
    drop(nodes);
    Ok(Report {
        nodes: args.nodes,
        keys: args.keys,
        transport: args.transport.clone(),
        setup_s: setup,
        store: latency(store_ms, stored, args.keys),
        get: latency(get_ms, found, args.keys),
        peak_rss_mib: peak,
    })
}

pub(crate) fn run(args: &DhtArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(bench(args))?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "bench dht: {} nodes ({}), {} keys, set up in {:.1} s, peak RSS {:.0} MiB",
        r.nodes, r.transport, r.keys, r.setup_s, r.peak_rss_mib
    );
    println!(
        "{:<6} {:>10} {:>10} {:>10} {:>9}",
        "op", "median ms", "p99 ms", "mean ms", "success"
    );
    for (name, l) in [("store", &r.store), ("get", &r.get)] {
        println!(
            "{:<6} {:>10.2} {:>10.2} {:>10.2} {:>8.1}%",
            name,
            l.median_ms,
            l.p99_ms,
            l.mean_ms,
            100.0 * l.success
        );
    }
    Ok(())
}
