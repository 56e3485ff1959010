//! Matchmaking among DHT nodes on the in-memory transport, then averaging in the groups.

use libp2p::identity::Keypair;
use potluck_allreduce::balance::Mode;
use potluck_allreduce::butterfly::{self, Settings};
use potluck_allreduce::matchmaking::{self, Error, Matchmaker};
use potluck_core::clock;
use potluck_net::dht::{self, Dht};

use crate::util::Node;

async fn nodes(n: usize) -> Vec<Node> {
    let mut out: Vec<Node> = Vec::new();
    for _ in 0..n {
        let keypair = Keypair::generate_ed25519();
        let dht = Dht::start_memory(keypair.clone(), dht::Config::default())
            .await
            .unwrap();
        if let Some(first) = out.first() {
            dht.bootstrap(&first.dht.addrs().await.unwrap())
                .await
                .unwrap();
        }
        out.push(Node::start(dht, keypair));
    }
    let boot = out[0].dht.addrs().await.unwrap();
    futures::future::join_all(out.iter().map(|n| n.dht.bootstrap(&boot))).await;
    out
}

fn settings(target: usize) -> matchmaking::Settings {
    matchmaking::Settings {
        target,
        grace: std::time::Duration::from_millis(1500),
        ..matchmaking::Settings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_agree_on_groups_and_average_within_them() {
    let nodes = nodes(8).await;
    let len = 3000;
    let deadline = clock::now() + 2000;
    let jobs = nodes.iter().enumerate().map(|(i, node)| async move {
        let mm = Matchmaker {
            dht: &node.dht,
            keypair: &node.keypair,
            run: "test-run",
            settings: settings(4),
        };
        let addrs = node.dht.addrs().await.unwrap();
        let offer = matchmaking::offer(&addrs, Mode::Full, 1e7);
        let group = mm.form_group(7, deadline, &offer, len).await.unwrap();
        let me = node.index_in(&group);
        let mut buffer = vec![i as f32; len];
        let report = butterfly::all_reduce(
            &node.inbox,
            &group,
            me,
            1.0,
            &mut buffer,
            &Settings::default(),
        )
        .await
        .unwrap();
        assert!(report.complete(), "{report:?}");
        (group, buffer)
    });
    let results = futures::future::join_all(jobs).await;
    // Two groups of four: every member of a group has the same list, and the mean of the
    // group's inputs (each node's input is its index).
    let index = |p: &libp2p::PeerId| nodes.iter().position(|n| n.dht.peer_id() == *p).unwrap();
    let mut lists: Vec<Vec<libp2p::PeerId>> = Vec::new();
    for (group, buffer) in &results {
        let list: Vec<libp2p::PeerId> = group.members.iter().map(|m| m.peer).collect();
        assert_eq!(list.len(), 4);
        let mean = list.iter().map(|p| index(p) as f32).sum::<f32>() / 4.0;
        assert!(buffer.iter().all(|v| (v - mean).abs() < 1e-6));
        if !lists.contains(&list) {
            lists.push(list);
        }
    }
    assert_eq!(lists.len(), 2, "{lists:?}");
    let mut everyone: Vec<_> = lists.concat();
    everyone.sort();
    everyone.dedup();
    assert_eq!(everyone.len(), 8);
}

/// `node`'s matchmaker in the test run, for groups of up to 8.
fn mm(node: &Node) -> Matchmaker<'_> {
    Matchmaker {
        dht: &node.dht,
        keypair: &node.keypair,
        run: "test-run",
        settings: settings(8),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_leader_costs_one_grace_period_not_the_round() {
    let nodes = nodes(5).await;
    let deadline = clock::now() + 1500;
    let round = 3;
    // The leader (smallest peer id) declares, then goes silent.
    let leader = nodes.iter().min_by_key(|n| n.dht.peer_id()).unwrap();
    let leader_offer = matchmaking::offer(&leader.dht.addrs().await.unwrap(), Mode::Full, 1e7);
    mm(leader)
        .declare(round, deadline, &leader_offer)
        .await
        .unwrap();
    let others: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.dht.peer_id() != leader.dht.peer_id())
        .collect();
    let jobs = others.iter().map(|node| async {
        let offer = matchmaking::offer(&node.dht.addrs().await.unwrap(), Mode::Full, 1e7);
        mm(node)
            .form_group(round, deadline, &offer, 100)
            .await
            .unwrap()
    });
    let groups = futures::future::join_all(jobs).await;
    for g in &groups {
        let list: Vec<_> = g.members.iter().map(|m| m.peer).collect();
        assert_eq!(list.len(), 4);
        assert!(!list.contains(&leader.dht.peer_id()));
        assert_eq!(g.round, groups[0].round);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_peer_waits_for_the_next_round() {
    let nodes = nodes(2).await;
    let mm = Matchmaker {
        dht: &nodes[0].dht,
        keypair: &nodes[0].keypair,
        run: "test-run",
        settings: settings(8),
    };
    let offer = matchmaking::offer(&[], Mode::Full, 1e7);
    let late = mm.declare(1, clock::now() + 100, &offer).await;
    assert!(
        matches!(late, Err(Error::TooLate { round: 1, .. })),
        "{late:?}"
    );
}

/// The leader (smallest peer id) publishes its group with every other member made a client
/// and itself at the greatest rate an offer may have, so that it would reduce the whole buffer
/// (and return any average it likes). The members take each member as its own signed offer
/// says: all full, its rate as it declared, its part one share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cannot_forge_what_its_members_declared() {
    let nodes = nodes(5).await;
    let deadline = clock::now() + 1500;
    let round = 4;
    let len = 10_000;
    let leader = nodes.iter().min_by_key(|n| n.dht.peer_id()).unwrap();
    let honest_offer = matchmaking::offer(&leader.dht.addrs().await.unwrap(), Mode::Full, 1e7);
    mm(leader)
        .declare(round, deadline, &honest_offer)
        .await
        .unwrap();
    let mut forged = Vec::new();
    for node in &nodes {
        let addrs = node.dht.addrs().await.unwrap();
        let offer = if node.dht.peer_id() == leader.dht.peer_id() {
            matchmaking::offer(&addrs, Mode::Full, matchmaking::MAX_RATE)
        } else {
            matchmaking::offer(&addrs, Mode::Client, 1e7)
        };
        forged.push((node.dht.peer_id(), offer));
    }
    forged.sort_by_key(|(p, _)| *p);
    mm(leader).publish(round, deadline, &forged).await.unwrap();
    let others: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.dht.peer_id() != leader.dht.peer_id())
        .collect();
    let jobs = others.iter().map(|node| async move {
        let offer = matchmaking::offer(&node.dht.addrs().await.unwrap(), Mode::Full, 1e7);
        mm(node)
            .form_group(round, deadline, &offer, len)
            .await
            .unwrap()
    });
    for g in futures::future::join_all(jobs).await {
        assert_eq!(g.members.len(), 5);
        for (m, part) in g.members.iter().zip(&g.parts) {
            assert_eq!(m.mode, Mode::Full, "{} made a client", m.peer);
            assert_eq!(m.rate, 1e7);
            assert!(*part <= len / 5 + 1, "{} reduces {part} of {len}", m.peer);
        }
    }
}

/// A leader that reads the offers before the others' have reached it (its clock ahead, the
/// DHT slow: here it agrees at once, 300 ms before the other declares) waits for them instead
/// of forming a group of its own, and the two average together (before, the leader saw only
/// itself, published a group of one and failed with "only 1 peers in the group", and the
/// other waited a grace period for nothing; in a swarm the same peer did so epoch after
/// epoch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_reads_the_offers_early_waits_for_the_others() {
    let nodes = nodes(2).await;
    let deadline = clock::now() + 1500;
    let round = 5;
    let (leader, other) = if nodes[0].dht.peer_id() < nodes[1].dht.peer_id() {
        (&nodes[0], &nodes[1])
    } else {
        (&nodes[1], &nodes[0])
    };
    let lead = async {
        let offer = matchmaking::offer(&leader.dht.addrs().await.unwrap(), Mode::Full, 1e7);
        // A grace period long enough that its wait outlasts the other's 300 ms on a loaded
        // machine.
        let patient = Matchmaker {
            settings: matchmaking::Settings {
                grace: std::time::Duration::from_secs(6),
                ..settings(8)
            },
            ..mm(leader)
        };
        patient.declare(round, deadline, &offer).await?;
        patient.agree(round, deadline, 100).await
    };
    let follow = async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let offer = matchmaking::offer(&other.dht.addrs().await.unwrap(), Mode::Full, 1e7);
        mm(other).form_group(round, deadline, &offer, 100).await
    };
    let (led, followed) = futures::join!(lead, follow);
    let (led, followed) = (led.unwrap(), followed.unwrap());
    let ids = |g: &butterfly::Group| g.members.iter().map(|m| m.peer).collect::<Vec<_>>();
    assert_eq!(ids(&led), [leader.dht.peer_id(), other.dht.peer_id()]);
    assert_eq!(ids(&led), ids(&followed));
}

/// A peer whose offer reaches the others after they read the offers (a newcomer that joined
/// mid-epoch; its offer in time by its own clock) finds them in a group published without it
/// and misses the round (`Error::Excluded`). Before, as the smallest peer id it led the group
/// its own view gave, of all four, took it at once, and waited out the all-reduce's open
/// timeout for members averaging elsewhere, then stepped on its own gradient as if averaged
/// (a swarm test's peers then held other parameters, in one CI run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_offer_came_after_the_others_formed_their_group_misses_the_round() {
    let nodes = nodes(4).await;
    let deadline = clock::now() + 1500;
    let round = 6;
    let late = nodes.iter().min_by_key(|n| n.dht.peer_id()).unwrap();
    let others: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.dht.peer_id() != late.dht.peer_id())
        .collect();
    form_without(&others, round, deadline).await;
    // Its offer is stored only now, and it agrees at once.
    let offer = matchmaking::offer(&late.dht.addrs().await.unwrap(), Mode::Full, 1e7);
    mm(late)
        .declare(round, clock::now() + 1500, &offer)
        .await
        .unwrap();
    let got = mm(late).agree(round, deadline, 100).await;
    assert!(
        matches!(&got, Err(Error::Excluded { round: 6, .. })),
        "{got:?}"
    );
}

/// A peer that saw the others' deadline at hand (too near to declare for) waits for a
/// deadline of its own. Watching the published groups as it waits, it learns that it missed
/// the round as soon as the others formed their group without it, long before its own
/// deadline. Before, it learned so only at its own deadline: a newcomer to a swarm of
/// one-second rounds then came to the next round that late too, and missed every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_watching_for_the_others_group_learns_before_its_own_deadline_that_it_missed_the_round()
 {
    let nodes = nodes(3).await;
    let deadline = clock::now() + 1500;
    let round = 8;
    let (late, others) = nodes.split_last().unwrap();
    form_without(&others.iter().collect::<Vec<_>>(), round, deadline).await;
    let own = clock::now() + 20_000;
    let offer = matchmaking::offer(&late.dht.addrs().await.unwrap(), Mode::Full, 1e7);
    mm(late).declare(round, own, &offer).await.unwrap();
    let got = mm(late).wait_for(round, own, true).await;
    assert!(
        matches!(&got, Err(Error::Excluded { round: 8, .. })),
        "{got:?}"
    );
    assert!(clock::now() < own, "it waited for its own deadline");
}

/// `others` form their group of `round` by `deadline` (all of them in it), before a late peer
/// declares.
async fn form_without(others: &[&Node], round: u64, deadline: clock::Time) {
    let jobs = others.iter().map(|node| async move {
        let offer = matchmaking::offer(&node.dht.addrs().await.unwrap(), Mode::Full, 1e7);
        mm(node)
            .form_group(round, deadline, &offer, 100)
            .await
            .unwrap()
    });
    for g in futures::future::join_all(jobs).await {
        assert_eq!(g.members.len(), others.len());
    }
}
