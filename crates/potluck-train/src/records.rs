//! The typed records of a run, all together: every node that takes part in a run (a trainer,
//! an aux peer, the monitor, a bootstrap node) registers these checks, so that its store
//! refuses a record under a run's key that is not a signed, well-formed value of the key's
//! type ([`potluck_net::dht::typed`]).
//!
//! | key | type |
//! |---|---|
//! | `RUN/progress` | [`progress::Report`] |
//! | `RUN/close/EPOCH` | [`progress::Deadline`] |
//! | `RUN/metrics` | [`metrics::Metrics`] |
//! | `RUN/reports` | [`reports::Report`] |
//! | `RUN/avg/ROUND`, `RUN/avg/ROUND/groups` | [`matchmaking`]'s offers and groups |
//! | `RUN/revoked` | [`revoke::Revocations`] |
//! | `RUN/charter` | [`charter::Charter`] |

use potluck_allreduce::matchmaking;
use potluck_net::dht::record::Validators;
use potluck_net::dht::typed::validator;
use potluck_net::revoke;

use crate::{charter, metrics, progress, reports};

/// The checks of every typed record of a run, for a node's store.
pub fn validators() -> Validators {
    let validators = Validators::default()
        .with(validator::<progress::Report>())
        .with(validator::<progress::Deadline>())
        .with(validator::<metrics::Metrics>())
        .with(validator::<reports::Report>())
        .with(validator::<revoke::Revocations>())
        .with(validator::<charter::Charter>());
    matchmaking::validators()
        .into_iter()
        .fold(validators, Validators::with)
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;
    use potluck_core::clock;
    use potluck_net::dht::record::{self, Rejection};
    use potluck_net::dht::{self, Dht};
    use potluck_net::host::{self, ClientMode, Transports};

    use super::*;

    async fn node(validators: Validators, client_mode: ClientMode) -> (Dht, Keypair) {
        let keypair = Keypair::generate_ed25519();
        let mut host_config = host::Config::new(keypair.clone(), Transports::Memory);
        let port = rand::random::<u64>() | 1;
        host_config.listen = vec![libp2p::multiaddr::Protocol::Memory(port).into()];
        let config = dht::Config {
            client_mode,
            ..dht::Config::default()
        };
        let dht = Dht::start(host_config, config, validators).await.unwrap();
        (dht, keypair)
    }

    /// A node of a run stores a record under one of the run's keys only if it is a signed,
    /// well-formed value of the key's type: what another peer sends is checked before it is
    /// stored, whatever that peer checked itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_of_a_run_stores_only_well_formed_records_of_its_keys() {
        let (node, _) = node(validators(), ClientMode::Off).await;
        // A peer that checks nothing itself, and stores only through others.
        let (liar, key) = node_without_checks().await;
        liar.bootstrap(&node.addrs().await.unwrap()).await.unwrap();
        let expiration = clock::now() + 60_000;
        let progress = b"run/progress";
        let garbage = record::signed(&key, progress, vec![0xff; 40], expiration);
        assert!(matches!(
            liar.store_record(garbage).await,
            Err(dht::Error::Rejected(Rejection::Invalid(_)))
        ));
        let plain = liar
            .store(progress, None, b"plain".to_vec(), expiration)
            .await;
        assert!(matches!(
            plain,
            Err(dht::Error::Rejected(Rejection::Invalid(_)))
        ));
        let too_many = reports::Report {
            banned: vec![(vec![1; 38], "x".into()); reports::MAX_NAMED + 1],
        };
        let stored = reports::records("run")
            .put(&liar, &key, &too_many, expiration)
            .await;
        assert!(matches!(
            stored,
            Err(dht::Error::Rejected(Rejection::Invalid(_)))
        ));
        // A good record of the type is taken, and read back.
        let report = progress::Report {
            epoch: 3,
            samples: 16,
            samples_per_second: 2.0,
            time: clock::now(),
            held: 3,
            addrs: Vec::new(),
            tokenizers: crate::tokenizers::NONE,
            recipe: "every step averaged, codec auto".into(),
            optimizer: 0,
        };
        let tracker = progress::Tracker {
            dht: &liar,
            keypair: &key,
            run: "run",
            ttl: std::time::Duration::from_secs(60),
        };
        tracker.publish(&report).await.unwrap();
        let read = progress::Tracker {
            dht: &node,
            ..tracker
        }
        .fetch()
        .await
        .unwrap();
        assert_eq!(read, vec![(liar.peer_id(), report.clone())]);
        // A recipe longer than any a peer gives is refused.
        let long = progress::Report {
            recipe: "x".repeat(progress::MAX_RECIPE + 1),
            ..report
        };
        assert!(tracker.publish(&long).await.is_err());
        // Keys of no type are not the run's business.
        liar.store(b"run.other", None, b"anything".to_vec(), expiration)
            .await
            .unwrap();
    }

    async fn node_without_checks() -> (Dht, Keypair) {
        node(Validators::default(), ClientMode::On).await
    }
}
