//! A flood: one peer sending 10,000 DHT requests a second to a node does not stop that node
//! from finishing its rounds (matchmaking over the DHT, then the all-reduce), and its memory
//! stays bounded. Real TCP hosts on loopback, one process.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use potluck_allreduce::balance::Mode;
use potluck_allreduce::butterfly;
use potluck_allreduce::matchmaking::{self, Matchmaker};
use potluck_core::clock;
use potluck_net::dht::record::Validators;
use potluck_net::dht::wire::{self, Request, RequestBody, ResponseBody};
use potluck_net::dht::{self, Dht};
use potluck_net::host::{ClientMode, Host};

use crate::util::{Node, tcp};

async fn nodes(n: usize) -> Vec<Node> {
    let mut out: Vec<Node> = Vec::new();
    for _ in 0..n {
        let keypair = Keypair::generate_ed25519();
        let config = dht::Config {
            client_mode: ClientMode::Off,
            ..dht::Config::default()
        };
        let dht = Dht::start(tcp(keypair.clone()), config, Validators::default())
            .await
            .unwrap();
        out.push(Node::start(dht, keypair));
    }
    let boot = out[0].dht.addrs().await.unwrap();
    for node in &out[1..] {
        node.dht.bootstrap(&boot).await.unwrap();
    }
    out
}

/// One round among all `nodes`: a group by a deadline, then the all-reduce of `len` floats
/// (node i contributes i + 1 everywhere). Returns the time from the deadline to the last
/// result.
async fn round(nodes: &[Node], round: u64, len: usize) -> Duration {
    const LEAD: Duration = Duration::from_millis(1500);
    let (start, deadline) = (Instant::now(), clock::now() + LEAD.as_millis() as u64);
    let jobs = nodes.iter().enumerate().map(|(i, node)| async move {
        let mm = Matchmaker {
            dht: &node.dht,
            keypair: &node.keypair,
            run: "flood",
            settings: matchmaking::Settings {
                target: nodes.len(),
                ..matchmaking::Settings::default()
            },
        };
        let addrs = node.dht.addrs().await.unwrap();
        let offer = matchmaking::offer(&addrs, Mode::Full, 1e8);
        let group = mm.form_group(round, deadline, &offer, len).await.unwrap();
        assert_eq!(
            group.members.len(),
            nodes.len(),
            "round {round}: a member is missing"
        );
        let me = node.index_in(&group);
        let mut buffer = vec![i as f32 + 1.0; len];
        let settings = butterfly::Settings::default();
        let report = butterfly::all_reduce(&node.inbox, &group, me, 1.0, &mut buffer, &settings)
            .await
            .unwrap();
        assert!(report.complete(), "round {round}: {report:?}");
        let mean = (1..=nodes.len()).sum::<usize>() as f32 / nodes.len() as f32;
        assert!(buffer.iter().all(|v| (v - mean).abs() < 1e-5));
        Instant::now()
    });
    let last = futures::future::join_all(jobs)
        .await
        .into_iter()
        .max()
        .unwrap();
    last.duration_since(start).saturating_sub(LEAD)
}

/// The resident set of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// What the flood achieved.
#[derive(Debug, Default)]
struct Counts {
    sent: AtomicU64,
    answered: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

/// Sends `per_second` Get requests to `target` until `stop`, at most `outstanding` at once
/// (the attacker's own memory is not what is measured).
async fn flood(
    host: Host,
    target: libp2p::PeerId,
    addrs: Vec<libp2p::Multiaddr>,
    per_second: u64,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(1024));
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let per_tick = per_second / 1000;
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        // Catch up to the rate if ticks came late.
        let due = started.elapsed().as_millis() as u64 * per_tick;
        while counts.sent.load(Ordering::Relaxed) < due {
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                break;
            };
            counts.sent.fetch_add(1, Ordering::Relaxed);
            let (host, addrs, counts) = (host.clone(), addrs.clone(), counts.clone());
            tokio::spawn(async move {
                let request = Request {
                    client: true,
                    body: RequestBody::Get {
                        key: b"flood/key".to_vec(),
                    },
                };
                let answer =
                    wire::rpc(&host, target, addrs, &request, Duration::from_secs(2)).await;
                let counter = match answer {
                    Ok(r) if matches!(r.body, ResponseBody::Refused { .. }) => &counts.refused,
                    Ok(_) => &counts.answered,
                    Err(_) => &counts.failed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                drop(slot);
            });
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_requests_does_not_stop_a_node_finishing_its_rounds() {
    let nodes = nodes(3).await;
    let len = 1 << 20;
    // Rounds in peace, for the figures.
    let mut calm = Vec::new();
    for r in 0..2 {
        calm.push(round(&nodes, r, len).await);
    }
    let before = rss();
    // One peer floods node 0 with 10,000 requests a second.
    let attacker = Host::start(tcp(Keypair::generate_ed25519()), Arc::new(dht::Refusing))
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let target = nodes[0].dht.peer_id();
    let addrs = nodes[0].dht.addrs().await.unwrap();
    let flooding = tokio::spawn(flood(
        attacker,
        target,
        addrs,
        10_000,
        stop.clone(),
        counts.clone(),
    ));
    let peak = Arc::new(AtomicU64::new(before));
    let sampling = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let flood_started = Instant::now();
    let mut flooded = Vec::new();
    for r in 2..7 {
        flooded.push(round(&nodes, r, len).await);
    }
    let secs = flood_started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    flooding.await.unwrap();
    sampling.await.unwrap();
    let (refused, bans) = nodes[0].dht.host().refusals();
    let sent = counts.sent.load(Ordering::Relaxed);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let grew = peak.load(Ordering::Relaxed).saturating_sub(before);
    eprintln!(
        "flood: {sent} requests in {secs:.1} s ({:.0}/s): {} answered, {} refused, {} failed; \
         node 0 refused {refused} and banned {bans}",
        sent as f64 / secs,
        counts.answered.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "rounds of {len} floats among 3: {:?} in peace, {:?} under the flood; RSS {:.0} MiB \
         before, peak {:.0} MiB under the flood (+{:.0})",
        calm,
        flooded,
        mib(before),
        mib(peak.load(Ordering::Relaxed)),
        mib(grew)
    );
    // The attacker really sent at the rate, and it was stopped: banned for flooding.
    assert!(
        sent as f64 / secs > 5_000.0,
        "the flood sent only {sent} in {secs:.1} s"
    );
    assert!(
        bans >= 1,
        "the flooder was never banned ({refused} refused)"
    );
    // Bounded: the buffers of the rounds are 3 × 4 MiB; the rest is the flood's.
    assert!(mib(grew) < 128.0, "memory grew by {:.0} MiB", mib(grew));
}
