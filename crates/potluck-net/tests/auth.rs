//! Authorized runs on the in-memory transport: admitted peers form a DHT and exchange streams;
//! a peer without a valid token for the run (none, expired, for another run, forged) can
//! neither store nor read, and its streams are dropped; roles are enforced on streams.

use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use potluck_core::clock;
use potluck_net::auth::{Authority, Gate, Role, Token, Verifier};
use potluck_net::dht::store::Entry;
use potluck_net::dht::{Config, Dht};
use potluck_net::host::{self, ClientMode, Host, NoDht, Transports};
use potluck_net::revoke;

const RUN: &str = "authrun";
const BULK: &str = "/potluck-test/bulk/1";

fn memory_addr() -> Multiaddr {
    Protocol::Memory(rand::random::<u64>() | 1).into()
}

/// What token a test peer presents.
#[derive(Clone, Copy, Debug)]
enum Holds {
    Valid(Role),
    Nothing,
    Expired,
    OtherRun,
    Forged,
}

fn host_config(authority: &Authority, holds: Holds) -> host::Config {
    let keypair = Keypair::generate_ed25519();
    let peer = keypair.public().to_peer_id();
    let mut cfg = host::Config::new(keypair, Transports::Memory);
    cfg.listen = vec![memory_addr()];
    cfg.client_mode = ClientMode::Off;
    let hour = Duration::from_secs(3600);
    let now = clock::now();
    let token = match holds {
        Holds::Nothing => return cfg,
        Holds::Valid(role) => authority.grant(RUN, peer, role, hour),
        Holds::Expired => {
            authority.grant_at(RUN, peer, Role::Trainer, now - 7_200_000, now - 3_600_000)
        }
        Holds::OtherRun => authority.grant("another-run", peer, Role::Trainer, hour),
        Holds::Forged => Authority::generate().grant(RUN, peer, Role::Trainer, hour),
    };
    let verifier = Verifier {
        run: RUN.into(),
        authority: authority.public(),
    };
    cfg.auth = Some(Arc::new(Gate::new(verifier, token)));
    cfg
}

async fn dht(authority: &Authority, holds: Holds) -> Dht {
    Dht::start(
        host_config(authority, holds),
        Config::default(),
        Default::default(),
    )
    .await
    .unwrap()
}

async fn host(authority: &Authority, holds: Holds) -> Host {
    Host::start(host_config(authority, holds), Arc::new(NoDht))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_peers_with_a_valid_token_can_store_and_read() {
    let authority = Authority::generate();
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(dht(&authority, Holds::Valid(Role::Trainer)).await);
    }
    let boot = members[0].addrs().await.unwrap();
    for m in &members[1..] {
        m.bootstrap(&boot).await.unwrap();
    }
    let exp = clock::now() + 60_000;
    let stored = members[1]
        .store(b"authrun.secret", None, b"members only".to_vec(), exp)
        .await
        .unwrap();
    assert!(stored >= 2, "stored on {stored} members");
    let Some(Entry::Value(item)) = members[2].get(b"authrun.secret").await.unwrap() else {
        panic!("a member cannot read what another stored");
    };
    assert_eq!(item.value, b"members only");

    for holds in [
        Holds::Nothing,
        Holds::Expired,
        Holds::OtherRun,
        Holds::Forged,
    ] {
        let intruder = dht(&authority, holds).await;
        // It may reach the bootstrap's address; what it asks is refused.
        let _ = intruder.bootstrap(&boot).await;
        let stored = intruder
            .store(b"authrun.secret", None, b"overwritten".to_vec(), exp + 1)
            .await
            .unwrap_or(0);
        // Its own store (it serves) is the one that took it.
        assert!(stored <= 1, "{holds:?}: stored on {stored} nodes");
        let read = intruder.get(b"authrun.secret").await.ok().flatten();
        let leaked = matches!(&read, Some(Entry::Value(i)) if i.value == b"members only");
        assert!(!leaked, "{holds:?}: read a member's record");
        // Nothing it sent reached a member: the value is intact and it is in no table.
        let Some(Entry::Value(item)) = members[0].get(b"authrun.secret").await.unwrap() else {
            panic!("{holds:?}: the record is gone");
        };
        assert_eq!(item.value, b"members only", "{holds:?}");
        for m in &members {
            assert!(m.routing_len() < members.len(), "{holds:?}: in a table");
        }
    }

    // A monitor reads the run but stores nothing in it.
    let monitor = dht(&authority, Holds::Valid(Role::Monitor)).await;
    monitor.bootstrap(&boot).await.unwrap();
    let Some(Entry::Value(item)) = monitor.get(b"authrun.secret").await.unwrap() else {
        panic!("a monitor cannot read");
    };
    assert_eq!(item.value, b"members only");
    let stored = monitor
        .store(b"authrun.secret", None, b"a monitor's".to_vec(), exp + 2)
        .await
        .unwrap();
    assert!(stored <= 1, "a monitor stored on {stored} nodes");
    let Some(Entry::Value(item)) = members[2].get(b"authrun.secret").await.unwrap() else {
        panic!("the record is gone");
    };
    assert_eq!(item.value, b"members only");
}

/// Accepts streams on `protocol` (for peers `allow` passes) and reports who opened each.
fn collect(host: &Host, allow: fn(Role) -> bool) -> tokio::sync::mpsc::Receiver<PeerId> {
    let mut incoming = host.accept_from(BULK, allow).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Some((peer, mut stream)) = incoming.next().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut byte = [0u8; 1];
                if stream.read_exact(&mut byte).await.is_ok() {
                    let _ = tx.send(peer).await;
                }
            });
        }
    });
    rx
}

/// The next peer whose stream the member took (bounded: a dropped stream must not hang).
async fn next(opened: &mut tokio::sync::mpsc::Receiver<PeerId>) -> Option<PeerId> {
    tokio::time::timeout(Duration::from_secs(20), opened.recv())
        .await
        .ok()
        .flatten()
}

/// Opens a stream from `from` to `to` and writes a byte.
async fn send(from: &Host, to: &Host) -> Result<(), String> {
    let addrs = to.listen_addrs().await.unwrap();
    let mut stream = from
        .open_stream(to.peer_id(), addrs, BULK, Duration::from_secs(3))
        .await
        .map_err(|e| e.to_string())?;
    stream.write_all(&[7]).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_of_peers_not_admitted_or_in_the_wrong_role_are_dropped() {
    let authority = Authority::generate();
    let member = host(&authority, Holds::Valid(Role::Trainer)).await;
    let mut opened = collect(&member, Role::averages);

    // An intruder without a token opens a stream at once (it waits for no admission); an
    // admitted trainer's stream, sent after it, is the first the member takes.
    let intruder = host(&authority, Holds::Nothing).await;
    let _ = send(&intruder, &member).await;
    let trainer = host(&authority, Holds::Valid(Role::Trainer)).await;
    send(&trainer, &member).await.unwrap();
    assert_eq!(next(&mut opened).await, Some(trainer.peer_id()));

    // A peer with an expired token is never admitted: it gives up without sending.
    let expired = host(&authority, Holds::Expired).await;
    let refused = send(&expired, &member).await.unwrap_err();
    assert!(refused.contains("did not admit"), "{refused}");

    // A monitor is admitted but may not take part in averaging: its stream is dropped, the
    // aux's after it goes through.
    let monitor = host(&authority, Holds::Valid(Role::Monitor)).await;
    let _ = send(&monitor, &member).await;
    let aux = host(&authority, Holds::Valid(Role::Aux)).await;
    send(&aux, &member).await.unwrap();
    assert_eq!(next(&mut opened).await, Some(aux.peer_id()));
    let gate = member.gate().unwrap();
    assert_eq!(gate.role(monitor.peer_id()), Some(Role::Monitor));
    assert_eq!(gate.role(intruder.peer_id()), None);
    assert_eq!(gate.role(expired.peer_id()), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_the_authority_revokes_in_the_dht_is_cut_off_by_every_member() {
    let authority = Authority::generate();
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(dht(&authority, Holds::Valid(Role::Trainer)).await);
    }
    let bad = dht(&authority, Holds::Valid(Role::Trainer)).await;
    let boot = members[0].addrs().await.unwrap();
    for m in members[1..].iter().chain([&bad]) {
        m.bootstrap(&boot).await.unwrap();
    }
    let exp = clock::now() + 60_000;
    // Admitted: what it stores reaches the members.
    let stored = bad
        .store(b"authrun.a", None, b"1".to_vec(), exp)
        .await
        .unwrap();
    assert!(stored >= 3, "stored on {stored}");
    // A forged list (another key's, under its own subkey) and the authority's real one.
    let forger = Authority::generate();
    let forged = forger.revocations(RUN, &[members[1].peer_id()], exp);
    let _ = members[2].store_record(forged).await;
    let list = authority.revocations(RUN, &[bad.peer_id()], exp);
    members[0].store_record(list).await.unwrap();
    let watchers: Vec<_> = members
        .iter()
        .map(|m| tokio::spawn(revoke::watch(m.clone(), Duration::from_millis(100))))
        .collect();
    // Every member revokes it and drops its connections (within the watch's period and the
    // host's one-second sweep); the forged list revoked nobody.
    for m in &members {
        let gate = m.host().gate().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while gate.role(bad.peer_id()).is_some()
            || !m
                .host()
                .connections(bad.peer_id())
                .await
                .unwrap()
                .is_empty()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} still admits it",
                m.peer_id()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for other in &members {
            if other.peer_id() != m.peer_id() {
                assert!(gate.role(other.peer_id()).is_some());
            }
        }
    }
    // Nothing it sends is taken any more.
    let stored = bad
        .store(b"authrun.a", None, b"2".to_vec(), exp + 1)
        .await
        .unwrap_or(0);
    assert!(stored <= 1, "stored on {stored} after its revocation");
    let Some(Entry::Value(item)) = members[1].get(b"authrun.a").await.unwrap() else {
        panic!("the record is gone");
    };
    assert_eq!(item.value, b"1");
    for w in watchers {
        w.abort();
    }
}

#[test]
fn a_token_file_names_the_peer_it_was_granted_to() {
    let authority = Authority::generate();
    let peer = PeerId::random();
    let token = authority.grant(RUN, peer, Role::Aux, Duration::from_secs(60));
    let parsed = Token::from_text(&token.to_text()).unwrap();
    let grant = parsed.grant().unwrap();
    assert_eq!(PeerId::from_bytes(&grant.peer).unwrap(), peer);
    assert_eq!(grant.role, Role::Aux);
    assert_eq!(grant.run, RUN);
}
