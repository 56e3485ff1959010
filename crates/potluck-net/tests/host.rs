//! The host on libp2p's in-memory transport: bulk streams (bytes intact, backpressure) and
//! relay v2 circuits; on TCP over loopback: simultaneous dials, direct channels.

use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use potluck_net::direct;
use potluck_net::host::{self, ClientMode, Host, NoDht, RelayLimits, Transports};
use sha2::{Digest, Sha256};

fn memory_addr() -> Multiaddr {
    Protocol::Memory(rand::random::<u64>() | 1).into()
}

async fn start(listen: Vec<Multiaddr>, relay: bool) -> Host {
    let mut cfg = host::Config::new(Keypair::generate_ed25519(), Transports::Memory);
    cfg.listen = listen;
    cfg.client_mode = ClientMode::Off;
    cfg.relay = relay.then(RelayLimits::default);
    Host::start(cfg, Arc::new(NoDht)).await.unwrap()
}

/// Deterministic bytes that a lost, doubled or reordered chunk would change.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
        .collect()
}

const BULK: &str = "/potluck-test/bulk/1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_streams_deliver_every_byte_and_a_writer_waits_for_a_slow_reader() {
    let b = start(vec![memory_addr()], false).await;
    let a = start(vec![memory_addr()], false).await;
    let mut incoming = b.accept(BULK).unwrap();
    let b_addrs = b.listen_addrs().await.unwrap();
    let data = pattern(64 << 20);
    let mut out = a
        .open_stream(b.peer_id(), b_addrs, BULK, Duration::from_secs(10))
        .await
        .unwrap();
    // Phase 1: nobody reads. Writes go through until flow control stops them: a write that
    // blocks for a second means the writer is held back.
    let mut sent = 0;
    while sent < data.len() {
        let end = (sent + (64 << 10)).min(data.len());
        match tokio::time::timeout(Duration::from_secs(1), out.write(&data[sent..end])).await {
            Ok(Ok(n)) => sent += n,
            Ok(Err(e)) => panic!("write failed: {e}"),
            Err(_) => break,
        }
    }
    assert!(
        sent > 0 && sent < 8 << 20,
        "the writer got {sent} bytes ahead of a reader that reads nothing"
    );
    // Phase 2: the reader takes the stream and reads everything; the writer finishes.
    let (from, mut inbound) = incoming.next().await.unwrap();
    assert_eq!(from, a.peer_id());
    let reader = tokio::spawn(async move {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        loop {
            let n = inbound.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            total += n;
        }
        (total, hash.finalize())
    });
    out.write_all(&data[sent..]).await.unwrap();
    out.close().await.unwrap();
    let (total, hash) = reader.await.unwrap();
    assert_eq!(total, data.len());
    assert_eq!(hash, Sha256::digest(&data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_reachable_only_through_a_relay_is_reached_and_probed() {
    let relay = start(vec![memory_addr()], true).await;
    let relay_addr = relay.listen_addrs().await.unwrap()[0]
        .clone()
        .with(Protocol::P2p(relay.peer_id()));
    // B listens on nothing but a circuit through the relay.
    let b = start(vec![relay_addr.clone().with(Protocol::P2pCircuit)], false).await;
    let reach = b.reachability();
    assert_eq!(reach.relay_addrs.len(), 1, "{reach:?}");
    let a = start(vec![], false).await;
    let circuit = relay_addr
        .with(Protocol::P2pCircuit)
        .with(Protocol::P2p(b.peer_id()));
    let probe = a
        .probe(b.peer_id(), vec![circuit], 1 << 20, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(probe.bytes, 1 << 20);
    assert!(probe.relayed, "{probe:?}");
    let connections = a.connections(b.peer_id()).await.unwrap();
    assert!(
        connections
            .iter()
            .all(|c| c.iter().any(|p| p == Protocol::P2pCircuit)),
        "{connections:?}"
    );
    // A probe over the limit is refused by the listener, not read into memory.
    let too_big = a
        .probe(
            b.peer_id(),
            vec![],
            host::MAX_PROBE + 1,
            Duration::from_secs(5),
        )
        .await;
    assert!(too_big.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_dialing_each_other_at_once_over_tcp_both_connect() {
    // With port reuse both dials can become one TCP simultaneous open in which both sides
    // start the security handshake as initiators; connect() must get past it.
    for _ in 0..10 {
        let tcp = || {
            let mut cfg = host::Config::new(Keypair::generate_ed25519(), Transports::Network);
            cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
            cfg.client_mode = ClientMode::Off;
            Host::start(cfg, Arc::new(NoDht))
        };
        let (a, b) = (tcp().await.unwrap(), tcp().await.unwrap());
        let (a_addrs, b_addrs) = (
            a.listen_addrs().await.unwrap(),
            b.listen_addrs().await.unwrap(),
        );
        let deadline = Duration::from_secs(10);
        let (ab, ba) = tokio::join!(
            a.connect(b.peer_id(), b_addrs, deadline),
            b.connect(a.peer_id(), a_addrs, deadline)
        );
        ab.unwrap();
        ba.unwrap();
    }
}

async fn tcp_host() -> Host {
    let mut cfg = host::Config::new(Keypair::generate_ed25519(), Transports::Network);
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    cfg.client_mode = ClientMode::Off;
    Host::start(cfg, Arc::new(NoDht)).await.unwrap()
}

/// Probes between TCP hosts go over a direct channel and count every byte; over the libp2p
/// stream when asked to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_over_tcp_take_a_direct_channel() {
    let (a, b) = (tcp_host().await, tcp_host().await);
    assert!(a.direct().is_some() && a.wants_direct(b.peer_id()));
    let addrs = b.listen_addrs().await.unwrap();
    let deadline = Duration::from_secs(20);
    for direct in [true, false] {
        let p = a
            .probe_via(b.peer_id(), addrs.clone(), 8 << 20, deadline, direct)
            .await
            .unwrap();
        assert_eq!(p.bytes, 8 << 20);
        assert!(!p.relayed);
    }
    let m = a
        .measure(
            b.peer_id(),
            addrs,
            Duration::from_millis(200),
            deadline,
            true,
        )
        .await
        .unwrap();
    // Grown past the first MiB until the probe took a quarter of the target (or hit the cap).
    assert!(m.bytes > 1 << 20 && m.bytes_per_second() > 0.0, "{m:?}");
    assert!(a.wants_direct(b.peer_id()), "nothing failed");
}

/// A direct channel that cannot connect (the port closed) leaves both sides on the libp2p
/// stream, bytes intact, and the peer is not asked for one again for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_direct_port_falls_back_to_the_stream_and_is_remembered() {
    let (a, b) = (tcp_host().await, tcp_host().await);
    let mut incoming = b.accept(BULK).unwrap();
    // An offer for a port nobody listens on any more.
    let listener = direct::Listener::bind("127.0.0.1".parse().unwrap()).unwrap();
    let (offer, expected) = listener.expect(a.peer_id()).unwrap();
    drop(listener);
    let addrs = b.listen_addrs().await.unwrap();
    let deadline = Duration::from_secs(10);
    let stream = a
        .open_stream(b.peer_id(), addrs.clone(), BULK, deadline)
        .await
        .unwrap();
    let accepting = tokio::spawn(async move {
        let (_, stream) = incoming.next().await.unwrap();
        let bulk = direct::chosen(stream, expected).await.unwrap();
        assert!(!bulk.is_direct());
        let (mut r, _w) = bulk.into_split();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    });
    let bulk = a.choose_direct(stream, b.peer_id(), &offer).await.unwrap();
    assert!(!bulk.is_direct());
    let (_r, mut w) = bulk.into_split();
    let data = pattern(100_000);
    w.write_all(&data).await.unwrap();
    w.close().await.unwrap();
    assert_eq!(accepting.await.unwrap(), data);
    assert!(!a.wants_direct(b.peer_id()));
    assert!(a.wants_direct(PeerId::random()));
}

/// A direct channel goes only to the address of the connection a member already has with the
/// peer: an offer whose port answers only at another address (here 127.0.0.2, standing for a
/// service on the member's network that the peer names) is not dialed there (before, the
/// member dialed every address the peer advertised and wrote the offer's token to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_channel_is_dialed_only_where_the_peer_is_connected() {
    let (a, b) = (tcp_host().await, tcp_host().await);
    let mut incoming = b.accept(BULK).unwrap();
    // The port answers at 127.0.0.2 only; b is connected at 127.0.0.1.
    let elsewhere = direct::Listener::bind("127.0.0.2".parse().unwrap()).unwrap();
    let (offer, expected) = elsewhere.expect(a.peer_id()).unwrap();
    let addrs = b.listen_addrs().await.unwrap();
    let stream = a
        .open_stream(b.peer_id(), addrs, BULK, Duration::from_secs(10))
        .await
        .unwrap();
    let accepting = tokio::spawn(async move {
        let (_, stream) = incoming.next().await.unwrap();
        direct::chosen(stream, expected).await.unwrap().is_direct()
    });
    let bulk = a.choose_direct(stream, b.peer_id(), &offer).await.unwrap();
    assert!(!bulk.is_direct(), "dialed an address b is not connected at");
    assert!(!accepting.await.unwrap());
    drop(elsewhere);
}

/// Two reachable hosts that probe each other's reachability every second stay public, and
/// autonat's dial-backs do not pile up as connections. Before, every dial-back stayed open
/// (requests are spread over all of a peer's connections, so none idled out) until the
/// per-peer limit of 4 denied the next one: on 10 Mbit/s links every peer of a run was found
/// private two minutes in, and after the grace all of them went client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reachability_probes_leave_no_connections_behind() {
    let probing = || {
        let mut cfg = host::Config::new(Keypair::generate_ed25519(), Transports::Network);
        cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
        cfg.nat_boot_delay = Duration::from_millis(100);
        cfg.nat_retry = Duration::from_secs(1);
        // Busy connections: none closes for want of traffic while the test runs.
        cfg.idle_timeout = Duration::from_secs(600);
        Host::start(cfg, Arc::new(NoDht))
    };
    let (a, b) = (probing().await.unwrap(), probing().await.unwrap());
    let addrs = b.listen_addrs().await.unwrap();
    a.connect(b.peer_id(), addrs, Duration::from_secs(10))
        .await
        .unwrap();
    // Each probe of either host is one dial-back over the same pair: six of them would pass
    // the per-peer limit three times over if they stayed.
    let probes = 4;
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        while a.reachability().nat_probes < probes || b.reachability().nat_probes < probes {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (ra, rb) = (a.reachability(), b.reachability());
    assert!(
        waited.is_ok(),
        "fewer than {probes} probes each: {ra:?} {rb:?}"
    );
    assert_eq!((ra.nat, rb.nat), (host::Nat::Public, host::Nat::Public));
    // The first connection, and at most a dial-back of each host's last probe still closing.
    let open = a.connections(b.peer_id()).await.unwrap();
    assert!(open.len() <= 3, "{open:?}");
}
