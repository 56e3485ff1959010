//! State downloads from several donors, with one that vanishes and one that lies.

use libp2p::identity::Keypair;
use potluck_core::{Layout, Role};
use potluck_net::dht::{self, Dht};
use potluck_train::optim::{Config, Optimizer, Precision};
use potluck_train::sync::{self, Donor, Partial, Serving, Shape, Shelf, Snapshot};

fn state(seed: f32) -> (Vec<f32>, Optimizer) {
    let layout = Layout::new([
        ("w", vec![300, 200], Role::Weight),
        ("b", vec![200], Role::Bias),
    ])
    .unwrap();
    let cfg = Config {
        precision: Precision::Blockwise8,
        ..Config::reference_lamb()
    };
    let mut opt = Optimizer::new(cfg, &layout);
    let mut params: Vec<f32> = (0..layout.numel())
        .map(|i| (i as f32 * seed).sin())
        .collect();
    let mut grad: Vec<f32> = (0..layout.numel()).map(|i| (i as f32).cos()).collect();
    for _ in 0..2 {
        opt.step(&mut params, &mut grad.clone()).unwrap();
        grad.iter_mut().for_each(|g| *g *= 0.5);
    }
    (params, opt)
}

async fn donor(snapshot: Snapshot, serving: Serving) -> (Dht, Donor) {
    let dht = Dht::start_memory(Keypair::generate_ed25519(), dht::Config::default())
        .await
        .unwrap();
    let shelf = Shelf::default();
    shelf.put(snapshot);
    sync::serve(dht.host(), shelf, serving).unwrap();
    let donor = Donor {
        peer: dht.peer_id(),
        addrs: dht.addrs().await.unwrap(),
    };
    (dht, donor)
}

/// A fresh node downloads a state of `shape` from `donors`, from scratch.
async fn newcomer_downloads(
    donors: &[Donor],
    shape: Shape,
) -> Result<(Snapshot, sync::Report), sync::Error> {
    newcomer_wants(donors, &sync::Want::shape(shape)).await
}

/// [`newcomer_downloads`] of what `want` says.
async fn newcomer_wants(
    donors: &[Donor],
    want: &sync::Want,
) -> Result<(Snapshot, sync::Report), sync::Error> {
    let me = Dht::start_memory(Keypair::generate_ed25519(), dht::Config::default())
        .await
        .unwrap();
    let settings = sync::Settings::default();
    sync::download(me.host(), donors, want, &mut Partial::default(), &settings).await
}

/// A donor serving a state of its own making (same shape, its own hashes) and two honest
/// donors (their nodes, kept alive while they serve), and the honest state.
async fn a_liar_and_two_honest_donors() -> (Vec<Dht>, [Donor; 3], Vec<f32>, Optimizer) {
    let (params, opt) = state(1.0);
    let (liar_params, liar_opt) = state(2.0);
    let chunk = 16 << 10;
    let take = |p: &[f32], o: &Optimizer| Snapshot::take(p, o, 99, chunk);
    let (a, liar) = donor(take(&liar_params, &liar_opt), Serving::default()).await;
    let (b, one) = donor(take(&params, &opt), Serving::default()).await;
    let (c, two) = donor(take(&params, &opt), Serving::default()).await;
    (vec![a, b, c], [liar, one, two], params, opt)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_from_several_donors_survives_one_vanishing_and_one_lying() {
    let (params, opt) = state(1.0);
    let chunk = 16 << 10;
    let take = || Snapshot::take(&params, &opt, 1234, chunk);
    // Same shape, other values: every chunk it sends fails the manifest's hashes.
    let (liar_params, liar_opt) = state(2.0);
    // The honest donor is slow, so the others surely get to fetch chunks.
    let slow = Serving {
        delay: Some(std::time::Duration::from_millis(20)),
        ..Serving::default()
    };
    let (_a, honest) = donor(take(), slow).await;
    let (_b, vanishing) = donor(
        take(),
        Serving {
            vanish_after: Some(3),
            ..slow
        },
    )
    .await;
    let (_c, liar) = donor(
        Snapshot::take(&liar_params, &liar_opt, 1234, chunk),
        Serving::default(),
    )
    .await;
    let me = Dht::start_memory(Keypair::generate_ed25519(), dht::Config::default())
        .await
        .unwrap();
    let (_, mut fresh) = state(3.0);
    fresh.set_steps(0);
    let shape = Shape::of(&fresh);
    let mut partial = Partial::default();
    let donors = [honest.clone(), vanishing.clone(), liar.clone()];
    let (snapshot, report) = sync::download(
        me.host(),
        &donors,
        &sync::Want::shape(shape),
        &mut partial,
        &sync::Settings::default(),
    )
    .await
    .unwrap();
    let mut got = vec![0.0; params.len()];
    snapshot.install(&mut got, &mut fresh).unwrap();
    assert_eq!(got, params);
    assert_eq!(fresh.moments(), opt.moments());
    assert_eq!((fresh.steps(), snapshot.samples), (2, 1234));
    let total: usize = report.per_donor.iter().sum();
    assert_eq!(total, shape.bytes().div_ceil(chunk as u64) as usize);
    assert!(report.per_donor[1] <= 3, "{report:?}");
    assert_eq!(report.per_donor[2], 0, "{report:?}");
    let dropped: Vec<_> = report.dropped.iter().map(|(p, _)| *p).collect();
    assert!(dropped.contains(&vanishing.peer), "{report:?}");
    assert!(dropped.contains(&liar.peer), "{report:?}");
    assert!(!dropped.contains(&honest.peer), "{report:?}");
}

/// A donor's manifest is its word: one of an older epoch than the donor claimed (a peer that
/// says it is ahead and serves what it has), or with other optimizer settings than the run's,
/// is passed over even when it comes first; with no other donor, nothing is installed and the
/// download says who offered what.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_donor_offering_another_epoch_or_other_settings_is_passed_over() {
    let (params, opt) = state(1.0);
    let chunk = 16 << 10;
    let (liar_params, liar_opt) = state(2.0);
    let mut behind = Snapshot::take(&liar_params, &liar_opt, 99, chunk);
    behind.epoch -= 1;
    let mut hot = Snapshot::take(&liar_params, &liar_opt, 99, chunk);
    hot.config.schedule.peak *= 10.0;
    let (_a, behind) = donor(behind, Serving::default()).await;
    let (_b, hot) = donor(hot, Serving::default()).await;
    let (_c, honest) = donor(Snapshot::take(&params, &opt, 99, chunk), Serving::default()).await;
    let me = Dht::start_memory(Keypair::generate_ed25519(), dht::Config::default())
        .await
        .unwrap();
    let (_, mut fresh) = state(3.0);
    let want = sync::Want {
        shape: Shape::of(&fresh),
        epoch: Some(opt.steps()),
        config: sync::ConfigWanted::Exactly(*opt.config()),
        settle_ties: false,
    };
    let settings = sync::Settings::default();
    let liars = [behind.clone(), hot.clone()];
    let err = sync::download(me.host(), &liars, &want, &mut Partial::default(), &settings)
        .await
        .unwrap_err();
    match &err {
        sync::Error::Unlike { donors, .. } => {
            let peers: Vec<_> = donors.iter().map(|(p, _)| *p).collect();
            assert_eq!(peers, vec![behind.peer, hot.peer], "{err}");
        }
        other => panic!("{other}"),
    }
    // A donor that stepped since it reported is passed over too, but told no lie.
    let mut later = Snapshot::take(&liar_params, &liar_opt, 99, chunk);
    later.epoch += 1;
    let (_d, later) = donor(later, Serving::default()).await;
    let all = [behind.clone(), hot.clone(), later.clone(), honest.clone()];
    let (snapshot, report) =
        sync::download(me.host(), &all, &want, &mut Partial::default(), &settings)
            .await
            .unwrap();
    assert_eq!(report.unlike, vec![behind.peer, hot.peer]);
    assert_eq!(report.per_donor[..3], [0, 0, 0]);
    // Alone, it serves its newer state (a lone donor of a fast run moves on between reads).
    let (newer, _) = sync::download(
        me.host(),
        &[later],
        &want,
        &mut Partial::default(),
        &settings,
    )
    .await
    .unwrap();
    assert_eq!(newer.epoch, opt.steps() + 1);
    let mut got = vec![0.0; params.len()];
    snapshot.install(&mut got, &mut fresh).unwrap();
    assert_eq!(got, params);
    assert_eq!(fresh.config(), opt.config());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_carries_on_where_a_failed_one_stopped() {
    let (params, opt) = state(1.0);
    let chunk = 16 << 10;
    let (_a, only) = donor(
        Snapshot::take(&params, &opt, 7, chunk),
        Serving {
            vanish_after: Some(4),
            ..Serving::default()
        },
    )
    .await;
    let me = Dht::start_memory(Keypair::generate_ed25519(), dht::Config::default())
        .await
        .unwrap();
    let (_, fresh) = state(3.0);
    let shape = Shape::of(&fresh);
    let mut partial = Partial::default();
    let err = sync::download(
        me.host(),
        std::slice::from_ref(&only),
        &sync::Want::shape(shape),
        &mut partial,
        &sync::Settings::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, sync::Error::Incomplete { got: 4, .. }),
        "{err}"
    );
    // Another donor of the same state: only the missing chunks are fetched.
    let (_b, other) = donor(Snapshot::take(&params, &opt, 7, chunk), Serving::default()).await;
    let (snapshot, report) = sync::download(
        me.host(),
        &[other],
        &sync::Want::shape(shape),
        &mut partial,
        &sync::Settings::default(),
    )
    .await
    .unwrap();
    let total = shape.bytes().div_ceil(chunk as u64) as usize;
    assert_eq!(report.per_donor, vec![total - 4]);
    assert_eq!(snapshot.state().0, params);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_of_another_shape_is_refused_before_downloading() {
    let (params, opt) = state(1.0);
    let (_a, d) = donor(
        Snapshot::take(&params, &opt, 0, 1 << 20),
        Serving::default(),
    )
    .await;
    let mut shape = Shape::of(&opt);
    shape.numel += 1;
    let err = newcomer_downloads(&[d], shape).await.unwrap_err();
    assert!(matches!(err, sync::Error::Mismatch(_)), "{err}");
}

/// Donors that agree on a state holding a NaN (every chunk matches its hash) do not get it
/// installed: the download says the state is not finite (before, it was installed, and the
/// newcomer served it on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_that_is_not_finite_is_not_installed() {
    let (mut params, opt) = state(1.0);
    params[1234] = f32::NAN;
    let mut donors = Vec::new();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let (node, d) = donor(
            Snapshot::take(&params, &opt, 0, 16 << 10),
            Serving::default(),
        )
        .await;
        nodes.push(node);
        donors.push(d);
    }
    let err = newcomer_downloads(&donors, Shape::of(&opt))
        .await
        .unwrap_err();
    assert!(matches!(err, sync::Error::NotFinite(_)), "{err}");
}

/// A donor whose manifest does not fit (a liar, or a peer of another model) is passed over:
/// the download completes from the next donor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_donor_whose_manifest_does_not_fit_is_passed_over() {
    let (params, opt) = state(1.0);
    let other = Layout::new([("w", vec![30, 20], Role::Weight)]).unwrap();
    let other_opt = Optimizer::new(
        Config {
            precision: Precision::Blockwise8,
            ..Config::reference_lamb()
        },
        &other,
    );
    let (_a, misfit) = donor(
        Snapshot::take(&vec![0.5; other.numel()], &other_opt, 0, 1 << 20),
        Serving::default(),
    )
    .await;
    let (_b, honest) = donor(
        Snapshot::take(&params, &opt, 0, 1 << 20),
        Serving::default(),
    )
    .await;
    let (snapshot, report) = newcomer_downloads(&[misfit, honest], Shape::of(&opt))
        .await
        .unwrap();
    assert_eq!(snapshot.state().0, params);
    assert_eq!(report.per_donor.iter().sum::<usize>(), report.per_donor[1]);
}

/// A donor with a state of its own making (same shape, its own hashes) listed first: the
/// manifests are cross-checked, the two honest donors outvote it, and it serves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_donor_whose_manifest_disagrees_with_the_others_is_outvoted() {
    let (_nodes, [liar, one, two], params, opt) = a_liar_and_two_honest_donors().await;
    let (snapshot, report) = newcomer_downloads(&[liar.clone(), one, two], Shape::of(&opt))
        .await
        .unwrap();
    assert_eq!(snapshot.state().0, params);
    assert_eq!(report.per_donor[0], 0, "{report:?}");
    let dropped: Vec<_> = report.dropped.iter().map(|(p, _)| *p).collect();
    assert_eq!(dropped, [liar.peer], "{report:?}");
    assert!(report.dropped[0].1.contains("disagrees"), "{report:?}");
}

/// One honest donor and one serving a state of its own making: a tie, whichever is listed
/// first, so nothing is installed and no one is blamed (before, the first donor's state was
/// taken: the liar's when it answered first); a second honest donor decides it. A downloader
/// that knows no more donors are coming settles the tie with the first donor's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_donors_of_two_states_install_neither_until_a_third_decides() {
    let (_nodes, [liar, one, two], params, opt) = a_liar_and_two_honest_donors().await;
    let shape = Shape::of(&opt);
    for pair in [[liar.clone(), one.clone()], [one.clone(), liar.clone()]] {
        let err = newcomer_downloads(&pair, shape).await.unwrap_err();
        assert!(
            matches!(err, sync::Error::Tied { donors: 2, states: 2, epoch } if epoch == opt.steps()),
            "{err}"
        );
    }
    // With no one else to ask (the downloader says no more donors are coming), the first
    // donor's state is taken: two honest peers can hold different states.
    let settle = sync::Want {
        settle_ties: true,
        ..sync::Want::shape(shape)
    };
    let (snapshot, _) = newcomer_wants(&[one.clone(), liar.clone()], &settle)
        .await
        .unwrap();
    assert_eq!(snapshot.state().0, params);
    let (snapshot, report) = newcomer_downloads(&[liar.clone(), one, two], shape)
        .await
        .unwrap();
    assert_eq!(snapshot.state().0, params);
    assert_eq!(report.outvoted, [liar.peer], "{report:?}");
}

/// A node of an authorized run on the in-memory transport: with a valid token of `authority`
/// for run `run` (None: no token at all).
async fn gated(authority: &potluck_net::auth::Authority, run: Option<&str>) -> Dht {
    use potluck_net::auth::{Gate, Role, Verifier};
    use potluck_net::host::{self, ClientMode, Transports};
    let keypair = Keypair::generate_ed25519();
    let peer = keypair.public().to_peer_id();
    let mut cfg = host::Config::new(keypair, Transports::Memory);
    cfg.listen = vec![libp2p::multiaddr::Protocol::Memory(rand::random::<u64>() | 1).into()];
    cfg.client_mode = ClientMode::Off;
    if let Some(run) = run {
        let token = authority.grant(
            run,
            peer,
            Role::Trainer,
            std::time::Duration::from_secs(600),
        );
        let verifier = Verifier {
            run: "guarded".into(),
            authority: authority.public(),
        };
        cfg.auth = Some(std::sync::Arc::new(Gate::new(verifier, token)));
    }
    Dht::start(cfg, dht::Config::default(), Default::default())
        .await
        .unwrap()
}

/// In an authorized run a state is served to admitted peers only: a stranger without a token,
/// or with a token of another run, downloads nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admitted_peers_download_the_state_of_an_authorized_run() {
    let authority = potluck_net::auth::Authority::generate();
    let (params, opt) = state(1.0);
    let donor_node = gated(&authority, Some("guarded")).await;
    let shelf = Shelf::default();
    shelf.put(Snapshot::take(&params, &opt, 5, 16 << 10));
    sync::serve(donor_node.host(), shelf, Serving::default()).unwrap();
    let donor = Donor {
        peer: donor_node.peer_id(),
        addrs: donor_node.addrs().await.unwrap(),
    };
    let shape = Shape::of(&opt);
    let settings = sync::Settings {
        open_timeout: std::time::Duration::from_secs(3),
        ..sync::Settings::default()
    };
    let fetch = |node: Dht| {
        let donor = donor.clone();
        let settings = settings.clone();
        async move {
            let mut partial = Partial::default();
            sync::download(
                node.host(),
                &[donor],
                &sync::Want::shape(shape),
                &mut partial,
                &settings,
            )
            .await
        }
    };
    for (who, node) in [
        ("no token", gated(&authority, None).await),
        (
            "another run's token",
            gated(&authority, Some("elsewhere")).await,
        ),
    ] {
        let err = fetch(node).await.unwrap_err();
        assert!(matches!(err, sync::Error::NoManifest(_)), "{who}: {err}");
    }
    let (snapshot, _) = fetch(gated(&authority, Some("guarded")).await)
        .await
        .unwrap();
    assert_eq!(snapshot.state().0, params);
}
